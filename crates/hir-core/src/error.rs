//! The error type of `hir-core`.

use std::path::PathBuf;

/// Everything that can go wrong in the core. Every variant names the file, task and field
/// involved, so the message alone tells a user what to fix.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CoreError {
    /// A file or folder could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A file is not valid JSON or does not have the shape of a BIG-bench task.
    #[error("{path} is not a BIG-bench JSON task: {reason}")]
    NotATask {
        /// The offending `task.json`.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// One example of an otherwise well-formed task is unusable.
    #[error("{path}: task `{task}`, example {index}, field `{field}`: {reason}")]
    BadExample {
        /// The task file.
        path: PathBuf,
        /// The task's name.
        task: String,
        /// The example's index in `examples`.
        index: usize,
        /// The JSON field at fault.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A task name or path matched nothing in the catalog.
    #[error("unknown task `{name}` under {root}; {hint}")]
    UnknownTask {
        /// The name asked for, cut to its first 64 characters.
        name: String,
        /// The catalog's root folder.
        root: PathBuf,
        /// Close matches or how to list the tasks.
        hint: String,
    },
    /// A folder holds no BIG-bench task at all.
    #[error(
        "no BIG-bench task.json found under {0}; point --bigbench at a `benchmark_tasks/` folder"
    )]
    NoTasks(PathBuf),
    /// An example index past the end of a task.
    #[error("task `{task}` has {len} examples; index {index} is out of range (valid: 0..{len})")]
    IndexOutOfRange {
        /// The task's name.
        task: String,
        /// The index asked for.
        index: usize,
        /// How many examples the task has.
        len: usize,
    },
    /// A caller passed an argument outside its domain.
    #[error("invalid {field}: {reason}")]
    InvalidArgument {
        /// The argument's name.
        field: &'static str,
        /// Why it is invalid.
        reason: String,
    },
}

impl CoreError {
    /// What a caller can do about it.
    pub fn class(&self) -> ErrorClass {
        match self {
            CoreError::UnknownTask { .. }
            | CoreError::IndexOutOfRange { .. }
            | CoreError::InvalidArgument { .. } => ErrorClass::InvalidInput,
            // The server's own BIG-bench data is missing or malformed: an operator fixes it.
            CoreError::NotATask { .. } | CoreError::BadExample { .. } | CoreError::NoTasks(_) => {
                ErrorClass::FailedPrecondition
            }
            CoreError::Io { .. } => ErrorClass::Internal,
        }
    }
}

/// What a caller can do about an error, whichever crate raised it. Each service maps the
/// class of its error to a gRPC status in one place (`hir_runtime::status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// The request is wrong; sending it again will fail again.
    InvalidInput,
    /// What the request names does not exist.
    NotFound,
    /// What the request would create exists with other contents.
    Conflict,
    /// The system is not in a state to do it; something else must change first.
    FailedPrecondition,
    /// A dependency is down or busy; the same request can succeed later.
    Unavailable,
    /// The request is too large, or a queue or quota is full.
    ResourceExhausted,
    /// A fault of ours; the details belong in the log, not in the reply.
    Internal,
}

/// Result alias of `hir-core`.
pub type Result<T, E = CoreError> = std::result::Result<T, E>;
