//! Talking to running services: the trainer's address and token, connecting with advice
//! when nothing answers, and gRPC failures as one line saying what to do.

use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use hir_proto::pb;
use hir_proto::pb::trainer_service_client::TrainerServiceClient;
use hir_runtime::auth::with_bearer;
use tonic::transport::Channel;

/// Where the trainer is and how to authenticate.
#[derive(Debug, Clone, Args)]
pub struct TrainerArgs {
    /// The trainer's gRPC address.
    #[arg(long, env = "HIR_TRAINER", default_value = "http://127.0.0.1:50053")]
    pub trainer: String,
    /// Bearer token for mutating calls.
    #[arg(long, env = "HIR_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

impl TrainerArgs {
    /// A connected client; fails fast with advice when nothing listens there.
    pub async fn connect(&self) -> Result<TrainerServiceClient<Channel>> {
        let channel = connect(
            &self.trainer,
            "--trainer",
            "the trainer",
            "; start one with `hir serve trainer`, or point --trainer (or HIR_TRAINER) at it",
            None,
        )
        .await?;
        Ok(TrainerServiceClient::new(channel))
    }

    pub fn authed<T>(&self, message: T) -> tonic::Request<T> {
        with_bearer(message, self.token.as_deref())
    }
}

/// A channel to `url` (given by `flag`), connected within 5 s; an unreachable service is
/// one line naming `what` and ending in `hint`.
pub(crate) async fn connect(
    url: &str,
    flag: &str,
    what: &str,
    hint: &str,
    request_timeout: Option<Duration>,
) -> Result<Channel> {
    let mut endpoint = Channel::from_shared(url.to_string())
        .with_context(|| format!("{flag} {url:?} is not a URL like http://host:port"))?
        .connect_timeout(Duration::from_secs(5));
    if let Some(t) = request_timeout {
        endpoint = endpoint.timeout(t);
    }
    endpoint
        .connect()
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach {what} at {url} ({}){hint}", root_cause(&e)))
}

/// The innermost cause of an error, e.g. "Connection refused (os error 111)".
pub fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut e = e;
    while let Some(next) = e.source() {
        e = next;
    }
    e.to_string()
}

/// A gRPC failure as one line with what to do about it.
pub fn explain(status: tonic::Status, what: &str) -> anyhow::Error {
    let hint = match status.code() {
        tonic::Code::Unauthenticated => " (pass --token or set HIR_TOKEN)",
        tonic::Code::NotFound => " (check the run id: `hir status RUN_ID`)",
        tonic::Code::Unavailable => " (is the service running and reachable?)",
        _ => "",
    };
    anyhow::anyhow!("{what}: {}{hint}", status.message())
}

pub async fn get_run(trainer: &TrainerArgs, run_id: &str) -> Result<pb::Run> {
    let mut client = trainer.connect().await?;
    Ok(client
        .get_run(pb::GetRunRequest {
            run_id: run_id.to_string(),
        })
        .await
        .map_err(|s| explain(s, "GetRun"))?
        .into_inner())
}
