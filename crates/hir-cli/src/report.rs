//! Run reports: a table of iterations, a Markdown report and an SVG chart of test accuracy
//! per iteration.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use hir_proto::{convert, pb};

/// A run status as a word, e.g. `running`.
pub fn status_name(s: i32) -> &'static str {
    convert::run_status(s).map_or("unknown", |s| s.as_str())
}

/// An iteration status as a word, e.g. `training`.
pub fn iteration_status_name(s: i32) -> &'static str {
    convert::iteration_status(s).map_or("unknown", |s| s.as_str())
}

/// A fraction as a percentage with one decimal, e.g. `33.3%`.
pub fn pct(x: f64) -> String {
    format!("{:.1}%", 100.0 * x)
}

/// An accuracy over `n` test items with its Wilson 95% interval: `11.0% [7.4–16.1]`.
pub fn pct_interval(accuracy: f64, n: u32) -> String {
    let k = (accuracy * f64::from(n)).round() as u32;
    let (lo, hi) = crate::experiment::stats::wilson(k, n);
    format!("{} [{:.1}–{:.1}]", pct(accuracy), 100.0 * lo, 100.0 * hi)
}

/// The exact McNemar p-value of `e` against the base model's evaluation of the same task
/// on the same items (exact match, then extraction); `-` without one.
fn p_vs_base(run: &pb::Run, e: &pb::TaskAccuracy, iteration: u32) -> String {
    use crate::experiment::stats;
    let base = run
        .iterations
        .iter()
        .find(|i| i.iteration == 0)
        .and_then(|i| i.eval.iter().find(|b| b.task == e.task));
    match base {
        Some(b) if iteration > 0 && b.examples == e.examples => {
            let p = |x: &[u32], y: &[u32]| {
                let (only_x, only_y) = stats::discordant(x, y);
                stats::p_value(stats::mcnemar_exact(only_x, only_y))
            };
            format!(
                "{} / {}",
                p(&e.correct_examples, &b.correct_examples),
                p(&e.correct_extracted_examples, &b.correct_extracted_examples)
            )
        }
        _ => "-".into(),
    }
}

/// One row per iteration: samples, training, and test accuracy per task with its Wilson
/// 95% interval and the exact McNemar p-value against the base model (iteration 0).
pub fn iteration_table(run: &pb::Run) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| iteration | status | version | samples | sample acc. (exact / extracted) | steps | train loss | task | test exact [95% CI] | test extracted [95% CI] | p vs base (exact / extracted) | answers |"
    );
    let _ = writeln!(
        s,
        "|---:|---|---|---:|---:|---:|---:|---|---:|---:|---:|---|"
    );
    for it in &run.iterations {
        let status = iteration_status_name(it.status);
        let evals: Vec<Option<&pb::TaskAccuracy>> = if it.eval.is_empty() {
            vec![None]
        } else {
            it.eval.iter().map(Some).collect()
        };
        for e in evals {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                it.iteration,
                status,
                it.model_version,
                it.samples,
                if it.samples > 0 {
                    format!(
                        "{} / {}",
                        pct(it.sample_accuracy),
                        pct(it.sample_accuracy_extracted)
                    )
                } else {
                    "-".into()
                },
                it.steps,
                if it.steps > 0 {
                    format!("{:.4}", it.train_loss)
                } else {
                    "-".into()
                },
                e.map_or("-".into(), |e| e.task.clone()),
                e.map_or("-".into(), |e| pct_interval(e.exact, e.examples)),
                e.map_or("-".into(), |e| pct_interval(e.extracted, e.examples)),
                e.map_or("-".into(), |e| p_vs_base(run, e, it.iteration)),
                e.map_or("-".into(), |e| answers(&e.predicted_counts)),
            );
        }
    }
    s
}

/// How often each answer was predicted, by answer: `(A) 3, (C) 27`; `-` for none.
pub fn answers<'a>(counts: impl IntoIterator<Item = (&'a String, &'a u32)>) -> String {
    let sorted: std::collections::BTreeMap<&String, &u32> = counts.into_iter().collect();
    if sorted.is_empty() {
        return "-".into();
    }
    sorted
        .iter()
        .map(|(k, n)| format!("{k} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Writes `report.md` and `accuracy.svg` into `dir`; returns their paths.
pub fn write(run: &pb::Run, dir: &Path) -> Result<(PathBuf, PathBuf)> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let svg_path = dir.join("accuracy.svg");
    std::fs::write(&svg_path, chart(run))
        .with_context(|| format!("writing {}", svg_path.display()))?;
    let mut md = String::new();
    let _ = writeln!(md, "# HIR run {}\n", run.name);
    let _ = writeln!(md, "- run id: `{}`", run.run_id);
    let _ = writeln!(md, "- status: {}", status_name(run.status));
    let _ = writeln!(md, "- policy: `{}`", run.policy);
    let _ = writeln!(md, "- tasks: {}", run.tasks.join(", "));
    let _ = writeln!(md, "- starting model: `{}`", run.model);
    if let Some(h) = &run.hyperparameters {
        let _ = writeln!(
            md,
            "- knobs: lr {:?}, batch {:?} (micro {:?}), epochs {:?}, samples/prompt {:?}, iterations {:?}, \
             label smoothing {:?}, entropy {:?}, max new tokens {:?}, train prompts {:?}, test prompts {:?}, \
             steps/iteration {:?}",
            h.learning_rate.unwrap_or_default(),
            h.batch_size.unwrap_or_default(),
            h.micro_batch_size.unwrap_or_default(),
            h.epochs_per_iteration.unwrap_or_default(),
            h.samples_per_prompt.unwrap_or_default(),
            h.iterations.unwrap_or_default(),
            h.label_smoothing.unwrap_or_default(),
            h.entropy_coef.unwrap_or_default(),
            h.max_new_tokens.unwrap_or_default(),
            h.max_train_prompts.unwrap_or_default(),
            h.max_test_prompts.unwrap_or_default(),
            h.max_steps_per_iteration.unwrap_or_default(),
        );
    }
    if !run.error.is_empty() {
        let _ = writeln!(md, "- error: {}", run.error);
    }
    let _ = writeln!(md, "\n## Iterations\n\n{}", iteration_table(run));
    let _ = writeln!(
        md,
        "Iteration 0 is the starting model. *Exact* is the paper's exact match; *extracted* \
         reads the answer (an option letter, a number) out of the output first.\n\n\
         ![test accuracy per iteration](accuracy.svg)"
    );
    let md_path = dir.join("report.md");
    std::fs::write(&md_path, md).with_context(|| format!("writing {}", md_path.display()))?;
    Ok((md_path, svg_path))
}

const COLORS: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf",
];

/// An SVG line chart of test accuracy per iteration: one colour per task, solid for exact
/// match, dashed for answer extraction.
pub fn chart(run: &pb::Run) -> String {
    let (w, h, left, right, top, bottom) = (640.0, 360.0, 56.0, 200.0, 24.0, 40.0);
    let plot_w = w - left - right;
    let plot_h = h - top - bottom;
    let last = run
        .iterations
        .iter()
        .map(|i| i.iteration)
        .max()
        .unwrap_or(0)
        .max(1) as f64;
    let x = |i: u32| left + plot_w * f64::from(i) / last;
    let y = |acc: f64| top + plot_h * (1.0 - acc.clamp(0.0, 1.0));
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    for k in 0..=4 {
        let acc = f64::from(k) / 4.0;
        let _ = writeln!(
            s,
            r##"<line x1="{left}" y1="{0:.1}" x2="{1:.1}" y2="{0:.1}" stroke="#ddd"/><text x="{2:.1}" y="{3:.1}" text-anchor="end">{4}%</text>"##,
            y(acc),
            left + plot_w,
            left - 6.0,
            y(acc) + 4.0,
            k * 25
        );
    }
    for i in 0..=last as u32 {
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{i}</text>"#,
            x(i),
            top + plot_h + 16.0
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">iteration</text><text x="14" y="{:.1}" transform="rotate(-90 14 {:.1})" text-anchor="middle">test accuracy</text>"#,
        left + plot_w / 2.0,
        h - 6.0,
        top + plot_h / 2.0,
        top + plot_h / 2.0
    );
    let mut legend_y = top + 10.0;
    for (t, task) in run.tasks.iter().enumerate() {
        let color = COLORS[t % COLORS.len()];
        for (dash, label, pick) in [
            (
                "",
                "exact",
                (|a: &pb::TaskAccuracy| a.exact) as fn(&pb::TaskAccuracy) -> f64,
            ),
            ("5,4", "extracted", |a: &pb::TaskAccuracy| a.extracted),
        ] {
            let points: Vec<String> = run
                .iterations
                .iter()
                .filter_map(|it| {
                    it.eval
                        .iter()
                        .find(|e| &e.task == task)
                        .map(|e| format!("{:.1},{:.1}", x(it.iteration), y(pick(e))))
                })
                .collect();
            if points.is_empty() {
                continue;
            }
            let _ = writeln!(
                s,
                r#"<polyline fill="none" stroke="{color}" stroke-width="2" stroke-dasharray="{dash}" points="{}"/>"#,
                points.join(" ")
            );
            for p in &points {
                let (px, py) = p.split_once(',').unwrap_or(("0", "0"));
                let _ = writeln!(s, r#"<circle cx="{px}" cy="{py}" r="3" fill="{color}"/>"#);
            }
            let lx = left + plot_w + 12.0;
            let _ = writeln!(
                s,
                r#"<line x1="{lx}" y1="{legend_y:.1}" x2="{:.1}" y2="{legend_y:.1}" stroke="{color}" stroke-width="2" stroke-dasharray="{dash}"/><text x="{:.1}" y="{:.1}">{} ({label})</text>"#,
                lx + 20.0,
                lx + 26.0,
                legend_y + 4.0,
                xml_escape(&short(task))
            );
            legend_y += 16.0;
        }
    }
    s.push_str("</svg>\n");
    s
}

fn short(task: &str) -> String {
    if task.len() > 22 {
        format!("{}…", &task[..21])
    } else {
        task.to_string()
    }
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

pub fn run_json(run: &pb::Run) -> serde_json::Value {
    serde_json::json!({
        "run_id": run.run_id,
        "name": run.name,
        "status": status_name(run.status),
        "tasks": run.tasks,
        "policy": run.policy,
        "error": run.error,
        "iterations": run.iterations.iter().map(|i| serde_json::json!({
            "iteration": i.iteration,
            "status": iteration_status_name(i.status),
            "model_version": i.model_version,
            "samples": i.samples,
            "sample_accuracy": i.sample_accuracy,
            "train_loss": i.train_loss,
            "steps": i.steps,
            "eval": i.eval.iter().map(|e| serde_json::json!({"task": e.task, "examples": e.examples, "exact": e.exact, "extracted": e.extracted})).collect::<Vec<_>>(),
            "error": i.error,
        })).collect::<Vec<_>>(),
    })
}

/// Prints a run as a table (or JSON).
pub fn print_run(run: &pb::Run, json: bool) {
    if json {
        println!("{}", run_json(run));
        return;
    }
    println!(
        "run {}  {}  [{}]  policy {}  tasks {}",
        run.run_id,
        run.name,
        status_name(run.status),
        run.policy,
        run.tasks.join(", ")
    );
    if !run.error.is_empty() {
        println!("error: {}", run.error);
    }
    println!("{}", iteration_table(run));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run() -> pb::Run {
        let it = |i: u32, exact: f64| pb::IterationSummary {
            iteration: i,
            status: pb::IterationStatus::Done as i32,
            eval: vec![pb::TaskAccuracy {
                task: "tiny".into(),
                examples: 4,
                exact,
                extracted: exact + 0.25,
                correct_examples: (0..(exact * 4.0) as u32).collect(),
                correct_extracted_examples: (0..((exact + 0.25) * 4.0) as u32).collect(),
                ..Default::default()
            }],
            ..Default::default()
        };
        pb::Run {
            run_id: "r".into(),
            name: "n".into(),
            tasks: vec!["tiny".into()],
            iterations: vec![it(0, 0.25), it(1, 0.5)],
            ..Default::default()
        }
    }

    #[test]
    fn the_chart_plots_both_scores_of_every_iteration() {
        let svg = chart(&run());
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 2, "exact and extracted");
        assert_eq!(svg.matches("<circle").count(), 4);
        // Iteration 1 at 50% exact: the right edge of the plot, half way up.
        assert!(svg.contains("440.0,172.0"), "{svg}");
    }

    #[test]
    fn the_table_has_a_row_per_iteration_and_task() {
        let t = iteration_table(&run());
        assert_eq!(t.lines().count(), 4);
        assert!(
            t.contains("| 1 | done |") && t.contains("50.0%") && t.contains("75.0%"),
            "{t}"
        );
        // 2 of 4 with its Wilson interval; one item more than the base's in each score,
        // so p = 1 both ways; the base row has nothing to compare with.
        assert!(
            t.contains("| tiny | 50.0% [15.0–85.0] | 75.0% [30.1–95.4] | 1.000 / 1.000 |"),
            "{t}"
        );
        assert!(
            t.contains("| tiny | 25.0% [4.6–69.9] | 50.0% [15.0–85.0] | - |"),
            "{t}"
        );
    }
}
