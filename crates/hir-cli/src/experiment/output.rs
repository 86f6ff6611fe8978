//! What an experiment writes: the Markdown table, `experiment.md`, `experiment.json` and a
//! chart per task.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use super::{stats, Experiment, Row, RunResult};
use crate::report::pct;

fn secs(x: Option<f64>) -> String {
    x.map_or("-".into(), |s| format!("{s:.0}"))
}

/// An accuracy with its Wilson 95% interval: `21.0% [15.9–27.2]`.
fn with_interval(correct: usize, n: u32) -> String {
    let (lo, hi) = stats::wilson(correct as u32, n);
    format!(
        "{} [{:.1}–{:.1}]",
        pct(f64::from(correct as u32) / f64::from(n.max(1))),
        100.0 * lo,
        100.0 * hi
    )
}

/// The exact McNemar p-value of `row` against `other` on the same items, exact match and
/// extraction; `-` where there is nothing to compare.
fn paired(row: &Row, other: Option<&Row>) -> (String, String) {
    match other {
        Some(o) if o.examples == row.examples && !std::ptr::eq(o, row) => {
            let p = |a: &[u32], b: &[u32]| {
                let (x, y) = stats::discordant(a, b);
                stats::p_value(stats::mcnemar_exact(x, y))
            };
            (
                p(&row.correct, &o.correct),
                p(&row.correct_extracted, &o.correct_extracted),
            )
        }
        _ => ("-".into(), "-".into()),
    }
}

/// A run's last evaluated iteration after the base model, if any.
fn final_row(r: &RunResult) -> Option<&Row> {
    r.rows
        .iter()
        .filter(|x| x.iteration > 0)
        .max_by_key(|x| x.iteration)
}

/// The base model's row of each (task, seed): the first run that evaluated it holds it.
fn base_rows(e: &Experiment) -> BTreeMap<(String, u64), &Row> {
    let mut out = BTreeMap::new();
    for r in &e.runs {
        for row in r.rows.iter().filter(|x| x.iteration == 0) {
            out.entry((row.task.clone(), row.seed)).or_insert(row);
        }
    }
    out
}

/// One paired test: `method`'s final iteration against `against` on the same test items.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Comparison {
    /// The task.
    pub task: String,
    /// The seed (and so the test split).
    pub seed: u64,
    /// The method tested.
    pub method: String,
    /// What it is compared with: `base`, `farl` or `sft`.
    pub against: String,
    /// Test items only `method` got right, and only `against`, under exact match.
    pub exact_discordant: (u32, u32),
    /// The exact McNemar p-value under exact match.
    pub p_exact: f64,
    /// Test items only `method` got right, and only `against`, under extraction.
    pub extracted_discordant: (u32, u32),
    /// The exact McNemar p-value under extraction.
    pub p_extracted: f64,
}

/// Every paired test the summary shows, for the JSON.
pub fn comparisons(e: &Experiment) -> Vec<Comparison> {
    let bases = base_rows(e);
    let mut out = Vec::new();
    for r in &e.runs {
        let Some(row) = final_row(r) else { continue };
        let mut against: Vec<(&str, &Row)> = Vec::new();
        if let Some(b) = bases.get(&(r.task.clone(), r.seed)) {
            against.push(("base", b));
        }
        if matches!(r.method.as_str(), "hir" | "hindsight_answer") {
            for other in ["farl", "sft"] {
                if let Some(o) = e
                    .runs
                    .iter()
                    .find(|o| o.method == other && o.task == r.task && o.seed == r.seed)
                    .and_then(final_row)
                {
                    against.push((other, o));
                }
            }
        }
        for (name, o) in against {
            if o.examples != row.examples {
                continue;
            }
            let ex = stats::discordant(&row.correct, &o.correct);
            let xt = stats::discordant(&row.correct_extracted, &o.correct_extracted);
            out.push(Comparison {
                task: r.task.clone(),
                seed: r.seed,
                method: r.method.clone(),
                against: name.into(),
                exact_discordant: ex,
                p_exact: stats::mcnemar_exact(ex.0, ex.1),
                extracted_discordant: xt,
                p_extracted: stats::mcnemar_exact(xt.0, xt.1),
            });
        }
    }
    out
}

/// The experiment as Markdown: every iteration of every run ([`iterations`]), then the
/// final iteration per method over seeds with the paired tests ([`summary`]).
pub fn table(e: &Experiment) -> String {
    format!("{}\n{}\n{}", summary(e), iterations(e), timing(e))
}

/// Where each run's time went, in minutes and seconds as this command saw it: wall time
/// from the start request to the run's end, and each phase summed over all the run's
/// iterations (evaluated or not), with the experiment's total.
pub fn timing(e: &Experiment) -> String {
    let clock = |s: f64| {
        let s = s.round() as u64;
        format!("{}:{:02}", s / 60, s % 60)
    };
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| method | task | seed | wall | sample | train | swap | evaluate |\n|---|---|---:|---:|---:|---:|---:|---:|"
    );
    for r in &e.runs {
        let t = r.seconds;
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            r.method,
            r.task,
            r.seed,
            clock(t.wall),
            clock(t.sample),
            clock(t.train),
            clock(t.swap),
            clock(t.eval)
        );
    }
    let _ = writeln!(
        s,
        "| all {} runs | | | {} | | | | |",
        e.runs.len(),
        clock(e.runs.iter().map(|r| r.seconds.wall).sum())
    );
    s
}

/// Every iteration of every run: the base model once per task and seed, then each
/// method's iterations with intervals and the paired test against the base model; a failed
/// run shows its status and error.
pub fn iterations(e: &Experiment) -> String {
    let bases = base_rows(e);
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| method | task | seed | iteration | steps | samples correct (exact / extracted) | pass@n (exact / extracted) | {on} exact [95% CI] | p vs base | {on} extracted [95% CI] | p vs base | top answer (share) | no answer | answers | train loss | sample s | train s | swap s | eval s |",
        on = e.evaluated_on
    );
    let _ = writeln!(
        s,
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---|---:|---:|---:|---:|---:|"
    );
    let mut base_shown = std::collections::HashSet::new();
    for r in &e.runs {
        for row in &r.rows {
            if row.iteration == 0 && !base_shown.insert((row.task.clone(), row.seed)) {
                continue;
            }
            let base = bases.get(&(row.task.clone(), row.seed)).copied();
            let (p_exact, p_extracted) = paired(row, base);
            let p = row.phase_seconds;
            let trained = row.iteration > 0;
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} ({}) | {} | {} | {} | {} | {} | {} | {} |",
                row.method,
                row.task,
                row.seed,
                row.iteration,
                if trained { row.steps.to_string() } else { "-".into() },
                if trained {
                    format!(
                        "{} / {}",
                        pct(row.sample_accuracy),
                        pct(row.sample_accuracy_extracted)
                    )
                } else {
                    "-".into()
                },
                if trained {
                    format!("{} / {}", pct(row.pass_at_n.0), pct(row.pass_at_n.1))
                } else {
                    "-".into()
                },
                with_interval(row.correct.len(), row.examples),
                p_exact,
                with_interval(row.correct_extracted.len(), row.examples),
                p_extracted,
                row.top_answer,
                pct(row.top_share),
                pct(row.no_answer_share),
                crate::report::answers(&row.answers),
                if trained {
                    format!("{:.3}", row.train_loss)
                } else {
                    "-".into()
                },
                secs(p[0]),
                secs(p[1]),
                secs(p[2]),
                secs(p[3]),
            );
        }
        if r.status != "done" {
            let _ = writeln!(
                s,
                "| {} | {} | {} | - | - | - | {} | - | - | - | - | - | - | - | - | - | - | {} |",
                r.method,
                r.task,
                r.seed,
                r.status.to_uppercase(),
                r.error.replace('|', "/")
            );
        }
    }
    s
}

/// The final iteration of each method per task and seed, with the mean and range over
/// seeds, the paired test against the base model and, for HIR and hindsight_answer,
/// against FARL and SFT on the same seed's test items.
pub fn summary(e: &Experiment) -> String {
    let bases = base_rows(e);
    let finals: Vec<(&RunResult, &Row)> = e
        .runs
        .iter()
        .filter_map(|r| final_row(r).map(|row| (r, row)))
        .collect();
    let find = |method: &str, task: &str, seed: u64| {
        finals
            .iter()
            .find(|(r, _)| r.method == method && r.task == task && r.seed == seed)
            .map(|(_, row)| *row)
    };
    // Optimizer steps over the whole run, by (method, task, seed).
    let total_steps = |row: &Row| -> u64 {
        e.runs
            .iter()
            .filter(|r| r.method == row.method && r.task == row.task && r.seed == row.seed)
            .map(|r| r.steps)
            .sum()
    };
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| task | method | seed | steps in all | {on} exact [95% CI] | p vs base | {on} extracted [95% CI] | p vs base | p vs farl (exact / extracted) | p vs sft (exact / extracted) | top answer (share) | no answer |",
        on = e.evaluated_on
    );
    let _ = writeln!(
        s,
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|"
    );
    let mut tasks: Vec<&str> = Vec::new();
    let mut methods: Vec<&str> = vec!["base"];
    for r in &e.runs {
        if !tasks.contains(&r.task.as_str()) {
            tasks.push(&r.task);
        }
        if !methods.contains(&r.method.as_str()) {
            methods.push(&r.method);
        }
    }
    for task in &tasks {
        for method in &methods {
            let rows: Vec<&Row> = bases
                .iter()
                .filter(|((t, _), _)| t == task)
                .filter_map(|((_, seed), base)| {
                    if *method == "base" {
                        Some(*base)
                    } else {
                        find(method, task, *seed)
                    }
                })
                .collect();
            for row in &rows {
                let base = bases.get(&(row.task.clone(), row.seed)).copied();
                let (pb_exact, pb_extracted) = paired(row, base);
                let versus = |other: &str| {
                    if matches!(*method, "hir" | "hindsight_answer") {
                        let (a, b) = paired(row, find(other, task, row.seed));
                        if a == "-" {
                            "-".to_string()
                        } else {
                            format!("{a} / {b}")
                        }
                    } else {
                        "-".to_string()
                    }
                };
                let _ = writeln!(
                    s,
                    "| {task} | {method} | {} | {} | {} | {pb_exact} | {} | {pb_extracted} | {} | {} | {} ({}) | {} |",
                    row.seed,
                    if row.iteration > 0 { total_steps(row) } else { 0 },
                    with_interval(row.correct.len(), row.examples),
                    with_interval(row.correct_extracted.len(), row.examples),
                    versus("farl"),
                    versus("sft"),
                    row.top_answer,
                    pct(row.top_share),
                    pct(row.no_answer_share),
                );
            }
            if rows.len() > 1 {
                let acc = |f: fn(&Row) -> f64| {
                    let v: Vec<f64> = rows.iter().map(|r| f(r)).collect();
                    let mean = v.iter().sum::<f64>() / v.len() as f64;
                    let (lo, hi) = v
                        .iter()
                        .fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), x| {
                            (l.min(*x), h.max(*x))
                        });
                    format!("{} ({}–{})", pct(mean), pct(lo), pct(hi))
                };
                let _ = writeln!(
                    s,
                    "| {task} | **{method}** | mean of {} | | {} | | {} | | | | | |",
                    rows.len(),
                    acc(|r| r.exact),
                    acc(|r| r.extracted),
                );
            }
        }
    }
    for r in e.runs.iter().filter(|r| r.status != "done") {
        let _ = writeln!(
            s,
            "| {} | {} | {} | - | {} | | | | | | | {} |",
            r.task,
            r.method,
            r.seed,
            r.status.to_uppercase(),
            r.error.replace('|', "/")
        );
    }
    s
}

/// Writes `experiment.md`, `experiment.svg` and `experiment.json` into `dir`.
pub(super) fn write(e: &Experiment, dir: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let json = dir.join("experiment.json");
    std::fs::write(&json, serde_json::to_vec_pretty(e)?)
        .with_context(|| format!("writing {}", json.display()))?;
    let svg = dir.join("experiment.svg");
    std::fs::write(&svg, chart(e)).with_context(|| format!("writing {}", svg.display()))?;
    let mut md = String::new();
    let _ = writeln!(md, "# Experiment {}\n", e.name);
    let _ = writeln!(md, "- preset: `{}`", e.preset);
    let _ = writeln!(md, "- starting model: `{}`", e.model);
    let _ = writeln!(md, "- knobs: `{}`", e.knobs);
    let _ = writeln!(
        md,
        "- runs: {} ({} finished)",
        e.runs.len(),
        e.runs.iter().filter(|r| r.status == "done").count()
    );
    let _ = writeln!(
        md,
        "- measured on: the {} split\n\n## Final iteration\n\n{}\n## Every iteration\n\n{}\n## Time\n\n{}",
        e.evaluated_on,
        summary(e),
        iterations(e),
        timing(e)
    );
    let _ = writeln!(
        md,
        "Iteration 0 is the starting model (`base`). *Exact* is the paper's exact match; \
         *extracted* reads the answer (an option letter, a number) out of the output first. \
         Brackets hold the Wilson 95% interval. *p* is the two-sided exact McNemar test on \
         the same items (the base model's, FARL's or SFT's answers on the same seed's split). \
         *Top answer* is the most frequent predicted answer: a share near 100% is a collapse \
         to one answer; *no answer* is the share with nothing readable in it. *Samples \
         correct* is the share of the iteration's training samples correct at sampling time \
         (for `sft`, the gold answers); *pass@n* the share of its training prompts with at \
         least one correct sample among their n. Phase times are wall seconds as the client saw them.\n\n\
         ![accuracy per iteration](experiment.svg)"
    );
    let path = dir.join("experiment.md");
    std::fs::write(&path, md).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

const COLORS: [&str; 6] = [
    "#7f7f7f", "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e",
];

/// Escapes text for SVG.
fn xml(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// One panel per task: test accuracy per iteration, one colour per method, solid for exact
/// match and dashed for answer extraction, each line the pooled accuracy over seeds inside
/// its Wilson 95% band. The base model is every line's first point. Each panel's heading
/// says what it plots: task, model, test items, seeds and optimizer steps.
pub fn chart(e: &Experiment) -> String {
    // Each task and method once, in the order the runs came.
    let distinct = |of: fn(&RunResult) -> &str| -> Vec<&str> {
        let mut seen = std::collections::BTreeSet::new();
        e.runs.iter().map(of).filter(|x| seen.insert(*x)).collect()
    };
    let tasks = distinct(|r| r.task.as_str());
    let methods = distinct(|r| r.method.as_str());
    let bases = base_rows(e);
    let last = e
        .runs
        .iter()
        .flat_map(|r| r.rows.iter().map(|x| x.iteration))
        .max()
        .unwrap_or(1)
        .max(1);
    let legend = ["exact (solid)", "extracted (dashed)"]
        .iter()
        .map(|s| s.len())
        .chain(methods.iter().map(|m| m.len()))
        .max()
        .unwrap_or(8);
    // 7 px a character at 12 px sans-serif, with room for the swatch.
    let right = 56.0 + 7.0 * legend as f64;
    let (plot_w, ph, left, top, bottom) = (440.0, 270.0, 56.0, 48.0, 40.0);
    let w = left + plot_w + right;
    let plot_h = ph - top - bottom;
    let h = ph * tasks.len().max(1) as f64;
    let model = std::path::Path::new(&e.model)
        .file_name()
        .map_or(e.model.clone(), |f| f.to_string_lossy().into_owned());
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    for (ti, task) in tasks.iter().enumerate() {
        let y0 = ti as f64 * ph;
        let x = |i: f64| left + plot_w * i / f64::from(last);
        let y = |a: f64| y0 + top + plot_h * (1.0 - a);
        let seeds: Vec<u64> = bases
            .keys()
            .filter(|(t, _)| t == task)
            .map(|(_, s)| *s)
            .collect();
        let items = bases
            .iter()
            .find(|((t, _), _)| t == task)
            .map_or(0, |(_, r)| r.examples);
        let steps = e
            .runs
            .iter()
            .find(|r| r.task == *task && r.status == "done")
            .map_or(0, |r| r.steps);
        let _ = writeln!(
            s,
            r#"<text x="{left}" y="{}" font-weight="bold">{}</text>"#,
            y0 + 16.0,
            xml(task)
        );
        let _ = writeln!(
            s,
            r#"<text x="{left}" y="{}">{}, {items} {} items, seeds {}, {steps} optimizer steps a run; bands: Wilson 95%</text>"#,
            y0 + 32.0,
            xml(&model),
            xml(&e.evaluated_on),
            seeds
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join(",")
        );
        for tick in 0..=4 {
            let a = f64::from(tick) / 4.0;
            let _ = writeln!(
                s,
                r##"<line x1="{left}" x2="{}" y1="{yy}" y2="{yy}" stroke="#ddd"/><text x="{}" y="{}" text-anchor="end">{:.0}%</text>"##,
                left + plot_w,
                left - 6.0,
                y(a) + 4.0,
                a * 100.0,
                yy = y(a)
            );
        }
        for i in 0..=last {
            let _ = writeln!(
                s,
                r#"<text x="{}" y="{}" text-anchor="middle">{i}</text>"#,
                x(f64::from(i)),
                y0 + ph - bottom + 16.0
            );
        }
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle">iteration</text>"#,
            left + plot_w / 2.0,
            y0 + ph - bottom + 32.0
        );
        for (mi, method) in methods.iter().enumerate() {
            let color = COLORS[(mi + 1) % COLORS.len()];
            for (dash, exact) in [("", true), (r#" stroke-dasharray="5,4""#, false)] {
                // Pooled over seeds: (correct, examples) per iteration; the base model's
                // point comes from whichever run evaluated it.
                let mut by_iter: BTreeMap<u32, (u32, u32)> = BTreeMap::new();
                for r in e
                    .runs
                    .iter()
                    .filter(|r| r.method == *method && r.task == *task)
                {
                    let base = bases.get(&(r.task.clone(), r.seed)).copied();
                    let rows = r.rows.iter().filter(|x| x.iteration > 0).chain(base);
                    for row in rows {
                        let k = if exact {
                            row.correct.len()
                        } else {
                            row.correct_extracted.len()
                        };
                        let slot = by_iter.entry(row.iteration).or_default();
                        slot.0 += k as u32;
                        slot.1 += row.examples;
                    }
                }
                if by_iter.len() < 2 {
                    continue;
                }
                let mut upper = Vec::new();
                let mut lower = Vec::new();
                let mut line = Vec::new();
                for (i, (k, n)) in &by_iter {
                    let (lo, hi) = stats::wilson(*k, *n);
                    let xi = x(f64::from(*i));
                    upper.push(format!("{xi:.1},{:.1}", y(hi)));
                    lower.push(format!("{xi:.1},{:.1}", y(lo)));
                    line.push(format!(
                        "{xi:.1},{:.1}",
                        y(f64::from(*k) / f64::from((*n).max(1)))
                    ));
                }
                lower.reverse();
                let _ = writeln!(
                    s,
                    r#"<polygon fill="{color}" fill-opacity="0.12" stroke="none" points="{} {}"/>"#,
                    upper.join(" "),
                    lower.join(" ")
                );
                let _ = writeln!(
                    s,
                    r#"<polyline fill="none" stroke="{color}" stroke-width="2"{dash} points="{}"/>"#,
                    line.join(" ")
                );
            }
            let ly = y0 + top + 18.0 * mi as f64;
            let _ = writeln!(
                s,
                r#"<line x1="{}" x2="{}" y1="{ly}" y2="{ly}" stroke="{color}" stroke-width="2"/><text x="{}" y="{}">{}</text>"#,
                left + plot_w + 12.0,
                left + plot_w + 36.0,
                left + plot_w + 42.0,
                ly + 4.0,
                xml(method)
            );
        }
        let ly = y0 + top + 18.0 * methods.len() as f64 + 8.0;
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{ly}">exact (solid)</text><text x="{}" y="{}">extracted (dashed)</text>"#,
            left + plot_w + 12.0,
            left + plot_w + 12.0,
            ly + 16.0
        );
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(method: &str, iteration: u32, exact: f64, answers: &[(&str, u32)]) -> Row {
        let correct: Vec<u32> = (0..(exact * 4.0).round() as u32).collect();
        Row {
            method: method.into(),
            task: "t".into(),
            seed: 1,
            iteration,
            examples: 4,
            exact,
            extracted: exact,
            top_answer: answers[0].0.into(),
            top_share: f64::from(answers[0].1) / 4.0,
            exact_ci: (0.0, 1.0),
            extracted_ci: (0.0, 1.0),
            answers: answers.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            no_answer_share: 0.25,
            correct: correct.clone(),
            correct_extracted: correct,
            steps: if iteration > 0 { 16 } else { 0 },
            sample_accuracy: 0.0,
            sample_accuracy_extracted: 0.125,
            pass_at_n: (0.0, 0.25),
            train_loss: 1.5,
            phase_seconds: [Some(1.0), Some(2.0), None, Some(3.0)],
        }
    }

    fn experiment() -> Experiment {
        let run = |method: &str, status: &str, rows: Vec<Row>| RunResult {
            method: method.into(),
            task: "t".into(),
            seed: 1,
            run_id: "r".into(),
            status: status.into(),
            steps: rows.iter().map(|x| x.steps).sum(),
            error: if status == "done" {
                String::new()
            } else {
                "no correct sample | none".into()
            },
            rows,
            seconds: super::super::RunSeconds {
                wall: 125.4,
                sample: 30.0,
                train: 60.6,
                swap: 1.2,
                eval: 33.0,
            },
        };
        Experiment {
            name: "x".into(),
            preset: "cpu".into(),
            model: "models/m.gguf".into(),
            knobs: serde_json::Value::Null,
            evaluated_on: "test".into(),
            comparisons: vec![],
            runs: vec![
                run(
                    "hir",
                    "done",
                    vec![
                        row("base", 0, 0.0, &[("(C)", 3), ("(A)", 1)]),
                        row("hir", 1, 0.5, &[("(B)", 4)]),
                    ],
                ),
                run("sft", "done", vec![row("sft", 1, 1.0, &[("(B)", 4)])]),
                run(
                    "farl",
                    "failed",
                    vec![row("base", 0, 0.0, &[("(C)", 3), ("(A)", 1)])],
                ),
            ],
        }
    }

    #[test]
    fn the_iterations_show_the_base_once_intervals_p_values_and_a_failed_method() {
        let t = iterations(&experiment());
        assert_eq!(t.matches("| base |").count(), 1, "{t}");
        // 2 of 4 right: Wilson [15.0, 85.0]; 2 discordant items against the base: p = 0.5.
        assert!(
            t.contains("| hir | t | 1 | 1 | 16 | 0.0% / 12.5% | 0.0% / 25.0% | 50.0% [15.0–85.0] | 0.500 | 50.0% [15.0–85.0] | 0.500 | (B) (100.0%) | 25.0% | (B) 4 |"),
            "{t}"
        );
        assert!(t.contains("| farl | t | 1 | - | - | - | FAILED |"), "{t}");
        assert!(
            t.contains("no correct sample / none"),
            "pipes are escaped: {t}"
        );
    }

    #[test]
    fn the_summary_compares_hir_with_the_base_and_sft_on_the_same_items() {
        let t = summary(&experiment());
        assert!(
            t.contains("| t | base | 1 | 0 | 0.0% [0.0–49.0] | - |"),
            "{t}"
        );
        // HIR got items 0 and 1, SFT all four: 2 discordant items, p = 0.5.
        assert!(
            t.contains("| t | hir | 1 | 16 | 50.0% [15.0–85.0] | 0.500 | 50.0% [15.0–85.0] | 0.500 | - | 0.500 / 0.500 |"),
            "{t}"
        );
        assert!(t.contains("| t | farl | 1 | - | FAILED |"), "{t}");
    }

    #[test]
    fn the_time_table_shows_each_run_and_the_total() {
        let t = timing(&experiment());
        assert!(
            t.contains("| hir | t | 1 | 2:05 | 0:30 | 1:01 | 0:01 | 0:33 |"),
            "{t}"
        );
        assert!(t.contains("| all 3 runs | | | 6:16 |"), "{t}");
    }

    #[test]
    fn several_seeds_show_each_seed_and_the_mean_with_its_range() {
        let mut e = experiment();
        let mut second = e.runs[0].clone();
        second.seed = 2;
        for r in &mut second.rows {
            r.seed = 2;
        }
        second.rows[1].exact = 1.0;
        second.rows[1].extracted = 0.25;
        e.runs.push(second);
        let t = summary(&e);
        assert!(
            t.contains("| t | hir | 1 |") && t.contains("| t | hir | 2 |"),
            "{t}"
        );
        assert!(
            t.contains(
                "| t | **hir** | mean of 2 | | 75.0% (50.0%–100.0%) | | 37.5% (25.0%–50.0%) |"
            ),
            "{t}"
        );
        assert!(t.contains("| t | **base** | mean of 2 |"), "{t}");
    }

    #[test]
    fn the_json_carries_every_paired_test() {
        let c = comparisons(&experiment());
        let pairs: Vec<(&str, &str)> = c
            .iter()
            .map(|c| (c.method.as_str(), c.against.as_str()))
            .collect();
        assert_eq!(pairs, [("hir", "base"), ("hir", "sft"), ("sft", "base")]);
        assert_eq!(c[0].exact_discordant, (2, 0));
        assert!((c[0].p_exact - 0.5).abs() < 1e-12);
        assert_eq!(c[1].exact_discordant, (0, 2));
    }

    #[test]
    fn the_chart_has_a_band_and_line_per_method_and_score_and_says_what_it_plots() {
        let svg = chart(&experiment());
        // hir and sft each: exact and extracted lines, each in its band; farl failed.
        assert_eq!(svg.matches("<polyline").count(), 4, "{svg}");
        assert_eq!(svg.matches("<polygon").count(), 4, "{svg}");
        assert!(svg.contains(">hir</text>") && svg.contains(">farl</text>"));
        assert!(
            svg.contains("m.gguf, 4 test items, seeds 1, 16 optimizer steps a run"),
            "{svg}"
        );
        // The legend fits: the widest label ends inside the picture.
        let width: f64 = svg
            .split("width=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .and_then(|w| w.parse().ok())
            .unwrap();
        assert!(56.0 + 440.0 + 42.0 + 7.0 * "extracted (dashed)".len() as f64 <= width);
    }
}
