//! SmolLM2-135M-Instruct, the generator's default model and the real small model of the
//! demo, tests and benchmarks: the Q4_1 GGUF that `scripts/fetch-model.sh` fetches into
//! `models/` (never committed).

use std::path::{Path, PathBuf};

/// Where the GGUF lies, relative to the repository root.
pub const SMOLLM2_GGUF: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

/// The GGUF under `repo_root`, fetched by `scripts/fetch-model.sh` first if it is missing.
pub fn fetch_smollm2(repo_root: &Path) -> std::io::Result<PathBuf> {
    let path = repo_root.join(SMOLLM2_GGUF);
    if path.is_file() {
        return Ok(path);
    }
    let script = repo_root.join("scripts/fetch-model.sh");
    let failed = |why: String| std::io::Error::other(format!("{}: {why}", script.display()));
    let status = std::process::Command::new("bash")
        .arg(&script)
        .status()
        .map_err(|e| failed(e.to_string()))?;
    if !status.success() {
        return Err(failed(format!(
            "{status}; it needs python3 and access to PyPI"
        )));
    }
    Ok(path)
}
