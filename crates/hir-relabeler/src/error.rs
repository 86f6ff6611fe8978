//! The relabeler's error type and its one mapping to gRPC status codes.

/// Everything the relabeler can refuse or fail at.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RelabelerError {
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

impl From<RelabelerError> for tonic::Status {
    fn from(err: RelabelerError) -> Self {
        use hir_store::StoreError;
        let message = err.to_string();
        match err {
            RelabelerError::InvalidArgument { .. } => tonic::Status::invalid_argument(message),
            RelabelerError::NotFound(_) | RelabelerError::Store(StoreError::NotFound { .. }) => {
                tonic::Status::not_found(message)
            }
            RelabelerError::FailedPrecondition(_)
            | RelabelerError::Store(StoreError::InvalidTransition { .. }) => {
                tonic::Status::failed_precondition(message)
            }
            RelabelerError::Store(StoreError::Invalid(_)) | RelabelerError::Core(_) => {
                tonic::Status::invalid_argument(message)
            }
            RelabelerError::Store(StoreError::Conflict(_)) => {
                tonic::Status::already_exists(message)
            }
            RelabelerError::Generator(_) | RelabelerError::Store(_) => {
                tonic::Status::unavailable(message)
            }
        }
    }
}

/// Result alias of the relabeler.
pub type Result<T, E = RelabelerError> = std::result::Result<T, E>;
