//! A run's progress events for `WatchRun`: the driver reports what happened in domain
//! terms and this module, the trainer's one place for it, writes the wire events.

use hir_core::eval::TaskEval;
use hir_core::status::{IterationStatus, RunStatus};
use hir_proto::{convert, pb};
use hir_store::ModelVersion;
use tokio::sync::broadcast;

use crate::state::StepStats;

/// Progress events of a run; slow watchers miss the oldest.
#[derive(Debug, Clone)]
pub struct Events(broadcast::Sender<pb::RunEvent>);

impl Events {
    /// A channel keeping the latest `capacity` events for slow watchers.
    pub fn new(capacity: usize) -> Self {
        Self(broadcast::channel(capacity).0)
    }

    /// A new watcher, seeing events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<pb::RunEvent> {
        self.0.subscribe()
    }

    fn emit(&self, event: pb::run_event::Event) {
        // Dropped when nobody watches.
        let _ = self.0.send(pb::RunEvent {
            at: Some(convert::now()),
            event: Some(event),
        });
    }

    /// The run's status changed.
    pub fn run_status(&self, status: RunStatus) {
        self.emit(pb::run_event::Event::RunStatus(
            pb::RunStatus::from(status) as i32
        ));
    }

    /// An iteration's status changed (`error` says why when it failed, or what is retried).
    pub fn iteration(&self, iteration: u32, status: IterationStatus, error: &str) {
        self.emit(pb::run_event::Event::Iteration(
            pb::IterationStatusChanged {
                iteration,
                status: pb::IterationStatus::from(status) as i32,
                error: error.to_string(),
            },
        ));
    }

    /// An optimizer step of iteration `iteration` committed.
    pub fn step(&self, iteration: u32, stats: &StepStats, learning_rate: f64, step_ms: f64) {
        self.emit(pb::run_event::Event::Step(pb::TrainStep {
            iteration,
            step: stats.step,
            loss: stats.loss,
            loss_supervised: stats.loss_supervised,
            loss_contrastive: stats.loss_contrastive,
            entropy: stats.entropy,
            grad_norm: stats.grad_norm,
            learning_rate,
            tokens_per_second: stats.tokens as f64 / (step_ms / 1e3).max(1e-9),
            step_ms,
        }));
    }

    /// A new model version was registered.
    pub fn checkpoint(&self, version: &ModelVersion) {
        self.emit(pb::run_event::Event::Checkpoint(version_to_pb(
            version, None,
        )));
    }

    /// A generator now serves `version` instead of `previous` (the swap took `total_ms`).
    pub fn swap(&self, generator: &str, version: &str, previous: &str, total_ms: f64) {
        self.emit(pb::run_event::Event::Swap(pb::SwapDone {
            generator: generator.to_string(),
            version: version.to_string(),
            previous_version: previous.to_string(),
            total_ms,
        }));
    }

    /// Evaluation of one task of `version` at iteration `iteration` finished.
    pub fn eval(&self, iteration: u32, version: &str, eval: &TaskEval) {
        let accuracy = convert::task_accuracy(eval);
        self.emit(pb::run_event::Event::Eval(pb::EvalDone {
            iteration,
            model_version: version.to_string(),
            predicted_counts: accuracy.predicted_counts.clone(),
            accuracy: Some(accuracy),
        }));
    }
}

/// A model version on the wire (`parent`: its parent's name, when known).
pub fn version_to_pb(v: &ModelVersion, parent: Option<&str>) -> pb::ModelVersion {
    pb::ModelVersion {
        version: v.name.clone(),
        run_id: v.run_id.map(|r| r.to_string()).unwrap_or_default(),
        iteration: v.iteration.unwrap_or(0) as u32,
        parent_version: parent.unwrap_or_default().to_string(),
        checkpoint_uri: v.checkpoint_uri.clone(),
        sha256: v.sha256.clone(),
        created_at: Some(convert::timestamp(v.created_at)),
        metrics: v
            .metrics
            .as_object()
            .map(|o| {
                o.iter()
                    .filter_map(|(k, v)| v.as_f64().map(|x| (k.clone(), x)))
                    .collect()
            })
            .unwrap_or_default(),
    }
}
