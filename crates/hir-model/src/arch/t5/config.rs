//! The Hugging Face `config.json` of a T5 model: fields, defaults, and the two shapes
//! used by tests and benchmarks (FLAN-T5-base, a tiny one).

use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};

/// Hugging Face `config.json` of a T5 model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    /// `model_type` (`t5`).
    #[serde(default = "default_t5")]
    pub model_type: String,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub d_model: usize,
    /// Per-head width.
    pub d_kv: usize,
    /// Feed-forward width.
    pub d_ff: usize,
    /// Encoder layers.
    pub num_layers: usize,
    /// Decoder layers (defaults to `num_layers`).
    #[serde(default)]
    pub num_decoder_layers: Option<usize>,
    /// Attention heads.
    pub num_heads: usize,
    /// Relative position buckets.
    #[serde(default = "default_buckets")]
    pub relative_attention_num_buckets: usize,
    /// Largest relative distance told apart.
    #[serde(default = "default_max_distance")]
    pub relative_attention_max_distance: usize,
    /// Layer-norm epsilon.
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
    /// `gated-gelu` (FLAN-T5) or `relu` (original T5).
    #[serde(default = "default_ff")]
    pub feed_forward_proj: String,
    /// Whether `lm_head` shares the embedding matrix (transformers 4 layout:
    /// also whether the decoder output is scaled by `d_model^-0.5`).
    #[serde(default = "default_true")]
    pub tie_word_embeddings: bool,
    /// transformers 5 layout: whether the decoder output is scaled by
    /// `d_model^-0.5` (defaults to `tie_word_embeddings`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_decoder_outputs: Option<bool>,
    /// First decoder input token.
    #[serde(default)]
    pub decoder_start_token_id: u32,
    /// Padding token.
    #[serde(default)]
    pub pad_token_id: u32,
    /// End-of-sequence token.
    #[serde(default = "default_eos")]
    pub eos_token_id: u32,
    /// Any other fields, kept so that a saved config round-trips.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

fn default_t5() -> String {
    "t5".into()
}
fn default_buckets() -> usize {
    32
}
fn default_max_distance() -> usize {
    128
}
fn default_eps() -> f64 {
    1e-6
}
fn default_ff() -> String {
    "relu".into()
}
fn default_true() -> bool {
    true
}
fn default_eos() -> u32 {
    1
}

impl Config {
    /// Whether the feed-forward is gated (`gated-gelu`) rather than `relu`.
    pub(super) fn gated(&self) -> Result<bool> {
        match self.feed_forward_proj.as_str() {
            "gated-gelu" => Ok(true),
            "relu" => Ok(false),
            other => Err(ModelError::InvalidConfig(format!(
                "feed_forward_proj {other:?} (supported: gated-gelu, relu)"
            ))),
        }
    }

    /// Whether the decoder output is scaled by `d_model^-0.5` before `lm_head`.
    pub fn scales_decoder_output(&self) -> bool {
        self.scale_decoder_outputs
            .unwrap_or(self.tie_word_embeddings)
    }

    /// Decoder depth.
    pub fn decoder_layers(&self) -> usize {
        self.num_decoder_layers.unwrap_or(self.num_layers)
    }

    /// FLAN-T5-base's shape: 12 + 12 layers, d_model 768, 12 heads, gated-GELU,
    /// 32,128 tokens, untied `lm_head` (for benchmarks with random weights).
    pub fn flan_t5_base() -> Self {
        serde_json::from_value(serde_json::json!({
            "model_type": "t5", "vocab_size": 32128, "d_model": 768, "d_kv": 64, "d_ff": 2048,
            "num_layers": 12, "num_decoder_layers": 12, "num_heads": 12,
            "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
            "layer_norm_epsilon": 1e-6, "feed_forward_proj": "gated-gelu",
            "tie_word_embeddings": false, "decoder_start_token_id": 0, "pad_token_id": 0,
            "eos_token_id": 1, "n_positions": 512
        }))
        .expect("static config parses")
    }

    /// A tiny FLAN-T5-shaped configuration for tests.
    pub fn tiny() -> Self {
        serde_json::from_value(serde_json::json!({
            "model_type": "t5",
            "vocab_size": 64,
            "d_model": 32,
            "d_kv": 8,
            "d_ff": 48,
            "num_layers": 2,
            "num_decoder_layers": 2,
            "num_heads": 4,
            "relative_attention_num_buckets": 8,
            "relative_attention_max_distance": 20,
            "layer_norm_epsilon": 1e-6,
            "feed_forward_proj": "gated-gelu",
            "tie_word_embeddings": false,
            "decoder_start_token_id": 0,
            "pad_token_id": 0,
            "eos_token_id": 1,
        }))
        .expect("static config parses")
    }
}
