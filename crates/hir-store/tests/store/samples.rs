use hir_store::samples::SAMPLE_CHUNK;
use hir_store::{InsertedSamples, NewRelabel, StoreError};
use sqlx::PgPool;
use uuid::Uuid;

use crate::helpers::{fixture, POLICY};

#[sqlx::test(migrator = "hir_store::MIGRATOR")]
async fn writing_the_same_samples_twice_adds_no_rows(pool: PgPool) {
    let f = fixture(pool).await;
    let samples = f.samples(0, 12, 5);
    let first = f.store.insert_scored_samples(&samples).await.unwrap();
    assert_eq!(
        first,
        InsertedSamples {
            samples: 12,
            relabels: 12
        }
    );
    let second = f.store.insert_scored_samples(&samples).await.unwrap();
    assert_eq!(
        second,
        InsertedSamples {
            samples: 0,
            relabels: 0
        }
    );
    assert_eq!(f.count("samples").await, 12);
    assert_eq!(f.count("relabels").await, 12);
}

#[sqlx::test(migrator = "hir_store::MIGRATOR")]
async fn relabels_and_tokens_land_with_their_samples(pool: PgPool) {
    let f = fixture(pool).await;
    let mut samples = f.samples(0, 6, 2);
    samples[3].output_tokens = vec![];
    samples[4].output_tokens = vec![5, -1, i32::MAX];
    f.store.insert_scored_samples(&samples).await.unwrap();

    let ids: Vec<i64> = sqlx::query_scalar("SELECT id FROM samples ORDER BY id")
        .fetch_all(f.store.pool())
        .await
        .unwrap();
    let stored = f.store.get_samples(&ids).await.unwrap();
    let relabels = f.store.list_relabels(&ids).await.unwrap();
    assert_eq!(stored.len(), 6);
    assert_eq!(relabels.len(), 6);
    for (want, (got, relabel)) in samples.iter().zip(stored.iter().zip(&relabels)) {
        assert_eq!(
            (
                got.example_idx,
                got.sample_idx,
                &got.output,
                &got.output_tokens,
                got.correct
            ),
            (
                want.example_idx,
                want.sample_idx,
                &want.output,
                &want.output_tokens,
                want.correct
            )
        );
        assert_eq!(relabel.sample_id, got.id);
        assert_eq!(relabel.policy, POLICY);
        assert_eq!(
            relabel.positive_instruction,
            want.relabels[0].positive_instruction
        );
        assert_eq!(
            relabel.negative_instruction,
            want.relabels[0].negative_instruction
        );
    }
    assert_eq!(
        relabels[0].positive_instruction,
        "Solve question with correct answer."
    );
    assert_eq!(
        relabels[5].positive_instruction,
        "Solve the question with wrong answer."
    );
}

#[sqlx::test(migrator = "hir_store::MIGRATOR")]
async fn a_half_written_batch_can_be_retried_in_full(pool: PgPool) {
    let f = fixture(pool).await;
    let samples = f.samples(0, 10, 3);
    f.store.insert_scored_samples(&samples[..4]).await.unwrap();
    let rest = f.store.insert_scored_samples(&samples).await.unwrap();
    assert_eq!(
        rest,
        InsertedSamples {
            samples: 6,
            relabels: 6
        }
    );
    assert_eq!(f.count("samples").await, 10);
}

#[sqlx::test(migrator = "hir_store::MIGRATOR")]
async fn a_second_policy_adds_relabels_to_stored_samples(pool: PgPool) {
    let f = fixture(pool).await;
    let mut samples = f.samples(0, 4, 2);
    f.store.insert_scored_samples(&samples).await.unwrap();
    for s in &mut samples {
        s.relabels.push(NewRelabel {
            policy: "sub_output".into(),
            positive_instruction: "Solve the question with correct answer.".into(),
            negative_instruction: "Solve the question with wrong answer.".into(),
        });
    }
    let added = f.store.insert_scored_samples(&samples).await.unwrap();
    assert_eq!(
        added,
        InsertedSamples {
            samples: 0,
            relabels: 4
        }
    );
    assert_eq!(f.count("relabels").await, 8);
}

#[sqlx::test(migrator = "hir_store::MIGRATOR")]
async fn writes_larger_than_one_chunk_are_complete_and_keep_their_tokens(pool: PgPool) {
    let f = fixture(pool).await;
    let n = i32::try_from(SAMPLE_CHUNK).unwrap() + 7;
    let samples = f.samples(0, n, n / 2);
    let inserted = f.store.insert_scored_samples(&samples).await.unwrap();
    assert_eq!(
        inserted,
        InsertedSamples {
            samples: n as u64,
            relabels: n as u64
        }
    );

    // The first samples of the second chunk must get their own tokens, not
    // tokens sliced with the first chunk's offsets.
    for s in &samples[SAMPLE_CHUNK - 1..SAMPLE_CHUNK + 3] {
        let tokens: Vec<i32> = sqlx::query_scalar(
            "SELECT output_tokens FROM samples WHERE example_idx = $1 AND sample_idx = $2",
        )
        .bind(s.example_idx)
        .bind(s.sample_idx)
        .fetch_one(f.store.pool())
        .await
        .unwrap();
        assert_eq!(tokens, s.output_tokens);
    }
}

#[sqlx::test(migrator = "hir_store::MIGRATOR")]
async fn a_sample_for_a_missing_iteration_is_not_found_and_nothing_is_written(pool: PgPool) {
    let f = fixture(pool).await;
    let mut samples = f.samples(0, 5, 2);
    samples[4].iteration = 3;
    let err = f.store.insert_scored_samples(&samples).await.unwrap_err();
    assert!(
        matches!(err, StoreError::NotFound { ref what } if what.contains("ensure_iteration")),
        "{err}"
    );
    assert_eq!(
        f.count("samples").await,
        0,
        "the whole write is one transaction"
    );
}

#[sqlx::test(migrator = "hir_store::MIGRATOR")]
async fn a_sample_for_an_unknown_example_or_version_is_not_found(pool: PgPool) {
    let f = fixture(pool).await;
    let mut sample = f.sample(0, 0, true);
    sample.example_idx = 999;
    let err = f.store.insert_scored_samples(&[sample]).await.unwrap_err();
    assert!(
        matches!(err, StoreError::NotFound { ref what } if what.contains("example_idx")),
        "{err}"
    );

    let mut sample = f.sample(0, 0, true);
    sample.model_version_id = f.version.id + 1;
    let err = f.store.insert_scored_samples(&[sample]).await.unwrap_err();
    assert!(
        matches!(err, StoreError::NotFound { ref what } if what.contains("model_version")),
        "{err}"
    );

    let mut sample = f.sample(0, 0, true);
    sample.run_id = Uuid::new_v4();
    let err = f.store.insert_scored_samples(&[sample]).await.unwrap_err();
    assert!(matches!(err, StoreError::NotFound { .. }), "{err}");
}

#[sqlx::test(migrator = "hir_store::MIGRATOR")]
async fn out_of_range_fields_are_invalid_and_name_the_field(pool: PgPool) {
    let f = fixture(pool).await;
    let mut samples = f.samples(0, 3, 1);
    samples[2].score = 1.5;
    let err = f.store.insert_scored_samples(&samples).await.unwrap_err();
    assert!(
        matches!(err, StoreError::Invalid(ref m) if m.contains("samples[2].score")),
        "{err}"
    );

    samples[2].score = f32::NAN;
    assert!(matches!(
        f.store.insert_scored_samples(&samples).await,
        Err(StoreError::Invalid(_))
    ));

    samples[2].score = 0.5;
    samples[1].sample_idx = -1;
    let err = f.store.insert_scored_samples(&samples).await.unwrap_err();
    assert!(
        matches!(err, StoreError::Invalid(ref m) if m.contains("samples[1].sample_idx")),
        "{err}"
    );
    assert_eq!(f.count("samples").await, 0);
}
