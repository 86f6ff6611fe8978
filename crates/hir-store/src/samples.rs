//! Scored samples and their hindsight relabels.
//!
//! [`Store::insert_scored_samples`] is the hot write path: the generator
//! stores thousands of samples per iteration, each with one relabel per
//! policy. Rows go in as column arrays (`INSERT ... SELECT * FROM UNNEST(...)`)
//! in chunks of [`SAMPLE_CHUNK`], all in one transaction. Conflicts on the
//! natural key `(run_id, iteration, task_id, example_idx, sample_idx)` are
//! ignored, so a retried write never doubles a row.
//!
//! Output tokens are `INT[]` per row. Postgres cannot `UNNEST` a ragged
//! array, so the tokens of a chunk travel as one flat `int4[]` plus a
//! `[start, end)` pair per row, and each row takes its slice on the server.

use chrono::{DateTime, Utc};
use uuid::Uuid;

pub use hir_core::status::FinishReason;

use crate::error::{db_error, validate_non_negative, Result, StoreError};
use crate::Store;

/// Number of samples written per statement by [`Store::insert_scored_samples`].
pub const SAMPLE_CHUNK: usize = 2_000;

/// A relabel to store with its sample.
#[derive(Debug, Clone, PartialEq)]
pub struct NewRelabel {
    /// Relabel policy that produced the instructions, e.g. `hir_paper`.
    pub policy: String,
    /// Instruction the output is trained under.
    pub positive_instruction: String,
    /// Instruction the output is contrasted against.
    pub negative_instruction: String,
}

/// A scored sample to store, with its relabels.
#[derive(Debug, Clone, PartialEq)]
pub struct NewScoredSample {
    /// Run that sampled it.
    pub run_id: Uuid,
    /// Iteration that sampled it (must exist, see [`Store::ensure_iteration`]).
    pub iteration: i32,
    /// Task of the example.
    pub task_id: i64,
    /// Example within the task (must exist).
    pub example_idx: i32,
    /// Which of the example's samples this is, 0-based.
    pub sample_idx: i32,
    /// Model version that produced it (must be registered).
    pub model_version_id: i64,
    /// The exact prompt given to the model.
    pub prompt: String,
    /// The generated text.
    pub output: String,
    /// The generated token ids.
    pub output_tokens: Vec<i32>,
    /// Why generation stopped, e.g. `stop` or `length`.
    pub finish_reason: FinishReason,
    /// Reward in `[0, 1]`.
    pub score: f32,
    /// The paper's exact match.
    pub correct: bool,
    /// Match after extracting the answer from the output.
    pub correct_extracted: bool,
    /// Relabels of this sample, at most one per policy.
    pub relabels: Vec<NewRelabel>,
}

/// How many rows [`Store::insert_scored_samples`] added (rows that were
/// already stored are not counted).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InsertedSamples {
    /// New rows in `samples`.
    pub samples: u64,
    /// New rows in `relabels`.
    pub relabels: u64,
}

/// Samples stored for one example in one iteration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::FromRow)]
pub struct ExampleSampleCount {
    /// The task.
    pub task_id: i64,
    /// The example.
    pub example_idx: i32,
    /// How many samples it has.
    pub samples: i64,
}

/// Totals of one iteration's samples.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, sqlx::FromRow)]
pub struct SampleTotals {
    /// Samples stored.
    pub samples: i64,
    /// Correct under the paper's exact match.
    pub correct: i64,
    /// Correct under answer extraction.
    pub correct_extracted: i64,
    /// Prompts sampled (task and example).
    pub prompts: i64,
    /// Prompts with at least one sample correct under exact match: pass@n, with n the
    /// samples per prompt.
    pub prompts_correct: i64,
    /// Prompts with at least one sample correct under answer extraction.
    pub prompts_correct_extracted: i64,
}

/// A stored sample.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct Sample {
    /// Surrogate key.
    pub id: i64,
    /// Run that sampled it.
    pub run_id: Uuid,
    /// Iteration that sampled it.
    pub iteration: i32,
    /// Task of the example.
    pub task_id: i64,
    /// Example within the task.
    pub example_idx: i32,
    /// Which of the example's samples this is.
    pub sample_idx: i32,
    /// Model version that produced it.
    pub model_version_id: i64,
    /// The exact prompt.
    pub prompt: String,
    /// The generated text.
    pub output: String,
    /// The generated token ids.
    pub output_tokens: Vec<i32>,
    /// Why generation stopped.
    #[sqlx(try_from = "String")]
    pub finish_reason: FinishReason,
    /// Reward in `[0, 1]`.
    pub score: f32,
    /// The paper's exact match.
    pub correct: bool,
    /// Match after extracting the answer.
    pub correct_extracted: bool,
    /// When it was stored.
    pub created_at: DateTime<Utc>,
}

/// A stored relabel.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Relabel {
    /// The relabeled sample.
    pub sample_id: i64,
    /// Relabel policy.
    pub policy: String,
    /// Instruction the output is trained under.
    pub positive_instruction: String,
    /// Instruction the output is contrasted against.
    pub negative_instruction: String,
}

/// One row of the `iteration_accuracy` view.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct IterationAccuracy {
    /// The run.
    pub run_id: Uuid,
    /// The run's name.
    pub run_name: String,
    /// The iteration.
    pub iteration: i32,
    /// Task name.
    pub task: String,
    /// Number of samples.
    pub samples: i64,
    /// Samples with an exact match.
    pub correct: i64,
    /// Samples whose extracted answer matched.
    pub correct_extracted: i64,
    /// `correct / samples`.
    pub accuracy: f64,
    /// `correct_extracted / samples`.
    pub accuracy_extracted: f64,
}

impl NewScoredSample {
    /// Checks ranges; `i` is the sample's position in the caller's slice.
    fn validate(&self, i: usize) -> Result<()> {
        validate_non_negative(&format!("samples[{i}].iteration"), self.iteration.into())?;
        validate_non_negative(
            &format!("samples[{i}].example_idx"),
            self.example_idx.into(),
        )?;
        validate_non_negative(&format!("samples[{i}].sample_idx"), self.sample_idx.into())?;
        if !(0.0..=1.0).contains(&self.score) {
            return Err(StoreError::Invalid(format!(
                "samples[{i}].score must be in [0, 1], got {}",
                self.score
            )));
        }
        if let Some(r) = self.relabels.iter().find(|r| r.policy.is_empty()) {
            return Err(StoreError::Invalid(format!(
                "samples[{i}] has a relabel with an empty policy (positive instruction {:?})",
                r.positive_instruction
            )));
        }
        Ok(())
    }
}

impl Store {
    /// Stores scored samples with their relabels in one transaction.
    ///
    /// Samples already stored under the same natural key, and relabels
    /// already stored for the same (sample, policy), are left untouched, so
    /// the call can be retried. Returns the number of new rows.
    ///
    /// The iteration, example and model version each sample refers to must
    /// exist; otherwise nothing is written and [`StoreError::NotFound`] says
    /// which one is missing.
    #[tracing::instrument(name = "Inserting scored samples", skip_all, fields(samples = samples.len()))]
    pub async fn insert_scored_samples(
        &self,
        samples: &[NewScoredSample],
    ) -> Result<InsertedSamples> {
        for (i, sample) in samples.iter().enumerate() {
            sample.validate(i)?;
        }
        let mut inserted = InsertedSamples::default();
        let mut tx = self.pool().begin().await?;
        for chunk in samples.chunks(SAMPLE_CHUNK) {
            inserted.samples += insert_sample_chunk(&mut tx, chunk).await?;
            inserted.relabels += insert_relabel_chunk(&mut tx, chunk).await?;
        }
        tx.commit().await?;
        tracing::debug!(?inserted, "stored scored samples");
        Ok(inserted)
    }

    /// Fetches samples by id, ordered by id. Unknown ids are skipped.
    #[tracing::instrument(name = "Fetching samples", skip_all, fields(ids = ids.len()))]
    pub async fn get_samples(&self, ids: &[i64]) -> Result<Vec<Sample>> {
        let samples = sqlx::query_as::<_, Sample>(
            "SELECT * FROM samples WHERE id = ANY($1::int8[]) ORDER BY id",
        )
        .bind(ids)
        .fetch_all(self.pool())
        .await?;
        Ok(samples)
    }

    /// Fetches the relabels of the given samples, ordered by sample and policy.
    #[tracing::instrument(name = "Fetching relabels", skip_all, fields(ids = sample_ids.len()))]
    pub async fn list_relabels(&self, sample_ids: &[i64]) -> Result<Vec<Relabel>> {
        let relabels = sqlx::query_as::<_, Relabel>(
            "SELECT * FROM relabels WHERE sample_id = ANY($1::int8[]) ORDER BY sample_id, policy",
        )
        .bind(sample_ids)
        .fetch_all(self.pool())
        .await?;
        Ok(relabels)
    }

    /// How many samples each example has in one iteration of a run: the
    /// progress a resumed sampler starts from.
    #[tracing::instrument(name = "Counting samples per example", skip(self))]
    pub async fn sample_counts(
        &self,
        run_id: Uuid,
        iteration: i32,
    ) -> Result<Vec<ExampleSampleCount>> {
        let rows = sqlx::query_as::<_, ExampleSampleCount>(
            "SELECT task_id, example_idx, count(*) AS samples FROM samples \
             WHERE run_id = $1 AND iteration = $2 GROUP BY task_id, example_idx",
        )
        .bind(run_id)
        .bind(iteration)
        .fetch_all(self.pool())
        .await?;
        Ok(rows)
    }

    /// Totals of one iteration's samples: stored, correct, correct under extraction, and
    /// the prompts with at least one correct sample under each.
    #[tracing::instrument(name = "Summing an iteration's samples", skip(self))]
    pub async fn sample_totals(&self, run_id: Uuid, iteration: i32) -> Result<SampleTotals> {
        let totals = sqlx::query_as::<_, SampleTotals>(
            "SELECT count(*) AS samples, count(*) FILTER (WHERE correct) AS correct, \
             count(*) FILTER (WHERE correct_extracted) AS correct_extracted, \
             count(DISTINCT (task_id, example_idx)) AS prompts, \
             count(DISTINCT (task_id, example_idx)) FILTER (WHERE correct) AS prompts_correct, \
             count(DISTINCT (task_id, example_idx)) FILTER (WHERE correct_extracted) \
               AS prompts_correct_extracted \
             FROM samples WHERE run_id = $1 AND iteration = $2",
        )
        .bind(run_id)
        .bind(iteration)
        .fetch_one(self.pool())
        .await?;
        Ok(totals)
    }

    /// Sampling accuracy of a run per iteration and task (the
    /// `iteration_accuracy` view), ordered by iteration and task.
    #[tracing::instrument(name = "Reading iteration accuracy", skip(self))]
    pub async fn iteration_accuracy(&self, run_id: Uuid) -> Result<Vec<IterationAccuracy>> {
        let rows = sqlx::query_as::<_, IterationAccuracy>(
            "SELECT * FROM iteration_accuracy WHERE run_id = $1 ORDER BY iteration, task",
        )
        .bind(run_id)
        .fetch_all(self.pool())
        .await?;
        Ok(rows)
    }
}

/// Inserts one chunk of samples; returns how many were new.
async fn insert_sample_chunk(
    tx: &mut sqlx::PgConnection,
    chunk: &[NewScoredSample],
) -> Result<u64> {
    let n = chunk.len();
    let mut run_id = Vec::with_capacity(n);
    let mut iteration = Vec::with_capacity(n);
    let mut task_id = Vec::with_capacity(n);
    let mut example_idx = Vec::with_capacity(n);
    let mut sample_idx = Vec::with_capacity(n);
    let mut model_version_id = Vec::with_capacity(n);
    let mut prompt = Vec::with_capacity(n);
    let mut output = Vec::with_capacity(n);
    let mut token_start = Vec::with_capacity(n);
    let mut token_end = Vec::with_capacity(n);
    let mut finish_reason = Vec::with_capacity(n);
    let mut score = Vec::with_capacity(n);
    let mut correct = Vec::with_capacity(n);
    let mut correct_extracted = Vec::with_capacity(n);
    let mut tokens: Vec<i32> =
        Vec::with_capacity(chunk.iter().map(|s| s.output_tokens.len()).sum());
    for s in chunk {
        run_id.push(s.run_id);
        iteration.push(s.iteration);
        task_id.push(s.task_id);
        example_idx.push(s.example_idx);
        sample_idx.push(s.sample_idx);
        model_version_id.push(s.model_version_id);
        prompt.push(s.prompt.as_str());
        output.push(s.output.as_str());
        token_start.push(flat_offset(tokens.len())?);
        tokens.extend_from_slice(&s.output_tokens);
        token_end.push(flat_offset(tokens.len())?);
        finish_reason.push(s.finish_reason.as_str());
        score.push(s.score);
        correct.push(s.correct);
        correct_extracted.push(s.correct_extracted);
    }

    // Row i's tokens are tokens[start+1 .. end] in 1-based, inclusive SQL
    // slice notation; an empty range yields '{}'.
    let result = sqlx::query(
        "INSERT INTO samples (run_id, iteration, task_id, example_idx, sample_idx,
                              model_version_id, prompt, output, output_tokens,
                              finish_reason, score, correct, correct_extracted)
         SELECT u.run_id, u.iteration, u.task_id, u.example_idx, u.sample_idx,
                u.model_version_id, u.prompt, u.output,
                ($15::int4[])[u.token_start + 1 : u.token_end],
                u.finish_reason, u.score, u.correct, u.correct_extracted
         FROM UNNEST($1::uuid[], $2::int4[], $3::int8[], $4::int4[], $5::int4[],
                     $6::int8[], $7::text[], $8::text[], $9::int4[], $10::int4[],
                     $11::text[], $12::float4[], $13::bool[], $14::bool[])
              AS u(run_id, iteration, task_id, example_idx, sample_idx,
                   model_version_id, prompt, output, token_start, token_end,
                   finish_reason, score, correct, correct_extracted)
         ON CONFLICT (run_id, iteration, task_id, example_idx, sample_idx) DO NOTHING",
    )
    .bind(&run_id)
    .bind(&iteration)
    .bind(&task_id)
    .bind(&example_idx)
    .bind(&sample_idx)
    .bind(&model_version_id)
    .bind(&prompt)
    .bind(&output)
    .bind(&token_start)
    .bind(&token_end)
    .bind(&finish_reason)
    .bind(&score)
    .bind(&correct)
    .bind(&correct_extracted)
    .bind(&tokens)
    .execute(&mut *tx)
    .await
    .map_err(db_error("inserting samples"))?;
    Ok(result.rows_affected())
}

/// Inserts the relabels of one chunk of samples, finding each sample's id
/// by its natural key; returns how many were new.
async fn insert_relabel_chunk(
    tx: &mut sqlx::PgConnection,
    chunk: &[NewScoredSample],
) -> Result<u64> {
    let n: usize = chunk.iter().map(|s| s.relabels.len()).sum();
    if n == 0 {
        return Ok(0);
    }
    let mut run_id = Vec::with_capacity(n);
    let mut iteration = Vec::with_capacity(n);
    let mut task_id = Vec::with_capacity(n);
    let mut example_idx = Vec::with_capacity(n);
    let mut sample_idx = Vec::with_capacity(n);
    let mut policy = Vec::with_capacity(n);
    let mut positive = Vec::with_capacity(n);
    let mut negative = Vec::with_capacity(n);
    for s in chunk {
        for r in &s.relabels {
            run_id.push(s.run_id);
            iteration.push(s.iteration);
            task_id.push(s.task_id);
            example_idx.push(s.example_idx);
            sample_idx.push(s.sample_idx);
            policy.push(r.policy.as_str());
            positive.push(r.positive_instruction.as_str());
            negative.push(r.negative_instruction.as_str());
        }
    }
    let result = sqlx::query(
        "INSERT INTO relabels (sample_id, policy, positive_instruction, negative_instruction)
         SELECT s.id, u.policy, u.positive, u.negative
         FROM UNNEST($1::uuid[], $2::int4[], $3::int8[], $4::int4[], $5::int4[],
                     $6::text[], $7::text[], $8::text[])
              AS u(run_id, iteration, task_id, example_idx, sample_idx,
                   policy, positive, negative)
         JOIN samples s
           ON s.run_id = u.run_id AND s.iteration = u.iteration AND s.task_id = u.task_id
          AND s.example_idx = u.example_idx AND s.sample_idx = u.sample_idx
         ON CONFLICT (sample_id, policy) DO NOTHING",
    )
    .bind(&run_id)
    .bind(&iteration)
    .bind(&task_id)
    .bind(&example_idx)
    .bind(&sample_idx)
    .bind(&policy)
    .bind(&positive)
    .bind(&negative)
    .execute(&mut *tx)
    .await
    .map_err(db_error("inserting relabels"))?;
    Ok(result.rows_affected())
}

/// Converts a position in the flat token array to the `int4` Postgres uses.
fn flat_offset(len: usize) -> Result<i32> {
    i32::try_from(len).map_err(|_| {
        StoreError::Invalid(format!(
            "output_tokens of one chunk of {SAMPLE_CHUNK} samples exceed {} tokens; \
             store fewer samples per call",
            i32::MAX
        ))
    })
}
