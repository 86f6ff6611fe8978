//! `hir.v1.GeneratorService`: protocol types are validated into domain types here, and
//! nowhere else.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use candle_core::Device;
use hir_model::{FinishReason, SamplingParams};
use hir_proto::pb;
use hir_proto::pb::generator_service_server::GeneratorService;
use hir_runtime::fault;
use tokio::io::AsyncWriteExt;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::config::{Limits, RequestLimits, SwapConfig, BYTES_PER_TOKEN};
use crate::engine::{Completion, EngineHandle, Job, Serving};
use crate::error::{GeneratorError, Result};
use crate::metrics::Metrics;
use crate::swap::{self, LoadTimes};

/// The service implementation.
#[derive(Debug, Clone)]
pub struct Generator {
    engine: EngineHandle,
    limits: Limits,
    swap: SwapConfig,
    device: Device,
    weights: crate::config::Weights,
    metrics: Arc<Metrics>,
    seeds: Arc<AtomicU64>,
}

impl Generator {
    /// A service over a running engine.
    pub fn new(
        engine: EngineHandle,
        limits: Limits,
        swap: SwapConfig,
        device: Device,
        weights: crate::config::Weights,
        metrics: Arc<Metrics>,
    ) -> Self {
        let clock = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        Self {
            engine,
            limits,
            swap,
            device,
            weights,
            metrics,
            seeds: Arc::new(AtomicU64::new(clock)),
        }
    }

    fn deadline(&self) -> Duration {
        Duration::from_secs(self.swap.timeout_secs.max(1))
    }

    /// The bounds requests must keep while `serving` serves: what `Generate` and `LogProbs`
    /// enforce and `GetModelInfo` advertises.
    pub fn request_limits(&self, serving: &Serving) -> RequestLimits {
        RequestLimits::new(
            &self.limits,
            &self.engine.config(),
            serving.model.info().context_length,
        )
    }

    /// Turns a request into a job, or says which field is wrong. Everything that can be
    /// checked without the tokenizer is checked first; the prompts are then tokenized on a
    /// blocking thread, so that large ones never hold up the server's other calls.
    async fn job(
        &self,
        req: pb::GenerateRequest,
        out: tokio::sync::mpsc::UnboundedSender<Result<Completion>>,
    ) -> Result<Job> {
        let serving = self.engine.serving();
        let limits = self.request_limits(&serving);
        if req.prompts.is_empty() {
            return Err(GeneratorError::invalid(
                "prompts",
                "at least one prompt is required",
            ));
        }
        if req.prompts.len() > limits.max_prompts_per_request {
            return Err(GeneratorError::invalid(
                "prompts",
                format!(
                    "{} prompts; at most {} per request",
                    req.prompts.len(),
                    limits.max_prompts_per_request
                ),
            ));
        }
        let n = req.n as usize;
        if n == 0 || n > limits.max_n {
            return Err(GeneratorError::invalid(
                "n",
                format!("is {n}; must be between 1 and {}", limits.max_n),
            ));
        }
        let sequences = req.prompts.len() * n;
        if sequences > limits.max_sequences_per_request {
            return Err(GeneratorError::invalid(
                "n",
                format!(
                    "the request has {sequences} sequences (prompts times n); at most {} per request",
                    limits.max_sequences_per_request
                ),
            ));
        }
        let s = req.sampling.unwrap_or_default();
        if !s.temperature.is_finite() || s.temperature < 0.0 {
            return Err(GeneratorError::invalid(
                "sampling.temperature",
                format!(
                    "is {}; must be finite and >= 0 (0 is greedy)",
                    s.temperature
                ),
            ));
        }
        let top_p = if s.top_p == 0.0 { 1.0 } else { s.top_p };
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(GeneratorError::invalid(
                "sampling.top_p",
                format!("is {}; must be in (0, 1]", s.top_p),
            ));
        }
        let max_new = s.max_new_tokens as usize;
        if max_new == 0 || max_new > limits.max_new_tokens {
            return Err(GeneratorError::invalid(
                "sampling.max_new_tokens",
                format!(
                    "is {max_new}; must be between 1 and {}",
                    limits.max_new_tokens
                ),
            ));
        }
        if s.stop.len() > limits.max_stop_strings {
            return Err(GeneratorError::invalid(
                "sampling.stop",
                format!("at most {} stop strings", limits.max_stop_strings),
            ));
        }
        if let Some(i) = s.stop.iter().position(|st| st.is_empty() || st.len() > 256) {
            return Err(GeneratorError::invalid(
                format!("sampling.stop[{i}]"),
                "must be 1 to 256 bytes",
            ));
        }
        for (i, text) in req.prompts.iter().enumerate() {
            if text.len() > limits.max_prompt_bytes {
                return Err(GeneratorError::invalid(
                    format!("prompts[{i}]"),
                    format!(
                        "is {} bytes; at most {} ({BYTES_PER_TOKEN} bytes per token of the longest prompt, {} tokens)",
                        text.len(),
                        limits.max_prompt_bytes,
                        limits.max_prompt_tokens
                    ),
                ));
            }
            if text.trim().is_empty() {
                return Err(GeneratorError::invalid(format!("prompts[{i}]"), "is empty"));
            }
        }
        let bytes: usize = req.prompts.iter().map(String::len).sum();
        if bytes > limits.max_request_bytes {
            return Err(GeneratorError::invalid(
                "prompts",
                format!(
                    "{bytes} bytes in all; at most {} per request ({BYTES_PER_TOKEN} bytes per token of the request's {} tokens)",
                    limits.max_request_bytes, limits.max_request_tokens
                ),
            ));
        }
        let (texts, chat) = (req.prompts, req.chat);
        let prompts =
            tokio::task::spawn_blocking(move || tokenize(&serving, &texts, chat, max_new, &limits))
                .await
                .map_err(|err| {
                    GeneratorError::Internal(format!("tokenizing the prompts: {err}"))
                })??;
        let seed = s.seed.unwrap_or_else(|| {
            self.seeds
                .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
        });
        let params = SamplingParams {
            temperature: s.temperature,
            top_k: (s.top_k > 0).then_some(s.top_k as usize),
            top_p,
            seed,
            max_new_tokens: max_new,
            stop: s.stop,
            n,
        };
        let span = tracing::info_span!("generate", request_id = %req.request_id, prompts = prompts.len(), n, seed);
        Ok(Job {
            prompts,
            params,
            return_logprobs: req.return_logprobs,
            expected_version: Some(req.expected_version).filter(|v| !v.is_empty()),
            out,
            enqueued: Instant::now(),
            span,
        })
    }

    async fn swap_in(
        &self,
        candidate: swap::Candidate,
        expected: String,
        started: Instant,
    ) -> Result<pb::SwapWeightsResponse> {
        let current = self.engine.serving();
        let version = candidate.version.clone();
        // `weights = auto` holds a checkpoint folder dense, whatever the first model was.
        let mode = crate::weight_mode(self.weights, &candidate.dir, &self.device);
        let (serving, times): (_, LoadTimes) = swap::load_checkpoint(
            candidate,
            &current,
            self.device.clone(),
            mode,
            self.deadline(),
        )
        .await?;
        fault::point(fault::GENERATOR_SWAP);
        let t = Instant::now();
        let activated = self
            .engine
            .activate(serving, Some(expected).filter(|e| !e.is_empty()))
            .await?;
        let activate = t.elapsed();
        let total = started.elapsed();
        self.metrics.swap_seconds.observe(total.as_secs_f64());
        tracing::info!(%version, previous = %activated.previous, total_ms = total.as_millis() as u64, "swapped weights");
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        Ok(pb::SwapWeightsResponse {
            version,
            previous_version: activated.previous.to_string(),
            bytes: times.bytes,
            verify_ms: ms(times.verify),
            load_ms: ms(times.load),
            activate_ms: ms(activate),
            total_ms: ms(total),
        })
    }

    async fn receive_upload(
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

fn check_version_fields(version: &str, sha256: &str) -> Result<()> {
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

/// Tokenizes each prompt (as a chat turn with `chat`) and checks it fits; blocking.
fn tokenize(
    serving: &Serving,
    texts: &[String],
    chat: bool,
    max_new: usize,
    limits: &RequestLimits,
) -> Result<Vec<Vec<u32>>> {
    let model = &serving.model;
    let context = model.info().context_length;
    let mut prompts = Vec::with_capacity(texts.len());
    for (i, text) in texts.iter().enumerate() {
        let ids = if chat {
            model.encode_prompt(&model.chat_prompt(text))?
        } else {
            model.encode_prompt(text)?
        };
        if ids.is_empty() {
            return Err(GeneratorError::invalid(
                format!("prompts[{i}]"),
                "tokenizes to nothing",
            ));
        }
        if ids.len() > limits.max_prompt_tokens {
            return Err(GeneratorError::invalid(
                format!("prompts[{i}]"),
                format!(
                    "is {} tokens; at most {}",
                    ids.len(),
                    limits.max_prompt_tokens
                ),
            ));
        }
        if model.model().context_needed(ids.len(), max_new) > context {
            return Err(GeneratorError::invalid(
                format!("prompts[{i}]"),
                format!(
                    "{} tokens plus max_new_tokens {max_new} exceed the model's context of {context}",
                    ids.len()
                ),
            ));
        }
        prompts.push(ids);
    }
    Ok(prompts)
}

fn completion_to_pb(c: Completion, seed: u64) -> pb::GenerateResponse {
    let finish_reason = match c.finish_reason {
        FinishReason::Eos => pb::FinishReason::Eos,
        FinishReason::Stop => pb::FinishReason::Stop,
        FinishReason::Length => pb::FinishReason::Length,
    };
    pb::GenerateResponse {
        completion: Some(pb::Completion {
            prompt_index: c.prompt_index,
            sample_index: c.sample_index,
            model_version: c.model_version.to_string(),
            finish_reason: finish_reason as i32,
            text: c.text,
            token_ids: c.token_ids,
            logprobs: c.logprobs,
            prompt_tokens: c.prompt_tokens,
            seed,
        }),
    }
}

pub type CompletionStream =
    Pin<Box<dyn Stream<Item = Result<pb::GenerateResponse, Status>> + Send>>;

#[tonic::async_trait]
impl GeneratorService for Generator {
    type GenerateStream = CompletionStream;

    async fn generate(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let job = self.job(request.into_inner(), tx).await?;
        let seed = job.params.seed;
        let point = if job.params.temperature > 0.0 {
            fault::GENERATOR_SAMPLE
        } else {
            fault::GENERATOR_EVALUATE
        };
        job.span.in_scope(|| tracing::info!("queued"));
        if let Err(err) = self.engine.submit(job) {
            if matches!(err, GeneratorError::Overloaded(_)) {
                self.metrics.rejected.inc();
            }
            return Err(err.into());
        }
        let stream = tokio_stream::wrappers::UnboundedReceiverStream::new(rx).map(move |item| {
            fault::point(point);
            item.map(|c| completion_to_pb(c, seed))
                .map_err(Status::from)
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn log_probs(
        &self,
        request: Request<pb::LogProbsRequest>,
    ) -> Result<Response<pb::LogProbsResponse>, Status> {
        let req = request.into_inner();
        let serving = self.engine.serving();
        let (vocab, context) = (
            serving.model.info().vocab_size,
            serving.model.info().context_length,
        );
        let max_items = self.request_limits(&serving).max_prompts_per_request;
        if req.items.is_empty() || req.items.len() > max_items {
            return Err(
                GeneratorError::invalid("items", format!("need 1 to {max_items} items")).into(),
            );
        }
        let mut items = Vec::with_capacity(req.items.len());
        for (i, item) in req.items.into_iter().enumerate() {
            if item.prompt_token_ids.is_empty() || item.continuation_token_ids.is_empty() {
                return Err(GeneratorError::invalid(
                    format!("items[{i}]"),
                    "prompt and continuation must both be non-empty",
                )
                .into());
            }
            let needed = serving.model.model().context_needed(
                item.prompt_token_ids.len(),
                item.continuation_token_ids.len(),
            );
            if needed > context {
                return Err(GeneratorError::invalid(
                    format!("items[{i}]"),
                    format!("longer than the context of {context}"),
                )
                .into());
            }
            if let Some(bad) = item
                .prompt_token_ids
                .iter()
                .chain(&item.continuation_token_ids)
                .find(|&&t| t as usize >= vocab)
            {
                return Err(GeneratorError::invalid(
                    format!("items[{i}]"),
                    format!("token id {bad} is outside the vocabulary of {vocab}"),
                )
                .into());
            }
            items.push((item.prompt_token_ids, item.continuation_token_ids));
        }
        let (version, results) = self
            .engine
            .logprobs(items, Some(req.expected_version).filter(|v| !v.is_empty()))
            .await?;
        Ok(Response::new(pb::LogProbsResponse {
            model_version: version.to_string(),
            results: results
                .into_iter()
                .map(|logprobs| pb::TokenLogProbs { logprobs })
                .collect(),
        }))
    }

    async fn swap_weights(
        &self,
        request: Request<pb::SwapWeightsRequest>,
    ) -> Result<Response<pb::SwapWeightsResponse>, Status> {
        let started = Instant::now();
        let req = request.into_inner();
        check_version_fields(&req.version, &req.sha256)?;
        let (root, dir) =
            swap::resolve_under_root(self.swap.checkpoint_root.as_deref(), &req.checkpoint)?;
        let candidate = swap::Candidate {
            root,
            dir,
            field: "checkpoint",
            sha256: req.sha256,
            version: req.version,
        };
        let response = self
            .swap_in(candidate, req.expected_version, started)
            .await
            .map_err(|err| {
                tracing::warn!(%err, "swap refused; the current version keeps serving");
                err
            })?;
        Ok(Response::new(response))
    }

    async fn upload_weights(
        &self,
        request: Request<Streaming<pb::UploadWeightsRequest>>,
    ) -> Result<Response<pb::SwapWeightsResponse>, Status> {
        let started = Instant::now();
        let received =
            tokio::time::timeout(self.deadline(), self.receive_upload(request.into_inner())).await;
        let (staging, header) = match received {
            Ok(result) => result?,
            Err(_) => {
                return Err(GeneratorError::DeadlineExceeded(
                    "receiving the upload",
                    self.deadline(),
                )
                .into())
            }
        };
        let candidate = swap::Candidate {
            root: staging.dir().to_path_buf(),
            dir: staging.dir().to_path_buf(),
            field: "header",
            sha256: header.sha256,
            version: header.version,
        };
        let response = self
            .swap_in(candidate, header.expected_version, started)
            .await
            .map_err(|err| {
                tracing::warn!(%err, "upload refused; the current version keeps serving");
                err
            })?;
        drop(staging);
        Ok(Response::new(response))
    }

    async fn get_model_info(
        &self,
        _request: Request<pb::GetModelInfoRequest>,
    ) -> Result<Response<pb::ModelInfo>, Status> {
        let serving = self.engine.serving();
        let info = serving.model.info();
        let l = self.request_limits(&serving);
        let u = |v: usize| u32::try_from(v).unwrap_or(u32::MAX);
        let u64 = |v: usize| v as u64;
        Ok(Response::new(pb::ModelInfo {
            version: serving.version.to_string(),
            architecture: info.architecture.clone(),
            parameters: info.parameters as u64,
            dtype: info.dtype.clone(),
            vocab_size: u(info.vocab_size),
            context_length: u(info.context_length),
            device: device_name(&self.device),
            sha256: serving.sha256.clone(),
            activated_at: Some(prost_types::Timestamp::from(serving.activated_at)),
            eos_token_id: info.eos_token_ids.first().copied().unwrap_or_default(),
            limits: Some(pb::GeneratorLimits {
                max_prompts_per_request: u(l.max_prompts_per_request),
                max_n: u(l.max_n),
                max_new_tokens: u(l.max_new_tokens),
                max_prompt_tokens: u(l.max_prompt_tokens),
                max_sequences_per_request: u(l.max_sequences_per_request),
                max_request_tokens: u64(l.max_request_tokens),
                max_prompt_bytes: u64(l.max_prompt_bytes),
                max_request_bytes: u64(l.max_request_bytes),
                max_message_bytes: u64(l.max_message_bytes),
            }),
        }))
    }
}

/// `cpu` or `cuda:N`.
pub fn device_name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        other => format!("{other:?}"),
    }
}

/// The service before and after the model is loaded: every RPC answers UNAVAILABLE until
/// [`GeneratorSlot::set`] installs the loaded generator. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct GeneratorSlot(Arc<std::sync::OnceLock<Generator>>);

impl GeneratorSlot {
    /// Installs the loaded generator (once; later calls are ignored).
    pub fn set(&self, generator: Generator) {
        let _ = self.0.set(generator);
    }

    /// Whether the model is loaded.
    pub fn is_ready(&self) -> bool {
        self.0.get().is_some()
    }

    /// The engine, once loaded.
    pub fn engine(&self) -> Option<EngineHandle> {
        self.0.get().map(|g| g.engine.clone())
    }

    fn get(&self) -> Result<&Generator, Status> {
        self.0.get().ok_or_else(|| {
            Status::unavailable("the model is still loading; retry when health reports SERVING")
        })
    }
}

#[tonic::async_trait]
impl GeneratorService for GeneratorSlot {
    type GenerateStream = CompletionStream;

    async fn generate(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        self.get()?.generate(request).await
    }

    async fn log_probs(
        &self,
        request: Request<pb::LogProbsRequest>,
    ) -> Result<Response<pb::LogProbsResponse>, Status> {
        self.get()?.log_probs(request).await
    }

    async fn swap_weights(
        &self,
        request: Request<pb::SwapWeightsRequest>,
    ) -> Result<Response<pb::SwapWeightsResponse>, Status> {
        self.get()?.swap_weights(request).await
    }

    async fn upload_weights(
        &self,
        request: Request<Streaming<pb::UploadWeightsRequest>>,
    ) -> Result<Response<pb::SwapWeightsResponse>, Status> {
        self.get()?.upload_weights(request).await
    }

    async fn get_model_info(
        &self,
        request: Request<pb::GetModelInfoRequest>,
    ) -> Result<Response<pb::ModelInfo>, Status> {
        self.get()?.get_model_info(request).await
    }
}
