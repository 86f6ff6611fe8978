//! Evaluation: greedy-decode every task's test split through the generators (the
//! reference evaluator's prompt, HIR.md §3.2, as is or under the chat template), score each
//! answer both ways (exact match and answer extraction), store per-example results and
//! report accuracy per task with the distribution of predicted answers.

use std::collections::{BTreeMap, HashMap};

use hir_core::prompt::{Prompt, PromptVariant, DEFAULT_INSTRUCTION};
use hir_core::run::{PromptStyle, RunConfig};
use hir_core::score::score;
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
        let n = rt.task.examples.len();
        let mut test = hir_core::split::Split::new(seed_of(config), n).test;
        if config.max_test_prompts > 0 {
            test.truncate(config.max_test_prompts as usize);
        }
        let prompts: Vec<String> = test
            .iter()
            .map(|&i| {
                Prompt::build(
                    &rt.task,
                    &rt.task.examples[i],
                    DEFAULT_INSTRUCTION,
                    PromptVariant::Eval,
                )
                .text()
            })
            .collect();
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
        let mut results = Vec::with_capacity(test.len());
        let mut predicted = BTreeMap::new();
        let (mut exact, mut extracted) = (0u32, 0u32);
        for (&i, text) in test.iter().zip(texts) {
            let s = score(&rt.task.examples[i].answer, &text);
            exact += u32::from(s.exact);
            extracted += u32::from(s.extracted);
            *predicted
                .entry(s.predicted.clone().unwrap_or_else(|| "(none)".into()))
                .or_insert(0) += 1;
            results.push(NewEvalResult {
                model_version_id: version.id,
                task_id: rt.id,
                example_idx: i as i32,
                prompt_style: config.prompt_style.as_str().into(),
                run_id: Some(run_id),
                iteration: Some(iteration as i32),
                output: text,
                correct: s.exact,
                correct_extracted: s.extracted,
                predicted: s.predicted,
            });
        }
        store.record_eval_results(&results).await?;
        let total = results.len().max(1) as f64;
        let eval = TaskEval {
            task: rt.task.name.clone(),
            examples: results.len() as u32,
            exact: f64::from(exact) / total,
            extracted: f64::from(extracted) / total,
            predicted,
        };
        tracing::info!(%run_id, iteration, task = %eval.task, exact = eval.exact, extracted = eval.extracted, "evaluated");
        on_task(&eval);
        out.push(eval);
    }
    Ok(out)
}

/// The split seed of a run (the reference's numpy seed).
pub fn seed_of(config: &RunConfig) -> u32 {
    u32::try_from(config.seed).unwrap_or(1)
}
