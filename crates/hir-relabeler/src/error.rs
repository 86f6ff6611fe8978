//! The relabeler's error type and its one mapping to gRPC status codes.

use hir_core::ErrorClass;

/// Everything the relabeler can refuse or fail at.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RelabelerError {
    /// A fault of ours (a task that panicked, a broken invariant); details go to the log.
    #[error("internal error: {0}")]
    Internal(String),
    /// A request field is invalid; the message names the field.
    #[error("{field}: {reason}")]
    InvalidArgument {
        /// The field, e.g. `task` or `items[2].instruction`.
        field: String,
        /// What is wrong and what is allowed.
        reason: String,
    },
    /// A run or iteration does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The iteration is not in a state that allows it.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The generator could not be reached or refused the work.
    #[error("generator: {0}")]
    Generator(String),
    /// The relabel store failed.
    #[error("relabel store: {0}")]
    Store(#[from] hir_store::StoreError),
    /// The BIG-bench data is unusable.
    #[error("{0}")]
    Core(#[from] hir_core::CoreError),
}

impl RelabelerError {
    /// An invalid field.
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

impl RelabelerError {
    /// The error as it is recorded with a failed iteration: the first line of its message,
    /// cut to a bounded length, so that a backtrace or a multi-line dump a dependency
    /// appends never reaches the store (the log has the whole error).
    pub fn summary(&self) -> String {
        hir_runtime::status::bounded(hir_core::text_enum::first_line(&self.to_string()))
    }

    /// What a caller can do about it.
    pub fn class(&self) -> ErrorClass {
        match self {
            RelabelerError::InvalidArgument { .. } => ErrorClass::InvalidInput,
            RelabelerError::NotFound(_) => ErrorClass::NotFound,
            RelabelerError::FailedPrecondition(_) => ErrorClass::FailedPrecondition,
            RelabelerError::Generator(_) => ErrorClass::Unavailable,
            RelabelerError::Internal(_) => ErrorClass::Internal,
            RelabelerError::Store(e) => e.class(),
            RelabelerError::Core(e) => e.class(),
        }
    }
}

/// The one mapping of the relabeler's errors to gRPC statuses.
impl From<RelabelerError> for tonic::Status {
    fn from(err: RelabelerError) -> Self {
        let public = match &err {
            RelabelerError::Store(e) => e.public_message(),
            other => other.to_string(),
        };
        hir_runtime::status::to_status(err.class(), public, &err)
    }
}

/// Result alias of the relabeler.
pub type Result<T, E = RelabelerError> = std::result::Result<T, E>;
