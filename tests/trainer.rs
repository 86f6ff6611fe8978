//! The trainer against the real generator and relabeler (in process, the tiny Llama
//! fixture), a real Postgres (a fresh database per test) and, for the crash test, the
//! `hir-trainer` binary killed and restarted.

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
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen: None,
        database_url: db.into(),
        bigbench: bigbench.into(),
        generators: vec![generator.into()],
        generator_token: Some(TOKEN.into()),
        auth_token: Some(TOKEN.into()),
        concurrency: 1,
        write_batch: 8,
        ..Default::default()
    };
    hir_testkit::spawn_relabeler(config).await
}

fn trainer_config(db: &str, relabeler: &str, generator: &str, scratch: &Scratch) -> TrainerConfig {
    TrainerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen: None,
        database_url: db.into(),
        bigbench: scratch.bigbench(),
        relabeler: relabeler.into(),
        relabeler_token: Some(TOKEN.into()),
        generators: vec![generator.into()],
        generator_token: Some(TOKEN.into()),
        auth_token: Some(TOKEN.into()),
        checkpoint_dir: scratch.checkpoints(),
        state_dir: scratch.state(),
        commit_every_steps: 2,
        owner: Some("trainer-test".into()),
        ..Default::default()
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
    hir_model::checkpoint::sha256_file(&Path::new(folder).join("model.safetensors")).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_samples_trains_swaps_and_evaluates_every_iteration() {
    let db = Db::fresh("loop").await;
    let scratch = Scratch::new("loop");
    let (generator, _g) = start_generator(Some(&scratch.checkpoints())).await;
    let (relabeler, _r) = start_relabeler(&db.url, &generator, &scratch.bigbench()).await;
    let (mut client, _t) =
        start_trainer(trainer_config(&db.url, &relabeler, &generator, &scratch)).await;

    let request = start_request(hyperparameters(), "hir");
    let run = client
        .start_run(authed(request.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(run.run_id, request.run_id);
    assert_eq!(
        run.hyperparameters.as_ref().unwrap().label_smoothing,
        Some(0.2),
        "defaults filled in"
    );
    // StartRun is idempotent on run_id.
    let again = client
        .start_run(authed(request.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.run_id, run.run_id);

    let (events, run) = watch_to_end(&mut client, &run.run_id).await;
    assert_eq!(
        run.status,
        pb::RunStatus::Done as i32,
        "error: {}",
        run.error
    );
    assert_eq!(
        run.iterations.len(),
        3,
        "the base evaluation and 2 iterations"
    );
    for it in &run.iterations {
        assert_eq!(it.status, pb::IterationStatus::Done as i32);
        assert_eq!(it.eval.len(), 1);
        assert_eq!(it.eval[0].examples as usize, TEST_EXAMPLES);
    }
    assert_eq!(run.iterations[1].samples, 20 * 2);
    // 40 samples in batches of 8, 2 epochs: 10 steps in iteration 1; the replay buffer
    // doubles iteration 2.
    assert_eq!(run.iterations[1].steps, 10);
    assert_eq!(run.iterations[2].steps, 20);
    assert!(run.iterations[1].train_loss.is_finite() && run.iterations[1].train_loss > 0.0);

    // Events after the watch began (the snapshot covers what came before): steps once
    // each, in order, up to 30; a checkpoint, swap and evaluation per trained iteration.
    let steps: Vec<u64> = events
        .iter()
        .filter_map(|e| match &e.event {
            Some(pb::run_event::Event::Step(s)) => Some(s.step),
            _ => None,
        })
        .collect();
    let first = steps.first().copied().unwrap_or(31);
    assert_eq!(steps, (first..=30).collect::<Vec<_>>());
    let count = |f: fn(&pb::run_event::Event) -> bool| {
        events
            .iter()
            .filter(|e| e.event.as_ref().is_some_and(f))
            .count()
    };
    assert_eq!(
        count(|e| matches!(e, pb::run_event::Event::Checkpoint(_))),
        2
    );
    assert_eq!(count(|e| matches!(e, pb::run_event::Event::Swap(_))), 2);
    assert_eq!(
        count(|e| matches!(e, pb::run_event::Event::Eval(ev) if ev.iteration > 0)),
        2
    );
    assert!(matches!(
        events[0].event,
        Some(pb::run_event::Event::Snapshot(_))
    ));

    // The generator serves the last version, and the versions form a chain.
    let mut generator_client = GeneratorServiceClient::connect(generator.clone())
        .await
        .unwrap();
    let info = generator_client
        .get_model_info(pb::GetModelInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.version, format!("{}-it002", run.run_id));
    let versions = client
        .list_checkpoints(pb::ListCheckpointsRequest {
            run_id: run.run_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .versions;
    assert_eq!(versions.len(), 2);
    assert_eq!(versions[0].version, info.version);
    assert_eq!(versions[0].parent_version, versions[1].version);
    assert_eq!(
        versions[0].sha256, info.sha256,
        "the generator verified the same manifest"
    );

    // The store: every batch done once, steps in order, state at the last step, evals.
    let store = &db.store;
    let run_id: Uuid = run.run_id.parse().unwrap();
    let rows: Vec<(i64, i32)> = sqlx::query_as(
        "SELECT step, iteration FROM training_steps WHERE run_id = $1 ORDER BY step",
    )
    .bind(run_id)
    .fetch_all(store.pool())
    .await
    .unwrap();
    assert_eq!(
        rows.iter().map(|r| r.0).collect::<Vec<_>>(),
        (1..=30).collect::<Vec<_>>()
    );
    assert_eq!(store.trainer_state(run_id).await.unwrap().unwrap().step, 30);
    let evals: i64 = sqlx::query_scalar("SELECT count(*) FROM eval_results WHERE run_id = $1")
        .bind(run_id)
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(evals as usize, 3 * TEST_EXAMPLES);
    // Training changed the weights.
    let base =
        hir_model::checkpoint::sha256_file(&fixture_model().join("model.safetensors")).unwrap();
    assert_ne!(model_sha(&versions[1].checkpoint_uri).await, base);
    assert_ne!(
        model_sha(&versions[0].checkpoint_uri).await,
        model_sha(&versions[1].checkpoint_uri).await
    );

    // A second run from the same model (on generators of its own, in the same store)
    // scores its base evaluation from the answers the first run stored, and shows it as its
    // own iteration 0: the same version, items and answers, with no evaluation row written
    // again.
    let scratch2 = Scratch::new("loop-second");
    let (generator2, _g2) = start_generator(Some(&scratch2.checkpoints())).await;
    let (relabeler2, _r2) = start_relabeler(&db.url, &generator2, &scratch2.bigbench()).await;
    let (mut client2, _t2) =
        start_trainer(trainer_config(&db.url, &relabeler2, &generator2, &scratch2)).await;
    let second = start_request(
        pb::Hyperparameters {
            iterations: Some(1),
            ..hyperparameters()
        },
        "hir",
    );
    client2.start_run(authed(second.clone())).await.unwrap();
    let (_, second) = watch_to_end(&mut client2, &second.run_id).await;
    assert_eq!(
        second.status,
        pb::RunStatus::Done as i32,
        "{}",
        second.error
    );
    let (base, reused) = (&run.iterations[0], &second.iterations[0]);
    assert!(!base.model_version.is_empty());
    assert_eq!(reused.model_version, base.model_version);
    assert_eq!(reused.eval, base.eval);
    assert_eq!(
        second.iterations[1].eval[0].examples as usize,
        TEST_EXAMPLES
    );
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM eval_results")
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(
        rows as usize,
        4 * TEST_EXAMPLES,
        "the base answers are not written twice"
    );

    // Resuming a finished run is refused.
    let err = client
        .resume_run(authed(pb::ResumeRunRequest {
            run_id: run.run_id.clone(),
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_refused_and_a_run_without_training_data_fails_with_the_reason() {
    let db = Db::fresh("bad").await;
    let scratch = Scratch::new("bad");
    let (generator, _g) = start_generator(Some(&scratch.checkpoints())).await;
    let (relabeler, _r) = start_relabeler(&db.url, &generator, &scratch.bigbench()).await;
    let (mut client, _t) =
        start_trainer(trainer_config(&db.url, &relabeler, &generator, &scratch)).await;

    let good = start_request(hyperparameters(), "hir");
    // A folder of an architecture no run trains.
    let unsupported = scratch.0.join("gpt2");
    std::fs::create_dir_all(&unsupported).unwrap();
    std::fs::write(unsupported.join("config.json"), r#"{"model_type": "gpt2"}"#).unwrap();
    let unauthenticated = client.start_run(good.clone()).await.unwrap_err();
    assert_eq!(unauthenticated.code(), Code::Unauthenticated);

    let cases: Vec<(pb::StartRunRequest, &str)> = vec![
        (
            pb::StartRunRequest {
                tasks: vec![],
                ..good.clone()
            },
            "tasks",
        ),
        (
            pb::StartRunRequest {
                tasks: vec!["tiny_mc".into(), "no_such_task".into()],
                ..good.clone()
            },
            "tasks[1]",
        ),
        (
            pb::StartRunRequest {
                model: unsupported.to_string_lossy().into_owned(),
                ..good.clone()
            },
            "model",
        ),
        (
            pb::StartRunRequest {
                model: "/nonexistent/model".into(),
                ..good.clone()
            },
            "model",
        ),
        (
            pb::StartRunRequest {
                policy: "ppo".into(),
                ..good.clone()
            },
            "policy",
        ),
        (
            pb::StartRunRequest {
                run_id: "not-a-uuid".into(),
                ..good.clone()
            },
            "run_id",
        ),
        (
            pb::StartRunRequest {
                hyperparameters: Some(pb::Hyperparameters {
                    learning_rate: Some(-1.0),
                    ..hyperparameters()
                }),
                ..good.clone()
            },
            "hyperparameters.learning_rate",
        ),
        (
            pb::StartRunRequest {
                hyperparameters: Some(pb::Hyperparameters {
                    batch_size: Some(0),
                    ..hyperparameters()
                }),
                ..good.clone()
            },
            "hyperparameters.batch_size",
        ),
        (
            pb::StartRunRequest {
                hyperparameters: Some(pb::Hyperparameters {
                    top_p: Some(1.5),
                    ..hyperparameters()
                }),
                ..good.clone()
            },
            "hyperparameters.top_p",
        ),
        (
            pb::StartRunRequest {
                hyperparameters: Some(pb::Hyperparameters {
                    prompt_style: Some("markdown".into()),
                    ..hyperparameters()
                }),
                ..good.clone()
            },
            "hyperparameters.prompt_style",
        ),
        (
            pb::StartRunRequest {
                hyperparameters: Some(pb::Hyperparameters {
                    preset: Some("fast".into()),
                    ..hyperparameters()
                }),
                ..good.clone()
            },
            "hyperparameters.preset",
        ),
        (
            pb::StartRunRequest {
                hyperparameters: Some(pb::Hyperparameters {
                    replay_holdout: Some(1.0),
                    ..hyperparameters()
                }),
                ..good.clone()
            },
            "hyperparameters.replay_holdout",
        ),
        (
            pb::StartRunRequest {
                hyperparameters: Some(pb::Hyperparameters {
                    lora_rank: Some(0),
                    ..hyperparameters()
                }),
                ..good.clone()
            },
            "hyperparameters.lora_rank",
        ),
        (
            // k_proj of the fixture maps 32 features to 16.
            pb::StartRunRequest {
                hyperparameters: Some(pb::Hyperparameters {
                    lora_rank: Some(17),
                    lora_targets: Some("q_proj,k_proj".into()),
                    ..hyperparameters()
                }),
                ..good.clone()
            },
            "hyperparameters.lora_rank",
        ),
        (
            pb::StartRunRequest {
                hyperparameters: Some(pb::Hyperparameters {
                    lora_rank: Some(4),
                    lora_targets: Some("q_proj,attn".into()),
                    ..hyperparameters()
                }),
                ..good.clone()
            },
            "hyperparameters.lora_targets",
        ),
        (
            pb::StartRunRequest {
                hyperparameters: Some(pb::Hyperparameters {
                    lora_rank: Some(4),
                    lora_alpha: Some(f64::NAN),
                    ..hyperparameters()
                }),
                ..good.clone()
            },
            "hyperparameters.lora_alpha",
        ),
    ];
    for (request, field) in cases {
        let err = client.start_run(authed(request)).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
        assert!(
            err.message().starts_with(field),
            "{field}: {}",
            err.message()
        );
    }
    let unknown = client
        .get_run(pb::GetRunRequest {
            run_id: Uuid::new_v4().to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
    let unknown = client
        .watch_run(pb::GetRunRequest {
            run_id: Uuid::new_v4().to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);

    // The same run id with another configuration is refused.
    let farl = start_request(hyperparameters(), "farl");
    let run = client
        .start_run(authed(farl.clone()))
        .await
        .unwrap()
        .into_inner();
    let conflict = client
        .start_run(authed(pb::StartRunRequest {
            name: "other".into(),
            ..farl.clone()
        }))
        .await
        .unwrap_err();
    assert_eq!(conflict.code(), Code::AlreadyExists, "{conflict:?}");

    // The random tiny model never answers correctly, so FARL keeps no sample: the run
    // fails with the reason, on the iteration that had nothing to train on.
    let (_, run) = watch_to_end(&mut client, &run.run_id).await;
    assert_eq!(run.status, pb::RunStatus::Failed as i32);
    assert!(run.error.contains("no training batches"), "{}", run.error);
    assert_eq!(run.iterations[1].status, pb::IterationStatus::Failed as i32);
    assert!(
        run.iterations[1].error.contains("farl"),
        "{}",
        run.iterations[1].error
    );
    db.drop_db().await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_trainer_resumes_with_no_step_lost_or_repeated() {
    // Reference: the run uninterrupted, in process, swapping by reference.
    let reference = {
        let db = Db::fresh("reference").await;
        let scratch = Scratch::new("reference");
        let (generator, _g) = start_generator(Some(&scratch.checkpoints())).await;
        let (relabeler, _r) = start_relabeler(&db.url, &generator, &scratch.bigbench()).await;
        let run = create_running_run(&db.store, &scratch.bigbench()).await;
        let _t = start_trainer(trainer_config(&db.url, &relabeler, &generator, &scratch)).await;
        let store = db.store.clone();
        wait_for("the reference run", async || {
            store.get_run(run).await.unwrap().status != RunStatus::Running
        })
        .await;
        assert_eq!(db.store.get_run(run).await.unwrap().status, RunStatus::Done);
        let weights = final_weights(&db.store, run).await;
        db.drop_db().await;
        weights
    };

    // The same run in a trainer process that uploads its checkpoints (the generator has
    // no checkpoint root), committing every step, killed after a few steps.
    let db = Db::fresh("killed").await;
    let scratch = Scratch::new("killed");
    let (generator, _g) = start_generator(None).await;
    let (relabeler, _r) = start_relabeler(&db.url, &generator, &scratch.bigbench()).await;
    let run = create_running_run(&db.store, &scratch.bigbench()).await;
    let spawn = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_hir"))
            .args(["serve", "trainer"])
            .env("DATABASE_URL", &db.url)
            .env("HIR_TRAINER__LISTEN", "127.0.0.1:0")
            .env("HIR_TRAINER__METRICS_LISTEN", "127.0.0.1:0")
            .env("HIR_TRAINER__BIGBENCH", scratch.bigbench())
            .env("HIR_TRAINER__RELABELER", &relabeler)
            .env("HIR_TRAINER__RELABELER_TOKEN", TOKEN)
            .env("HIR_TRAINER__GENERATORS", format!("[\"{generator}\"]"))
            .env("HIR_TRAINER__GENERATOR_TOKEN", TOKEN)
            .env("HIR_TRAINER__CHECKPOINT_DIR", scratch.checkpoints())
            .env("HIR_TRAINER__STATE_DIR", scratch.state())
            .env("HIR_TRAINER__UPLOAD", "true")
            .env("HIR_TRAINER__COMMIT_EVERY_STEPS", "1")
            .env("HIR_TRAINER__OWNER", "trainer-proc")
            .env("RUST_LOG", "warn")
            .spawn()
            .map(KillOnDrop)
            .expect("hir serve trainer starts")
    };
    let mut child = spawn();
    let store = db.store.clone();
    wait_for("three committed steps", async || {
        if let Some(status) = child.0.try_wait().unwrap() {
            panic!("hir-trainer exited early with {status}");
        }
        store
            .trainer_state(run)
            .await
            .unwrap()
            .is_some_and(|s| s.step >= 3)
    })
    .await;
    child.0.kill().unwrap();
    child.0.wait().unwrap();
    let at_kill = db.store.trainer_state(run).await.unwrap().unwrap().step;
    assert!(at_kill < 30, "killed before the end (at step {at_kill})");

    let _child = spawn();
    wait_for("the resumed run", async || {
        store.get_run(run).await.unwrap().status != RunStatus::Running
    })
    .await;
    let finished = db.store.get_run(run).await.unwrap();
    assert_eq!(finished.status, RunStatus::Done, "{:?}", finished.error);
    let steps: Vec<i64> =
        sqlx::query_scalar("SELECT step FROM training_steps WHERE run_id = $1 ORDER BY step")
            .bind(run)
            .fetch_all(db.store.pool())
            .await
            .unwrap();
    assert_eq!(steps, (1..=30).collect::<Vec<_>>(), "every step once");
    assert_eq!(
        final_weights(&db.store, run).await,
        reference,
        "the resumed run ends with bit-identical weights"
    );
    assert_eq!(
        db.store.get_iteration(run, 2).await.unwrap().status,
        IterationStatus::Done
    );
    db.drop_db().await;
}

#[test]
fn unset_hyperparameters_take_the_reference_values() {
    let c = hir_proto::convert::run_config("m", None).unwrap();
    assert_eq!(
        c,
        RunConfig {
            model: "m".into(),
            ..RunConfig::default()
        }
    );
    let h = hir_proto::convert::hyperparameters(&c);
    assert_eq!(hir_proto::convert::run_config("m", Some(&h)).unwrap(), c);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relabeler_that_comes_up_late_is_waited_for() {
    let db = Db::fresh("late").await;
    let scratch = Scratch::new("late");
    let (generator, _g) = start_generator(Some(&scratch.checkpoints())).await;
    // A free port for the relabeler, not listening yet: the trainer is refused at first.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let relabeler = format!("http://127.0.0.1:{port}");
    let (mut client, _t) =
        start_trainer(trainer_config(&db.url, &relabeler, &generator, &scratch)).await;
    let run = client
        .start_run(authed(start_request(
            pb::Hyperparameters {
                iterations: Some(1),
                ..hyperparameters()
            },
            "hir",
        )))
        .await
        .unwrap()
        .into_inner();
    let mut stream = client
        .watch_run(pb::GetRunRequest {
            run_id: run.run_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut relabeler_running = None;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
    while let Some(event) = tokio::time::timeout_at(deadline, stream.message())
        .await
        .expect("the run ends")
        .unwrap()
    {
        if let Some(pb::run_event::Event::Iteration(it)) = &event.event {
            if it.error.contains("retrying") && relabeler_running.is_none() {
                // Now bring the relabeler up on the address the trainer keeps trying.
                let mut config = hir_relabeler::config::RelabelerConfig {
                    listen: format!("127.0.0.1:{port}").parse().unwrap(),
                    metrics_listen: None,
                    database_url: db.url.clone(),
                    bigbench: scratch.bigbench(),
                    generators: vec![generator.clone()],
                    generator_token: Some(TOKEN.into()),
                    auth_token: Some(TOKEN.into()),
                    ..Default::default()
                };
                config.concurrency = 1;
                relabeler_running = Some(hir_testkit::spawn_relabeler(config).await.1);
            }
        }
    }
    assert!(
        relabeler_running.is_some(),
        "the trainer reported its retries"
    );
    let run = client
        .get_run(pb::GetRunRequest {
            run_id: run.run_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(run.status, pb::RunStatus::Done as i32, "{}", run.error);
    assert_eq!(run.iterations[1].samples, 40);
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_run_commits_its_steps_and_resumes_without_repeating_any() {
    let db = Db::fresh("stop").await;
    let scratch = Scratch::new("stop");
    let (generator, _g) = start_generator(Some(&scratch.checkpoints())).await;
    let (relabeler, _r) = start_relabeler(&db.url, &generator, &scratch.bigbench()).await;
    let mut config = trainer_config(&db.url, &relabeler, &generator, &scratch);
    config.commit_every_steps = 4;
    let (mut client, _t) = start_trainer(config).await;
    let run = client
        .start_run(authed(start_request(hyperparameters(), "hir")))
        .await
        .unwrap()
        .into_inner();
    let run_id: Uuid = run.run_id.parse().unwrap();

    // Stop as soon as a step is seen.
    let mut stream = client
        .watch_run(pb::GetRunRequest {
            run_id: run.run_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut stopped_at = None;
    while let Some(event) = stream.message().await.unwrap() {
        if let Some(pb::run_event::Event::Step(s)) = &event.event {
            if stopped_at.is_none() {
                stopped_at = Some(s.step);
                client
                    .stop_run(authed(pb::StopRunRequest {
                        run_id: run.run_id.clone(),
                    }))
                    .await
                    .unwrap();
            }
        }
    }
    let stopped = client
        .get_run(pb::GetRunRequest {
            run_id: run.run_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        stopped.status,
        pb::RunStatus::Stopped as i32,
        "{}",
        stopped.error
    );
    // The steps taken before the stop were committed, though fewer than commit_every_steps.
    let committed = db.store.trainer_state(run_id).await.unwrap().unwrap().step;
    assert!((1..30).contains(&committed), "committed {committed}");
    let done: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM training_batches WHERE run_id = $1 AND status = 'done'",
    )
    .bind(run_id)
    .fetch_one(db.store.pool())
    .await
    .unwrap();
    assert_eq!(
        done, committed,
        "a batch is done exactly when its step is committed"
    );

    let resumed = client
        .resume_run(authed(pb::ResumeRunRequest {
            run_id: run.run_id.clone(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resumed.status, pb::RunStatus::Running as i32);
    let (_, finished) = watch_to_end(&mut client, &run.run_id).await;
    assert_eq!(
        finished.status,
        pb::RunStatus::Done as i32,
        "{}",
        finished.error
    );
    let steps: Vec<i64> =
        sqlx::query_scalar("SELECT step FROM training_steps WHERE run_id = $1 ORDER BY step")
            .bind(run_id)
            .fetch_all(db.store.pool())
            .await
            .unwrap();
    assert_eq!(steps, (1..=30).collect::<Vec<_>>(), "every step once");
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flan_t5_run_trains_the_encoder_decoder_and_swaps_it_in() {
    let db = Db::fresh("t5").await;
    let scratch = Scratch::new("t5");
    let (generator, _g) =
        start_generator_of(t5_fixture_model(), Some(&scratch.checkpoints())).await;
    let (relabeler, _r) = start_relabeler(&db.url, &generator, &scratch.bigbench()).await;
    let (mut client, _t) =
        start_trainer(trainer_config(&db.url, &relabeler, &generator, &scratch)).await;
    let request = pb::StartRunRequest {
        model: t5_fixture_model().to_string_lossy().into_owned(),
        hyperparameters: Some(pb::Hyperparameters {
            iterations: Some(1),
            ..hyperparameters()
        }),
        ..start_request(hyperparameters(), "hir")
    };
    let run = client
        .start_run(authed(request))
        .await
        .unwrap()
        .into_inner();
    let (_, run) = watch_to_end(&mut client, &run.run_id).await;
    assert_eq!(
        run.status,
        pb::RunStatus::Done as i32,
        "error: {}",
        run.error
    );
    assert_eq!(
        run.iterations.len(),
        2,
        "the base evaluation and 1 iteration"
    );
    assert_eq!(run.iterations[1].samples, 20 * 2);
    assert_eq!(run.iterations[1].steps, 10);
    assert!(run.iterations[1].train_loss.is_finite() && run.iterations[1].train_loss > 0.0);
    for it in &run.iterations {
        assert_eq!(it.eval[0].examples as usize, TEST_EXAMPLES);
    }
    // The generator serves the trained T5 (it verified the manifest and passed the probe).
    let info = GeneratorServiceClient::connect(generator.clone())
        .await
        .unwrap()
        .get_model_info(pb::GetModelInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.version, format!("{}-it001", run.run_id));
    assert_eq!(info.architecture, "t5");
    let versions = client
        .list_checkpoints(pb::ListCheckpointsRequest {
            run_id: run.run_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .versions;
    let base =
        hir_model::checkpoint::sha256_file(&t5_fixture_model().join("model.safetensors")).unwrap();
    assert_ne!(model_sha(&versions[0].checkpoint_uri).await, base);
    // The checkpoint is a T5 folder that loads and generates.
    let trained = hir_model::LoadedModel::load(
        Path::new(&versions[0].checkpoint_uri),
        &candle_core::Device::Cpu,
        hir_model::WeightMode::Dense(candle_core::DType::F32),
    )
    .unwrap();
    assert_eq!(trained.info().architecture, "t5");
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lora_run_trains_adapters_and_swaps_only_them_in() {
    let db = Db::fresh("lora").await;
    let scratch = Scratch::new("lora");
    let (generator, _g) = start_generator(Some(&scratch.checkpoints())).await;
    let (relabeler, _r) = start_relabeler(&db.url, &generator, &scratch.bigbench()).await;
    let (mut client, _t) =
        start_trainer(trainer_config(&db.url, &relabeler, &generator, &scratch)).await;
    let request = start_request(
        pb::Hyperparameters {
            lora_rank: Some(4),
            lora_targets: Some("q_proj,v_proj,down_proj".into()),
            learning_rate: Some(1e-2),
            ..hyperparameters()
        },
        "hir",
    );
    let run = client
        .start_run(authed(request))
        .await
        .unwrap()
        .into_inner();
    let h = run.hyperparameters.as_ref().unwrap();
    assert_eq!((h.lora_rank, h.lora_alpha), (Some(4), Some(16.0)));
    let (_, run) = watch_to_end(&mut client, &run.run_id).await;
    assert_eq!(
        run.status,
        pb::RunStatus::Done as i32,
        "error: {}",
        run.error
    );
    assert_eq!(run.iterations.len(), 3);
    assert_eq!(run.iterations[2].steps, 20);
    // Each checkpoint is a PEFT folder of the adapters alone, and the generator serves the
    // last one (it verified the manifest and passed the probe).
    let versions = client
        .list_checkpoints(pb::ListCheckpointsRequest {
            run_id: run.run_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .versions;
    assert_eq!(versions.len(), 2);
    let adapters: Vec<_> = versions
        .iter()
        .map(|v| {
            let dir = Path::new(&v.checkpoint_uri);
            assert!(!dir.join("model.safetensors").exists());
            hir_model::lora::Adapter::read(dir, &candle_core::Device::Cpu).unwrap()
        })
        .collect();
    let base_digest = hir_model::checkpoint::model_digest(&fixture_model()).unwrap();
    for a in &adapters {
        a.check_base(&base_digest).unwrap();
        assert_eq!(a.config.targets, ["down_proj", "q_proj", "v_proj"]);
        assert!(a.bytes() < 32 << 10, "{} bytes", a.bytes());
    }
    let info = GeneratorServiceClient::connect(generator.clone())
        .await
        .unwrap()
        .get_model_info(pb::GetModelInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.version, format!("{}-it002", run.run_id));
    assert_eq!(info.sha256, versions[0].sha256);
    db.drop_db().await;
}

/// The number of runs in the store.
async fn run_count(store: &Store) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM runs")
        .fetch_one(store.pool())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_run_refuses_what_the_generators_cannot_run() {
    let db = Db::fresh("cannot_run").await;
    let scratch = Scratch::new("cannot_run");
    let (generator, _g) = start_generator(Some(&scratch.checkpoints())).await;
    // No relabeler: a refused run never gets that far.
    let (mut client, _t) = start_trainer(trainer_config(
        &db.url,
        "http://127.0.0.1:1",
        &generator,
        &scratch,
    ))
    .await;
    let good = start_request(hyperparameters(), "hir");
    let knobs = |h: pb::Hyperparameters| pb::StartRunRequest {
        hyperparameters: Some(h),
        ..good.clone()
    };
    let model = |path: &Path| pb::StartRunRequest {
        model: path.to_string_lossy().into_owned(),
        ..good.clone()
    };
    // A file named .gguf that is not one.
    std::fs::create_dir_all(&scratch.0).unwrap();
    let garbage_gguf = scratch.0.join("garbage.gguf");
    std::fs::write(&garbage_gguf, b"this is not a GGUF file at all").unwrap();
    // A Llama folder without weights, and one whose weights are garbage.
    let no_weights = scratch.0.join("no-weights");
    std::fs::create_dir_all(&no_weights).unwrap();
    std::fs::copy(
        fixture_model().join("config.json"),
        no_weights.join("config.json"),
    )
    .unwrap();
    let bad_weights = scratch.0.join("bad-weights");
    std::fs::create_dir_all(&bad_weights).unwrap();
    std::fs::copy(
        fixture_model().join("config.json"),
        bad_weights.join("config.json"),
    )
    .unwrap();
    std::fs::write(bad_weights.join("model.safetensors"), [0xffu8; 64]).unwrap();

    let cases: Vec<(pb::StartRunRequest, &str, &str)> = vec![
        (
            knobs(pb::Hyperparameters {
                iterations: Some(u32::MAX),
                ..hyperparameters()
            }),
            "hyperparameters.iterations",
            "1000",
        ),
        (
            knobs(pb::Hyperparameters {
                samples_per_prompt: Some(1_000_000),
                ..hyperparameters()
            }),
            "hyperparameters.samples_per_prompt",
            "64",
        ),
        (
            knobs(pb::Hyperparameters {
                max_new_tokens: Some(1_000_000_000),
                ..hyperparameters()
            }),
            "hyperparameters.max_new_tokens",
            "4096",
        ),
        (
            // Within the run's bound, beyond the generator's (1024 by default).
            knobs(pb::Hyperparameters {
                max_new_tokens: Some(2048),
                ..hyperparameters()
            }),
            "hyperparameters.max_new_tokens",
            "1024",
        ),
        (
            knobs(pb::Hyperparameters {
                top_k: Some(1_000_000),
                ..hyperparameters()
            }),
            "hyperparameters.top_k",
            "vocabulary",
        ),
        (model(&t5_fixture_model()), "model", "llama"),
        (model(&garbage_gguf), "model", "GGUF"),
        (model(&no_weights), "model", "safetensors"),
        (model(&bad_weights), "model", "safetensors"),
    ];
    for (request, field, mentions) in cases {
        let err = client.start_run(authed(request)).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
        assert!(
            err.message().starts_with(&format!("{field}:")),
            "{field}: {}",
            err.message()
        );
        assert!(
            err.message().contains(mentions),
            "{field} should mention {mentions}: {}",
            err.message()
        );
        assert!(!err.message().contains('\n'), "{}", err.message());
    }
    assert_eq!(run_count(&db.store).await, 0, "no refused run is stored");
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_run_is_unavailable_while_no_generator_answers() {
    let db = Db::fresh("no_generator").await;
    let scratch = Scratch::new("no_generator");
    let (mut client, _t) = start_trainer(trainer_config(
        &db.url,
        "http://127.0.0.1:1",
        "http://127.0.0.1:1",
        &scratch,
    ))
    .await;
    let err = client
        .start_run(authed(start_request(hyperparameters(), "hir")))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("generator"), "{}", err.message());
    assert_eq!(run_count(&db.store).await, 0);
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_run_ids_and_names_are_echoed_bounded() {
    let db = Db::fresh("echo").await;
    let scratch = Scratch::new("echo");
    let (generator, _g) = start_generator(None).await;
    let (mut client, _t) = start_trainer(trainer_config(
        &db.url,
        "http://127.0.0.1:1",
        &generator,
        &scratch,
    ))
    .await;
    let huge = "r".repeat(20_000);
    let check = |what: &str, err: tonic::Status| {
        assert_eq!(err.code(), Code::InvalidArgument, "{what}: {err:?}");
        assert!(
            err.message().len() < 300,
            "{what}: {} bytes: {}",
            err.message().len(),
            &err.message()[..200.min(err.message().len())]
        );
    };
    let good = start_request(hyperparameters(), "hir");
    for (what, request) in [
        (
            "run_id",
            pb::StartRunRequest {
                run_id: huge.clone(),
                ..good.clone()
            },
        ),
        (
            "name",
            pb::StartRunRequest {
                name: huge.clone(),
                ..good.clone()
            },
        ),
        (
            "tasks",
            pb::StartRunRequest {
                tasks: vec![huge.clone()],
                ..good.clone()
            },
        ),
        (
            "model",
            pb::StartRunRequest {
                model: huge.clone(),
                ..good.clone()
            },
        ),
        (
            "policy",
            pb::StartRunRequest {
                policy: huge.clone(),
                ..good.clone()
            },
        ),
        (
            "prompt_style",
            pb::StartRunRequest {
                hyperparameters: Some(pb::Hyperparameters {
                    prompt_style: Some(huge.clone()),
                    ..hyperparameters()
                }),
                ..good.clone()
            },
        ),
        (
            "preset",
            pb::StartRunRequest {
                hyperparameters: Some(pb::Hyperparameters {
                    preset: Some(huge.clone()),
                    ..hyperparameters()
                }),
                ..good.clone()
            },
        ),
    ] {
        check(
            &format!("StartRun {what}"),
            client.start_run(authed(request)).await.unwrap_err(),
        );
    }
    let get = pb::GetRunRequest {
        run_id: huge.clone(),
    };
    check("GetRun", client.get_run(get.clone()).await.unwrap_err());
    check("WatchRun", client.watch_run(get).await.unwrap_err());
    check(
        "StopRun",
        client
            .stop_run(authed(pb::StopRunRequest {
                run_id: huge.clone(),
            }))
            .await
            .unwrap_err(),
    );
    check(
        "ResumeRun",
        client
            .resume_run(authed(pb::ResumeRunRequest {
                run_id: huge.clone(),
            }))
            .await
            .unwrap_err(),
    );
    check(
        "ListCheckpoints",
        client
            .list_checkpoints(pb::ListCheckpointsRequest {
                run_id: huge.clone(),
            })
            .await
            .unwrap_err(),
    );
    assert_eq!(run_count(&db.store).await, 0);
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_that_fails_records_one_line_without_a_backtrace() {
    let db = Db::fresh("backtrace").await;
    let scratch = Scratch::new("backtrace");
    let (generator, _g) = start_generator(Some(&scratch.checkpoints())).await;
    let (relabeler, _r) = start_relabeler(&db.url, &generator, &scratch.bigbench()).await;
    // A run whose model file went bad after StartRun accepted it: the driver fails when it
    // loads the model for training, with backtraces enabled in the trainer's process.
    let run = create_running_run(&db.store, &scratch.bigbench()).await;
    std::fs::create_dir_all(&scratch.0).unwrap();
    let garbage = scratch.0.join("gone-bad.gguf");
    std::fs::write(&garbage, b"this is not a GGUF file at all").unwrap();
    let config = hir_proto::convert::run_config(
        &garbage.to_string_lossy(),
        Some(&pb::Hyperparameters {
            iterations: Some(1),
            ..hyperparameters()
        }),
    )
    .unwrap();
    sqlx::query("UPDATE runs SET config = $2 WHERE id = $1")
        .bind(run)
        .bind(serde_json::to_value(&config).unwrap())
        .execute(db.store.pool())
        .await
        .unwrap();
    let _child = std::process::Command::new(env!("CARGO_BIN_EXE_hir"))
        .args(["serve", "trainer"])
        .env("DATABASE_URL", &db.url)
        .env("HIR_TRAINER__LISTEN", "127.0.0.1:0")
        .env("HIR_TRAINER__METRICS_LISTEN", "127.0.0.1:0")
        .env("HIR_TRAINER__BIGBENCH", scratch.bigbench())
        .env("HIR_TRAINER__RELABELER", &relabeler)
        .env("HIR_TRAINER__RELABELER_TOKEN", TOKEN)
        .env("HIR_TRAINER__GENERATORS", format!("[\"{generator}\"]"))
        .env("HIR_TRAINER__GENERATOR_TOKEN", TOKEN)
        .env("HIR_TRAINER__CHECKPOINT_DIR", scratch.checkpoints())
        .env("HIR_TRAINER__STATE_DIR", scratch.state())
        .env("HIR_TRAINER__OWNER", "trainer-backtrace")
        .env("RUST_BACKTRACE", "1")
        .env("RUST_LIB_BACKTRACE", "1")
        .env("RUST_LOG", "error")
        .spawn()
        .map(KillOnDrop)
        .expect("hir serve trainer starts");
    let store = db.store.clone();
    wait_for("the run to fail", async || {
        store.get_run(run).await.unwrap().status != RunStatus::Running
    })
    .await;
    let failed = db.store.get_run(run).await.unwrap();
    assert_eq!(failed.status, RunStatus::Failed);
    let iteration = db.store.get_iteration(run, 1).await.unwrap();
    assert_eq!(iteration.status, IterationStatus::Failed);
    for error in [failed.error.unwrap(), iteration.error.unwrap()] {
        assert!(error.contains("GGUF"), "{error}");
        assert!(
            !error.contains('\n') && error.len() <= 1100,
            "one bounded line, no backtrace: {error}"
        );
    }
    db.drop_db().await;
}
