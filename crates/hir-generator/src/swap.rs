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
pub const MANIFEST: &str = hir_model::formats::checkpoint::MANIFEST;

/// Resolves `reference` under `root` ([`confine`]: relative, no `..`, and after following
/// symbolic links still inside the root). Returns the canonical root and the folder.
pub fn resolve_under_root(root: Option<&Path>, reference: &str) -> Result<(PathBuf, PathBuf)> {
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
    let root = root.canonicalize().map_err(|source| GeneratorError::Io {
        what: format!("checkpoint root {}", root.display()),
        source,
    })?;
    match confine(&root, &root, "checkpoint", reference)? {
        Some(dir) => Ok((root, dir)),
        None => Err(GeneratorError::invalid(
            "checkpoint",
            format!(
                "`{}` does not exist under the checkpoint root",
                hir_core::text_enum::bounded(reference)
            ),
        )),
    }
}

/// The one confinement check of every path a checkpoint names: the reference to its folder,
/// the folder's own entries, the files its manifest lists, the shards of its weight index.
/// `name` must be relative to `dir` (the checkpoint folder, or the root for a reference), made of plain components (no root, `.`, `..` or NUL), and must
/// lead, once symbolic links are followed, to a place inside `root` (canonical; `dir` lies
/// in it). Returns where it leads, or `None` when nothing is there. `field` is what names it
/// (e.g. `manifest.json`), for the refusal.
pub fn confine(
    root: &Path,
    dir: &Path,
    field: &str,
    name: impl AsRef<Path>,
) -> Result<Option<PathBuf>> {
    let rel = name.as_ref();
    let shown = || {
        let name = rel.to_string_lossy().escape_debug().to_string();
        format!("`{}`", hir_core::text_enum::bounded(&name))
    };
    if rel.as_os_str().is_empty()
        || rel.as_os_str().as_encoded_bytes().contains(&0)
        || rel.components().any(|c| !matches!(c, Component::Normal(_)))
    {
        return Err(GeneratorError::invalid(
            field,
            format!(
                "{} must be a relative path of plain names (no leading `/`, no `.` or `..`)",
                shown()
            ),
        ));
    }
    match dir.join(rel).canonicalize() {
        Ok(real) if real.starts_with(root) => Ok(Some(real)),
        Ok(_) => Err(GeneratorError::invalid(
            field,
            format!(
                "{} leads out of the checkpoint root (a symbolic link)",
                shown()
            ),
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(GeneratorError::invalid(
            field,
            format!(
                "{} cannot be resolved inside the checkpoint root: {e}",
                shown()
            ),
        )),
    }
}

/// Confines every path the checkpoint in `dir` names ([`confine`]) before any of its files
/// is read: each entry of the folder (links included, subfolders walked), then each file
/// `manifest.json` lists and each shard `model.safetensors.index.json` maps. Returns the
/// manifest's bytes and the checkpoint's size in bytes. Blocking.
fn confine_checkpoint(root: &Path, dir: &Path, field: &str) -> Result<(Vec<u8>, u64)> {
    let io = |what: String| move |source| GeneratorError::Io { what, source };
    let mut bytes = 0u64;
    let mut folders = vec![dir.to_path_buf()];
    while let Some(folder) = folders.pop() {
        let entries =
            std::fs::read_dir(&folder).map_err(io(format!("listing {}", folder.display())))?;
        for entry in entries {
            let entry = entry.map_err(io(format!("listing {}", folder.display())))?;
            let path = entry.path();
            let name = path.strip_prefix(dir).unwrap_or(&path);
            let Some(real) = confine(root, dir, field, name)? else {
                continue; // a dangling link: nothing to read
            };
            let kind = entry
                .file_type()
                .map_err(io(format!("reading {}", path.display())))?;
            if kind.is_dir() {
                folders.push(path);
            } else if let Ok(meta) = std::fs::metadata(&real) {
                if meta.is_file() {
                    bytes += meta.len();
                }
            }
        }
    }
    let manifest_path = dir.join(MANIFEST);
    let manifest = std::fs::read(&manifest_path)
        .map_err(|e| GeneratorError::Checkpoint(format!("{MANIFEST}: {e}")))?;
    if let Ok(parsed) =
        serde_json::from_slice::<hir_model::formats::checkpoint::Manifest>(&manifest)
    {
        for name in parsed.files.keys() {
            confine(root, dir, MANIFEST, name)?;
        }
    }
    const INDEX: &str = "model.safetensors.index.json";
    if let Ok(index) = std::fs::read(dir.join(INDEX)) {
        if let Ok(index) = serde_json::from_slice::<serde_json::Value>(&index) {
            let shards = index.get("weight_map").and_then(|m| m.as_object());
            for shard in shards.into_iter().flat_map(|m| m.values()) {
                if let Some(shard) = shard.as_str() {
                    confine(root, dir, INDEX, shard)?;
                }
            }
        }
    }
    Ok((manifest, bytes))
}

/// The served base model with the adapter in `dir` beside it: only the adapter is read. An
/// adapter that cannot be used (its PEFT settings, its shapes, or another base model than
/// `base`) is INVALID_ARGUMENT, naming the field of `field`'s folder at fault.
fn with_adapter(
    dir: &Path,
    field: &str,
    base: &LoadedModel,
    base_sha256: &str,
    device: &Device,
) -> Result<LoadedModel> {
    let refused = |e: hir_model::ModelError| match e {
        hir_model::ModelError::InvalidAdapter {
            field: inner,
            reason,
        } => GeneratorError::invalid(format!("{field}: {inner}"), reason),
        other => checkpoint_error(dir, other),
    };
    if base.num_layers().is_none() {
        return Err(GeneratorError::invalid(
            field,
            format!(
                "is a LoRA adapter; they apply to Llama-family models and this generator serves {}",
                base.info().architecture
            ),
        ));
    }
    let adapter = hir_model::arch::lora::Adapter::read(dir, device).map_err(refused)?;
    adapter.check_base(base_sha256).map_err(refused)?;
    base.with_adapter(&adapter, dir).map_err(refused)
}

/// A loader error as a client may read it: a file whose digest differs from the manifest is
/// named, but its digest is not quoted.
fn checkpoint_error(dir: &Path, err: hir_model::ModelError) -> GeneratorError {
    match err {
        hir_model::ModelError::ChecksumMismatch {
            path, algorithm, ..
        } => {
            let name = path.strip_prefix(dir).unwrap_or(&path);
            GeneratorError::Checkpoint(format!(
                "{} does not match its {algorithm} in {MANIFEST}",
                name.display()
            ))
        }
        other => GeneratorError::Checkpoint(other.to_string()),
    }
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

/// A checkpoint a swap asks for.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// What every file of it must stay inside: the checkpoint root, or an upload's staging
    /// folder.
    pub root: PathBuf,
    /// The checkpoint folder, inside `root`.
    pub dir: PathBuf,
    /// The request field that named the folder, for refusals.
    pub field: &'static str,
    /// The SHA-256 its manifest must have.
    pub sha256: String,
    /// The version it is to serve as.
    pub version: String,
}

/// Confines every path the checkpoint names to its root ([`confine`]), verifies the
/// manifest's digest, then loads the model (which checks every file against the manifest
/// and every tensor's name and shape), and checks that it can replace `current` (same
/// architecture and vocabulary). Runs on a blocking thread and gives up after `deadline`.
pub async fn load_checkpoint(
    candidate: Candidate,
    current: &Serving,
    device: Device,
    mode: WeightMode,
    deadline: Duration,
) -> Result<(Serving, LoadTimes)> {
    let current_info = current.model.info().clone();
    let (base, base_sha256) = (Arc::clone(&current.base), current.base_sha256.clone());
    let work = tokio::task::spawn_blocking(move || -> Result<(Serving, LoadTimes)> {
        let Candidate {
            root,
            dir,
            field,
            sha256: expected_sha256,
            version,
        } = candidate;
        let t0 = Instant::now();
        let canonical = |p: &Path| {
            p.canonicalize().map_err(|source| GeneratorError::Io {
                what: format!("resolving {}", p.display()),
                source,
            })
        };
        let root = canonical(&root)?;
        let dir = canonical(&dir)?;
        if !dir.starts_with(&root) {
            return Err(GeneratorError::invalid(field, "leaves the checkpoint root"));
        }
        let (manifest, bytes) = confine_checkpoint(&root, &dir, field)?;
        let actual = sha256_hex(&manifest);
        if actual != expected_sha256 {
            tracing::warn!(%actual, expected = %expected_sha256, "manifest digest differs");
            return Err(GeneratorError::Checkpoint(format!(
                "manifest.json does not have the expected SHA-256 {expected_sha256}"
            )));
        }
        let verify = t0.elapsed();
        if hir_model::arch::lora::is_adapter(&dir) {
            let model = with_adapter(&dir, field, &base, &base_sha256, &device)?;
            let serving = Serving {
                version: Arc::from(version.as_str()),
                model: Arc::new(model),
                sha256: actual,
                base,
                base_sha256,
                activated_at: SystemTime::now(),
            };
            let load = t0.elapsed() - verify;
            return Ok((
                serving,
                LoadTimes {
                    bytes,
                    verify,
                    load,
                },
            ));
        }
        let model =
            LoadedModel::load(&dir, &device, mode).map_err(|e| checkpoint_error(&dir, e))?;
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
        let model = Arc::new(model);
        let serving = Serving {
            version: Arc::from(version.as_str()),
            base: Arc::clone(&model),
            model,
            base_sha256: actual.clone(),
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

/// A private folder an upload is written into (`upload-<id>`); removed when dropped.
///
/// Beside it, `upload-<id>.lock` is held under an exclusive `flock` for the folder's
/// life, so a generator that died mid-upload (killed, out of memory) leaves a lock nobody
/// holds: [`sweep_staging`] removes such folders, and never one a live process (this or
/// another generator sharing the folder) is writing.
#[derive(Debug)]
pub struct Staging {
    dir: PathBuf,
    lock: PathBuf,
    _held: std::fs::File,
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> GeneratorError {
    move |source| GeneratorError::Io { what, source }
}

impl Staging {
    /// A fresh folder under `parent`, after sweeping what dead uploads left there.
    pub fn new(parent: &Path) -> Result<Self> {
        std::fs::create_dir_all(parent).map_err(io(format!("creating {}", parent.display())))?;
        sweep_staging(parent);
        let name = format!("upload-{}", uuid::Uuid::new_v4());
        // Locked under a name the sweep ignores, then renamed: a sweep never sees the lock
        // file unlocked.
        let fresh = parent.join(format!(".{name}.lock"));
        let held =
            std::fs::File::create(&fresh).map_err(io(format!("creating {}", fresh.display())))?;
        rustix::fs::flock(&held, rustix::fs::FlockOperation::NonBlockingLockExclusive)
            .map_err(|e| io(format!("locking {}", fresh.display()))(e.into()))?;
        let lock = parent.join(format!("{name}.lock"));
        std::fs::rename(&fresh, &lock).map_err(io(format!("creating {}", lock.display())))?;
        let dir = parent.join(name);
        std::fs::create_dir(&dir).map_err(io(format!("creating {}", dir.display())))?;
        Ok(Self {
            dir,
            lock,
            _held: held,
        })
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        // The folder first: a lock file without its folder is swept; never the reverse.
        for (path, folder) in [(&self.dir, true), (&self.lock, false)] {
            let removed = if folder {
                std::fs::remove_dir_all(path)
            } else {
                std::fs::remove_file(path)
            };
            if let Err(err) = removed {
                tracing::warn!(%err, path = %path.display(), "could not remove an upload's staging files");
            }
        }
    }
}

/// Whether no process holds the lock file at `path`: its owner is gone. (Staging names are
/// never reused, so nobody takes such a lock again once its owner has.)
fn unheld(path: &Path) -> std::io::Result<bool> {
    let f = std::fs::File::open(path)?;
    Ok(rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_ok())
}

/// Removes the staging folders (and their lock files) that uploads of dead processes left
/// under `parent`: those whose lock nobody holds, and folders without a lock file. Returns
/// how many uploads it removed. Errors are logged, not returned: a sweep that fails leaves
/// files behind, nothing worse.
pub fn sweep_staging(parent: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(".upload-") && name.ends_with(".lock") {
            // A lock file that was never renamed into place: its upload never began.
            if unheld(&entry.path()).unwrap_or(false) {
                let _ = std::fs::remove_file(entry.path());
            }
            continue;
        }
        let Some(id) = name.strip_prefix("upload-") else {
            continue;
        };
        let (dir, lock) = match id.strip_suffix(".lock") {
            Some(id) => (parent.join(format!("upload-{id}")), entry.path()),
            None => (entry.path(), parent.join(format!("{name}.lock"))),
        };
        let abandoned = match unheld(&lock) {
            Ok(free) => free,
            // No lock file: a folder whose upload already ended, or from an older version.
            Err(e) => e.kind() == std::io::ErrorKind::NotFound && dir.is_dir(),
        };
        if !abandoned {
            continue;
        }
        let gone = |r: std::io::Result<()>| {
            r.or_else(|e| {
                (e.kind() == std::io::ErrorKind::NotFound)
                    .then_some(())
                    .ok_or(e)
            })
        };
        match gone(std::fs::remove_dir_all(&dir)).and_then(|()| gone(std::fs::remove_file(&lock))) {
            Ok(()) => {
                removed += 1;
                tracing::info!(folder = %dir.display(), "removed the staging folder of an upload that never finished");
            }
            Err(err) => {
                tracing::warn!(%err, folder = %dir.display(), "could not remove an abandoned staging folder")
            }
        }
    }
    removed
}

/// Checks an uploaded file name: a plain name, no folders.
pub fn validate_file_name(name: &str) -> Result<()> {
    check_file_name("header.files.name", name)
}

/// Checks an uploaded file name given as `field`: a plain name, no folders, no control
/// characters (NUL included).
pub fn check_file_name(field: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 255
        && !name.chars().any(char::is_control)
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
            field,
            format!(
                "`{}` must be a plain file name (no folders, `.`, `..` or control characters)",
                hir_core::text_enum::bounded(&name.escape_debug().to_string())
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sweep_removes_dead_uploads_and_keeps_live_ones() {
        let parent = std::env::temp_dir().join(format!("hir-staging-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&parent);
        let live = Staging::new(&parent).unwrap();
        std::fs::write(live.dir().join("model.safetensors"), b"half").unwrap();
        // What a killed process leaves: a folder and a lock file nobody holds.
        std::fs::create_dir_all(parent.join("upload-dead/sub")).unwrap();
        std::fs::write(parent.join("upload-dead.lock"), b"").unwrap();
        // A folder without a lock file, and a lock file never renamed into place.
        std::fs::create_dir_all(parent.join("upload-old")).unwrap();
        std::fs::write(parent.join(".upload-new.lock"), b"").unwrap();
        // Not ours: left alone.
        std::fs::write(parent.join("notes.txt"), b"").unwrap();
        assert_eq!(sweep_staging(&parent), 2);
        let mut left: Vec<String> = std::fs::read_dir(&parent)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        let id = live
            .dir()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        assert_eq!(
            left,
            vec!["notes.txt".to_string(), id.clone(), format!("{id}.lock")]
        );
        assert!(
            live.dir().join("model.safetensors").is_file(),
            "a live upload is kept"
        );
        drop(live);
        assert_eq!(sweep_staging(&parent), 0);
        let left: Vec<_> = std::fs::read_dir(&parent).unwrap().collect();
        assert_eq!(
            left.len(),
            1,
            "a finished upload removes its folder and lock"
        );
        std::fs::remove_dir_all(&parent).unwrap();
    }

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
    fn every_path_a_checkpoint_names_stays_in_the_root() {
        let base = std::env::temp_dir().join(format!("hir-confine-{}", std::process::id()));
        let (root, outside) = (base.join("root"), base.join("outside"));
        std::fs::create_dir_all(root.join("ckpt/sub")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(root.join("ckpt/a"), b"a").unwrap();
        std::fs::write(root.join("b"), b"b").unwrap();
        std::fs::write(outside.join("c"), b"c").unwrap();
        std::os::unix::fs::symlink(root.join("b"), root.join("ckpt/in")).unwrap();
        std::os::unix::fs::symlink(outside.join("c"), root.join("ckpt/out")).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("ckpt/sub/away")).unwrap();
        let root = root.canonicalize().unwrap();
        let dir = root.join("ckpt");
        let confined = |name: &str| confine(&root, &dir, "manifest.json", name);
        assert_eq!(confined("a").unwrap(), Some(dir.join("a")));
        assert_eq!(
            confined("in").unwrap(),
            Some(root.join("b")),
            "links inside are followed"
        );
        assert_eq!(confined("missing").unwrap(), None);
        for bad in [
            "/etc/hostname",
            "../b",
            "./a",
            "sub/../a",
            "",
            "a\0",
            "out",
            "sub/away/c",
        ] {
            let err = confined(bad).unwrap_err();
            assert!(
                err.to_string().starts_with("manifest.json: "),
                "{bad:?}: {err}"
            );
            assert!(
                matches!(err, GeneratorError::InvalidArgument { .. }),
                "{bad:?}: {err}"
            );
        }
        let err = confine_checkpoint(&root, &dir, "checkpoint").unwrap_err();
        assert!(err.to_string().starts_with("checkpoint: "), "{err}");
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn file_names_and_digests_are_checked() {
        assert!(validate_file_name("model.safetensors").is_ok());
        for bad in ["", "..", "a/b", "/abs", "."] {
            assert!(validate_file_name(bad).is_err(), "{bad}");
        }
        let err = check_file_name("header.files[1].name", "a\0b").unwrap_err();
        assert!(matches!(err, GeneratorError::InvalidArgument { .. }));
        assert!(
            err.to_string().starts_with("header.files[1].name: `a\\0b`"),
            "{err}"
        );
        assert!(validate_sha256("sha256", &"a".repeat(64)).is_ok());
        assert!(validate_sha256("sha256", &"A".repeat(64)).is_err());
        assert!(validate_sha256("sha256", "abc").is_err());
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
