use hir_store::StoreError;
use serde_json::json;
use sqlx::PgPool;

use crate::helpers::{fixture, new_version, sha};

#[sqlx::test(migrator = "hir_store::MIGRATOR")]
async fn registering_a_version_twice_returns_the_same_row(pool: PgPool) {
    let f = fixture(pool).await;
    let mut trained = new_version("flan-t5-large@it0", 'e');
    trained.run_id = Some(f.run_id);
    trained.iteration = Some(0);
    trained.parent_id = Some(f.version.id);
    trained.metrics = json!({ "loss": 0.42 });
    let first = f.store.register_model_version(&trained).await.unwrap();
    let second = f.store.register_model_version(&trained).await.unwrap();
    assert_eq!(first, second);
    assert_eq!(first.parent_id, Some(f.version.id));
    assert_eq!(first.metrics, json!({ "loss": 0.42 }));
    assert_eq!(f.count("model_versions").await, 2);
}

#[sqlx::test(migrator = "hir_store::MIGRATOR")]
async fn a_different_sha256_for_a_registered_name_is_a_conflict(pool: PgPool) {
    let f = fixture(pool).await;
    let err = f
        .store
        .register_model_version(&new_version(&f.version.name, 'f'))
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Conflict(ref m) if m.contains(&sha('b'))),
        "{err}"
    );
    let stored = f
        .store
        .get_model_version_by_name(&f.version.name)
        .await
        .unwrap();
    assert_eq!(stored.sha256, sha('b'));
}

#[sqlx::test(migrator = "hir_store::MIGRATOR")]
async fn a_malformed_sha256_is_invalid(pool: PgPool) {
    let f = fixture(pool).await;
    for bad in [sha('B'), "abc".to_owned(), format!("{}g", &sha('a')[..63])] {
        let mut version = new_version("bad", 'a');
        version.sha256 = bad;
        let err = f.store.register_model_version(&version).await.unwrap_err();
        assert!(
            matches!(err, StoreError::Invalid(ref m) if m.contains("sha256")),
            "{err}"
        );
    }
    assert_eq!(f.count("model_versions").await, 1);
}

#[sqlx::test(migrator = "hir_store::MIGRATOR")]
async fn a_version_with_an_unknown_parent_is_not_found(pool: PgPool) {
    let f = fixture(pool).await;
    let mut version = new_version("orphan", 'c');
    version.parent_id = Some(f.version.id + 99);
    let err = f.store.register_model_version(&version).await.unwrap_err();
    assert!(
        matches!(err, StoreError::NotFound { ref what } if what.contains("parent")),
        "{err}"
    );
}
