//! The checkpoint format: Hugging Face layout (`config.json`, `model.safetensors`,
//! `tokenizer.json`) plus a `manifest.json` with the sha256 of every file and the BLAKE3 of
//! the weight files, which loading checks them against. Writing a
//! folder ([`write_folder`]) and checking one ([`verify`]): each architecture's `save`
//! writes through the former, hashing the weights as they are written; loading a folder
//! that has a manifest checks its small files with the latter and its weight files while
//! reading them, and refuses a file whose checksum differs.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use hir_core::digest::{Digests, Expected};
use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};

/// Name of the manifest file.
pub const MANIFEST: &str = "manifest.json";

/// `manifest.json`: file name → sha256 (hex).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Format version (1).
    pub version: u32,
    /// sha256 of each file of the checkpoint, by file name.
    pub files: BTreeMap<String, String>,
    /// BLAKE3 of the weight files (`*.safetensors`), by file name: what loading checks them
    /// against while it reads them, several times faster than SHA-256. A file without one
    /// (a manifest written before, or by hand) is checked against its SHA-256.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub blake3: BTreeMap<String, String>,
    /// For an adapter (a LoRA adapter folder): the digest of the base model it was trained on
    /// ([`model_digest`]); it may only be applied to that model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_model_sha256: Option<String>,
}

impl Manifest {
    /// A manifest listing the weight file `name` with its `digests` (as
    /// [`crate::formats::tensor_file::write`] returns them); the caller adds the other files.
    pub(crate) fn for_weights(
        name: &str,
        digests: Digests,
        base_model_sha256: Option<String>,
    ) -> Self {
        Self {
            version: 1,
            files: BTreeMap::from([(name.to_string(), digests.sha256)]),
            blake3: digests
                .blake3
                .map(|b3| BTreeMap::from([(name.to_string(), b3)]))
                .unwrap_or_default(),
            base_model_sha256,
        }
    }

    /// The digest a listed file is checked against when it is read: its BLAKE3 if the
    /// manifest has one, else its SHA-256; `None` if the file is not listed.
    pub fn expected(&self, name: &str) -> Option<Expected<'_>> {
        match self.blake3.get(name) {
            Some(b3) if self.files.contains_key(name) => Some(Expected::Blake3(b3)),
            _ => self.files.get(name).map(|s| Expected::Sha256(s)),
        }
    }
}

/// The identity of a model as generators and adapters name it: the SHA-256 of a GGUF file,
/// of a folder's `manifest.json`, or, for a folder without one, of the list of its
/// `config.json` and weight files with their digests.
pub fn model_digest(path: &Path) -> Result<String> {
    if !path.is_dir() {
        return sha256_file(path);
    }
    let manifest = path.join(MANIFEST);
    if manifest.is_file() {
        return sha256_file(&manifest);
    }
    let mut listing = String::new();
    let mut names = vec!["config.json".to_string()];
    for f in crate::formats::safetensors_files(path)? {
        if let Some(n) = f.file_name() {
            names.push(n.to_string_lossy().into_owned());
        }
    }
    for name in names {
        let digest = sha256_file(&path.join(&name))?;
        listing.push_str(&format!("{digest}  {name}\n"));
    }
    Ok(hir_core::digest::sha256_hex(listing.as_bytes()))
}

/// Writes `dir/manifest.json`.
pub(crate) fn write_manifest(dir: &Path, m: &Manifest) -> Result<()> {
    let mp = dir.join(MANIFEST);
    write(
        &mp,
        &serde_json::to_vec_pretty(m).map_err(|e| ModelError::json(&mp, e))?,
    )
}

/// sha256 of a file, hex encoded.
pub fn sha256_file(path: &Path) -> Result<String> {
    hir_core::digest::sha256_file(path).map_err(|e| ModelError::io(path, e))
}

/// Checks every file listed in `dir/manifest.json`.
pub fn verify(dir: &Path) -> Result<Manifest> {
    verify_except(dir, |_| false)
}

/// Checks the files listed in `dir/manifest.json` other than those `skip` names (which
/// the caller checks as it reads them); returns the manifest.
pub(crate) fn verify_except(dir: &Path, skip: impl Fn(&str) -> bool) -> Result<Manifest> {
    let path = dir.join(MANIFEST);
    let bytes = std::fs::read(&path).map_err(|e| ModelError::io(&path, e))?;
    let m: Manifest = serde_json::from_slice(&bytes).map_err(|e| ModelError::json(&path, e))?;
    for (name, want) in &m.files {
        let p = dir.join(name);
        if !p.is_file() {
            return Err(ModelError::MissingFile { path: p });
        }
        if skip(name) {
            continue;
        }
        let got = sha256_file(&p)?;
        if &got != want {
            return Err(ModelError::ChecksumMismatch {
                path: p,
                algorithm: "SHA-256",
                expected: want.clone(),
                actual: got,
            });
        }
    }
    Ok(m)
}

fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).map_err(|e| ModelError::io(path, e))
}

/// The `torch_dtype` of `config.json` for weights of this dtype.
pub(crate) fn torch_dtype(dtype: candle_core::DType) -> &'static str {
    match dtype {
        candle_core::DType::BF16 => "bfloat16",
        candle_core::DType::F16 => "float16",
        _ => "float32",
    }
}

/// Writes a checkpoint folder: `config.json`, `model.safetensors`, the
/// tokenizer files if given, and `manifest.json` over all of them.
pub fn write_folder(
    dir: &Path,
    config: &serde_json::Value,
    tensors: &HashMap<String, candle_core::Tensor>,
    tokenizer: Option<&tokenizers::Tokenizer>,
    chat_template: Option<&str>,
) -> Result<Manifest> {
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    let cfg_path = dir.join("config.json");
    write(
        &cfg_path,
        &serde_json::to_vec_pretty(config).map_err(|e| ModelError::json(&cfg_path, e))?,
    )?;
    let weights = crate::formats::tensor_file::write(
        &dir.join("model.safetensors"),
        tensors
            .iter()
            .map(|(n, t)| {
                (
                    n.clone(),
                    crate::formats::tensor_file::Entry::Tensor(t.clone()),
                )
            })
            .collect(),
    )?;
    if let Some(tok) = tokenizer {
        tok.save(dir.join("tokenizer.json"), false)
            .map_err(ModelError::tokenizer)?;
    }
    if let Some(t) = chat_template {
        let p = dir.join("tokenizer_config.json");
        write(
            &p,
            &serde_json::to_vec_pretty(&serde_json::json!({ "chat_template": t }))
                .map_err(|e| ModelError::json(&p, e))?,
        )?;
    }
    // The weights were hashed as they were written; the small files are read back.
    let mut m = Manifest::for_weights("model.safetensors", weights, None);
    for name in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        let p = dir.join(name);
        if p.is_file() {
            m.files.insert(name.to_string(), sha256_file(&p)?);
        }
    }
    write_manifest(dir, &m)?;
    Ok(m)
}
