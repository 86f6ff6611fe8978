//! Driving one run: the base evaluation, then for each iteration k sampling (by the
//! relabeler), training on the leased batches, a checkpoint registered as a new model
//! version, a swap into every generator with verification, and evaluation.
//!
//! Every stage is recorded in the store before the next begins, so a driver started again
//! (after a crash, a stop, or on another trainer) continues from the iteration's stored
//! status: training from the last committed snapshot (weights, optimizer, step) and the
//! batches not yet done; swaps and evaluation are idempotent.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hir_core::eval::TaskEval;
use hir_core::rng::SplitMix64;
use hir_core::run::RunConfig;
use hir_proto::{convert, pb};
use hir_store::{
    IterationStatus, ModelVersion, NewModelVersion, NewTrainerState, RunStatus, RunTask, Store,
    StoreError, TaskCache,
};
use tokio::sync::{broadcast, watch};
use uuid::Uuid;

use crate::config::TrainerConfig;
use crate::error::{Result, TrainerError};
use crate::eval;
use crate::examples::{self, RelabeledSample};
use crate::metrics::Metrics;
use crate::remote::Remotes;
use crate::state::{self, StepStats, TrainState};

/// What every run's driver shares.
#[derive(Debug)]
pub struct Context {
    /// The relabel store.
    pub store: Store,
    /// BIG-bench tasks, parsed once.
    pub tasks: TaskCache,
    /// The relabeler and the generators.
    pub remotes: Remotes,
    /// Configuration.
    pub config: TrainerConfig,
    /// Where models train.
    pub device: candle_core::Device,
    /// This trainer's name in leases.
    pub owner: String,
    /// Metrics.
    pub metrics: Arc<Metrics>,
}

/// Progress events of a run, for `WatchRun`.
#[derive(Debug, Clone)]
pub struct Events(pub broadcast::Sender<pb::RunEvent>);

impl Events {
    /// A channel keeping the latest `capacity` events for slow watchers.
    pub fn new(capacity: usize) -> Self {
        Self(broadcast::channel(capacity).0)
    }

    /// Sends an event (dropped when nobody watches).
    pub fn emit(&self, event: pb::run_event::Event) {
        let _ = self.0.send(pb::RunEvent {
            at: Some(convert::now()),
            event: Some(event),
        });
    }

    fn iteration(&self, iteration: u32, status: IterationStatus, error: &str) {
        self.emit(pb::run_event::Event::Iteration(
            pb::IterationStatusChanged {
                iteration,
                status: pb::IterationStatus::from(status) as i32,
                error: error.to_string(),
            },
        ));
    }
}

/// The version name of iteration `k` of a run.
pub fn version_name(run_id: Uuid, iteration: u32) -> String {
    format!("{run_id}-it{iteration:03}")
}

/// One run being driven.
struct Driver<'a> {
    ctx: &'a Context,
    run_id: Uuid,
    policy: String,
    config: RunConfig,
    tasks: Vec<RunTask>,
    stop: watch::Receiver<bool>,
    events: &'a Events,
    state: Option<TrainState>,
}

/// Drives a run to its end, a stop request or an error. The caller records the outcome.
pub async fn drive(
    ctx: &Context,
    run_id: Uuid,
    stop: watch::Receiver<bool>,
    events: &Events,
) -> Result<()> {
    let run = ctx.store.get_run(run_id).await?;
    let config = run.config()?;
    let tasks =
        hir_store::catalog::run_tasks(&ctx.store, &ctx.tasks, run_id, config.split_seed()).await?;
    if tasks.is_empty() {
        return Err(TrainerError::FailedPrecondition(format!(
            "run {run_id} has no tasks"
        )));
    }
    let mut driver = Driver {
        ctx,
        run_id,
        policy: run.policy.clone(),
        config,
        tasks,
        stop,
        events,
        state: None,
    };
    driver.base_evaluation().await?;
    for k in 1..=driver.config.iterations {
        driver.iteration(k).await?;
    }
    Ok(())
}

impl Driver<'_> {
    fn stopping(&self) -> bool {
        *self.stop.borrow()
    }

    async fn advance(&self, k: u32, to: IterationStatus) -> Result<()> {
        self.ctx
            .store
            .advance_iteration(self.run_id, k as i32, to)
            .await?;
        self.events.iteration(k, to, "");
        Ok(())
    }

    /// Iteration 0: the base model, as the generators serve it, on the test split.
    async fn base_evaluation(&mut self) -> Result<()> {
        let store = &self.ctx.store;
        store.ensure_iteration(self.run_id, 0).await?;
        let it = store.get_iteration(self.run_id, 0).await?;
        if it.status == IterationStatus::Done {
            return Ok(());
        }
        if it.status != IterationStatus::Evaluating {
            self.advance(0, IterationStatus::Evaluating).await?;
        }
        let version = self.serving_base_version().await?;
        self.evaluate(0, &version).await?;
        self.advance(0, IterationStatus::Done).await
    }

    /// The version the first generator serves, registered in the store if new.
    async fn serving_base_version(&self) -> Result<ModelVersion> {
        let g = &self.ctx.remotes.generators()[0];
        let info = self.ctx.remotes.model_info(g).await?;
        Ok(hir_store::catalog::register_served_version(
            &self.ctx.store,
            &info.version,
            &info.sha256,
        )
        .await?)
    }

    async fn evaluate(&self, k: u32, version: &ModelVersion) -> Result<Vec<TaskEval>> {
        let events = self.events;
        eval::evaluate(
            self.ctx,
            &self.tasks,
            &self.config,
            self.run_id,
            k,
            version,
            |t| {
                let predicted_counts: std::collections::HashMap<String, u32> =
                    t.predicted.clone().into_iter().collect();
                events.emit(pb::run_event::Event::Eval(pb::EvalDone {
                    iteration: k,
                    model_version: version.name.clone(),
                    accuracy: Some(pb::TaskAccuracy {
                        task: t.task.clone(),
                        examples: t.examples,
                        exact: t.exact,
                        extracted: t.extracted,
                        predicted_counts: predicted_counts.clone(),
                    }),
                    predicted_counts,
                }))
            },
        )
        .await
    }

    /// Iteration `k` from wherever the store says it stands.
    async fn iteration(&mut self, k: u32) -> Result<()> {
        let store = &self.ctx.store;
        store.ensure_iteration(self.run_id, k as i32).await?;
        loop {
            if self.stopping() {
                return Err(TrainerError::Stopped);
            }
            let status = store.get_iteration(self.run_id, k as i32).await?.status;
            match status {
                IterationStatus::Pending | IterationStatus::Sampling => {
                    let events = self.events;
                    let mut last: Option<(i32, String)> = None;
                    self.ctx
                        .remotes
                        .sample(
                            &self.run_id.to_string(),
                            k,
                            self.ctx.config.relabeler_give_up(),
                            |s| {
                                // Status changes and retries become events; progress ticks do not.
                                let now = (s.status, s.error.clone());
                                if last.as_ref() != Some(&now) {
                                    last = Some(now);
                                    events.emit(pb::run_event::Event::Iteration(
                                        pb::IterationStatusChanged {
                                            iteration: k,
                                            status: s.status,
                                            error: s.error.clone(),
                                        },
                                    ));
                                }
                            },
                        )
                        .await?;
                }
                IterationStatus::Sampled | IterationStatus::Training => {
                    if status == IterationStatus::Sampled {
                        self.advance(k, IterationStatus::Training).await?;
                    }
                    self.train(k).await?;
                    self.checkpoint(k).await?;
                    self.advance(k, IterationStatus::Trained).await?;
                }
                IterationStatus::Trained => {
                    self.swap_all(k).await?;
                    self.advance(k, IterationStatus::Evaluating).await?;
                }
                IterationStatus::Evaluating => {
                    let version = store
                        .get_model_version_by_name(&version_name(self.run_id, k))
                        .await?;
                    self.evaluate(k, &version).await?;
                    self.advance(k, IterationStatus::Done).await?;
                }
                IterationStatus::Done => return Ok(()),
                IterationStatus::Failed => {
                    let it = store.get_iteration(self.run_id, k as i32).await?;
                    return Err(TrainerError::FailedPrecondition(format!(
                        "iteration {k} failed: {}; resume the run to retry it",
                        it.error.unwrap_or_default()
                    )));
                }
            }
        }
    }

    fn run_state_dir(&self) -> PathBuf {
        self.ctx.config.state_dir.join(self.run_id.to_string())
    }

    /// The training state: in memory, else the last committed snapshot, else the
    /// run's starting model.
    async fn load_state(&mut self) -> Result<TrainState> {
        if let Some(s) = self.state.take() {
            return Ok(s);
        }
        let committed = self.ctx.store.trainer_state(self.run_id).await?;
        let (device, config) = (self.ctx.device.clone(), self.config.clone());
        let started = Instant::now();
        let state = tokio::task::spawn_blocking(move || match committed {
            Some(c) => {
                let (s, _) = TrainState::load_snapshot(
                    Path::new(&c.state_uri),
                    &c.sha256,
                    &device,
                    &config,
                )?;
                Ok(s)
            }
            None => TrainState::load(Path::new(&config.model), &device, &config),
        })
        .await
        .map_err(join_error)??;
        tracing::info!(run_id = %self.run_id, step = state.step_count(), ms = started.elapsed().as_millis() as u64, "training state loaded");
        Ok(state)
    }

    /// Runs `f` on the training state on a blocking thread (loading the state first if
    /// it is not in memory).
    async fn blocking<R: Send + 'static>(
        &mut self,
        f: impl FnOnce(&mut TrainState) -> R + Send + 'static,
    ) -> Result<R> {
        let mut state = self.load_state().await?;
        let (state, r) = tokio::task::spawn_blocking(move || {
            let r = f(&mut state);
            (state, r)
        })
        .await
        .map_err(join_error)?;
        self.state = Some(state);
        Ok(r)
    }

    /// Trains on every batch of iteration `k`, committing every few steps. On an error the
    /// in-memory state (ahead of what is committed) is dropped, so a retry starts from
    /// the committed snapshot.
    async fn train(&mut self, k: u32) -> Result<()> {
        let store = &self.ctx.store;
        let summary = store.training_summary(self.run_id).await?;
        let batches = summary
            .iter()
            .find(|s| s.iteration == k as i32)
            .map_or(0, |s| s.batches);
        if batches == 0 {
            let totals = store.sample_totals(self.run_id, k as i32).await?;
            return Err(TrainerError::FailedPrecondition(format!(
                "iteration {k} has no training batches: {} samples were stored and policy \
                 {:?} kept none of them for training (a FARL run needs correct samples)",
                totals.samples, self.policy
            )));
        }
        let gold = self.gold_answers().await?;
        // Leases this trainer held before a restart cover work that was never committed.
        let released = store
            .release_leases_of(self.run_id, &self.ctx.owner)
            .await?;
        if released > 0 {
            tracing::info!(run_id = %self.run_id, released, "gave back the leases of an earlier process");
        }
        let mut pending: Vec<(i64, serde_json::Value)> = Vec::new();
        let result = self.train_loop(k, &gold, &mut pending).await;
        let result = match result {
            // A stop commits what was trained: nothing is lost.
            Ok(()) | Err(TrainerError::Stopped) if !pending.is_empty() => {
                self.commit(k, &mut pending).await.and(result)
            }
            other => other,
        };
        if result
            .as_ref()
            .is_err_and(|e| !matches!(e, TrainerError::Stopped))
        {
            self.state = None;
        }
        result
    }

    async fn train_loop(
        &mut self,
        k: u32,
        gold: &std::collections::HashMap<(i64, i32), String>,
        pending: &mut Vec<(i64, serde_json::Value)>,
    ) -> Result<()> {
        let ctx = self.ctx;
        let store = &ctx.store;
        let lease = Duration::from_secs(ctx.config.lease_secs.max(1));
        loop {
            if self.stopping() {
                return Err(TrainerError::Stopped);
            }
            let leased = store
                .lease_batches(self.run_id, &ctx.owner, 1, lease)
                .await?;
            let Some(batch) = leased.into_iter().next() else {
                if !pending.is_empty() {
                    self.commit(k, pending).await?;
                    continue;
                }
                let s = store.training_summary(self.run_id).await?;
                if s.iter()
                    .find(|s| s.iteration == k as i32)
                    .is_some_and(|s| s.steps == s.batches)
                {
                    return Ok(());
                }
                // Another trainer holds the rest; wait for it or for its lease to end.
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            };
            if batch.iteration != k as i32 {
                store.release_batch(batch.id, &ctx.owner).await?;
                return Err(TrainerError::FailedPrecondition(format!(
                    "batch {} of iteration {} is still queued while training iteration {k}",
                    batch.id, batch.iteration
                )));
            }
            let samples = self.batch_samples(batch.id, gold).await?;
            let (seed, batch_it, batch_idx) = (self.config.seed, batch.iteration, batch.batch_idx);
            let opts = examples::BuildOptions {
                chat: self.config.prompt_style == hir_core::run::PromptStyle::Chat,
                eos_after_cut: self.config.eos_after_cut,
            };
            let started = Instant::now();
            let stats = self
                .blocking(move |state| -> Result<StepStats> {
                    let mut examples = Vec::with_capacity(samples.len());
                    for s in &samples {
                        let mut rng = SplitMix64::new(examples::span_seed(
                            seed, batch_it, batch_idx, s.seed_key,
                        ));
                        examples.push(examples::build(s, &state.model, opts, &mut rng)?);
                    }
                    state.step(&examples)
                })
                .await??;
            let step_ms = started.elapsed().as_secs_f64() * 1e3;
            self.record_step(k, &stats, step_ms);
            pending.push((
                batch.id,
                progress_json(&stats, step_ms, self.config.learning_rate),
            ));
            if pending.len() >= ctx.config.commit_every_steps.max(1) as usize {
                self.commit(k, pending).await?;
            }
        }
    }

    fn record_step(&self, k: u32, stats: &StepStats, step_ms: f64) {
        let m = &self.ctx.metrics;
        m.steps.inc();
        m.tokens.inc_by(stats.tokens as u64);
        m.loss.set(stats.loss);
        m.step_seconds.observe(step_ms / 1e3);
        tracing::info!(run_id = %self.run_id, iteration = k, step = stats.step, loss = stats.loss, grad_norm = stats.grad_norm, step_ms, "step");
        self.events.emit(pb::run_event::Event::Step(pb::TrainStep {
            iteration: k,
            step: stats.step,
            loss: stats.loss,
            loss_supervised: stats.loss_supervised,
            loss_contrastive: stats.loss_contrastive,
            entropy: stats.entropy,
            grad_norm: stats.grad_norm,
            learning_rate: self.config.learning_rate,
            tokens_per_second: stats.tokens as f64 / (step_ms / 1e3).max(1e-9),
            step_ms,
        }));
    }

    /// Snapshots the state, then marks the pending batches done and points the store at
    /// the snapshot in one transaction.
    async fn commit(&mut self, k: u32, pending: &mut Vec<(i64, serde_json::Value)>) -> Result<()> {
        let dir = self.run_state_dir();
        std::fs::create_dir_all(&dir).map_err(|e| TrainerError::io(&dir, e))?;
        let d = dir.clone();
        let (folder, sha256) = self.blocking(move |s| s.save_snapshot(&d, k)).await??;
        let step = self.state.as_ref().map_or(0, |s| s.step_count()) as i64;
        // Compare-and-set: this state was built on the one committed before the pending
        // steps (none before the run's first step).
        let expected = Some(step - pending.len() as i64).filter(|s| *s > 0);
        self.ctx
            .store
            .commit_training(
                &NewTrainerState {
                    run_id: self.run_id,
                    step,
                    iteration: k as i32,
                    state_uri: folder.to_string_lossy().into_owned(),
                    sha256,
                    owner: self.ctx.owner.clone(),
                },
                expected,
                pending,
            )
            .await?;
        pending.clear();
        state::prune_snapshots(&dir, &folder)?;
        tracing::info!(run_id = %self.run_id, iteration = k, step, "training state committed");
        Ok(())
    }

    /// Gold answers of the run's examples, by (task id, example index).
    async fn gold_answers(&self) -> Result<std::collections::HashMap<(i64, i32), String>> {
        let mut gold = std::collections::HashMap::new();
        for t in &self.tasks {
            for ex in self.ctx.store.list_examples(t.id, None).await? {
                gold.insert((t.id, ex.idx), ex.target);
            }
        }
        Ok(gold)
    }

    /// The samples of one batch with their relabel under the run's policy.
    async fn batch_samples(
        &self,
        batch_id: i64,
        gold: &std::collections::HashMap<(i64, i32), String>,
    ) -> Result<Vec<RelabeledSample>> {
        let store = &self.ctx.store;
        let ids = store.batch_sample_ids(batch_id).await?;
        let mut samples = store.get_samples(&ids).await?;
        // By natural key, not id: the micro-batches are the same whatever order the samples
        // were written in.
        samples.sort_by_key(|s| (s.iteration, s.task_id, s.example_idx, s.sample_idx));
        let relabels: std::collections::HashMap<i64, hir_store::Relabel> = store
            .list_relabels(&ids)
            .await?
            .into_iter()
            .filter(|r| r.policy == self.policy)
            .map(|r| (r.sample_id, r))
            .collect();
        let out: Vec<RelabeledSample> = samples
            .into_iter()
            .filter_map(|s| {
                let r = relabels.get(&s.id)?;
                let gold = gold
                    .get(&(s.task_id, s.example_idx))
                    .cloned()
                    .unwrap_or_default();
                Some(RelabeledSample {
                    sample_id: s.id,
                    seed_key: examples::seed_key(
                        s.iteration,
                        s.task_id,
                        s.example_idx,
                        s.sample_idx,
                    ),
                    prompt: s.prompt,
                    output_tokens: s.output_tokens.iter().map(|&t| t as u32).collect(),
                    cut: s.finish_reason == hir_store::FinishReason::Length,
                    // The verifier the relabel came from, not exact match: they differ on
                    // an output with a newline, such as "(C)\n".
                    correct: hir_core::score::relabel_match(&s.output, &gold),
                    gold,
                    positive: r.positive_instruction.clone(),
                    negative: r.negative_instruction.clone(),
                })
            })
            .collect();
        if out.is_empty() {
            return Err(TrainerError::FailedPrecondition(format!(
                "training batch {batch_id} has no sample relabeled under policy {:?}",
                self.policy
            )));
        }
        Ok(out)
    }

    /// Writes iteration `k`'s model as a checkpoint and registers it as a new version.
    async fn checkpoint(&mut self, k: u32) -> Result<ModelVersion> {
        let name = version_name(self.run_id, k);
        let folder = self.checkpoint_folder(k);
        let f = folder.clone();
        self.blocking(move |s| s.model.save(&f)).await??;
        let sha256 = hir_model::checkpoint::sha256_file(&folder.join("manifest.json"))?;
        let parent = if k == 1 {
            None
        } else {
            Some(
                self.ctx
                    .store
                    .get_model_version_by_name(&version_name(self.run_id, k - 1))
                    .await?
                    .id,
            )
        };
        let training = self.ctx.store.training_summary(self.run_id).await?;
        let it = training.iter().find(|s| s.iteration == k as i32);
        let version = self
            .ctx
            .store
            .register_model_version(&NewModelVersion {
                name,
                run_id: Some(self.run_id),
                iteration: Some(k as i32),
                parent_id: parent,
                checkpoint_uri: folder.to_string_lossy().into_owned(),
                sha256,
                metrics: serde_json::json!({
                    "train_loss": it.and_then(|s| s.mean_loss),
                    "steps": it.map_or(0, |s| s.steps),
                }),
            })
            .await?;
        self.events.emit(pb::run_event::Event::Checkpoint(
            crate::service::version_to_pb(&version, None),
        ));
        // The generators serve the previous version until the swap.
        self.ctx.metrics.version_lag.set(1);
        Ok(version)
    }

    fn checkpoint_folder(&self, k: u32) -> PathBuf {
        self.ctx
            .config
            .checkpoint_dir
            .join(self.run_id.to_string())
            .join(format!("it{k:03}"))
    }

    /// Swaps iteration `k`'s version into every generator and verifies each serves it.
    async fn swap_all(&mut self, k: u32) -> Result<()> {
        let store = &self.ctx.store;
        let version = store
            .get_model_version_by_name(&version_name(self.run_id, k))
            .await?;
        let folder = PathBuf::from(&version.checkpoint_uri);
        let relative = format!("{}/it{k:03}", self.run_id);
        let remotes = &self.ctx.remotes;
        for g in remotes.generators() {
            let info = remotes.model_info(g).await?;
            if info.version != version.name {
                if !self.is_ours_or_base(&info.version).await? {
                    return Err(TrainerError::FailedPrecondition(format!(
                        "generator {} serves version {:?}, which belongs to another run; \
                         give each run its own generators",
                        g.address, info.version
                    )));
                }
                let started = Instant::now();
                let target = crate::remote::SwapTarget {
                    folder: &folder,
                    relative: &relative,
                    version: &version.name,
                    sha256: &version.sha256,
                    expected: &info.version,
                };
                let r = remotes.swap(g, &target, self.ctx.config.upload).await?;
                self.ctx
                    .metrics
                    .swap_seconds
                    .observe(started.elapsed().as_secs_f64());
                tracing::info!(generator = %g.address, version = %r.version, previous = %r.previous_version, total_ms = r.total_ms, "swapped");
                self.events.emit(pb::run_event::Event::Swap(pb::SwapDone {
                    generator: g.address.clone(),
                    version: r.version,
                    previous_version: r.previous_version,
                    total_ms: r.total_ms,
                }));
            }
            self.verify(g, &version.name).await?;
        }
        self.ctx.metrics.version_lag.set(0);
        Ok(())
    }

    /// A version this run produced, or one no run produced (a base model).
    async fn is_ours_or_base(&self, name: &str) -> Result<bool> {
        Ok(match self.ctx.store.get_model_version_by_name(name).await {
            Ok(v) => v.run_id.is_none_or(|r| r == self.run_id),
            Err(StoreError::NotFound { .. }) => true,
            Err(e) => return Err(e.into()),
        })
    }

    /// Checks that a generator reports `version` and that its log-probabilities of a fixed
    /// probe agree with the trainer's model.
    async fn verify(&mut self, g: &crate::remote::Generator, version: &str) -> Result<()> {
        let info = self.ctx.remotes.model_info(g).await?;
        if info.version != version {
            return Err(TrainerError::Verification(format!(
                "generator {} reports version {:?} after the swap to {version:?}",
                g.address, info.version
            )));
        }
        let probe_text = self
            .tasks
            .first()
            .map(|t| {
                hir_core::prompt::Prompt::build(
                    &t.task,
                    &t.task.examples[0],
                    hir_core::prompt::DEFAULT_INSTRUCTION,
                    hir_core::prompt::PromptVariant::Sampler,
                )
                .text()
            })
            .unwrap_or_default();
        let ids = self
            .blocking(move |s| s.model.encode(&probe_text))
            .await??;
        // The last few tokens of a real prompt, scored after the rest.
        let cut = ids.len().saturating_sub(8).max(1);
        if cut >= ids.len() {
            return Ok(());
        }
        let (prompt, continuation) = (ids[..cut].to_vec(), ids[cut..].to_vec());
        let remote = self
            .ctx
            .remotes
            .logprobs(g, version, &prompt, &continuation)
            .await?;
        let local = self
            .blocking(move |s| s.logprobs(&prompt, &continuation))
            .await??;
        if remote.len() != local.len() {
            return Err(TrainerError::Verification(format!(
                "generator {} returned {} log-probabilities for {} probe tokens",
                g.address,
                remote.len(),
                local.len()
            )));
        }
        let diff = remote
            .iter()
            .zip(&local)
            .map(|(a, b)| f64::from((a - b).abs()))
            .sum::<f64>()
            / local.len() as f64;
        let tolerance = if info.dtype == "quantized" {
            self.ctx.config.probe_tolerance_quantized
        } else {
            self.ctx.config.probe_tolerance
        };
        if diff > tolerance {
            return Err(TrainerError::Verification(format!(
                "generator {} serves {version:?} ({}) but its log-probabilities differ from \
                 the trainer's by {diff:.4} per token on average (tolerance {tolerance}); it \
                 is not serving the trained weights",
                g.address, info.dtype
            )));
        }
        tracing::info!(generator = %g.address, version, mean_abs_diff = diff, "generator verified");
        Ok(())
    }
}

/// What a committed batch records (the `training_steps` view reads it).
fn progress_json(stats: &StepStats, step_ms: f64, lr: f64) -> serde_json::Value {
    serde_json::json!({
        "step": stats.step,
        "loss": stats.loss,
        "loss_supervised": stats.loss_supervised,
        "loss_contrastive": stats.loss_contrastive,
        "entropy": stats.entropy,
        "grad_norm": stats.grad_norm,
        "examples": stats.examples,
        "tokens": stats.tokens,
        "step_ms": step_ms,
        "learning_rate": lr,
    })
}

fn join_error(e: tokio::task::JoinError) -> TrainerError {
    TrainerError::FailedPrecondition(format!("a training task panicked: {e}"))
}

/// Records how a driver ended: done, stopped (resumable) or failed with the reason.
pub async fn finish(store: &Store, run_id: Uuid, outcome: &Result<()>, events: &Events) {
    let (status, error) = match outcome {
        Ok(()) => (RunStatus::Done, None),
        Err(TrainerError::Stopped) => (RunStatus::Stopped, None),
        Err(e) => (RunStatus::Failed, Some(e.to_string())),
    };
    if let Some(err) = &error {
        tracing::error!(%run_id, error = %err, "run failed");
        // The iteration in progress fails with the same reason.
        if let Ok(its) = store.list_iterations(run_id).await {
            if let Some(it) = its.iter().rev().find(|i| !i.status.is_terminal()) {
                if store
                    .fail_iteration(run_id, it.iteration, err)
                    .await
                    .is_ok()
                {
                    events.iteration(it.iteration as u32, IterationStatus::Failed, err);
                }
            }
        }
    }
    match store.set_run_status(run_id, status, error.as_deref()).await {
        Ok(_) => events.emit(pb::run_event::Event::RunStatus(
            pb::RunStatus::from(status) as i32
        )),
        Err(e) => tracing::error!(%run_id, error = %e, "could not record the run's outcome"),
    }
}
