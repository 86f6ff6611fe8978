//! Feedback: relabeled instruction tuples submitted by other systems.

use serde_json::Value;
use uuid::Uuid;

use crate::error::{db_error, Result, StoreError};
use crate::Store;

/// Number of tuples written per statement by [`Store::insert_feedback`].
const FEEDBACK_CHUNK: usize = 2_000;

/// A feedback tuple to store. `(source, external_id)` identifies it, so a
/// system can resubmit without creating duplicates.
#[derive(Debug, Clone, PartialEq)]
pub struct NewFeedback {
    /// The submitting system, e.g. `chat-ui`.
    pub source: String,
    /// The submitter's own id for the tuple.
    pub external_id: String,
    /// Run the tuple should be trained in, if any.
    pub run_id: Option<Uuid>,
    /// The instruction the output was produced under.
    pub instruction: String,
    /// The query.
    pub query: String,
    /// The output.
    pub output: String,
    /// The feedback on the output, in the submitter's format.
    pub feedback: Value,
    /// Relabel policy that produced the instructions below.
    pub policy: String,
    /// Instruction the output is trained under.
    pub positive_instruction: String,
    /// Instruction the output is contrasted against.
    pub negative_instruction: String,
}

impl Store {
    /// Stores feedback tuples in one transaction. Tuples whose
    /// `(source, external_id)` is already stored are left untouched.
    /// Returns how many rows were new.
    ///
    /// Rows are inserted in the order of their key, whatever the order of `tuples`: an
    /// insert waits on a concurrent transaction's uncommitted row with the same key, so
    /// two calls holding the same new keys in different orders would each wait for the
    /// other (a deadlock). In one order, the later call waits for the earlier one and then
    /// skips what it stored.
    #[tracing::instrument(name = "Inserting feedback", skip_all, fields(tuples = tuples.len()))]
    pub async fn insert_feedback(&self, tuples: &[NewFeedback]) -> Result<u64> {
        for (i, t) in tuples.iter().enumerate() {
            if t.source.is_empty() || t.external_id.is_empty() {
                return Err(StoreError::Invalid(format!(
                    "feedback[{i}].source and feedback[{i}].external_id must not be empty"
                )));
            }
        }
        let mut sorted: Vec<&NewFeedback> = tuples.iter().collect();
        sorted.sort_by(|a, b| (&a.source, &a.external_id).cmp(&(&b.source, &b.external_id)));
        let mut inserted = 0;
        let mut tx = self.pool().begin().await?;
        for chunk in sorted.chunks(FEEDBACK_CHUNK) {
            let source: Vec<&str> = chunk.iter().map(|t| t.source.as_str()).collect();
            let external_id: Vec<&str> = chunk.iter().map(|t| t.external_id.as_str()).collect();
            let run_id: Vec<Option<Uuid>> = chunk.iter().map(|t| t.run_id).collect();
            let instruction: Vec<&str> = chunk.iter().map(|t| t.instruction.as_str()).collect();
            let query: Vec<&str> = chunk.iter().map(|t| t.query.as_str()).collect();
            let output: Vec<&str> = chunk.iter().map(|t| t.output.as_str()).collect();
            let feedback: Vec<&Value> = chunk.iter().map(|t| &t.feedback).collect();
            let policy: Vec<&str> = chunk.iter().map(|t| t.policy.as_str()).collect();
            let positive: Vec<&str> = chunk
                .iter()
                .map(|t| t.positive_instruction.as_str())
                .collect();
            let negative: Vec<&str> = chunk
                .iter()
                .map(|t| t.negative_instruction.as_str())
                .collect();
            let result = sqlx::query(
                "INSERT INTO feedback (source, external_id, run_id, instruction, query, output,
                                       feedback, policy, positive_instruction, negative_instruction)
                 SELECT s, e, r, i, q, o, f, p, pos, neg
                 FROM UNNEST($1::text[], $2::text[], $3::uuid[], $4::text[], $5::text[],
                             $6::text[], $7::jsonb[], $8::text[], $9::text[], $10::text[])
                      WITH ORDINALITY AS u(s, e, r, i, q, o, f, p, pos, neg, n)
                 ORDER BY n
                 ON CONFLICT (source, external_id) DO NOTHING",
            )
            .bind(&source)
            .bind(&external_id)
            .bind(&run_id)
            .bind(&instruction)
            .bind(&query)
            .bind(&output)
            .bind(&feedback)
            .bind(&policy)
            .bind(&positive)
            .bind(&negative)
            .execute(&mut *tx)
            .await
            .map_err(db_error("inserting feedback"))?;
            inserted += result.rows_affected();
        }
        tx.commit().await?;
        Ok(inserted)
    }
}
