//! End to end: the three services over real sockets (the tiny Llama fixture), a real
//! Postgres, and the `hir` command driving them as a user would: `hir health`, `hir run
//! --watch`, `hir status`, `hir checkpoints`, `hir eval`, `hir report`, and the one-line
//! errors of bad invocations. A second test runs the same seeded run twice, sampling one
//! prompt at a time and eight at a time, and finds the same rows and weights.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use hir_store::Store;
use hir_testkit::{Answers, Running, TestDb};

const TOKEN: &str = "e2e-token";

fn fixture_model() -> PathBuf {
    hir_testkit::llama_fixture()
}

/// A BIG-bench folder with one task in the fixture's vocabulary: 16 train, 4 test examples.
fn tiny_bigbench(root: &Path) -> PathBuf {
    hir_testkit::tiny_task(&root.join("bigbench"), 20, Answers::First)
}

/// The three services' addresses; dropping `stops` stops them.
struct Services {
    generator: String,
    relabeler: String,
    trainer: String,
    stops: Vec<Running>,
}

/// Generator, relabeler (sampling `concurrency` prompts at once) and trainer on port 0,
/// over `db`, with checkpoints and state under `root`.
async fn start_services(db: &str, root: &Path, bigbench: &Path, concurrency: usize) -> Services {
    let checkpoints = root.join("checkpoints");
    std::fs::create_dir_all(&checkpoints).unwrap();
    // The generator swaps by reference from the trainer's checkpoint folder.
    let mut g = hir_testkit::generator_config(fixture_model());
    g.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    g.auth.token = Some(TOKEN.into());
    g.swap.checkpoint_root = Some(checkpoints.clone());
    g.swap.staging_dir = root.join("staging");
    let (generator, stop_g) = hir_testkit::spawn_generator(g).await;

    let (relabeler, stop_r) =
        hir_testkit::spawn_relabeler(hir_relabeler::config::RelabelerConfig {
            concurrency,
            ..hir_testkit::relabeler_config(db, bigbench, vec![generator.clone()], TOKEN)
        })
        .await;
    let (trainer, stop_t) = hir_testkit::spawn_trainer(hir_testkit::trainer_config(
        db,
        bigbench,
        &relabeler,
        vec![generator.clone()],
        TOKEN,
        root,
    ))
    .await;
    Services {
        generator,
        relabeler,
        trainer,
        stops: vec![stop_t, stop_r, stop_g],
    }
}

fn hir(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hir"))
        .args(args)
        .env_remove("DATABASE_URL")
        .env("HIR_TOKEN", TOKEN)
        .env("RUST_LOG", "warn")
        .output()
        .expect("hir runs")
}

fn stdout(o: &Output) -> String {
    assert!(
        o.status.success(),
        "hir failed: {}\n{}",
        String::from_utf8_lossy(&o.stderr),
        String::from_utf8_lossy(&o.stdout)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A failure: non-zero exit and one line on stderr that contains `needle`.
fn fails_with(o: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "expected a failure, got {err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(err.contains(needle), "{needle:?} in {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_drives_one_full_iteration_across_the_three_services() {
    let test_db = TestDb::create("e2e").await;
    let db = test_db.url.clone();
    let root = std::env::temp_dir().join(format!("hir-e2e-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let bigbench = tiny_bigbench(&root);
    let Services {
        generator,
        relabeler,
        trainer,
        stops: _stops,
    } = start_services(&db, &root, &bigbench, 16).await;
    let (gen, rel, tra) = (generator.clone(), relabeler.clone(), trainer.clone());
    let bb = bigbench.to_string_lossy().into_owned();
    let model = fixture_model().to_string_lossy().into_owned();
    let out_dir = root.join("reports").to_string_lossy().into_owned();
    let results = tokio::task::spawn_blocking(move || {
        for addr in [&gen, &rel, &tra] {
            stdout(&hir(&["health", "--addr", addr]));
        }
        let run = hir(&[
            "run",
            "--trainer",
            &tra,
            "--task",
            "tiny_mc",
            "--model",
            &model,
            "--iterations",
            "1",
            "--samples-per-prompt",
            "2",
            "--batch-size",
            "8",
            "--micro-batch-size",
            "4",
            "--epochs",
            "1",
            "--max-new-tokens",
            "4",
            // Every sample trained, so the counts below are exact.
            "--replay-holdout",
            "0",
            "--no-dedup",
            "--watch",
            "--json",
        ]);
        let lines: Vec<serde_json::Value> = stdout(&run)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let run_id = lines[0]["run_id"].as_str().unwrap().to_string();
        let last = lines.last().unwrap().clone();
        let status = stdout(&hir(&["status", "--trainer", &tra, &run_id]));
        let checkpoints = stdout(&hir(&[
            "checkpoints",
            "--trainer",
            &tra,
            "--run-id",
            &run_id,
        ]));
        let eval = stdout(&hir(&[
            "eval",
            "--generator",
            &gen,
            "--task",
            "tiny_mc",
            "--bigbench",
            &bb,
            "--max-new-tokens",
            "4",
            "--json",
        ]));
        let report = stdout(&hir(&[
            "report",
            "--trainer",
            &tra,
            "--run",
            &run_id,
            "--out",
            &out_dir,
        ]));
        // Bad invocations: one line, non-zero.
        fails_with(
            &hir(&[
                "status",
                "--trainer",
                &tra,
                "00000000-0000-0000-0000-000000000000",
            ]),
            "not found",
        );
        fails_with(&hir(&["status", "--trainer", &tra, "nope"]), "run_id");
        fails_with(
            &hir(&["status", "--trainer", "http://127.0.0.1:1", &run_id]),
            "cannot reach the trainer",
        );
        fails_with(
            &Command::new(env!("CARGO_BIN_EXE_hir"))
                .args([
                    "run",
                    "--trainer",
                    &tra,
                    "--task",
                    "tiny_mc",
                    "--model",
                    &model,
                ])
                .env_remove("HIR_TOKEN")
                .output()
                .unwrap(),
            "--token",
        );
        (run_id, last, status, checkpoints, eval, report)
    })
    .await
    .unwrap();
    let (run_id, last, status, checkpoints_out, eval, report) = results;

    assert_eq!(last["status"], "done", "{last}");
    let iterations = last["iterations"].as_array().unwrap();
    assert_eq!(iterations.len(), 2, "base evaluation and one iteration");
    assert_eq!(iterations[1]["samples"], 16 * 2);
    assert_eq!(iterations[1]["steps"], 4, "32 samples in batches of 8");
    assert!(status.contains("| 1 | done |"), "{status}");
    let version = format!("{run_id}-it001");
    assert!(checkpoints_out.contains(&version), "{checkpoints_out}");
    let eval: serde_json::Value = serde_json::from_str(eval.trim()).unwrap();
    assert_eq!(
        eval["version"],
        version.as_str(),
        "the generator serves the new version"
    );
    assert_eq!(eval["examples"], 4);
    assert!(report.contains("report.md"), "{report}");
    let md = std::fs::read_to_string(root.join("reports").join(&run_id).join("report.md")).unwrap();
    assert!(
        md.contains("accuracy.svg") && md.contains("| 1 | done |"),
        "{md}"
    );

    // Rows with the right counts.
    let store = Store::connect(&db).await.unwrap();
    let run_uuid: uuid::Uuid = run_id.parse().unwrap();
    let count = |sql: &'static str| {
        let store = store.clone();
        async move {
            let n: i64 = sqlx::query_scalar(sql)
                .bind(run_uuid)
                .fetch_one(store.pool())
                .await
                .unwrap();
            n
        }
    };
    assert_eq!(
        count("SELECT count(*) FROM samples WHERE run_id = $1").await,
        32
    );
    assert_eq!(
        count("SELECT count(*) FROM relabels r JOIN samples s ON s.id = r.sample_id WHERE s.run_id = $1").await,
        32
    );
    assert_eq!(
        count("SELECT count(*) FROM training_batches WHERE run_id = $1 AND status = 'done'").await,
        4
    );
    assert_eq!(
        count("SELECT count(*) FROM eval_results WHERE run_id = $1").await,
        2 * 4
    );
    assert_eq!(
        count("SELECT count(*) FROM model_versions WHERE run_id = $1").await,
        1
    );
    store.pool().close().await;
    let _ = std::fs::remove_dir_all(&root);
    test_db.drop_db().await;
}

/// Every stored number of a run that must repeat: samples, training losses, evaluation
/// outputs and accuracies, and the SHA-256 of the last checkpoint's weights.
async fn run_fingerprint(store: &Store, run_id: uuid::Uuid) -> serde_json::Value {
    let samples: Vec<(i32, i32, i32, String, Vec<i32>)> = sqlx::query_as(
        "SELECT iteration, example_idx, sample_idx, output, output_tokens FROM samples
         WHERE run_id = $1 ORDER BY iteration, example_idx, sample_idx",
    )
    .bind(run_id)
    .fetch_all(store.pool())
    .await
    .unwrap();
    let losses: Vec<(i32, i32, Option<f64>)> = sqlx::query_as(
        "SELECT iteration, batch_idx, (progress->>'loss')::float8 FROM training_batches
         WHERE run_id = $1 ORDER BY iteration, batch_idx",
    )
    .bind(run_id)
    .fetch_all(store.pool())
    .await
    .unwrap();
    let evals: Vec<(Option<i32>, i32, String, bool, bool)> = sqlx::query_as(
        "SELECT iteration, example_idx, output, correct, correct_extracted FROM eval_results
         WHERE run_id = $1 ORDER BY iteration, example_idx",
    )
    .bind(run_id)
    .fetch_all(store.pool())
    .await
    .unwrap();
    let last: String = sqlx::query_scalar(
        "SELECT checkpoint_uri FROM model_versions WHERE run_id = $1
         ORDER BY iteration DESC LIMIT 1",
    )
    .bind(run_id)
    .fetch_one(store.pool())
    .await
    .unwrap();
    let folder = PathBuf::from(last.trim_start_matches("file://"));
    let digest = hir_model::formats::checkpoint::sha256_file(&folder.join("model.safetensors"))
        .unwrap_or_else(|e| panic!("{}: {e}", folder.display()));
    serde_json::json!({
        "samples": samples, "losses": losses, "evals": evals, "weights_sha256": digest,
    })
}

/// One seeded run of two iterations on fresh services sampling `concurrency` prompts at once.
async fn seeded_run(tag: &str, concurrency: usize) -> serde_json::Value {
    let test_db = TestDb::create(tag).await;
    let db = test_db.url.clone();
    let root = std::env::temp_dir().join(format!("hir-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let bigbench = tiny_bigbench(&root);
    let services = start_services(&db, &root, &bigbench, concurrency).await;
    let model = fixture_model().to_string_lossy().into_owned();
    let tra = services.trainer.clone();
    let out = tokio::task::spawn_blocking(move || {
        stdout(&hir(&[
            "run",
            "--trainer",
            &tra,
            "--task",
            "tiny_mc",
            "--model",
            &model,
            "--iterations",
            "2",
            "--samples-per-prompt",
            "3",
            "--batch-size",
            "6",
            "--micro-batch-size",
            "3",
            "--epochs",
            "2",
            "--max-new-tokens",
            "5",
            "--seed",
            "7",
            "--watch",
            "--json",
        ]))
    })
    .await
    .unwrap();
    let last: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(last["status"], "done", "{last}");
    let run_id: uuid::Uuid = last["run_id"].as_str().unwrap().parse().unwrap();
    let store = Store::connect(&db).await.unwrap();
    let mut print = run_fingerprint(&store, run_id).await;
    print["accuracy"] = serde_json::json!(last["iterations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["eval"].clone())
        .collect::<Vec<_>>());
    store.pool().close().await;
    drop(services);
    let _ = std::fs::remove_dir_all(&root);
    test_db.drop_db().await;
    print
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seeded_run_repeats_exactly_whatever_the_sampling_concurrency() {
    let one = seeded_run("repeat_one", 1).await;
    let eight = seeded_run("repeat_eight", 8).await;
    assert_eq!(one["samples"].as_array().unwrap().len(), 16 * 3 * 2);
    assert!(
        one["losses"].as_array().unwrap().len() >= 4,
        "{}",
        one["losses"]
    );
    for key in ["samples", "losses", "evals", "accuracy", "weights_sha256"] {
        assert_eq!(
            one[key], eight[key],
            "{key} differs between concurrency 1 and 8"
        );
    }
}
