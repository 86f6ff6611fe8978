//! Versions stay consistent while generators come and go: a run whose generator restarts
//! (and comes back serving its starting model) and which gains a second generator in the
//! middle of an iteration finishes, every sample of an iteration comes from the version the
//! iteration pinned, and at the end every generator serves the run's last version.

use std::path::{Path, PathBuf};
use std::time::Duration;

use hir_proto::pb;
use hir_proto::pb::generator_service_client::GeneratorServiceClient;
use hir_proto::pb::trainer_service_client::TrainerServiceClient;
use hir_testkit::{Answers, Running, TestDb};
use uuid::Uuid;

const TOKEN: &str = "versions-token";

/// A generator of the tiny Llama on `port` (0: any), swapping from `checkpoints`.
async fn start_generator(port: u16, checkpoints: &Path) -> (String, Running) {
    let mut config = hir_testkit::generator_config(hir_testkit::llama_fixture());
    config.listen = format!("127.0.0.1:{port}").parse().unwrap();
    config.auth.token = Some(TOKEN.into());
    config.swap.checkpoint_root = Some(checkpoints.to_path_buf());
    config.shutdown_grace_secs = 0;
    // The port of a generator that just stopped is free once its listener is closed.
    for attempt in 0.. {
        match hir_generator::Application::build(config.clone()).await {
            Ok(app) => {
                let addr = format!("http://{}", app.local_addr());
                let (running, stop) = hir_testkit::stopper();
                tokio::spawn(app.run_until(stop));
                return (addr, running);
            }
            Err(_) if attempt < 50 => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(e) => panic!("generator on port {port}: {e:#}"),
        }
    }
    unreachable!()
}

fn port_of(addr: &str) -> u16 {
    addr.rsplit(':').next().unwrap().parse().unwrap()
}

/// A port nothing listens on yet.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn serving(addr: &str) -> String {
    let mut client = GeneratorServiceClient::connect(addr.to_string())
        .await
        .unwrap();
    client
        .get_model_info(pb::GetModelInfoRequest {})
        .await
        .unwrap()
        .into_inner()
        .version
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_and_a_new_generator_are_brought_to_the_runs_version() {
    let db = TestDb::create("versions").await;
    let root = std::env::temp_dir().join(format!("hir-versions-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let bigbench = hir_testkit::tiny_task(&root.join("bigbench"), 150, Answers::Alternating);
    let checkpoints: PathBuf = root.join("checkpoints");
    std::fs::create_dir_all(&checkpoints).unwrap();

    let (a, running_a) = start_generator(0, &checkpoints).await;
    let b = format!("http://127.0.0.1:{}", free_port());
    let generators = vec![a.clone(), b.clone()];
    let mut relabeler_config =
        hir_testkit::relabeler_config(&db.url, &bigbench, generators.clone(), TOKEN);
    relabeler_config.concurrency = 1;
    relabeler_config.retry_initial_ms = 50;
    let (relabeler, _r) = hir_testkit::spawn_relabeler(relabeler_config).await;
    let (trainer, _t) = hir_testkit::spawn_trainer(hir_testkit::trainer_config(
        &db.url, &bigbench, &relabeler, generators, TOKEN, &root,
    ))
    .await;
    let mut client = TrainerServiceClient::connect(trainer).await.unwrap();
    let run_id = Uuid::new_v4();
    client
        .start_run(hir_runtime::auth::with_bearer(
            pb::StartRunRequest {
                run_id: run_id.to_string(),
                name: "versions".into(),
                tasks: vec!["tiny_mc".into()],
                model: hir_testkit::llama_fixture().to_string_lossy().into_owned(),
                policy: "hir".into(),
                hyperparameters: Some(pb::Hyperparameters {
                    iterations: Some(2),
                    samples_per_prompt: Some(2),
                    batch_size: Some(8),
                    micro_batch_size: Some(8),
                    epochs_per_iteration: Some(1),
                    max_new_tokens: Some(6),
                    max_steps_per_iteration: Some(2),
                    max_test_prompts: Some(4),
                    ..Default::default()
                }),
            },
            Some(TOKEN),
        ))
        .await
        .unwrap();

    // When iteration 2 starts sampling (from iteration 1's version), generator A restarts
    // on its port serving the starting model again, and generator B joins.
    let mut events = client
        .watch_run(pb::GetRunRequest {
            run_id: run_id.to_string(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut running = vec![running_a];
    let mut restarted = false;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
    while let Some(event) = tokio::time::timeout_at(deadline, events.message())
        .await
        .expect("the run ends within 10 minutes")
        .unwrap()
    {
        let sampling_2 = matches!(
            &event.event,
            Some(pb::run_event::Event::Iteration(it))
                if it.iteration == 2 && it.status == pb::IterationStatus::Sampling as i32
        );
        if sampling_2 && !restarted {
            restarted = true;
            running.clear();
            let (again, r) = start_generator(port_of(&a), &checkpoints).await;
            assert_eq!(again, a);
            running.push(r);
            running.push(start_generator(port_of(&b), &checkpoints).await.1);
        }
    }
    assert!(restarted, "iteration 2 started sampling");
    let run = client
        .get_run(pb::GetRunRequest {
            run_id: run_id.to_string(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(run.status, pb::RunStatus::Done as i32, "{}", run.error);

    // Every sample of an iteration comes from the version the iteration pinned, and
    // iteration 2 sampled from iteration 1's version.
    let rows: Vec<(i32, String, i64)> = sqlx::query_as(
        "SELECT s.iteration, v.name, count(*) FROM samples s
         JOIN model_versions v ON v.id = s.model_version_id
         WHERE s.run_id = $1 GROUP BY 1, 2 ORDER BY 1, 2",
    )
    .bind(run_id)
    .fetch_all(db.store.pool())
    .await
    .unwrap();
    let pinned: Vec<(i32, Option<String>)> = sqlx::query_as(
        "SELECT i.iteration, v.name FROM iterations i
         LEFT JOIN model_versions v ON v.id = i.model_version_id
         WHERE i.run_id = $1 AND i.iteration > 0 ORDER BY 1",
    )
    .bind(run_id)
    .fetch_all(db.store.pool())
    .await
    .unwrap();
    assert_eq!(rows.len(), 2, "one version per iteration: {rows:?}");
    for ((iteration, version, _), (it, pin)) in rows.iter().zip(&pinned) {
        assert_eq!((iteration, Some(version)), (it, pin.as_ref()));
    }
    assert_eq!(rows[1].1, format!("{run_id}-it001"));

    // Both generators serve the run's last version.
    for g in [&a, &b] {
        assert_eq!(serving(g).await, format!("{run_id}-it002"), "{g}");
    }
    drop(running);
    let _ = std::fs::remove_dir_all(&root);
    db.drop_db().await;
}
