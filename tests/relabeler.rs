//! The relabeler against a real generator (the tiny Llama fixture, in process) and a real
//! Postgres (a fresh database per test).

use std::path::PathBuf;
use std::time::Duration;

use hir_core::run::RunConfig;
use hir_proto::pb;
use hir_proto::pb::relabeler_service_client::RelabelerServiceClient;
use hir_relabeler::config::RelabelerConfig;
use hir_store::{IterationStatus, NewRun, Store};
use hir_testkit::{generator_config, llama_fixture, Answers, KillOnDrop, Running, TestDb};
use tonic::{Code, Request};
use uuid::Uuid;

const TOKEN: &str = "relabel-token";

/// A fresh, migrated database; dropped by `drop_db`.
async fn fresh_db(name: &str) -> (String, Store) {
    let db = TestDb::create(&format!("relabeler_{name}")).await;
    (db.url, db.store)
}

async fn drop_db(url: &str) {
    hir_testkit::drop_database(url).await;
}

/// A BIG-bench folder with one multiple-choice task in the fixture's vocabulary.
fn tiny_bigbench(name: &str, examples: usize) -> PathBuf {
    let root = std::env::temp_dir().join(format!("hir-relabeler-bb-{name}-{}", std::process::id()));
    hir_testkit::tiny_task(&root, examples, Answers::Alternating)
}

/// Small knobs; no holdout or de-duplication, so every sample is batched.
fn run_config() -> RunConfig {
    RunConfig {
        samples_per_prompt: 2,
        max_new_tokens: 8,
        batch_size: 8,
        micro_batch_size: 8,
        epochs_per_iteration: 2,
        replay_holdout: 0.0,
        dedup_outputs: false,
        ..RunConfig::default()
    }
}

async fn create_run(store: &Store, bigbench: &std::path::Path, policy: &str) -> Uuid {
    let id = Uuid::new_v4();
    store
        .create_run(&NewRun {
            id,
            name: format!("test-{policy}"),
            policy: policy.into(),
            config: serde_json::to_value(run_config()).unwrap(),
        })
        .await
        .unwrap();
    let catalog = hir_core::task::Catalog::discover(bigbench).unwrap();
    let task = catalog.load("tiny_mc").unwrap();
    let task_id = hir_store::catalog::register(store, &task, 1).await.unwrap();
    store.add_run_tasks(id, &[task_id]).await.unwrap();
    id
}

async fn start_generator() -> (String, Running) {
    hir_testkit::spawn_generator(generator_config(llama_fixture())).await
}

fn relabeler_config(db: &str, generator: &str, bigbench: &std::path::Path) -> RelabelerConfig {
    RelabelerConfig {
        concurrency: 1,
        write_batch: 4,
        ..hir_testkit::relabeler_config(db, bigbench, vec![generator.into()], TOKEN)
    }
}

async fn start_relabeler(
    config: RelabelerConfig,
) -> (RelabelerServiceClient<tonic::transport::Channel>, Running) {
    let (addr, running) = hir_testkit::spawn_relabeler(config).await;
    (
        RelabelerServiceClient::connect(addr).await.unwrap(),
        running,
    )
}

fn authed<T>(m: T) -> Request<T> {
    hir_runtime::auth::with_bearer(m, Some(TOKEN))
}

/// Starts sampling iteration 1 of `run` and follows its progress stream to the end; returns
/// the last status.
async fn sample_to_end(
    client: &mut RelabelerServiceClient<tonic::transport::Channel>,
    run: Uuid,
) -> pb::SamplingStatus {
    client
        .start_sampling(authed(pb::StartSamplingRequest {
            run_id: run.to_string(),
            iteration: 1,
        }))
        .await
        .unwrap();
    let mut watch = client
        .watch_sampling(pb::GetSamplingRequest {
            run_id: run.to_string(),
            iteration: 1,
        })
        .await
        .unwrap()
        .into_inner();
    let mut last = None;
    while let Some(status) = watch.message().await.unwrap() {
        last = Some(status);
    }
    last.expect("at least one status")
}

/// Every stored sample of a run as comparable rows.
async fn sample_rows(store: &Store, run: Uuid) -> Vec<(i32, i32, String, Vec<i32>, bool, String)> {
    sqlx::query_as(
        "SELECT s.example_idx, s.sample_idx, s.output, s.output_tokens, s.correct, r.positive_instruction \
         FROM samples s JOIN relabels r ON r.sample_id = s.id WHERE s.run_id = $1 ORDER BY 1, 2",
    )
    .bind(run)
    .fetch_all(store.pool())
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_iteration_fills_samples_relabels_and_batches() {
    let (db, store) = fresh_db("iteration").await;
    let bigbench = tiny_bigbench("iteration", 20);
    let (generator, _g) = start_generator().await;
    let run = create_run(&store, &bigbench, "hir").await;
    let (mut client, _r) = start_relabeler(relabeler_config(&db, &generator, &bigbench)).await;

    let unauthenticated = client
        .start_sampling(pb::StartSamplingRequest {
            run_id: run.to_string(),
            iteration: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(unauthenticated.code(), Code::Unauthenticated);
    let last = sample_to_end(&mut client, run).await;
    assert_eq!(last.status, pb::IterationStatus::Sampled as i32, "{last:?}");

    // 20 examples: 16 train prompts x 2 samples, each with one relabel; 2 epochs of
    // batches of 8.
    let rows = sample_rows(&store, run).await;
    assert_eq!(rows.len(), 32);
    for (_, _, output, _, correct, positive) in &rows {
        let expected = if *correct {
            "Solve question with correct answer."
        } else {
            "Solve the question with wrong answer."
        };
        assert_eq!(positive, expected, "output {output:?}");
    }
    let status = client
        .get_sampling(pb::GetSamplingRequest {
            run_id: run.to_string(),
            iteration: 1,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (status.samples, status.status),
        (32, pb::IterationStatus::Sampled as i32)
    );
    assert_eq!(status.model_version, "base");
    let base = store.get_model_version_by_name("base").await.unwrap();
    assert_eq!(
        (base.run_id, base.iteration),
        (None, None),
        "a version first seen at a generator belongs to no run, so any run may replace it"
    );
    let batches: Vec<(i32, i64)> = sqlx::query_as(
        "SELECT batch_idx, samples FROM batches_consumed WHERE run_id = $1 ORDER BY 1",
    )
    .bind(run)
    .fetch_all(store.pool())
    .await
    .unwrap();
    assert_eq!(batches, (0..8).map(|i| (i, 8)).collect::<Vec<_>>());
    assert_eq!(
        store.get_iteration(run, 1).await.unwrap().status,
        IterationStatus::Sampled
    );
    let train_examples: std::collections::BTreeSet<i32> = rows.iter().map(|r| r.0).collect();
    let split = hir_core::split::Split::new(1, 20);
    assert_eq!(
        train_examples,
        split.train.iter().map(|&i| i as i32).collect()
    );

    // Starting a sampled iteration again changes nothing.
    client
        .start_sampling(authed(pb::StartSamplingRequest {
            run_id: run.to_string(),
            iteration: 1,
        }))
        .await
        .unwrap();
    assert_eq!(sample_rows(&store, run).await.len(), 32);
    drop_db(&db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sft_iteration_writes_each_gold_answer_once_and_samples_nothing() {
    let (db, store) = fresh_db("sft").await;
    let bigbench = tiny_bigbench("sft", 20);
    let run = create_run(&store, &bigbench, "sft").await;
    // The base version is pinned up front: no generator is asked for anything.
    let base = store
        .register_model_version(&hir_store::NewModelVersion {
            name: "base".into(),
            run_id: None,
            iteration: None,
            parent_id: None,
            checkpoint_uri: "file:///base".into(),
            sha256: "0".repeat(64),
            metrics: serde_json::json!({}),
        })
        .await
        .unwrap();
    store.ensure_iteration(run, 1).await.unwrap();
    store.pin_iteration_version(run, 1, base.id).await.unwrap();
    // A generator address nothing listens on: any request to it would fail the iteration.
    let dead = "http://127.0.0.1:9".to_string();
    let (mut client, _r) = start_relabeler(relabeler_config(&db, &dead, &bigbench)).await;
    let last = sample_to_end(&mut client, run).await;
    assert_eq!(last.status, pb::IterationStatus::Sampled as i32, "{last:?}");

    let catalog = hir_core::task::Catalog::discover(&bigbench).unwrap();
    let task = catalog.load("tiny_mc").unwrap();
    let split = hir_core::split::Split::new(1, 20);
    let rows = sample_rows(&store, run).await;
    // One sample per training prompt: the gold answer, correct, no token ids, kept under
    // the original instruction.
    assert_eq!(rows.len(), split.train.len());
    for (example, sample, output, tokens, correct, positive) in &rows {
        assert_eq!(*sample, 0);
        assert_eq!(output, &task.examples[*example as usize].answer.gold());
        assert!(tokens.is_empty() && *correct, "{output:?}");
        assert_eq!(positive, hir_core::prompt::DEFAULT_INSTRUCTION);
    }
    drop_db(&db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_relabeler_resumes_to_exactly_the_same_rows() {
    let (db, store) = fresh_db("resume").await;
    let bigbench = tiny_bigbench("resume", 400);
    let (generator, _g) = start_generator().await;

    // Reference: the same iteration, uninterrupted, in process.
    let reference = create_run(&store, &bigbench, "hir").await;
    let (mut client, _r) = start_relabeler(relabeler_config(&db, &generator, &bigbench)).await;
    sample_to_end(&mut client, reference).await;
    let expected = sample_rows(&store, reference).await;
    assert_eq!(expected.len(), 320 * 2);

    // The same work in a separate process, killed part-way, then restarted.
    let run = create_run(&store, &bigbench, "hir").await;
    store.ensure_iteration(run, 1).await.unwrap();
    store
        .advance_iteration(run, 1, IterationStatus::Sampling)
        .await
        .unwrap();
    let spawn = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_hir"))
            .args(["serve", "relabeler"])
            // DATABASE_URL (the test server) would override the configured store.
            .env("DATABASE_URL", &db)
            .env("HIR_RELABELER__DATABASE_URL", &db)
            .env("HIR_RELABELER__GENERATORS", format!("[\"{generator}\"]"))
            .env("HIR_RELABELER__BIGBENCH", &bigbench)
            .env("HIR_RELABELER__LISTEN", "127.0.0.1:0")
            .env("HIR_RELABELER__METRICS_LISTEN", "127.0.0.1:0")
            .env("HIR_RELABELER__CONCURRENCY", "1")
            .env("HIR_RELABELER__WRITE_BATCH", "4")
            .env("RUST_LOG", "warn")
            .spawn()
            .map(KillOnDrop)
            .expect("hir serve relabeler starts")
    };
    let count = |store: Store| async move {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM samples WHERE run_id = $1")
            .bind(run)
            .fetch_one(store.pool())
            .await
            .unwrap();
        n as usize
    };
    let mut child = spawn();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while count(store.clone()).await < 40 {
        if let Some(status) = child.0.try_wait().unwrap() {
            panic!("hir-relabeler exited early with {status}");
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the relabeler process stored nothing"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    child.0.kill().unwrap();
    child.0.wait().unwrap();
    let partial = count(store.clone()).await;
    assert!(
        partial < expected.len(),
        "killed after {partial} of {} samples",
        expected.len()
    );
    assert_eq!(
        store.get_iteration(run, 1).await.unwrap().status,
        IterationStatus::Sampling
    );

    let child = spawn();
    while store.get_iteration(run, 1).await.unwrap().status != IterationStatus::Sampled {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the restarted relabeler did not finish"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(child);
    assert_eq!(
        sample_rows(&store, run).await,
        expected,
        "nothing lost, nothing doubled, nothing different"
    );
    drop_db(&db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn score_and_feedback_validate_and_store() {
    let (db, store) = fresh_db("api").await;
    let bigbench = tiny_bigbench("api", 10);
    let (generator, _g) = start_generator().await;
    let mut config = relabeler_config(&db, &generator, &bigbench);
    config.max_output_bytes = 64;
    let (mut client, _r) = start_relabeler(config).await;

    let scored = client
        .score(pb::ScoreRequest {
            task: "tiny/mc".into(),
            example_index: 0,
            output: "(A)".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(scored.gold, "(A)");
    assert!(scored.score.unwrap().exact);
    for (req, field) in [
        (
            pb::ScoreRequest {
                task: "nope".into(),
                example_index: 0,
                output: "x".into(),
            },
            "task",
        ),
        (
            pb::ScoreRequest {
                task: "tiny_mc".into(),
                example_index: 10,
                output: "x".into(),
            },
            "example_index",
        ),
        (
            pb::ScoreRequest {
                task: "tiny_mc".into(),
                example_index: 0,
                output: "x".repeat(65),
            },
            "output",
        ),
    ] {
        let err = client.score(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(
            err.message().starts_with(&format!("{field}:")),
            "{}",
            err.message()
        );
    }

    let item = |id: &str, correct: bool| pb::FeedbackItem {
        external_id: id.into(),
        instruction: "Answer briefly.".into(),
        query: "Which is larger, 3 or 5?".into(),
        output: "3".into(),
        correct,
        answer: "3".into(),
    };
    let req = pb::SubmitFeedbackRequest {
        source: "chat".into(),
        policy: "hindsight_answer".into(),
        run_id: String::new(),
        items: vec![item("a", false), item("b", true)],
    };
    assert_eq!(
        client
            .submit_feedback(req.clone())
            .await
            .unwrap_err()
            .code(),
        Code::Unauthenticated
    );
    let r = client
        .submit_feedback(authed(req.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.stored, r.duplicates, r.skipped), (2, 0, 0));
    assert_eq!(
        r.relabels[0].positive_instruction,
        "Solve the question with answer 3."
    );
    assert_eq!(r.relabels[0].policy, "hindsight_answer");
    let again = client
        .submit_feedback(authed(req.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (again.stored, again.duplicates),
        (0, 2),
        "a resent item is stored once"
    );
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM feedback")
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(rows, 2);

    let mut no_instruction = req.clone();
    no_instruction.items[0].instruction = " ".into();
    let mut bad_policy = req.clone();
    bad_policy.policy = "ppo".into();
    let mut too_long = req.clone();
    too_long.items[1].output = "y".repeat(65);
    let mut no_source = req.clone();
    no_source.source = String::new();
    for (bad, field) in [
        (no_instruction, "items[0].instruction"),
        (bad_policy, "policy"),
        (too_long, "items[1].output"),
        (no_source, "source"),
    ] {
        let err = client.submit_feedback(authed(bad)).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{field}");
        assert!(
            err.message().starts_with(&format!("{field}:")),
            "{}",
            err.message()
        );
    }
    let farl = pb::SubmitFeedbackRequest {
        policy: "farl".into(),
        items: vec![item("c", false)],
        ..req
    };
    let r = client
        .submit_feedback(authed(farl))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (r.stored, r.skipped),
        (0, 1),
        "the filtering baseline drops wrong outputs"
    );

    let missing = pb::StartSamplingRequest {
        run_id: Uuid::new_v4().to_string(),
        iteration: 1,
    };
    assert_eq!(
        client
            .start_sampling(authed(missing))
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    let bad = pb::StartSamplingRequest {
        run_id: "not-a-uuid".into(),
        iteration: 1,
    };
    assert_eq!(
        client.start_sampling(authed(bad)).await.unwrap_err().code(),
        Code::InvalidArgument
    );
    drop_db(&db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_generator_is_retried_reported_and_finally_fails_the_iteration() {
    let (db, store) = fresh_db("dead").await;
    let bigbench = tiny_bigbench("dead", 10);
    let run = create_run(&store, &bigbench, "hir").await;
    let mut config = relabeler_config(&db, "http://127.0.0.1:1", &bigbench);
    config.retry_initial_ms = 20;
    config.retry_give_up_secs = 2;
    let (addr, _stop) = hir_testkit::spawn_relabeler(config).await;
    let channel = tonic::transport::Channel::from_shared(addr)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = RelabelerServiceClient::new(channel.clone());
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let check = |mut h: tonic_health::pb::health_client::HealthClient<
        tonic::transport::Channel,
    >| async move {
        h.check(tonic_health::pb::HealthCheckRequest {
            service: hir_relabeler::GENERATOR_HEALTH.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status
    };
    assert_eq!(
        check(health.clone()).await,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    client
        .start_sampling(authed(pb::StartSamplingRequest {
            run_id: run.to_string(),
            iteration: 1,
        }))
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while check(health.clone()).await
        != tonic_health::pb::health_check_response::ServingStatus::NotServing as i32
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "health never reported the generator down"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut watch = client
        .watch_sampling(pb::GetSamplingRequest {
            run_id: run.to_string(),
            iteration: 1,
        })
        .await
        .unwrap()
        .into_inner();
    let mut last = None;
    while let Some(s) = watch.message().await.unwrap() {
        last = Some(s);
    }
    let last = last.unwrap();
    assert_eq!(last.status, pb::IterationStatus::Failed as i32, "{last:?}");
    assert!(last.error.contains("generator"), "{}", last.error);
    let it = store.get_iteration(run, 1).await.unwrap();
    assert_eq!(it.status, IterationStatus::Failed);
    let samples: i64 = sqlx::query_scalar("SELECT count(*) FROM samples")
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(samples, 0);
    health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap();
    drop_db(&db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relabelers_on_one_iteration_store_each_sample_once() {
    let (db, store) = fresh_db("replicas").await;
    let bigbench = tiny_bigbench("replicas", 40);
    let (generator, _g) = start_generator().await;
    let run = create_run(&store, &bigbench, "hir").await;
    let (mut a, _ra) = start_relabeler(relabeler_config(&db, &generator, &bigbench)).await;
    let (mut b, _rb) = start_relabeler(relabeler_config(&db, &generator, &bigbench)).await;
    let (first, second) = tokio::join!(sample_to_end(&mut a, run), sample_to_end(&mut b, run));
    for last in [first, second] {
        assert_eq!(last.status, pb::IterationStatus::Sampled as i32, "{last:?}");
    }
    assert_eq!(sample_rows(&store, run).await.len(), 32 * 2);
    assert_eq!(
        store.get_iteration(run, 1).await.unwrap().status,
        IterationStatus::Sampled
    );
    drop_db(&db).await;
}

/// A relabeler with no reachable generator: feedback and scoring need none.
async fn start_api_relabeler(
    name: &str,
) -> (
    String,
    Store,
    RelabelerServiceClient<tonic::transport::Channel>,
    Running,
) {
    let (db, store) = fresh_db(name).await;
    let bigbench = tiny_bigbench(name, 10);
    let (client, running) =
        start_relabeler(relabeler_config(&db, "http://127.0.0.1:1", &bigbench)).await;
    (db, store, client, running)
}

/// `items` in an order drawn from `seed` (Fisher-Yates).
fn shuffled<T: Clone>(items: &[T], seed: u64) -> Vec<T> {
    let mut out = items.to_vec();
    let mut rng = hir_core::rng::SplitMix64::new(seed);
    for i in (1..out.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        out.swap(i, j);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_feedback_with_the_same_items_in_any_order_stores_each_once() {
    let (db, store, client, _r) = start_api_relabeler("feedback_race").await;
    // Several rounds, each of 8 calls released together, with shuffled copies of the same
    // 200 new items: without one lock order the calls deadlock each other.
    const ROUNDS: usize = 5;
    let mut expected: Vec<(String, i64)> = Vec::new();
    for round in 0..ROUNDS {
        let items: Vec<pb::FeedbackItem> = (0..200)
            .map(|i| pb::FeedbackItem {
                external_id: format!("round-{round}-item-{i:03}"),
                instruction: "Answer briefly.".into(),
                query: format!("What is {i} + 1?"),
                output: format!("{}", i + 1),
                correct: i % 2 == 0,
                answer: format!("{}", i + 1),
            })
            .collect();
        expected.extend(items.iter().map(|i| (i.external_id.clone(), 1)));
        let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(8));
        let calls: Vec<_> = (0..8u64)
            .map(|k| {
                let mut client = client.clone();
                let barrier = barrier.clone();
                let request = pb::SubmitFeedbackRequest {
                    source: "chat".into(),
                    policy: "hir".into(),
                    run_id: String::new(),
                    items: shuffled(&items, (round as u64) * 8 + k + 1),
                };
                tokio::spawn(async move {
                    barrier.wait().await;
                    client.submit_feedback(authed(request)).await
                })
            })
            .collect();
        let (mut stored, mut duplicates) = (0, 0);
        for call in calls {
            let r = call
                .await
                .unwrap()
                .unwrap_or_else(|s| panic!("round {round}: {:?}: {}", s.code(), s.message()))
                .into_inner();
            stored += r.stored;
            duplicates += r.duplicates;
        }
        assert_eq!(
            (stored, duplicates),
            (200, 7 * 200),
            "round {round}: each item stored by exactly one call"
        );
    }
    let rows: Vec<(String, i64)> =
        sqlx::query_as("SELECT external_id, count(*) FROM feedback GROUP BY 1 ORDER BY 1")
            .fetch_all(store.pool())
            .await
            .unwrap();
    expected.sort();
    assert_eq!(rows, expected);
    drop_db(&db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_the_store_cannot_hold_is_refused_naming_the_field() {
    let (db, store, mut client, _r) = start_api_relabeler("bad_text").await;
    let item = |id: &str| pb::FeedbackItem {
        external_id: id.into(),
        instruction: "Answer briefly.".into(),
        query: "Which is larger, 3 or 5?".into(),
        output: "5".into(),
        correct: true,
        answer: "5".into(),
    };
    let good = pb::SubmitFeedbackRequest {
        source: "chat".into(),
        policy: "hindsight_answer".into(),
        run_id: String::new(),
        items: (0..4).map(|i| item(&format!("id-{i}"))).collect(),
    };
    let with = |f: &dyn Fn(&mut pb::SubmitFeedbackRequest)| {
        let mut r = good.clone();
        f(&mut r);
        r
    };
    let cases: Vec<(pb::SubmitFeedbackRequest, &str)> = vec![
        (
            with(&|r| r.items[3].output = "fi\0ve".into()),
            "items[3].output",
        ),
        (with(&|r| r.source = "ch\0at".into()), "source"),
        (with(&|r| r.items[1].query = "\0".into()), "items[1].query"),
        (
            with(&|r| r.items[2].instruction = "Answer\0".into()),
            "items[2].instruction",
        ),
        (
            with(&|r| r.items[0].answer = "5\0".into()),
            "items[0].answer",
        ),
        (
            with(&|r| r.items[0].external_id = "id\0".into()),
            "items[0].external_id",
        ),
        (
            with(&|r| r.items[0].external_id = "x".repeat(1 << 20)),
            "items[0].external_id",
        ),
        (with(&|r| r.source = "s".repeat(257)), "source"),
        (
            with(&|r| r.items[1].instruction = "i".repeat(1 << 20)),
            "items[1].instruction",
        ),
        (
            with(&|r| r.items[2].query = "q".repeat((64 << 10) + 1)),
            "items[2].query",
        ),
        (
            with(&|r| r.items[3].output = "o".repeat((64 << 10) + 1)),
            "items[3].output",
        ),
        (
            with(&|r| r.items[0].answer = "a".repeat(257)),
            "items[0].answer",
        ),
    ];
    for (request, field) in cases {
        let err = client.submit_feedback(authed(request)).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
        assert!(
            err.message().starts_with(&format!("{field}:")),
            "{field}: {}",
            err.message()
        );
        assert!(err.message().len() < 300, "{field}: {}", err.message());
    }
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM feedback")
        .fetch_one(store.pool())
        .await
        .unwrap();
    assert_eq!(rows, 0, "a refused call stores nothing");
    // The limits are inclusive.
    let at_limits = with(&|r| {
        r.source = "s".repeat(256);
        r.items[0].external_id = "x".repeat(256);
        r.items[0].instruction = "i".repeat(4 << 10);
        r.items[0].query = "q".repeat(64 << 10);
        r.items[0].output = "o".repeat(64 << 10);
    });
    let r = client
        .submit_feedback(authed(at_limits))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.stored, 4);

    for (request, field) in [
        (
            pb::ScoreRequest {
                task: "tiny_mc".into(),
                example_index: 0,
                output: "(A)\0".into(),
            },
            "output",
        ),
        (
            pb::ScoreRequest {
                task: "tiny\0mc".into(),
                example_index: 0,
                output: "(A)".into(),
            },
            "task",
        ),
        (
            pb::ScoreRequest {
                task: "t".repeat(20_000),
                example_index: 0,
                output: "(A)".into(),
            },
            "task",
        ),
    ] {
        let err = client.score(request).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
        assert!(
            err.message().starts_with(&format!("{field}:")),
            "{field}: {}",
            err.message()
        );
        assert!(err.message().len() < 300, "{field}: {}", err.message());
    }
    drop_db(&db).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_values_are_echoed_bounded() {
    let (db, _store, mut client, _r) = start_api_relabeler("echo").await;
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
    let start = pb::StartSamplingRequest {
        run_id: huge.clone(),
        iteration: 1,
    };
    check(
        "StartSampling",
        client.start_sampling(authed(start)).await.unwrap_err(),
    );
    let get = pb::GetSamplingRequest {
        run_id: huge.clone(),
        iteration: 1,
    };
    check(
        "GetSampling",
        client.get_sampling(get.clone()).await.unwrap_err(),
    );
    check(
        "WatchSampling",
        client.watch_sampling(get).await.unwrap_err(),
    );
    let feedback = pb::SubmitFeedbackRequest {
        source: "chat".into(),
        policy: "hir".into(),
        run_id: huge.clone(),
        items: vec![pb::FeedbackItem {
            external_id: "a".into(),
            instruction: "Answer.".into(),
            query: "Q".into(),
            output: "A".into(),
            correct: true,
            answer: String::new(),
        }],
    };
    check(
        "SubmitFeedback run_id",
        client
            .submit_feedback(authed(feedback.clone()))
            .await
            .unwrap_err(),
    );
    check(
        "SubmitFeedback policy",
        client
            .submit_feedback(authed(pb::SubmitFeedbackRequest {
                run_id: String::new(),
                policy: huge.clone(),
                ..feedback
            }))
            .await
            .unwrap_err(),
    );
    drop_db(&db).await;
}
