//! The hindsight generator: serves `hir.v1.GeneratorService` over gRPC.
//!
//! * [`engine`]: the continuous-batching engine on its own thread.
//! * [`service`]: the gRPC service; validates requests into engine jobs.
//! * [`swap`]: checkpoint references, digests, uploads.
//! * [`config`]: typed configuration.
//! * [`metrics`]: Prometheus metrics.
//!
//! [`Application`] serves them with `hir_runtime::server` (health, reflection, the
//! bearer-token layer, the metrics endpoint, graceful shutdown); `hir-generator` and
//! `hir serve generator` run it.
#![forbid(unsafe_code)]

pub mod config;
pub mod engine;
pub mod error;
pub mod metrics;
pub mod service;
pub mod swap;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use candle_core::Device;
use hir_model::{LoadedModel, WeightMode};
use hir_proto::pb::generator_service_server::GeneratorServiceServer;
use hir_runtime::auth::{BearerAuthLayer, Guard};
use hir_runtime::listeners::Listeners;
use hir_runtime::server::ServerBuilder;

use crate::config::{GeneratorConfig, Weights};
use crate::engine::Serving;
use crate::metrics::Metrics;

pub use error::{GeneratorError, Result};

/// The RPCs that change what the generator serves.
pub const MUTATING_METHODS: [&str; 2] = [
    "/hir.v1.GeneratorService/SwapWeights",
    "/hir.v1.GeneratorService/UploadWeights",
];

/// A generator: its sockets, and its model once loaded.
///
/// [`Application::bind`] only binds the sockets; [`Application::run_until`] then serves health
/// (NOT_SERVING) and reflection at once, loads and warms up the model, and only then reports
/// SERVING; until then the generator's RPCs answer UNAVAILABLE. [`Application::build`] loads
/// the model before returning, for callers that want it ready first.
pub struct Application {
    config: GeneratorConfig,
    listeners: Listeners,
    metrics: Arc<Metrics>,
    service: service::GeneratorSlot,
}

impl std::fmt::Debug for Application {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Application")
            .field("listen", &self.listeners.grpc_addr())
            .finish_non_exhaustive()
    }
}

/// Parses `cpu` or `cuda:N`.
pub fn parse_device(name: &str) -> anyhow::Result<Device> {
    Ok(hir_model::parse_device(name)?)
}

/// The weight mode for `weights` and `model` on `device`.
pub fn weight_mode(weights: Weights, model: &std::path::Path, device: &Device) -> WeightMode {
    let dense = WeightMode::Dense;
    match weights {
        Weights::Quantized => WeightMode::Quantized,
        Weights::F32 => dense(candle_core::DType::F32),
        Weights::Bf16 => dense(candle_core::DType::BF16),
        Weights::Auto if model.extension().is_some_and(|e| e == "gguf") => WeightMode::Quantized,
        Weights::Auto if device.is_cuda() => dense(candle_core::DType::BF16),
        Weights::Auto => dense(candle_core::DType::F32),
    }
}

/// Loads the configured model, starts and warms up the engine, and returns the service.
async fn load(
    config: &GeneratorConfig,
    metrics: Arc<Metrics>,
) -> anyhow::Result<service::Generator> {
    let device = parse_device(&config.device)?;
    // Uploads an earlier process of this generator did not finish.
    swap::sweep_staging(&config.swap.staging_dir);
    let mode = weight_mode(config.weights, &config.model, &device);
    let path = config.model.clone();
    let (model, sha256, base_sha256) = {
        let device = device.clone();
        tokio::task::spawn_blocking(move || -> anyhow::Result<(LoadedModel, String, String)> {
            let model = LoadedModel::load(&path, &device, mode)
                .with_context(|| format!("loading {}", path.display()))?;
            let digest_of = if path.is_dir() {
                path.join(swap::MANIFEST)
            } else {
                path.clone()
            };
            let sha256 = if digest_of.is_file() {
                hir_model::formats::checkpoint::sha256_file(&digest_of)?
            } else {
                String::new()
            };
            // The identity adapters are checked against (the same digest unless the
            // folder has no manifest).
            let base_sha256 = if sha256.is_empty() {
                hir_model::formats::checkpoint::model_digest(&path)?
            } else {
                sha256.clone()
            };
            Ok((model, sha256, base_sha256))
        })
        .await??
    };
    let model = Arc::new(model);
    let serving = Serving {
        version: Arc::from(config.version.as_str()),
        base: Arc::clone(&model),
        model,
        sha256,
        base_sha256,
        activated_at: SystemTime::now(),
    };
    let engine = {
        let metrics = Arc::clone(&metrics);
        let engine_config = config.engine;
        tokio::task::spawn_blocking(move || engine::start(serving, engine_config, metrics))
            .await??
    };
    Ok(service::Generator::new(
        engine,
        config.limits,
        config.swap.clone(),
        device,
        config.weights,
        metrics,
    ))
}

impl Application {
    /// Binds the sockets; the model is loaded by [`Application::run_until`].
    pub async fn bind(config: GeneratorConfig) -> anyhow::Result<Self> {
        let listeners = Listeners::bind(config.listen, config.metrics_listen).await?;
        Ok(Self {
            config,
            listeners,
            metrics: Metrics::new(),
            service: service::GeneratorSlot::default(),
        })
    }

    /// Binds the sockets and loads, starts and warms up the model before returning.
    pub async fn build(config: GeneratorConfig) -> anyhow::Result<Self> {
        let app = Self::bind(config).await?;
        app.service
            .set(load(&app.config, Arc::clone(&app.metrics)).await?);
        Ok(app)
    }

    /// The bound gRPC address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.listeners.grpc_addr()
    }

    /// The bound metrics address, if enabled.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.listeners.metrics_addr()
    }

    /// Serves until `shutdown` resolves, loading the model first if [`Application::build`] did
    /// not; then stops admitting requests, gives running streams `shutdown_grace_secs` to
    /// finish, cancels what is left and returns. A model that fails to load ends the server
    /// with that error.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let guard = if self.config.auth.guard_generate {
            Guard::AllButProbes
        } else {
            Guard::Methods(MUTATING_METHODS.iter().map(|m| m.to_string()).collect())
        };
        let max = self.config.limits.max_message_bytes;
        let generator = GeneratorServiceServer::new(self.service.clone())
            .max_decoding_message_size(max)
            .max_encoding_message_size(max);
        // Shutdown stops the engine admitting; past the grace it cancels what still runs.
        let (draining, cancelling) = (self.service.clone(), self.service.clone());
        let mut server = ServerBuilder::new(self.listeners)?
            .add_service(generator)
            .auth(BearerAuthLayer::new(self.config.auth.token.clone(), guard))
            .metrics(Arc::clone(&self.metrics.registry))
            .grace(Duration::from_secs(self.config.shutdown_grace_secs))
            .on_shutdown(move || {
                if let Some(engine) = draining.engine() {
                    engine.drain(false);
                }
            })
            .on_grace_over(move || {
                if let Some(engine) = cancelling.engine() {
                    engine.drain(true);
                }
            });
        if !self.service.is_ready() {
            let (config, metrics, lazy) = (self.config, self.metrics, self.service);
            server = server.ready_when(async move {
                tracing::info!(model = %config.model.display(), "loading model; health is NOT_SERVING until it is warmed up");
                lazy.set(load(&config, metrics).await?);
                tracing::info!(version = %config.version, "model loaded and warmed up; serving");
                anyhow::Ok(())
            });
        }
        server.serve(shutdown).await?;
        Ok(())
    }
}

/// Command-line flags of `hir-generator` and `hir serve generator`; each overrides the
/// configuration file and the environment.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// TOML configuration file.
    #[arg(long, env = "HIR_GENERATOR_CONFIG")]
    pub config: Option<PathBuf>,
    /// Model to serve at start: a HF folder or a GGUF file.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// gRPC address, e.g. 0.0.0.0:50051.
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Prometheus /metrics address.
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,
    /// Folder that SwapWeights references resolve under.
    #[arg(long)]
    pub checkpoint_root: Option<PathBuf>,
    /// Version name of the starting model (the configuration's `version`). Not `--version`,
    /// which prints the program's version.
    #[arg(long)]
    pub model_version: Option<String>,
}

impl ServeArgs {
    /// The configuration: file, environment, then these flags.
    pub fn config(&self) -> anyhow::Result<GeneratorConfig> {
        let mut config: GeneratorConfig =
            hir_runtime::config::load("generator", self.config.as_deref())?;
        if let Some(m) = &self.model {
            config.model.clone_from(m);
        }
        if let Some(l) = self.listen {
            config.listen = l;
        }
        if let Some(l) = self.metrics_listen {
            config.metrics_listen = Some(l);
        }
        if let Some(r) = &self.checkpoint_root {
            config.swap.checkpoint_root = Some(r.clone());
        }
        if let Some(v) = &self.model_version {
            config.version.clone_from(v);
        }
        hir_runtime::config::refuse_placeholder_secrets([(
            "auth.token",
            config.auth.token.as_deref(),
        )])?;
        Ok(config)
    }
}

/// Runs a generator until Ctrl-C or SIGTERM.
pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    hir_runtime::telemetry::init(hir_runtime::telemetry::LogFormat::from_env());
    hir_runtime::fault::init();
    let config = args.config()?;
    let app = Application::bind(config).await?;
    app.run_until(hir_runtime::shutdown::signal()).await
}
