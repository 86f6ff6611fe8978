use hir_store::{IterationStatus as S, StoreError};
use sqlx::PgPool;

use crate::helpers::fixture;

#[sqlx::test(migrator = "hir_store::MIGRATOR")]
async fn ensuring_an_iteration_twice_keeps_one_row_and_its_status(pool: PgPool) {
    let f = fixture(pool).await;
    f.store
        .advance_iteration(f.run_id, 0, S::Sampling)
        .await
        .unwrap();
    let again = f.store.ensure_iteration(f.run_id, 0).await.unwrap();
    assert_eq!(
        again.status,
        S::Sampling,
        "ensure must not reset the status"
    );
    assert_eq!(f.count("iterations").await, 1);
}

#[sqlx::test(migrator = "hir_store::MIGRATOR")]
async fn an_iteration_walks_its_statuses_and_finishes(pool: PgPool) {
    let f = fixture(pool).await;
    let steps = [
        (S::Pending, S::Sampling),
        (S::Sampling, S::Sampled),
        (S::Sampled, S::Training),
        (S::Training, S::Trained),
        (S::Trained, S::Evaluating),
    ];
    for (from, to) in steps {
        assert!(hir_store::iterations::TRANSITIONS.contains(&(from, to)));
        let it = f.store.advance_iteration(f.run_id, 0, to).await.unwrap();
        assert_eq!(it.status, to);
        assert!(it.finished_at.is_none());
    }
    let done = f
        .store
        .advance_iteration(f.run_id, 0, S::Done)
        .await
        .unwrap();
    assert_eq!(done.status, S::Done);
    assert!(done.finished_at.is_some());
}

#[sqlx::test(migrator = "hir_store::MIGRATOR")]
async fn advancing_from_an_unexpected_status_is_refused_and_changes_nothing(pool: PgPool) {
    let f = fixture(pool).await;
    let err = f
        .store
        .advance_iteration(f.run_id, 0, S::Trained)
        .await
        .unwrap_err();
    match &err {
        StoreError::InvalidTransition {
            current,
            requested,
            expected,
            ..
        } => {
            assert_eq!(current, "pending");
            assert_eq!(requested, "trained");
            assert_eq!(expected, "sampled, training");
        }
        other => panic!("expected InvalidTransition, got {other}"),
    }
    assert_eq!(
        f.store.get_iteration(f.run_id, 0).await.unwrap().status,
        S::Pending
    );
}

#[sqlx::test(migrator = "hir_store::MIGRATOR")]
async fn advancing_a_missing_iteration_is_not_found(pool: PgPool) {
    let f = fixture(pool).await;
    let err = f
        .store
        .advance_iteration(f.run_id, 7, S::Sampling)
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::NotFound { ref what } if what.contains("iteration 7")),
        "{err}"
    );
}

#[sqlx::test(migrator = "hir_store::MIGRATOR")]
async fn failing_an_iteration_records_the_error_but_a_done_one_cannot_fail(pool: PgPool) {
    let f = fixture(pool).await;
    f.store
        .advance_iteration(f.run_id, 0, S::Sampling)
        .await
        .unwrap();
    let failed = f
        .store
        .fail_iteration(f.run_id, 0, "generator unreachable")
        .await
        .unwrap();
    assert_eq!(failed.status, S::Failed);
    assert_eq!(failed.error.as_deref(), Some("generator unreachable"));
    assert!(failed.finished_at.is_some());

    f.store.ensure_iteration(f.run_id, 1).await.unwrap();
    for to in [S::Evaluating, S::Done] {
        f.store.advance_iteration(f.run_id, 1, to).await.unwrap();
    }
    let err = f
        .store
        .fail_iteration(f.run_id, 1, "late failure")
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::InvalidTransition { .. }), "{err}");
    let it = f.store.get_iteration(f.run_id, 1).await.unwrap();
    assert_eq!((it.status, it.error), (S::Done, None));
}

#[sqlx::test(migrator = "hir_store::MIGRATOR")]
async fn a_negative_iteration_is_invalid(pool: PgPool) {
    let f = fixture(pool).await;
    let err = f.store.ensure_iteration(f.run_id, -1).await.unwrap_err();
    assert!(
        matches!(err, StoreError::Invalid(ref m) if m.contains("iteration")),
        "{err}"
    );
}
