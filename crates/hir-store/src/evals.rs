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

/// One evaluation result as a run scored it (see [`Store::run_eval_items`]).
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct RunEvalItem {
    /// The iteration that scored it.
    pub iteration: i32,
    /// The evaluated model version's name.
    pub version: String,
    /// Task name.
    pub task: String,
    /// The test (or validation) example.
    pub example_idx: i32,
    /// The paper's exact match.
    pub correct: bool,
    /// Match after extracting the answer.
    pub correct_extracted: bool,
    /// The extracted answer, if one was found.
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
    /// they are; a result with a run and iteration is linked to that run either way
    /// (`run_eval_items`). Returns how many results were new.
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
            // One statement: the results, and the run's link to each of them, whether this
            // wrote it or found it stored (rows without a run or iteration get no link).
            let written: i64 = sqlx::query_scalar(
                "WITH r AS (
                     SELECT * FROM UNNEST($1::int8[], $2::int8[], $3::int4[], $4::text[],
                                          $5::uuid[], $6::int4[], $7::text[], $8::bool[],
                                          $9::bool[], $10::text[])
                         AS r (model_version_id, task_id, example_idx, prompt_style, run_id,
                               iteration, output, correct, correct_extracted, predicted)
                 ), written AS (
                     INSERT INTO eval_results (model_version_id, task_id, example_idx,
                                               prompt_style, run_id, iteration, output,
                                               correct, correct_extracted, predicted)
                     SELECT * FROM r
                     ON CONFLICT (model_version_id, task_id, example_idx, prompt_style)
                         DO NOTHING
                     RETURNING 1
                 ), linked AS (
                     INSERT INTO run_eval_items (run_id, iteration, model_version_id, task_id,
                                                 example_idx, prompt_style)
                     SELECT run_id, iteration, model_version_id, task_id, example_idx,
                            prompt_style
                     FROM r
                     WHERE run_id IS NOT NULL AND iteration IS NOT NULL
                     ON CONFLICT DO NOTHING
                 )
                 SELECT count(*) FROM written",
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
            .fetch_one(&mut *tx)
            .await
            .map_err(db_error("recording eval results"))?;
            inserted += written.unsigned_abs();
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

    /// Every evaluation result a run scored (its own, or a version's stored answers it
    /// reused), ordered by iteration, task, example and prompt style.
    #[tracing::instrument(name = "Reading a run's eval items", skip(self))]
    pub async fn run_eval_items(&self, run_id: Uuid) -> Result<Vec<RunEvalItem>> {
        Ok(sqlx::query_as::<_, RunEvalItem>(
            "SELECT l.iteration, mv.name AS version, t.name AS task, l.example_idx,
                    e.correct, e.correct_extracted, e.predicted
             FROM run_eval_items l
             JOIN eval_results e USING (model_version_id, task_id, example_idx, prompt_style)
             JOIN model_versions mv ON mv.id = l.model_version_id
             JOIN tasks t ON t.id = l.task_id
             WHERE l.run_id = $1
             ORDER BY l.iteration, t.name, l.example_idx, l.prompt_style",
        )
        .bind(run_id)
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
