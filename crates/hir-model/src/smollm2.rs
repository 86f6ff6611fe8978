//! SmolLM2-135M-Instruct, the real small model of the tests, benchmarks and demo: the Q4_1
//! GGUF that `scripts/fetch-model.sh` fetches into `models/` (never committed).

use std::path::{Path, PathBuf};

use crate::error::{ModelError, Result};

/// Where the GGUF lies, relative to the repository root.
pub const GGUF: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

/// The GGUF under `repo_root`, fetched by `scripts/fetch-model.sh` first if it is missing.
pub fn fetch(repo_root: &Path) -> Result<PathBuf> {
    let path = repo_root.join(GGUF);
    if path.is_file() {
        return Ok(path);
    }
    let script = repo_root.join("scripts/fetch-model.sh");
    let failed = |source| ModelError::Io {
        path: script.clone(),
        source,
    };
    let status = std::process::Command::new("bash")
        .arg(&script)
        .status()
        .map_err(failed)?;
    if !status.success() {
        return Err(failed(std::io::Error::other(format!(
            "{status}; it needs python3 with pip and access to PyPI"
        ))));
    }
    Ok(path)
}
