//! The engine: one OS thread that owns the models and runs continuous batching.
//!
//! Requests wait in a bounded queue (full queue: the caller is refused at once). At every
//! decode step the engine admits waiting requests while the token budget and the sequence
//! limit allow, prefills them together, merges them into the running batch, samples one
//! token for every running sequence, and streams finished completions back.
//!
//! Batching: with [`Batching::PerPrompt`] (the default) the samples of each prompt decode
//! in a batch of their own, so a completion's numbers depend only on its prompt, seed and
//! settings, never on what else is in flight: a seeded run samples the same text whatever
//! the concurrency. [`Batching::Shared`] merges every running sequence into one batch, for
//! throughput; left padding and batch-size-dependent kernels then change the last bits of
//! the logits, and with them, now and then, a sampled token.
//!
//! Versions: each request is pinned to the version serving when it is admitted. Activating
//! a new version makes it the target of later admissions; sequences of the older version
//! run to completion in their own batch, and the older model is dropped once it is idle.
//! So no completion ever mixes two versions.

use std::sync::{Arc, RwLock};
use std::time::{Instant, SystemTime};

use hir_model::{DecodeBatch, FinishReason, GenerationRequest, LoadedModel, SamplingParams};
use tokio::sync::{mpsc, oneshot};

use crate::error::{GeneratorError, Result};
use crate::metrics::Metrics;

mod scheduler;

use scheduler::Engine;

/// Limits of the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineConfig {
    /// Requests that may wait for admission; beyond it requests get RESOURCE_EXHAUSTED.
    pub queue_capacity: usize,
    /// Most sequences decoding together.
    pub max_batch_sequences: usize,
    /// Most tokens (prompt plus max_new_tokens, over all running sequences) held at once:
    /// bounds the KV cache memory.
    pub token_budget: usize,
    /// Which sequences decode together.
    pub batching: Batching,
}

/// Which running sequences share a decode batch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Batching {
    /// The samples of one prompt together, apart from everything else: reproducible.
    #[default]
    PerPrompt,
    /// Every running sequence in one batch: more tokens per second, not reproducible.
    Shared,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            queue_capacity: 256,
            max_batch_sequences: 64,
            token_budget: 64 * 1024,
            batching: Batching::PerPrompt,
        }
    }
}

/// A validated generation request.
#[derive(Debug)]
pub struct Job {
    /// Tokenised prompts.
    pub prompts: Vec<Vec<u32>>,
    /// Sampling parameters (with `n` and the seed).
    pub params: SamplingParams,
    /// Send logprobs with each completion.
    pub return_logprobs: bool,
    /// Refuse unless this version serves.
    pub expected_version: Option<String>,
    /// Where completions go; dropping the receiver cancels the job.
    pub out: mpsc::UnboundedSender<Result<Completion>>,
    /// When it was queued.
    pub enqueued: Instant,
    /// The request's span, so engine work is logged under it.
    pub span: tracing::Span,
}

impl Job {
    /// Tokens the job holds while it runs (prompt plus new tokens, every sample).
    pub fn tokens(&self) -> usize {
        self.prompts
            .iter()
            .map(|p| p.len() + self.params.max_new_tokens)
            .sum::<usize>()
            * self.params.n
    }

    fn sequences(&self) -> usize {
        self.prompts.len() * self.params.n
    }
}

/// One finished sample.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    /// Index of the prompt in the request.
    pub prompt_index: u32,
    /// Which of the prompt's samples.
    pub sample_index: u32,
    /// The version that produced it.
    pub model_version: Arc<str>,
    /// Why it stopped.
    pub finish_reason: FinishReason,
    /// Generated text.
    pub text: String,
    /// Generated token ids, without end-of-sequence.
    pub token_ids: Vec<u32>,
    /// Logprob of each token, if asked for.
    pub logprobs: Vec<f32>,
    /// Prompt length in tokens.
    pub prompt_tokens: u32,
}

/// What serves now; read by the service without asking the engine.
#[derive(Debug, Clone)]
pub struct Serving {
    /// Version name.
    pub version: Arc<str>,
    /// The model (shared with the engine; used for tokenising requests).
    pub model: Arc<LoadedModel>,
    /// Digest of the checkpoint's manifest (or of the GGUF file).
    pub sha256: String,
    /// The whole model under `model` with its digest ([`hir_model::formats::checkpoint::model_digest`]):
    /// `model` itself, or, when an adapter serves, the model it sits beside. An adapter
    /// swapped in next goes beside this one, if it was trained on it.
    pub base: Arc<LoadedModel>,
    /// The digest of `base`.
    pub base_sha256: String,
    /// When it was activated.
    pub activated_at: SystemTime,
}

/// Teacher-forced logprobs: the version that computed them and one list per item.
pub type ProbeResult = (Arc<str>, Vec<Vec<f32>>);

/// A report of an activation.
#[derive(Debug, Clone)]
pub struct Activated {
    /// The version it replaced.
    pub previous: Arc<str>,
}

enum Control {
    Activate {
        serving: Serving,
        expected: Option<String>,
        reply: oneshot::Sender<Result<Activated>>,
    },
    LogProbs {
        items: Vec<(Vec<u32>, Vec<u32>)>,
        expected: Option<String>,
        reply: oneshot::Sender<Result<ProbeResult>>,
    },
    Drain {
        abort: bool,
    },
}

/// The handle services use to talk to the engine thread. Cheap to clone.
#[derive(Clone, Debug)]
pub struct EngineHandle {
    jobs: mpsc::Sender<Job>,
    control: mpsc::UnboundedSender<Control>,
    serving: Arc<RwLock<Serving>>,
    config: EngineConfig,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Control::Activate { .. } => "Activate",
            Control::LogProbs { .. } => "LogProbs",
            Control::Drain { .. } => "Drain",
        })
    }
}

impl EngineHandle {
    /// What serves now.
    pub fn serving(&self) -> Serving {
        match self.serving.read() {
            Ok(s) => s.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// The engine's limits.
    pub fn config(&self) -> EngineConfig {
        self.config
    }

    /// Queues a job; refuses at once when the queue is full.
    pub fn submit(&self, job: Job) -> Result<()> {
        if job.tokens() > self.config.token_budget {
            return Err(GeneratorError::invalid(
                "prompts",
                format!(
                    "the request needs {} tokens of cache (prompts plus max_new_tokens, times n), more than this \
                     server's token budget of {}; send fewer prompts, a smaller n or max_new_tokens",
                    job.tokens(),
                    self.config.token_budget
                ),
            ));
        }
        if job.sequences() > self.config.max_batch_sequences {
            return Err(GeneratorError::invalid(
                "n",
                format!(
                    "the request has {} sequences (prompts times n); this server decodes at most {} together",
                    job.sequences(),
                    self.config.max_batch_sequences
                ),
            ));
        }
        self.jobs.try_send(job).map_err(|err| match err {
            mpsc::error::TrySendError::Full(_) => GeneratorError::Overloaded(format!(
                "the request queue is full ({} waiting); retry with backoff",
                self.config.queue_capacity
            )),
            mpsc::error::TrySendError::Closed(_) => GeneratorError::EngineStopped,
        })
    }

    /// Makes `serving` the version new requests get, if `expected` (when given) serves now.
    pub async fn activate(&self, serving: Serving, expected: Option<String>) -> Result<Activated> {
        let (reply, rx) = oneshot::channel();
        self.control
            .send(Control::Activate {
                serving,
                expected,
                reply,
            })
            .map_err(|_| GeneratorError::EngineStopped)?;
        rx.await.map_err(|_| GeneratorError::EngineStopped)?
    }

    /// Teacher-forced logprobs of each `(prompt, continuation)` under the serving version.
    pub async fn logprobs(
        &self,
        items: Vec<(Vec<u32>, Vec<u32>)>,
        expected: Option<String>,
    ) -> Result<ProbeResult> {
        let (reply, rx) = oneshot::channel();
        self.control
            .send(Control::LogProbs {
                items,
                expected,
                reply,
            })
            .map_err(|_| GeneratorError::EngineStopped)?;
        rx.await.map_err(|_| GeneratorError::EngineStopped)?
    }

    /// Stops admitting requests; with `abort`, also ends running ones with UNAVAILABLE.
    pub fn drain(&self, abort: bool) {
        // A stopped engine has nothing left to drain.
        let _ = self.control.send(Control::Drain { abort });
    }
}

/// Starts the engine thread serving `serving`, after a one-token warm-up generation.
pub fn start(
    serving: Serving,
    config: EngineConfig,
    metrics: Arc<Metrics>,
) -> Result<EngineHandle> {
    warm_up(&serving.model)?;
    let (jobs_tx, jobs_rx) = mpsc::channel(config.queue_capacity.max(1));
    let (control_tx, control_rx) = mpsc::unbounded_channel();
    metrics.set_version(&serving.version);
    let shared = Arc::new(RwLock::new(serving.clone()));
    let engine = Engine::new(config, jobs_rx, control_rx, Arc::clone(&shared), metrics);
    std::thread::Builder::new()
        .name("hir-engine".into())
        .spawn(move || engine.run())
        .map_err(|source| GeneratorError::Io {
            what: "starting the engine thread".into(),
            source,
        })?;
    Ok(EngineHandle {
        jobs: jobs_tx,
        control: control_tx,
        serving: shared,
        config,
    })
}

fn warm_up(model: &LoadedModel) -> Result<()> {
    let prompt = model.encode_prompt("Hello")?;
    let prompt = if prompt.is_empty() {
        vec![model.pad_token_id()]
    } else {
        prompt
    };
    let mut batch = new_batch(model);
    batch.admit(
        model.model(),
        &[GenerationRequest {
            id: 0,
            prompt_ids: prompt,
            params: SamplingParams::greedy(1),
        }],
        &[0],
    )?;
    while !batch.is_empty() {
        batch.step(model.model(), model.tokenizer())?;
    }
    Ok(())
}

fn new_batch(model: &LoadedModel) -> DecodeBatch {
    DecodeBatch::new(model.eos_token_ids(), model.pad_token_id())
}
