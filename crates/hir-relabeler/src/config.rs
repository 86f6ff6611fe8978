//! The relabeler's typed configuration: defaults, then a TOML file, then
//! `HIR_RELABELER__*` environment variables, then command-line flags.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Everything the relabeler can be configured with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RelabelerConfig {
    /// gRPC address.
    pub listen: SocketAddr,
    /// Prometheus `/metrics` address; none disables it.
    pub metrics_listen: Option<SocketAddr>,
    /// Postgres URL of the relabel store.
    pub database_url: String,
    /// BIG-bench tasks folder.
    pub bigbench: PathBuf,
    /// Generator addresses (`http://host:port`); requests are spread over them.
    pub generators: Vec<String>,
    /// Bearer token sent to the generators, if they guard generation.
    pub generator_token: Option<String>,
    /// Bearer token that guards StartSampling and SubmitFeedback.
    pub auth_token: Option<String>,
    /// Generate requests in flight at once (each one prompt with its n samples).
    pub concurrency: usize,
    /// Samples written to the store per transaction at most.
    pub write_batch: usize,
    /// Longest output accepted by Score and SubmitFeedback, in bytes.
    pub max_output_bytes: usize,
    /// Most items per SubmitFeedback call.
    pub max_feedback_items: usize,
    /// First retry delay when a generator is unavailable; doubles up to 10 s.
    pub retry_initial_ms: u64,
    /// Give up on an unavailable generator after this long.
    pub retry_give_up_secs: u64,
}

impl Default for RelabelerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 50052)),
            metrics_listen: Some(SocketAddr::from(([127, 0, 0, 1], 9452))),
            database_url: "postgres://postgres@127.0.0.1:5432/hindsight".into(),
            bigbench: PathBuf::from("data/bigbench"),
            generators: vec!["http://127.0.0.1:50051".into()],
            generator_token: None,
            auth_token: None,
            concurrency: 16,
            write_batch: 2000,
            max_output_bytes: 64 << 10,
            max_feedback_items: 10_000,
            retry_initial_ms: 200,
            retry_give_up_secs: 600,
        }
    }
}
