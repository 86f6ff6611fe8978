use hir_store::{BatchPlan, BatchStatus, Store, StoreError};
use serde_json::json;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Barrier;

use crate::helpers::{fixture, Fixture};

const MINUTE: Duration = Duration::from_secs(60);

/// Stores `n` samples in iteration 0 and cuts them into batches of `size`.
async fn batched(f: &Fixture, n: i32, size: i32) -> Vec<hir_store::TrainingBatch> {
    f.store
        .insert_scored_samples(&f.samples(0, n, n / 2))
        .await
        .unwrap();
    f.store
        .create_batches(f.run_id, 0, &BatchPlan::new(size))
        .await
        .unwrap()
}

async fn sample_ids(f: &Fixture, iteration: i32) -> Vec<i64> {
    sqlx::query_scalar("SELECT id FROM samples WHERE iteration = $1 ORDER BY id")
        .bind(iteration)
        .fetch_all(f.store.pool())
        .await
        .unwrap()
}

#[sqlx::test(migrator = "hir_store::MIGRATOR")]
async fn batches_cover_the_iterations_samples_in_id_order(pool: PgPool) {
    let f = fixture(pool).await;
    let batches = batched(&f, 10, 4).await;
    assert_eq!(
        batches.iter().map(|b| b.batch_idx).collect::<Vec<_>>(),
        [0, 1, 2]
    );
    assert!(batches
        .iter()
        .all(|b| b.status == BatchStatus::Pending && b.attempts == 0));

    let mut sizes = Vec::new();
    let mut concatenated = Vec::new();
    for b in &batches {
        let ids = f.store.batch_sample_ids(b.id).await.unwrap();
        sizes.push(ids.len());
        concatenated.extend(ids);
    }
    assert_eq!(sizes, [4, 4, 2]);
    assert_eq!(concatenated, sample_ids(&f, 0).await);
}

#[sqlx::test(migrator = "hir_store::MIGRATOR")]
async fn creating_batches_twice_returns_the_same_batches(pool: PgPool) {
    let f = fixture(pool).await;
    let first = batched(&f, 10, 4).await;
    let second = f
        .store
        .create_batches(f.run_id, 0, &BatchPlan::new(4))
        .await
        .unwrap();
    assert_eq!(first, second);
    assert_eq!(f.count("training_batches").await, 3);
    assert_eq!(f.count("batch_samples").await, 10);
}

#[sqlx::test(migrator = "hir_store::MIGRATOR")]
async fn replay_batches_include_earlier_iterations_samples(pool: PgPool) {
    let f = fixture(pool).await;
    batched(&f, 6, 4).await;
    f.store.ensure_iteration(f.run_id, 1).await.unwrap();
    f.store
        .insert_scored_samples(&f.samples(1, 3, 1))
        .await
        .unwrap();
    f.store.ensure_iteration(f.run_id, 2).await.unwrap();
    f.store
        .insert_scored_samples(&f.samples(2, 2, 1))
        .await
        .unwrap();

    let replay = f
        .store
        .create_batches(
            f.run_id,
            1,
            &BatchPlan {
                include_replay: true,
                ..BatchPlan::new(100)
            },
        )
        .await
        .unwrap();
    let ids = f.store.batch_sample_ids(replay[0].id).await.unwrap();
    let mut expected = sample_ids(&f, 0).await;
    expected.extend(sample_ids(&f, 1).await);
    assert_eq!(ids, expected, "iterations 0 and 1, not 2");

    let own = f
        .store
        .create_batches(f.run_id, 2, &BatchPlan::new(100))
        .await
        .unwrap();
    assert_eq!(
        f.store.batch_sample_ids(own[0].id).await.unwrap(),
        sample_ids(&f, 2).await
    );
}

#[sqlx::test(migrator = "hir_store::MIGRATOR")]
async fn bad_batch_arguments_are_refused(pool: PgPool) {
    let f = fixture(pool).await;
    let err = f
        .store
        .create_batches(f.run_id, 0, &BatchPlan::new(0))
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Invalid(ref m) if m.contains("batch_size")),
        "{err}"
    );
    let err = f
        .store
        .create_batches(f.run_id, 5, &BatchPlan::new(4))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound { .. }), "{err}");
    let err = f
        .store
        .lease_batches(f.run_id, "t", 0, MINUTE)
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Invalid(ref m) if m.contains("max")),
        "{err}"
    );
}

#[sqlx::test(migrator = "hir_store::MIGRATOR")]
async fn two_concurrent_leasers_never_get_the_same_batch(
    pool_options: PgPoolOptions,
    connect_options: PgConnectOptions,
) {
    let setup = pool_options
        .clone()
        .connect_with(connect_options.clone())
        .await
        .unwrap();
    let f = fixture(setup).await;
    let batches = batched(&f, 40, 1).await;
    assert_eq!(batches.len(), 40);

    // Each trainer has its own pool of one connection, so their statements
    // really run side by side in Postgres.
    let barrier = Arc::new(Barrier::new(2));
    let mut trainers = Vec::new();
    for name in ["trainer-a", "trainer-b"] {
        let pool = pool_options
            .clone()
            .max_connections(1)
            .connect_with(connect_options.clone())
            .await
            .unwrap();
        let store = Store::from_pool(pool);
        let barrier = Arc::clone(&barrier);
        let run_id = f.run_id;
        trainers.push(tokio::spawn(async move {
            barrier.wait().await;
            let mut got = Vec::new();
            loop {
                let leased = store.lease_batches(run_id, name, 3, MINUTE).await.unwrap();
                if leased.is_empty() {
                    return got;
                }
                assert!(leased
                    .iter()
                    .all(|b| b.lease_owner.as_deref() == Some(name)));
                got.extend(leased.into_iter().map(|b| b.id));
            }
        }));
    }
    let a = trainers.remove(0).await.unwrap();
    let b = trainers.remove(0).await.unwrap();

    let a_set: HashSet<i64> = a.iter().copied().collect();
    let b_set: HashSet<i64> = b.iter().copied().collect();
    assert!(
        a_set.is_disjoint(&b_set),
        "both trainers leased {:?}",
        a_set.intersection(&b_set)
    );
    assert_eq!(a.len() + b.len(), 40);
    let attempts: Vec<i32> = sqlx::query_scalar("SELECT DISTINCT attempts FROM training_batches")
        .fetch_all(f.store.pool())
        .await
        .unwrap();
    assert_eq!(attempts, [1], "every batch was leased exactly once");
}

#[sqlx::test(migrator = "hir_store::MIGRATOR")]
async fn leases_go_out_in_queue_order_and_only_once_while_valid(pool: PgPool) {
    let f = fixture(pool).await;
    let batches = batched(&f, 5, 1).await;
    let first = f
        .store
        .lease_batches(f.run_id, "a", 2, MINUTE)
        .await
        .unwrap();
    assert_eq!(
        first.iter().map(|b| b.batch_idx).collect::<Vec<_>>(),
        [0, 1]
    );
    let rest = f
        .store
        .lease_batches(f.run_id, "b", 10, MINUTE)
        .await
        .unwrap();
    assert_eq!(
        rest.iter().map(|b| b.batch_idx).collect::<Vec<_>>(),
        [2, 3, 4]
    );
    assert!(f
        .store
        .lease_batches(f.run_id, "c", 10, MINUTE)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(batches.len(), 5);
}

#[sqlx::test(migrator = "hir_store::MIGRATOR")]
async fn an_expired_lease_returns_the_batch_to_the_queue(pool: PgPool) {
    let f = fixture(pool).await;
    batched(&f, 2, 2).await;
    let leased = f
        .store
        .lease_batches(f.run_id, "slow", 1, Duration::from_millis(5))
        .await
        .unwrap();
    let id = leased[0].id;
    tokio::time::sleep(Duration::from_millis(20)).await;

    let taken = f
        .store
        .lease_batches(f.run_id, "fast", 1, MINUTE)
        .await
        .unwrap();
    assert_eq!(taken[0].id, id);
    assert_eq!(taken[0].lease_owner.as_deref(), Some("fast"));
    assert_eq!(taken[0].attempts, 2);

    // The first owner can no longer complete it.
    let mut tx = f.store.pool().begin().await.unwrap();
    let err = Store::complete_batch(&mut tx, id, "slow", &json!({}))
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Conflict(ref m) if m.contains("leased by \"fast\"")),
        "{err}"
    );
}

#[sqlx::test(migrator = "hir_store::MIGRATOR")]
async fn completing_after_the_lease_expired_is_a_conflict(pool: PgPool) {
    let f = fixture(pool).await;
    batched(&f, 2, 2).await;
    let id = f
        .store
        .lease_batches(f.run_id, "a", 1, MINUTE)
        .await
        .unwrap()[0]
        .id;
    sqlx::query(
        "UPDATE training_batches SET lease_expires_at = now() - interval '1 second' WHERE id = $1",
    )
    .bind(id)
    .execute(f.store.pool())
    .await
    .unwrap();

    let mut tx = f.store.pool().begin().await.unwrap();
    let err = Store::complete_batch(&mut tx, id, "a", &json!({ "step": 1 }))
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Conflict(ref m) if m.contains("expired")),
        "{err}"
    );
    tx.rollback().await.unwrap();

    let again = f
        .store
        .lease_batches(f.run_id, "b", 1, MINUTE)
        .await
        .unwrap();
    assert_eq!(again.iter().map(|b| b.id).collect::<Vec<_>>(), [id]);
}

#[sqlx::test(migrator = "hir_store::MIGRATOR")]
async fn only_the_lease_owner_can_complete_and_a_rollback_keeps_the_lease(pool: PgPool) {
    let f = fixture(pool).await;
    batched(&f, 4, 2).await;
    let id = f
        .store
        .lease_batches(f.run_id, "owner", 1, MINUTE)
        .await
        .unwrap()[0]
        .id;

    let mut tx = f.store.pool().begin().await.unwrap();
    let err = Store::complete_batch(&mut tx, id, "intruder", &json!({}))
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Conflict(ref m) if m.contains("leased by \"owner\"")),
        "{err}"
    );
    tx.rollback().await.unwrap();

    let mut tx = f.store.pool().begin().await.unwrap();
    let done = Store::complete_batch(&mut tx, id, "owner", &json!({ "loss": 1.5 }))
        .await
        .unwrap();
    assert_eq!(done.status, BatchStatus::Done);
    tx.rollback().await.unwrap();

    let batch = f.store.get_batch(id).await.unwrap();
    assert_eq!(batch.status, BatchStatus::Leased);
    assert_eq!(batch.lease_owner.as_deref(), Some("owner"));
    assert_eq!(batch.progress, None);

    let err = Store::complete_batch(
        &mut f.store.pool().begin().await.unwrap(),
        id + 100,
        "owner",
        &json!({}),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, StoreError::NotFound { .. }), "{err}");
}

#[sqlx::test(migrator = "hir_store::MIGRATOR")]
async fn completion_commits_atomically_with_the_trainers_own_writes(pool: PgPool) {
    let f = fixture(pool).await;
    batched(&f, 4, 2).await;
    let id = f
        .store
        .lease_batches(f.run_id, "owner", 1, MINUTE)
        .await
        .unwrap()[0]
        .id;

    let mut tx = f.store.pool().begin().await.unwrap();
    sqlx::query("UPDATE runs SET config = config || '{\"trained_batches\": 1}' WHERE id = $1")
        .bind(f.run_id)
        .execute(&mut *tx)
        .await
        .unwrap();
    Store::complete_batch(&mut tx, id, "owner", &json!({ "step": 7 }))
        .await
        .unwrap();
    tx.commit().await.unwrap();

    let batch = f.store.get_batch(id).await.unwrap();
    assert_eq!(batch.status, BatchStatus::Done);
    assert_eq!(batch.progress, Some(json!({ "step": 7 })));
    assert!(batch.done_at.is_some());
    assert_eq!(
        f.store.get_run(f.run_id).await.unwrap().config["trained_batches"],
        1
    );

    // Done batches are never handed out again, and cannot be completed twice.
    let next = f
        .store
        .lease_batches(f.run_id, "owner", 10, MINUTE)
        .await
        .unwrap();
    assert!(next.iter().all(|b| b.id != id));
    let mut tx = f.store.pool().begin().await.unwrap();
    let err = Store::complete_batch(&mut tx, id, "owner", &json!({}))
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Conflict(ref m) if m.contains("already done")),
        "{err}"
    );
}

#[sqlx::test(migrator = "hir_store::MIGRATOR")]
async fn releasing_a_batch_puts_it_back_and_only_the_owner_may(pool: PgPool) {
    let f = fixture(pool).await;
    batched(&f, 2, 2).await;
    let id = f
        .store
        .lease_batches(f.run_id, "owner", 1, MINUTE)
        .await
        .unwrap()[0]
        .id;

    let err = f.store.release_batch(id, "intruder").await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err}");

    let released = f.store.release_batch(id, "owner").await.unwrap();
    assert_eq!(
        (released.status, released.lease_owner),
        (BatchStatus::Pending, None)
    );
    let again = f
        .store
        .lease_batches(f.run_id, "other", 1, MINUTE)
        .await
        .unwrap();
    assert_eq!((again[0].id, again[0].attempts), (id, 2));
}

/// The sample ids of each batch, in batch order.
async fn contents(f: &Fixture, batches: &[hir_store::TrainingBatch]) -> Vec<Vec<i64>> {
    let mut out = Vec::new();
    for b in batches {
        out.push(f.store.batch_sample_ids(b.id).await.unwrap());
    }
    out
}

#[sqlx::test(migrator = "hir_store::MIGRATOR")]
async fn epochs_are_seeded_shuffles_that_each_cover_every_sample(pool: PgPool) {
    let f = fixture(pool).await;
    f.store
        .insert_scored_samples(&f.samples(0, 10, 5))
        .await
        .unwrap();
    let plan = BatchPlan {
        epochs: 3,
        shuffle_seed: Some(7),
        ..BatchPlan::new(4)
    };
    let batches = f.store.create_batches(f.run_id, 0, &plan).await.unwrap();
    assert_eq!(
        batches.iter().map(|b| b.batch_idx).collect::<Vec<_>>(),
        (0..9).collect::<Vec<_>>(),
        "3 epochs of ceil(10 / 4) batches"
    );
    let all = sample_ids(&f, 0).await;
    let got = contents(&f, &batches).await;
    let mut epochs = Vec::new();
    for epoch in got.chunks(3) {
        assert_eq!(
            epoch.iter().map(Vec::len).collect::<Vec<_>>(),
            [4, 4, 2],
            "an epoch is cut like one pass"
        );
        let mut ids: Vec<i64> = epoch.concat();
        let order = ids.clone();
        ids.sort_unstable();
        assert_eq!(ids, all, "each epoch holds every sample once");
        epochs.push(order);
    }
    assert!(
        epochs[0] != epochs[1] || epochs[1] != epochs[2],
        "epochs are shuffled differently"
    );
    assert_ne!(epochs[0], all, "the order is shuffled, not by id");
}

#[sqlx::test(migrator = "hir_store::MIGRATOR")]
async fn a_policy_filter_and_a_cap_limit_the_batches(pool: PgPool) {
    let f = fixture(pool).await;
    f.store
        .insert_scored_samples(&f.samples(0, 6, 3))
        .await
        .unwrap();
    let none = f
        .store
        .create_batches(
            f.run_id,
            0,
            &BatchPlan {
                policy: Some("farl".into()),
                ..BatchPlan::new(2)
            },
        )
        .await
        .unwrap();
    assert!(none.is_empty(), "no sample is relabeled under farl");

    f.store.ensure_iteration(f.run_id, 1).await.unwrap();
    f.store
        .insert_scored_samples(&f.samples(1, 6, 3))
        .await
        .unwrap();
    let capped = f
        .store
        .create_batches(
            f.run_id,
            1,
            &BatchPlan {
                policy: Some(crate::helpers::POLICY.into()),
                epochs: 2,
                max_batches: Some(4),
                ..BatchPlan::new(2)
            },
        )
        .await
        .unwrap();
    assert_eq!(capped.len(), 4, "2 epochs of 3 batches, capped at 4");
    let err = f
        .store
        .create_batches(
            f.run_id,
            1,
            &BatchPlan {
                epochs: 0,
                ..BatchPlan::new(2)
            },
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Invalid(ref m) if m.contains("epochs")),
        "{err}"
    );
}

#[sqlx::test(migrator = "hir_store::MIGRATOR")]
async fn a_restarted_owner_gives_its_old_leases_back_at_once(pool: PgPool) {
    let f = fixture(pool).await;
    batched(&f, 6, 2).await;
    let mine = f
        .store
        .lease_batches(f.run_id, "trainer-0", 2, MINUTE)
        .await
        .unwrap();
    let theirs = f
        .store
        .lease_batches(f.run_id, "trainer-1", 1, MINUTE)
        .await
        .unwrap();
    // The same owner leasing again does not get its own live leases a second time.
    assert!(f
        .store
        .lease_batches(f.run_id, "trainer-0", 5, MINUTE)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        f.store
            .release_leases_of(f.run_id, "trainer-0")
            .await
            .unwrap(),
        2
    );
    let again = f
        .store
        .lease_batches(f.run_id, "trainer-0", 5, MINUTE)
        .await
        .unwrap();
    assert_eq!(
        again.iter().map(|b| b.id).collect::<Vec<_>>(),
        mine.iter().map(|b| b.id).collect::<Vec<_>>(),
        "only its own batches come back, not the other trainer's"
    );
    assert_eq!(
        f.store
            .get_batch(theirs[0].id)
            .await
            .unwrap()
            .lease_owner
            .as_deref(),
        Some("trainer-1")
    );
}

/// Natural keys `(example, sample)` of a batch's samples, in batch order.
async fn batch_keys(f: &Fixture, batch_id: i64) -> Vec<(i32, i32)> {
    let mut keys = Vec::new();
    for id in f.store.batch_sample_ids(batch_id).await.unwrap() {
        keys.push(
            sqlx::query_as::<_, (i32, i32)>(
                "SELECT example_idx, sample_idx FROM samples WHERE id = $1",
            )
            .bind(id)
            .fetch_one(f.store.pool())
            .await
            .unwrap(),
        );
    }
    keys.sort_unstable();
    keys
}

#[sqlx::test(migrator = "hir_store::MIGRATOR")]
async fn dedup_holdout_and_cap_pick_the_same_samples_whatever_the_write_order(pool: PgPool) {
    let f = fixture(pool).await;
    // 4 prompts x 3 samples; prompt 0 answers "(A)" three times, the others differ.
    let samples = |run_id| -> Vec<hir_store::NewScoredSample> {
        let mut out = Vec::new();
        for e in 0..4 {
            for k in 0..3 {
                let mut s = f.sample(0, e, false);
                s.run_id = run_id;
                s.sample_idx = k;
                s.output = if e == 0 {
                    "(A)".into()
                } else {
                    format!("(A) {k}")
                };
                out.push(s);
            }
        }
        out
    };
    let plan = BatchPlan {
        dedup_outputs: true,
        holdout: 0.25,
        max_samples: Some(5),
        shuffle_seed: Some(3),
        ..BatchPlan::new(100)
    };
    f.store
        .insert_scored_samples(&samples(f.run_id))
        .await
        .unwrap();
    let first = f.store.create_batches(f.run_id, 0, &plan).await.unwrap();
    assert_eq!(first.len(), 1);
    let keys = batch_keys(&f, first[0].id).await;
    // 10 distinct outputs; ceil(2.5) = 3 held out; 7 left, capped at 5.
    assert_eq!(keys.len(), 5, "{keys:?}");
    assert!(
        keys.iter().filter(|(e, _)| *e == 0).all(|(_, k)| *k == 0),
        "one copy of a repeated output, the lowest sample index: {keys:?}"
    );

    // The same samples of another run, written in reverse order, give the same batch.
    let other = uuid::Uuid::new_v4();
    f.store
        .create_run(&crate::helpers::new_run(other))
        .await
        .unwrap();
    f.store.add_run_tasks(other, &[f.task.id]).await.unwrap();
    f.store.ensure_iteration(other, 0).await.unwrap();
    let mut reversed = samples(other);
    reversed.reverse();
    for s in reversed {
        f.store.insert_scored_samples(&[s]).await.unwrap();
    }
    let second = f.store.create_batches(other, 0, &plan).await.unwrap();
    assert_eq!(batch_keys(&f, second[0].id).await, keys);

    // Without de-duplication all 12 count: 3 held out, 9 left, capped at 5.
    let all = BatchPlan {
        dedup_outputs: false,
        max_samples: None,
        ..plan.clone()
    };
    f.store.ensure_iteration(other, 1).await.unwrap();
    let mut again = samples(other);
    for s in &mut again {
        s.iteration = 1;
    }
    f.store.insert_scored_samples(&again).await.unwrap();
    let third = f.store.create_batches(other, 1, &all).await.unwrap();
    assert_eq!(
        f.store.batch_sample_ids(third[0].id).await.unwrap().len(),
        9
    );

    let bad = BatchPlan {
        holdout: 1.0,
        ..plan
    };
    let err = f.store.create_batches(f.run_id, 0, &bad).await.unwrap_err();
    assert!(
        matches!(err, StoreError::Invalid(ref m) if m.contains("holdout")),
        "{err}"
    );
}
