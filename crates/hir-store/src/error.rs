//! The crate's error type.
//!
//! Database errors that a caller can fix (a missing referenced row, a value
//! outside a CHECK constraint, a duplicate key) are translated into
//! [`StoreError::NotFound`], [`StoreError::Invalid`] and
//! [`StoreError::Conflict`] by [`db_error`], with a message that says what to
//! do. Everything else stays a [`StoreError::Database`].

use sqlx::migrate::MigrateError;

/// Result type of every fallible store function.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Everything that can go wrong in the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A row the caller named (or a row a new row refers to) does not exist.
    #[error("{what} was not found; create it first or check the identifier")]
    NotFound {
        /// Description of the missing row, e.g. `run 6f1c…` or `iteration 3 of run 6f1c…`.
        what: String,
    },

    /// The write disagrees with what is already stored under the same key.
    #[error("conflict: {0}")]
    Conflict(String),

    /// A compare-and-set status change found the row in an unexpected state.
    #[error(
        "cannot move {entity} from {current} to {requested}: it must be in one of [{expected}]; \
         reload it and decide again"
    )]
    InvalidTransition {
        /// The row whose status was being changed, e.g. `iteration 3 of run 6f1c…`.
        entity: String,
        /// Its status when the change was attempted.
        current: String,
        /// The status the caller asked for.
        requested: String,
        /// The statuses the caller accepted as a starting point, comma separated.
        expected: String,
    },

    /// An argument is out of range or malformed; the message names the field.
    #[error("invalid input: {0}")]
    Invalid(String),

    /// The database server could not be reached.
    #[error(
        "cannot connect to Postgres at {host}:{port} (database {database:?}): {source}; \
         check that the server is running and the URL is right"
    )]
    Connect {
        /// Host from the connection URL.
        host: String,
        /// Port from the connection URL.
        port: u16,
        /// Database from the connection URL.
        database: String,
        /// The underlying error.
        #[source]
        source: sqlx::Error,
    },

    /// A stored row cannot be read back (written by another version, or edited by hand).
    #[error("stored data is unreadable: {0}")]
    Corrupt(String),

    /// Any other database error.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),

    /// A domain error: an unknown status spelling, a task that is not in the catalog or
    /// whose file does not parse.
    #[error(transparent)]
    Core(#[from] hir_core::CoreError),

    /// Applying the schema migrations failed.
    #[error("applying migrations failed: {0}; check that the database was not migrated by a newer version")]
    Migrate(#[from] MigrateError),
}

impl StoreError {
    /// What a caller can do about it: bad input (a NUL byte in text, a value too large for
    /// an index, a broken constraint) is told apart from a database that is down or busy
    /// (worth a retry) and from our own faults.
    pub fn class(&self) -> hir_core::ErrorClass {
        use hir_core::ErrorClass as C;
        match self {
            StoreError::NotFound { .. } => C::NotFound,
            StoreError::Conflict(_) => C::Conflict,
            StoreError::InvalidTransition { .. } => C::FailedPrecondition,
            StoreError::Invalid(_) => C::InvalidInput,
            StoreError::Connect { .. } => C::Unavailable,
            StoreError::Core(e) => e.class(),
            StoreError::Corrupt(_) | StoreError::Migrate(_) => C::Internal,
            StoreError::Database(e) => database_class(e),
        }
    }
}

impl StoreError {
    /// What a client may read: the message itself when it is about the client's request,
    /// and a plain sentence without the driver's text when the database failed.
    pub fn public_message(&self) -> String {
        match self {
            StoreError::Database(sqlx::Error::Database(db))
                if self.class() == hir_core::ErrorClass::InvalidInput =>
            {
                let code = db.code().unwrap_or_default();
                let what = match code.as_ref() {
                    "22021" => "a text field holds a NUL byte or invalid UTF-8".to_owned(),
                    "22001" => "a text field is longer than the column allows".to_owned(),
                    "54000" => "a value is too large to store or index".to_owned(),
                    other => format!("a value cannot be stored (SQLSTATE {other})"),
                };
                format!("invalid input: {what}")
            }
            StoreError::Database(_) | StoreError::Connect { .. } => {
                "the relabel store is unavailable; retry later".to_owned()
            }
            StoreError::Migrate(_) | StoreError::Corrupt(_) => {
                "the relabel store failed".to_owned()
            }
            other => other.to_string(),
        }
    }
}

/// The class of a driver error, by its kind or SQLSTATE.
fn database_class(err: &sqlx::Error) -> hir_core::ErrorClass {
    use hir_core::ErrorClass as C;
    match err {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => C::Unavailable,
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            match code.get(..2).unwrap_or_default() {
                // Connection exceptions, insufficient resources, operator intervention
                // (shutdown, crash recovery), and transaction rollbacks (serialization
                // failures, deadlocks): the same request can succeed later.
                "08" | "53" | "57" | "40" => C::Unavailable,
                // Data exceptions (a NUL byte, an invalid encoding, a value out of range),
                // integrity violations, and program limits (an index row too large).
                "22" | "23" | "54" => C::InvalidInput,
                _ => C::Internal,
            }
        }
        _ => C::Internal,
    }
}

/// PostgreSQL SQLSTATE codes the store translates.
const FOREIGN_KEY_VIOLATION: &str = "23503";
const UNIQUE_VIOLATION: &str = "23505";
const CHECK_VIOLATION: &str = "23514";

/// Builds a `map_err` closure that translates constraint violations raised
/// while `doing` something into errors that say what to fix.
///
/// ```ignore
/// query.execute(&pool).await.map_err(db_error("inserting samples"))?;
/// ```
pub(crate) fn db_error(doing: &'static str) -> impl FnOnce(sqlx::Error) -> StoreError {
    move |err| {
        let Some(db) = err.as_database_error() else {
            return StoreError::Database(err);
        };
        let constraint = db.constraint().unwrap_or("").to_owned();
        match db.code().as_deref() {
            Some(FOREIGN_KEY_VIOLATION) => StoreError::NotFound {
                what: format!("{} (while {doing})", missing_reference(&constraint)),
            },
            Some(CHECK_VIOLATION) => StoreError::Invalid(format!(
                "a value violates constraint {constraint} while {doing}: {}",
                db.message()
            )),
            Some(UNIQUE_VIOLATION) => StoreError::Conflict(format!(
                "a row with the same key already exists ({constraint}) while {doing}"
            )),
            _ => StoreError::Database(err),
        }
    }
}

/// Explains which referenced row is missing for a foreign-key constraint.
fn missing_reference(constraint: &str) -> String {
    match constraint {
        "samples_iteration_fk" | "training_batches_iteration_fk" => {
            "the referenced (run_id, iteration); call ensure_iteration for it".to_owned()
        }
        "samples_example_fk" | "eval_results_example_fk" => {
            "the referenced (task_id, example_idx); upsert the task with this example".to_owned()
        }
        "samples_model_version_fk" | "eval_results_model_version_fk" => {
            "the referenced model_version_id; register the model version".to_owned()
        }
        "run_tasks_run_fk"
        | "model_versions_run_fk"
        | "feedback_run_fk"
        | "eval_results_run_fk"
        | "run_eval_items_run_fk"
        | "iterations_run_fk" => "the referenced run_id; create the run".to_owned(),
        "run_tasks_task_fk" => "the referenced task_id; upsert the task".to_owned(),
        "model_versions_parent_fk" => "the parent model version (parent_id)".to_owned(),
        "relabels_sample_fk" | "batch_samples_sample_fk" => "the referenced sample".to_owned(),
        other => format!("the row referenced through {other}"),
    }
}

/// Checks that a value is 64 lowercase hexadecimal digits.
pub(crate) fn validate_sha256(field: &str, value: &str) -> Result<()> {
    if hir_core::digest::is_sha256_hex(value) {
        Ok(())
    } else {
        Err(StoreError::Invalid(format!(
            "{field} must be 64 lowercase hex digits (a SHA-256), got {value:?}"
        )))
    }
}

/// Checks that an index-like value is not negative.
pub(crate) fn validate_non_negative(field: &str, value: i64) -> Result<()> {
    if value >= 0 {
        Ok(())
    } else {
        Err(StoreError::Invalid(format!(
            "{field} must be >= 0, got {value}"
        )))
    }
}
