//! Evaluation results: one row per (model version, test example, prompt style).

use uuid::Uuid;

use crate::error::{db_error, validate_non_negative, Result, StoreError};
use crate::Store;

/// Number of results written per statement by [`Store::record_eval_results`].
const EVAL_CHUNK: usize = 5_000;

/// An evaluation result to record.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvalResult {
    /// The evaluated model version.
    pub model_version_id: i64,
    /// Task of the example.
    pub task_id: i64,
    /// The test example.
    pub example_idx: i32,
    /// How the prompt was built, e.g. `raw`.
    pub prompt_style: String,
    /// Run the evaluation belongs to, if any.
    pub run_id: Option<Uuid>,
    /// Iteration the evaluation belongs to, if any.
    pub iteration: Option<i32>,
    /// The model's output.
    pub output: String,
    /// The paper's exact match.
    pub correct: bool,
    /// Match after extracting the answer.
    pub correct_extracted: bool,
    /// The extracted answer, e.g. `(A)`, if one was found.
    pub predicted: Option<String>,
}

/// One row of the `eval_accuracy` view.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct EvalAccuracy {
    /// The evaluated model version.
    pub model_version_id: i64,
    /// Its name.
    pub version: String,
    /// Run of the evaluation, if any.
    pub run_id: Option<Uuid>,
    /// Iteration of the evaluation, if any.
    pub iteration: Option<i32>,
    /// Task name.
    pub task: String,
    /// Prompt style.
    pub prompt_style: String,
    /// Number of evaluated examples.
    pub n: i64,
    /// Share of exact matches.
    pub accuracy: f64,
    /// Share of matches after answer extraction.
    pub accuracy_extracted: f64,
}

impl Store {
    /// Records evaluation results in one transaction. Results already stored
    /// for the same (model version, task, example, prompt style) are kept as
    /// they are. Returns how many rows were new.
    #[tracing::instrument(name = "Recording eval results", skip_all, fields(results = results.len()))]
    pub async fn record_eval_results(&self, results: &[NewEvalResult]) -> Result<u64> {
        for (i, r) in results.iter().enumerate() {
            validate_non_negative(&format!("results[{i}].example_idx"), r.example_idx.into())?;
            if let Some(iteration) = r.iteration {
                validate_non_negative(&format!("results[{i}].iteration"), iteration.into())?;
            }
            if r.prompt_style.is_empty() {
                return Err(StoreError::Invalid(format!(
                    "results[{i}].prompt_style must not be empty"
                )));
            }
        }
        let mut inserted = 0;
        let mut tx = self.pool().begin().await?;
        for chunk in results.chunks(EVAL_CHUNK) {
            let version: Vec<i64> = chunk.iter().map(|r| r.model_version_id).collect();
            let task: Vec<i64> = chunk.iter().map(|r| r.task_id).collect();
            let example: Vec<i32> = chunk.iter().map(|r| r.example_idx).collect();
            let style: Vec<&str> = chunk.iter().map(|r| r.prompt_style.as_str()).collect();
            let run: Vec<Option<Uuid>> = chunk.iter().map(|r| r.run_id).collect();
            let iteration: Vec<Option<i32>> = chunk.iter().map(|r| r.iteration).collect();
            let output: Vec<&str> = chunk.iter().map(|r| r.output.as_str()).collect();
            let correct: Vec<bool> = chunk.iter().map(|r| r.correct).collect();
            let extracted: Vec<bool> = chunk.iter().map(|r| r.correct_extracted).collect();
            let predicted: Vec<Option<&str>> =
                chunk.iter().map(|r| r.predicted.as_deref()).collect();
            let result = sqlx::query(
                "INSERT INTO eval_results (model_version_id, task_id, example_idx, prompt_style,
                                           run_id, iteration, output, correct,
                                           correct_extracted, predicted)
                 SELECT * FROM UNNEST($1::int8[], $2::int8[], $3::int4[], $4::text[], $5::uuid[],
                                      $6::int4[], $7::text[], $8::bool[], $9::bool[], $10::text[])
                 ON CONFLICT (model_version_id, task_id, example_idx, prompt_style) DO NOTHING",
            )
            .bind(&version)
            .bind(&task)
            .bind(&example)
            .bind(&style)
            .bind(&run)
            .bind(&iteration)
            .bind(&output)
            .bind(&correct)
            .bind(&extracted)
            .bind(&predicted)
            .execute(&mut *tx)
            .await
            .map_err(db_error("recording eval results"))?;
            inserted += result.rows_affected();
        }
        tx.commit().await?;
        Ok(inserted)
    }

    /// Test accuracy of a model version per task and prompt style (the
    /// `eval_accuracy` view), ordered by task and prompt style.
    #[tracing::instrument(name = "Reading eval accuracy", skip(self))]
    pub async fn eval_accuracy(&self, model_version_id: i64) -> Result<Vec<EvalAccuracy>> {
        let rows = sqlx::query_as::<_, EvalAccuracy>(
            "SELECT * FROM eval_accuracy WHERE model_version_id = $1
             ORDER BY task, prompt_style, run_id, iteration",
        )
        .bind(model_version_id)
        .fetch_all(self.pool())
        .await?;
        Ok(rows)
    }

    /// How often each answer was predicted in a run's evaluations: (iteration, task,
    /// answer or `(none)`, count), ordered by iteration, task and answer.
    #[tracing::instrument(name = "Reading a run's predicted answers", skip(self))]
    pub async fn run_eval_predictions(
        &self,
        run_id: Uuid,
    ) -> Result<Vec<(i32, String, String, i64)>> {
        Ok(sqlx::query_as::<_, (i32, String, String, i64)>(
            "SELECT e.iteration, t.name, coalesce(e.predicted, '(none)') AS answer, count(*)
             FROM eval_results e JOIN tasks t ON t.id = e.task_id
             WHERE e.run_id = $1 AND e.iteration IS NOT NULL
             GROUP BY 1, 2, 3 ORDER BY 1, 2, 3",
        )
        .bind(run_id)
        .fetch_all(self.pool())
        .await?)
    }

    /// Test accuracy of every version a run evaluated, per iteration, task and prompt
    /// style, ordered by iteration.
    #[tracing::instrument(name = "Reading a run's eval accuracy", skip(self))]
    pub async fn run_eval_accuracy(&self, run_id: Uuid) -> Result<Vec<EvalAccuracy>> {
        Ok(sqlx::query_as::<_, EvalAccuracy>(
            "SELECT * FROM eval_accuracy WHERE run_id = $1
             ORDER BY iteration, task, prompt_style",
        )
        .bind(run_id)
        .fetch_all(self.pool())
        .await?)
    }

    /// Which test examples a model version answered correctly, per task, under one
    /// evaluation style key: `(task, example index, exact, extracted)` ordered by task and
    /// example. Results are keyed by version, not run: two runs that evaluate the same
    /// version read the same items.
    #[tracing::instrument(name = "Reading a version's eval items", skip(self))]
    pub async fn version_eval_items(
        &self,
        version: &str,
        prompt_style: &str,
    ) -> Result<Vec<(String, i32, bool, bool)>> {
        Ok(sqlx::query_as::<_, (String, i32, bool, bool)>(
            "SELECT t.name, e.example_idx, e.correct, e.correct_extracted
             FROM eval_results e
             JOIN model_versions mv ON mv.id = e.model_version_id
             JOIN tasks t ON t.id = e.task_id
             WHERE mv.name = $1 AND e.prompt_style = $2
             ORDER BY t.name, e.example_idx",
        )
        .bind(version)
        .bind(prompt_style)
        .fetch_all(self.pool())
        .await?)
    }

    /// The stored answers of a model version to one task's examples under one evaluation
    /// style key, by example index.
    #[tracing::instrument(name = "Reading a version's stored answers", skip(self))]
    pub async fn eval_outputs(
        &self,
        model_version_id: i64,
        task_id: i64,
        prompt_style: &str,
    ) -> Result<std::collections::HashMap<i32, String>> {
        let rows = sqlx::query_as::<_, (i32, String)>(
            "SELECT example_idx, output FROM eval_results
             WHERE model_version_id = $1 AND task_id = $2 AND prompt_style = $3",
        )
        .bind(model_version_id)
        .bind(task_id)
        .bind(prompt_style)
        .fetch_all(self.pool())
        .await?;
        Ok(rows.into_iter().collect())
    }
}
