//! The test kit of hindsight's cross-service tests (the repository's top-level `tests/`):
//! a fresh database per test on a real Postgres, the fixture models and tiny BIG-bench
//! tasks in their vocabulary, and each service in process on port 0, stopped when its
//! handle drops. Services are ready when `build` returns (their sockets are bound), so
//! nothing here waits or sleeps.
//!
//! Only tests depend on this crate.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::future::Future;
use std::path::{Path, PathBuf};

use hir_store::Store;
use sqlx::{Connection, Executor, PgConnection};

/// The Postgres server tests create their databases on: `DATABASE_URL`, or the local
/// server with trust authentication.
pub fn admin_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// A fresh, migrated database of its own; [`TestDb::drop_db`] removes it.
pub struct TestDb {
    /// Its connection URL.
    pub url: String,
    /// Its name on the server.
    pub name: String,
    /// The store over it.
    pub store: Store,
}

impl TestDb {
    /// Creates (replacing any left over) and migrates the database `hir_<tag>_<pid>`.
    pub async fn create(tag: &str) -> Self {
        let name = format!("hir_{tag}_{}", std::process::id());
        admin(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await;
        admin(&format!("CREATE DATABASE {name}")).await;
        let url = format!("{}/{name}", admin_url().rsplit_once('/').unwrap().0);
        let store = Store::connect(&url).await.unwrap();
        store.migrate().await.unwrap();
        Self { url, name, store }
    }

    /// Closes the store and drops the database.
    pub async fn drop_db(self) {
        self.store.pool().close().await;
        drop_database(&self.url).await;
    }
}

/// Drops the database at `url` (its last path segment), closing its connections.
pub async fn drop_database(url: &str) {
    let name = url.rsplit_once('/').unwrap().1;
    admin(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await;
}

async fn admin(sql: &str) {
    let mut admin = PgConnection::connect(&admin_url())
        .await
        .expect("DATABASE_URL reaches a Postgres superuser");
    admin.execute(sql).await.unwrap();
}

/// The repository's root folder.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The tiny Llama fixture (a Hugging Face folder).
pub fn llama_fixture() -> PathBuf {
    repo_root().join("crates/hir-model/tests/fixtures/llama")
}

/// The tiny FLAN-T5 fixture (a Hugging Face folder).
pub fn t5_fixture() -> PathBuf {
    repo_root().join("crates/hir-model/tests/fixtures/t5")
}

/// Which option of a fixture task is correct.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answers {
    /// The first option of even examples, the second of odd ones; words cycle every 30.
    Alternating,
    /// Always the first option; every example has its own words.
    First,
}

/// Writes the multiple-choice task `tiny_mc` (in the fixtures' `w<N>` vocabulary) with
/// `examples` examples under `bigbench`, a BIG-bench folder, and returns `bigbench`.
pub fn tiny_task(bigbench: &Path, examples: usize, answers: Answers) -> PathBuf {
    let dir = bigbench.join("tiny/mc");
    std::fs::create_dir_all(&dir).unwrap();
    let examples: Vec<serde_json::Value> = (0..examples)
        .map(|i| {
            let ((a, b), first) = match answers {
                Answers::Alternating => ((2 + i % 30, 33 + i % 30), i % 2 == 0),
                Answers::First => ((2 + i, 33 + i), true),
            };
            serde_json::json!({
                "input": format!("w{a} w{b} w{}", 10 + i % 7),
                "target_scores": {
                    format!("w{a}"): i32::from(first),
                    format!("w{b}"): i32::from(!first),
                }
            })
        })
        .collect();
    std::fs::write(
        dir.join("task.json"),
        serde_json::json!({ "examples": examples }).to_string(),
    )
    .unwrap();
    bigbench.to_path_buf()
}

/// A service running in process; dropping it stops the service.
pub struct Running(#[allow(dead_code)] tokio::sync::oneshot::Sender<()>);

/// A [`Running`] handle and the future a service's `run_until` waits on.
pub fn stopper() -> (Running, impl Future<Output = ()> + Send + 'static) {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    (Running(tx), async move { drop(rx.await) })
}

/// A generator configuration serving `model` on port 0, without a metrics endpoint.
pub fn generator_config(model: PathBuf) -> hir_generator::config::GeneratorConfig {
    hir_generator::config::GeneratorConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen: None,
        model,
        ..Default::default()
    }
}

/// A relabeler configuration on port 0 over `db` and `bigbench`, sampling from
/// `generators`, with `token` for its callers and for the generators.
pub fn relabeler_config(
    db: &str,
    bigbench: &Path,
    generators: Vec<String>,
    token: &str,
) -> hir_relabeler::config::RelabelerConfig {
    hir_relabeler::config::RelabelerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen: None,
        database_url: db.into(),
        bigbench: bigbench.into(),
        generators,
        generator_token: Some(token.into()),
        auth_token: Some(token.into()),
        ..Default::default()
    }
}

/// A trainer configuration on port 0 over `db` and `bigbench`, driving `relabeler` and
/// `generators` with `token` everywhere, with checkpoints and state under `root`.
pub fn trainer_config(
    db: &str,
    bigbench: &Path,
    relabeler: &str,
    generators: Vec<String>,
    token: &str,
    root: &Path,
) -> hir_trainer::config::TrainerConfig {
    hir_trainer::config::TrainerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen: None,
        database_url: db.into(),
        bigbench: bigbench.into(),
        relabeler: relabeler.into(),
        relabeler_token: Some(token.into()),
        generators,
        generator_token: Some(token.into()),
        auth_token: Some(token.into()),
        checkpoint_dir: root.join("checkpoints"),
        state_dir: root.join("state"),
        ..Default::default()
    }
}

/// Starts a generator; returns its `http://` address.
pub async fn spawn_generator(config: hir_generator::config::GeneratorConfig) -> (String, Running) {
    let app = hir_generator::Application::build(config).await.unwrap();
    let addr = format!("http://{}", app.local_addr());
    let (running, stop) = stopper();
    tokio::spawn(app.run_until(stop));
    (addr, running)
}

/// Starts a relabeler; returns its `http://` address.
pub async fn spawn_relabeler(config: hir_relabeler::config::RelabelerConfig) -> (String, Running) {
    let app = hir_relabeler::Application::build(config).await.unwrap();
    let addr = format!("http://{}", app.local_addr());
    let (running, stop) = stopper();
    tokio::spawn(app.run_until(stop));
    (addr, running)
}

/// Starts a trainer; returns its `http://` address.
pub async fn spawn_trainer(config: hir_trainer::config::TrainerConfig) -> (String, Running) {
    let app = hir_trainer::Application::build(config).await.unwrap();
    let addr = format!("http://{}", app.local_addr());
    let (running, stop) = stopper();
    tokio::spawn(app.run_until(stop));
    (addr, running)
}

/// A child process killed when the test ends, passing or not.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
