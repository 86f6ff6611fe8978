//! Digests in lowercase hex. SHA-256 identifies checkpoints, manifests and task files
//! throughout hindsight. BLAKE3 is what weight files are checked against when they are
//! loaded, where their writer recorded one: on one core it hashes several times faster than
//! SHA-256 (which, even with the CPU's SHA instructions, is slower than reading the file from
//! the page cache), so checking a file while it is read costs no more than the read.

use std::io::Write;
use std::path::Path;

use sha2::{Digest, Sha256};

/// Lowercase hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// Lowercase hex BLAKE3 of `bytes`.
pub fn blake3_hex(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex().to_string()
}

/// Lowercase hex SHA-256 of the file at `path`, read in 1 MiB chunks.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let file = std::fs::File::open(path)?;
    let mut hasher = HashingWriter::new(std::io::sink());
    std::io::copy(
        &mut std::io::BufReader::with_capacity(1 << 20, file),
        &mut hasher,
    )?;
    Ok(hasher.finish().1.sha256)
}

/// Whether `s` is a SHA-256 (or a BLAKE3) as written here: 64 lowercase hex digits.
pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The digests of what passed through a [`HashingWriter`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Digests {
    /// SHA-256, always computed.
    pub sha256: String,
    /// BLAKE3, if the writer was asked for it ([`HashingWriter::with_blake3`]).
    pub blake3: Option<String>,
}

/// A writer that hashes every byte written through it: a file and its digest in one pass.
#[derive(Debug)]
pub struct HashingWriter<W> {
    inner: W,
    sha256: Hasher,
    blake3: Option<Hasher>,
}

impl<W: Write> HashingWriter<W> {
    /// Computes the SHA-256 of what is written to `inner`.
    pub fn new(inner: W) -> Self {
        Self {
            inner,
            sha256: Hasher::sha256(),
            blake3: None,
        }
    }

    /// Computes the SHA-256 and the BLAKE3 of what is written to `inner`.
    pub fn with_blake3(inner: W) -> Self {
        Self {
            blake3: Some(Hasher::blake3()),
            ..Self::new(inner)
        }
    }

    /// The writer and the digests of everything written.
    pub fn finish(self) -> (W, Digests) {
        let digests = Digests {
            sha256: self.sha256.finish(),
            blake3: self.blake3.map(Hasher::finish),
        };
        (self.inner, digests)
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.sha256.update(&buf[..n]);
        if let Some(b) = &mut self.blake3 {
            b.update(&buf[..n]);
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// A digest that bytes are checked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expected<'a> {
    /// A SHA-256, lowercase hex.
    Sha256(&'a str),
    /// A BLAKE3, lowercase hex.
    Blake3(&'a str),
}

impl<'a> Expected<'a> {
    /// The expected digest, lowercase hex.
    pub fn hex(&self) -> &'a str {
        match self {
            Expected::Sha256(h) | Expected::Blake3(h) => h,
        }
    }

    /// The algorithm's name, for messages.
    pub fn algorithm(&self) -> &'static str {
        match self {
            Expected::Sha256(_) => "SHA-256",
            Expected::Blake3(_) => "BLAKE3",
        }
    }

    /// A hasher of this digest's algorithm.
    pub fn hasher(&self) -> Hasher {
        match self {
            Expected::Sha256(_) => Hasher::sha256(),
            Expected::Blake3(_) => Hasher::blake3(),
        }
    }
}

/// A running digest of either algorithm (see [`Expected::hasher`]).
#[derive(Debug, Clone)]
pub enum Hasher {
    /// SHA-256.
    Sha256(Sha256),
    /// BLAKE3.
    Blake3(Box<blake3::Hasher>),
}

impl Hasher {
    /// A new SHA-256.
    pub fn sha256() -> Self {
        Hasher::Sha256(Sha256::new())
    }

    /// A new BLAKE3.
    pub fn blake3() -> Self {
        Hasher::Blake3(Box::default())
    }

    /// Hashes `bytes`.
    pub fn update(&mut self, bytes: &[u8]) {
        match self {
            Hasher::Sha256(h) => h.update(bytes),
            Hasher::Blake3(h) => {
                h.update(bytes);
            }
        }
    }

    /// The digest of everything hashed, lowercase hex.
    pub fn finish(self) -> String {
        match self {
            Hasher::Sha256(h) => hex(&h.finalize()),
            Hasher::Blake3(h) => h.finalize().to_hex().to_string(),
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_known_digest_of_abc_in_memory_and_on_disk() {
        let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(sha256_hex(b"abc"), abc);
        let path = std::env::temp_dir().join(format!("hir-digest-{}", std::process::id()));
        std::fs::write(&path, b"abc").unwrap();
        assert_eq!(sha256_file(&path).unwrap(), abc);
        std::fs::remove_file(&path).unwrap();
        assert!(is_sha256_hex(abc));
        assert!(!is_sha256_hex(&abc.to_uppercase()));
        assert!(!is_sha256_hex(&abc[1..]));
    }

    #[test]
    fn the_hashing_writer_digests_what_passes_through() {
        let abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        // BLAKE3 of "abc", as the reference implementation gives it.
        let abc_b3 = "6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85";
        let mut w = HashingWriter::new(Vec::new());
        w.write_all(b"a").unwrap();
        w.write_all(b"bc").unwrap();
        let (bytes, digests) = w.finish();
        assert_eq!(bytes.as_slice(), &b"abc"[..]);
        assert_eq!((digests.sha256.as_str(), digests.blake3), (abc, None));
        let mut w = HashingWriter::with_blake3(Vec::new());
        w.write_all(b"ab").unwrap();
        w.write_all(b"c").unwrap();
        let digests = w.finish().1;
        assert_eq!(digests.sha256, abc);
        assert_eq!(digests.blake3.as_deref(), Some(abc_b3));
        assert_eq!(blake3_hex(b"abc"), abc_b3);
        // The checking side agrees with the writing side, whatever the split.
        for (expected, want) in [
            (Expected::Sha256(abc), abc),
            (Expected::Blake3(abc_b3), abc_b3),
        ] {
            let mut h = expected.hasher();
            h.update(b"a");
            h.update(b"");
            h.update(b"bc");
            assert_eq!(h.finish(), want, "{}", expected.algorithm());
            assert_eq!(expected.hex(), want);
        }
    }
}
