//! Evaluation on a task's test split: which examples, which prompt (the reference
//! evaluator's, HIR.md §3.2) and how answers are tallied. The trainer's evaluation and
//! `hir eval` both use these, so both report the same numbers for the same outputs.

use std::collections::BTreeMap;

use crate::prompt::{Prompt, PromptVariant, DEFAULT_INSTRUCTION};
use crate::score::{score, Score};
use crate::split::Split;
use crate::task::Task;

/// The label counted for an answer from which nothing could be read.
pub const NO_ANSWER: &str = "(none)";

/// One task's evaluation.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskEval {
    /// The task.
    pub task: String,
    /// Test examples evaluated.
    pub examples: u32,
    /// Fraction correct under exact match.
    pub exact: f64,
    /// Fraction correct under answer extraction.
    pub extracted: f64,
    /// How often each answer was predicted ([`NO_ANSWER`] when nothing could be read).
    pub predicted: BTreeMap<String, u32>,
}

/// The test split of `task` under `seed` (at most `max` examples; 0 = all) and the
/// prompt of each: the reference evaluator's ([`PromptVariant::Eval`]), or the sampler's
/// when a run evaluates on the text it trains on.
pub fn test_prompts(
    task: &Task,
    seed: u32,
    max: usize,
    variant: PromptVariant,
) -> (Vec<usize>, Vec<String>) {
    eval_prompts(
        task,
        Split::new(seed, task.examples.len()).test,
        max,
        variant,
    )
}

/// The examples `examples` of `task` (at most `max`; 0 = all) and the prompt of each
/// under `variant`.
pub fn eval_prompts(
    task: &Task,
    mut examples: Vec<usize>,
    max: usize,
    variant: PromptVariant,
) -> (Vec<usize>, Vec<String>) {
    if max > 0 {
        examples.truncate(max);
    }
    let prompts = examples
        .iter()
        .map(|&i| Prompt::build(task, &task.examples[i], DEFAULT_INSTRUCTION, variant).text())
        .collect();
    (examples, prompts)
}

/// Scores the answers `texts` to the examples `test` of `task`: the task's accuracy under
/// both scores with the count of each predicted answer, and each answer's score.
pub fn tally(task: &Task, test: &[usize], texts: &[String]) -> (TaskEval, Vec<Score>) {
    let scores: Vec<Score> = test
        .iter()
        .zip(texts)
        .map(|(&i, text)| score(&task.examples[i].answer, text))
        .collect();
    let mut predicted = BTreeMap::new();
    for s in &scores {
        *predicted
            .entry(s.predicted.clone().unwrap_or_else(|| NO_ANSWER.into()))
            .or_insert(0) += 1;
    }
    let total = scores.len().max(1) as f64;
    let count = |f: fn(&Score) -> bool| scores.iter().filter(|s| f(s)).count() as f64;
    let eval = TaskEval {
        task: task.name.clone(),
        examples: scores.len() as u32,
        exact: count(|s| s.exact) / total,
        extracted: count(|s| s.extracted) / total,
        predicted,
    };
    (eval, scores)
}
