use hir_store::{BatchPlan, NewEvalResult, NewRelabel};
use serde_json::json;
use sqlx::PgPool;
use std::time::Duration;

use crate::helpers::fixture;

#[sqlx::test(migrator = "hir_store::MIGRATOR")]
async fn iteration_accuracy_is_the_share_of_correct_samples(pool: PgPool) {
    let f = fixture(pool).await;
    let mut samples = f.samples(0, 10, 4);
    // Two wrong outputs whose extracted answer matched anyway.
    samples[6].correct_extracted = true;
    samples[7].correct_extracted = true;
    f.store.insert_scored_samples(&samples).await.unwrap();
    f.store.ensure_iteration(f.run_id, 1).await.unwrap();
    f.store
        .insert_scored_samples(&f.samples(1, 4, 3))
        .await
        .unwrap();

    let rows = f.store.iteration_accuracy(f.run_id).await.unwrap();
    assert_eq!(rows.len(), 2);
    let it0 = &rows[0];
    assert_eq!(
        (
            it0.iteration,
            it0.samples,
            it0.correct,
            it0.correct_extracted
        ),
        (0, 10, 4, 6)
    );
    assert!((it0.accuracy - 0.4).abs() < 1e-12, "{}", it0.accuracy);
    assert!((it0.accuracy_extracted - 0.6).abs() < 1e-12);
    assert_eq!(it0.task, "tracking_shuffled_objects_three_objects");
    assert!((rows[1].accuracy - 0.75).abs() < 1e-12);

    // Plain SQL gives the same answer.
    let accuracy: f64 = sqlx::query_scalar(
        "SELECT accuracy FROM iteration_accuracy WHERE run_name = 'tso3-hir' AND iteration = 0",
    )
    .fetch_one(f.store.pool())
    .await
    .unwrap();
    assert!((accuracy - 0.4).abs() < 1e-12);
}

#[sqlx::test(migrator = "hir_store::MIGRATOR")]
async fn sample_details_lists_every_relabel_and_samples_without_one(pool: PgPool) {
    let f = fixture(pool).await;
    let mut samples = f.samples(0, 2, 1);
    samples[0].relabels.push(NewRelabel {
        policy: "sub_output".into(),
        positive_instruction: "p".into(),
        negative_instruction: "n".into(),
    });
    samples[1].relabels.clear();
    f.store.insert_scored_samples(&samples).await.unwrap();

    let rows: Vec<(i32, String, Option<String>, Option<String>)> = sqlx::query_as(
        "SELECT example_idx, version, policy, positive_instruction
         FROM sample_details ORDER BY example_idx, policy",
    )
    .fetch_all(f.store.pool())
    .await
    .unwrap();
    assert_eq!(
        rows,
        [
            (
                0,
                f.version.name.clone(),
                Some("hir_paper".into()),
                Some("Solve question with correct answer.".into())
            ),
            (
                0,
                f.version.name.clone(),
                Some("sub_output".into()),
                Some("p".into())
            ),
            (1, f.version.name.clone(), None, None),
        ]
    );
}

#[sqlx::test(migrator = "hir_store::MIGRATOR")]
async fn eval_accuracy_is_per_version_task_and_prompt_style(pool: PgPool) {
    let f = fixture(pool).await;
    let result = |idx: i32, style: &str, correct: bool| NewEvalResult {
        model_version_id: f.version.id,
        task_id: f.task.id,
        example_idx: idx,
        prompt_style: style.into(),
        run_id: Some(f.run_id),
        iteration: Some(0),
        output: if correct {
            "(C)".into()
        } else {
            "(A) orange ball".into()
        },
        correct,
        correct_extracted: correct || idx == 8,
        predicted: Some(if correct { "(C)".into() } else { "(A)".into() }),
    };
    // Test examples 8 and 9: raw gets one right, chat gets both right.
    let results = vec![
        result(8, "raw", false),
        result(9, "raw", true),
        result(8, "chat", true),
        result(9, "chat", true),
    ];
    assert_eq!(f.store.record_eval_results(&results).await.unwrap(), 4);
    assert_eq!(f.store.record_eval_results(&results).await.unwrap(), 0);
    assert_eq!(f.count("eval_results").await, 4);

    let rows = f.store.eval_accuracy(f.version.id).await.unwrap();
    let summary: Vec<(&str, i64, f64, f64)> = rows
        .iter()
        .map(|r| {
            (
                r.prompt_style.as_str(),
                r.n,
                r.accuracy,
                r.accuracy_extracted,
            )
        })
        .collect();
    assert_eq!(summary, [("chat", 2, 1.0, 1.0), ("raw", 2, 0.5, 1.0)]);
    assert_eq!(rows[0].version, f.version.name);
    assert_eq!(rows[0].run_id, Some(f.run_id));
}

/// batch_idx, status, lease_owner, samples, done, progress.
type BatchRow = (
    i32,
    String,
    Option<String>,
    i64,
    bool,
    Option<serde_json::Value>,
);

#[sqlx::test(migrator = "hir_store::MIGRATOR")]
async fn batches_consumed_reports_size_owner_and_progress(pool: PgPool) {
    let f = fixture(pool).await;
    f.store
        .insert_scored_samples(&f.samples(0, 5, 2))
        .await
        .unwrap();
    f.store
        .create_batches(f.run_id, 0, &BatchPlan::new(3))
        .await
        .unwrap();
    let leased = f
        .store
        .lease_batches(f.run_id, "trainer-a", 1, Duration::from_secs(60))
        .await
        .unwrap();
    let mut tx = f.store.pool().begin().await.unwrap();
    hir_store::Store::complete_batch(&mut tx, leased[0].id, "trainer-a", &json!({ "step": 1 }))
        .await
        .unwrap();
    tx.commit().await.unwrap();

    let rows: Vec<BatchRow> = sqlx::query_as(
        "SELECT batch_idx, status, lease_owner, samples, done_at IS NOT NULL, progress
         FROM batches_consumed WHERE run_id = $1 ORDER BY batch_idx",
    )
    .bind(f.run_id)
    .fetch_all(f.store.pool())
    .await
    .unwrap();
    assert_eq!(
        rows,
        [
            (
                0,
                "done".into(),
                Some("trainer-a".into()),
                3,
                true,
                Some(json!({ "step": 1 }))
            ),
            (1, "pending".into(), None, 2, false, None),
        ]
    );
}
