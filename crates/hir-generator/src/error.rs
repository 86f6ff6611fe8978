//! The generator's error type and its one mapping to gRPC status codes.

use hir_core::ErrorClass;

/// Everything the generator can refuse or fail at.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GeneratorError {
    /// A request field is invalid; the message names the field.
    #[error("{field}: {reason}")]
    InvalidArgument {
        /// The field, e.g. `sampling.top_p` or `prompts[3]`.
        field: String,
        /// What is wrong and what is allowed.
        reason: String,
    },
    /// The server is not in a state to do it (wrong version, not loaded, shutting down).
    #[error("{0}")]
    FailedPrecondition(String),
    /// The request names a version other than the one serving; the status carries the
    /// serving version in [`hir_proto::SERVING_VERSION_KEY`].
    #[error("expected version `{expected}`, but `{serving}` is serving")]
    VersionMismatch {
        /// The version the request asked for.
        expected: String,
        /// The version serving.
        serving: String,
    },
    /// The request queue is full; retry later.
    #[error("{0}")]
    Overloaded(String),
    /// A message of the request is larger than this server accepts.
    #[error("{0}")]
    TooLarge(String),
    /// A checkpoint is missing, corrupt or does not fit the served model.
    #[error("checkpoint refused: {0}")]
    Checkpoint(String),
    /// A step ran past its deadline.
    #[error("{0} did not finish within {1:?}")]
    DeadlineExceeded(&'static str, std::time::Duration),
    /// The engine thread is gone (the server is shutting down).
    #[error("the generation engine has stopped; the server is shutting down")]
    EngineStopped,
    /// The model failed while running.
    #[error("model error: {0}")]
    Model(#[from] hir_model::ModelError),
    /// A task of the request failed on its own (a panic on a blocking thread).
    #[error("{0}")]
    Internal(String),
    /// A file operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

impl GeneratorError {
    /// An invalid field.
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

impl GeneratorError {
    /// What a caller can do about it. Model and file failures are ours.
    pub fn class(&self) -> ErrorClass {
        match self {
            GeneratorError::InvalidArgument { .. } => ErrorClass::InvalidInput,
            GeneratorError::FailedPrecondition(_)
            | GeneratorError::VersionMismatch { .. }
            | GeneratorError::Checkpoint(_) => ErrorClass::FailedPrecondition,
            GeneratorError::Overloaded(_) | GeneratorError::TooLarge(_) => {
                ErrorClass::ResourceExhausted
            }
            GeneratorError::DeadlineExceeded(..) | GeneratorError::EngineStopped => {
                ErrorClass::Unavailable
            }
            GeneratorError::Model(_) | GeneratorError::Internal(_) | GeneratorError::Io { .. } => {
                ErrorClass::Internal
            }
        }
    }
}

/// The one mapping of the generator's errors to gRPC statuses.
impl From<GeneratorError> for tonic::Status {
    fn from(err: GeneratorError) -> Self {
        if let GeneratorError::DeadlineExceeded(..) = err {
            return tonic::Status::deadline_exceeded(err.to_string());
        }
        let mut status = hir_runtime::status::to_status(err.class(), &err, &err);
        if let GeneratorError::VersionMismatch { serving, .. } = &err {
            if let Ok(value) = serving.parse() {
                status
                    .metadata_mut()
                    .insert(hir_proto::SERVING_VERSION_KEY, value);
            }
        }
        status
    }
}

/// Result alias of the generator.
pub type Result<T, E = GeneratorError> = std::result::Result<T, E>;
