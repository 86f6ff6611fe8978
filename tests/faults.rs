//! The fault suite: a small seeded run with the three services as separate `hir serve`
//! processes, each killed with SIGKILL at seeded random points and started again on the same
//! port, and Postgres restarted once mid-run. Then the invariants: the run completes; every
//! sample's version is the one its iteration pinned; no natural key is doubled or missing;
//! every committed optimizer step is recorded once; the final weights equal those of the
//! same run uninterrupted.
//!
//! It restarts the local Postgres cluster, so it is ignored by default and runs alone:
//! `scripts/fault-suite` (`HIR_FAULT_KILLS` kills per service, default 2; `HIR_FAULT_SEED`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use hir_core::rng::SplitMix64;
use hir_proto::pb;
use hir_proto::pb::trainer_service_client::TrainerServiceClient;
use hir_testkit::{Answers, KillOnDrop, TestDb};
use tonic::transport::Channel;
use uuid::Uuid;

const TOKEN: &str = "fault-token";
const SERVICES: [&str; 3] = ["generator", "relabeler", "trainer"];
/// Examples of the run's task: 80% are training prompts, sampled twice per iteration.
const EXAMPLES: usize = 1_000;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The three services of one run, as processes on fixed ports.
struct Cluster {
    db: String,
    root: PathBuf,
    ports: [u16; 3],
    children: [Option<KillOnDrop>; 3],
}

impl Cluster {
    fn new(db: &str, root: &Path) -> Self {
        Self {
            db: db.to_string(),
            root: root.to_path_buf(),
            ports: [free_port(), free_port(), free_port()],
            children: [None, None, None],
        }
    }

    fn url(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.ports[i])
    }

    fn command(&self, i: usize) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_hir"));
        c.args(["serve", SERVICES[i]])
            .env("RUST_LOG", "error")
            .env("DATABASE_URL", &self.db);
        let listen = format!("127.0.0.1:{}", self.ports[i]);
        let checkpoints = self.root.join("checkpoints");
        let bigbench = self.root.join("bigbench");
        let generator = format!("[\"{}\"]", self.url(0));
        match SERVICES[i] {
            "generator" => c
                .env("HIR_GENERATOR__LISTEN", listen)
                .env("HIR_GENERATOR__MODEL", hir_testkit::llama_fixture())
                .env("HIR_GENERATOR__AUTH__TOKEN", TOKEN)
                .env("HIR_GENERATOR__SWAP__CHECKPOINT_ROOT", &checkpoints)
                .env("HIR_GENERATOR__SHUTDOWN_GRACE_SECS", "0"),
            "relabeler" => c
                .env("HIR_RELABELER__LISTEN", listen)
                .env("HIR_RELABELER__DATABASE_URL", &self.db)
                .env("HIR_RELABELER__BIGBENCH", &bigbench)
                .env("HIR_RELABELER__GENERATORS", generator)
                .env("HIR_RELABELER__GENERATOR_TOKEN", TOKEN)
                .env("HIR_RELABELER__AUTH_TOKEN", TOKEN)
                .env("HIR_RELABELER__RETRY_INITIAL_MS", "50"),
            _ => c
                .env("HIR_TRAINER__LISTEN", listen)
                .env("HIR_TRAINER__DATABASE_URL", &self.db)
                .env("HIR_TRAINER__BIGBENCH", &bigbench)
                .env("HIR_TRAINER__RELABELER", self.url(1))
                .env("HIR_TRAINER__RELABELER_TOKEN", TOKEN)
                .env("HIR_TRAINER__GENERATORS", generator)
                .env("HIR_TRAINER__GENERATOR_TOKEN", TOKEN)
                .env("HIR_TRAINER__AUTH_TOKEN", TOKEN)
                .env("HIR_TRAINER__CHECKPOINT_DIR", &checkpoints)
                .env("HIR_TRAINER__STATE_DIR", self.root.join("state"))
                .env("HIR_TRAINER__COMMIT_EVERY_STEPS", "1")
                .env("HIR_TRAINER__OWNER", "fault-trainer"),
        };
        c
    }

    fn start(&mut self, i: usize) {
        let child: Child = self.command(i).spawn().expect("hir serve starts");
        self.children[i] = Some(KillOnDrop(child));
    }

    /// SIGKILL, then the same service again on the same port.
    fn kill_and_restart(&mut self, i: usize) {
        if let Some(mut c) = self.children[i].take() {
            c.0.kill().unwrap();
            c.0.wait().unwrap();
        }
        self.start(i);
    }
}

/// A client of the trainer once its process listens (it binds before it is ready).
async fn trainer_client(url: &str) -> TrainerServiceClient<Channel> {
    for _ in 0..300 {
        if let Ok(c) = TrainerServiceClient::connect(url.to_string()).await {
            return c;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the trainer at {url} does not listen");
}

fn request(run_id: Uuid) -> pb::StartRunRequest {
    pb::StartRunRequest {
        run_id: run_id.to_string(),
        name: "faults".into(),
        tasks: vec!["tiny_mc".into()],
        model: hir_testkit::llama_fixture().to_string_lossy().into_owned(),
        policy: "hir".into(),
        hyperparameters: Some(pb::Hyperparameters {
            iterations: Some(3),
            samples_per_prompt: Some(2),
            batch_size: Some(8),
            micro_batch_size: Some(4),
            epochs_per_iteration: Some(1),
            max_new_tokens: Some(6),
            learning_rate: Some(1e-3),
            max_steps_per_iteration: Some(6),
            max_test_prompts: Some(8),
            replay_holdout: Some(0.0),
            dedup_outputs: Some(false),
            seed: Some(3),
            ..Default::default()
        }),
    }
}

/// The run's status, asked of whatever trainer process is up.
async fn status(url: &str, run_id: Uuid) -> Option<pb::Run> {
    let mut client = TrainerServiceClient::connect(url.to_string()).await.ok()?;
    client
        .get_run(pb::GetRunRequest {
            run_id: run_id.to_string(),
        })
        .await
        .ok()
        .map(|r| r.into_inner())
}

fn restart_postgres() {
    let version = std::fs::read_dir("/etc/postgresql")
        .expect("a local PostgreSQL cluster")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .max_by_key(|v| v.parse::<u32>().unwrap_or(0))
        .unwrap();
    let ok = Command::new("pg_ctlcluster")
        .args(["--skip-systemctl-redirect", &version, "main", "restart"])
        .status()
        .expect("pg_ctlcluster runs")
        .success();
    assert!(ok, "Postgres restarted");
}

/// Runs the seeded run to its end; with `kills`, kills each service that many times and
/// restarts Postgres once on the way. Returns the run's id, the kills made, and the
/// resumes the run needed and whether Postgres was restarted.
async fn run(db: &TestDb, root: &Path, kills: u32, seed: u64) -> (Uuid, u32, u32, bool) {
    let mut cluster = Cluster::new(&db.url, root);
    for i in 0..3 {
        cluster.start(i);
    }
    let trainer = cluster.url(2);
    let run_id = Uuid::new_v4();
    trainer_client(&trainer)
        .await
        .start_run(hir_runtime::auth::with_bearer(request(run_id), Some(TOKEN)))
        .await
        .unwrap();
    let mut rng = SplitMix64::new(seed);
    let (mut made, mut resumes, mut postgres) = (0, 0, false);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(900);
    loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the run ends within 15 minutes"
        );
        let pause = 300 + rng.next_u64() % 2_000;
        tokio::time::sleep(Duration::from_millis(pause)).await;
        match status(&trainer, run_id).await {
            Some(r) if r.status == pb::RunStatus::Done as i32 => break,
            Some(r) if r.status == pb::RunStatus::Failed as i32 => {
                // Reported, not hidden: a failed run is resumed and counted.
                eprintln!("run failed: {}; resuming", r.error);
                resumes += 1;
                assert!(resumes <= 3 * kills + 1, "too many resumes: {}", r.error);
                let mut client = trainer_client(&trainer).await;
                client
                    .resume_run(hir_runtime::auth::with_bearer(
                        pb::ResumeRunRequest {
                            run_id: run_id.to_string(),
                        },
                        Some(TOKEN),
                    ))
                    .await
                    .unwrap();
            }
            _ => {}
        }
        if kills > 0 && !postgres && made == 3 * kills / 2 {
            eprintln!("restarting Postgres after {pause} ms");
            restart_postgres();
            postgres = true;
        } else if made < 3 * kills {
            let service = (made % 3) as usize;
            eprintln!("kill {}: {} after {pause} ms", made + 1, SERVICES[service]);
            cluster.kill_and_restart(service);
            made += 1;
        }
    }
    (run_id, made, resumes, postgres)
}

async fn final_weights(db: &TestDb, run_id: Uuid) -> String {
    let v = db
        .store
        .get_model_version_by_name(&format!("{run_id}-it003"))
        .await
        .unwrap();
    hir_model::checkpoint::sha256_file(&Path::new(&v.checkpoint_uri).join("model.safetensors"))
        .unwrap()
}

async fn scalar(db: &TestDb, sql: &str, run_id: Uuid) -> i64 {
    sqlx::query_scalar(sql)
        .bind(run_id)
        .fetch_one(db.store.pool())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "kills services and restarts the local Postgres: run alone with scripts/fault-suite"]
async fn killed_services_and_a_restarted_database_leave_the_run_as_if_uninterrupted() {
    let kills: u32 = std::env::var("HIR_FAULT_KILLS")
        .ok()
        .and_then(|k| k.parse().ok())
        .unwrap_or(2);
    let seed: u64 = std::env::var("HIR_FAULT_SEED")
        .ok()
        .and_then(|k| k.parse().ok())
        .unwrap_or(1);
    let scratch = |tag: &str| {
        let root = std::env::temp_dir().join(format!("hir-faults-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        hir_testkit::tiny_task(&root.join("bigbench"), EXAMPLES, Answers::Alternating);
        root
    };

    let reference = {
        let db = TestDb::create("faults_reference").await;
        let root = scratch("reference");
        let (run_id, ..) = run(&db, &root, 0, seed).await;
        let weights = final_weights(&db, run_id).await;
        db.drop_db().await;
        let _ = std::fs::remove_dir_all(&root);
        weights
    };

    let db = TestDb::create("faults").await;
    let root = scratch("killed");
    let (run_id, made, resumes, postgres) = run(&db, &root, kills, seed).await;
    eprintln!(
        "the run survived {made} kills ({kills} per service asked), {} Postgres restart, \
         and needed {resumes} resumes",
        u32::from(postgres)
    );
    assert_eq!(made, 3 * kills, "the run outlasted every kill");
    assert!(
        postgres || kills == 0,
        "the run outlasted the Postgres restart"
    );
    // The pool may hold connections from before the restart.
    let db = TestDb {
        store: hir_store::Store::connect(&db.url).await.unwrap(),
        ..db
    };

    let mixed = scalar(
        &db,
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
        &db,
        "SELECT count(*) - count(DISTINCT (iteration, task_id, example_idx, sample_idx))
         FROM samples WHERE run_id = $1",
        run_id,
    )
    .await;
    assert_eq!(doubled, 0, "no natural key twice");
    let samples = scalar(
        &db,
        "SELECT count(*) FROM samples WHERE run_id = $1",
        run_id,
    )
    .await;
    let prompts = (EXAMPLES * 4 / 5) as i64;
    assert_eq!(
        samples,
        3 * prompts * 2,
        "every prompt of every iteration has its samples"
    );
    let (steps, distinct, last): (i64, i64, Option<i64>) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT step), max(step) FROM training_steps WHERE run_id = $1",
    )
    .bind(run_id)
    .fetch_one(db.store.pool())
    .await
    .unwrap();
    assert_eq!(
        (steps, distinct, last),
        (18, 18, Some(18)),
        "each step recorded once"
    );
    assert_eq!(
        final_weights(&db, run_id).await,
        reference,
        "the final weights equal the uninterrupted run's"
    );
    let _ = std::fs::remove_dir_all(&root);
    db.drop_db().await;
}
