//! The trainer's typed configuration: defaults, then a TOML file, then
//! `HIR_TRAINER__*` environment variables, then command-line flags.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Everything the trainer is configured with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainerConfig {
    /// gRPC address.
    pub listen: SocketAddr,
    /// Prometheus `/metrics` address (none disables it).
    pub metrics_listen: Option<SocketAddr>,
    /// Postgres URL of the relabel store.
    pub database_url: String,
    /// BIG-bench tasks folder.
    pub bigbench: PathBuf,
    /// The relabeler that samples each iteration.
    pub relabeler: String,
    /// Bearer token for the relabeler's mutating calls.
    pub relabeler_token: Option<String>,
    /// Every generator to swap new versions into; evaluation is spread over them.
    pub generators: Vec<String>,
    /// Bearer token for the generators.
    pub generator_token: Option<String>,
    /// Bearer token that guards this trainer's mutating calls.
    pub auth_token: Option<String>,
    /// Where new versions are written (`<run>/it<k>/`), in Hugging Face layout.
    pub checkpoint_dir: PathBuf,
    /// Stream checkpoints to the generators (`UploadWeights`) instead of asking them to
    /// load `<run>/it<k>` under their own `swap.checkpoint_root` (which must then be the
    /// same volume as `checkpoint_dir`).
    pub upload: bool,
    /// Where resumable training state (weights, optimizer moments) is kept.
    pub state_dir: PathBuf,
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// Optimizer steps between durable commits of the training state. A crash loses at
    /// most this many steps of work, which are then redone exactly.
    pub commit_every_steps: u32,
    /// Lease on training batches, in seconds; a crashed trainer's batches return to the
    /// queue after it.
    pub lease_secs: u64,
    /// Prompts per evaluation request.
    pub eval_batch: usize,
    /// Mean absolute log-probability difference allowed between the trainer's model and
    /// a generator's after a swap.
    pub probe_tolerance: f64,
    /// The same for a generator that holds the weights quantized (Q8_0 adds up to about
    /// 0.07 on SmolLM2); a wrongly loaded model is off by whole nats.
    pub probe_tolerance_quantized: f64,
    /// Name of this trainer in batch leases (default: host name and process id).
    pub owner: Option<String>,
    /// How long to keep asking an unreachable or restarting relabeler before the run fails.
    pub relabeler_give_up_secs: u64,
    /// Whether a Llama-family model is trained layer by layer, recomputing each layer's
    /// activations for its backward pass: the same gradients with at most one layer's
    /// activations held (on SmolLM2, about 1.5 GB less per micro-batch of 4 pairs) for one
    /// more forward pass without a graph (about 15% of a CPU step). `auto` recomputes on
    /// the CPU, where memory is scarce, and keeps the whole graph on a GPU.
    pub recompute_activations: Recompute,
    /// MiB the layer-by-layer pass may spend keeping the matrix products of its first
    /// forward pass, so that the recomputation copies them instead of multiplying again
    /// (20.7 KB per token and layer on SmolLM2; the top layers that fit keep theirs). On
    /// SmolLM2, 660 MiB keeps all 30 layers of a micro-batch of 4 TSO-3 pairs and makes the
    /// step about 9% faster on a 2-core CPU. 0, the default, keeps none: with 512 the
    /// demo's peak rose from about 3,380 to 3,915–3,969 MiB, past its 4 GB target.
    pub kept_products_mib: u64,
    /// Drop the training state (model, optimizer) from memory once an iteration's
    /// checkpoint is swapped in and verified, and load it again from its committed snapshot when the next
    /// iteration trains (bit-exactly: a snapshot resumes the same steps). Sampling and
    /// evaluation then run without the trainer's weights and moments resident (on
    /// SmolLM2, 2.2 GB for full fine-tuning, 540 MB with LoRA) for a load of a few
    /// seconds per iteration.
    pub release_state_between_iterations: bool,
}

/// See [`TrainerConfig::recompute_activations`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Recompute {
    /// On the CPU.
    #[default]
    Auto,
    /// Always.
    Always,
    /// Never: one backward pass over the whole graph.
    Never,
}

impl Recompute {
    /// Whether to recompute on `device`.
    pub fn on(self, device: &candle_core::Device) -> bool {
        match self {
            Recompute::Auto => device.is_cpu(),
            Recompute::Always => true,
            Recompute::Never => false,
        }
    }
}

impl TrainerConfig {
    /// [`TrainerConfig::relabeler_give_up_secs`] as a duration.
    pub fn relabeler_give_up(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.relabeler_give_up_secs)
    }
}

impl Default for TrainerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 50053)),
            metrics_listen: Some(SocketAddr::from(([127, 0, 0, 1], 9453))),
            database_url: "postgres://postgres@127.0.0.1:5432/hindsight".into(),
            bigbench: PathBuf::from("data/bigbench"),
            relabeler: "http://127.0.0.1:50052".into(),
            relabeler_token: None,
            generators: vec!["http://127.0.0.1:50051".into()],
            generator_token: None,
            auth_token: None,
            checkpoint_dir: PathBuf::from("checkpoints"),
            upload: false,
            state_dir: PathBuf::from("trainer-state"),
            device: "cpu".into(),
            commit_every_steps: 8,
            lease_secs: 900,
            eval_batch: 16,
            probe_tolerance: 0.05,
            probe_tolerance_quantized: 0.2,
            owner: None,
            relabeler_give_up_secs: 600,
            recompute_activations: Recompute::Auto,
            kept_products_mib: 0,
            release_state_between_iterations: true,
        }
    }
}
