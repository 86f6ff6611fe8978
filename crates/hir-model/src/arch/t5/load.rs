//! Loading a T5 model from a Hugging Face folder: the config, the weights (as
//! variables when trainable) and the tokenizer, if the folder has one.

use std::path::Path;

use candle_core::Device;

use super::{Config, Model};
use crate::error::{ModelError, Result};
use crate::formats::hf_folder::HfFolder;
use crate::formats::weights::WeightMode;

/// A T5 model loaded from a folder, with its tokenizer and variables.
#[derive(Debug)]
pub struct LoadedT5 {
    /// The model.
    pub model: Model,
    /// `tokenizer.json`, if the folder has one.
    pub tokenizer: Option<tokenizers::Tokenizer>,
    /// Trainable variables with their names (empty unless trainable).
    pub vars: Vec<(String, candle_core::Var)>,
}

/// Loads a T5 model from a Hugging Face folder (`config.json`,
/// `model.safetensors` or a sharded index; `tokenizer.json` if present).
/// With [`WeightMode::Trainable`] the weights are returned as variables.
pub fn load_folder(dir: &Path, device: &Device, mode: WeightMode) -> Result<LoadedT5> {
    from_folder(&HfFolder::open(dir)?, device, mode)
}

/// [`load_folder`] from a folder already opened (its manifest checked).
pub(crate) fn from_folder(
    folder: &HfFolder,
    device: &Device,
    mode: WeightMode,
) -> Result<LoadedT5> {
    let mt = folder.model_type();
    if mt != "t5" {
        return Err(ModelError::UnsupportedArchitecture(mt.to_string()));
    }
    let cfg: Config = folder.config()?;
    let w = folder.weights(device, mode)?;
    let model = Model::new(&cfg, &w)?;
    let tokenizer = match folder.tokenizer()? {
        Some(t) if t.get_vocab_size(true) > cfg.vocab_size => {
            return Err(ModelError::TokenizerMismatch(format!(
                "tokenizer has {} tokens, the model's vocabulary is {}",
                t.get_vocab_size(true),
                cfg.vocab_size
            )));
        }
        t => t,
    };
    Ok(LoadedT5 {
        model,
        tokenizer,
        vars: w.vars(),
    })
}
