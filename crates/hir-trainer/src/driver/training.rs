//! The training stage of an iteration: the run's training state (loaded from the last
//! committed snapshot or the starting model), the leased batches assembled into HIR
//! examples, optimizer steps on the model thread, and commits that snapshot the state and
//! mark the batches done in one transaction.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hir_core::rng::SplitMix64;
use hir_store::NewTrainerState;

use super::Driver;
use crate::error::{Result, TrainerError};
use crate::examples::{self, RelabeledSample};
use crate::state::{self, StepStats, TrainState};

impl Driver<'_> {
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
        // Hand back what was freed (e.g. sampling's caches) before the state takes its place.
        hir_runtime::memory::release_free();
        let mut state = tokio::task::spawn_blocking(move || match committed {
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
        state.recompute = self.ctx.config.recompute_activations.on(&self.ctx.device);
        let mib = self.ctx.config.kept_products_mib;
        let kept = usize::try_from(mib.saturating_mul(1 << 20)).unwrap_or(usize::MAX);
        state.model.model_mut().set_kept_products(kept);
        tracing::info!(run_id = %self.run_id, step = state.step_count(), ms = started.elapsed().as_millis() as u64, "training state loaded");
        Ok(state)
    }

    /// Runs `f` on the training state on a blocking thread (loading the state first if
    /// it is not in memory).
    pub(super) async fn with_train_state<R: Send + 'static>(
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
    pub(super) async fn train(&mut self, k: u32) -> Result<()> {
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
                eos_after_span: self.config.eos_after_span,
            };
            let started = Instant::now();
            let stats = self
                .with_train_state(move |state| -> Result<StepStats> {
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
            hir_runtime::fault::point(hir_runtime::fault::TRAINER_STEP);
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
        self.events
            .step(k, stats, self.config.learning_rate, step_ms);
    }

    /// Snapshots the state, then marks the pending batches done and points the store at
    /// the snapshot in one transaction.
    async fn commit(&mut self, k: u32, pending: &mut Vec<(i64, serde_json::Value)>) -> Result<()> {
        let dir = self.run_state_dir();
        std::fs::create_dir_all(&dir).map_err(|e| TrainerError::io(&dir, e))?;
        let d = dir.clone();
        let (folder, sha256) = self
            .with_train_state(move |s| s.save_snapshot(&d, k))
            .await??;
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
        Ok(self
            .tasks
            .iter()
            .flat_map(|t| (0..t.task.examples.len()).map(move |i| ((t.id, i as i32), t.gold(i))))
            .collect())
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
        let verifier = self.config.verifier;
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
                    // The verifier the relabel came from, not the stored exact match: they
                    // differ on an output with a newline, such as "(C)\n".
                    correct: verifier.correct(&s.output, &gold, s.correct_extracted),
                    output: s.output,
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
    TrainerError::Internal(format!("a training task panicked: {e}"))
}
