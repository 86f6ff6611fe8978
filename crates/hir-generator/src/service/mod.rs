//! `hir.v1.GeneratorService`: protocol types are validated into domain types here, and
//! nowhere else. One job per file: [`request`] (`Generate` and `LogProbs` requests into
//! the engine's work), [`upload`] (a streamed checkpoint into a staging folder), [`slot`]
//! (the service while the model loads); swapping and the RPCs themselves are here.

use std::pin::Pin;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use candle_core::Device;
use hir_proto::pb;
use hir_proto::pb::generator_service_server::GeneratorService;
use hir_runtime::fault;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::config::{Limits, RequestLimits, SwapConfig};
use crate::engine::{Completion, EngineHandle, Serving};
use crate::error::{GeneratorError, Result};
use crate::metrics::Metrics;
use crate::swap::{self, LoadTimes};

mod request;
mod slot;
mod upload;

pub use slot::GeneratorSlot;
use upload::check_version_fields;

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

    /// Swaps `candidate` in (a `SwapWeights` or an `UploadWeights`, named by `rpc` in the
    /// log when it is refused; the current version keeps serving then).
    async fn swap_in(
        &self,
        rpc: &str,
        candidate: swap::Candidate,
        expected: String,
        started: Instant,
    ) -> Result<pb::SwapWeightsResponse> {
        self.try_swap_in(candidate, expected, started)
            .await
            .inspect_err(|err| {
                tracing::warn!(%err, "{rpc} refused; the current version keeps serving");
            })
    }

    async fn try_swap_in(
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
}

fn completion_to_pb(c: Completion, seed: u64) -> pb::GenerateResponse {
    let finish_reason =
        pb::FinishReason::from(hir_core::status::FinishReason::from(c.finish_reason));
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
        let items = self.logprob_items(req.items)?;
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
            .swap_in("swap", candidate, req.expected_version, started)
            .await?;
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
            .swap_in("upload", candidate, header.expected_version, started)
            .await?;
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
