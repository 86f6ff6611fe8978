//! `UploadWeights`: a checkpoint streamed in chunks into a staging folder, every message
//! checked against the header that announced the files.

use std::collections::HashMap;

use hir_proto::pb;
use hir_runtime::fault;
use tokio::io::AsyncWriteExt;
use tonic::{Status, Streaming};

use super::Generator;
use crate::error::{GeneratorError, Result};
use crate::swap;

impl Generator {
    /// Receives an upload into a new staging folder; returns it with the upload's header.
    pub(super) async fn receive_upload(
        &self,
        mut stream: Streaming<pb::UploadWeightsRequest>,
    ) -> Result<(swap::Staging, pb::UploadHeader)> {
        let first = stream.message().await.map_err(|s| received("header", &s))?;
        let Some(pb::UploadWeightsRequest {
            part: Some(pb::upload_weights_request::Part::Header(header)),
        }) = first
        else {
            return Err(GeneratorError::invalid(
                "header",
                "the first message of an upload must be its header",
            ));
        };
        check_version_fields(&header.version, &header.sha256)?;
        let mut sizes: HashMap<String, (u64, u64)> = HashMap::new();
        let mut total = 0u64;
        for (i, f) in header.files.iter().enumerate() {
            swap::check_file_name(&format!("header.files[{i}].name"), &f.name)?;
            total = total.saturating_add(f.size);
            if sizes.insert(f.name.clone(), (f.size, 0)).is_some() {
                return Err(GeneratorError::invalid(
                    "header.files",
                    format!("`{}` is listed twice", f.name),
                ));
            }
        }
        if !sizes.contains_key(swap::MANIFEST) {
            return Err(GeneratorError::invalid(
                "header.files",
                "must include manifest.json",
            ));
        }
        if total > self.swap.max_upload_bytes {
            return Err(GeneratorError::invalid(
                "header.files",
                format!(
                    "{total} bytes in all; this generator accepts at most {}",
                    self.swap.max_upload_bytes
                ),
            ));
        }
        let staging = swap::Staging::new(&self.swap.staging_dir)?;
        let mut open: HashMap<String, tokio::fs::File> = HashMap::new();
        while let Some(msg) = stream.message().await.map_err(|s| received("chunk", &s))? {
            let Some(pb::upload_weights_request::Part::Chunk(chunk)) = msg.part else {
                return Err(GeneratorError::invalid(
                    "header",
                    "only the first message may be a header",
                ));
            };
            let Some((size, written)) = sizes.get_mut(&chunk.name) else {
                return Err(GeneratorError::invalid(
                    "chunk.name",
                    format!("`{}` was not announced in the header", chunk.name),
                ));
            };
            if chunk.offset != *written {
                return Err(GeneratorError::invalid(
                    "chunk.offset",
                    format!(
                        "{} for `{}`; expected {} (chunks of a file must arrive in order)",
                        chunk.offset, chunk.name, written
                    ),
                ));
            }
            *written += chunk.data.len() as u64;
            if *written > *size {
                return Err(GeneratorError::invalid(
                    "chunk.data",
                    format!("`{}` is larger than the {size} bytes announced", chunk.name),
                ));
            }
            let path = staging.dir().join(&chunk.name);
            let file = match open.entry(chunk.name.clone()) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert(tokio::fs::File::create(&path).await.map_err(|source| {
                        GeneratorError::Io {
                            what: format!("creating {}", path.display()),
                            source,
                        }
                    })?)
                }
            };
            file.write_all(&chunk.data)
                .await
                .map_err(|source| GeneratorError::Io {
                    what: format!("writing {}", path.display()),
                    source,
                })?;
            fault::point(fault::GENERATOR_UPLOAD);
        }
        for (name, (size, written)) in &sizes {
            if written != size {
                return Err(GeneratorError::invalid(
                    "chunk",
                    format!("`{name}` ended after {written} of {size} bytes"),
                ));
            }
            if *size == 0 {
                // Empty files get no chunk; create them so the folder is complete.
                let path = staging.dir().join(name);
                tokio::fs::File::create(&path)
                    .await
                    .map_err(|source| GeneratorError::Io {
                        what: format!("creating {}", path.display()),
                        source,
                    })?;
            }
        }
        for (_, mut file) in open {
            file.flush().await.map_err(|source| GeneratorError::Io {
                what: "flushing an upload".into(),
                source,
            })?;
        }
        Ok((staging, header))
    }
}

/// A message of an upload that could not be received: too large (RESOURCE_EXHAUSTED, as
/// gRPC specifies) or malformed (`field` is invalid).
fn received(field: &str, status: &Status) -> GeneratorError {
    match hir_runtime::server::message_too_large(status) {
        Some(exhausted) => GeneratorError::TooLarge(exhausted.message().to_string()),
        None => GeneratorError::invalid(field, status.message().to_string()),
    }
}

/// Checks a version name and its SHA-256, as a swap or an upload names them.
pub(super) fn check_version_fields(version: &str, sha256: &str) -> Result<()> {
    if version.is_empty()
        || version.len() > 128
        || version.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(GeneratorError::invalid(
            "version",
            "must be 1 to 128 characters without spaces",
        ));
    }
    swap::validate_sha256("sha256", sha256)
}
