//! Training batches: a work queue with leases, kept in Postgres.
//!
//! 1. [`Store::create_batches`] cuts an iteration's samples (optionally with
//!    every earlier sample of the run, as a replay buffer) into batches.
//! 2. Trainers call [`Store::lease_batches`], which hands each pending batch
//!    — or one whose lease has expired — to exactly one caller, using
//!    `FOR UPDATE SKIP LOCKED` so concurrent trainers never wait on or share
//!    a batch.
//! 3. A trainer reads the batch ([`Store::batch_sample_ids`]), trains, and
//!    calls [`Store::complete_batch`] inside its own transaction, so that the
//!    batch is marked done if and only if the trainer's progress commits.
//!    A trainer that gives up calls [`Store::release_batch`].

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{Postgres, Transaction};
use std::time::Duration;
use uuid::Uuid;

use crate::error::{db_error, validate_non_negative, Result, StoreError};
use crate::Store;

hir_core::text_enum! {
    /// Where a batch is in the queue.
    pub enum BatchStatus {
        /// Waiting for a trainer.
        Pending => "pending",
        /// Held by a trainer until `lease_expires_at`.
        Leased => "leased",
        /// Trained on; `progress` holds what the trainer recorded.
        Done => "done",
    }
}

/// A stored training batch.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct TrainingBatch {
    /// Surrogate key.
    pub id: i64,
    /// The run.
    pub run_id: Uuid,
    /// The iteration that trains on it.
    pub iteration: i32,
    /// Position of the batch within the iteration, 0-based.
    pub batch_idx: i32,
    /// Queue status.
    #[sqlx(try_from = "String")]
    pub status: BatchStatus,
    /// Trainer holding (or last holding) the batch.
    pub lease_owner: Option<String>,
    /// When the current lease ends.
    pub lease_expires_at: Option<DateTime<Utc>>,
    /// How many times the batch was leased.
    pub attempts: i32,
    /// What the trainer recorded when it completed the batch.
    pub progress: Option<Value>,
    /// When the batch was created.
    pub created_at: DateTime<Utc>,
    /// When the batch was completed.
    pub done_at: Option<DateTime<Utc>>,
}

/// How [`Store::create_batches`] cuts an iteration's samples into batches.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchPlan {
    /// Samples per batch (the effective batch size of one optimizer step).
    pub batch_size: i32,
    /// Also use every earlier iteration's samples (a replay buffer).
    pub include_replay: bool,
    /// Only samples with a relabel under this policy.
    pub policy: Option<String>,
    /// Passes over the samples.
    pub epochs: i32,
    /// Shuffle each pass with this seed; `None` keeps sample-id order.
    pub shuffle_seed: Option<i64>,
    /// Keep only the first this many batches.
    pub max_batches: Option<i32>,
    /// Keep one sample per distinct output text of a prompt in an iteration (the lowest
    /// sample index), as the reference's `list(set(outputs))`.
    pub dedup_outputs: bool,
    /// Share of the pool held out (not trained) each iteration, rounded up: the
    /// reference's `train_test_split(test_size=0.1)` over its replay buffer.
    pub holdout: f64,
    /// Train on at most this many samples of the pool per iteration (after the holdout):
    /// the reference's `idx < 4·⌊0.8N⌋`.
    pub max_samples: Option<i64>,
}

impl BatchPlan {
    /// One pass in sample-id order over all of the iteration's samples.
    pub fn new(batch_size: i32) -> Self {
        Self {
            batch_size,
            include_replay: false,
            policy: None,
            epochs: 1,
            shuffle_seed: None,
            max_batches: None,
            dedup_outputs: false,
            holdout: 0.0,
            max_samples: None,
        }
    }
}

impl Store {
    /// Cuts the samples chosen by `plan` into batches for an iteration and
    /// returns the iteration's batches ordered by `batch_idx`.
    ///
    /// The pool is the iteration's own samples or, with `plan.include_replay`,
    /// all of the run's samples from iterations `0..=iteration`; with
    /// `plan.policy` only samples relabeled under that policy; with
    /// `plan.dedup_outputs` one sample per distinct output of a prompt and
    /// iteration. The pool is then ordered (by sample id, or shuffled with
    /// `plan.shuffle_seed`), its first `ceil(holdout · n)` samples are held out
    /// and at most `plan.max_samples` of the rest are kept. Each of `plan.epochs`
    /// passes orders the kept samples by sample id, or shuffles them (a different
    /// order per epoch), and cuts them every `batch_size` rows; batches are
    /// numbered across epochs. `plan.max_batches` keeps only the first batches.
    ///
    /// Shuffles hash the seed with each sample's natural key (task name,
    /// iteration, example, sample index), never its id, so the same samples give
    /// the same batches whatever order they were written in.
    ///
    /// Idempotent: when the iteration already has batches they are returned
    /// unchanged (samples stored since are not added). The iteration must exist.
    #[tracing::instrument(name = "Creating training batches", skip(self))]
    pub async fn create_batches(
        &self,
        run_id: Uuid,
        iteration: i32,
        plan: &BatchPlan,
    ) -> Result<Vec<TrainingBatch>> {
        validate_non_negative("iteration", iteration.into())?;
        if plan.batch_size <= 0 {
            return Err(StoreError::Invalid(format!(
                "batch_size must be > 0, got {}",
                plan.batch_size
            )));
        }
        if plan.epochs <= 0 {
            return Err(StoreError::Invalid(format!(
                "epochs must be > 0, got {}",
                plan.epochs
            )));
        }
        if !(0.0..1.0).contains(&plan.holdout) {
            return Err(StoreError::Invalid(format!(
                "holdout must be in [0, 1), got {}",
                plan.holdout
            )));
        }
        if plan.max_samples.is_some_and(|m| m <= 0) {
            return Err(StoreError::Invalid(format!(
                "max_samples must be > 0 when set, got {:?}",
                plan.max_samples
            )));
        }
        if plan.max_batches.is_some_and(|m| m <= 0) {
            return Err(StoreError::Invalid(format!(
                "max_batches must be > 0 when set, got {:?}",
                plan.max_batches
            )));
        }
        let mut tx = self.pool().begin().await?;

        // Serialize concurrent creators of the same iteration's batches.
        let exists: Option<i32> = sqlx::query_scalar(
            "SELECT iteration FROM iterations WHERE run_id = $1 AND iteration = $2 FOR UPDATE",
        )
        .bind(run_id)
        .bind(iteration)
        .fetch_optional(&mut *tx)
        .await?;
        if exists.is_none() {
            return Err(StoreError::NotFound {
                what: format!("iteration {iteration} of run {run_id} (call ensure_iteration)"),
            });
        }

        let already: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM training_batches WHERE run_id = $1 AND iteration = $2)",
        )
        .bind(run_id)
        .bind(iteration)
        .fetch_one(&mut *tx)
        .await?;

        if !already {
            // Number the chosen samples within each epoch (by id, or by a seeded hash),
            // cut every batch_size rows, create one batch per cut, then attach the
            // samples to their batch.
            sqlx::query(
                "WITH candidates AS (
                     SELECT s.id, s.iteration, s.task_id, s.example_idx, s.sample_idx, s.output,
                            t.name || ':' || s.iteration || ':' || s.example_idx || ':'
                              || s.sample_idx AS key
                     FROM samples s JOIN tasks t ON t.id = s.task_id
                     WHERE s.run_id = $1
                       AND (s.iteration = $2 OR ($4 AND s.iteration < $2))
                       AND ($5::text IS NULL OR EXISTS (
                           SELECT 1 FROM relabels r WHERE r.sample_id = s.id AND r.policy = $5))
                 ),
                 pool AS (
                     SELECT id, key FROM (
                         SELECT id, key, row_number() OVER (
                                    PARTITION BY iteration, task_id, example_idx,
                                        CASE WHEN $9 THEN output ELSE sample_idx::text END
                                    ORDER BY sample_idx) AS copy
                         FROM candidates) c
                     WHERE copy = 1
                 ),
                 ranked AS (
                     SELECT id, key,
                            row_number() OVER (
                                ORDER BY CASE WHEN $6::int8 IS NULL THEN ''
                                         ELSE md5($6::text || ':pool:' || $2 || ':' || key) END,
                                         CASE WHEN $6::int8 IS NULL THEN id ELSE 0 END,
                                         key) AS r,
                            count(*) OVER () AS n
                     FROM pool
                 ),
                 kept_pool AS (
                     SELECT id, key FROM ranked
                     WHERE r > ceil(n * $10::float8)
                       AND ($11::int8 IS NULL OR r - ceil(n * $10::float8) <= $11)
                 ),
                 per_epoch AS (
                     SELECT ((count(*) + $3 - 1) / $3) AS n FROM kept_pool
                 ),
                 chosen AS (
                     SELECT kp.id,
                            e.epoch * per_epoch.n
                              + ((row_number() OVER (
                                    PARTITION BY e.epoch
                                    ORDER BY CASE WHEN $6::int8 IS NULL THEN ''
                                             ELSE md5($6::text || ':' || e.epoch || ':' || kp.key)
                                             END,
                                             CASE WHEN $6::int8 IS NULL THEN kp.id ELSE 0 END,
                                             kp.key)) - 1) / $3 AS batch_idx
                     FROM kept_pool kp
                     CROSS JOIN generate_series(0, $7 - 1) AS e(epoch)
                     CROSS JOIN per_epoch
                 ),
                 kept AS (
                     SELECT id, batch_idx FROM chosen
                     WHERE $8::int8 IS NULL OR batch_idx < $8
                 ),
                 created AS (
                     INSERT INTO training_batches (run_id, iteration, batch_idx)
                     SELECT DISTINCT $1, $2, batch_idx::int4 FROM kept
                     RETURNING id, batch_idx
                 )
                 INSERT INTO batch_samples (batch_id, sample_id)
                 SELECT created.id, kept.id
                 FROM kept JOIN created ON created.batch_idx = kept.batch_idx",
            )
            .bind(run_id)
            .bind(iteration)
            .bind(i64::from(plan.batch_size))
            .bind(plan.include_replay)
            .bind(plan.policy.as_deref())
            .bind(plan.shuffle_seed)
            .bind(plan.epochs)
            .bind(plan.max_batches.map(i64::from))
            .bind(plan.dedup_outputs)
            .bind(plan.holdout)
            .bind(plan.max_samples)
            .execute(&mut *tx)
            .await
            .map_err(db_error("creating training batches"))?;
        }

        let batches = sqlx::query_as::<_, TrainingBatch>(
            "SELECT * FROM training_batches WHERE run_id = $1 AND iteration = $2 ORDER BY batch_idx",
        )
        .bind(run_id)
        .bind(iteration)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(batches)
    }

    /// Leases up to `max` batches of a run to `owner` for `lease`.
    ///
    /// Batches that are pending, or leased with an expired lease, are handed
    /// out lowest iteration and `batch_idx` first; each lease increments
    /// `attempts`. Batches locked by a concurrent caller are skipped, so two
    /// callers never receive the same batch. Returns the leased batches in
    /// queue order (empty when nothing is available).
    #[tracing::instrument(name = "Leasing training batches", skip(self))]
    pub async fn lease_batches(
        &self,
        run_id: Uuid,
        owner: &str,
        max: i64,
        lease: Duration,
    ) -> Result<Vec<TrainingBatch>> {
        if owner.is_empty() {
            return Err(StoreError::Invalid("lease owner must not be empty".into()));
        }
        if max <= 0 {
            return Err(StoreError::Invalid(format!("max must be > 0, got {max}")));
        }
        if lease.is_zero() {
            return Err(StoreError::Invalid("lease must be longer than zero".into()));
        }
        let mut batches = sqlx::query_as::<_, TrainingBatch>(
            "UPDATE training_batches
             SET status = 'leased',
                 lease_owner = $2,
                 lease_expires_at = clock_timestamp() + make_interval(secs => $4),
                 attempts = attempts + 1
             WHERE id IN (
                 SELECT id FROM training_batches
                 WHERE run_id = $1
                   AND (status = 'pending'
                        OR (status = 'leased' AND lease_expires_at < clock_timestamp()))
                 ORDER BY iteration, batch_idx
                 LIMIT $3
                 FOR UPDATE SKIP LOCKED
             )
             RETURNING *",
        )
        .bind(run_id)
        .bind(owner)
        .bind(max)
        .bind(lease.as_secs_f64())
        .fetch_all(self.pool())
        .await?;
        batches.sort_by_key(|b| (b.iteration, b.batch_idx));
        Ok(batches)
    }

    /// The ids of a batch's samples, in ascending order.
    #[tracing::instrument(name = "Reading batch samples", skip(self))]
    pub async fn batch_sample_ids(&self, batch_id: i64) -> Result<Vec<i64>> {
        let ids = sqlx::query_scalar(
            "SELECT sample_id FROM batch_samples WHERE batch_id = $1 ORDER BY sample_id",
        )
        .bind(batch_id)
        .fetch_all(self.pool())
        .await?;
        Ok(ids)
    }

    /// Marks a batch done with the trainer's `progress`, inside the caller's
    /// transaction.
    ///
    /// Succeeds only while `owner` holds an unexpired lease on the batch, so
    /// a trainer whose lease ran out (and whose batch may now be leased by
    /// someone else) cannot complete it. The change becomes visible when the
    /// caller commits; if the caller rolls back, the batch stays leased.
    /// Fails with [`StoreError::Conflict`] explaining why the lease is not
    /// held, or [`StoreError::NotFound`] for an unknown batch.
    #[tracing::instrument(name = "Completing training batch", skip(tx, progress))]
    pub async fn complete_batch(
        tx: &mut Transaction<'_, Postgres>,
        batch_id: i64,
        owner: &str,
        progress: &Value,
    ) -> Result<TrainingBatch> {
        // clock_timestamp(), not now(): now() is frozen at the start of the
        // caller's transaction, which may have begun long ago.
        let done = sqlx::query_as::<_, TrainingBatch>(
            "UPDATE training_batches
             SET status = 'done', progress = $3, done_at = clock_timestamp()
             WHERE id = $1 AND status = 'leased' AND lease_owner = $2
               AND lease_expires_at > clock_timestamp()
             RETURNING *",
        )
        .bind(batch_id)
        .bind(owner)
        .bind(progress)
        .fetch_optional(&mut **tx)
        .await?;
        if let Some(done) = done {
            return Ok(done);
        }

        let current =
            sqlx::query_as::<_, TrainingBatch>("SELECT * FROM training_batches WHERE id = $1")
                .bind(batch_id)
                .fetch_optional(&mut **tx)
                .await?
                .ok_or_else(|| StoreError::NotFound {
                    what: format!("training batch {batch_id}"),
                })?;
        Err(StoreError::Conflict(lease_problem(&current, owner)))
    }

    /// Gives a leased batch back to the queue before its lease ends.
    ///
    /// Fails with [`StoreError::Conflict`] when `owner` does not hold the
    /// batch (it is pending, done, or leased by someone else).
    #[tracing::instrument(name = "Releasing training batch", skip(self))]
    pub async fn release_batch(&self, batch_id: i64, owner: &str) -> Result<TrainingBatch> {
        let released = sqlx::query_as::<_, TrainingBatch>(
            "UPDATE training_batches
             SET status = 'pending', lease_owner = NULL, lease_expires_at = NULL
             WHERE id = $1 AND status = 'leased' AND lease_owner = $2
             RETURNING *",
        )
        .bind(batch_id)
        .bind(owner)
        .fetch_optional(self.pool())
        .await?;
        if let Some(released) = released {
            return Ok(released);
        }
        let current =
            sqlx::query_as::<_, TrainingBatch>("SELECT * FROM training_batches WHERE id = $1")
                .bind(batch_id)
                .fetch_optional(self.pool())
                .await?
                .ok_or_else(|| StoreError::NotFound {
                    what: format!("training batch {batch_id}"),
                })?;
        Err(StoreError::Conflict(lease_problem(&current, owner)))
    }

    /// Gives every batch of a run that `owner` leased back to the queue: a
    /// restarted trainer under the same name does not wait for its old leases
    /// to expire. Returns how many were released.
    #[tracing::instrument(name = "Releasing an owner's leases", skip(self))]
    pub async fn release_leases_of(&self, run_id: Uuid, owner: &str) -> Result<u64> {
        let done = sqlx::query(
            "UPDATE training_batches
             SET status = 'pending', lease_owner = NULL, lease_expires_at = NULL
             WHERE run_id = $1 AND status = 'leased' AND lease_owner = $2",
        )
        .bind(run_id)
        .bind(owner)
        .execute(self.pool())
        .await?;
        Ok(done.rows_affected())
    }

    /// Fetches a batch by id.
    #[tracing::instrument(name = "Fetching training batch", skip(self))]
    pub async fn get_batch(&self, batch_id: i64) -> Result<TrainingBatch> {
        sqlx::query_as::<_, TrainingBatch>("SELECT * FROM training_batches WHERE id = $1")
            .bind(batch_id)
            .fetch_optional(self.pool())
            .await
            .map_err(db_error("fetching a training batch"))?
            .ok_or_else(|| StoreError::NotFound {
                what: format!("training batch {batch_id}"),
            })
    }
}

/// Explains why `owner` does not hold a valid lease on `batch`.
fn lease_problem(batch: &TrainingBatch, owner: &str) -> String {
    let id = batch.id;
    match (batch.status, batch.lease_owner.as_deref()) {
        (BatchStatus::Done, by) => format!(
            "training batch {id} is already done (completed by {}); skip it",
            by.unwrap_or("unknown")
        ),
        (BatchStatus::Pending, _) => format!(
            "training batch {id} is not leased by {owner:?} (it is pending, probably released \
             or never leased); lease it again before training on it"
        ),
        (BatchStatus::Leased, Some(holder)) if holder != owner => format!(
            "training batch {id} is leased by {holder:?}, not {owner:?}; the lease of {owner:?} \
             expired and the batch was handed out again, so discard this work"
        ),
        (BatchStatus::Leased, _) => format!(
            "the lease of {owner:?} on training batch {id} expired at {}; lease it again \
             or use longer leases",
            batch
                .lease_expires_at
                .map_or_else(|| "an unknown time".to_owned(), |t| t.to_rfc3339())
        ),
    }
}
