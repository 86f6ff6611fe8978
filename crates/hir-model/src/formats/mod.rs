//! Files on disk: how weights are held once read ([`weights`]: dense, quantized or
//! low-rank, from any source), the safetensors format ([`tensor_file`]), checkpoint
//! folders with their manifest ([`checkpoint`]) and Hugging Face model folders
//! ([`hf_folder`]). Architecture-specific formats (GGUF, which only Llama-family models
//! come in) sit with their architecture.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

use crate::error::{ModelError, Result};

pub mod checkpoint;
pub(crate) mod hf_folder;
pub mod tensor_file;
pub mod weights;

/// A JSON file, parsed.
pub(crate) fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let bytes = std::fs::read(path).map_err(|e| ModelError::io(path, e))?;
    serde_json::from_slice(&bytes).map_err(|e| ModelError::json(path, e))
}

/// The weight files of a Hugging Face folder: `model.safetensors` or the
/// shards named by `model.safetensors.index.json`.
pub(crate) fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if !index.is_file() {
        return Err(ModelError::MissingFile { path: single });
    }
    let v: serde_json::Value = read_json(&index)?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| ModelError::InvalidConfig(format!("{}: no weight_map", index.display())))?;
    let mut files: Vec<PathBuf> = map
        .values()
        .filter_map(|f| f.as_str())
        .map(|f| dir.join(f))
        .collect();
    files.sort();
    files.dedup();
    Ok(files)
}
