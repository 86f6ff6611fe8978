//! Fixtures shared by the tests: a run with one task, iteration 0 and a
//! base model version, plus builders for samples.

use hir_store::{
    ModelVersion, NewExample, NewModelVersion, NewRelabel, NewRun, NewScoredSample, NewTask,
    SplitSide, Store, Task, TaskKind,
};
use serde_json::json;
use sqlx::PgPool;
use uuid::Uuid;

/// Examples in the fixture task; the first [`TRAIN`] are train examples.
pub const EXAMPLES: i32 = 10;
/// Train examples in the fixture task.
pub const TRAIN: i32 = 8;

/// The relabel policy used by [`sample`].
pub const POLICY: &str = "hir_paper";

/// A run with one task, iteration 0 and a base model version.
pub struct Fixture {
    pub store: Store,
    pub run_id: Uuid,
    pub task: Task,
    pub version: ModelVersion,
}

/// A SHA-256-shaped string made of one repeated hex digit.
pub fn sha(digit: char) -> String {
    std::iter::repeat_n(digit, 64).collect()
}

/// The fixture task, built from a source whose checksum is `sha(source)`.
pub fn new_task(source: char) -> NewTask {
    NewTask {
        name: "tracking_shuffled_objects_three_objects".into(),
        path: "tracking_shuffled_objects/three_objects".into(),
        kind: TaskKind::MultipleChoice,
        split_seed: 1,
        n_examples: EXAMPLES,
        train_size: TRAIN,
        source_sha256: sha(source),
        examples: (0..EXAMPLES)
            .map(|idx| NewExample {
                idx,
                split: if idx < TRAIN {
                    SplitSide::Train
                } else {
                    SplitSide::Test
                },
                prompt: format!("Solve the question with correct answer.\n\nQ: question {idx}\nA:"),
                target: "(C)".into(),
            })
            .collect(),
    }
}

/// The fixture run's definition.
pub fn new_run(id: Uuid) -> NewRun {
    NewRun {
        id,
        name: "tso3-hir".into(),
        policy: POLICY.into(),
        config: json!({ "samples_per_prompt": 4, "lr": 5e-5 }),
    }
}

/// The base model version, checksum `sha(digit)`.
pub fn new_version(name: &str, digit: char) -> NewModelVersion {
    NewModelVersion {
        name: name.into(),
        run_id: None,
        iteration: None,
        parent_id: None,
        checkpoint_uri: format!("file:///checkpoints/{name}"),
        sha256: sha(digit),
        metrics: json!({}),
    }
}

/// Creates the fixture in a fresh database.
pub async fn fixture(pool: PgPool) -> Fixture {
    let store = Store::from_pool(pool);
    let run_id = Uuid::new_v4();
    store
        .create_run(&new_run(run_id))
        .await
        .expect("create run");
    let task = store
        .upsert_task(&new_task('a'))
        .await
        .expect("upsert task");
    store
        .add_run_tasks(run_id, &[task.id])
        .await
        .expect("add task");
    store
        .ensure_iteration(run_id, 0)
        .await
        .expect("iteration 0");
    let version = store
        .register_model_version(&new_version("flan-t5-large@base", 'b'))
        .await
        .expect("register version");
    Fixture {
        store,
        run_id,
        task,
        version,
    }
}

impl Fixture {
    /// A sample of train example `example_idx % TRAIN` in `iteration`, with
    /// the paper's relabel for a correct or wrong output.
    pub fn sample(&self, iteration: i32, n: i32, correct: bool) -> NewScoredSample {
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
            run_id: self.run_id,
            iteration,
            task_id: self.task.id,
            example_idx: n % TRAIN,
            sample_idx: n / TRAIN,
            model_version_id: self.version.id,
            prompt: format!(
                "Solve the question with correct answer.\n\nQ: question {}\nA:",
                n % TRAIN
            ),
            output: if correct { "(C)".into() } else { "(A)".into() },
            output_tokens: (0..n % 5).map(|t| 100 + t + n).collect(),
            finish_reason: hir_store::FinishReason::Stop,
            score: if correct { 1.0 } else { 0.0 },
            correct,
            correct_extracted: correct,
            relabels: vec![NewRelabel {
                policy: POLICY.into(),
                positive_instruction: positive.into(),
                negative_instruction: negative.into(),
            }],
        }
    }

    /// `n` samples of `iteration`, the first `correct` of them correct.
    pub fn samples(&self, iteration: i32, n: i32, correct: i32) -> Vec<NewScoredSample> {
        (0..n)
            .map(|i| self.sample(iteration, i, i < correct))
            .collect()
    }

    /// Number of rows in `table`.
    pub async fn count(&self, table: &str) -> i64 {
        sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
            .fetch_one(self.store.pool())
            .await
            .expect("count rows")
    }
}
