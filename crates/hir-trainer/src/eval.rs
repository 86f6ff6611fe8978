//! Evaluation: greedy-decode every task's test split through the generators (the
//! reference evaluator's prompt, HIR.md §3.2, as is or under the chat template), score each
//! answer both ways (exact match and answer extraction), store per-example results and
//! report accuracy per task with the distribution of predicted answers.

use std::collections::HashMap;

use hir_core::eval::{eval_prompts, tally, test_prompts, TaskEval};
use hir_core::run::{PromptStyle, RunConfig};
use hir_store::{ModelVersion, NewEvalResult, RunTask, Store};
use uuid::Uuid;

use crate::error::{Result, TrainerError};
use crate::remote::Remotes;

/// Where an evaluation's answers come from and go to.
#[derive(Debug, Clone, Copy)]
pub struct Evaluator<'a> {
    /// Where results are recorded.
    pub store: &'a Store,
    /// The generators answering.
    pub remotes: &'a Remotes,
    /// Prompts per generator request.
    pub batch: usize,
}

impl Evaluator<'_> {
    /// Evaluates `version` (which the generators must serve) on each task's test split and
    /// records the results for `iteration` of `run_id`.
    pub async fn evaluate(
        &self,
        tasks: &[RunTask],
        config: &RunConfig,
        run_id: Uuid,
        iteration: u32,
        version: &ModelVersion,
        on_task: impl FnMut(&TaskEval),
    ) -> Result<Vec<TaskEval>> {
        evaluate(self, tasks, config, run_id, iteration, version, on_task).await
    }
}

async fn evaluate(
    ev: &Evaluator<'_>,
    tasks: &[RunTask],
    config: &RunConfig,
    run_id: Uuid,
    iteration: u32,
    version: &ModelVersion,
    mut on_task: impl FnMut(&TaskEval),
) -> Result<Vec<TaskEval>> {
    let (store, remotes, eval_batch) = (ev.store, ev.remotes, ev.batch);
    let mut out = Vec::with_capacity(tasks.len());
    for rt in tasks {
        // The validation part when the run holds one out (it chooses settings), else the
        // test split.
        let (test, prompts) = if config.validation_share > 0.0 {
            eval_prompts(
                &rt.task,
                rt.validation.clone(),
                config.max_test_prompts as usize,
                config.eval_prompt_variant(),
            )
        } else {
            test_prompts(
                &rt.task,
                config.split_seed(),
                config.max_test_prompts as usize,
                config.eval_prompt_variant(),
            )
        };
        // Greedy answers are a function of the version and the prompt: a version whose
        // answers to these prompts are already stored (a second run from the same starting
        // model, or an evaluation resumed after a crash) is scored from the store.
        let style = config.eval_style_key();
        let stored = store.eval_outputs(version.id, rt.id, &style).await?;
        let texts: Vec<String> = if test.iter().all(|i| stored.contains_key(&(*i as i32))) {
            tracing::info!(%run_id, iteration, task = %rt.task.name, "answers already stored for this version");
            test.iter().map(|i| stored[&(*i as i32)].clone()).collect()
        } else {
            generate_answers(remotes, &prompts, eval_batch, config, version).await?
        };
        let (eval, scores) = tally(&rt.task, &test, &texts);
        let results: Vec<NewEvalResult> = test
            .iter()
            .zip(texts)
            .zip(scores)
            .map(|((&i, output), s)| NewEvalResult {
                model_version_id: version.id,
                task_id: rt.id,
                example_idx: i as i32,
                prompt_style: style.clone(),
                run_id: Some(run_id),
                iteration: Some(iteration as i32),
                output,
                correct: s.exact,
                correct_extracted: s.extracted,
                predicted: s.predicted,
            })
            .collect();
        hir_runtime::fault::point(hir_runtime::fault::TRAINER_EVALUATE);
        store.record_eval_results(&results).await?;
        tracing::info!(%run_id, iteration, task = %eval.task, exact = eval.exact, extracted = eval.extracted, "evaluated");
        on_task(&eval);
        out.push(eval);
    }
    Ok(out)
}

/// The generators' greedy answers to `prompts`, in order: chunks of `eval_batch` go out
/// concurrently, spread over the generators.
async fn generate_answers(
    remotes: &Remotes,
    prompts: &[String],
    eval_batch: usize,
    config: &RunConfig,
    version: &ModelVersion,
) -> Result<Vec<String>> {
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
        let (c, texts) = done
            .map_err(|e| TrainerError::Internal(format!("an evaluation request panicked: {e}")))?;
        by_chunk.insert(c, texts?);
    }
    let mut texts = Vec::with_capacity(prompts.len());
    for c in 0..by_chunk.len() {
        texts.extend(by_chunk.remove(&c).unwrap_or_default());
    }
    Ok(texts)
}
