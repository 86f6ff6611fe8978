//! Runs: one HIR training run, and the tasks it samples from.

use chrono::{DateTime, Utc};
use serde_json::Value;
use uuid::Uuid;

use crate::error::{db_error, Result, StoreError};
use crate::Store;

pub use hir_core::status::RunStatus;

impl Run {
    /// The run's configuration as stored with it.
    pub fn config(&self) -> Result<hir_core::run::RunConfig> {
        serde_json::from_value(self.config.clone()).map_err(|e| {
            StoreError::Corrupt(format!("run {} has an unreadable config: {e}", self.id))
        })
    }
}

/// A run to create. The caller picks the id, so creation can be retried.
#[derive(Debug, Clone, PartialEq)]
pub struct NewRun {
    /// Identifier chosen by the caller.
    pub id: Uuid,
    /// Human-readable name.
    pub name: String,
    /// Relabel policy the run trains with.
    pub policy: String,
    /// Full run configuration.
    pub config: Value,
}

/// A stored run.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct Run {
    /// Identifier chosen by the caller.
    pub id: Uuid,
    /// Human-readable name.
    pub name: String,
    /// Relabel policy the run trains with.
    pub policy: String,
    /// Full run configuration.
    pub config: Value,
    /// Current status.
    #[sqlx(try_from = "String")]
    pub status: RunStatus,
    /// Why the run failed or stopped, if it did.
    pub error: Option<String>,
    /// When the run was created.
    pub created_at: DateTime<Utc>,
    /// When the run last changed.
    pub updated_at: DateTime<Utc>,
}

impl Store {
    /// Creates a run, or returns the stored one when a run with this id exists
    /// with the same name, policy and config.
    ///
    /// Fails with [`StoreError::Conflict`] when the id is taken by a run with
    /// different contents.
    #[tracing::instrument(name = "Creating run", skip(self, run), fields(run_id = %run.id))]
    pub async fn create_run(&self, run: &NewRun) -> Result<Run> {
        if run.name.trim().is_empty() {
            return Err(StoreError::Invalid("run name must not be empty".into()));
        }
        sqlx::query(
            "INSERT INTO runs (id, name, policy, config) VALUES ($1, $2, $3, $4)
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(run.id)
        .bind(&run.name)
        .bind(&run.policy)
        .bind(&run.config)
        .execute(self.pool())
        .await
        .map_err(db_error("creating a run"))?;

        let stored = self.get_run(run.id).await?;
        if stored.name != run.name || stored.policy != run.policy || stored.config != run.config {
            return Err(StoreError::Conflict(format!(
                "run {} already exists with a different name, policy or config \
                 (stored name {:?}, policy {:?}); pick a new run id",
                run.id, stored.name, stored.policy
            )));
        }
        Ok(stored)
    }

    /// Fetches a run by id.
    #[tracing::instrument(name = "Fetching run", skip(self))]
    pub async fn get_run(&self, run_id: Uuid) -> Result<Run> {
        sqlx::query_as::<_, Run>("SELECT * FROM runs WHERE id = $1")
            .bind(run_id)
            .fetch_optional(self.pool())
            .await?
            .ok_or_else(|| StoreError::NotFound {
                what: format!("run {run_id}"),
            })
    }

    /// Sets a run's status and error message (pass `None` to clear the error).
    #[tracing::instrument(name = "Setting run status", skip(self, error))]
    pub async fn set_run_status(
        &self,
        run_id: Uuid,
        status: RunStatus,
        error: Option<&str>,
    ) -> Result<Run> {
        sqlx::query_as::<_, Run>(
            "UPDATE runs SET status = $2, error = $3, updated_at = now()
             WHERE id = $1 RETURNING *",
        )
        .bind(run_id)
        .bind(status.as_str())
        .bind(error)
        .fetch_optional(self.pool())
        .await?
        .ok_or_else(|| StoreError::NotFound {
            what: format!("run {run_id}"),
        })
    }

    /// Attaches tasks to a run. Tasks already attached are left alone.
    #[tracing::instrument(name = "Adding tasks to run", skip(self))]
    pub async fn add_run_tasks(&self, run_id: Uuid, task_ids: &[i64]) -> Result<()> {
        sqlx::query(
            "INSERT INTO run_tasks (run_id, task_id)
             SELECT $1, t FROM UNNEST($2::int8[]) AS t
             ON CONFLICT DO NOTHING",
        )
        .bind(run_id)
        .bind(task_ids)
        .execute(self.pool())
        .await
        .map_err(db_error("adding tasks to a run"))?;
        Ok(())
    }

    /// The ids of the tasks attached to a run, in ascending order.
    #[tracing::instrument(name = "Listing run tasks", skip(self))]
    pub async fn run_task_ids(&self, run_id: Uuid) -> Result<Vec<i64>> {
        let ids =
            sqlx::query_scalar("SELECT task_id FROM run_tasks WHERE run_id = $1 ORDER BY task_id")
                .bind(run_id)
                .fetch_all(self.pool())
                .await?;
        Ok(ids)
    }

    /// Every run in `status`, oldest first: what a restarted trainer drives again.
    #[tracing::instrument(name = "Listing runs by status", skip(self))]
    pub async fn runs_with_status(&self, status: RunStatus) -> Result<Vec<Run>> {
        Ok(
            sqlx::query_as::<_, Run>(
                "SELECT * FROM runs WHERE status = $1 ORDER BY created_at, id",
            )
            .bind(status.as_str())
            .fetch_all(self.pool())
            .await?,
        )
    }
}
