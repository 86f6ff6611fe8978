//! The `hir` binary as users call it: outputs, exit codes and error messages.

use std::path::PathBuf;
use std::process::{Command, Output};

fn hir(args: &[&str]) -> Output {
    let data = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../data/bigbench");
    Command::new(env!("CARGO_BIN_EXE_hir"))
        .env("HIR_BIGBENCH", data)
        .args(args)
        .output()
        .expect("hir runs")
}

fn ok_json(args: &[&str]) -> serde_json::Value {
    let out = hir(args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("stdout is JSON")
}

fn fails_with(args: &[&str], needles: &[&str]) {
    let out = hir(args);
    assert!(!out.status.success(), "{args:?} should fail");
    let stderr = String::from_utf8_lossy(&out.stderr);
    for needle in needles {
        assert!(
            stderr.contains(needle),
            "{args:?}: `{needle}` not in: {stderr}"
        );
    }
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn list_shows_the_twelve_tasks() {
    let tasks = ok_json(&["tasks", "list", "--json"]);
    let tasks = tasks.as_array().unwrap();
    assert_eq!(tasks.len(), 12);
    let tso3 = tasks
        .iter()
        .find(|t| t["name"] == "tracking_shuffled_objects_three_objects")
        .unwrap();
    assert_eq!(tso3["examples"], 750);
    assert_eq!(tso3["kind"], "multiple_choice");
    let table = hir(&["tasks", "list"]);
    let table = String::from_utf8_lossy(&table.stdout).to_string();
    let row = table
        .lines()
        .find(|l| l.starts_with("word_sorting "))
        .expect("word_sorting row");
    assert_eq!(
        row.split_whitespace().collect::<Vec<_>>(),
        ["word_sorting", "1900", "generative"]
    );
}

#[test]
fn split_prints_the_reference_permutation() {
    let split = ok_json(&[
        "tasks",
        "split",
        "--task",
        "logical_deduction/three_objects",
        "--json",
    ]);
    let train: Vec<u64> = split["train"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert_eq!(train.len(), 240);
    assert_eq!(split["test"].as_array().unwrap().len(), 60);
    assert_eq!(train[..8], [189, 123, 185, 213, 106, 127, 176, 73]);
    let other_seed = ok_json(&[
        "tasks",
        "split",
        "--task",
        "logical_deduction_three_objects",
        "--seed",
        "2",
        "--json",
    ]);
    assert_ne!(other_seed["train"], split["train"]);
}

#[test]
fn prompt_prints_prompt_and_target() {
    let p = ok_json(&[
        "tasks",
        "prompt",
        "--task",
        "tracking_shuffled_objects_three_objects",
        "--index",
        "0",
        "--json",
    ]);
    assert_eq!(p["target"], "(C)");
    let prompt = p["prompt"].as_str().unwrap();
    assert!(
        prompt.starts_with("Solve the question with correct answer.\n\nQ: Alice, Bob, and Claire")
    );
    assert!(prompt.ends_with("(C) blue ball.\nA:"));
    let eval = ok_json(&[
        "tasks",
        "prompt",
        "--task",
        "tracking_shuffled_objects_three_objects",
        "--index",
        "0",
        "--variant",
        "eval",
        "--json",
    ]);
    assert!(eval["prompt"]
        .as_str()
        .unwrap()
        .contains("answer.\n\n\nQ: "));
}

#[test]
fn score_reports_both_scores() {
    let s = ok_json(&[
        "score",
        "--task",
        "object_counting",
        "--index",
        "0",
        "--output",
        "three",
        "--json",
    ]);
    assert_eq!(
        (s["exact"].as_bool(), s["extracted"].as_bool()),
        (Some(false), Some(true))
    );
    let gold = s["gold"].as_str().unwrap().to_string();
    let s = ok_json(&[
        "score",
        "--task",
        "object_counting",
        "--index",
        "0",
        "--output",
        &gold,
        "--json",
    ]);
    assert_eq!(
        (s["exact"].as_bool(), s["extracted"].as_bool()),
        (Some(true), Some(true))
    );
}

#[test]
fn bad_input_fails_with_a_clear_message() {
    fails_with(
        &["tasks", "prompt", "--task", "no_such_task", "--index", "0"],
        &["unknown task `no_such_task`", "hir tasks list"],
    );
    fails_with(
        &[
            "tasks",
            "prompt",
            "--task",
            "penguins_in_a_table",
            "--index",
            "149",
        ],
        &[
            "penguins_in_a_table",
            "149 examples",
            "index 149 is out of range",
        ],
    );
    fails_with(
        &["tasks", "list", "--bigbench", "/nonexistent/dir"],
        &["cannot read /nonexistent/dir"],
    );
    fails_with(
        &["score", "--task", "object_counting", "--index", "0"],
        &["--output"],
    );
    fails_with(
        &["tasks", "split", "--task", "word_sorting", "--seed=-1"],
        &["invalid value '-1' for '--seed <SEED>'"],
    );
}

#[test]
fn a_malformed_task_file_is_named() {
    let dir = std::env::temp_dir().join(format!("hir-cli-bad-{}", std::process::id()));
    let task_dir = dir.join("broken/sub");
    std::fs::create_dir_all(&task_dir).unwrap();
    std::fs::write(
        task_dir.join("task.json"),
        r#"{"examples":[{"input":"q","target_scores":{"a":0}}]}"#,
    )
    .unwrap();
    let root = dir.to_str().unwrap();
    fails_with(
        &["tasks", "list", "--bigbench", root],
        &[
            "broken/sub/task.json",
            "task `broken_sub`, example 0, field `target_scores`",
        ],
    );
    fails_with(
        &[
            "tasks",
            "prompt",
            "--bigbench",
            root,
            "--task",
            "broken/sub",
            "--index",
            "0",
        ],
        &["no option has score 1"],
    );
    std::fs::write(task_dir.join("task.json"), "[1, 2").unwrap();
    fails_with(
        &["tasks", "list", "--bigbench", root],
        &["is not a BIG-bench JSON task"],
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn migrate_reports_an_unreachable_database() {
    let out = Command::new(env!("CARGO_BIN_EXE_hir"))
        .args([
            "migrate",
            "--database-url",
            "postgres://postgres@127.0.0.1:1/none",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert!(stderr.contains("127.0.0.1"), "{stderr}");
}

#[test]
fn migrate_creates_the_schema_and_is_idempotent() {
    use sqlx::{Connection, Executor, PgConnection, Row};
    let admin = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let name = format!("hir_cli_migrate_{}", std::process::id());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let url = runtime.block_on(async {
        let mut conn = PgConnection::connect(&admin)
            .await
            .expect("DATABASE_URL reaches a Postgres superuser");
        conn.execute(format!("DROP DATABASE IF EXISTS {name}").as_str())
            .await
            .unwrap();
        conn.execute(format!("CREATE DATABASE {name}").as_str())
            .await
            .unwrap();
        let base = admin
            .rsplit_once('/')
            .map(|(base, _)| base)
            .unwrap()
            .to_string();
        format!("{base}/{name}")
    });
    for _ in 0..2 {
        let out = Command::new(env!("CARGO_BIN_EXE_hir"))
            .args(["migrate", "--database-url", &url])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("schema up to date"));
    }
    runtime.block_on(async {
        let mut conn = PgConnection::connect(&url).await.unwrap();
        let views: i64 = conn
            .fetch_one("SELECT count(*) FROM information_schema.views WHERE table_name IN ('sample_details','iteration_accuracy','eval_accuracy','batches_consumed')")
            .await
            .unwrap()
            .get(0);
        assert_eq!(views, 4);
        conn.close().await.unwrap();
        let mut admin_conn = PgConnection::connect(&admin).await.unwrap();
        admin_conn.execute(format!("DROP DATABASE {name}").as_str()).await.unwrap();
    });
}

fn tiny_model() -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../hir-model/tests/fixtures/llama")
        .to_string_lossy()
        .into_owned()
}

#[test]
fn model_info_describes_a_model_folder() {
    let info = ok_json(&["model", "info", &tiny_model(), "--json"]);
    assert_eq!(info["architecture"], "llama");
    assert_eq!(info["vocab_size"], 64);
    assert_eq!(info["context_length"], 128);
    fails_with(&["model", "info", "/no/such/model"], &["/no/such/model"]);
}

#[test]
fn generate_samples_reproducibly() {
    let model = tiny_model();
    let args = [
        "generate",
        "--model",
        &model,
        "--prompt",
        "w2 w3 w4",
        "--n",
        "3",
        "--temperature",
        "1",
        "--seed",
        "9",
        "--max-new-tokens",
        "8",
        "--json",
    ];
    let run = || {
        let out = hir(&args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let first = run();
    assert_eq!(first.lines().count(), 3);
    for line in first.lines() {
        let sample: serde_json::Value = serde_json::from_str(line).unwrap();
        assert!(sample["tokens"].as_u64().unwrap() <= 8);
    }
    assert_eq!(first, run(), "the same seed gives the same samples");
    fails_with(
        &[
            "generate",
            "--model",
            &model,
            "--prompt",
            "w2",
            "--temperature=-1",
        ],
        &["--temperature must be finite and >= 0"],
    );
}

#[test]
fn a_flan_t5_folder_has_info_and_generates() {
    let model = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../hir-model/tests/fixtures/t5")
        .to_string_lossy()
        .into_owned();
    let info = ok_json(&["model", "info", &model, "--json"]);
    assert_eq!(info["architecture"], "t5");
    assert_eq!(info["vocab_size"], 64);
    assert_eq!(info["eos_token_ids"], serde_json::json!([1]));
    let out = hir(&[
        "generate",
        "--model",
        &model,
        "--prompt",
        "w5 w6 w7",
        "--n",
        "2",
        "--temperature",
        "0",
        "--max-new-tokens",
        "6",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["text"], lines[1]["text"], "greedy samples agree");
    assert!(lines[0]["tokens"].as_u64().unwrap() <= 6);
}
