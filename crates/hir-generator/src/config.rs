//! The generator's typed configuration: defaults, then a TOML file, then
//! `HIR_GENERATOR__*` environment variables, then command-line flags.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::engine::EngineConfig;

/// Everything the generator can be configured with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GeneratorConfig {
    /// gRPC address.
    pub listen: SocketAddr,
    /// Prometheus `/metrics` address; none disables it.
    pub metrics_listen: Option<SocketAddr>,
    /// The model to serve at start: a HF folder or a GGUF file.
    pub model: PathBuf,
    /// Version name of the starting model.
    pub version: String,
    /// How to hold the weights.
    pub weights: Weights,
    /// `cpu` or `cuda:N` (CUDA needs a build with the `cuda` feature).
    pub device: String,
    /// Bearer-token protection.
    pub auth: AuthConfig,
    /// Bounds on requests.
    pub limits: Limits,
    /// Continuous batching.
    pub engine: EngineConfig,
    /// Weight swaps and uploads.
    pub swap: SwapConfig,
    /// On shutdown, running streams get this long to finish before they are cancelled.
    pub shutdown_grace_secs: u64,
}

impl Default for GeneratorConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            metrics_listen: Some(SocketAddr::from(([127, 0, 0, 1], 9451))),
            model: PathBuf::from(hir_runtime::models::SMOLLM2_GGUF),
            version: "base".into(),
            weights: Weights::Auto,
            device: "cpu".into(),
            auth: AuthConfig::default(),
            limits: Limits::default(),
            engine: EngineConfig::default(),
            swap: SwapConfig::default(),
            shutdown_grace_secs: 30,
        }
    }
}

/// How the weights are held in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Weights {
    /// Quantized for a GGUF file, f32 on CPU or bf16 on CUDA for a folder (a checkpoint
    /// swapped in is a folder).
    Auto,
    /// Quantized: GGUF blocks (Q4_1 and other types without a fast CPU kernel as Q8_0), a
    /// folder's dense matrices as Q8_0.
    Quantized,
    /// Dense f32.
    F32,
    /// Dense bf16.
    Bf16,
}

/// Bearer-token protection of the RPCs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// The token clients send as `authorization: Bearer <token>`. Without one, guarded RPCs
    /// (swap and upload) are refused.
    pub token: Option<String>,
    /// Guard `Generate`, `LogProbs` and `GetModelInfo` too.
    pub guard_generate: bool,
}

/// Bounds on requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Most prompts in one request (capped by `engine.max_batch_sequences`).
    pub max_prompts_per_request: usize,
    /// Largest `n` (capped by `engine.max_batch_sequences`).
    pub max_n: usize,
    /// Largest `max_new_tokens`.
    pub max_new_tokens: usize,
    /// Longest prompt in tokens (capped by the model's context); a prompt of more than
    /// [`BYTES_PER_TOKEN`] bytes per token of it is refused before it is tokenized.
    pub max_prompt_tokens: usize,
    /// Most stop strings, and the longest one in bytes.
    pub max_stop_strings: usize,
    /// Largest gRPC message accepted, in bytes.
    pub max_message_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_prompts_per_request: 256,
            max_n: 64,
            max_new_tokens: 1024,
            max_prompt_tokens: 4096,
            max_stop_strings: 16,
            max_message_bytes: 16 << 20,
        }
    }
}

/// Bytes a prompt may take per token it may hold: prompts longer than this many bytes per
/// token of their limit are refused before they are tokenized.
pub const BYTES_PER_TOKEN: usize = 8;

/// The bounds a request must keep, as the service enforces them and `GetModelInfo`
/// advertises them: [`Limits`] capped by what the engine and the model can take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestLimits {
    /// Most prompts (or `LogProbs` items) in one request.
    pub max_prompts_per_request: usize,
    /// Largest `n`.
    pub max_n: usize,
    /// Most sequences (prompts times `n`) in one request.
    pub max_sequences_per_request: usize,
    /// Largest `max_new_tokens`.
    pub max_new_tokens: usize,
    /// Longest prompt in tokens.
    pub max_prompt_tokens: usize,
    /// Most tokens of cache one request may hold (prompt plus new tokens, every sequence).
    pub max_request_tokens: usize,
    /// Longest prompt in bytes, checked before tokenizing.
    pub max_prompt_bytes: usize,
    /// Most prompt bytes in one request, checked before tokenizing.
    pub max_request_bytes: usize,
    /// Most stop strings.
    pub max_stop_strings: usize,
    /// Largest gRPC message accepted, in bytes.
    pub max_message_bytes: usize,
}

impl RequestLimits {
    /// The limits of a server configured with `limits` and `engine` serving a model of
    /// `context_length` tokens.
    pub fn new(limits: &Limits, engine: &EngineConfig, context_length: usize) -> Self {
        let sequences = engine.max_batch_sequences;
        let max_prompt_tokens = limits.max_prompt_tokens.min(context_length);
        Self {
            max_prompts_per_request: limits.max_prompts_per_request.min(sequences),
            max_n: limits.max_n.min(sequences),
            max_sequences_per_request: sequences,
            max_new_tokens: limits.max_new_tokens,
            max_prompt_tokens,
            max_request_tokens: engine.token_budget,
            max_prompt_bytes: max_prompt_tokens.saturating_mul(BYTES_PER_TOKEN),
            max_request_bytes: engine.token_budget.saturating_mul(BYTES_PER_TOKEN),
            max_stop_strings: limits.max_stop_strings,
            max_message_bytes: limits.max_message_bytes,
        }
    }
}

/// Weight swaps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SwapConfig {
    /// Folder that `SwapWeights` references are resolved under; none disables them.
    pub checkpoint_root: Option<PathBuf>,
    /// Where uploads are staged (a private subfolder per upload, removed afterwards).
    pub staging_dir: PathBuf,
    /// Largest upload in bytes.
    pub max_upload_bytes: u64,
    /// Deadline of each step of a swap (receiving an upload, loading, activating).
    pub timeout_secs: u64,
}

impl Default for SwapConfig {
    fn default() -> Self {
        Self {
            checkpoint_root: None,
            staging_dir: std::env::temp_dir().join("hir-generator-uploads"),
            max_upload_bytes: 16 << 30,
            timeout_secs: 300,
        }
    }
}
