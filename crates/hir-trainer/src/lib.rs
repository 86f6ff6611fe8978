//! The hindsight trainer: serves `hir.v1.TrainerService` over gRPC and drives HIR runs.
//!
//! * [`driver`]: one run, iteration by iteration (sample, train, checkpoint, swap,
//!   evaluate), resumable from what the store records.
//! * [`state`]: the model and AdamW being trained, and their durable snapshots.
//! * [`examples`]: training pairs with sub-output relabeling (HIR.md §1.5).
//! * [`eval`]: greedy evaluation of the test split through the generators.
//! * [`remote`]: clients of the relabeler and the generators (swap, probe, generate).
//! * [`service`]: the gRPC service; [`config`], [`metrics`], [`error`].
#![forbid(unsafe_code)]

pub mod config;
pub mod driver;
pub mod error;
pub mod eval;
pub mod events;
pub mod examples;
pub mod metrics;
pub mod remote;
pub mod run_view;
pub mod service;
pub mod state;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use hir_proto::pb::trainer_service_server::TrainerServiceServer;
use hir_runtime::auth::BearerAuthLayer;
use hir_runtime::listeners::Listeners;
use hir_runtime::server::ServerBuilder;
use hir_store::{RunStatus, Store};

use crate::config::TrainerConfig;
use crate::driver::Context;
use crate::metrics::Metrics;
use crate::remote::Remotes;
use crate::service::Trainer;

pub use error::{Result, TrainerError};

/// The RPCs that change something.
pub const MUTATING_METHODS: [&str; 3] = [
    "/hir.v1.TrainerService/StartRun",
    "/hir.v1.TrainerService/StopRun",
    "/hir.v1.TrainerService/ResumeRun",
];

/// A trainer with its store migrated and its sockets bound.
pub struct Application {
    config: TrainerConfig,
    listeners: Listeners,
    service: Trainer,
    store: Store,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Application {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Application")
            .field("listen", &self.listeners.grpc_addr())
            .finish_non_exhaustive()
    }
}

impl Application {
    /// Connects and migrates the store, reads the task catalog, opens the device and
    /// binds the sockets.
    pub async fn build(config: TrainerConfig) -> anyhow::Result<Self> {
        let store = Store::open(&config.database_url).await?;
        let catalog = hir_core::task::Catalog::discover(&config.bigbench)?;
        let remotes = Remotes::new(
            &config.relabeler,
            config.relabeler_token.clone(),
            &config.generators,
            config.generator_token.clone(),
        )?;
        let device = hir_model::parse_device(&config.device)?;
        for dir in [&config.checkpoint_dir, &config.state_dir] {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let owner = config.owner.clone().unwrap_or_else(|| {
            let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "trainer".into());
            format!("{host}-{}", std::process::id())
        });
        let metrics = Metrics::new();
        let ctx = Arc::new(Context {
            store: store.clone(),
            tasks: hir_store::TaskCache::new(catalog),
            remotes,
            config: config.clone(),
            device,
            owner,
            metrics: Arc::clone(&metrics),
        });
        let listeners = Listeners::bind(config.listen, config.metrics_listen).await?;
        Ok(Self {
            config,
            listeners,
            service: Trainer::new(ctx),
            store,
            metrics,
        })
    }

    /// The bound gRPC address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.listeners.grpc_addr()
    }

    /// The bound metrics address, if enabled.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.listeners.metrics_addr()
    }

    /// Drives again the runs left running by an earlier process, then serves until
    /// `shutdown`.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        for run in self.store.runs_with_status(RunStatus::Running).await? {
            tracing::info!(run_id = %run.id, "resuming a run left running");
            self.service.spawn_driver(run.id);
        }
        ServerBuilder::new(self.listeners)?
            .add_service(TrainerServiceServer::new(self.service))
            .auth(BearerAuthLayer::methods(
                self.config.auth_token.clone(),
                MUTATING_METHODS,
            ))
            .metrics(Arc::clone(&self.metrics.registry))
            .serve(shutdown)
            .await?;
        Ok(())
    }
}

/// Command-line flags of `hir-trainer` and `hir serve trainer`.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// TOML configuration file.
    #[arg(long, env = "HIR_TRAINER_CONFIG")]
    pub config: Option<PathBuf>,
    /// gRPC address.
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Postgres URL of the relabel store.
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: Option<String>,
    /// Relabeler address, e.g. http://127.0.0.1:50052.
    #[arg(long)]
    pub relabeler: Option<String>,
    /// Generator address (repeatable); every one gets each new version.
    #[arg(long = "generator")]
    pub generators: Vec<String>,
    /// BIG-bench tasks folder.
    #[arg(long)]
    pub bigbench: Option<PathBuf>,
}

/// Runs a trainer until Ctrl-C or SIGTERM.
pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    hir_runtime::telemetry::init(hir_runtime::telemetry::LogFormat::from_env());
    hir_runtime::fault::init();
    let mut config: TrainerConfig = hir_runtime::config::load("trainer", args.config.as_deref())?;
    if let Some(l) = args.listen {
        config.listen = l;
    }
    if let Some(u) = args.database_url {
        config.database_url = u;
    }
    if let Some(r) = args.relabeler {
        config.relabeler = r;
    }
    if !args.generators.is_empty() {
        config.generators = args.generators;
    }
    if let Some(b) = args.bigbench {
        config.bigbench = b;
    }
    hir_runtime::config::refuse_placeholder_secrets([
        ("auth_token", config.auth_token.as_deref()),
        ("relabeler_token", config.relabeler_token.as_deref()),
        ("generator_token", config.generator_token.as_deref()),
        ("database_url", Some(config.database_url.as_str())),
    ])?;
    let app = Application::build(config).await?;
    app.run_until(hir_runtime::shutdown::signal()).await
}
