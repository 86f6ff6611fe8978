//! Whole runs through the three services: the loop (with a second run reusing the base answers), FLAN-T5 and LoRA.

use super::*;

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
        hir_model::formats::checkpoint::sha256_file(&fixture_model().join("model.safetensors"))
            .unwrap();
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
        hir_model::formats::checkpoint::sha256_file(&t5_fixture_model().join("model.safetensors"))
            .unwrap();
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
            hir_model::arch::lora::Adapter::read(dir, &candle_core::Device::Cpu).unwrap()
        })
        .collect();
    let base_digest = hir_model::formats::checkpoint::model_digest(&fixture_model()).unwrap();
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
