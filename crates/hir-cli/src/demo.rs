//! `hir demo`: the whole loop on one machine in about ten minutes.
//!
//! It fetches SmolLM2-135M-Instruct if missing, uses `DATABASE_URL` or starts a private
//! temporary PostgreSQL, starts the generator, relabeler and trainer on free local ports,
//! runs two HIR iterations on a subset of tracking_shuffled_objects_three_objects with
//! progress bars, prints a before/after table, writes a report, and shuts everything down.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use clap::Args;
use hir_proto::pb;
use hir_proto::pb::trainer_service_client::TrainerServiceClient;

use crate::client::{print_run, watch};

/// The model the demo trains.
const MODEL: &str = hir_model::smollm2::GGUF;
/// The task the demo trains on.
const TASK: &str = "tracking_shuffled_objects_three_objects";

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
    #[arg(long, default_value_t = 2)]
    pub iterations: u32,
    /// Training prompts used per iteration (of 600).
    #[arg(long, default_value_t = 24)]
    pub train_prompts: u32,
    /// Test prompts evaluated (of 150).
    #[arg(long, default_value_t = 30)]
    pub test_prompts: u32,
    /// Optimizer steps per iteration.
    #[arg(long, default_value_t = 4)]
    pub steps: u32,
    /// Where the report goes.
    #[arg(long, default_value = "reports")]
    pub out: PathBuf,
    /// Postgres URL; a private temporary server is started when absent.
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: Option<String>,
}

pub async fn run(args: DemoArgs) -> Result<()> {
    hir_runtime::telemetry::init_with_default(
        hir_runtime::telemetry::LogFormat::from_env(),
        "warn",
    );
    if !args.model.exists() {
        if args.model != Path::new(MODEL) {
            bail!("--model {} does not exist", args.model.display());
        }
        println!("fetching SmolLM2-135M-Instruct (98 MB) ...");
        hir_model::smollm2::fetch(Path::new("."))
            .context("fetching the model (run the demo from the repository root)")?;
    }
    let work = tempdir("hir-demo")?;
    let _cleanup = RemoveOnDrop(work.clone());
    let (database_url, _postgres) = match &args.database_url {
        Some(url) => (url.clone(), None),
        None => {
            let pg = TempPostgres::start(&work.join("postgres"))?;
            println!("started a private PostgreSQL at {}", pg.url);
            (pg.url.clone(), Some(pg))
        }
    };
    let token = format!("demo-{}", uuid::Uuid::new_v4());
    let checkpoints = work.join("checkpoints");
    std::fs::create_dir_all(&checkpoints)?;

    let mut generator = hir_generator::config::GeneratorConfig {
        listen: "127.0.0.1:0".parse()?,
        metrics_listen: None,
        model: args.model.clone(),
        ..Default::default()
    };
    generator.auth.token = Some(token.clone());
    generator.swap.checkpoint_root = Some(checkpoints.clone());
    generator.swap.staging_dir = work.join("staging");
    let generator = hir_generator::Application::build(generator).await?;
    let generator_addr = format!("http://{}", generator.local_addr());
    let (stop_g, g) = spawn_app(|stop| generator.run_until(stop));

    let relabeler = hir_relabeler::Application::build(hir_relabeler::config::RelabelerConfig {
        listen: "127.0.0.1:0".parse()?,
        metrics_listen: None,
        database_url: database_url.clone(),
        bigbench: args.bigbench.clone(),
        generators: vec![generator_addr.clone()],
        generator_token: Some(token.clone()),
        auth_token: Some(token.clone()),
        concurrency: 16,
        ..Default::default()
    })
    .await?;
    let relabeler_addr = format!("http://{}", relabeler.local_addr());
    let (stop_r, r) = spawn_app(|stop| relabeler.run_until(stop));

    let trainer = hir_trainer::Application::build(hir_trainer::config::TrainerConfig {
        listen: "127.0.0.1:0".parse()?,
        metrics_listen: None,
        database_url,
        bigbench: args.bigbench.clone(),
        relabeler: relabeler_addr,
        relabeler_token: Some(token.clone()),
        generators: vec![generator_addr],
        generator_token: Some(token.clone()),
        auth_token: Some(token.clone()),
        checkpoint_dir: checkpoints,
        state_dir: work.join("state"),
        commit_every_steps: args.steps.max(1),
        ..Default::default()
    })
    .await?;
    let trainer_addr = format!("http://{}", trainer.local_addr());
    let (stop_t, t) = spawn_app(|stop| trainer.run_until(stop));

    println!(
        "services up; the demo trains on a subset so it fits a laptop CPU: {} iterations, {} of 600 \
         training prompts x 2 samples, {} optimizer steps of 4 examples per iteration, {} of 150 \
         test prompts (the paper's protocol belongs on a GPU: `hir run` with the defaults)",
        args.iterations, args.train_prompts, args.steps, args.test_prompts
    );
    let mut client = TrainerServiceClient::connect(trainer_addr).await?;
    let request = pb::StartRunRequest {
        run_id: String::new(),
        name: "demo".into(),
        tasks: vec![TASK.into()],
        model: args.model.to_string_lossy().into_owned(),
        policy: "hir".into(),
        hyperparameters: Some(pb::Hyperparameters {
            iterations: Some(args.iterations),
            samples_per_prompt: Some(2),
            max_train_prompts: Some(args.train_prompts),
            max_test_prompts: Some(args.test_prompts),
            max_steps_per_iteration: Some(args.steps),
            batch_size: Some(4),
            micro_batch_size: Some(2),
            epochs_per_iteration: Some(1),
            max_new_tokens: Some(16),
            learning_rate: Some(5e-5),
            prompt_style: Some("chat".into()),
            ..Default::default()
        }),
    };
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

    // Shut down in dependency order: the trainer, the relabeler, then the generator.
    for (stop, handle) in [(stop_t, t), (stop_r, r), (stop_g, g)] {
        let _ = stop.send(());
        let _ = handle.await;
    }
    if run.status != pb::RunStatus::Done as i32 {
        bail!("the demo run did not finish: {}", run.error);
    }
    Ok(())
}

type Stop = tokio::sync::oneshot::Sender<()>;

/// Runs a service until its stop sender fires.
fn spawn_app<F, Fut>(f: F) -> (Stop, tokio::task::JoinHandle<()>)
where
    F: FnOnce(std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    let fut = f(Box::pin(async move {
        let _ = rx.await;
    }));
    let handle = tokio::spawn(async move {
        if let Err(e) = fut.await {
            eprintln!("service stopped: {e:#}");
        }
    });
    (tx, handle)
}

fn tempdir(prefix: &str) -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("{prefix}-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A private PostgreSQL server in a temporary folder, stopped when dropped.
struct TempPostgres {
    data: PathBuf,
    url: String,
    as_postgres: bool,
}

/// A PostgreSQL server binary: on the PATH, or in the newest /usr/lib/postgresql/*/bin.
fn pg_bin(name: &str) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(name))
        .find(|p| p.is_file())
    {
        return Some(p);
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .map(|e| e.path().join("bin").join(name))
        .filter(|p| p.is_file())
        .collect();
    versions.sort();
    versions.pop()
}

impl TempPostgres {
    fn start(dir: &Path) -> Result<Self> {
        let (Some(initdb), Some(pg_ctl)) = (pg_bin("initdb"), pg_bin("pg_ctl")) else {
            bail!(
                "PostgreSQL's server programs (initdb, pg_ctl) are not installed; install them \
                 (Debian/Ubuntu: `apt install postgresql`) or set DATABASE_URL to a server you have"
            );
        };
        std::fs::create_dir_all(dir)?;
        // initdb refuses to run as root: run the server as the `postgres` user then.
        let as_postgres = is_root();
        if as_postgres {
            check(
                Command::new("chown")
                    .args(["-R", "postgres:postgres"])
                    .arg(dir),
                "chown",
            )?;
        }
        let data = dir.join("data");
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let cmd = |program: &Path| {
            if as_postgres {
                let mut c = Command::new("runuser");
                c.args(["-u", "postgres", "--"]).arg(program);
                c
            } else {
                Command::new(program)
            }
        };
        check(
            cmd(&initdb)
                .args([
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "-E",
                    "UTF8",
                    "--no-sync",
                    "-D",
                ])
                .arg(&data),
            "initdb",
        )?;
        check(
            cmd(&pg_ctl)
                .arg("-D")
                .arg(&data)
                .arg("-l")
                .arg(dir.join("server.log"))
                .arg("-o")
                .arg(format!(
                    "-p {port} -c listen_addresses=127.0.0.1 -k {}",
                    dir.display()
                ))
                .args(["-w", "start"]),
            "pg_ctl start",
        )?;
        Ok(Self {
            data,
            url: format!("postgres://postgres@127.0.0.1:{port}/postgres"),
            as_postgres,
        })
    }
}

impl Drop for TempPostgres {
    fn drop(&mut self) {
        if let Some(pg_ctl) = pg_bin("pg_ctl") {
            let mut c = if self.as_postgres {
                let mut c = Command::new("runuser");
                c.args(["-u", "postgres", "--"]).arg(pg_ctl);
                c
            } else {
                Command::new(pg_ctl)
            };
            let _ = c
                .arg("-D")
                .arg(&self.data)
                .args(["-m", "fast", "-w", "stop"])
                .output();
        }
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn check(cmd: &mut Command, what: &str) -> Result<()> {
    let out = cmd.output().with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
