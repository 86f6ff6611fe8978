//! Models for hindsight: Llama-family decoders (SmolLM2, Qwen2) and FLAN-T5,
//! loaded from Hugging Face folders or GGUF files, with batched generation
//! (both architectures, behind [`AnyModel`]) and the training pieces of
//! Hindsight Instruction Relabeling.
//!
//! The entry point is [`LoadedModel::load`]:
//!
//! ```no_run
//! use hir_model::{LoadedModel, WeightMode, SamplingParams};
//! # fn main() -> hir_model::Result<()> {
//! let m = LoadedModel::load("models/SmolLM2-135M-Instruct.Q4_1.gguf".as_ref(),
//!     &candle_core::Device::Cpu, WeightMode::Quantized)?;
//! let prompt = m.chat_prompt("What is 2 + 3?");
//! let out = m.generate_text(&[prompt], &SamplingParams::greedy(32))?;
//! println!("{}", out[0][0].text);
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

// The layers, from the bottom up: each module uses only the modules above it here
// (`tests/layers.rs` checks it).
pub mod error;
// CPU kernels that know no model.
pub mod kernels;
// Weights and files: weight sources, safetensors, checkpoint folders, HF folders.
pub mod formats;
// The architectures: Llama family (with GGUF), FLAN-T5, LoRA, the KV cache, `AnyModel`.
pub mod arch;
// Batched sampling.
pub mod sampling;
// HIR's supervised phase: batches, the loss, the optimizer.
pub mod train;
// A model file's header, read without its weights.
pub mod probe;
// `LoadedModel`: any supported file, loaded, with its tokenizer.
mod loaded;

pub use arch::{AnyModel, BatchCache};
pub use error::{ModelError, Result};
pub use formats::weights::WeightMode;
pub use loaded::{LoadedModel, ModelInfo};
pub use sampling::{
    DecodeBatch, FinishReason, GeneratedSequence, GenerationRequest, SamplingParams,
};

/// The device named `cpu` or `cuda:N` (the latter needs a build with the `cuda` feature).
pub fn parse_device(name: &str) -> Result<candle_core::Device> {
    if name == "cpu" {
        return Ok(candle_core::Device::Cpu);
    }
    let ordinal = name
        .strip_prefix("cuda:")
        .and_then(|n| n.parse::<usize>().ok())
        .ok_or_else(|| {
            ModelError::InvalidConfig(format!("device `{name}`: expected `cpu` or `cuda:N`"))
        })?;
    candle_core::Device::new_cuda(ordinal).map_err(|e| {
        ModelError::InvalidConfig(format!(
            "device `{name}`: {e} (is this a build with the `cuda` feature?)"
        ))
    })
}
