//! `hir demo`: the whole loop on one machine, in about six minutes on two CPU cores.
//!
//! It fetches SmolLM2-135M-Instruct if missing, uses `DATABASE_URL` or starts a private
//! temporary PostgreSQL, starts the generator, relabeler and trainer on free local ports,
//! runs one HIR iteration on a subset of object_counting (the `cpu` experiment preset's task
//! and knobs, on a smaller budget) with progress bars, prints a before/after table with
//! each accuracy's Wilson interval and the paired test against the base model, writes a
//! report, and shuts everything down.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;
use hir_proto::pb;
use hir_proto::pb::trainer_service_client::TrainerServiceClient;

use crate::local::{Services, SMOLLM2 as MODEL};
use crate::report::print_run;
use crate::watch::watch;

/// The task the demo trains on.
const TASK: &str = "object_counting";

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// The model: a GGUF file or a HF folder, Llama-family or FLAN-T5 (fetched when it is the
    /// default and missing).
    #[arg(long, default_value = MODEL)]
    pub model: PathBuf,
    /// BIG-bench tasks folder.
    #[arg(long, default_value = "data/bigbench")]
    pub bigbench: PathBuf,
    /// Iterations after the base evaluation.
    #[arg(long, default_value_t = 1)]
    pub iterations: u32,
    /// Training prompts used per iteration (of 800).
    #[arg(long, default_value_t = 32)]
    pub train_prompts: u32,
    /// Test prompts evaluated (of 200).
    #[arg(long, default_value_t = 100)]
    pub test_prompts: u32,
    /// Optimizer steps per iteration.
    #[arg(long, default_value_t = 8)]
    pub steps: u32,
    /// Where the report goes.
    #[arg(long, default_value = "reports")]
    pub out: PathBuf,
    /// Train LoRA adapters of this rank instead of every weight: less memory, and each
    /// swap moves only the adapter.
    #[arg(long)]
    pub lora_rank: Option<u32>,
    /// LoRA's alpha (with `--lora-rank`) [16].
    #[arg(long)]
    pub lora_alpha: Option<f64>,
    /// The projections LoRA adapts, comma-separated (with `--lora-rank`) [q_proj,v_proj].
    #[arg(long)]
    pub lora_targets: Option<String>,
    /// AdamW learning rate [5e-5; adapters usually train at a larger one, e.g. 5e-4].
    #[arg(long)]
    pub learning_rate: Option<f64>,
    /// Postgres URL; a private temporary server is started when absent.
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: Option<String>,
}

pub async fn run(args: DemoArgs) -> Result<()> {
    hir_runtime::telemetry::init_with_default(
        hir_runtime::telemetry::LogFormat::from_env(),
        "warn",
    );
    crate::local::ensure_model(&args.model)?;
    let services = Services::start(
        &args.model,
        &args.bigbench,
        args.database_url.as_deref(),
        16,
        args.steps,
    )
    .await?;
    // The `cpu` experiment preset's knobs, on a smaller budget.
    let knobs = pb::Hyperparameters {
        max_train_prompts: Some(args.train_prompts),
        max_test_prompts: Some(args.test_prompts),
        max_steps_per_iteration: Some(args.steps),
        ..crate::experiment::cpu_preset()
    };
    println!(
        "services up; the demo trains on a subset so it fits a laptop CPU: {} iteration(s), {} of 800 \
         training prompts x {} samples, {} optimizer steps of {} examples per iteration, {} of 200 \
         test prompts (`hir experiment --preset cpu` is the measured experiment; the paper's \
         protocol belongs on a GPU: `hir run` with the defaults)",
        args.iterations,
        args.train_prompts,
        knobs.samples_per_prompt.unwrap_or_default(),
        args.steps,
        knobs.batch_size.unwrap_or_default(),
        args.test_prompts
    );
    let mut client = TrainerServiceClient::connect(services.trainer.clone()).await?;
    let request = pb::StartRunRequest {
        run_id: String::new(),
        name: "demo".into(),
        tasks: vec![TASK.into()],
        model: args.model.to_string_lossy().into_owned(),
        policy: "hir".into(),
        hyperparameters: Some(pb::Hyperparameters {
            iterations: Some(args.iterations),
            learning_rate: args.learning_rate.or(knobs.learning_rate),
            lora_rank: args.lora_rank,
            lora_alpha: args.lora_alpha,
            lora_targets: args.lora_targets.clone(),
            ..knobs
        }),
    };
    let token = services.token.clone();
    let run = client
        .start_run(hir_runtime::auth::with_bearer(request, Some(&token)))
        .await
        .map_err(|s| crate::client::explain(s, "StartRun"))?
        .into_inner();
    println!("run {}", run.run_id);
    let run = watch(&mut client, &run.run_id, true).await?;
    print_run(&run, false);
    let (md, svg) = crate::report::write(&run, &args.out.join(&run.run_id))?;
    println!("report: {}\nchart:  {}", md.display(), svg.display());
    services.stop().await;
    if run.status != pb::RunStatus::Done as i32 {
        bail!("the demo run did not finish: {}", run.error);
    }
    Ok(())
}
