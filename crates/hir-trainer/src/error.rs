//! The trainer's error type and its one mapping to gRPC status codes.

use std::path::PathBuf;

use hir_core::ErrorClass;

/// Everything the trainer can refuse or fail at.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TrainerError {
    /// A fault of ours (a task that panicked, a broken invariant); details go to the log.
    #[error("internal error: {0}")]
    Internal(String),
    /// A request field is invalid; the message names the field.
    #[error("{field}: {reason}")]
    InvalidArgument {
        /// The field, e.g. `tasks[1]` or `hyperparameters.learning_rate`.
        field: String,
        /// What is wrong and what is allowed.
        reason: String,
    },
    /// A run does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The run's state does not allow the call, or its data is unusable.
    #[error("{0}")]
    FailedPrecondition(String),
    /// A run id was reused with a different configuration.
    #[error("{0}")]
    AlreadyExists(String),
    /// The run was asked to stop; its last step is committed.
    #[error("the run was stopped")]
    Stopped,
    /// A generator or the relabeler failed or could not be reached.
    #[error("{service}: {message}")]
    Remote {
        /// Which service, e.g. `generator http://10.0.0.5:50051`.
        service: String,
        /// What it said.
        message: String,
    },
    /// A generator or the relabeler is down, restarting or busy: a retry can succeed.
    #[error("{service} is unreachable: {message}")]
    Unreachable {
        /// Which service, e.g. `generator http://10.0.0.5:50051`.
        service: String,
        /// What the connection or the service said.
        message: String,
    },
    /// A generator serves something other than what was swapped in.
    #[error("verification failed: {0}")]
    Verification(String),
    /// The relabel store failed.
    #[error("relabel store: {0}")]
    Store(#[from] hir_store::StoreError),
    /// The model failed to load, train or save.
    #[error("model: {0}")]
    Model(#[from] hir_model::ModelError),
    /// BIG-bench data or a run configuration is unusable.
    #[error("{0}")]
    Core(#[from] hir_core::CoreError),
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

impl TrainerError {
    /// An invalid field.
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }

    /// A failed call to another service.
    pub fn remote(service: impl Into<String>, status: &tonic::Status) -> Self {
        let (service, message) = (
            service.into(),
            format!("{:?}: {}", status.code(), status.message()),
        );
        if hir_runtime::generators::retryable(status) {
            Self::Unreachable { service, message }
        } else {
            Self::Remote { service, message }
        }
    }
}

impl From<candle_core::Error> for TrainerError {
    fn from(err: candle_core::Error) -> Self {
        Self::Model(err.into())
    }
}

impl TrainerError {
    /// The error as a failed run or iteration records it: the first line of its message,
    /// cut to a bounded length, so that a backtrace or a multi-line dump a dependency
    /// appends (candle does, with `RUST_BACKTRACE` set) never reaches the store; the log
    /// has the whole error.
    pub fn summary(&self) -> String {
        hir_runtime::status::bounded(hir_core::text_enum::first_line(&self.to_string()))
    }

    /// What a caller can do about it. Model, file and verification failures are ours.
    pub fn class(&self) -> ErrorClass {
        match self {
            TrainerError::InvalidArgument { .. } => ErrorClass::InvalidInput,
            TrainerError::NotFound(_) => ErrorClass::NotFound,
            TrainerError::FailedPrecondition(_) | TrainerError::Stopped => {
                ErrorClass::FailedPrecondition
            }
            TrainerError::AlreadyExists(_) => ErrorClass::Conflict,
            TrainerError::Remote { .. } | TrainerError::Unreachable { .. } => {
                ErrorClass::Unavailable
            }
            TrainerError::Store(e) => e.class(),
            TrainerError::Core(e) => e.class(),
            TrainerError::Internal(_)
            | TrainerError::Verification(_)
            | TrainerError::Model(_)
            | TrainerError::Io { .. } => ErrorClass::Internal,
        }
    }
}

/// The one mapping of the trainer's errors to gRPC statuses.
impl From<TrainerError> for tonic::Status {
    fn from(err: TrainerError) -> Self {
        let public = match &err {
            TrainerError::Store(e) => e.public_message(),
            other => other.to_string(),
        };
        hir_runtime::status::to_status(err.class(), public, &err)
    }
}

/// Result alias of the trainer.
pub type Result<T, E = TrainerError> = std::result::Result<T, E>;
