//! Safetensors files streamed one tensor at a time and hashed on the way.
//!
//! [`write`] never assembles a file in memory (each tensor's bytes are produced when they
//! are written) and returns the file's SHA-256 and BLAKE3 without reading it back.
//! [`read_verified`] reads a file once, front to back, hashing as it goes, into tensors, and
//! keeps them only if the digest is the expected one: the check and the load are one pass
//! over the bytes.
//!
//! The format is safetensors': an 8-byte little-endian header length, a JSON header
//! naming each tensor's dtype, shape and byte range, then the data, little-endian.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::io::{BufWriter, Read, Write};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use hir_core::digest::{Digests, Expected, HashingWriter};
use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};

/// Longest header accepted (the safetensors limit).
const MAX_HEADER: u64 = 100 << 20;

/// One tensor to write.
pub enum Entry<'a> {
    /// A candle tensor, copied out when it is written.
    Tensor(Tensor),
    /// f32 values, written as they are, with their shape.
    F32(Cow<'a, [f32]>, Vec<usize>),
}

impl Entry<'_> {
    fn dtype(&self) -> DType {
        match self {
            Entry::Tensor(t) => t.dtype(),
            Entry::F32(..) => DType::F32,
        }
    }

    fn shape(&self) -> Vec<usize> {
        match self {
            Entry::Tensor(t) => t.dims().to_vec(),
            Entry::F32(_, shape) => shape.clone(),
        }
    }

    fn byte_len(&self) -> usize {
        self.shape().iter().product::<usize>() * self.dtype().size_in_bytes()
    }

    fn bytes(&self) -> Cow<'_, [u8]> {
        match self {
            Entry::F32(values, _) => Cow::Borrowed(bytemuck::cast_slice(values.as_ref())),
            Entry::Tensor(t) => safetensors::View::data(t),
        }
    }
}

/// A header entry.
#[derive(Debug, Serialize, Deserialize)]
struct Info {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: [u64; 2],
}

/// The dtypes these files hold, with their names in the header.
const DTYPES: [(DType, &str); 3] = [
    (DType::F32, "F32"),
    (DType::BF16, "BF16"),
    (DType::F16, "F16"),
];

fn dtype_name(d: DType) -> Result<&'static str> {
    DTYPES
        .iter()
        .find(|(t, _)| *t == d)
        .map(|(_, name)| *name)
        .ok_or_else(|| {
            ModelError::InvalidRequest(format!("{d:?} tensors are not written by this format"))
        })
}

fn dtype_of(name: &str) -> Option<DType> {
    DTYPES.iter().find(|(_, n)| *n == name).map(|(t, _)| *t)
}

/// Writes `entries` (names sorted; data in that order) to `path` and returns the file's
/// SHA-256 and BLAKE3, computed as it was written. The file is flushed to disk.
pub fn write(path: &Path, mut entries: Vec<(String, Entry<'_>)>) -> Result<Digests> {
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    let mut header = BTreeMap::new();
    let mut at = 0u64;
    for (name, e) in &entries {
        let len = e.byte_len() as u64;
        header.insert(
            name.as_str(),
            Info {
                dtype: dtype_name(e.dtype())?.to_string(),
                shape: e.shape(),
                data_offsets: [at, at + len],
            },
        );
        at += len;
    }
    let mut json = serde_json::to_vec(&header).map_err(|e| ModelError::json(path, e))?;
    // Data starts on an 8-byte boundary, as the reference writer pads it.
    json.resize(json.len().next_multiple_of(8), b' ');
    let io = |e| ModelError::io(path, e);
    let file = std::fs::File::create(path).map_err(io)?;
    let mut out = HashingWriter::with_blake3(BufWriter::with_capacity(1 << 20, file));
    out.write_all(&(json.len() as u64).to_le_bytes())
        .map_err(io)?;
    out.write_all(&json).map_err(io)?;
    for (_, e) in &entries {
        out.write_all(&e.bytes()).map_err(io)?;
    }
    let (writer, digests) = out.finish();
    let file = writer.into_inner().map_err(|e| io(e.into_error()))?;
    file.sync_all().map_err(io)?;
    Ok(digests)
}

/// Reads the safetensors file at `path` in one pass, hashing it, and returns its tensors
/// (on `device`) if its digest is `expected`. A file that is truncated, malformed, or
/// differs from its digest is an error and nothing of it is kept.
///
/// Reading and hashing overlap: each block read is handed to a second thread that hashes
/// it while the next is read, so the pass costs about the longer of the two, not their sum
/// (with a BLAKE3, the read).
pub fn read_verified(
    path: &Path,
    expected: Expected<'_>,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    let io = |e| ModelError::io(path, e);
    let file = std::fs::File::open(path).map_err(io)?;
    let size = file.metadata().map_err(io)?.len();
    let mut r = std::io::BufReader::with_capacity(1 << 20, file);
    let bad = |why: String| ModelError::InvalidConfig(format!("{}: {why}", path.display()));
    let mut len = [0u8; 8];
    r.read_exact(&mut len).map_err(io)?;
    let header_len = u64::from_le_bytes(len);
    if header_len > MAX_HEADER || header_len + 8 > size {
        return Err(bad(format!(
            "header of {header_len} bytes in a file of {size}"
        )));
    }
    let mut json = vec![0u8; header_len as usize];
    r.read_exact(&mut json).map_err(io)?;
    let mut header: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(&json).map_err(|e| ModelError::json(path, e))?;
    header.remove("__metadata__");
    let mut infos = header
        .into_iter()
        .map(|(name, v)| {
            let info: Info = serde_json::from_value(v).map_err(|e| ModelError::json(path, e))?;
            let dtype = dtype_of(&info.dtype)
                .ok_or_else(|| bad(format!("{name}: unsupported dtype {}", info.dtype)))?;
            Ok((name, dtype, info))
        })
        .collect::<Result<Vec<_>>>()?;
    infos.sort_by_key(|(_, _, i)| i.data_offsets);
    let data_len = size - 8 - header_len;
    let mut at = 0u64;
    for (name, dtype, info) in &infos {
        let [begin, end] = info.data_offsets;
        let n: usize = info.shape.iter().product();
        if begin != at
            || end < begin
            || end > data_len
            || (end - begin) as usize != n * dtype.size_in_bytes()
        {
            return Err(bad(format!(
                "{name}: byte range {begin}..{end} does not follow {at} or fit its shape"
            )));
        }
        at = end;
    }
    if at != data_len {
        return Err(bad(format!(
            "{} bytes after the last tensor",
            data_len - at
        )));
    }

    // Each block goes to the hashing thread with the name and shape of its tensor (none
    // for the header) and comes back once hashed.
    type Hashed = (Option<(String, Vec<usize>)>, DType, Block);
    let (read, (actual, blocks)) = std::thread::scope(|scope| {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Hashed>(2);
        let hasher = scope.spawn(move || {
            let mut h = expected.hasher();
            let mut blocks = Vec::new();
            for item in rx {
                h.update(item.2.bytes());
                blocks.push(item);
            }
            (h.finish(), blocks)
        });
        let read = (|| -> Result<()> {
            let send = |item| {
                tx.send(item)
                    .map_err(|_| bad("the hashing thread stopped".into()))
            };
            let mut head = len.to_vec();
            head.extend_from_slice(&json);
            send((None, DType::U8, Block::Bytes(head)))?;
            for (name, dtype, info) in infos {
                let n: usize = info.shape.iter().product();
                let block = if dtype == DType::F32 {
                    let mut values = vec![0f32; n];
                    r.read_exact(bytemuck::cast_slice_mut(&mut values))
                        .map_err(io)?;
                    Block::Values(values)
                } else {
                    let mut bytes = vec![0u8; n * dtype.size_in_bytes()];
                    r.read_exact(&mut bytes).map_err(io)?;
                    Block::Bytes(bytes)
                };
                send((Some((name, info.shape)), dtype, block))?;
            }
            Ok(())
        })();
        drop(tx);
        let hashed = hasher
            .join()
            .unwrap_or_else(|_| (String::new(), Vec::new()));
        (read, hashed)
    });
    read?;
    if actual != expected.hex() {
        return Err(ModelError::ChecksumMismatch {
            path: path.to_path_buf(),
            algorithm: expected.algorithm(),
            expected: expected.hex().to_string(),
            actual,
        });
    }
    let mut tensors = HashMap::with_capacity(blocks.len());
    for (tensor, dtype, block) in blocks {
        let Some((name, shape)) = tensor else {
            continue;
        };
        let t = match block {
            Block::Values(values) => Tensor::from_vec(values, shape, device)?,
            Block::Bytes(bytes) => Tensor::from_raw_buffer(&bytes, dtype, &shape, device)?,
        };
        tensors.insert(name, t);
    }
    Ok(tensors)
}

/// One block of a file on its way through the hashing thread.
enum Block {
    /// Raw bytes (the header, tensors other than f32).
    Bytes(Vec<u8>),
    /// An f32 tensor's values.
    Values(Vec<f32>),
}

impl Block {
    fn bytes(&self) -> &[u8] {
        match self {
            Block::Bytes(b) => b,
            Block::Values(v) => bytemuck::cast_slice(v),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("hir-tensor-file-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn written_files_load_in_candle_and_read_back_verified() {
        let dev = Device::Cpu;
        let dir = scratch("roundtrip");
        let path = dir.join("t.safetensors");
        let a = Tensor::arange(0f32, 6.0, &dev)
            .unwrap()
            .reshape((2, 3))
            .unwrap();
        let b = Tensor::new(&[1.5f32, -2.0], &dev)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let moments = [0.25f32, 0.5, 0.75];
        let digests = write(
            &path,
            vec![
                ("b".into(), Entry::Tensor(b.clone())),
                ("m".into(), Entry::F32(Cow::Borrowed(&moments), vec![3])),
                ("a".into(), Entry::Tensor(a.clone())),
            ],
        )
        .unwrap();
        // Both digests are those of the file as it lies on disk.
        let on_disk = std::fs::read(&path).unwrap();
        assert_eq!(digests.sha256, hir_core::digest::sha256_hex(&on_disk));
        let b3 = hir_core::digest::blake3_hex(&on_disk);
        assert_eq!(digests.blake3.as_deref(), Some(b3.as_str()));
        // The reference reader takes it.
        let theirs = candle_core::safetensors::load(&path, &dev).unwrap();
        assert_eq!(
            theirs["a"].to_vec2::<f32>().unwrap(),
            a.to_vec2::<f32>().unwrap()
        );
        assert_eq!(theirs["m"].to_vec1::<f32>().unwrap(), moments);
        // Read back checked against either digest.
        let by_sha = read_verified(&path, Expected::Sha256(&digests.sha256), &dev).unwrap();
        let ours = read_verified(&path, Expected::Blake3(&b3), &dev).unwrap();
        assert_eq!(ours.len(), 3);
        assert_eq!(by_sha.len(), 3);
        assert_eq!(
            ours["a"].to_vec2::<f32>().unwrap(),
            a.to_vec2::<f32>().unwrap()
        );
        assert_eq!(
            ours["b"]
                .to_dtype(DType::F32)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            [1.5, -2.0]
        );
        // A file candle wrote reads the same.
        let other = dir.join("candle.safetensors");
        candle_core::safetensors::save(&HashMap::from([("a".to_string(), a.clone())]), &other)
            .unwrap();
        let d = hir_core::digest::sha256_file(&other).unwrap();
        assert_eq!(
            read_verified(&other, Expected::Sha256(&d), &dev).unwrap()["a"].dims(),
            &[2, 3]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_changed_truncated_or_malformed_file_is_refused() {
        let dev = Device::Cpu;
        let dir = scratch("refused");
        let path = dir.join("t.safetensors");
        let values = vec![1f32; 1000];
        let digests = write(
            &path,
            vec![(
                "w".into(),
                Entry::F32(Cow::Borrowed(&values), vec![10, 100]),
            )],
        )
        .unwrap();
        let b3 = digests.blake3.unwrap();
        let digest = Expected::Blake3(&b3);
        let bytes = std::fs::read(&path).unwrap();

        let mut flipped = bytes.clone();
        *flipped.last_mut().unwrap() ^= 1;
        std::fs::write(&path, &flipped).unwrap();
        for expected in [digest, Expected::Sha256(&digests.sha256)] {
            let err = read_verified(&path, expected, &dev).unwrap_err();
            match err {
                ModelError::ChecksumMismatch { algorithm, .. } => {
                    assert_eq!(algorithm, expected.algorithm())
                }
                other => panic!("expected a checksum mismatch, got {other}"),
            }
        }

        std::fs::write(&path, &bytes[..bytes.len() - 4]).unwrap();
        assert!(read_verified(&path, digest, &dev).is_err());

        let mut longer = bytes.clone();
        longer.extend_from_slice(&[0; 8]);
        std::fs::write(&path, &longer).unwrap();
        let err = read_verified(&path, digest, &dev).unwrap_err();
        assert!(err.to_string().contains("after the last tensor"), "{err}");

        let mut huge = bytes.clone();
        huge[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        std::fs::write(&path, &huge).unwrap();
        assert!(read_verified(&path, digest, &dev).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
