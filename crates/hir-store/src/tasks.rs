//! Tasks and their examples.
//!
//! A task is stored once, with all its examples and their train/test split,
//! in one transaction. Storing the same task again is a no-op; storing a
//! different source file under the same name is refused, because samples
//! and evaluations refer to the stored examples.

use chrono::{DateTime, Utc};
use std::collections::HashSet;

use crate::error::{db_error, validate_non_negative, validate_sha256, Result, StoreError};
use crate::Store;

pub use hir_core::split::SplitSide;
pub use hir_core::task::TaskKind;

/// One example of a task to store.
#[derive(Debug, Clone, PartialEq)]
pub struct NewExample {
    /// Position in the task file, 0-based.
    pub idx: i32,
    /// Train or test.
    pub split: SplitSide,
    /// The sampler prompt.
    pub prompt: String,
    /// The gold answer string, e.g. `(C)`.
    pub target: String,
}

/// A task to store, with all its examples.
#[derive(Debug, Clone, PartialEq)]
pub struct NewTask {
    /// Unique name, e.g. `tracking_shuffled_objects_three_objects`.
    pub name: String,
    /// BIG-bench path, e.g. `tracking_shuffled_objects/three_objects`.
    pub path: String,
    /// Multiple choice or generative.
    pub kind: TaskKind,
    /// Seed of the train/test permutation.
    pub split_seed: i64,
    /// Number of examples in the task; must equal `examples.len()`.
    pub n_examples: i32,
    /// Number of train examples; must equal the examples marked [`SplitSide::Train`].
    pub train_size: i32,
    /// SHA-256 of the task file, 64 lowercase hex digits.
    pub source_sha256: String,
    /// Every example of the task.
    pub examples: Vec<NewExample>,
}

/// A stored task.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct Task {
    /// Surrogate key.
    pub id: i64,
    /// Unique name.
    pub name: String,
    /// BIG-bench path.
    pub path: String,
    /// Multiple choice or generative.
    #[sqlx(try_from = "String")]
    pub kind: TaskKind,
    /// Seed of the train/test permutation.
    pub split_seed: i64,
    /// Number of examples.
    pub n_examples: i32,
    /// Number of train examples.
    pub train_size: i32,
    /// SHA-256 of the task file.
    pub source_sha256: String,
    /// When the task was first stored.
    pub created_at: DateTime<Utc>,
}

/// A stored example.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct Example {
    /// The task it belongs to.
    pub task_id: i64,
    /// Position in the task file, 0-based.
    pub idx: i32,
    /// Train or test.
    #[sqlx(try_from = "String")]
    pub split: SplitSide,
    /// The sampler prompt.
    pub prompt: String,
    /// The gold answer string.
    pub target: String,
}

impl NewTask {
    /// Checks the task's fields and that its examples are consistent with them.
    fn validate(&self) -> Result<()> {
        if self.name.trim().is_empty() {
            return Err(StoreError::Invalid("task name must not be empty".into()));
        }
        validate_sha256("source_sha256", &self.source_sha256)?;
        if usize::try_from(self.n_examples).ok() != Some(self.examples.len()) {
            return Err(StoreError::Invalid(format!(
                "n_examples is {} but {} examples were given",
                self.n_examples,
                self.examples.len()
            )));
        }
        let train = self
            .examples
            .iter()
            .filter(|e| e.split == SplitSide::Train)
            .count();
        if usize::try_from(self.train_size).ok() != Some(train) {
            return Err(StoreError::Invalid(format!(
                "train_size is {} but {train} examples are marked train",
                self.train_size
            )));
        }
        let mut seen = HashSet::with_capacity(self.examples.len());
        for example in &self.examples {
            validate_non_negative("example idx", example.idx.into())?;
            if !seen.insert(example.idx) {
                return Err(StoreError::Invalid(format!(
                    "example idx {} appears twice in task {}",
                    example.idx, self.name
                )));
            }
        }
        Ok(())
    }
}

impl Store {
    /// Stores a task and all its examples in one transaction, or returns the
    /// stored task when the same source (same `source_sha256`) is already there
    /// under the same name and split seed. Each split seed of a task is its own row.
    ///
    /// Fails with [`StoreError::Conflict`] when the name and seed are taken by a
    /// task built from a different source, and with [`StoreError::Invalid`] when
    /// the examples do not match `n_examples`/`train_size` or repeat an idx.
    #[tracing::instrument(name = "Upserting task", skip(self, task), fields(task = %task.name))]
    pub async fn upsert_task(&self, task: &NewTask) -> Result<Task> {
        task.validate()?;
        let mut tx = self.pool().begin().await?;

        sqlx::query(
            "INSERT INTO tasks (name, path, kind, split_seed, n_examples, train_size, source_sha256)
             VALUES ($1, $2, $3, $4, $5, $6, $7)
             ON CONFLICT (name, split_seed) DO NOTHING",
        )
        .bind(&task.name)
        .bind(&task.path)
        .bind(task.kind.as_str())
        .bind(task.split_seed)
        .bind(task.n_examples)
        .bind(task.train_size)
        .bind(&task.source_sha256)
        .execute(&mut *tx)
        .await
        .map_err(db_error("storing a task"))?;

        // Lock the row so a concurrent upsert of the same task waits for us.
        let stored: Task =
            sqlx::query_as("SELECT * FROM tasks WHERE name = $1 AND split_seed = $2 FOR UPDATE")
                .bind(&task.name)
                .bind(task.split_seed)
                .fetch_one(&mut *tx)
                .await?;
        let same = stored.path == task.path
            && stored.kind == task.kind
            && stored.n_examples == task.n_examples
            && stored.train_size == task.train_size
            && stored.source_sha256 == task.source_sha256;
        if !same {
            return Err(StoreError::Conflict(format!(
                "task {:?} (split seed {}) is already stored from {} (sha256 {}, {} examples); \
                 the new one is {} (sha256 {}, {} examples); store it under a new name",
                task.name,
                task.split_seed,
                stored.path,
                stored.source_sha256,
                stored.n_examples,
                task.path,
                task.source_sha256,
                task.n_examples
            )));
        }

        let idx: Vec<i32> = task.examples.iter().map(|e| e.idx).collect();
        let split: Vec<&str> = task.examples.iter().map(|e| e.split.as_str()).collect();
        let prompt: Vec<&str> = task.examples.iter().map(|e| e.prompt.as_str()).collect();
        let target: Vec<&str> = task.examples.iter().map(|e| e.target.as_str()).collect();
        sqlx::query(
            "INSERT INTO examples (task_id, idx, split, prompt, target)
             SELECT $1, u.idx, u.split, u.prompt, u.target
             FROM UNNEST($2::int4[], $3::text[], $4::text[], $5::text[])
                  AS u(idx, split, prompt, target)
             ON CONFLICT (task_id, idx) DO NOTHING",
        )
        .bind(stored.id)
        .bind(&idx)
        .bind(&split)
        .bind(&prompt)
        .bind(&target)
        .execute(&mut *tx)
        .await
        .map_err(db_error("storing examples"))?;

        tx.commit().await?;
        Ok(stored)
    }

    /// Fetches a task by its name and split seed.
    #[tracing::instrument(name = "Fetching task", skip(self))]
    pub async fn get_task_by_name(&self, name: &str, split_seed: i64) -> Result<Task> {
        sqlx::query_as::<_, Task>("SELECT * FROM tasks WHERE name = $1 AND split_seed = $2")
            .bind(name)
            .bind(split_seed)
            .fetch_optional(self.pool())
            .await?
            .ok_or_else(|| StoreError::NotFound {
                what: format!("task {name:?} split with seed {split_seed}"),
            })
    }

    /// Fetches a task by its id.
    #[tracing::instrument(name = "Fetching task by id", skip(self))]
    pub async fn get_task_by_id(&self, id: i64) -> Result<Task> {
        sqlx::query_as::<_, Task>("SELECT * FROM tasks WHERE id = $1")
            .bind(id)
            .fetch_optional(self.pool())
            .await?
            .ok_or_else(|| StoreError::NotFound {
                what: format!("task {id}"),
            })
    }

    /// Lists a task's examples ordered by idx, optionally only one split.
    #[tracing::instrument(name = "Listing examples", skip(self))]
    pub async fn list_examples(
        &self,
        task_id: i64,
        split: Option<SplitSide>,
    ) -> Result<Vec<Example>> {
        let examples = sqlx::query_as::<_, Example>(
            "SELECT * FROM examples
             WHERE task_id = $1 AND ($2::text IS NULL OR split = $2)
             ORDER BY idx",
        )
        .bind(task_id)
        .bind(split.map(SplitSide::as_str))
        .fetch_all(self.pool())
        .await?;
        Ok(examples)
    }
}
