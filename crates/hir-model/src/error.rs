//! The crate's error type.

use std::path::PathBuf;

/// Everything that can go wrong while loading, running or training a model.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A JSON file (config, index, manifest) could not be parsed or written.
    #[error("{path}: invalid JSON: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: serde_json::Error,
    },
    /// A required file is missing from a model folder.
    #[error("{path}: missing file")]
    MissingFile {
        /// The file that was expected.
        path: PathBuf,
    },
    /// `config.json` names an architecture this crate does not implement.
    #[error("unsupported architecture {0:?} (supported: llama, qwen2, t5)")]
    UnsupportedArchitecture(String),
    /// A configuration value is invalid or not supported.
    #[error("invalid config: {0}")]
    InvalidConfig(String),
    /// A weight tensor the model needs is absent from the checkpoint.
    #[error("missing tensor {name:?} (expected shape {expected:?})")]
    MissingTensor {
        /// Name of the tensor (HF naming).
        name: String,
        /// The shape the model expects.
        expected: Vec<usize>,
    },
    /// A weight tensor has the wrong shape.
    #[error("tensor {name:?} has shape {actual:?}, expected {expected:?}")]
    ShapeMismatch {
        /// Name of the tensor (HF naming).
        name: String,
        /// The shape the model expects.
        expected: Vec<usize>,
        /// The shape in the checkpoint.
        actual: Vec<usize>,
    },
    /// A GGUF tensor uses a quantization this crate cannot handle.
    #[error("tensor {name:?}: unsupported quantization {dtype}")]
    UnsupportedQuantization {
        /// Name of the tensor.
        name: String,
        /// The GGML type.
        dtype: String,
    },
    /// A GGUF metadata entry is missing or has the wrong type.
    #[error("GGUF metadata {key:?}: {reason}")]
    GgufMetadata {
        /// The metadata key.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The tokenizer does not fit the model.
    #[error("tokenizer mismatch: {0}")]
    TokenizerMismatch(String),
    /// The tokenizer failed to load, encode or decode.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A checkpoint file does not match its manifest.
    #[error("{path}: {algorithm} {actual} does not match manifest {expected}")]
    ChecksumMismatch {
        /// The file.
        path: PathBuf,
        /// The digest's algorithm (`SHA-256`, `BLAKE3`).
        algorithm: &'static str,
        /// The digest in `manifest.json`.
        expected: String,
        /// The digest of the file on disk.
        actual: String,
    },
    /// A request (generation, training batch) is malformed.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// A LoRA adapter or its settings cannot be used: `field` names what is wrong (a knob
    /// such as `lora_rank`, or a file of the adapter and its key).
    #[error("{field}: {reason}")]
    InvalidAdapter {
        /// The setting or file entry at fault.
        field: String,
        /// Why.
        reason: String,
    },
    /// An error from the tensor library.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Result with [`ModelError`] as the default error.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;

impl ModelError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn json(path: impl Into<PathBuf>, source: serde_json::Error) -> Self {
        Self::Json {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn tokenizer(e: impl std::fmt::Display) -> Self {
        Self::Tokenizer(e.to_string())
    }
}
