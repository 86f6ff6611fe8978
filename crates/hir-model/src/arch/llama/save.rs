//! Saving a Llama-family model as a checkpoint folder: its `config.json` (with the
//! end-of-sequence ids, `architectures` and `torch_dtype`), weights, tokenizer and chat
//! template, written in the [`checkpoint`](crate::formats::checkpoint) format.

use std::collections::HashMap;
use std::path::Path;

use tokenizers::Tokenizer;

use super::Model;
use crate::error::{ModelError, Result};
use crate::formats::checkpoint::{torch_dtype, write_folder, Manifest};

/// Saves `model` in Hugging Face layout with a manifest, naming `eos` as its
/// end-of-sequence ids. Weights are written in their current dtype; quantized models
/// cannot be saved.
pub(crate) fn save(
    model: &Model,
    dir: &Path,
    eos: &[u32],
    tokenizer: &Tokenizer,
    chat_template: Option<&str>,
) -> Result<Manifest> {
    let tensors: HashMap<String, candle_core::Tensor> =
        model.named_tensors()?.into_iter().collect();
    let mut cfg = model.config().clone();
    cfg.eos_token_id = match eos {
        [] => None,
        [one] => Some(serde_json::json!(one)),
        many => Some(serde_json::json!(many)),
    };
    let mut cfg_json = serde_json::to_value(&cfg).map_err(|e| ModelError::json(dir, e))?;
    if let Some(o) = cfg_json.as_object_mut() {
        let arch = if cfg.model_type == "qwen2" {
            "Qwen2ForCausalLM"
        } else {
            "LlamaForCausalLM"
        };
        o.insert("architectures".into(), serde_json::json!([arch]));
        o.insert(
            "torch_dtype".into(),
            serde_json::json!(torch_dtype(model.dtype())),
        );
    }
    write_folder(dir, &cfg_json, &tensors, Some(tokenizer), chat_template)
}
