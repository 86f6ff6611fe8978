//! Sampling one iteration: every training prompt of the run's tasks goes through a
//! generator (n samples each), every completion is scored and relabeled, and everything is
//! written to the store in batched, idempotent transactions. Then the samples are grouped
//! into training batches and the iteration moves to SAMPLED.
//!
//! A run under the `sft` policy samples nothing: each training prompt's gold answer is
//! written as its one sample (no token ids: the trainer tokenizes the text), so the
//! supervised ceiling goes through the same store, batches and trainer as every method.
//!
//! Resume: each prompt's samples are seeded from (run seed, iteration, task, example), so a
//! prompt sent again gives the same samples, and the store ignores rows it already holds. A
//! restarted sampler skips prompts that have all their samples and re-sends the others.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hir_core::relabel::{Outcome, RelabelPolicy};
use hir_core::run::RunConfig;
use hir_core::score::score;
use hir_proto::{convert, pb};
use hir_runtime::generators::{retryable, serving_other_version, Backoff, GeneratorPool};
use hir_store::{ExampleSampleCount, IterationStatus, NewRelabel, NewScoredSample, RunTask, Store};
use tokio::sync::{mpsc, watch};
use uuid::Uuid;

use crate::error::{RelabelerError, Result};
use crate::metrics::Metrics;

/// Live state of one iteration's sampling.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Progress {
    /// Where the iteration stands.
    pub status: Option<IterationStatus>,
    /// The version sampled from.
    pub model_version: String,
    /// Training prompts in the iteration.
    pub prompts_total: u64,
    /// Prompts with all their samples stored.
    pub prompts_done: u64,
    /// Samples stored.
    pub samples: u64,
    /// Of those, correct (exact match).
    pub correct: u64,
    /// Of those, correct under extraction.
    pub correct_extracted: u64,
    /// Stored samples per second since this sampler started.
    pub samples_per_second: f64,
    /// Training batches created.
    pub batches: u32,
    /// Why it failed, or why the generator is being retried.
    pub error: String,
}

/// Settings of the sampling pipeline.
#[derive(Debug, Clone)]
pub struct SamplerSettings {
    /// Requests in flight.
    pub concurrency: usize,
    /// Samples per store transaction.
    pub write_batch: usize,
    /// Retries of an unavailable generator.
    pub backoff: Backoff,
    /// False while the generators cannot be reached (reported by the health service).
    pub generator_up: Arc<watch::Sender<bool>>,
}

/// One prompt to sample.
struct Item {
    task: usize,
    example: usize,
    prompt: String,
}

/// What sampling needs: the store, the tasks, the generators and the settings.
#[derive(Debug)]
pub struct Sampler {
    /// The relabel store.
    pub store: Store,
    /// BIG-bench tasks, each parsed once.
    pub tasks: hir_store::TaskCache,
    /// The generators.
    pub generators: GeneratorPool,
    /// Pipeline settings.
    pub settings: SamplerSettings,
    /// Metrics to update.
    pub metrics: std::sync::Arc<Metrics>,
}

impl Sampler {
    /// Samples iteration `iteration` of `run_id` to the end; see the module docs.
    pub async fn sample_iteration(
        &self,
        run_id: Uuid,
        iteration: i32,
        progress: &watch::Sender<Progress>,
    ) -> Result<()> {
        sample_iteration(self, run_id, iteration, progress).await
    }
}

async fn sample_iteration(
    sampler: &Sampler,
    run_id: Uuid,
    iteration: i32,
    progress: &watch::Sender<Progress>,
) -> Result<()> {
    let Sampler {
        store,
        tasks: task_cache,
        generators,
        settings,
        metrics,
    } = sampler;
    let run = store.get_run(run_id).await?;
    let config = run.config()?;
    let policy = hir_core::relabel::policy_for(&run.policy, config.same_prompt_text)?;
    let gold_only = hir_core::relabel::trains_on_gold(&run.policy);
    store.ensure_iteration(run_id, iteration).await?;
    let current = store.get_iteration(run_id, iteration).await?;
    if !matches!(
        current.status,
        IterationStatus::Pending | IterationStatus::Sampling
    ) {
        progress.send_modify(|p| p.status = Some(current.status));
        return Ok(());
    }
    store
        .advance_iteration(run_id, iteration, IterationStatus::Sampling)
        .await?;
    progress.send_modify(|p| p.status = Some(IterationStatus::Sampling));

    let tasks = hir_store::catalog::run_tasks(
        store,
        task_cache,
        run_id,
        config.split_seed(),
        config.validation_share,
    )
    .await?;
    if tasks.is_empty() {
        return Err(RelabelerError::FailedPrecondition(format!(
            "run {run_id} has no tasks"
        )));
    }
    let done = store.sample_counts(run_id, iteration).await?;
    let per_prompt = if gold_only {
        1
    } else {
        config.samples_per_prompt
    };
    let (items, total) = prompts_to_sample(&config, per_prompt, &tasks, &done);
    let version = sampling_version(store, generators, settings, run_id, iteration).await?;
    let totals = store.sample_totals(run_id, iteration).await?;
    progress.send_modify(|p| {
        p.model_version.clone_from(&version.1);
        p.prompts_total = total;
        p.prompts_done = total - items.len() as u64;
        p.samples = totals.samples as u64;
        p.correct = totals.correct as u64;
        p.correct_extracted = totals.correct_extracted as u64;
    });
    tracing::info!(%run_id, iteration, prompts = items.len(), skipped = total - items.len() as u64, version = %version.1, "sampling");

    let (tx, rx) = mpsc::channel::<Vec<NewScoredSample>>(settings.concurrency * 2);
    let writer = tokio::spawn(write_samples(
        store.clone(),
        rx,
        progress.clone(),
        settings.write_batch.max(1),
        Arc::clone(metrics),
    ));

    // Producer: prompts with bounded concurrency.
    let semaphore = Arc::new(tokio::sync::Semaphore::new(settings.concurrency.max(1)));
    let mut handles = Vec::with_capacity(items.len());
    let policy: Arc<dyn RelabelPolicy> = Arc::from(policy);
    let tasks = Arc::new(tasks);
    for item in items {
        let permit = Arc::clone(&semaphore)
            .acquire_owned()
            .await
            .map_err(|_| RelabelerError::Generator("closed".into()))?;
        let (generators, settings, tasks, policy, tx, progress) = (
            generators.clone(),
            settings.clone(),
            Arc::clone(&tasks),
            Arc::clone(&policy),
            tx.clone(),
            progress.clone(),
        );
        let (config, version) = (config.clone(), version.clone());
        let errors = metrics.generator_errors.clone();
        handles.push(tokio::spawn(async move {
            let _permit = permit;
            let rt = &tasks[item.task];
            if gold_only {
                let rows = gold_samples(
                    rt,
                    &item,
                    &config,
                    policy.as_ref(),
                    run_id,
                    iteration,
                    &version,
                )?;
                return tx.send(rows).await.map_err(|_| {
                    RelabelerError::FailedPrecondition("the store writer stopped".into())
                });
            }
            let seed = config.sample_seed(iteration as u32, rt.id, item.example as u32);
            let request = pb::GenerateRequest {
                prompts: vec![item.prompt.clone()],
                n: config.samples_per_prompt,
                sampling: Some(pb::SamplingParams {
                    temperature: config.temperature,
                    top_k: config.top_k,
                    top_p: config.top_p,
                    max_new_tokens: config.max_new_tokens,
                    stop: vec![],
                    seed: Some(seed),
                }),
                return_logprobs: false,
                expected_version: version.1.clone(),
                request_id: format!("{run_id}/{iteration}/{}/{}", rt.task.name, item.example),
                chat: config.prompt_style == hir_core::run::PromptStyle::Chat,
            };
            let completions =
                generate_with_retry(&generators, &settings, request, &progress, &errors).await?;
            let rows = scored_samples(
                rt,
                &item,
                completions,
                config.verifier,
                policy.as_ref(),
                run_id,
                iteration,
                &version,
            );
            tx.send(rows)
                .await
                .map_err(|_| RelabelerError::FailedPrecondition("the store writer stopped".into()))
        }));
    }
    drop(tx);
    let mut first_error = None;
    for h in handles {
        match h.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                first_error.get_or_insert(e);
            }
            Err(join) => {
                first_error.get_or_insert(RelabelerError::Internal(format!(
                    "a sampling task panicked: {join}"
                )));
            }
        }
    }
    // A store failure is the root cause of the producers' "writer stopped" errors: report it first.
    let written = writer
        .await
        .map_err(|e| RelabelerError::Internal(format!("the store writer panicked: {e}")))??;
    if let Some(err) = first_error {
        return Err(err);
    }

    let (batches, status) =
        finish_iteration(store, &config, policy.name(), run_id, iteration, total).await?;
    progress.send_modify(|p| {
        p.batches = batches as u32;
        p.status = Some(status);
        p.error.clear();
    });
    tracing::info!(%run_id, iteration, written, batches, "iteration sampled");
    Ok(())
}

/// The training prompts of the run's tasks still short of their samples (`done`: samples
/// stored per prompt), and how many prompts the iteration has in all.
fn prompts_to_sample(
    config: &RunConfig,
    per_prompt: u32,
    tasks: &[RunTask],
    done: &[ExampleSampleCount],
) -> (Vec<Item>, u64) {
    let n = i64::from(per_prompt);
    let done: HashMap<(i64, i32), i64> = done
        .iter()
        .map(|c| ((c.task_id, c.example_idx), c.samples))
        .collect();
    let mut items = Vec::new();
    let mut total = 0u64;
    for (t, rt) in tasks.iter().enumerate() {
        let limit = if config.max_train_prompts == 0 {
            rt.train.len()
        } else {
            (config.max_train_prompts as usize).min(rt.train.len())
        };
        for &example in &rt.train[..limit] {
            total += 1;
            if done.get(&(rt.id, example as i32)).copied().unwrap_or(0) >= n {
                continue;
            }
            items.push(Item {
                task: t,
                example,
                prompt: rt.sampler_prompt(example),
            });
        }
    }
    (items, total)
}

/// Writes the rows the prompts send into batched transactions (two in flight) until every
/// sender is gone, reporting progress; returns the samples newly stored.
async fn write_samples(
    store: Store,
    mut rx: mpsc::Receiver<Vec<NewScoredSample>>,
    progress: watch::Sender<Progress>,
    write_batch: usize,
    metrics: Arc<Metrics>,
) -> Result<u64> {
    let started = Instant::now();
    let mut stored_now = 0u64;
    let mut pending: Vec<NewScoredSample> = Vec::new();
    let mut prompts_in_pending = 0u64;
    let flush = |rows: Vec<NewScoredSample>, prompts: u64| {
        let (store, progress, metrics) = (store.clone(), progress.clone(), Arc::clone(&metrics));
        async move {
            let t = Instant::now();
            hir_runtime::fault::point(hir_runtime::fault::RELABELER_WRITE);
            let inserted = store.insert_scored_samples(&rows).await?;
            metrics.write_seconds.observe(t.elapsed().as_secs_f64());
            let correct = rows.iter().filter(|r| r.correct).count() as u64;
            let extracted = rows.iter().filter(|r| r.correct_extracted).count() as u64;
            metrics.samples.inc_by(inserted.samples);
            metrics.correct.inc_by(correct);
            progress.send_modify(|p| {
                p.samples += inserted.samples;
                p.correct += correct;
                p.correct_extracted += extracted;
                p.prompts_done += prompts;
            });
            Ok::<u64, RelabelerError>(inserted.samples)
        }
    };
    // Two transactions in flight keep Postgres busy while the next chunk is built; rows
    // are keyed naturally, so their order does not matter.
    let mut writes = tokio::task::JoinSet::new();
    let mut closed = false;
    while !closed {
        match tokio::time::timeout(Duration::from_millis(200), rx.recv()).await {
            Ok(Some(rows)) => {
                pending.extend(rows);
                prompts_in_pending += 1;
                if pending.len() < write_batch {
                    continue;
                }
            }
            Ok(None) => closed = true,
            Err(_) => {}
        }
        if pending.is_empty() {
            continue;
        }
        if writes.len() >= 2 {
            if let Some(done) = writes.join_next().await {
                stored_now += done.map_err(|e| {
                    RelabelerError::Internal(format!("a store write panicked: {e}"))
                })??;
            }
        }
        writes.spawn(flush(
            std::mem::take(&mut pending),
            std::mem::take(&mut prompts_in_pending),
        ));
        let rate = stored_now as f64 / started.elapsed().as_secs_f64().max(1e-9);
        progress.send_modify(|p| p.samples_per_second = rate);
    }
    while let Some(done) = writes.join_next().await {
        stored_now +=
            done.map_err(|e| RelabelerError::Internal(format!("a store write panicked: {e}")))??;
    }
    Ok(stored_now)
}

/// The one sample of a prompt under a policy that trains on the gold answers: the gold
/// answer itself, scored and relabeled like any sample. A task whose example has no gold
/// answer text cannot be trained this way.
fn gold_samples(
    rt: &RunTask,
    item: &Item,
    config: &RunConfig,
    policy: &dyn RelabelPolicy,
    run_id: Uuid,
    iteration: i32,
    version: &(i64, String),
) -> Result<Vec<NewScoredSample>> {
    let gold = rt.gold(item.example);
    if gold.trim().is_empty() {
        return Err(RelabelerError::FailedPrecondition(format!(
            "task {:?} example {} has no gold answer to train on under policy {:?}",
            rt.task.name,
            item.example,
            policy.name()
        )));
    }
    let completion = pb::Completion {
        sample_index: 0,
        model_version: version.1.clone(),
        finish_reason: pb::FinishReason::Eos as i32,
        text: gold,
        ..Default::default()
    };
    Ok(scored_samples(
        rt,
        item,
        vec![completion],
        config.verifier,
        policy,
        run_id,
        iteration,
        version,
    ))
}

/// One prompt's completions scored against the gold answer (correct by `verifier`) and
/// relabeled under `policy`, as rows to store.
#[allow(clippy::too_many_arguments)]
fn scored_samples(
    rt: &RunTask,
    item: &Item,
    completions: Vec<pb::Completion>,
    verifier: hir_core::run::Verifier,
    policy: &dyn RelabelPolicy,
    run_id: Uuid,
    iteration: i32,
    version: &(i64, String),
) -> Vec<NewScoredSample> {
    let ex = &rt.task.examples[item.example];
    let gold = rt.gold(item.example);
    completions
        .into_iter()
        .map(|c| {
            let s = score(&ex.answer, &c.text);
            let outcome = Outcome {
                kind: rt.task.kind,
                correct: verifier.correct(&c.text, &gold, s.extracted),
                output: &c.text,
                predicted: s.predicted.as_deref(),
            };
            let relabels = policy
                .relabel(&outcome)
                .map(|r| NewRelabel {
                    policy: policy.name().to_string(),
                    positive_instruction: r.positive,
                    negative_instruction: r.negative,
                })
                .into_iter()
                .collect();
            NewScoredSample {
                run_id,
                iteration,
                task_id: rt.id,
                example_idx: item.example as i32,
                sample_idx: c.sample_index as i32,
                model_version_id: version.0,
                prompt: item.prompt.clone(),
                output: c.text,
                output_tokens: c.token_ids.iter().map(|&t| t as i32).collect(),
                finish_reason: convert::finish_reason(c.finish_reason),
                score: if s.exact { 1.0 } else { 0.0 },
                correct: s.exact,
                correct_extracted: s.extracted,
                relabels,
            }
        })
        .collect()
}

/// Groups the iteration's samples into training batches under the run's knobs and moves it
/// to sampled; returns the batches and the iteration's status.
async fn finish_iteration(
    store: &Store,
    config: &RunConfig,
    policy: &str,
    run_id: Uuid,
    iteration: i32,
    prompts: u64,
) -> Result<(usize, IterationStatus)> {
    let plan = hir_store::BatchPlan {
        batch_size: config.batch_size as i32,
        include_replay: config.replay_buffer,
        policy: Some(policy.to_string()),
        epochs: config.epochs_per_iteration as i32,
        shuffle_seed: Some(config.seed.wrapping_add(iteration as u64) as i64),
        max_batches: Some(config.max_steps_per_iteration as i32).filter(|m| *m > 0),
        dedup_outputs: config.dedup_outputs,
        holdout: config.replay_holdout,
        // The reference keeps 4·⌊0.8N⌋ samples: the cap per prompt times the prompts trained.
        max_samples: Some(i64::from(config.replay_cap_per_prompt) * prompts as i64)
            .filter(|m| *m > 0),
    };
    let batches = store.create_batches(run_id, iteration, &plan).await?;
    let status = match store
        .advance_iteration(run_id, iteration, IterationStatus::Sampled)
        .await
    {
        Ok(it) => it.status,
        // Another sampler (a second replica) finished the same iteration first: its rows are
        // the same rows, so this one has nothing left to do.
        Err(hir_store::StoreError::InvalidTransition { .. }) => {
            store.get_iteration(run_id, iteration).await?.status
        }
        Err(err) => return Err(err.into()),
    };
    Ok((batches.len(), status))
}

/// The version iteration `iteration` samples from, `(id, name)`: pinned when its sampling
/// first started; else the run's current version (trained in its latest iteration, or the
/// starting model its iteration 0 evaluated), pinned now; else, for a run whose starting
/// model was never evaluated, what the generators serve. Every request of the iteration
/// names it, so a generator serving anything else refuses the work instead of mixing
/// versions, and a resumed iteration asks for the same version again.
async fn sampling_version(
    store: &Store,
    generators: &GeneratorPool,
    settings: &SamplerSettings,
    run_id: Uuid,
    iteration: i32,
) -> Result<(i64, String)> {
    let pinned = match store
        .get_iteration(run_id, iteration)
        .await?
        .model_version_id
    {
        Some(id) => id,
        None => {
            let current = match store.run_version_before(run_id, iteration).await? {
                Some(v) => v.id,
                None => serving_version(store, generators, settings).await?.0,
            };
            store
                .pin_iteration_version(run_id, iteration, current)
                .await?
        }
    };
    let v = store.get_model_version(pinned).await?;
    Ok((v.id, v.name))
}

/// The version the generators serve, registered in the store if new: `(id, name)`.
async fn serving_version(
    store: &Store,
    generators: &GeneratorPool,
    settings: &SamplerSettings,
) -> Result<(i64, String)> {
    let info = with_retry(settings, "GetModelInfo", || {
        let picked = generators.pick();
        let request = generators.request(pb::GetModelInfoRequest {});
        async move {
            let mut client = picked?.client();
            client.get_model_info(request).await.map(|r| r.into_inner())
        }
    })
    .await?;
    let v = hir_store::catalog::register_served_version(store, &info.version, &info.sha256).await?;
    Ok((v.id, v.name))
}

/// Calls a generator with the sampler's backoff; the health service's `generator` status
/// follows whether the generators answer.
async fn with_retry<T, F, Fut>(settings: &SamplerSettings, what: &str, call: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, tonic::Status>>,
{
    let up = &settings.generator_up;
    let outcome = settings
        .backoff
        .retry(
            call,
            |s| retryable(s) || serving_other_version(s).is_some(),
            |status, _, delay| {
                if let Some(serving) = serving_other_version(status) {
                    // A generator that restarted or joined serves another version until the
                    // trainer brings it to the run's; the next attempt may reach another.
                    tracing::warn!(what, serving, retry_in_ms = delay.as_millis() as u64, "generator serves another version; retrying");
                } else {
                    up.send_if_modified(|up| std::mem::replace(up, false));
                    tracing::warn!(what, code = ?status.code(), message = status.message(), retry_in_ms = delay.as_millis() as u64, "generator unavailable; retrying");
                }
            },
        )
        .await;
    match outcome {
        Ok(v) => {
            up.send_if_modified(|up| !std::mem::replace(up, true));
            Ok(v)
        }
        Err(status) => Err(RelabelerError::Generator(format!(
            "{what}: {:?}: {}",
            status.code(),
            status.message()
        ))),
    }
}

async fn generate_with_retry(
    generators: &GeneratorPool,
    settings: &SamplerSettings,
    request: pb::GenerateRequest,
    progress: &watch::Sender<Progress>,
    errors: &prometheus_client::metrics::counter::Counter,
) -> Result<Vec<pb::Completion>> {
    let result = with_retry(settings, "Generate", || {
        let picked = generators.pick();
        let request = generators.request(request.clone());
        let progress = progress.clone();
        let errors = errors.clone();
        async move {
            let outcome = async {
                let mut stream = picked?.client().generate(request).await?.into_inner();
                let mut out = Vec::new();
                while let Some(r) = stream.message().await? {
                    hir_runtime::fault::point(hir_runtime::fault::RELABELER_STREAM);
                    out.extend(r.completion);
                }
                Ok::<_, tonic::Status>(out)
            }
            .await;
            match &outcome {
                Ok(_) => progress.send_if_modified(|p| !std::mem::take(&mut p.error).is_empty()),
                Err(status) => {
                    errors.inc();
                    progress.send_modify(|p| p.error = format!("generator: {}", status.message()));
                    false
                }
            };
            outcome
        }
    })
    .await?;
    Ok(result)
}
