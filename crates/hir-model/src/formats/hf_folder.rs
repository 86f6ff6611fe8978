//! Reading a Hugging Face model folder, for both architectures: the manifest check
//! (when the folder has a `manifest.json`), `config.json` and its `model_type`, the
//! safetensors weight files (`model.safetensors` or the shards of an index) and
//! `tokenizer.json`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::Device;
use serde::de::DeserializeOwned;
use tokenizers::Tokenizer;

use super::weights::{MemorySource, SafetensorsSource, WeightMode, Weights};
use super::{checkpoint, read_json, safetensors_files, tensor_file};
use crate::error::{ModelError, Result};

/// A model folder whose manifest (if any) checked out, with its `config.json`.
#[derive(Debug)]
pub(crate) struct HfFolder {
    dir: PathBuf,
    config_path: PathBuf,
    config: serde_json::Value,
    /// The manifest, when the folder has one: its weight files are checked as they are
    /// read, the others were checked on opening.
    manifest: Option<checkpoint::Manifest>,
}

impl HfFolder {
    /// Verifies `dir/manifest.json` when there is one (every file but the weights, which
    /// [`HfFolder::weights`] checks while reading them), then reads `dir/config.json`.
    pub(crate) fn open(dir: &Path) -> Result<Self> {
        let manifest = if dir.join(checkpoint::MANIFEST).is_file() {
            Some(checkpoint::verify_except(dir, is_weight_file)?)
        } else {
            None
        };
        let config_path = dir.join("config.json");
        let config = read_json(&config_path)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            config_path,
            config,
            manifest,
        })
    }

    /// The folder.
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// `model_type` of `config.json` (empty when absent).
    pub(crate) fn model_type(&self) -> &str {
        self.config
            .get("model_type")
            .and_then(|v| v.as_str())
            .unwrap_or("")
    }

    /// `config.json` as the architecture's config type.
    pub(crate) fn config<T: DeserializeOwned>(&self) -> Result<T> {
        serde_json::from_value(self.config.clone())
            .map_err(|e| ModelError::json(&self.config_path, e))
    }

    /// Path of `tokenizer.json`.
    pub(crate) fn tokenizer_path(&self) -> PathBuf {
        self.dir.join("tokenizer.json")
    }

    /// `tokenizer.json`, if the folder has one.
    pub(crate) fn tokenizer(&self) -> Result<Option<Tokenizer>> {
        let path = self.tokenizer_path();
        if !path.is_file() {
            return Ok(None);
        }
        Ok(Some(
            Tokenizer::from_file(&path).map_err(ModelError::tokenizer)?,
        ))
    }

    /// Another JSON file of the folder (`generation_config.json`, ...), if it is there
    /// and parses.
    pub(crate) fn optional_json(&self, name: &str) -> Option<serde_json::Value> {
        read_json(&self.dir.join(name)).ok()
    }

    /// A weight builder over the folder's safetensors files: memory-mapped, or, when the
    /// folder has a manifest, read once front to back and checked against it as they are
    /// read (one pass over the bytes, not a pass to hash and another to load).
    pub(crate) fn weights(&self, device: &Device, mode: WeightMode) -> Result<Weights> {
        let files = safetensors_files(&self.dir)?;
        let Some(manifest) = &self.manifest else {
            let src = SafetensorsSource::open(&files)?;
            return Ok(Weights::new(Arc::new(src), device, mode));
        };
        let mut tensors = std::collections::HashMap::new();
        for file in &files {
            let name = file
                .strip_prefix(&self.dir)
                .unwrap_or(file)
                .to_string_lossy()
                .into_owned();
            let want = manifest.expected(&name).ok_or_else(|| {
                ModelError::InvalidConfig(format!(
                    "{}: the weight file {name} is not in the manifest",
                    self.dir.display()
                ))
            })?;
            tensors.extend(tensor_file::read_verified(file, want, device)?);
        }
        Ok(Weights::new(
            Arc::new(MemorySource::new(tensors)),
            device,
            mode,
        ))
    }
}

/// Whether a manifest entry is a weight file (checked while it is read).
fn is_weight_file(name: &str) -> bool {
    name.ends_with(".safetensors")
}
