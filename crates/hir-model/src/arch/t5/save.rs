//! Saving a T5 model as a checkpoint folder: its `config.json` (with `architectures` and
//! `torch_dtype`), weights and tokenizer, written in the [`checkpoint`](crate::formats::checkpoint)
//! format.

use std::collections::HashMap;
use std::path::Path;

use super::Model;
use crate::error::{ModelError, Result};
use crate::formats::checkpoint::{torch_dtype, write_folder, Manifest};

impl Model {
    /// Saves the model (and tokenizer, if given) in Hugging Face layout with a manifest.
    pub fn save(&self, dir: &Path, tokenizer: Option<&tokenizers::Tokenizer>) -> Result<Manifest> {
        let tensors: HashMap<String, candle_core::Tensor> =
            self.named_tensors().into_iter().collect();
        let mut cfg_json =
            serde_json::to_value(self.config()).map_err(|e| ModelError::json(dir, e))?;
        if let Some(o) = cfg_json.as_object_mut() {
            o.insert(
                "architectures".into(),
                serde_json::json!(["T5ForConditionalGeneration"]),
            );
            o.insert(
                "torch_dtype".into(),
                serde_json::json!(torch_dtype(self.dtype())),
            );
        }
        write_folder(dir, &cfg_json, &tensors, tokenizer, None)
    }
}
