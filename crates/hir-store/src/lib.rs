//! Postgres relabel store for Hindsight Instruction Relabeling (HIR).
//!
//! The store records everything a run produces, so that it can be resumed and
//! audited:
//!
//! - [`runs`]: runs and the tasks they use;
//! - [`catalog`]: registering BIG-bench tasks and served model versions, loading a run's
//!   tasks back;
//! - [`tasks`]: BIG-bench tasks and their examples with the train/test split;
//! - [`iterations`]: the sample → relabel → train → evaluate rounds of a run,
//!   advanced by compare-and-set;
//! - [`versions`]: model checkpoints, bound to one checksum per name;
//! - [`samples`]: scored outputs with their hindsight relabels, written in bulk;
//! - [`batches`]: a training work queue with leases;
//! - [`training`]: the trainer's committed state (step and snapshot);
//! - [`evals`]: evaluation results and accuracy;
//! - [`feedback`]: relabeled tuples submitted by other systems.
//!
//! Every write is idempotent: retrying it after a timeout never doubles a row.
//! The schema lives in the workspace's `migrations/` folder and is embedded
//! in [`MIGRATOR`].
//!
//! ```no_run
//! # async fn demo() -> hir_store::Result<()> {
//! let store = hir_store::Store::connect("postgres://postgres@127.0.0.1:5432/hir").await?;
//! store.migrate().await?;
//! # Ok(())
//! # }
//! ```
#![forbid(unsafe_code)]

pub mod batches;
pub mod catalog;
mod error;
pub mod evals;
pub mod feedback;
pub mod iterations;
pub mod runs;
pub mod samples;
mod store;
pub mod tasks;
pub mod training;
pub mod versions;

pub use batches::{BatchPlan, BatchStatus, TrainingBatch};
pub use catalog::{RunTask, TaskCache};
pub use error::{Result, StoreError};
pub use evals::{EvalAccuracy, NewEvalResult, RunEvalItem};
pub use feedback::NewFeedback;
pub use iterations::{Iteration, IterationStatus};
pub use runs::{NewRun, Run, RunStatus};
pub use samples::{
    ExampleSampleCount, FinishReason, InsertedSamples, IterationAccuracy, NewRelabel,
    NewScoredSample, Relabel, Sample, SampleTotals,
};
pub use store::Store;
pub use tasks::{Example, NewExample, NewTask, SplitSide, Task, TaskKind};
pub use training::{IterationTraining, NewTrainerState, TrainerState};
pub use versions::{ModelVersion, NewModelVersion};

/// The store's schema migrations, embedded from the workspace's `migrations/` folder.
///
/// Run them with [`Store::migrate`], or hand them to
/// `#[sqlx::test(migrator = "hir_store::MIGRATOR")]` in tests.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations");
