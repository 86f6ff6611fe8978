//! Commands against a generator or any service: `hir health` and `hir eval`.

use std::time::Duration;

use anyhow::{bail, Result};
use clap::Args;
use hir_proto::pb;
use hir_proto::pb::generator_service_client::GeneratorServiceClient;
use hir_runtime::auth::with_bearer;

use crate::BigBench;

use crate::client::{connect, explain};

/// `hir health`: exits 0 when a service reports SERVING.
#[derive(Debug, Args)]
pub struct HealthArgs {
    /// The service's gRPC address.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    pub addr: String,
    /// Service name to check ("" is the server as a whole).
    #[arg(long, default_value = "")]
    pub service: String,
}

pub async fn health(args: HealthArgs) -> Result<()> {
    let channel = connect(
        &args.addr,
        "--addr",
        "the service",
        "",
        Some(Duration::from_secs(5)),
    )
    .await?;
    let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
    let status = client
        .check(tonic_health::pb::HealthCheckRequest {
            service: args.service.clone(),
        })
        .await
        .map_err(|s| explain(s, "health check"))?
        .into_inner()
        .status;
    let serving = status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
    if !serving {
        bail!("{} is not serving (status {status})", args.addr);
    }
    println!("{}: serving", args.addr);
    Ok(())
}

/// `hir eval`: greedy accuracy of what a generator serves on a task's test split.
#[derive(Debug, Args)]
pub struct EvalArgs {
    /// The generator's gRPC address.
    #[arg(long, env = "HIR_GENERATOR", default_value = "http://127.0.0.1:50051")]
    pub generator: String,
    /// Bearer token, when the generator guards generation.
    #[arg(long, env = "HIR_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Task name or path.
    #[arg(long)]
    pub task: String,
    /// The version to evaluate; the call fails if the generator serves another.
    #[arg(long, default_value = "")]
    pub version: String,
    /// Test prompts at most (0: all).
    #[arg(long, default_value_t = 0)]
    pub max_test_prompts: usize,
    /// New tokens per answer.
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: u32,
    /// Split seed.
    #[arg(long, default_value_t = 1)]
    pub seed: u32,
    /// Send each prompt as one user turn of the model's chat template.
    #[arg(long)]
    pub chat: bool,
    #[command(flatten)]
    pub bigbench: BigBench,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

pub async fn eval(args: EvalArgs) -> Result<()> {
    let catalog = hir_core::task::Catalog::discover(&args.bigbench.dir)?;
    let task = catalog.load(&args.task)?;
    let (test, prompts) = hir_core::eval::test_prompts(
        &task,
        args.seed,
        args.max_test_prompts,
        hir_core::prompt::PromptVariant::Eval,
    );
    let channel = connect(
        &args.generator,
        "--generator",
        "the generator",
        "; point --generator (or HIR_GENERATOR) at it",
        None,
    )
    .await?;
    let mut client = GeneratorServiceClient::new(channel);
    let mut texts = vec![String::new(); prompts.len()];
    let mut version = String::new();
    for (c, chunk) in prompts.chunks(16).enumerate() {
        let request = pb::GenerateRequest {
            prompts: chunk.to_vec(),
            n: 1,
            sampling: Some(pb::SamplingParams {
                temperature: 0.0,
                top_k: 0,
                top_p: 1.0,
                max_new_tokens: args.max_new_tokens,
                stop: vec![],
                seed: None,
            }),
            return_logprobs: false,
            expected_version: args.version.clone(),
            request_id: String::new(),
            chat: args.chat,
        };
        let mut stream = client
            .generate(with_bearer(request, args.token.as_deref()))
            .await
            .map_err(|s| explain(s, "Generate"))?
            .into_inner();
        while let Some(r) = stream.message().await.map_err(|s| explain(s, "Generate"))? {
            if let Some(comp) = r.completion {
                version = comp.model_version;
                if let Some(slot) = texts.get_mut(c * 16 + comp.prompt_index as usize) {
                    *slot = comp.text;
                }
            }
        }
    }
    let (eval, _) = hir_core::eval::tally(&task, &test, &texts);
    if args.json {
        println!(
            "{}",
            serde_json::json!({"task": eval.task, "version": version, "examples": eval.examples,
                "exact": eval.exact, "extracted": eval.extracted, "predicted": eval.predicted})
        );
    } else {
        println!(
            "{} on {} ({} test examples): exact {:.1}%, extracted {:.1}%",
            version,
            eval.task,
            eval.examples,
            100.0 * eval.exact,
            100.0 * eval.extracted
        );
        println!("answers: {:?}", eval.predicted);
    }
    Ok(())
}
