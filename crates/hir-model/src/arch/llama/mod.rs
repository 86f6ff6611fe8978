//! Llama-family decoder-only transformer (Llama, SmolLM2, Qwen2).
//!
//! RMSNorm, rotary position embeddings (the Hugging Face "rotate half" form),
//! grouped-query attention, SwiGLU MLP, tied or untied embeddings and
//! optional q/k/v biases (Qwen2). See
//! <https://huggingface.co/docs/transformers/model_doc/llama>.
//!
//! Unlike candle's own model files, the model is stateless (`&self`) and the
//! KV cache is passed in: one loaded model serves many batches, and a batch's
//! cache can be split, copied and merged (as batched sampling does). Inputs are
//! batched `[B, T]` token ids with a key padding mask, so left-padded prompts
//! of different lengths share one forward pass.
//!
//! Two numerical paths share the weights: the fused candle kernels (softmax,
//! RMSNorm, RoPE) for inference, and the same maths built from differentiable
//! primitive ops for training (the fused kernels have no backward pass).
//!
//! One job per file: `config` (the Hugging Face `config.json`), `gguf` (llama.cpp's
//! format), `model` (the network and its forward passes), `save` (writing a checkpoint
//! folder).

mod config;
pub mod gguf;
mod model;
mod save;

pub use crate::arch::kv_cache::KvCache;
pub use config::Config;
pub(crate) use model::LayerShared;
pub use model::{causal_bias, positions_from_mask, Batch, Model};
pub(crate) use save::save;
