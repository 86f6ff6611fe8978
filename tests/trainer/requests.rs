//! What StartRun refuses, and how it echoes what it was given.

use super::*;

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
