//! Iterations: the sample → relabel → train → evaluate rounds of a run.
//!
//! An iteration's status only moves along [`TRANSITIONS`], through one compare-and-set
//! ([`Store::advance_iteration`], [`Store::fail_iteration`], [`Store::resume_iteration`]):
//! the statuses an iteration may come from are read off the table, so two workers can
//! never both believe they moved the same iteration, and no caller keeps its own idea of
//! which moves are legal.
//!
//! ```text
//! pending ─► sampling ─► sampled ─► training ─► trained ─► evaluating ─► done
//!    └────────────────────────────────────────────────────────┘ (iteration 0: the base model)
//! any but done ─► failed ─► pending | training | trained | evaluating (resume)
//! ```

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::error::{db_error, validate_non_negative, Result, StoreError};
use crate::Store;

pub use hir_core::status::IterationStatus;
use IterationStatus as S;

/// Every forward move of an iteration, as `(from, to)`. A worker that already holds the
/// status it asks for (a restarted relabeler re-claiming sampling, a trainer resuming its
/// training) finds it again; failing and resuming have their own rules below.
pub const TRANSITIONS: &[(IterationStatus, IterationStatus)] = &[
    (S::Pending, S::Sampling),
    (S::Sampling, S::Sampling),
    (S::Sampling, S::Sampled),
    (S::Sampled, S::Training),
    (S::Training, S::Training),
    (S::Sampled, S::Trained),
    (S::Training, S::Trained),
    (S::Trained, S::Evaluating),
    // Iteration 0 evaluates the starting model: there is nothing to sample or train.
    (S::Pending, S::Evaluating),
    (S::Evaluating, S::Done),
];

/// The statuses a failed iteration may go back to when its run resumes: the start of the
/// last stage it had not completed.
pub const RESUME_TO: &[IterationStatus] = &[S::Pending, S::Training, S::Trained, S::Evaluating];

/// The statuses from which an iteration may move to `to`, in declaration order.
pub fn sources(to: IterationStatus) -> Vec<IterationStatus> {
    match to {
        S::Failed => IterationStatus::ALL
            .iter()
            .copied()
            .filter(|s| *s != S::Done)
            .collect(),
        _ => IterationStatus::ALL
            .iter()
            .copied()
            .filter(|from| TRANSITIONS.contains(&(*from, to)))
            .collect(),
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
    /// The version it samples from, pinned when sampling first starts.
    pub model_version_id: Option<i64>,
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

    /// Pins the version iteration `iteration` samples from: the first caller's
    /// `version_id` stays, later callers get it back. Every sample of the iteration is then
    /// asked of that version, however often its sampling resumes.
    #[tracing::instrument(name = "Pinning an iteration's version", skip(self))]
    pub async fn pin_iteration_version(
        &self,
        run_id: Uuid,
        iteration: i32,
        version_id: i64,
    ) -> Result<i64> {
        let pinned: Option<Option<i64>> = sqlx::query_scalar(
            "UPDATE iterations SET model_version_id = COALESCE(model_version_id, $3)
             WHERE run_id = $1 AND iteration = $2
             RETURNING model_version_id",
        )
        .bind(run_id)
        .bind(iteration)
        .bind(version_id)
        .fetch_optional(self.pool())
        .await
        .map_err(db_error("pinning an iteration's version"))?;
        pinned.flatten().ok_or_else(|| StoreError::NotFound {
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

    /// Moves an iteration to `to` along [`TRANSITIONS`].
    ///
    /// Returns the updated iteration. Fails with [`StoreError::InvalidTransition`] when the
    /// current status cannot move to `to` (nothing is changed), and
    /// [`StoreError::NotFound`] when the iteration does not exist. Reaching done sets
    /// `finished_at`.
    #[tracing::instrument(name = "Advancing iteration", skip(self))]
    pub async fn advance_iteration(
        &self,
        run_id: Uuid,
        iteration: i32,
        to: IterationStatus,
    ) -> Result<Iteration> {
        if to == S::Failed {
            return Err(StoreError::Invalid(
                "an iteration fails through fail_iteration, which records why".into(),
            ));
        }
        self.transition(run_id, iteration, &sources(to), to, None)
            .await
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
        self.transition(
            run_id,
            iteration,
            &sources(S::Failed),
            S::Failed,
            Some(error),
        )
        .await
    }

    /// Moves a failed iteration back to `to`, one of [`RESUME_TO`], clearing its error.
    #[tracing::instrument(name = "Resuming iteration", skip(self))]
    pub async fn resume_iteration(
        &self,
        run_id: Uuid,
        iteration: i32,
        to: IterationStatus,
    ) -> Result<Iteration> {
        if !RESUME_TO.contains(&to) {
            return Err(StoreError::Invalid(format!(
                "a failed iteration resumes to one of {RESUME_TO:?}, not {to}"
            )));
        }
        self.transition(run_id, iteration, &[S::Failed], to, None)
            .await
    }

    /// The compare-and-set behind every status change.
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
