//! Commands against running services: `hir run`, `status`, `watch`, `stop`, `resume`,
//! `checkpoints`, `eval`, `health` and `report`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use hir_proto::pb;
use hir_proto::pb::generator_service_client::GeneratorServiceClient;
use hir_proto::pb::trainer_service_client::TrainerServiceClient;
use hir_runtime::auth::with_bearer;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use tonic::transport::Channel;

use crate::report::{iteration_status_name, status_name};
use crate::BigBench;

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
async fn connect(
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

/// Follows a run with progress bars (or silently) until it ends; returns the run then.
pub async fn watch(
    client: &mut TrainerServiceClient<Channel>,
    run_id: &str,
    bars: bool,
) -> Result<pb::Run> {
    Ok(watch_timed(client, run_id, bars).await?.0)
}

/// When this watcher first saw each iteration reach each status.
#[derive(Debug, Default, Clone)]
pub struct StatusTimes(BTreeMap<(u32, i32), std::time::Instant>);

impl StatusTimes {
    fn saw(&mut self, iteration: u32, status: i32) {
        self.0
            .entry((iteration, status))
            .or_insert_with(std::time::Instant::now);
    }

    /// Seconds iteration `k` took from status `from` to status `to`, if both were seen.
    pub fn seconds(
        &self,
        k: u32,
        from: pb::IterationStatus,
        to: pb::IterationStatus,
    ) -> Option<f64> {
        let a = self.0.get(&(k, from as i32))?;
        let b = self.0.get(&(k, to as i32))?;
        Some(b.saturating_duration_since(*a).as_secs_f64())
    }
}

/// [`watch`], also timing each iteration's status changes as they are seen.
pub async fn watch_timed(
    client: &mut TrainerServiceClient<Channel>,
    run_id: &str,
    bars: bool,
) -> Result<(pb::Run, StatusTimes)> {
    let mut times = StatusTimes::default();
    let mut stream = client
        .watch_run(pb::GetRunRequest {
            run_id: run_id.to_string(),
        })
        .await
        .map_err(|s| explain(s, "WatchRun"))?
        .into_inner();
    let multi = MultiProgress::new();
    if !bars {
        multi.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    // Milestones go above the bars on a terminal, as plain lines otherwise (a log file).
    let plain = bars && multi.is_hidden();
    let say = |line: String| {
        if plain {
            println!("{line}");
        } else {
            multi.println(line).ok();
        }
    };
    let style = ProgressStyle::with_template("{prefix:>12} {bar:30} {pos}/{len} {msg}")
        .expect("valid template");
    let iteration_bar = multi.add(ProgressBar::new(0).with_style(style.clone()));
    iteration_bar.set_prefix("iterations");
    let status_bar = multi.add(ProgressBar::new_spinner());
    status_bar.enable_steady_tick(Duration::from_millis(200));
    while let Some(event) = stream.message().await.map_err(|s| explain(s, "WatchRun"))? {
        use pb::run_event::Event;
        match event.event {
            Some(Event::Snapshot(run)) => {
                let total = run.hyperparameters.as_ref().and_then(|h| h.iterations).unwrap_or(0);
                iteration_bar.set_length(u64::from(total));
                let done = run
                    .iterations
                    .iter()
                    .filter(|i| i.iteration > 0 && i.status == pb::IterationStatus::Done as i32)
                    .count();
                iteration_bar.set_position(done as u64);
                status_bar.set_message(format!("{} ({})", run.name, status_name(run.status)));
            }
            Some(Event::Iteration(it)) => {
                times.saw(it.iteration, it.status);
                let s = iteration_status_name(it.status);
                status_bar.set_message(format!("iteration {}: {s} {}", it.iteration, it.error));
                if it.status == pb::IterationStatus::Done as i32 && it.iteration > 0 {
                    iteration_bar.inc(1);
                }
            }
            Some(Event::Step(s)) => status_bar.set_message(format!(
                "iteration {}: step {} loss {:.4} (supervised {:.4}, contrastive {:.4}, entropy {:.3}) {:.0} tok/s",
                s.iteration, s.step, s.loss, s.loss_supervised, s.loss_contrastive, s.entropy, s.tokens_per_second
            )),
            Some(Event::Checkpoint(v)) => {
                say(format!("checkpoint {} (iteration {})", v.version, v.iteration));
            }
            Some(Event::Swap(s)) => say(format!(
                "{} now serves {} (swap {:.0} ms)",
                s.generator, s.version, s.total_ms
            )),
            Some(Event::Eval(e)) => {
                if let Some(a) = e.accuracy {
                    say(format!(
                        "iteration {} {}: exact {:.1}%, extracted {:.1}% of {} (answers: {})",
                        e.iteration,
                        a.task,
                        100.0 * a.exact,
                        100.0 * a.extracted,
                        a.examples,
                        crate::report::answers(&e.predicted_counts)
                    ));
                }
            }
            Some(Event::RunStatus(s)) => status_bar.set_message(status_name(s)),
            None => {}
        }
    }
    status_bar.finish_and_clear();
    iteration_bar.finish_and_clear();
    let mut client = client.clone();
    let run = client
        .get_run(pb::GetRunRequest {
            run_id: run_id.to_string(),
        })
        .await
        .map_err(|s| explain(s, "GetRun"))?
        .into_inner();
    Ok((run, times))
}

fn run_json(run: &pb::Run) -> serde_json::Value {
    serde_json::json!({
        "run_id": run.run_id,
        "name": run.name,
        "status": status_name(run.status),
        "tasks": run.tasks,
        "policy": run.policy,
        "error": run.error,
        "iterations": run.iterations.iter().map(|i| serde_json::json!({
            "iteration": i.iteration,
            "status": iteration_status_name(i.status),
            "model_version": i.model_version,
            "samples": i.samples,
            "sample_accuracy": i.sample_accuracy,
            "train_loss": i.train_loss,
            "steps": i.steps,
            "eval": i.eval.iter().map(|e| serde_json::json!({"task": e.task, "examples": e.examples, "exact": e.exact, "extracted": e.extracted})).collect::<Vec<_>>(),
            "error": i.error,
        })).collect::<Vec<_>>(),
    })
}

/// Prints a run as a table (or JSON).
pub fn print_run(run: &pb::Run, json: bool) {
    if json {
        println!("{}", run_json(run));
        return;
    }
    println!(
        "run {}  {}  [{}]  policy {}  tasks {}",
        run.run_id,
        run.name,
        status_name(run.status),
        run.policy,
        run.tasks.join(", ")
    );
    if !run.error.is_empty() {
        println!("error: {}", run.error);
    }
    println!("{}", crate::report::iteration_table(run));
}

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
