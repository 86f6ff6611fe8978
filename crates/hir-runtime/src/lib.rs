//! Plumbing every hindsight server shares, so each service crate holds only its own logic.
//!
//! * [`config`]: typed configuration from defaults, a TOML file and `HIR_<SERVICE>__*`
//!   environment variables, in that order of precedence.
//! * [`telemetry`]: structured `tracing` logs (text or JSON).
//! * [`auth`]: a tower layer that demands a bearer token on guarded gRPC methods.
//! * [`metrics`]: a Prometheus `/metrics` endpoint over a `prometheus-client` registry.
//! * [`generators`]: a pool of generator clients, round-robin, with backoff.
//! * [`listeners`]: the gRPC and metrics sockets of a server.
//! * [`memory`]: this process's resident memory now and at its peak.
//! * [`models`]: where the default model lies, and fetching it.
//! * [`fault`]: crash points for the fault suite (compiled in with `fault-injection`).
//! * [`shutdown`]: a future that resolves on Ctrl-C or SIGTERM.
//! * [`status`]: errors to gRPC statuses, the same way in every service.
//! * [`server`]: the gRPC server of every service, with health, reflection, auth, metrics
//!   and graceful shutdown around the service's own gRPC services.
// Two audited exceptions: `memory::release_free` calls the C allocator, and a crash point
// of `fault` (only with `fault-injection`) sends SIGKILL to its own process.
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod auth;
pub mod config;
pub mod fault;
pub mod generators;
pub mod listeners;
pub mod memory;
pub mod metrics;
pub mod models;
pub mod server;
pub mod shutdown;
pub mod status;
pub mod telemetry;

/// Errors of the runtime plumbing.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RuntimeError {
    /// The configuration could not be read or does not have the expected shape.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A socket could not be bound or served.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Server reflection could not be built from the descriptor sets.
    #[error("building server reflection: {0}")]
    Reflection(String),
    /// The gRPC server failed.
    #[error("serving gRPC")]
    Transport(#[from] tonic::transport::Error),
    /// The service failed to get ready, so the server shut down.
    #[error("the service failed to get ready")]
    NotReady(#[source] server::BoxError),
}

/// Result alias of `hir-runtime`.
pub type Result<T, E = RuntimeError> = std::result::Result<T, E>;
