//! What an experiment writes: the Markdown table, `experiment.md`, `experiment.json` and a
//! chart per task.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use super::{Experiment, RunResult};
use crate::report::pct;

fn secs(x: Option<f64>) -> String {
    x.map_or("-".into(), |s| format!("{s:.0}"))
}

/// The experiment as a Markdown table: the base model once per task and seed, then each
/// method's iterations; a failed run shows its status and error.
pub fn table(e: &Experiment) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| method | task | seed | iteration | test exact | test extracted | top answer (share) | answers | train loss | sample s | train s | swap s | eval s |"
    );
    let _ = writeln!(
        s,
        "|---|---|---:|---:|---:|---:|---|---|---:|---:|---:|---:|---:|"
    );
    let mut base_shown = std::collections::HashSet::new();
    for r in &e.runs {
        for row in &r.rows {
            if row.iteration == 0 && !base_shown.insert((row.task.clone(), row.seed)) {
                continue;
            }
            let answers = crate::report::answers(&row.answers);
            let p = row.phase_seconds;
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} ({}) | {} | {} | {} | {} | {} | {} |",
                row.method,
                row.task,
                row.seed,
                row.iteration,
                pct(row.exact),
                pct(row.extracted),
                row.top_answer,
                pct(row.top_share),
                answers,
                if row.iteration == 0 {
                    "-".into()
                } else {
                    format!("{:.3}", row.train_loss)
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
                "| {} | {} | {} | - | {} | - | - | - | - | - | - | - | {} |",
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
    let _ = writeln!(md, "\n## Results\n\n{}", table(e));
    let _ = writeln!(
        md,
        "Iteration 0 is the starting model (`base`). *Exact* is the paper's exact match; \
         *extracted* reads the answer (an option letter, a number) out of the output first. \
         *Top answer* is the most frequent predicted answer: a share near 100% is a collapse \
         to one answer, which scores at chance. Phase times are wall seconds as the client saw \
         them.\n\n![test accuracy per iteration](experiment.svg)"
    );
    let path = dir.join("experiment.md");
    std::fs::write(&path, md).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

const COLORS: [&str; 4] = ["#7f7f7f", "#1f77b4", "#d62728", "#2ca02c"];

/// One panel per task: test accuracy per iteration, one colour per method (seeds averaged),
/// solid for exact match, dashed for answer extraction; the base model is every line's
/// first point.
pub fn chart(e: &Experiment) -> String {
    // Each task and method once, in the order the runs came.
    let distinct = |of: fn(&RunResult) -> &str| -> Vec<&str> {
        let mut seen = std::collections::BTreeSet::new();
        e.runs.iter().map(of).filter(|x| seen.insert(*x)).collect()
    };
    let tasks = distinct(|r| r.task.as_str());
    let methods = distinct(|r| r.method.as_str());
    let last = e
        .runs
        .iter()
        .flat_map(|r| r.rows.iter().map(|x| x.iteration))
        .max()
        .unwrap_or(1)
        .max(1);
    let (w, ph, left, right, top, bottom) = (640.0, 240.0, 56.0, 200.0, 28.0, 36.0);
    let plot_w = w - left - right;
    let plot_h = ph - top - bottom;
    let h = ph * tasks.len().max(1) as f64;
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
        let _ = writeln!(s, r#"<text x="{left}" y="{}">{task}</text>"#, y0 + 16.0);
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
        for (mi, method) in methods.iter().enumerate() {
            let color = COLORS[(mi + 1) % COLORS.len()];
            for (dash, exact) in [("", true), (r#" stroke-dasharray="5,4""#, false)] {
                let mut by_iter: BTreeMap<u32, (f64, u32)> = BTreeMap::new();
                for r in e
                    .runs
                    .iter()
                    .filter(|r| r.method == *method && r.task == *task)
                {
                    for row in &r.rows {
                        let v = if exact { row.exact } else { row.extracted };
                        let slot = by_iter.entry(row.iteration).or_default();
                        slot.0 += v;
                        slot.1 += 1;
                    }
                }
                let points: Vec<String> = by_iter
                    .iter()
                    .map(|(i, (sum, n))| {
                        format!("{:.1},{:.1}", x(f64::from(*i)), y(sum / f64::from(*n)))
                    })
                    .collect();
                if points.len() > 1 {
                    let _ = writeln!(
                        s,
                        r#"<polyline fill="none" stroke="{color}" stroke-width="2"{dash} points="{}"/>"#,
                        points.join(" ")
                    );
                }
            }
            let ly = y0 + top + 18.0 * mi as f64;
            let _ = writeln!(
                s,
                r#"<line x1="{}" x2="{}" y1="{ly}" y2="{ly}" stroke="{color}" stroke-width="2"/><text x="{}" y="{}">{method}</text>"#,
                left + plot_w + 12.0,
                left + plot_w + 36.0,
                left + plot_w + 42.0,
                ly + 4.0
            );
        }
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}">solid: exact, dashed: extracted</text>"#,
            left + plot_w + 12.0,
            y0 + top + 18.0 * methods.len() as f64 + 8.0
        );
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::experiment::Row;

    fn row(method: &str, iteration: u32, exact: f64, answers: &[(&str, u32)]) -> Row {
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
            answers: answers.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
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
            error: if status == "done" {
                String::new()
            } else {
                "no correct sample | none".into()
            },
            rows,
        };
        Experiment {
            name: "x".into(),
            preset: "cpu".into(),
            model: "m".into(),
            knobs: serde_json::Value::Null,
            runs: vec![
                run(
                    "hir",
                    "done",
                    vec![
                        row("base", 0, 0.0, &[("(C)", 3), ("(A)", 1)]),
                        row("hir", 1, 0.5, &[("(B)", 4)]),
                    ],
                ),
                run(
                    "farl",
                    "failed",
                    vec![row("base", 0, 0.0, &[("(C)", 3), ("(A)", 1)])],
                ),
            ],
        }
    }

    #[test]
    fn the_table_shows_the_base_once_a_collapse_and_a_failed_method() {
        let t = table(&experiment());
        assert_eq!(t.matches("| base |").count(), 1, "{t}");
        assert!(
            t.contains("| hir | t | 1 | 1 | 50.0% | 50.0% | (B) (100.0%) | (B) 4 |"),
            "{t}"
        );
        assert!(t.contains("| farl | t | 1 | - | FAILED |"), "{t}");
        assert!(
            t.contains("no correct sample / none"),
            "pipes are escaped: {t}"
        );
    }

    #[test]
    fn the_chart_has_a_line_per_method_and_score() {
        let svg = chart(&experiment());
        // hir has two points (exact and extracted lines); the failed farl run only a base.
        assert_eq!(svg.matches("<polyline").count(), 2, "{svg}");
        assert!(svg.contains(">hir</text>") && svg.contains(">farl</text>"));
    }
}
