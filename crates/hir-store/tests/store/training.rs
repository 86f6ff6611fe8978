use hir_store::{BatchPlan, BatchStatus, NewTrainerState, StoreError};
use serde_json::json;
use sqlx::PgPool;
use std::time::Duration;

use crate::helpers::{fixture, Fixture};

const MINUTE: Duration = Duration::from_secs(60);

fn state(f: &Fixture, step: i64, owner: &str) -> NewTrainerState {
    NewTrainerState {
        run_id: f.run_id,
        step,
        iteration: 0,
        state_uri: format!("state/step-{step}"),
        sha256: format!("{step:064x}"),
        owner: owner.into(),
    }
}

#[sqlx::test(migrator = "hir_store::MIGRATOR")]
async fn committing_marks_batches_done_and_advances_the_state_together(pool: PgPool) {
    let f = fixture(pool).await;
    f.store
        .insert_scored_samples(&f.samples(0, 6, 3))
        .await
        .unwrap();
    f.store
        .create_batches(f.run_id, 0, &BatchPlan::new(2))
        .await
        .unwrap();
    assert_eq!(f.store.trainer_state(f.run_id).await.unwrap(), None);
    let leased = f
        .store
        .lease_batches(f.run_id, "t", 2, MINUTE)
        .await
        .unwrap();
    let progress: Vec<(i64, serde_json::Value)> = leased
        .iter()
        .enumerate()
        .map(|(i, b)| (b.id, json!({"step": i + 1, "loss": 2.0 - i as f64})))
        .collect();
    let s = f
        .store
        .commit_training(&state(&f, 2, "t"), None, &progress)
        .await
        .unwrap();
    assert_eq!((s.step, s.state_uri.as_str()), (2, "state/step-2"));
    for b in &leased {
        assert_eq!(
            f.store.get_batch(b.id).await.unwrap().status,
            BatchStatus::Done
        );
    }
    let summary = f.store.training_summary(f.run_id).await.unwrap();
    assert_eq!((summary[0].steps, summary[0].batches), (2, 3));
    assert!((summary[0].mean_loss.unwrap() - 1.5).abs() < 1e-9);
    let steps: Vec<(i64, f64)> =
        sqlx::query_as("SELECT step, loss FROM training_steps ORDER BY step")
            .fetch_all(f.store.pool())
            .await
            .unwrap();
    assert_eq!(steps, [(1, 2.0), (2, 1.0)]);

    // A stale trainer (expecting no state) cannot commit the last batch: nothing changes.
    let last = f
        .store
        .lease_batches(f.run_id, "t", 1, MINUTE)
        .await
        .unwrap();
    let err = f
        .store
        .commit_training(&state(&f, 3, "t"), Some(0), &[(last[0].id, json!({}))])
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Conflict(ref m) if m.contains("at step 2")),
        "{err}"
    );
    assert_eq!(
        f.store.get_batch(last[0].id).await.unwrap().status,
        BatchStatus::Leased,
        "the batch stays leased when the state does not move"
    );
    // A batch not leased by the committer rolls the state back too.
    let err = f
        .store
        .commit_training(&state(&f, 3, "u"), Some(2), &[(last[0].id, json!({}))])
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err}");
    assert_eq!(
        f.store.trainer_state(f.run_id).await.unwrap().unwrap().step,
        2
    );
    f.store
        .commit_training(
            &state(&f, 3, "t"),
            Some(2),
            &[(last[0].id, json!({"step": 3}))],
        )
        .await
        .unwrap();
}
