//! Model versions: checkpoints, each name bound to one checksum forever.

use chrono::{DateTime, Utc};
use serde_json::Value;
use uuid::Uuid;

use crate::error::{db_error, validate_non_negative, validate_sha256, Result, StoreError};
use crate::Store;

/// A model version to register.
#[derive(Debug, Clone, PartialEq)]
pub struct NewModelVersion {
    /// Opaque version string the generator reports.
    pub name: String,
    /// Run that trained it; `None` for a base model.
    pub run_id: Option<Uuid>,
    /// Iteration that trained it; `None` for a base model.
    pub iteration: Option<i32>,
    /// The version it was trained from.
    pub parent_id: Option<i64>,
    /// Where the checkpoint lives, e.g. `file:///ckpt/it3` or `s3://...`.
    pub checkpoint_uri: String,
    /// SHA-256 of the checkpoint, 64 lowercase hex digits.
    pub sha256: String,
    /// Training metrics recorded with the checkpoint.
    pub metrics: Value,
}

/// A stored model version.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct ModelVersion {
    /// Surrogate key, referenced by samples and evaluation results.
    pub id: i64,
    /// Opaque version string the generator reports.
    pub name: String,
    /// Run that trained it.
    pub run_id: Option<Uuid>,
    /// Iteration that trained it.
    pub iteration: Option<i32>,
    /// The version it was trained from.
    pub parent_id: Option<i64>,
    /// Where the checkpoint lives.
    pub checkpoint_uri: String,
    /// SHA-256 of the checkpoint.
    pub sha256: String,
    /// Training metrics.
    pub metrics: Value,
    /// When it was registered.
    pub created_at: DateTime<Utc>,
}

impl Store {
    /// Registers a model version, or returns the stored one when the name is
    /// already registered with the same sha256.
    ///
    /// Fails with [`StoreError::Conflict`] when the name is registered with a
    /// different sha256: a version name must always denote the same weights.
    #[tracing::instrument(name = "Registering model version", skip(self, version), fields(version = %version.name))]
    pub async fn register_model_version(&self, version: &NewModelVersion) -> Result<ModelVersion> {
        if version.name.trim().is_empty() {
            return Err(StoreError::Invalid(
                "model version name must not be empty".into(),
            ));
        }
        validate_sha256("sha256", &version.sha256)?;
        if let Some(iteration) = version.iteration {
            validate_non_negative("iteration", iteration.into())?;
        }
        sqlx::query(
            "INSERT INTO model_versions
                 (name, run_id, iteration, parent_id, checkpoint_uri, sha256, metrics)
             VALUES ($1, $2, $3, $4, $5, $6, $7)
             ON CONFLICT (name) DO NOTHING",
        )
        .bind(&version.name)
        .bind(version.run_id)
        .bind(version.iteration)
        .bind(version.parent_id)
        .bind(&version.checkpoint_uri)
        .bind(&version.sha256)
        .bind(&version.metrics)
        .execute(self.pool())
        .await
        .map_err(db_error("registering a model version"))?;

        let stored = self.get_model_version_by_name(&version.name).await?;
        if stored.sha256 != version.sha256 {
            return Err(StoreError::Conflict(format!(
                "model version {:?} is already registered with sha256 {}, not {}; \
                 register the new checkpoint under a new name",
                version.name, stored.sha256, version.sha256
            )));
        }
        Ok(stored)
    }

    /// Fetches a model version by its name.
    #[tracing::instrument(name = "Fetching model version", skip(self))]
    pub async fn get_model_version_by_name(&self, name: &str) -> Result<ModelVersion> {
        sqlx::query_as::<_, ModelVersion>("SELECT * FROM model_versions WHERE name = $1")
            .bind(name)
            .fetch_optional(self.pool())
            .await?
            .ok_or_else(|| StoreError::NotFound {
                what: format!("model version {name:?}"),
            })
    }

    /// Fetches a model version by its id.
    #[tracing::instrument(name = "Fetching model version by id", skip(self))]
    pub async fn get_model_version(&self, id: i64) -> Result<ModelVersion> {
        sqlx::query_as::<_, ModelVersion>("SELECT * FROM model_versions WHERE id = $1")
            .bind(id)
            .fetch_optional(self.pool())
            .await?
            .ok_or_else(|| StoreError::NotFound {
                what: format!("model version {id}"),
            })
    }

    /// The version run `run_id` samples from in iteration `iteration`: the one it trained
    /// in its latest earlier iteration, else the starting model its iteration 0 evaluated;
    /// `None` when it has neither yet.
    #[tracing::instrument(name = "Finding a run's current version", skip(self))]
    pub async fn run_version_before(
        &self,
        run_id: Uuid,
        iteration: i32,
    ) -> Result<Option<ModelVersion>> {
        let trained = sqlx::query_as::<_, ModelVersion>(
            "SELECT * FROM model_versions WHERE run_id = $1 AND iteration < $2
             ORDER BY iteration DESC LIMIT 1",
        )
        .bind(run_id)
        .bind(iteration)
        .fetch_optional(self.pool())
        .await?;
        if trained.is_some() {
            return Ok(trained);
        }
        Ok(sqlx::query_as::<_, ModelVersion>(
            "SELECT v.* FROM model_versions v
             WHERE v.id = (SELECT model_version_id FROM eval_results
                           WHERE run_id = $1 AND iteration = 0 LIMIT 1)",
        )
        .bind(run_id)
        .fetch_optional(self.pool())
        .await?)
    }

    /// Model versions, newest first; only `run_id`'s when given.
    #[tracing::instrument(name = "Listing model versions", skip(self))]
    pub async fn list_model_versions(&self, run_id: Option<Uuid>) -> Result<Vec<ModelVersion>> {
        Ok(sqlx::query_as::<_, ModelVersion>(
            "SELECT * FROM model_versions WHERE $1::uuid IS NULL OR run_id = $1
             ORDER BY created_at DESC, id DESC",
        )
        .bind(run_id)
        .fetch_all(self.pool())
        .await?)
    }
}
