//! The trainer's committed state: which optimizer step a run has reached and the snapshot
//! that holds its weights and optimizer moments.
//!
//! [`Store::commit_training`] marks the batches behind new steps done and advances the
//! state in one transaction, compare-and-set on the step, so a batch is applied exactly
//! once and two trainers cannot both advance a run.

use chrono::{DateTime, Utc};
use serde_json::Value;
use uuid::Uuid;

use crate::error::{db_error, validate_non_negative, validate_sha256, Result, StoreError};
use crate::Store;

/// A run's committed training state.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct TrainerState {
    /// The run.
    pub run_id: Uuid,
    /// Optimizer steps committed.
    pub step: i64,
    /// The iteration the last step belongs to.
    pub iteration: i32,
    /// Where the snapshot lives.
    pub state_uri: String,
    /// SHA-256 of the snapshot's manifest.
    pub sha256: String,
    /// The trainer that committed it.
    pub owner: String,
    /// When it was committed.
    pub updated_at: DateTime<Utc>,
}

/// The state to commit.
#[derive(Debug, Clone, PartialEq)]
pub struct NewTrainerState {
    /// The run.
    pub run_id: Uuid,
    /// Optimizer steps done, including the new ones.
    pub step: i64,
    /// The iteration of the last step.
    pub iteration: i32,
    /// Where the snapshot lives.
    pub state_uri: String,
    /// SHA-256 of the snapshot's manifest.
    pub sha256: String,
    /// The committing trainer; it must hold the batches' leases.
    pub owner: String,
}

/// Optimizer steps and mean loss of one iteration.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct IterationTraining {
    /// The iteration.
    pub iteration: i32,
    /// Batches (optimizer steps) done.
    pub steps: i64,
    /// Batches in the iteration.
    pub batches: i64,
    /// Mean loss over the done steps.
    pub mean_loss: Option<f64>,
}

impl Store {
    /// The run's committed training state, if any step was committed.
    #[tracing::instrument(name = "Fetching trainer state", skip(self))]
    pub async fn trainer_state(&self, run_id: Uuid) -> Result<Option<TrainerState>> {
        Ok(
            sqlx::query_as::<_, TrainerState>("SELECT * FROM trainer_states WHERE run_id = $1")
                .bind(run_id)
                .fetch_optional(self.pool())
                .await?,
        )
    }

    /// Marks `batches` (id and the progress it produced) done and moves the run's state
    /// from step `expected_step` (`None`: no state yet) to `state`, in one transaction.
    ///
    /// Fails with [`StoreError::Conflict`] when the state is not at `expected_step`
    /// (another trainer moved on) or when a lease is not held; then nothing changes.
    #[tracing::instrument(name = "Committing training steps", skip(self, state, batches), fields(run_id = %state.run_id, step = state.step))]
    pub async fn commit_training(
        &self,
        state: &NewTrainerState,
        expected_step: Option<i64>,
        batches: &[(i64, Value)],
    ) -> Result<TrainerState> {
        validate_non_negative("step", state.step)?;
        validate_non_negative("iteration", state.iteration.into())?;
        validate_sha256("sha256", &state.sha256)?;
        if state.owner.is_empty() {
            return Err(StoreError::Invalid("owner must not be empty".into()));
        }
        if expected_step.is_some_and(|e| e > state.step) {
            return Err(StoreError::Invalid(format!(
                "step {} is behind the expected step {:?}",
                state.step, expected_step
            )));
        }
        let mut tx = self.pool().begin().await?;
        for (batch_id, progress) in batches {
            Store::complete_batch(&mut tx, *batch_id, &state.owner, progress).await?;
        }
        let stored = sqlx::query_as::<_, TrainerState>(
            "INSERT INTO trainer_states (run_id, step, iteration, state_uri, sha256, owner)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (run_id) DO UPDATE
                 SET step = EXCLUDED.step, iteration = EXCLUDED.iteration,
                     state_uri = EXCLUDED.state_uri, sha256 = EXCLUDED.sha256,
                     owner = EXCLUDED.owner, updated_at = now()
                 WHERE trainer_states.step = $7
             RETURNING *",
        )
        .bind(state.run_id)
        .bind(state.step)
        .bind(state.iteration)
        .bind(&state.state_uri)
        .bind(&state.sha256)
        .bind(&state.owner)
        .bind(expected_step)
        .fetch_optional(&mut *tx)
        .await
        .map_err(db_error("committing the trainer state"))?;
        let Some(stored) = stored else {
            let current: Option<i64> =
                sqlx::query_scalar("SELECT step FROM trainer_states WHERE run_id = $1")
                    .bind(state.run_id)
                    .fetch_optional(&mut *tx)
                    .await?;
            return Err(StoreError::Conflict(format!(
                "the training state of run {} is at step {}, not {}; another trainer moved \
                 it on, so discard this work and resume from the stored state",
                state.run_id,
                current.map_or_else(|| "none".into(), |s| s.to_string()),
                expected_step.map_or_else(|| "none".into(), |s| s.to_string()),
            )));
        };
        tx.commit().await?;
        Ok(stored)
    }

    /// Steps done, batches and mean loss of each iteration of a run that has batches.
    #[tracing::instrument(name = "Summarising training", skip(self))]
    pub async fn training_summary(&self, run_id: Uuid) -> Result<Vec<IterationTraining>> {
        Ok(sqlx::query_as::<_, IterationTraining>(
            "SELECT iteration,
                    count(*) FILTER (WHERE status = 'done') AS steps,
                    count(*) AS batches,
                    avg((progress ->> 'loss')::float8) FILTER (WHERE status = 'done') AS mean_loss
             FROM training_batches WHERE run_id = $1
             GROUP BY iteration ORDER BY iteration",
        )
        .bind(run_id)
        .fetch_all(self.pool())
        .await?)
    }
}
