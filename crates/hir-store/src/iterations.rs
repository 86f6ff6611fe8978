//! Iterations: the sample → relabel → train → evaluate rounds of a run.
//!
//! An iteration's status only moves through [`Store::advance_iteration`], a
//! compare-and-set: the caller states which statuses it expects to find, so
//! two workers can never both believe they moved the same iteration.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::error::{db_error, validate_non_negative, Result, StoreError};
use crate::text_enum::text_enum;
use crate::Store;

text_enum! {
    /// Where an iteration is in its round.
    pub enum IterationStatus {
        /// Created, nothing done yet.
        Pending => "pending",
        /// The generator is producing samples.
        Sampling => "sampling",
        /// All samples are scored, relabeled and stored.
        Sampled => "sampled",
        /// The trainer is consuming batches.
        Training => "training",
        /// The new model version is registered.
        Trained => "trained",
        /// The new model is being evaluated.
        Evaluating => "evaluating",
        /// Finished.
        Done => "done",
        /// Gave up; `error` says why.
        Failed => "failed",
    }
}

impl IterationStatus {
    /// Whether the iteration can no longer change (done or failed).
    pub fn is_terminal(self) -> bool {
        matches!(self, IterationStatus::Done | IterationStatus::Failed)
    }
}

/// A stored iteration.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct Iteration {
    /// The run it belongs to.
    pub run_id: Uuid,
    /// 0-based round number.
    pub iteration: i32,
    /// Current status.
    #[sqlx(try_from = "String")]
    pub status: IterationStatus,
    /// Why it failed, if it did.
    pub error: Option<String>,
    /// When it was created.
    pub started_at: DateTime<Utc>,
    /// When its status last changed.
    pub updated_at: DateTime<Utc>,
    /// When it reached done or failed.
    pub finished_at: Option<DateTime<Utc>>,
}

impl Store {
    /// Creates iteration `iteration` of a run in status pending, or returns it
    /// unchanged when it exists.
    #[tracing::instrument(name = "Ensuring iteration", skip(self))]
    pub async fn ensure_iteration(&self, run_id: Uuid, iteration: i32) -> Result<Iteration> {
        validate_non_negative("iteration", iteration.into())?;
        sqlx::query(
            "INSERT INTO iterations (run_id, iteration) VALUES ($1, $2)
             ON CONFLICT (run_id, iteration) DO NOTHING",
        )
        .bind(run_id)
        .bind(iteration)
        .execute(self.pool())
        .await
        .map_err(db_error("creating an iteration"))?;
        self.get_iteration(run_id, iteration).await
    }

    /// Fetches one iteration.
    #[tracing::instrument(name = "Fetching iteration", skip(self))]
    pub async fn get_iteration(&self, run_id: Uuid, iteration: i32) -> Result<Iteration> {
        sqlx::query_as::<_, Iteration>(
            "SELECT * FROM iterations WHERE run_id = $1 AND iteration = $2",
        )
        .bind(run_id)
        .bind(iteration)
        .fetch_optional(self.pool())
        .await?
        .ok_or_else(|| StoreError::NotFound {
            what: iteration_name(run_id, iteration),
        })
    }

    /// Every iteration, of any run, currently in `status`, oldest first: what a restarted
    /// service picks up again.
    #[tracing::instrument(name = "Listing iterations by status", skip(self))]
    pub async fn iterations_with_status(&self, status: IterationStatus) -> Result<Vec<Iteration>> {
        let rows = sqlx::query_as::<_, Iteration>(
            "SELECT * FROM iterations WHERE status = $1 ORDER BY started_at, run_id, iteration",
        )
        .bind(status.as_str())
        .fetch_all(self.pool())
        .await?;
        Ok(rows)
    }

    /// Every iteration of a run, in order.
    #[tracing::instrument(name = "Listing iterations of a run", skip(self))]
    pub async fn list_iterations(&self, run_id: Uuid) -> Result<Vec<Iteration>> {
        Ok(sqlx::query_as::<_, Iteration>(
            "SELECT * FROM iterations WHERE run_id = $1 ORDER BY iteration",
        )
        .bind(run_id)
        .fetch_all(self.pool())
        .await?)
    }

    /// Moves an iteration to `to` if its current status is one of `from`.
    ///
    /// Returns the updated iteration. Fails with
    /// [`StoreError::InvalidTransition`] when the current status is not in
    /// `from` (nothing is changed), and [`StoreError::NotFound`] when the
    /// iteration does not exist. Reaching done or failed sets `finished_at`.
    #[tracing::instrument(name = "Advancing iteration", skip(self))]
    pub async fn advance_iteration(
        &self,
        run_id: Uuid,
        iteration: i32,
        from: &[IterationStatus],
        to: IterationStatus,
    ) -> Result<Iteration> {
        self.transition(run_id, iteration, from, to, None).await
    }

    /// Marks an iteration failed with an error message, from any status but
    /// done. Failing an already failed iteration replaces its message.
    #[tracing::instrument(name = "Failing iteration", skip(self))]
    pub async fn fail_iteration(
        &self,
        run_id: Uuid,
        iteration: i32,
        error: &str,
    ) -> Result<Iteration> {
        let from: Vec<IterationStatus> = IterationStatus::ALL
            .iter()
            .copied()
            .filter(|s| *s != IterationStatus::Done)
            .collect();
        self.transition(
            run_id,
            iteration,
            &from,
            IterationStatus::Failed,
            Some(error),
        )
        .await
    }

    /// The compare-and-set behind [`Store::advance_iteration`] and
    /// [`Store::fail_iteration`].
    async fn transition(
        &self,
        run_id: Uuid,
        iteration: i32,
        from: &[IterationStatus],
        to: IterationStatus,
        error: Option<&str>,
    ) -> Result<Iteration> {
        let from_text: Vec<&str> = from.iter().map(|s| s.as_str()).collect();
        let updated = sqlx::query_as::<_, Iteration>(
            "UPDATE iterations
             SET status = $4,
                 error = $5,
                 updated_at = now(),
                 finished_at = CASE WHEN $4 IN ('done', 'failed') THEN now() ELSE NULL END
             WHERE run_id = $1 AND iteration = $2 AND status = ANY($3::text[])
             RETURNING *",
        )
        .bind(run_id)
        .bind(iteration)
        .bind(&from_text)
        .bind(to.as_str())
        .bind(error)
        .fetch_optional(self.pool())
        .await?;
        if let Some(updated) = updated {
            return Ok(updated);
        }
        // Nothing matched: explain whether the row is missing or elsewhere.
        let current = self.get_iteration(run_id, iteration).await?;
        Err(StoreError::InvalidTransition {
            entity: iteration_name(run_id, iteration),
            current: current.status.to_string(),
            requested: to.to_string(),
            expected: from_text.join(", "),
        })
    }
}

/// How iterations are named in error messages.
fn iteration_name(run_id: Uuid, iteration: i32) -> String {
    format!("iteration {iteration} of run {run_id}")
}
