use hir_store::{NewEvalResult, NewFeedback, StoreError};
use serde_json::json;
use sqlx::PgPool;

use crate::helpers::fixture;

#[sqlx::test(migrator = "hir_store::MIGRATOR")]
async fn resubmitted_feedback_is_stored_once(pool: PgPool) {
    let f = fixture(pool).await;
    let tuple = |external_id: &str, run| NewFeedback {
        source: "chat-ui".into(),
        external_id: external_id.into(),
        run_id: run,
        instruction: "Answer briefly.".into(),
        query: "What is 2 + 2?".into(),
        output: "4".into(),
        feedback: json!({ "thumbs": "up", "note": null }),
        policy: "hir_paper".into(),
        positive_instruction: "Answer briefly.".into(),
        negative_instruction: "Answer at length.".into(),
    };
    let tuples = vec![tuple("m-1", Some(f.run_id)), tuple("m-2", None)];
    assert_eq!(f.store.insert_feedback(&tuples).await.unwrap(), 2);
    assert_eq!(f.store.insert_feedback(&tuples).await.unwrap(), 0);
    assert_eq!(f.count("feedback").await, 2);

    let stored: serde_json::Value =
        sqlx::query_scalar("SELECT feedback FROM feedback WHERE external_id = 'm-1'")
            .fetch_one(f.store.pool())
            .await
            .unwrap();
    assert_eq!(stored, json!({ "thumbs": "up", "note": null }));

    let err = f
        .store
        .insert_feedback(&[tuple("", None)])
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Invalid(ref m) if m.contains("external_id")),
        "{err}"
    );
}

#[sqlx::test(migrator = "hir_store::MIGRATOR")]
async fn an_eval_result_for_an_unknown_example_is_not_found(pool: PgPool) {
    let f = fixture(pool).await;
    let result = NewEvalResult {
        model_version_id: f.version.id,
        task_id: f.task.id,
        example_idx: 50,
        prompt_style: "raw".into(),
        run_id: None,
        iteration: None,
        output: "(B)".into(),
        correct: false,
        correct_extracted: false,
        predicted: None,
    };
    let err = f.store.record_eval_results(&[result]).await.unwrap_err();
    assert!(
        matches!(err, StoreError::NotFound { ref what } if what.contains("example_idx")),
        "{err}"
    );
    assert_eq!(f.count("eval_results").await, 0);
}

#[sqlx::test(migrator = "hir_store::MIGRATOR")]
async fn concurrent_feedback_in_different_orders_is_stored_once(pool: PgPool) {
    let f = fixture(pool).await;
    let tuples: Vec<NewFeedback> = (0..200)
        .map(|i| NewFeedback {
            source: "chat-ui".into(),
            external_id: format!("m-{i:03}"),
            run_id: None,
            instruction: "Answer briefly.".into(),
            query: format!("What is {i} + 1?"),
            output: format!("{}", i + 1),
            feedback: json!({ "thumbs": "up" }),
            policy: "hir_paper".into(),
            positive_instruction: "Answer briefly.".into(),
            negative_instruction: "Answer at length.".into(),
        })
        .collect();
    let writers: Vec<_> = (0..8u64)
        .map(|k| {
            let store = f.store.clone();
            let mut copy = tuples.clone();
            let mut rng = hir_core::rng::SplitMix64::new(k + 1);
            for i in (1..copy.len()).rev() {
                copy.swap(i, rng.below(i as u64 + 1) as usize);
            }
            tokio::spawn(async move { store.insert_feedback(&copy).await })
        })
        .collect();
    let mut inserted = 0;
    for w in writers {
        inserted += w.await.unwrap().unwrap();
    }
    assert_eq!(inserted, 200, "each tuple inserted by exactly one writer");
    assert_eq!(f.count("feedback").await, 200);
}

/// iteration, version, example, exact, extracted, predicted.
type Read<'a> = (i32, &'a str, i32, bool, bool, Option<&'a str>);

#[sqlx::test(migrator = "hir_store::MIGRATOR")]
async fn a_versions_answers_and_correct_items_are_read_back_per_style(pool: PgPool) {
    let f = fixture(pool).await;
    let result = |example_idx: i32, style: &str, correct: bool, extracted: bool| NewEvalResult {
        model_version_id: f.version.id,
        task_id: f.task.id,
        example_idx,
        prompt_style: style.into(),
        run_id: Some(f.run_id),
        iteration: Some(0),
        output: format!("answer {example_idx} {style}"),
        correct,
        correct_extracted: extracted,
        predicted: extracted.then(|| "(C)".to_string()),
    };
    f.store
        .record_eval_results(&[
            result(3, "chat+new16", true, true),
            result(1, "chat+new16", false, true),
            result(2, "chat+new16", false, false),
        ])
        .await
        .unwrap();
    f.store
        .record_eval_results(&[result(1, "chat+new32", true, true)])
        .await
        .unwrap();
    let items = f.store.run_eval_items(f.run_id).await.unwrap();
    let read: Vec<Read> = items
        .iter()
        .map(|i| {
            (
                i.iteration,
                i.version.as_str(),
                i.example_idx,
                i.correct,
                i.correct_extracted,
                i.predicted.as_deref(),
            )
        })
        .collect();
    let v = f.version.name.as_str();
    // Both styles' results are the run's, in example order.
    assert_eq!(
        read,
        [
            (0, v, 1, false, true, Some("(C)")),
            (0, v, 1, true, true, Some("(C)")),
            (0, v, 2, false, false, None),
            (0, v, 3, true, true, Some("(C)")),
        ]
    );
    assert!(items.iter().all(|i| i.task == f.task.name));
    let outputs = f
        .store
        .eval_outputs(f.version.id, f.task.id, "chat+new32")
        .await
        .unwrap();
    assert_eq!(outputs.len(), 1);
    assert_eq!(outputs[&1], "answer 1 chat+new32");
    assert!(f
        .store
        .eval_outputs(f.version.id, f.task.id, "raw+new16")
        .await
        .unwrap()
        .is_empty());
}

#[sqlx::test(migrator = "hir_store::MIGRATOR")]
async fn a_run_that_reuses_stored_answers_sees_them_as_its_own(pool: PgPool) {
    let f = fixture(pool).await;
    let result = |run_id, iteration, idx: i32, correct: bool| NewEvalResult {
        model_version_id: f.version.id,
        task_id: f.task.id,
        example_idx: idx,
        prompt_style: "chat+new16".into(),
        run_id: Some(run_id),
        iteration: Some(iteration),
        output: format!("answer {idx}"),
        correct,
        correct_extracted: correct,
        predicted: None,
    };
    assert_eq!(
        f.store
            .record_eval_results(&[result(f.run_id, 0, 8, true), result(f.run_id, 0, 9, false)])
            .await
            .unwrap(),
        2
    );
    // A second run scores the same version on the same items: nothing new is written, and
    // the items are linked to it.
    let second = uuid::Uuid::new_v4();
    f.store
        .create_run(&crate::helpers::new_run(second))
        .await
        .unwrap();
    let reused = [result(second, 0, 8, true), result(second, 0, 9, false)];
    assert_eq!(f.store.record_eval_results(&reused).await.unwrap(), 0);
    assert_eq!(f.store.record_eval_results(&reused).await.unwrap(), 0);
    assert_eq!(f.count("eval_results").await, 2);
    assert_eq!(f.count("run_eval_items").await, 4);
    for run in [f.run_id, second] {
        let items = f.store.run_eval_items(run).await.unwrap();
        let read: Vec<(i32, i32, bool)> = items
            .iter()
            .map(|i| (i.iteration, i.example_idx, i.correct))
            .collect();
        assert_eq!(read, [(0, 8, true), (0, 9, false)], "run {run}");
        // The SQL view agrees, per run.
        let (n, accuracy): (i64, f64) = sqlx::query_as(
            "SELECT n, accuracy FROM eval_accuracy WHERE run_id = $1 AND iteration = 0",
        )
        .bind(run)
        .fetch_one(f.store.pool())
        .await
        .unwrap();
        assert_eq!((n, accuracy), (2, 0.5), "run {run}");
    }
    // A link to a run that does not exist is refused with the reason, and nothing is written.
    let ghost = result(uuid::Uuid::new_v4(), 0, 8, true);
    let err = f.store.record_eval_results(&[ghost]).await.unwrap_err();
    assert!(matches!(err, StoreError::NotFound { .. }), "{err:?}");
    assert!(err.to_string().contains("run_id"), "{err}");
    assert_eq!(f.count("run_eval_items").await, 4);
}
