//! Write throughput of the relabel store: bulk API vs. single-row INSERTs.
//!
//! ```text
//! DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres \
//!     cargo bench -p hir-store --bench write -- --rows 100000 --single-rows 20000
//! ```
//!
//! Creates a scratch database `hir_bench_<pid>` on `DATABASE_URL`'s server,
//! migrates it, then
//!
//! 1. writes `--rows` scored samples (env `HIR_BENCH_ROWS`, default 100 000),
//!    each with one relabel, through [`Store::insert_scored_samples`] in calls
//!    of [`CALL_ROWS`] samples;
//! 2. writes `--single-rows` samples (env `HIR_BENCH_SINGLE_ROWS`, default
//!    20 000) of the same shape with one `INSERT` per sample and one per
//!    relabel, each its own autocommitted statement, into another iteration
//!    of the same run.
//!
//! It prints samples/s and rows/s (a sample plus its relabel is two rows) for
//! both, and drops the scratch database even when a step fails.

use hir_store::{
    NewExample, NewModelVersion, NewRelabel, NewRun, NewScoredSample, NewTask, SplitSide, Store,
    TaskKind,
};
use serde_json::json;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection};
use std::str::FromStr;
use std::time::Instant;
use uuid::Uuid;

/// Samples per `insert_scored_samples` call in the bulk path.
const CALL_ROWS: usize = 5_000;
/// Examples in the scratch task; samples cycle over them.
const EXAMPLES: i32 = 1_000;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Sizes of the two phases.
struct Config {
    bulk_rows: usize,
    single_rows: usize,
}

/// Throughput of one phase.
struct Measured {
    samples: usize,
    seconds: f64,
}

impl Measured {
    fn samples_per_sec(&self) -> f64 {
        self.samples as f64 / self.seconds
    }

    fn rows_per_sec(&self) -> f64 {
        2.0 * self.samples_per_sec()
    }
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let config = parse_args()?;
    let url = std::env::var("DATABASE_URL")
        .map_err(|_| "set DATABASE_URL, e.g. postgres://postgres@127.0.0.1:5432/postgres")?;
    let server = PgConnectOptions::from_str(&url)?;
    let scratch = format!("hir_bench_{}", std::process::id());

    let mut admin = server.connect().await?;
    sqlx::query(&format!("CREATE DATABASE {scratch}"))
        .execute(&mut admin)
        .await?;
    println!(
        "scratch database {scratch} on {}:{}",
        server.get_host(),
        server.get_port()
    );

    let outcome = run(&server.clone().database(&scratch), &config).await;

    sqlx::query(&format!("DROP DATABASE IF EXISTS {scratch} WITH (FORCE)"))
        .execute(&mut admin)
        .await?;
    admin.close().await?;

    let (bulk, single) = outcome?;
    println!();
    println!(
        "| path                                | samples |  seconds |  samples/s |     rows/s |"
    );
    println!(
        "|-------------------------------------|--------:|---------:|-----------:|-----------:|"
    );
    for (name, m) in [
        ("bulk insert_scored_samples (UNNEST)", &bulk),
        ("single-row INSERTs (autocommit)", &single),
    ] {
        println!(
            "| {name:<35} | {:>7} | {:>8.2} | {:>10.0} | {:>10.0} |",
            m.samples,
            m.seconds,
            m.samples_per_sec(),
            m.rows_per_sec()
        );
    }
    println!();
    println!(
        "bulk / single-row throughput: {:.1}x",
        bulk.rows_per_sec() / single.rows_per_sec()
    );
    Ok(())
}

/// Reads `--rows N` and `--single-rows N`, falling back to the environment.
/// Other arguments (cargo passes `--bench`) are ignored.
fn parse_args() -> Result<Config, BoxError> {
    let env = |name: &str, default: usize| -> Result<usize, BoxError> {
        Ok(std::env::var(name)
            .ok()
            .map(|v| v.parse())
            .transpose()?
            .unwrap_or(default))
    };
    let mut config = Config {
        bulk_rows: env("HIR_BENCH_ROWS", 100_000)?,
        single_rows: env("HIR_BENCH_SINGLE_ROWS", 20_000)?,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let target = match arg.as_str() {
            "--rows" => &mut config.bulk_rows,
            "--single-rows" => &mut config.single_rows,
            _ => continue,
        };
        *target = args
            .next()
            .ok_or_else(|| format!("{arg} needs a number"))?
            .parse()?;
    }
    if config.bulk_rows == 0 || config.single_rows == 0 {
        return Err("--rows and --single-rows must be > 0".into());
    }
    Ok(config)
}

/// Migrates the scratch database and measures both write paths.
async fn run(
    options: &PgConnectOptions,
    config: &Config,
) -> Result<(Measured, Measured), BoxError> {
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .connect_with(options.clone())
        .await?;
    let store = Store::from_pool(pool);
    store.migrate().await?;

    let run_id = Uuid::new_v4();
    store
        .create_run(&NewRun {
            id: run_id,
            name: "bench".into(),
            policy: "hir_paper".into(),
            config: json!({}),
        })
        .await?;
    let task = store.upsert_task(&scratch_task()).await?;
    store.ensure_iteration(run_id, 0).await?;
    store.ensure_iteration(run_id, 1).await?;
    let version = store
        .register_model_version(&NewModelVersion {
            name: "bench@base".into(),
            run_id: None,
            iteration: None,
            parent_id: None,
            checkpoint_uri: "file:///dev/null".into(),
            sha256: "0".repeat(64),
            metrics: json!({}),
        })
        .await?;

    let make = |iteration, i| sample(run_id, iteration, task.id, version.id, i);

    let bulk_samples: Vec<NewScoredSample> = (0..config.bulk_rows).map(|i| make(0, i)).collect();
    let started = Instant::now();
    let mut written = 0;
    for call in bulk_samples.chunks(CALL_ROWS) {
        written += store.insert_scored_samples(call).await?.samples;
    }
    let bulk = Measured {
        samples: config.bulk_rows,
        seconds: started.elapsed().as_secs_f64(),
    };
    assert_eq!(
        written as usize, config.bulk_rows,
        "every bulk sample is new"
    );

    let single_samples: Vec<NewScoredSample> =
        (0..config.single_rows).map(|i| make(1, i)).collect();
    let started = Instant::now();
    for s in &single_samples {
        insert_one(&store, s).await?;
    }
    let single = Measured {
        samples: config.single_rows,
        seconds: started.elapsed().as_secs_f64(),
    };

    store.pool().close().await;
    Ok((bulk, single))
}

/// The baseline: one INSERT for the sample, one for its relabel.
async fn insert_one(store: &Store, s: &NewScoredSample) -> Result<(), BoxError> {
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO samples (run_id, iteration, task_id, example_idx, sample_idx,
                              model_version_id, prompt, output, output_tokens,
                              finish_reason, score, correct, correct_extracted)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
         RETURNING id",
    )
    .bind(s.run_id)
    .bind(s.iteration)
    .bind(s.task_id)
    .bind(s.example_idx)
    .bind(s.sample_idx)
    .bind(s.model_version_id)
    .bind(&s.prompt)
    .bind(&s.output)
    .bind(&s.output_tokens)
    .bind(s.finish_reason.as_str())
    .bind(s.score)
    .bind(s.correct)
    .bind(s.correct_extracted)
    .fetch_one(store.pool())
    .await?;
    let r = &s.relabels[0];
    sqlx::query(
        "INSERT INTO relabels (sample_id, policy, positive_instruction, negative_instruction)
         VALUES ($1, $2, $3, $4)",
    )
    .bind(id)
    .bind(&r.policy)
    .bind(&r.positive_instruction)
    .bind(&r.negative_instruction)
    .execute(store.pool())
    .await?;
    Ok(())
}

/// The sampler prompt of scratch example `idx`, about as long as a
/// tracking_shuffled_objects_three_objects prompt (~600 bytes).
fn prompt(idx: i32) -> String {
    format!(
        "Solve the question with correct answer.\n\nQ: Alice, Bob, and Claire are playing a game. \
         At the start of the game, they are each holding a ball: Alice has a orange ball, Bob has a \
         white ball, and Claire has a blue ball. As the game progresses, pairs of players trade \
         balls. First, Alice and Bob swap balls. Then, Claire and Alice swap balls. Finally, Bob and \
         Claire swap balls. At the end of the game, Alice has the (example {idx})\nOptions:\n\
         (A) orange ball.\n(B) white ball.\n(C) blue ball.\nA:"
    )
}

fn scratch_task() -> NewTask {
    NewTask {
        name: "bench_task".into(),
        path: "bench/task".into(),
        kind: TaskKind::MultipleChoice,
        split_seed: 1,
        n_examples: EXAMPLES,
        train_size: EXAMPLES,
        source_sha256: "1".repeat(64),
        examples: (0..EXAMPLES)
            .map(|idx| NewExample {
                idx,
                split: SplitSide::Train,
                prompt: prompt(idx),
                target: "(C)".into(),
            })
            .collect(),
    }
}

/// Sample `i` of an iteration: a short chain-of-thought style output of
/// ~40 tokens, and the paper's relabel.
fn sample(
    run_id: Uuid,
    iteration: i32,
    task_id: i64,
    version_id: i64,
    i: usize,
) -> NewScoredSample {
    let i = i32::try_from(i).expect("fewer than 2^31 samples");
    let correct = i % 3 == 0;
    let (positive, negative) = if correct {
        (
            "Solve question with correct answer.",
            "Solve the question with wrong answer.",
        )
    } else {
        (
            "Solve the question with wrong answer.",
            "Solve the question with correct answer.",
        )
    };
    NewScoredSample {
        run_id,
        iteration,
        task_id,
        example_idx: i % EXAMPLES,
        sample_idx: i / EXAMPLES,
        model_version_id: version_id,
        prompt: prompt(i % EXAMPLES),
        output: format!(
            "After the swaps Alice has the blue ball, so the answer is {} (sample {i}).",
            if correct { "(C)" } else { "(A)" }
        ),
        output_tokens: (0..40).map(|t| (i * 31 + t) % 32_000).collect(),
        finish_reason: hir_store::FinishReason::Stop,
        score: if correct { 1.0 } else { 0.0 },
        correct,
        correct_extracted: correct,
        relabels: vec![NewRelabel {
            policy: "hir_paper".into(),
            positive_instruction: positive.into(),
            negative_instruction: negative.into(),
        }],
    }
}
