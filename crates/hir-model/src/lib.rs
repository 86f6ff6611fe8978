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

// Modules from the bottom of the dependency graph up: shared pieces, then the
// architectures, then what drives them.
pub mod cpu_gemm;
pub mod error;
pub mod fused;
pub mod ops;
pub mod probe;

pub mod checkpoint;
pub mod kv_cache;
pub mod lora;
pub mod loss;
pub mod smollm2;
pub mod tensor_file;
pub mod weights;

mod hf_folder;

pub mod llama;
pub mod t5;

pub mod gguf;

mod arch;

pub mod generate;
pub mod train;

mod loaded;

pub use arch::{AnyModel, BatchCache};
pub use error::{ModelError, Result};
pub use generate::{
    DecodeBatch, FinishReason, GeneratedSequence, GenerationRequest, SamplingParams,
};
pub use loaded::{LoadedModel, ModelInfo};
pub use weights::WeightMode;

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
