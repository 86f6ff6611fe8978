//! The Hugging Face `config.json` of a Llama-family model: fields, defaults, and the
//! checks that it describes a model [`Model`](super::Model) implements.

use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};

/// Hugging Face `config.json` of a Llama-family model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    /// `model_type`: `llama` or `qwen2`.
    #[serde(default = "default_model_type")]
    pub model_type: String,
    /// Vocabulary size (rows of the embedding matrix).
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Number of query heads.
    pub num_attention_heads: usize,
    /// Number of key/value heads (grouped-query attention); defaults to the query heads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_key_value_heads: Option<usize>,
    /// Per-head width; defaults to `hidden_size / num_attention_heads`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    /// Epsilon of the RMS norms.
    #[serde(default = "default_rms_eps")]
    pub rms_norm_eps: f64,
    /// RoPE base.
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    /// Context length.
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    /// Whether the output projection reuses the embedding matrix.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Whether q/k/v projections have biases (`true` for Qwen2 when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_bias: Option<bool>,
    /// Activation of the MLP gate (only `silu` is supported).
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// RoPE parameters in the transformers 5 layout (`{"rope_theta": .., "rope_type": "default"}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_parameters: Option<serde_json::Value>,
    /// RoPE scaling (only `null` is supported).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<serde_json::Value>,
    /// Beginning-of-sequence token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<u32>,
    /// End-of-sequence token(s): a number or a list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<serde_json::Value>,
    /// Any other fields, kept so that a saved config round-trips.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

fn default_model_type() -> String {
    "llama".into()
}
fn default_rms_eps() -> f64 {
    1e-6
}
fn default_rope_theta() -> f64 {
    10_000.0
}
fn default_max_pos() -> usize {
    2048
}
fn default_act() -> String {
    "silu".into()
}

impl Config {
    /// Number of key/value heads.
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Per-head width.
    pub fn head_size(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    /// The RoPE base: `rope_parameters.rope_theta` when present, else `rope_theta`.
    pub fn rope_base(&self) -> f64 {
        self.rope_parameters
            .as_ref()
            .and_then(|p| p.get("rope_theta"))
            .and_then(|t| t.as_f64())
            .unwrap_or(self.rope_theta)
    }

    /// Whether q/k/v have biases.
    pub fn qkv_bias(&self) -> bool {
        self.attention_bias.unwrap_or(self.model_type == "qwen2")
    }

    /// The end-of-sequence ids named by the config.
    pub fn eos_ids(&self) -> Vec<u32> {
        match &self.eos_token_id {
            Some(serde_json::Value::Number(n)) => {
                n.as_u64().map(|v| vec![v as u32]).unwrap_or_default()
            }
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .filter_map(|v| v.as_u64().map(|v| v as u32))
                .collect(),
            _ => Vec::new(),
        }
    }

    /// Checks that the config describes a model this module implements.
    pub fn validate(&self) -> Result<()> {
        if !matches!(self.model_type.as_str(), "llama" | "qwen2") {
            return Err(ModelError::UnsupportedArchitecture(self.model_type.clone()));
        }
        if self.hidden_act != "silu" {
            return Err(ModelError::InvalidConfig(format!(
                "hidden_act {:?} (only silu)",
                self.hidden_act
            )));
        }
        if let Some(t) = self
            .rope_parameters
            .as_ref()
            .and_then(|p| p.get("rope_type"))
            .and_then(|t| t.as_str())
        {
            if t != "default" {
                return Err(ModelError::InvalidConfig(format!(
                    "rope_type {t:?} is not supported (only default)"
                )));
            }
        }
        if self.extra.get("mlp_bias").and_then(|b| b.as_bool()) == Some(true) {
            return Err(ModelError::InvalidConfig(
                "mlp_bias is not supported".into(),
            ));
        }
        if self.rope_scaling.as_ref().is_some_and(|v| !v.is_null()) {
            return Err(ModelError::InvalidConfig(
                "rope_scaling is not supported".into(),
            ));
        }
        let (h, kv) = (self.num_attention_heads, self.kv_heads());
        if h == 0 || kv == 0 || h % kv != 0 {
            return Err(ModelError::InvalidConfig(format!(
                "{h} attention heads is not a multiple of {kv} key/value heads"
            )));
        }
        if self.head_size() % 2 != 0 {
            return Err(ModelError::InvalidConfig("odd head_dim".into()));
        }
        Ok(())
    }

    /// Number of parameters (tied embeddings counted once).
    pub fn num_parameters(&self) -> usize {
        let (h, i, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let (nh, nkv, hd) = (self.num_attention_heads, self.kv_heads(), self.head_size());
        let attn = h * nh * hd * 2
            + h * nkv * hd * 2
            + if self.qkv_bias() {
                nh * hd + 2 * nkv * hd
            } else {
                0
            };
        let layer = attn + 3 * h * i + 2 * h;
        let head = if self.tie_word_embeddings { 0 } else { v * h };
        v * h + self.num_hidden_layers * layer + h + head
    }

    /// A tiny configuration for tests.
    pub fn tiny() -> Self {
        serde_json::from_value(serde_json::json!({
            "model_type": "llama",
            "vocab_size": 64,
            "hidden_size": 32,
            "intermediate_size": 48,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "max_position_embeddings": 128,
            "tie_word_embeddings": true,
        }))
        .expect("static config parses")
    }
}
