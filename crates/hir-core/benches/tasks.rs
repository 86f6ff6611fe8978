//! Loading all tasks of a BIG-bench folder, building every prompt (sampler and eval
//! variants), gold answer and split.
//!
//! `cargo bench -p hir-core --bench tasks [-- DIR]` (default: the repository's data/bigbench).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use hir_core::prompt::{Prompt, PromptVariant, DEFAULT_INSTRUCTION};
use hir_core::split::Split;
use hir_core::task::Catalog;

fn run(root: &std::path::Path) -> (Duration, Duration, usize, usize) {
    let t0 = Instant::now();
    let catalog = Catalog::discover(root).expect("catalog");
    let tasks: Vec<_> = catalog
        .entries()
        .iter()
        .map(|e| catalog.load(&e.name).expect("task"))
        .collect();
    let loaded = t0.elapsed();
    let mut bytes = 0;
    let mut prompts = 0;
    for task in &tasks {
        let split = Split::new(1, task.examples.len());
        std::hint::black_box(&split);
        for ex in &task.examples {
            for variant in [PromptVariant::Sampler, PromptVariant::Eval] {
                bytes += Prompt::build(task, ex, DEFAULT_INSTRUCTION, variant)
                    .text()
                    .len();
                prompts += 1;
            }
            bytes += ex.answer.gold().len();
        }
    }
    (loaded, t0.elapsed(), prompts, bytes)
}

fn main() {
    let root = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../data/bigbench"));
    run(&root); // warm the page cache
    let mut runs: Vec<_> = (0..15).map(|_| run(&root)).collect();
    runs.sort_by_key(|r| r.1);
    let (loaded, total, prompts, bytes) = runs[runs.len() / 2];
    println!("BIG-bench tasks under {}", root.display());
    println!("| step | median of 15 |");
    println!("|---|---:|");
    println!(
        "| discover + parse + validate all tasks | {:.1} ms |",
        loaded.as_secs_f64() * 1e3
    );
    println!(
        "| + every prompt (2 variants), gold and split | {:.1} ms |",
        total.as_secs_f64() * 1e3
    );
    println!(
        "| prompts built | {prompts} ({:.1} MB) |",
        bytes as f64 / 1e6
    );
    println!(
        "| prompts per second | {:.0} |",
        prompts as f64 / (total - loaded).as_secs_f64()
    );
}
