//! The fault suite: a seeded run with the three services as separate `hir serve` processes,
//! each killed with SIGKILL again and again at crash points aimed at every phase of the
//! loop (`hir_runtime::fault`: while sampling streams, between a training step and its
//! commit, while a snapshot or checkpoint is written, during a swap, during evaluation,
//! during a relabeler write) and started again on the same port, and Postgres restarted in
//! every iteration. Then the checks: the run completes; its final weights equal those of
//! the same run uninterrupted; every sample comes from its iteration's pinned version; no
//! natural key is doubled or missing; every optimizer step is recorded once; no checkpoint
//! or snapshot folder is half-written or unreferenced; no lease is left held; no temporary
//! file is left in the staging or snapshot folders; the services' metrics agree with the
//! store.
//!
//! The run grows with the kills: each service takes at most [`KILLS_PER_ITERATION`] kills
//! an iteration, so the run has as many iterations as that needs, and [`SLACK`] more. A kill
//! count whose run would exceed [`MAX_ITERATIONS`] is refused before anything starts.
//!
//! It restarts the local Postgres cluster and needs the `fault-injection` build, so it runs
//! alone through `scripts/fault-suite` (`HIR_FAULT_KILLS` kills per service, default 5;
//! `HIR_FAULT_SEED`, default 1).

use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use hir_core::rng::SplitMix64;
use hir_proto::pb;
use hir_proto::pb::trainer_service_client::TrainerServiceClient;
use hir_runtime::fault::{Point, POINTS};
use hir_testkit::{Answers, TestDb};
use uuid::Uuid;

const TOKEN: &str = "fault-token";
const SERVICES: [&str; 3] = ["generator", "relabeler", "trainer"];
/// Examples of the run's task: 80% are training prompts, sampled twice per iteration.
const EXAMPLES: usize = 200;
/// Optimizer steps per iteration.
const STEPS: u32 = 6;
/// The most kills one service takes in one iteration of the plan.
const KILLS_PER_ITERATION: u32 = 10;
/// Iterations beyond those the plan fills: room for a kill that lands an iteration later
/// than planned (its point already passed when its process started).
const SLACK: u32 = 2;
/// The longest run the suite makes.
const MAX_ITERATIONS: u32 = 40;
/// How long the killed run may take.
const DEADLINE: Duration = Duration::from_secs(40 * 60);

/// The suite's settings, from the environment.
#[derive(Debug, Clone, Copy)]
struct Settings {
    kills: u32,
    seed: u64,
}

fn settings() -> Result<Settings, String> {
    fn var<T: std::str::FromStr>(name: &str, default: T) -> Result<T, String> {
        match std::env::var(name) {
            Err(_) => Ok(default),
            Ok(v) => v
                .trim()
                .parse()
                .map_err(|_| format!("{name}={v:?} is not a non-negative integer")),
        }
    }
    Ok(Settings {
        kills: var("HIR_FAULT_KILLS", 5)?,
        seed: var("HIR_FAULT_SEED", 1)?,
    })
}

/// Where each service is killed, in order, and the run's size.
#[derive(Debug)]
struct Plan {
    iterations: u32,
    kills: [VecDeque<&'static Point>; 3],
}

/// A seeded plan: `kills` kills per service, spread evenly over the iterations, each at a
/// point of that service drawn at random; within an iteration the points are in the order
/// the loop reaches them, so each kill's point is still ahead when its process starts.
/// `trainer.swap` is planned at most once an iteration: a trainer started again after it
/// finds the generator on the new version and does not swap a second time.
fn plan(kills: u32, seed: u64) -> Result<Plan, String> {
    let filled = kills.div_ceil(KILLS_PER_ITERATION);
    let iterations = filled.max(1) + SLACK;
    if iterations > MAX_ITERATIONS {
        return Err(format!(
            "{kills} kills per service cannot be placed: at {KILLS_PER_ITERATION} a service \
             an iteration they need a run of {iterations} iterations, and the suite makes \
             at most {MAX_ITERATIONS} (at most {} kills)",
            (MAX_ITERATIONS - SLACK) * KILLS_PER_ITERATION
        ));
    }
    let mut rng = SplitMix64::new(seed);
    let plan = SERVICES.map(|service| {
        let points: Vec<(usize, &'static Point)> = POINTS
            .iter()
            .enumerate()
            .filter(|(_, p)| p.service == service)
            .collect();
        let mut out = VecDeque::new();
        for i in 0..filled {
            // Kills of this iteration: an even share of the whole.
            let n = (kills * (i + 1)) / filled - (kills * i) / filled;
            let mut chosen: Vec<(usize, &'static Point)> = Vec::new();
            while chosen.len() < n as usize {
                let c = points[(rng.next_u64() % points.len() as u64) as usize];
                let once = c.1.name == hir_runtime::fault::TRAINER_SWAP;
                if !(once && chosen.iter().any(|x| x.1.name == c.1.name)) {
                    chosen.push(c);
                }
            }
            chosen.sort_by_key(|c| c.0);
            out.extend(chosen.into_iter().map(|c| c.1));
        }
        out
    });
    Ok(Plan {
        iterations,
        kills: plan,
    })
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The folders of one run's services.
struct Root(PathBuf);

impl Root {
    fn new(tag: &str) -> Self {
        let root = std::env::temp_dir().join(format!("hir-faults-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        hir_testkit::tiny_task(&root.join("bigbench"), EXAMPLES, Answers::Alternating);
        std::fs::create_dir_all(root.join("logs")).unwrap();
        Self(root)
    }
    fn join(&self, p: &str) -> PathBuf {
        self.0.join(p)
    }
}

/// A service process and what is planned for it.
struct Service {
    port: u16,
    metrics: u16,
    child: Option<Child>,
    /// The point the running process is armed with.
    armed: Option<&'static Point>,
    plan: VecDeque<&'static Point>,
    started: SystemTime,
}

/// The three services of one run, as processes on fixed ports.
struct Cluster {
    db: String,
    root: PathBuf,
    services: [Service; 3],
}

impl Cluster {
    fn new(db: &str, root: &Root, plan: [VecDeque<&'static Point>; 3]) -> Self {
        let services = plan.map(|plan| Service {
            port: free_port(),
            metrics: free_port(),
            child: None,
            armed: None,
            plan,
            started: SystemTime::now(),
        });
        Self {
            db: db.to_string(),
            root: root.0.clone(),
            services,
        }
    }

    fn url(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.services[i].port)
    }

    fn command(&self, i: usize) -> Command {
        let s = &self.services[i];
        let mut c = Command::new(env!("CARGO_BIN_EXE_hir"));
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.root.join(format!("logs/{}.log", SERVICES[i])))
            .unwrap();
        c.args(["serve", SERVICES[i]])
            .env("RUST_LOG", "warn")
            .env("DATABASE_URL", &self.db)
            .env_remove("FAILPOINTS")
            .stdout(Stdio::null())
            .stderr(log);
        let listen = format!("127.0.0.1:{}", s.port);
        let metrics = format!("127.0.0.1:{}", s.metrics);
        let checkpoints = self.root.join("checkpoints");
        let bigbench = self.root.join("bigbench");
        let generator = format!("[\"{}\"]", self.url(0));
        match SERVICES[i] {
            "generator" => c
                .env("HIR_GENERATOR__LISTEN", listen)
                .env("HIR_GENERATOR__METRICS_LISTEN", metrics)
                .env("HIR_GENERATOR__MODEL", hir_testkit::llama_fixture())
                .env("HIR_GENERATOR__AUTH__TOKEN", TOKEN)
                .env(
                    "HIR_GENERATOR__SWAP__STAGING_DIR",
                    self.root.join("staging"),
                )
                .env("HIR_GENERATOR__SHUTDOWN_GRACE_SECS", "0"),
            "relabeler" => c
                .env("HIR_RELABELER__LISTEN", listen)
                .env("HIR_RELABELER__METRICS_LISTEN", metrics)
                .env("HIR_RELABELER__DATABASE_URL", &self.db)
                .env("HIR_RELABELER__BIGBENCH", &bigbench)
                .env("HIR_RELABELER__GENERATORS", &generator)
                .env("HIR_RELABELER__GENERATOR_TOKEN", TOKEN)
                .env("HIR_RELABELER__AUTH_TOKEN", TOKEN)
                .env("HIR_RELABELER__RETRY_INITIAL_MS", "50")
                // Several write batches an iteration, so kills land between them.
                .env("HIR_RELABELER__WRITE_BATCH", "32"),
            _ => c
                .env("HIR_TRAINER__LISTEN", listen)
                .env("HIR_TRAINER__METRICS_LISTEN", metrics)
                .env("HIR_TRAINER__DATABASE_URL", &self.db)
                .env("HIR_TRAINER__BIGBENCH", &bigbench)
                .env("HIR_TRAINER__RELABELER", self.url(1))
                .env("HIR_TRAINER__RELABELER_TOKEN", TOKEN)
                .env("HIR_TRAINER__GENERATORS", &generator)
                .env("HIR_TRAINER__GENERATOR_TOKEN", TOKEN)
                .env("HIR_TRAINER__AUTH_TOKEN", TOKEN)
                // Weights go to the generator as an upload, through its staging folder.
                .env("HIR_TRAINER__UPLOAD", "true")
                .env("HIR_TRAINER__CHECKPOINT_DIR", &checkpoints)
                .env("HIR_TRAINER__STATE_DIR", self.root.join("state"))
                .env("HIR_TRAINER__COMMIT_EVERY_STEPS", "1")
                .env("HIR_TRAINER__OWNER", "fault-trainer"),
        };
        c
    }

    /// Starts service `i`, armed with its next planned kill if any.
    fn start(&mut self, i: usize) {
        let mut command = self.command(i);
        let s = &mut self.services[i];
        s.armed = s.plan.pop_front();
        if let Some(p) = s.armed {
            command.env("FAILPOINTS", format!("{}=return", p.name));
        }
        s.started = SystemTime::now();
        s.child = Some(command.spawn().expect("hir serve starts"));
    }

    /// Service `i`'s exit, if its process has ended.
    fn exited(&mut self, i: usize) -> Option<std::process::ExitStatus> {
        let child = self.services[i].child.as_mut()?;
        let status = child.try_wait().unwrap()?;
        self.services[i].child = None;
        Some(status)
    }

    fn stop(&mut self) {
        for s in &mut self.services {
            if let Some(mut c) = s.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
    }
}

fn request(run_id: Uuid, iterations: u32) -> pb::StartRunRequest {
    pb::StartRunRequest {
        run_id: run_id.to_string(),
        name: "faults".into(),
        tasks: vec!["tiny_mc".into()],
        model: hir_testkit::llama_fixture().to_string_lossy().into_owned(),
        policy: "hir".into(),
        hyperparameters: Some(pb::Hyperparameters {
            iterations: Some(iterations),
            samples_per_prompt: Some(2),
            batch_size: Some(8),
            micro_batch_size: Some(4),
            epochs_per_iteration: Some(1),
            max_new_tokens: Some(6),
            learning_rate: Some(1e-3),
            max_steps_per_iteration: Some(STEPS),
            max_test_prompts: Some(8),
            replay_holdout: Some(0.0),
            dedup_outputs: Some(false),
            seed: Some(3),
            ..Default::default()
        }),
    }
}

/// A client of the trainer once its process listens (it binds before it is ready).
async fn trainer_client(url: &str) -> TrainerServiceClient<tonic::transport::Channel> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match TrainerServiceClient::connect(url.to_string()).await {
            Ok(c) => return c,
            Err(e) if Instant::now() > deadline => panic!("the trainer at {url}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Restarts the private test cluster (`scripts/ensure-postgres --restart`, which refuses
/// any other server).
fn restart_postgres() {
    let out = Command::new(hir_testkit::repo_root().join("scripts/ensure-postgres"))
        .arg("--restart")
        .output()
        .expect("scripts/ensure-postgres runs");
    assert!(
        out.status.success(),
        "Postgres restarted: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Where the run stands, read from the store: its status and error, and its latest
/// iteration with that iteration's status. `None` while the store cannot be read.
async fn progress(db: &TestDb, run_id: Uuid) -> Option<(String, String, i32, String)> {
    sqlx::query_as(
        "SELECT r.status::text, coalesce(r.error, ''), coalesce(i.iteration, -1),
                coalesce(i.status::text, '')
         FROM runs r LEFT JOIN LATERAL (
             SELECT iteration, status FROM iterations WHERE run_id = r.id
             ORDER BY iteration DESC LIMIT 1) i ON true
         WHERE r.id = $1",
    )
    .bind(run_id)
    .fetch_one(db.store.pool())
    .await
    .ok()
}

/// One kill as it landed.
struct Landed {
    point: &'static Point,
    /// The run's latest iteration and its status when the kill landed.
    at: String,
}

/// What a run went through.
#[derive(Default)]
struct Outcome {
    landed: Vec<Landed>,
    /// Postgres restarts, by the iteration that was the latest at the time.
    restarts: BTreeMap<i32, u32>,
    resumes: u32,
    elapsed: Duration,
    /// When each service's last process started.
    started: [Option<SystemTime>; 3],
    /// Each service's metrics port.
    metrics: [u16; 3],
}

/// Runs the seeded run to its end: killed as `plan` says, with Postgres restarted once in
/// every iteration (at a seeded delay after the iteration appears) when `postgres`.
async fn run(
    db: &TestDb,
    root: &Root,
    plan: Plan,
    seed: u64,
    postgres: bool,
) -> (Uuid, Outcome, Cluster) {
    let started = Instant::now();
    let mut cluster = Cluster::new(&db.url, root, plan.kills);
    for i in 0..3 {
        cluster.start(i);
    }
    let trainer = cluster.url(2);
    let run_id = Uuid::new_v4();
    trainer_client(&trainer)
        .await
        .start_run(hir_runtime::auth::with_bearer(
            request(run_id, plan.iterations),
            Some(TOKEN),
        ))
        .await
        .unwrap();
    let mut rng = SplitMix64::new(seed ^ 0x5EED);
    let mut out = Outcome::default();
    // The iteration whose Postgres restart is due, and when.
    let mut restart_due: Option<(i32, Instant)> = None;
    let mut restarted_for = -1;
    let mut latest = (String::new(), -1, String::new());
    let mut last_poll = Instant::now() - Duration::from_secs(1);
    loop {
        assert!(
            started.elapsed() < DEADLINE,
            "the run did not end within {DEADLINE:?}; {} kills landed; logs in {}",
            out.landed.len(),
            root.0.display()
        );
        for (i, service) in SERVICES.iter().enumerate() {
            let Some(status) = cluster.exited(i) else {
                continue;
            };
            let Some(point) = cluster.services[i]
                .armed
                .filter(|_| status.signal() == Some(9))
            else {
                panic!(
                    "the {service} exited with {status}, not at a planned kill; its log: {}",
                    root.join(&format!("logs/{service}.log")).display()
                );
            };
            let at = format!("iteration {} {}", latest.1, latest.2);
            eprintln!(
                "kill {:>3}: {:<9} at {:<18} ({at}, {:.1} s)",
                out.landed.len() + 1,
                service,
                point.name,
                started.elapsed().as_secs_f64()
            );
            out.landed.push(Landed { point, at });
            cluster.start(i);
        }
        if last_poll.elapsed() >= Duration::from_millis(100) {
            last_poll = Instant::now();
            if let Some((status, error, iteration, it_status)) = progress(db, run_id).await {
                latest = (status.clone(), iteration, it_status);
                match status.as_str() {
                    "done" => break,
                    "failed" => {
                        // Reported, not hidden: a run that failed (a service gone for
                        // longer than its peers retry) is resumed and counted.
                        eprintln!("the run failed: {error}; resuming");
                        let resumed = TrainerServiceClient::connect(trainer.clone())
                            .await
                            .ok()
                            .map(|mut c| async move {
                                c.resume_run(hir_runtime::auth::with_bearer(
                                    pb::ResumeRunRequest {
                                        run_id: run_id.to_string(),
                                    },
                                    Some(TOKEN),
                                ))
                                .await
                            });
                        if let Some(r) = resumed {
                            if r.await.is_ok() {
                                out.resumes += 1;
                            }
                        }
                    }
                    _ => {}
                }
                if postgres && iteration > restarted_for && restart_due.is_none() {
                    let delay = Duration::from_millis(rng.next_u64() % 500);
                    restart_due = Some((iteration, Instant::now() + delay));
                }
            }
        }
        if let Some((iteration, due)) = restart_due {
            if Instant::now() >= due {
                eprintln!(
                    "restarting Postgres (iteration {} {}, {:.1} s)",
                    latest.1,
                    latest.2,
                    started.elapsed().as_secs_f64()
                );
                restart_postgres();
                *out.restarts.entry(latest.1).or_default() += 1;
                restarted_for = iteration;
                restart_due = None;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    out.elapsed = started.elapsed();
    for (i, s) in cluster.services.iter().enumerate() {
        out.started[i] = Some(s.started);
        out.metrics[i] = s.metrics;
        assert!(
            s.plan.is_empty() && s.armed.is_none(),
            "the run ended with kills of the {} not placed: {} planned, {} armed; the plan \
             needs more slack",
            SERVICES[i],
            s.plan.len(),
            u32::from(s.armed.is_some())
        );
    }
    (run_id, out, cluster)
}

async fn final_weights(db: &TestDb, run_id: Uuid, iterations: u32) -> String {
    let v = db
        .store
        .get_model_version_by_name(&format!("{run_id}-it{iterations:03}"))
        .await
        .unwrap();
    hir_model::formats::checkpoint::sha256_file(
        &Path::new(&v.checkpoint_uri).join("model.safetensors"),
    )
    .unwrap()
}

async fn scalar(db: &TestDb, sql: &str, run_id: Uuid) -> i64 {
    sqlx::query_scalar(sql)
        .bind(run_id)
        .fetch_one(db.store.pool())
        .await
        .unwrap()
}

/// The names in a folder, sorted (none if it does not exist).
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// One sample of a Prometheus text exposition: the value of the first line that starts
/// with `series`.
async fn metric(port: u16, series: &str) -> Option<f64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).await.ok()?;
    body.lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// Every check of the killed run that does not need the reference run.
async fn check(db: &TestDb, root: &Root, run_id: Uuid, iterations: u32, out: &Outcome) {
    let i = i64::from(iterations);
    let mixed = scalar(
        db,
        "SELECT count(*) FROM samples s JOIN iterations i USING (run_id, iteration)
         WHERE s.run_id = $1 AND s.model_version_id IS DISTINCT FROM i.model_version_id",
        run_id,
    )
    .await;
    assert_eq!(
        mixed, 0,
        "every sample comes from its iteration's pinned version"
    );
    let doubled = scalar(
        db,
        "SELECT count(*) - count(DISTINCT (iteration, task_id, example_idx, sample_idx))
         FROM samples WHERE run_id = $1",
        run_id,
    )
    .await;
    assert_eq!(doubled, 0, "no natural key twice");
    let samples = scalar(db, "SELECT count(*) FROM samples WHERE run_id = $1", run_id).await;
    let prompts = (EXAMPLES * 4 / 5) as i64;
    assert_eq!(
        samples,
        i * prompts * 2,
        "every prompt of every iteration has its samples"
    );
    let (steps, distinct, last): (i64, i64, Option<i64>) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT step), max(step) FROM training_steps WHERE run_id = $1",
    )
    .bind(run_id)
    .fetch_one(db.store.pool())
    .await
    .unwrap();
    let all = i * i64::from(STEPS);
    assert_eq!(
        (steps, distinct, last),
        (all, all, Some(all)),
        "each step recorded once"
    );
    let versions = scalar(
        db,
        "SELECT count(*) FROM model_versions WHERE run_id = $1",
        run_id,
    )
    .await;
    assert_eq!(versions, i, "one version per iteration");
    let held = scalar(
        db,
        "SELECT count(*) FROM training_batches WHERE run_id = $1 AND status = 'leased'",
        run_id,
    )
    .await;
    assert_eq!(held, 0, "no lease left held");

    // Checkpoints: exactly one folder per version, each the registered one with its digest.
    let dir = root.join(&format!("checkpoints/{run_id}"));
    let expected: Vec<String> = (1..=iterations).map(|k| format!("it{k:03}")).collect();
    assert_eq!(
        names(&dir),
        expected,
        "no checkpoint folder half-written or unreferenced"
    );
    for k in 1..=iterations {
        let v = db
            .store
            .get_model_version_by_name(&format!("{run_id}-it{k:03}"))
            .await
            .unwrap();
        assert_eq!(Path::new(&v.checkpoint_uri), dir.join(format!("it{k:03}")));
        let sha = hir_model::formats::checkpoint::sha256_file(
            &dir.join(format!("it{k:03}/manifest.json")),
        )
        .unwrap();
        assert_eq!(sha, v.sha256, "checkpoint {k} is the one registered");
    }
    // Snapshots: the committed one only.
    let state = db.store.trainer_state(run_id).await.unwrap().unwrap();
    assert_eq!(state.step, all);
    let snapshots = root.join(&format!("state/{run_id}"));
    assert_eq!(
        names(&snapshots),
        vec![format!("step-{all}")],
        "no snapshot but the committed one, and no temporary folder"
    );
    assert_eq!(
        Path::new(&state.state_uri),
        snapshots.join(format!("step-{all}"))
    );
    assert_eq!(
        names(&root.join("staging")),
        Vec::<String>::new(),
        "no upload left in the generator's staging folder"
    );

    // The services' metrics, read from their last processes, against the store.
    let [generator, relabeler, trainer] = out.metrics;
    let last = format!("hir_generator_model_version{{version=\"{run_id}-it{iterations:03}\"}}");
    assert_eq!(
        metric(generator, &last).await,
        Some(1.0),
        "the generator reports the run's last version"
    );
    assert_eq!(metric(trainer, "hir_trainer_active_runs").await, Some(0.0));
    assert_eq!(metric(trainer, "hir_trainer_version_lag").await, Some(0.0));
    let since: chrono::DateTime<chrono::Utc> = out.started[1].unwrap().into();
    let written: i64 =
        sqlx::query_scalar("SELECT count(*) FROM samples WHERE run_id = $1 AND created_at >= $2")
            .bind(run_id)
            .bind(since)
            .fetch_one(db.store.pool())
            .await
            .unwrap();
    assert_eq!(
        metric(relabeler, "hir_relabeler_samples_total").await,
        Some(written as f64),
        "the relabeler's last process counts the samples it stored"
    );
}

fn summary(out: &Outcome, kills: u32) -> String {
    let mut by_point: BTreeMap<(usize, &str), u32> = BTreeMap::new();
    for l in &out.landed {
        let order = POINTS.iter().position(|p| p == l.point).unwrap();
        *by_point.entry((order, l.point.name)).or_default() += 1;
    }
    let mut by_stage: BTreeMap<&str, u32> = BTreeMap::new();
    for l in &out.landed {
        let stage = l.at.rsplit(' ').next().unwrap_or("");
        *by_stage.entry(stage).or_default() += 1;
    }
    let mut s = format!(
        "{} kills ({kills} per service asked), {} Postgres restarts, {} resumes, {:.1} s\n\
         kills by point:\n",
        out.landed.len(),
        out.restarts.values().sum::<u32>(),
        out.resumes,
        out.elapsed.as_secs_f64()
    );
    for ((order, name), n) in &by_point {
        s += &format!("  {name:<20} {n:>4}  ({})\n", POINTS[*order].phase);
    }
    s += "kills by the iteration's stage when they landed:\n";
    for (stage, n) in &by_stage {
        s += &format!("  {stage:<20} {n:>4}\n");
    }
    s += &format!("Postgres restarts by iteration: {:?}", out.restarts);
    s
}

#[test]
fn plans_spread_kills_over_points_in_loop_order() {
    let p = plan(100, 7).unwrap();
    assert_eq!(p.iterations, 10 + SLACK);
    for (i, kills) in p.kills.iter().enumerate() {
        assert_eq!(kills.len(), 100);
        assert!(kills.iter().all(|k| k.service == SERVICES[i]));
        // Every point of the service is used.
        for point in POINTS.iter().filter(|x| x.service == SERVICES[i]) {
            assert!(kills.contains(&point), "{} is never planned", point.name);
        }
    }
    // The same seed, the same plan; another seed, another.
    let again = plan(100, 7).unwrap();
    assert!(p.kills.iter().zip(&again.kills).all(|(a, b)| a == b));
    assert!(p
        .kills
        .iter()
        .zip(&plan(100, 8).unwrap().kills)
        .any(|(a, b)| a != b));
    assert!(plan(0, 1).unwrap().kills.iter().all(VecDeque::is_empty));
    let too_many = plan(1_000, 1).unwrap_err();
    assert!(too_many.contains("cannot be placed"), "{too_many}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "kills services and restarts the local Postgres: run alone with scripts/fault-suite"]
async fn killed_services_and_a_restarted_database_leave_the_run_as_if_uninterrupted() {
    let Settings { kills, seed } = settings().unwrap_or_else(|e| panic!("{e}"));
    // Refused before anything starts.
    let planned = plan(kills, seed).unwrap_or_else(|e| panic!("{e}"));
    let iterations = planned.iterations;
    eprintln!(
        "fault suite: {kills} kills per service over a run of {iterations} iterations, seed {seed}"
    );

    let reference = {
        let db = TestDb::create("faults_reference").await;
        let root = Root::new("reference");
        let none = plan(0, seed).unwrap();
        let plan = Plan {
            iterations,
            kills: none.kills,
        };
        let (run_id, out, mut cluster) = run(&db, &root, plan, seed, false).await;
        cluster.stop();
        eprintln!(
            "the uninterrupted run took {:.1} s",
            out.elapsed.as_secs_f64()
        );
        let weights = final_weights(&db, run_id, iterations).await;
        db.drop_db().await;
        let _ = std::fs::remove_dir_all(&root.0);
        weights
    };

    let db = TestDb::create("faults").await;
    let root = Root::new("killed");
    let (run_id, out, mut cluster) = run(&db, &root, planned, seed, true).await;
    eprintln!("{}", summary(&out, kills));
    assert_eq!(out.landed.len() as u32, 3 * kills, "every kill landed");
    // The pool may hold connections from before the last restart.
    let db = TestDb {
        store: hir_store::Store::connect(&db.url).await.unwrap(),
        ..db
    };
    check(&db, &root, run_id, iterations, &out).await;
    cluster.stop();
    for k in 1..=iterations as i32 {
        assert!(
            out.restarts.get(&k).is_some_and(|n| *n > 0),
            "Postgres was restarted during iteration {k}: {:?}",
            out.restarts
        );
    }
    assert_eq!(
        final_weights(&db, run_id, iterations).await,
        reference,
        "the final weights equal the uninterrupted run's"
    );
    let _ = std::fs::remove_dir_all(&root.0);
    db.drop_db().await;
}
