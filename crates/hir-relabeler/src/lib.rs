//! The hindsight relabeler: serves `hir.v1.RelabelerService` over gRPC.
//!
//! * [`sampler`]: samples an iteration through the generators into the store (resumable).
//! * [`service`]: the gRPC service (sampling control, Score, SubmitFeedback).
//! * [`tasks`]: BIG-bench tasks in the store.
//! * [`config`], [`metrics`], [`error`].
#![forbid(unsafe_code)]

pub mod config;
pub mod error;
pub mod metrics;
pub mod sampler;
pub mod service;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hir_proto::pb::relabeler_service_server::RelabelerServiceServer;
use hir_runtime::auth::BearerAuthLayer;
use hir_runtime::listeners::Listeners;
use hir_runtime::server::ServerBuilder;
use hir_store::{IterationStatus, Store};

use crate::config::RelabelerConfig;
use crate::metrics::Metrics;
use crate::sampler::SamplerSettings;
use crate::service::{ApiLimits, Relabeler};

pub use error::{RelabelerError, Result};

/// The RPCs that write.
pub const MUTATING_METHODS: [&str; 2] = [
    "/hir.v1.RelabelerService/StartSampling",
    "/hir.v1.RelabelerService/SubmitFeedback",
];

/// The health-service name that reports whether the generators can be reached.
pub const GENERATOR_HEALTH: &str = "generator";

/// A relabeler with its store migrated and its sockets bound.
pub struct Application {
    config: RelabelerConfig,
    listeners: Listeners,
    service: Relabeler,
    store: Store,
    metrics: Arc<Metrics>,
    generator_health: tokio::sync::watch::Receiver<bool>,
}

impl std::fmt::Debug for Application {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Application")
            .field("listen", &self.listeners.grpc_addr())
            .finish_non_exhaustive()
    }
}

impl Application {
    /// Connects and migrates the store, reads the task catalog and binds the sockets.
    pub async fn build(config: RelabelerConfig) -> anyhow::Result<Self> {
        let store = Store::open(&config.database_url).await?;
        let catalog = hir_core::task::Catalog::discover(&config.bigbench)?;
        let generators = hir_runtime::generators::GeneratorPool::new(
            &config.generators,
            config.generator_token.clone(),
        )
        .map_err(|e| RelabelerError::invalid("generators", e.to_string()))?;
        let (generator_up, generator_health) = tokio::sync::watch::channel(true);
        let settings = SamplerSettings {
            concurrency: config.concurrency.max(1),
            write_batch: config.write_batch.max(1),
            backoff: hir_runtime::generators::Backoff {
                initial: Duration::from_millis(config.retry_initial_ms.max(1)),
                max: Duration::from_secs(10),
                give_up: Duration::from_secs(config.retry_give_up_secs),
            },
            generator_up: Arc::new(generator_up),
        };
        let limits = ApiLimits {
            max_output_bytes: config.max_output_bytes,
            max_feedback_items: config.max_feedback_items,
        };
        let metrics = Metrics::new();
        let service = Relabeler::new(
            store.clone(),
            catalog,
            generators,
            settings,
            limits,
            Arc::clone(&metrics),
        );
        let listeners = Listeners::bind(config.listen, config.metrics_listen).await?;
        Ok(Self {
            config,
            listeners,
            service,
            store,
            metrics,
            generator_health,
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

    /// Resumes iterations left sampling by an earlier process, then serves until `shutdown`.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        for it in self
            .store
            .iterations_with_status(IterationStatus::Sampling)
            .await?
        {
            tracing::info!(run_id = %it.run_id, iteration = it.iteration, "resuming an interrupted iteration");
            self.service.spawn_sampling(it.run_id, it.iteration);
        }
        let server = ServerBuilder::new(self.listeners)?
            .add_service(RelabelerServiceServer::new(self.service))
            .auth(BearerAuthLayer::methods(
                self.config.auth_token.clone(),
                MUTATING_METHODS,
            ))
            .metrics(Arc::clone(&self.metrics.registry));
        // `generator` in the health service says whether the generators can be reached.
        let reporter = server.health();
        reporter
            .set_service_status(GENERATOR_HEALTH, tonic_health::ServingStatus::Serving)
            .await;
        let mut generator_health = self.generator_health.clone();
        tokio::spawn(async move {
            while generator_health.changed().await.is_ok() {
                let up = *generator_health.borrow_and_update();
                let status = if up {
                    tonic_health::ServingStatus::Serving
                } else {
                    tonic_health::ServingStatus::NotServing
                };
                reporter.set_service_status(GENERATOR_HEALTH, status).await;
            }
        });
        server.serve(shutdown).await?;
        Ok(())
    }
}

/// Command-line flags of `hir-relabeler` and `hir serve relabeler`.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// TOML configuration file.
    #[arg(long, env = "HIR_RELABELER_CONFIG")]
    pub config: Option<PathBuf>,
    /// gRPC address.
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Postgres URL of the relabel store.
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: Option<String>,
    /// Generator address (repeatable), e.g. http://127.0.0.1:50051.
    #[arg(long = "generator")]
    pub generators: Vec<String>,
    /// BIG-bench tasks folder.
    #[arg(long)]
    pub bigbench: Option<PathBuf>,
}

/// Runs a relabeler until Ctrl-C or SIGTERM.
pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    hir_runtime::telemetry::init(hir_runtime::telemetry::LogFormat::from_env());
    hir_runtime::fault::init();
    let mut config: RelabelerConfig =
        hir_runtime::config::load("relabeler", args.config.as_deref())?;
    if let Some(l) = args.listen {
        config.listen = l;
    }
    if let Some(u) = args.database_url {
        config.database_url = u;
    }
    if !args.generators.is_empty() {
        config.generators = args.generators;
    }
    if let Some(b) = args.bigbench {
        config.bigbench = b;
    }
    hir_runtime::config::refuse_placeholder_secrets([
        ("auth_token", config.auth_token.as_deref()),
        ("generator_token", config.generator_token.as_deref()),
        ("database_url", Some(config.database_url.as_str())),
    ])?;
    let app = Application::build(config).await?;
    app.run_until(hir_runtime::shutdown::signal()).await
}
