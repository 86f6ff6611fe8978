//! The services the trainer drives: the relabeler (sampling) and the generators (swap,
//! verification, evaluation).

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use hir_proto::pb;
use hir_proto::pb::generator_service_client::GeneratorServiceClient;
use hir_proto::pb::relabeler_service_client::RelabelerServiceClient;
use hir_runtime::auth::with_bearer;
use tonic::transport::Channel;

use crate::error::{Result, TrainerError};

/// Bytes per upload chunk.
const CHUNK: usize = 1 << 20;

/// One generator.
#[derive(Debug, Clone)]
pub struct Generator {
    /// Its address, as configured.
    pub address: String,
    client: GeneratorServiceClient<Channel>,
}

/// A checkpoint to swap in.
#[derive(Debug, Clone, Copy)]
pub struct SwapTarget<'a> {
    /// The checkpoint folder on the trainer's disk.
    pub folder: &'a Path,
    /// The same folder relative to the generators' checkpoint root.
    pub relative: &'a str,
    /// The new version's name.
    pub version: &'a str,
    /// SHA-256 of its `manifest.json`.
    pub sha256: &'a str,
    /// The version it must replace.
    pub expected: &'a str,
}

/// Clients of the relabeler and every generator.
#[derive(Debug, Clone)]
pub struct Remotes {
    relabeler: RelabelerServiceClient<Channel>,
    relabeler_address: String,
    relabeler_token: Option<String>,
    generators: Arc<Vec<Generator>>,
    generator_token: Option<String>,
    next: Arc<AtomicUsize>,
}

fn channel(field: &str, address: &str) -> Result<Channel> {
    Ok(Channel::from_shared(address.to_string())
        .map_err(|e| TrainerError::invalid(field, format!("`{address}`: {e}")))?
        .connect_lazy())
}

impl Remotes {
    /// Lazy channels (connected on first use, reconnected after failures).
    pub fn new(
        relabeler: &str,
        relabeler_token: Option<String>,
        generators: &[String],
        generator_token: Option<String>,
    ) -> Result<Self> {
        if generators.is_empty() {
            return Err(TrainerError::invalid(
                "generators",
                "at least one generator address is required",
            ));
        }
        let generators = generators
            .iter()
            .map(|a| {
                Ok(Generator {
                    address: a.clone(),
                    client: GeneratorServiceClient::new(channel("generators", a)?)
                        .max_decoding_message_size(64 << 20),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            relabeler: RelabelerServiceClient::new(channel("relabeler", relabeler)?),
            relabeler_address: relabeler.to_string(),
            relabeler_token,
            generators: Arc::new(generators),
            generator_token,
            next: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// Every generator.
    pub fn generators(&self) -> &[Generator] {
        &self.generators
    }

    fn relabeler_error(&self, status: &tonic::Status) -> TrainerError {
        TrainerError::remote(format!("relabeler {}", self.relabeler_address), status)
    }

    fn generator_error(g: &Generator, status: &tonic::Status) -> TrainerError {
        TrainerError::remote(format!("generator {}", g.address), status)
    }

    /// Asks the relabeler to sample an iteration and waits until it is sampled; `on_status`
    /// sees every update.
    pub async fn sample(
        &self,
        run_id: &str,
        iteration: u32,
        mut on_status: impl FnMut(&pb::SamplingStatus),
    ) -> Result<pb::SamplingStatus> {
        let request = pb::StartSamplingRequest {
            run_id: run_id.to_string(),
            iteration,
        };
        let mut client = self.relabeler.clone();
        client
            .start_sampling(with_bearer(request, self.relabeler_token.as_deref()))
            .await
            .map_err(|s| self.relabeler_error(&s))?;
        let mut stream = client
            .watch_sampling(pb::GetSamplingRequest {
                run_id: run_id.to_string(),
                iteration,
            })
            .await
            .map_err(|s| self.relabeler_error(&s))?
            .into_inner();
        while let Some(status) = stream
            .message()
            .await
            .map_err(|s| self.relabeler_error(&s))?
        {
            on_status(&status);
            match pb::IterationStatus::try_from(status.status) {
                Ok(pb::IterationStatus::Failed) => {
                    return Err(TrainerError::Remote {
                        service: format!("relabeler {}", self.relabeler_address),
                        message: format!("sampling iteration {iteration} failed: {}", status.error),
                    })
                }
                Ok(s) if s as i32 >= pb::IterationStatus::Sampled as i32 => return Ok(status),
                _ => {}
            }
        }
        Err(TrainerError::Remote {
            service: format!("relabeler {}", self.relabeler_address),
            message: format!(
                "the sampling watch of iteration {iteration} ended before it was sampled"
            ),
        })
    }

    /// What a generator serves.
    pub async fn model_info(&self, g: &Generator) -> Result<pb::ModelInfo> {
        g.client
            .clone()
            .get_model_info(with_bearer(
                pb::GetModelInfoRequest {},
                self.generator_token.as_deref(),
            ))
            .await
            .map(|r| r.into_inner())
            .map_err(|s| Self::generator_error(g, &s))
    }

    /// Swaps a checkpoint into a generator, compare-and-swap on `t.expected`: by
    /// reference (`t.relative` under the generator's checkpoint root) or, with `upload`,
    /// by streaming the folder.
    pub async fn swap(
        &self,
        g: &Generator,
        t: &SwapTarget<'_>,
        upload: bool,
    ) -> Result<pb::SwapWeightsResponse> {
        let SwapTarget {
            folder,
            relative,
            version,
            sha256,
            expected,
        } = *t;
        let mut client = g.client.clone();
        let token = self.generator_token.as_deref();
        let response = if upload {
            let messages = upload_messages(folder, version, sha256, expected)?;
            client
                .upload_weights(with_bearer(tokio_stream::iter(messages), token))
                .await
        } else {
            client
                .swap_weights(with_bearer(
                    pb::SwapWeightsRequest {
                        checkpoint: relative.to_string(),
                        sha256: sha256.to_string(),
                        version: version.to_string(),
                        expected_version: expected.to_string(),
                    },
                    token,
                ))
                .await
        };
        response
            .map(|r| r.into_inner())
            .map_err(|s| Self::generator_error(g, &s))
    }

    /// Log-probabilities of `continuation` after `prompt` under what a generator serves,
    /// which must be `version`.
    pub async fn logprobs(
        &self,
        g: &Generator,
        version: &str,
        prompt: &[u32],
        continuation: &[u32],
    ) -> Result<Vec<f32>> {
        let request = pb::LogProbsRequest {
            items: vec![pb::LogProbsItem {
                prompt_token_ids: prompt.to_vec(),
                continuation_token_ids: continuation.to_vec(),
            }],
            expected_version: version.to_string(),
        };
        let response = g
            .client
            .clone()
            .log_probs(with_bearer(request, self.generator_token.as_deref()))
            .await
            .map_err(|s| Self::generator_error(g, &s))?
            .into_inner();
        Ok(response
            .results
            .into_iter()
            .next()
            .map(|r| r.logprobs)
            .unwrap_or_default())
    }

    /// Greedy completions of `prompts` from the next generator (round-robin), which must
    /// serve `version` (`chat`: under its chat template); one text per prompt, in order.
    pub async fn greedy(
        &self,
        prompts: Vec<String>,
        max_new_tokens: u32,
        version: &str,
        chat: bool,
    ) -> Result<Vec<String>> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.generators.len();
        let g = &self.generators[i];
        let n = prompts.len();
        let request = pb::GenerateRequest {
            prompts,
            n: 1,
            sampling: Some(pb::SamplingParams {
                temperature: 0.0,
                top_k: 0,
                top_p: 1.0,
                max_new_tokens,
                stop: vec![],
                seed: None,
            }),
            return_logprobs: false,
            expected_version: version.to_string(),
            request_id: String::new(),
            chat,
        };
        let mut stream = g
            .client
            .clone()
            .generate(with_bearer(request, self.generator_token.as_deref()))
            .await
            .map_err(|s| Self::generator_error(g, &s))?
            .into_inner();
        let mut texts = vec![None; n];
        while let Some(r) = stream
            .message()
            .await
            .map_err(|s| Self::generator_error(g, &s))?
        {
            if let Some(c) = r.completion {
                if let Some(slot) = texts.get_mut(c.prompt_index as usize) {
                    *slot = Some(c.text);
                }
            }
        }
        texts
            .into_iter()
            .enumerate()
            .map(|(i, t)| {
                t.ok_or_else(|| TrainerError::Remote {
                    service: format!("generator {}", g.address),
                    message: format!("the stream ended without a completion for prompt {i}"),
                })
            })
            .collect()
    }
}

/// The header and chunks that upload every file of a checkpoint folder.
fn upload_messages(
    folder: &Path,
    version: &str,
    sha256: &str,
    expected: &str,
) -> Result<Vec<pb::UploadWeightsRequest>> {
    use pb::upload_weights_request::Part;
    let mut names: Vec<String> = std::fs::read_dir(folder)
        .map_err(|e| TrainerError::io(folder, e))?
        .flatten()
        .filter(|e| e.path().is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let mut files = Vec::new();
    let mut chunks = Vec::new();
    for name in names {
        let path = folder.join(&name);
        let bytes = std::fs::read(&path).map_err(|e| TrainerError::io(&path, e))?;
        files.push(pb::UploadFile {
            name: name.clone(),
            size: bytes.len() as u64,
        });
        for (i, data) in bytes.chunks(CHUNK).enumerate() {
            chunks.push(pb::UploadWeightsRequest {
                part: Some(Part::Chunk(pb::FileChunk {
                    name: name.clone(),
                    offset: (i * CHUNK) as u64,
                    data: data.to_vec(),
                })),
            });
        }
    }
    let header = pb::UploadWeightsRequest {
        part: Some(Part::Header(pb::UploadHeader {
            version: version.to_string(),
            expected_version: expected.to_string(),
            sha256: sha256.to_string(),
            files,
        })),
    };
    Ok(std::iter::once(header).chain(chunks).collect())
}
