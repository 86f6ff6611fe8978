//! The services the trainer drives: the relabeler (sampling) and the generators (swap,
//! verification, evaluation).

use std::path::Path;
use std::sync::Arc;

use hir_proto::pb;
use hir_proto::pb::relabeler_service_client::RelabelerServiceClient;
use hir_runtime::auth::with_bearer;
use hir_runtime::generators::{
    retryable, serving_other_version, Backoff, GeneratorEndpoint, GeneratorPool,
};
use tonic::transport::Channel;

use crate::error::{Result, TrainerError};

/// Why one attempt at sampling failed.
enum SampleError {
    /// The relabeler could not be reached or went away (UNAVAILABLE, UNKNOWN, CANCELLED).
    Retry(tonic::Status),
    /// It refused, or the iteration failed.
    Fatal(TrainerError),
}

/// Bytes per upload chunk.
const CHUNK: usize = 1 << 20;

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
    generators: GeneratorPool,
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
        let generators = GeneratorPool::new(generators, generator_token)
            .map_err(|e| TrainerError::invalid("generators", e.to_string()))?;
        Ok(Self {
            relabeler: RelabelerServiceClient::new(channel("relabeler", relabeler)?),
            relabeler_address: relabeler.to_string(),
            relabeler_token,
            generators,
        })
    }

    /// Every generator.
    pub fn generators(&self) -> Arc<Vec<GeneratorEndpoint>> {
        self.generators.endpoints()
    }

    /// Resolves the generators' names again (replicas behind a headless Service).
    pub async fn refresh_generators(&self) {
        self.generators.refresh().await;
    }

    fn relabeler_error(&self, status: &tonic::Status) -> TrainerError {
        TrainerError::remote(format!("relabeler {}", self.relabeler_address), status)
    }

    fn generator_error(g: &GeneratorEndpoint, status: &tonic::Status) -> TrainerError {
        TrainerError::remote(format!("generator {}", g.address), status)
    }

    /// Asks the relabeler to sample an iteration and waits until it is sampled; `on_status`
    /// sees every update. A relabeler that is unreachable or restarts on the way (its watch
    /// ends early) is asked again with backoff for up to `give_up`: starting is idempotent
    /// and a restarted relabeler resumes the iteration where it stopped.
    pub async fn sample(
        &self,
        run_id: &str,
        iteration: u32,
        give_up: std::time::Duration,
        mut on_status: impl FnMut(&pb::SamplingStatus),
    ) -> Result<pb::SamplingStatus> {
        let started = std::time::Instant::now();
        let mut delay = std::time::Duration::from_millis(500);
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            match self.sample_once(run_id, iteration, &mut on_status).await {
                Ok(Some(done)) => return Ok(done),
                Ok(None) => {}
                Err(SampleError::Retry(status)) if started.elapsed() < give_up => {
                    tracing::warn!(run_id, iteration, code = ?status.code(), message = status.message(), retry_in_ms = delay.as_millis() as u64, "relabeler unavailable; retrying");
                    on_status(&pb::SamplingStatus {
                        run_id: run_id.to_string(),
                        iteration,
                        status: pb::IterationStatus::Sampling as i32,
                        error: format!(
                            "relabeler {} unavailable ({}); retrying (attempt {attempt})",
                            self.relabeler_address,
                            status.message()
                        ),
                        ..Default::default()
                    });
                }
                Err(SampleError::Retry(status)) => return Err(self.relabeler_error(&status)),
                Err(SampleError::Fatal(e)) => return Err(e),
            }
            if started.elapsed() >= give_up {
                return Err(TrainerError::Remote {
                    service: format!("relabeler {}", self.relabeler_address),
                    message: format!(
                        "iteration {iteration} was not sampled within {} s",
                        give_up.as_secs()
                    ),
                });
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(std::time::Duration::from_secs(10));
        }
    }

    /// One StartSampling and watch: `Some` when sampled, `None` when the watch ended early.
    async fn sample_once(
        &self,
        run_id: &str,
        iteration: u32,
        on_status: &mut impl FnMut(&pb::SamplingStatus),
    ) -> Result<Option<pb::SamplingStatus>, SampleError> {
        let classify = |s: tonic::Status| match s.code() {
            tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled => {
                SampleError::Retry(s)
            }
            _ => SampleError::Fatal(self.relabeler_error(&s)),
        };
        let request = pb::StartSamplingRequest {
            run_id: run_id.to_string(),
            iteration,
        };
        let mut client = self.relabeler.clone();
        client
            .start_sampling(with_bearer(request, self.relabeler_token.as_deref()))
            .await
            .map_err(classify)?;
        let mut stream = client
            .watch_sampling(pb::GetSamplingRequest {
                run_id: run_id.to_string(),
                iteration,
            })
            .await
            .map_err(classify)?
            .into_inner();
        while let Some(status) = stream.message().await.map_err(classify)? {
            on_status(&status);
            match pb::IterationStatus::try_from(status.status) {
                Ok(pb::IterationStatus::Failed) => {
                    return Err(SampleError::Fatal(TrainerError::Remote {
                        service: format!("relabeler {}", self.relabeler_address),
                        message: format!("sampling iteration {iteration} failed: {}", status.error),
                    }))
                }
                Ok(s) if s as i32 >= pb::IterationStatus::Sampled as i32 => {
                    return Ok(Some(status))
                }
                _ => {}
            }
        }
        Ok(None)
    }

    /// What a generator serves.
    pub async fn model_info(&self, g: &GeneratorEndpoint) -> Result<pb::ModelInfo> {
        g.client()
            .get_model_info(self.generators.request(pb::GetModelInfoRequest {}))
            .await
            .map(|r| r.into_inner())
            .map_err(|s| Self::generator_error(g, &s))
    }

    /// Swaps a checkpoint into a generator, compare-and-swap on `t.expected`: by
    /// reference (`t.relative` under the generator's checkpoint root) or, with `upload`,
    /// by streaming the folder.
    pub async fn swap(
        &self,
        g: &GeneratorEndpoint,
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
        let mut client = g.client();
        let response = if upload {
            let messages = upload_messages(folder, version, sha256, expected)?;
            client
                .upload_weights(self.generators.request(tokio_stream::iter(messages)))
                .await
        } else {
            client
                .swap_weights(self.generators.request(pb::SwapWeightsRequest {
                    checkpoint: relative.to_string(),
                    sha256: sha256.to_string(),
                    version: version.to_string(),
                    expected_version: expected.to_string(),
                }))
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
        g: &GeneratorEndpoint,
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
            .client()
            .log_probs(self.generators.request(request))
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
        // A generator that is down, or restarted and not yet back on `version`, is passed
        // over for the next one.
        let mut last = String::new();
        EVAL_BACKOFF
            .retry(
                || {
                    let picked = self.generators.pick();
                    let request = request.clone();
                    async move {
                        let g = picked.map_err(|s| (s, String::new()))?;
                        self.greedy_once(&g, request).await.map_err(|s| {
                            (s, g.address.clone())
                        })
                    }
                },
                |(s, _)| retryable(s) || serving_other_version(s).is_some(),
                |(s, address), attempt, delay| {
                    last = address.clone();
                    tracing::warn!(generator = %address, attempt, code = ?s.code(), message = s.message(), retry_in_ms = delay.as_millis() as u64, "evaluation request failed; retrying");
                },
            )
            .await
            .map_err(|(s, address)| {
                let address = if address.is_empty() { last } else { address };
                TrainerError::remote(format!("generator {address}"), &s)
            })
    }

    /// One greedy request to `g`; one text per prompt, in order.
    async fn greedy_once(
        &self,
        g: &GeneratorEndpoint,
        request: pb::GenerateRequest,
    ) -> Result<Vec<String>, tonic::Status> {
        let n = request.prompts.len();
        let mut stream = g
            .client()
            .generate(self.generators.request(request))
            .await?
            .into_inner();
        let mut texts = vec![None; n];
        while let Some(r) = stream.message().await? {
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
                t.ok_or_else(|| {
                    tonic::Status::unknown(format!(
                        "the stream ended without a completion for prompt {i}"
                    ))
                })
            })
            .collect()
    }
}

/// Retries of an evaluation request.
const EVAL_BACKOFF: Backoff = Backoff {
    initial: std::time::Duration::from_millis(200),
    max: std::time::Duration::from_secs(5),
    give_up: std::time::Duration::from_secs(120),
};

/// The messages that upload every file of a checkpoint folder: the header (names and
/// sizes), then each file in chunks read as the stream is consumed, so a checkpoint is
/// never held in memory whole.
fn upload_messages(
    folder: &Path,
    version: &str,
    sha256: &str,
    expected: &str,
) -> Result<UploadStream> {
    use pb::upload_weights_request::Part;
    let mut files = Vec::new();
    for entry in std::fs::read_dir(folder).map_err(|e| TrainerError::io(folder, e))? {
        let entry = entry.map_err(|e| TrainerError::io(folder, e))?;
        let meta = entry
            .metadata()
            .map_err(|e| TrainerError::io(entry.path(), e))?;
        if meta.is_file() {
            files.push((
                entry.file_name().to_string_lossy().into_owned(),
                entry.path(),
                meta.len(),
            ));
        }
    }
    files.sort();
    let header = pb::UploadWeightsRequest {
        part: Some(Part::Header(pb::UploadHeader {
            version: version.to_string(),
            expected_version: expected.to_string(),
            sha256: sha256.to_string(),
            files: files
                .iter()
                .map(|(name, _, size)| pb::UploadFile {
                    name: name.clone(),
                    size: *size,
                })
                .collect(),
        })),
    };
    Ok(UploadStream {
        header: Some(header),
        files: files.into_iter().map(|(n, p, _)| (n, p)).collect(),
        current: None,
    })
}

/// Iterator over an upload's messages; see [`upload_messages`].
struct UploadStream {
    header: Option<pb::UploadWeightsRequest>,
    files: std::collections::VecDeque<(String, std::path::PathBuf)>,
    current: Option<(String, std::fs::File, u64)>,
}

impl Iterator for UploadStream {
    type Item = pb::UploadWeightsRequest;

    fn next(&mut self) -> Option<Self::Item> {
        use std::io::Read;
        if let Some(header) = self.header.take() {
            return Some(header);
        }
        loop {
            if self.current.is_none() {
                let (name, path) = self.files.pop_front()?;
                match std::fs::File::open(&path) {
                    Ok(f) => self.current = Some((name, f, 0)),
                    Err(e) => {
                        // Ending early makes the generator refuse the upload as incomplete.
                        tracing::warn!(path = %path.display(), error = %e, "cannot read a checkpoint file for upload");
                        return None;
                    }
                }
            }
            let (name, file, offset) = self.current.as_mut()?;
            let mut data = vec![0u8; CHUNK];
            match file.read(&mut data) {
                Ok(0) => self.current = None,
                Ok(n) => {
                    data.truncate(n);
                    let chunk = pb::FileChunk {
                        name: name.clone(),
                        offset: *offset,
                        data,
                    };
                    *offset += n as u64;
                    return Some(pb::UploadWeightsRequest {
                        part: Some(pb::upload_weights_request::Part::Chunk(chunk)),
                    });
                }
                Err(e) => {
                    tracing::warn!(file = %name, error = %e, "cannot read a checkpoint file for upload");
                    return None;
                }
            }
        }
    }
}
