//! The trainer against the real generator and relabeler (in process, the tiny Llama
//! fixture), a real Postgres (a fresh database per test) and, for the crash test, the
//! `hir-trainer` binary killed and restarted.

mod recovery;
mod requests;
mod runs;

use std::path::{Path, PathBuf};
use std::time::Duration;

use hir_core::run::RunConfig;
use hir_proto::pb;
use hir_proto::pb::generator_service_client::GeneratorServiceClient;
use hir_proto::pb::trainer_service_client::TrainerServiceClient;
use hir_store::{IterationStatus, NewRun, RunStatus, Store};
use hir_testkit::{Answers, KillOnDrop, Running, TestDb};
use hir_trainer::config::TrainerConfig;
use tonic::transport::Channel;
use tonic::{Code, Request};
use uuid::Uuid;

const TOKEN: &str = "trainer-token";
const TEST_EXAMPLES: usize = 5;

fn fixture_model() -> PathBuf {
    hir_testkit::llama_fixture()
}

fn t5_fixture_model() -> PathBuf {
    hir_testkit::t5_fixture()
}

/// A fresh, migrated database, dropped when the test passes.
struct Db {
    url: String,
    store: Store,
    db: TestDb,
}

impl Db {
    async fn fresh(name: &str) -> Self {
        let db = TestDb::create(&format!("trainer_{name}")).await;
        Self {
            url: db.url.clone(),
            store: db.store.clone(),
            db,
        }
    }

    async fn drop_db(self) {
        self.db.drop_db().await;
    }
}

/// A scratch folder with a BIG-bench task in the fixture's vocabulary (25 examples: 20
/// train, 5 test), a checkpoint folder and a state folder.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        let root = std::env::temp_dir().join(format!("hir-trainer-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        hir_testkit::tiny_task(
            &root.join("bigbench"),
            20 + TEST_EXAMPLES,
            Answers::Alternating,
        );
        Self(root)
    }
    fn bigbench(&self) -> PathBuf {
        self.0.join("bigbench")
    }
    fn checkpoints(&self) -> PathBuf {
        self.0.join("checkpoints")
    }
    fn state(&self) -> PathBuf {
        self.0.join("state")
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A generator of the tiny Llama on port 0; `checkpoint_root` enables swaps by reference.
async fn start_generator(checkpoint_root: Option<&Path>) -> (String, Running) {
    start_generator_of(fixture_model(), checkpoint_root).await
}

/// A generator of `model` on port 0.
async fn start_generator_of(model: PathBuf, checkpoint_root: Option<&Path>) -> (String, Running) {
    let mut config = hir_testkit::generator_config(model);
    config.auth.token = Some(TOKEN.into());
    config.swap.checkpoint_root = checkpoint_root.map(Path::to_path_buf);
    if let Some(root) = checkpoint_root {
        std::fs::create_dir_all(root).unwrap();
    }
    hir_testkit::spawn_generator(config).await
}

async fn start_relabeler(db: &str, generator: &str, bigbench: &Path) -> (String, Running) {
    let config = hir_relabeler::config::RelabelerConfig {
        concurrency: 1,
        write_batch: 8,
        ..hir_testkit::relabeler_config(db, bigbench, vec![generator.into()], TOKEN)
    };
    hir_testkit::spawn_relabeler(config).await
}

fn trainer_config(db: &str, relabeler: &str, generator: &str, scratch: &Scratch) -> TrainerConfig {
    TrainerConfig {
        commit_every_steps: 2,
        owner: Some("trainer-test".into()),
        ..hir_testkit::trainer_config(
            db,
            &scratch.bigbench(),
            relabeler,
            vec![generator.into()],
            TOKEN,
            &scratch.0,
        )
    }
}

async fn start_trainer(config: TrainerConfig) -> (TrainerServiceClient<Channel>, Running) {
    let (addr, running) = hir_testkit::spawn_trainer(config).await;
    (TrainerServiceClient::connect(addr).await.unwrap(), running)
}

fn authed<T>(m: T) -> Request<T> {
    hir_runtime::auth::with_bearer(m, Some(TOKEN))
}

/// Small knobs: 2 iterations of 20 prompts × 2 samples, 2 epochs of batches of 8. No
/// holdout or de-duplication, so that every sample is trained and step counts are exact.
fn hyperparameters() -> pb::Hyperparameters {
    pb::Hyperparameters {
        iterations: Some(2),
        samples_per_prompt: Some(2),
        batch_size: Some(8),
        micro_batch_size: Some(4),
        epochs_per_iteration: Some(2),
        max_new_tokens: Some(6),
        learning_rate: Some(1e-3),
        replay_holdout: Some(0.0),
        dedup_outputs: Some(false),
        ..Default::default()
    }
}

fn start_request(hp: pb::Hyperparameters, policy: &str) -> pb::StartRunRequest {
    pb::StartRunRequest {
        run_id: Uuid::new_v4().to_string(),
        name: "tiny".into(),
        tasks: vec!["tiny_mc".into()],
        model: fixture_model().to_string_lossy().into_owned(),
        policy: policy.into(),
        hyperparameters: Some(hp),
    }
}

/// Follows a run's events until it stops, finishes or fails; returns them with the run
/// as `GetRun` then describes it.
async fn watch_to_end(
    client: &mut TrainerServiceClient<Channel>,
    run_id: &str,
) -> (Vec<pb::RunEvent>, pb::Run) {
    let mut stream = client
        .watch_run(pb::GetRunRequest {
            run_id: run_id.into(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut events = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
    while let Some(e) = tokio::time::timeout_at(deadline, stream.message())
        .await
        .expect("the run ends within 10 minutes")
        .unwrap()
    {
        events.push(e);
    }
    let run = client
        .get_run(pb::GetRunRequest {
            run_id: run_id.into(),
        })
        .await
        .unwrap()
        .into_inner();
    (events, run)
}

async fn model_sha(folder: &str) -> String {
    hir_model::formats::checkpoint::sha256_file(&Path::new(folder).join("model.safetensors"))
        .unwrap()
}

/// A run created in the store as running, which a trainer starting up drives.
async fn create_running_run(store: &Store, bigbench: &Path) -> Uuid {
    let id = Uuid::new_v4();
    let config = hir_proto::convert::run_config(
        &fixture_model().to_string_lossy(),
        Some(&hyperparameters()),
    )
    .unwrap();
    store
        .create_run(&NewRun {
            id,
            name: "resume".into(),
            policy: "hir".into(),
            config: serde_json::to_value(&config).unwrap(),
        })
        .await
        .unwrap();
    let task = hir_core::task::Catalog::discover(bigbench)
        .unwrap()
        .load("tiny_mc")
        .unwrap();
    let task_id = hir_store::catalog::register(store, &task, 1).await.unwrap();
    store.add_run_tasks(id, &[task_id]).await.unwrap();
    store
        .set_run_status(id, RunStatus::Running, None)
        .await
        .unwrap();
    id
}

async fn wait_for(what: &str, mut done: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
    while !done().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn final_weights(store: &Store, run: Uuid) -> String {
    let v = store
        .get_model_version_by_name(&format!("{run}-it002"))
        .await
        .unwrap();
    model_sha(&v.checkpoint_uri).await
}

/// The number of runs in the store.
async fn run_count(store: &Store) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM runs")
        .fetch_one(store.pool())
        .await
        .unwrap()
}
