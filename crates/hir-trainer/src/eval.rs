//! Evaluation: greedy-decode every task's test split through the generators (the
//! reference evaluator's prompt, HIR.md §3.2, as is or under the chat template), score each
//! answer both ways (exact match and answer extraction), store per-example results and
//! report accuracy per task with the distribution of predicted answers.

use std::collections::{BTreeMap, HashMap};

use hir_core::prompt::{Prompt, PromptVariant, DEFAULT_INSTRUCTION};
use hir_core::run::{PromptStyle, RunConfig};
use hir_core::score::{score, Score};
use hir_core::task::Task;
use hir_relabeler::tasks::RunTask;
use hir_store::{ModelVersion, NewEvalResult};
use uuid::Uuid;

use crate::driver::Context;
use crate::error::{Result, TrainerError};

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
    /// How often each answer was predicted (`(none)` when nothing could be read).
    pub predicted: BTreeMap<String, u32>,
}

/// Evaluates `version` (which the generators must serve) on each task's test split and
/// records the results for `iteration` of `run_id`.
pub async fn evaluate(
    ctx: &Context,
    tasks: &[RunTask],
    config: &RunConfig,
    run_id: Uuid,
    iteration: u32,
    version: &ModelVersion,
    mut on_task: impl FnMut(&TaskEval),
) -> Result<Vec<TaskEval>> {
    let (store, remotes, eval_batch) = (&ctx.store, &ctx.remotes, ctx.config.eval_batch);
    let mut out = Vec::with_capacity(tasks.len());
    for rt in tasks {
        let (test, prompts) =
            test_prompts(&rt.task, seed_of(config), config.max_test_prompts as usize);
        // Chunks go out concurrently, spread over the generators.
        let mut requests = tokio::task::JoinSet::new();
        for (c, chunk) in prompts.chunks(eval_batch.max(1)).enumerate() {
            let remotes = remotes.clone();
            let chunk = chunk.to_vec();
            let (max_new, name) = (config.max_new_tokens, version.name.clone());
            let chat = config.prompt_style == PromptStyle::Chat;
            requests.spawn(async move { (c, remotes.greedy(chunk, max_new, &name, chat).await) });
        }
        let mut by_chunk = HashMap::new();
        while let Some(done) = requests.join_next().await {
            let (c, texts) = done.map_err(|e| {
                TrainerError::FailedPrecondition(format!("an evaluation request panicked: {e}"))
            })?;
            by_chunk.insert(c, texts?);
        }
        let mut texts = Vec::with_capacity(test.len());
        for c in 0..by_chunk.len() {
            texts.extend(by_chunk.remove(&c).unwrap_or_default());
        }
        let (eval, scores) = tally(&rt.task, &test, &texts);
        let results: Vec<NewEvalResult> = test
            .iter()
            .zip(texts)
            .zip(scores)
            .map(|((&i, output), s)| NewEvalResult {
                model_version_id: version.id,
                task_id: rt.id,
                example_idx: i as i32,
                prompt_style: config.prompt_style.as_str().into(),
                run_id: Some(run_id),
                iteration: Some(iteration as i32),
                output,
                correct: s.exact,
                correct_extracted: s.extracted,
                predicted: s.predicted,
            })
            .collect();
        store.record_eval_results(&results).await?;
        tracing::info!(%run_id, iteration, task = %eval.task, exact = eval.exact, extracted = eval.extracted, "evaluated");
        on_task(&eval);
        out.push(eval);
    }
    Ok(out)
}

/// The test split of `task` under `seed` (at most `max` examples; 0 = all) and the
/// reference evaluator's prompt of each.
pub fn test_prompts(task: &Task, seed: u32, max: usize) -> (Vec<usize>, Vec<String>) {
    let mut test = hir_core::split::Split::new(seed, task.examples.len()).test;
    if max > 0 {
        test.truncate(max);
    }
    let prompts = test
        .iter()
        .map(|&i| {
            Prompt::build(
                task,
                &task.examples[i],
                DEFAULT_INSTRUCTION,
                PromptVariant::Eval,
            )
            .text()
        })
        .collect();
    (test, prompts)
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
            .entry(s.predicted.clone().unwrap_or_else(|| "(none)".into()))
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

/// The split seed of a run (the reference's numpy seed).
pub fn seed_of(config: &RunConfig) -> u32 {
    u32::try_from(config.seed).unwrap_or(1)
}
