//! Commands on a run: `hir run`, `status`, `watch`, `stop`, `resume`, `checkpoints` and
//! `report`.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;
use hir_proto::pb;

use crate::client::{explain, get_run, TrainerArgs};
use crate::report::{print_run, run_json};
use crate::watch::watch;

/// `hir run`: every knob of a run.
#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub trainer: TrainerArgs,
    /// Task name or path (repeatable), e.g. tracking_shuffled_objects_three_objects.
    #[arg(long = "task", required = true)]
    pub tasks: Vec<String>,
    /// The starting model as the trainer sees it: a HF folder or a GGUF file.
    #[arg(long)]
    pub model: String,
    /// Relabel policy: hir, hindsight_answer, farl or sft (the gold answers, a ceiling).
    #[arg(long, default_value = "hir")]
    pub policy: String,
    /// Human-readable name.
    #[arg(long, default_value = "")]
    pub name: String,
    /// Run id (a UUID) to make the call idempotent; generated when absent.
    #[arg(long, default_value = "")]
    pub run_id: String,
    /// Prompts as the paper's text (`raw`) or as a chat turn (`chat`) [raw].
    #[arg(long)]
    pub prompt_style: Option<String>,
    /// What makes a sample correct for relabeling: `exact` (the reference) or `extracted`
    /// (the answer read out of the output) [exact].
    #[arg(long)]
    pub verifier: Option<String>,
    /// Where unset knobs come from: `reference` (run.sh: 1 sample per prompt) or `paper`
    /// (4 samples per prompt, otherwise the same) [paper].
    #[arg(long)]
    pub preset: Option<String>,
    /// The projections LoRA adapts when `--lora-rank` is given, comma-separated, of q_proj,
    /// k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj [q_proj,v_proj].
    #[arg(long)]
    pub lora_targets: Option<String>,
    #[command(flatten)]
    pub knobs: crate::knobs::KnobArgs,
    /// Follow the run's progress until it ends.
    #[arg(long)]
    pub watch: bool,
    /// Print the run as JSON.
    #[arg(long)]
    pub json: bool,
}

impl RunArgs {
    /// The StartRun request; a knob whose value does not parse is refused here, naming it.
    pub fn request(&self) -> Result<pb::StartRunRequest> {
        let mut h = pb::Hyperparameters {
            prompt_style: self.prompt_style.clone(),
            verifier: self.verifier.clone(),
            preset: self.preset.clone(),
            lora_targets: self.lora_targets.clone(),
            ..Default::default()
        };
        self.knobs.apply(&mut h)?;
        Ok(pb::StartRunRequest {
            run_id: self.run_id.clone(),
            name: self.name.clone(),
            tasks: self.tasks.clone(),
            model: self.model.clone(),
            policy: self.policy.clone(),
            hyperparameters: Some(h),
        })
    }
}

/// A run id argument.
#[derive(Debug, Args)]
pub struct RunIdArgs {
    #[command(flatten)]
    pub trainer: TrainerArgs,
    /// The run's UUID.
    pub run_id: String,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(args: RunArgs) -> Result<()> {
    let mut client = args.trainer.connect().await?;
    let run = client
        .start_run(args.trainer.authed(args.request()?))
        .await
        .map_err(|s| explain(s, "StartRun"))?
        .into_inner();
    if args.json {
        println!("{}", run_json(&run));
    } else {
        println!("run {} started ({})", run.run_id, run.name);
    }
    if args.watch {
        let run = watch(&mut client, &run.run_id, !args.json).await?;
        print_run(&run, args.json);
        ensure_done(&run)?;
    }
    Ok(())
}

pub async fn status(args: RunIdArgs) -> Result<()> {
    let run = get_run(&args.trainer, &args.run_id).await?;
    print_run(&run, args.json);
    Ok(())
}

pub async fn watch_cmd(args: RunIdArgs) -> Result<()> {
    let mut client = args.trainer.connect().await?;
    let run = watch(&mut client, &args.run_id, !args.json).await?;
    print_run(&run, args.json);
    ensure_done(&run)
}

pub async fn stop(args: RunIdArgs) -> Result<()> {
    let mut client = args.trainer.connect().await?;
    let request = args.trainer.authed(pb::StopRunRequest {
        run_id: args.run_id.clone(),
    });
    let run = client.stop_run(request).await;
    show(run, "StopRun", args.json)
}

pub async fn resume(args: RunIdArgs) -> Result<()> {
    let mut client = args.trainer.connect().await?;
    let request = args.trainer.authed(pb::ResumeRunRequest {
        run_id: args.run_id.clone(),
    });
    let run = client.resume_run(request).await;
    show(run, "ResumeRun", args.json)
}

/// Prints the run a call returned, or explains its failure.
fn show(
    run: Result<tonic::Response<pb::Run>, tonic::Status>,
    what: &str,
    json: bool,
) -> Result<()> {
    let run = run.map_err(|s| explain(s, what))?.into_inner();
    print_run(&run, json);
    Ok(())
}

/// `hir checkpoints`: registered model versions.
#[derive(Debug, Args)]
pub struct CheckpointArgs {
    #[command(flatten)]
    pub trainer: TrainerArgs,
    /// Only this run's versions.
    #[arg(long, default_value = "")]
    pub run_id: String,
}

pub async fn checkpoints(args: CheckpointArgs) -> Result<()> {
    let mut client = args.trainer.connect().await?;
    let versions = client
        .list_checkpoints(pb::ListCheckpointsRequest {
            run_id: args.run_id.clone(),
        })
        .await
        .map_err(|s| explain(s, "ListCheckpoints"))?
        .into_inner()
        .versions;
    println!(
        "{:<48} {:>9} {:<48} checkpoint",
        "version", "iteration", "parent"
    );
    for v in versions {
        println!(
            "{:<48} {:>9} {:<48} {}",
            v.version, v.iteration, v.parent_version, v.checkpoint_uri
        );
    }
    Ok(())
}

fn ensure_done(run: &pb::Run) -> Result<()> {
    match pb::RunStatus::try_from(run.status) {
        Ok(pb::RunStatus::Done) => Ok(()),
        Ok(pb::RunStatus::Stopped) => bail!(
            "run {} was stopped; `hir resume {}` continues it",
            run.run_id,
            run.run_id
        ),
        _ => bail!(
            "run {} failed: {}; fix the cause, then `hir resume {}`",
            run.run_id,
            run.error,
            run.run_id
        ),
    }
}

/// `hir report`.
#[derive(Debug, Args)]
pub struct ReportArgs {
    #[command(flatten)]
    pub trainer: TrainerArgs,
    /// The run's UUID.
    #[arg(long = "run")]
    pub run_id: String,
    /// Folder to write `report.md` and `accuracy.svg` into.
    #[arg(long, default_value = "reports")]
    pub out: PathBuf,
}

/// `hir report`: the run's iteration table, a Markdown report and an accuracy chart.
pub async fn report(args: ReportArgs) -> Result<()> {
    let run = get_run(&args.trainer, &args.run_id).await?;
    let (md, svg) = crate::report::write(&run, &args.out.join(&run.run_id))?;
    println!("{}", crate::report::iteration_table(&run));
    println!("report: {}\nchart:  {}", md.display(), svg.display());
    Ok(())
}
