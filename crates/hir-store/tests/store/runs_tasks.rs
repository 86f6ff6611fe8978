use hir_store::{RunStatus, SplitSide, StoreError};
use sqlx::PgPool;
use uuid::Uuid;

use crate::helpers::{fixture, new_run, new_task, EXAMPLES, TRAIN};

#[sqlx::test(migrator = "hir_store::MIGRATOR")]
async fn creating_a_run_twice_stores_one_row(pool: PgPool) {
    let f = fixture(pool).await;
    let again = f.store.create_run(&new_run(f.run_id)).await.unwrap();
    assert_eq!(again.id, f.run_id);
    assert_eq!(again.status, RunStatus::Pending);
    assert_eq!(f.count("runs").await, 1);
}

#[sqlx::test(migrator = "hir_store::MIGRATOR")]
async fn reusing_a_run_id_with_a_different_name_is_a_conflict(pool: PgPool) {
    let f = fixture(pool).await;
    let mut other = new_run(f.run_id);
    other.name = "another run".into();
    let err = f.store.create_run(&other).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err}");
    assert_eq!(f.store.get_run(f.run_id).await.unwrap().name, "tso3-hir");
}

#[sqlx::test(migrator = "hir_store::MIGRATOR")]
async fn setting_a_run_status_records_the_error(pool: PgPool) {
    let f = fixture(pool).await;
    let run = f
        .store
        .set_run_status(f.run_id, RunStatus::Failed, Some("trainer OOM"))
        .await
        .unwrap();
    assert_eq!(run.status, RunStatus::Failed);
    assert_eq!(run.error.as_deref(), Some("trainer OOM"));
    assert!(run.updated_at >= run.created_at);

    let missing = Uuid::new_v4();
    let err = f
        .store
        .set_run_status(missing, RunStatus::Done, None)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound { .. }), "{err}");
    assert!(err.to_string().contains(&missing.to_string()), "{err}");
}

#[sqlx::test(migrator = "hir_store::MIGRATOR")]
async fn adding_run_tasks_twice_keeps_one_row(pool: PgPool) {
    let f = fixture(pool).await;
    f.store
        .add_run_tasks(f.run_id, &[f.task.id, f.task.id])
        .await
        .unwrap();
    assert_eq!(f.store.run_task_ids(f.run_id).await.unwrap(), [f.task.id]);
    assert_eq!(f.count("run_tasks").await, 1);
}

#[sqlx::test(migrator = "hir_store::MIGRATOR")]
async fn adding_an_unknown_task_to_a_run_is_not_found(pool: PgPool) {
    let f = fixture(pool).await;
    let err = f
        .store
        .add_run_tasks(f.run_id, &[f.task.id + 1000])
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound { .. }), "{err}");
    assert!(err.to_string().contains("upsert the task"), "{err}");
}

#[sqlx::test(migrator = "hir_store::MIGRATOR")]
async fn upserting_a_task_twice_stores_its_examples_once(pool: PgPool) {
    let f = fixture(pool).await;
    let again = f.store.upsert_task(&new_task('a')).await.unwrap();
    assert_eq!(again, f.task);
    assert_eq!(f.count("tasks").await, 1);
    assert_eq!(f.count("examples").await, i64::from(EXAMPLES));

    let by_name = f.store.get_task_by_name(&f.task.name, 1).await.unwrap();
    assert_eq!(by_name.id, f.task.id);
    let err = f.store.get_task_by_name(&f.task.name, 2).await.unwrap_err();
    assert!(matches!(err, StoreError::NotFound { .. }), "{err}");

    let train = f
        .store
        .list_examples(f.task.id, Some(SplitSide::Train))
        .await
        .unwrap();
    let test = f
        .store
        .list_examples(f.task.id, Some(SplitSide::Test))
        .await
        .unwrap();
    let all = f.store.list_examples(f.task.id, None).await.unwrap();
    assert_eq!(train.len(), TRAIN as usize);
    assert_eq!(test.len(), (EXAMPLES - TRAIN) as usize);
    assert_eq!(
        all.iter().map(|e| e.idx).collect::<Vec<_>>(),
        (0..EXAMPLES).collect::<Vec<_>>()
    );
    assert!(test
        .iter()
        .all(|e| e.split == SplitSide::Test && e.idx >= TRAIN));
    assert_eq!(
        all[3].prompt,
        "Solve the question with correct answer.\n\nQ: question 3\nA:"
    );
}

#[sqlx::test(migrator = "hir_store::MIGRATOR")]
async fn another_split_seed_of_a_task_is_its_own_task(pool: PgPool) {
    let f = fixture(pool).await;
    let mut reseeded = new_task('a');
    reseeded.split_seed = 2;
    reseeded.examples[0].split = SplitSide::Test;
    reseeded.examples[EXAMPLES as usize - 1].split = SplitSide::Train;
    let second = f.store.upsert_task(&reseeded).await.unwrap();
    assert_ne!(second.id, f.task.id);
    assert_eq!(
        (second.name.as_str(), second.split_seed),
        (f.task.name.as_str(), 2)
    );
    assert_eq!(f.count("tasks").await, 2);
    assert_eq!(f.count("examples").await, 2 * i64::from(EXAMPLES));
    for (id, first, last) in [
        (f.task.id, SplitSide::Train, SplitSide::Test),
        (second.id, SplitSide::Test, SplitSide::Train),
    ] {
        let e = f.store.list_examples(id, None).await.unwrap();
        assert_eq!(e[0].split, first);
        assert_eq!(e[EXAMPLES as usize - 1].split, last);
    }
    assert_eq!(
        f.store.upsert_task(&reseeded).await.unwrap(),
        second,
        "idempotent"
    );
}

#[sqlx::test(migrator = "hir_store::MIGRATOR")]
async fn a_different_source_under_a_stored_task_name_is_a_conflict(pool: PgPool) {
    let f = fixture(pool).await;
    let mut changed = new_task('c');
    changed.examples[0].target = "(A)".into();
    let err = f.store.upsert_task(&changed).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err}");
    let first = &f.store.list_examples(f.task.id, None).await.unwrap()[0];
    assert_eq!(first.target, "(C)", "stored examples must not change");
}

#[sqlx::test(migrator = "hir_store::MIGRATOR")]
async fn a_task_whose_train_size_disagrees_with_its_examples_is_invalid(pool: PgPool) {
    let f = fixture(pool).await;
    let mut task = new_task('d');
    task.name = "object_counting".into();
    task.train_size = TRAIN - 1;
    let err = f.store.upsert_task(&task).await.unwrap_err();
    assert!(
        matches!(err, StoreError::Invalid(ref m) if m.contains("train_size")),
        "{err}"
    );

    task.train_size = TRAIN;
    task.examples[1].idx = 0;
    let err = f.store.upsert_task(&task).await.unwrap_err();
    assert!(
        matches!(err, StoreError::Invalid(ref m) if m.contains("appears twice")),
        "{err}"
    );
    assert_eq!(f.count("tasks").await, 1);
}

#[sqlx::test(migrator = "hir_store::MIGRATOR")]
async fn an_unknown_task_name_is_not_found(pool: PgPool) {
    let f = fixture(pool).await;
    let err = f
        .store
        .get_task_by_name("word_sorting", 1)
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::NotFound { ref what } if what.contains("word_sorting")),
        "{err}"
    );
}
