//! Runs that survive a killed trainer, a late relabeler or a stop, and one that fails with its reason.

use super::*;

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
