//! Driving one run: the base evaluation, then for each iteration k sampling (by the
//! relabeler), training on the leased batches, a checkpoint registered as a new model
//! version, a swap into every generator with verification, and evaluation.
//!
//! Every stage is recorded in the store before the next begins, so a driver started again
//! (after a crash, a stop, or on another trainer) continues from the iteration's stored
//! status: training from the last committed snapshot (weights, optimizer, step) and the
//! batches not yet done; swaps and evaluation are idempotent.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hir_core::eval::TaskEval;
use hir_core::run::RunConfig;
use hir_proto::convert;
use hir_store::{IterationStatus, ModelVersion, RunStatus, RunTask, Store, TaskCache};
use tokio::sync::watch;
use uuid::Uuid;

mod publish;
mod training;

use crate::config::TrainerConfig;
use crate::error::{Result, TrainerError};
use crate::eval;
use crate::events::Events;
use crate::metrics::Metrics;
use crate::remote::Remotes;
use crate::state::TrainState;

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

/// How often the generators' versions are checked while an iteration samples or evaluates.
pub const RECONCILE_EVERY: Duration = Duration::from_secs(2);

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
    let tasks = hir_store::catalog::run_tasks(
        &ctx.store,
        &ctx.tasks,
        run_id,
        config.split_seed(),
        config.validation_share,
    )
    .await?;
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
    /// Has the relabeler sample iteration `k`, keeping every generator on the run's
    /// version meanwhile: before sampling starts and every [`RECONCILE_EVERY`] while it
    /// runs, so a generator that restarts or joins mid-iteration is brought back to it.
    async fn sample(&self, k: u32) -> Result<()> {
        self.reconcile(k).await?;
        let events = self.events;
        let mut last: Option<(i32, String)> = None;
        let run_id = self.run_id.to_string();
        let sampling =
            self.ctx
                .remotes
                .sample(&run_id, k, self.ctx.config.relabeler_give_up(), |s| {
                    // Status changes and retries become events; progress ticks do not.
                    let now = (s.status, s.error.clone());
                    if last.as_ref() != Some(&now) {
                        last = Some(now);
                        if let Some(status) = convert::iteration_status(s.status) {
                            events.iteration(k, status, &s.error);
                        }
                    }
                });
        self.reconciling(k, sampling).await.map(|_| ())
    }

    /// Runs `work` while keeping every generator on the version iteration `k` samples
    /// from: every [`RECONCILE_EVERY`] a generator that restarted (serving its starting
    /// model) or joined is brought back to it, so requests that name the version are
    /// answered again instead of refused until they give up.
    async fn reconciling<T>(&self, k: u32, work: impl Future<Output = Result<T>>) -> Result<T> {
        tokio::pin!(work);
        let mut tick = tokio::time::interval(RECONCILE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                done = &mut work => return done,
                _ = tick.tick() => {
                    if let Err(e) = self.reconcile(k).await {
                        tracing::warn!(run_id = %self.run_id, iteration = k, error = %e, "reconciling the generators' version failed; retrying");
                    }
                }
            }
        }
    }

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
        let remotes = &self.ctx.remotes;
        remotes.refresh_generators().await;
        let g = remotes
            .generators()
            .first()
            .cloned()
            .ok_or_else(|| TrainerError::Remote {
                service: "generators".into(),
                message: "no generator is known yet".into(),
            })?;
        let info = remotes.model_info(&g).await?;
        Ok(hir_store::catalog::register_served_version(
            &self.ctx.store,
            &info.version,
            &info.sha256,
        )
        .await?)
    }

    async fn evaluate(&self, k: u32, version: &ModelVersion) -> Result<Vec<TaskEval>> {
        let events = self.events;
        let evaluator = eval::Evaluator {
            store: &self.ctx.store,
            remotes: &self.ctx.remotes,
            batch: self.ctx.config.eval_batch,
        };
        evaluator
            .evaluate(&self.tasks, &self.config, self.run_id, k, version, |t| {
                events.eval(k, &version.name, t)
            })
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
                IterationStatus::Pending | IterationStatus::Sampling => self.sample(k).await?,
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
                    if self.ctx.config.release_state_between_iterations {
                        // Every step is committed and the swap verified against the state:
                        // the next iteration loads the snapshot.
                        self.state = None;
                        hir_runtime::memory::release_free();
                    }
                }
                IterationStatus::Evaluating => {
                    let version = store
                        .get_model_version_by_name(&version_name(self.run_id, k))
                        .await?;
                    // A generator that restarted since the swap gets the version back first,
                    // and again if it restarts while the evaluation runs.
                    self.reconcile(k + 1).await?;
                    if self.config.evaluates(k) {
                        self.reconciling(k + 1, self.evaluate(k, &version)).await?;
                    }
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
}

/// Records how a driver ended: done, stopped (resumable) or failed with the reason.
pub async fn finish(store: &Store, run_id: Uuid, outcome: &Result<()>, events: &Events) {
    let (status, error) = match outcome {
        Ok(()) => (RunStatus::Done, None),
        Err(TrainerError::Stopped) => (RunStatus::Stopped, None),
        Err(e) => (RunStatus::Failed, Some(e.summary())),
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
        Ok(_) => events.run_status(status),
        Err(e) => tracing::error!(%run_id, error = %e, "could not record the run's outcome"),
    }
}
