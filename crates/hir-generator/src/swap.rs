//! Loading new weights: resolving a checkpoint reference safely, verifying its digests,
//! building the model off the async workers, and staging uploads.

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use candle_core::Device;
use hir_model::{LoadedModel, WeightMode};

use crate::engine::Serving;
use crate::error::{GeneratorError, Result};

/// The manifest file every checkpoint carries.
pub const MANIFEST: &str = hir_model::checkpoint::MANIFEST;

/// Resolves `reference` under `root`: relative, no `..`, and after following symbolic links
/// still inside the root.
pub fn resolve_under_root(root: Option<&Path>, reference: &str) -> Result<PathBuf> {
    let Some(root) = root else {
        return Err(GeneratorError::FailedPrecondition(
            "this generator has no checkpoint root configured (swap.checkpoint_root); use UploadWeights".into(),
        ));
    };
    if reference.is_empty() {
        return Err(GeneratorError::invalid(
            "checkpoint",
            "is empty; give a folder relative to the checkpoint root",
        ));
    }
    let rel = Path::new(reference);
    if rel.is_absolute() || rel.components().any(|c| !matches!(c, Component::Normal(_))) {
        return Err(GeneratorError::invalid(
            "checkpoint",
            format!("`{reference}` must be a relative path without `..` or `.` components"),
        ));
    }
    let io = |what: String| move |source| GeneratorError::Io { what, source };
    let root = root
        .canonicalize()
        .map_err(io(format!("checkpoint root {}", root.display())))?;
    let path = root.join(rel).canonicalize().map_err(|_| {
        GeneratorError::invalid(
            "checkpoint",
            format!("`{reference}` does not exist under the checkpoint root"),
        )
    })?;
    if !path.starts_with(&root) {
        return Err(GeneratorError::invalid(
            "checkpoint",
            format!("`{reference}` leaves the checkpoint root"),
        ));
    }
    Ok(path)
}

pub use hir_core::digest::sha256_hex;

/// Checks that `expected` is a SHA-256 in lowercase hex.
pub fn validate_sha256(field: &str, expected: &str) -> Result<()> {
    if !hir_core::digest::is_sha256_hex(expected) {
        return Err(GeneratorError::invalid(
            field,
            "must be 64 lowercase hex digits (the SHA-256 of manifest.json)",
        ));
    }
    Ok(())
}

/// What a load took.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoadTimes {
    /// Bytes of the checkpoint's files.
    pub bytes: u64,
    /// Reading and hashing the manifest (file digests are checked while loading).
    pub verify: Duration,
    /// Building the model, file digests included.
    pub load: Duration,
}

/// Verifies `dir`'s manifest digest against `expected`, then loads the model (which checks
/// every file against the manifest and every tensor's name and shape), and checks that it
/// can replace `current` (same architecture and vocabulary). Runs on a blocking thread and
/// gives up after `deadline`.
pub async fn load_checkpoint(
    dir: PathBuf,
    expected_sha256: String,
    version: String,
    current: &Serving,
    device: Device,
    mode: WeightMode,
    deadline: Duration,
) -> Result<(Serving, LoadTimes)> {
    let current_info = current.model.info().clone();
    let work = tokio::task::spawn_blocking(move || -> Result<(Serving, LoadTimes)> {
        let t0 = Instant::now();
        let manifest_path = dir.join(MANIFEST);
        let manifest = std::fs::read(&manifest_path)
            .map_err(|e| GeneratorError::Checkpoint(format!("{}: {e}", manifest_path.display())))?;
        let actual = sha256_hex(&manifest);
        if actual != expected_sha256 {
            return Err(GeneratorError::Checkpoint(format!(
                "manifest.json has SHA-256 {actual}, not the expected {expected_sha256}"
            )));
        }
        let bytes = std::fs::read_dir(&dir)
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok()?.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0);
        let verify = t0.elapsed();
        let model = LoadedModel::load(&dir, &device, mode)
            .map_err(|e| GeneratorError::Checkpoint(e.to_string()))?;
        let info = model.info();
        if info.architecture != current_info.architecture
            || info.vocab_size != current_info.vocab_size
        {
            return Err(GeneratorError::Checkpoint(format!(
                "it is a {} model with {} tokens of vocabulary; the served model is {} with {}",
                info.architecture,
                info.vocab_size,
                current_info.architecture,
                current_info.vocab_size
            )));
        }
        let serving = Serving {
            version: Arc::from(version.as_str()),
            model: Arc::new(model),
            sha256: actual,
            activated_at: SystemTime::now(),
        };
        Ok((
            serving,
            LoadTimes {
                bytes,
                verify,
                load: t0.elapsed() - verify,
            },
        ))
    });
    match tokio::time::timeout(deadline, work).await {
        Ok(Ok(result)) => result,
        Ok(Err(join)) => Err(GeneratorError::Checkpoint(format!(
            "loading panicked: {join}"
        ))),
        Err(_) => Err(GeneratorError::DeadlineExceeded(
            "loading the checkpoint",
            deadline,
        )),
    }
}

/// A private folder an upload is written into; removed when dropped.
#[derive(Debug)]
pub struct Staging {
    dir: PathBuf,
}

impl Staging {
    /// A fresh folder under `parent`.
    pub fn new(parent: &Path) -> Result<Self> {
        let dir = parent.join(format!("upload-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).map_err(|source| GeneratorError::Io {
            what: format!("creating {}", dir.display()),
            source,
        })?;
        Ok(Self { dir })
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if let Err(err) = std::fs::remove_dir_all(&self.dir) {
            tracing::warn!(%err, dir = %self.dir.display(), "could not remove an upload's staging folder");
        }
    }
}

/// Checks an uploaded file name: a plain name, no folders.
pub fn validate_file_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 255
        && Path::new(name).components().count() == 1
        && matches!(
            Path::new(name).components().next(),
            Some(Component::Normal(_))
        )
        && !name.contains(['/', '\\']);
    if ok {
        Ok(())
    } else {
        Err(GeneratorError::invalid(
            "header.files.name",
            format!("`{name}` must be a plain file name"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_cannot_leave_the_root() {
        let root = std::env::temp_dir().join(format!("hir-root-{}", std::process::id()));
        std::fs::create_dir_all(root.join("ckpt/a")).unwrap();
        let outside = std::env::temp_dir().join(format!("hir-outside-{}", std::process::id()));
        std::fs::create_dir_all(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("ckpt/link")).unwrap();
        assert!(resolve_under_root(Some(&root), "ckpt/a").is_ok());
        for bad in [
            "../x",
            "/etc",
            "ckpt/../ckpt/a",
            "./ckpt/a",
            "",
            "ckpt/link",
            "missing",
        ] {
            let err = resolve_under_root(Some(&root), bad).unwrap_err();
            assert!(
                matches!(err, GeneratorError::InvalidArgument { .. }),
                "{bad}: {err}"
            );
        }
        assert!(matches!(
            resolve_under_root(None, "ckpt/a"),
            Err(GeneratorError::FailedPrecondition(_))
        ));
        std::fs::remove_dir_all(&root).unwrap();
        std::fs::remove_dir_all(&outside).unwrap();
    }

    #[test]
    fn file_names_and_digests_are_checked() {
        assert!(validate_file_name("model.safetensors").is_ok());
        for bad in ["", "..", "a/b", "/abs", "."] {
            assert!(validate_file_name(bad).is_err(), "{bad}");
        }
        assert!(validate_sha256("sha256", &"a".repeat(64)).is_ok());
        assert!(validate_sha256("sha256", &"A".repeat(64)).is_err());
        assert!(validate_sha256("sha256", "abc").is_err());
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
