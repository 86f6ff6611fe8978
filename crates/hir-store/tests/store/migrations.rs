use sqlx::PgPool;

#[sqlx::test(migrator = "hir_store::MIGRATOR")]
async fn migrations_create_every_table_and_view(pool: PgPool) {
    let relations: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables
         WHERE table_schema = 'public' AND table_name <> '_sqlx_migrations'
         ORDER BY table_name",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        relations,
        [
            "batch_samples",
            "batches_consumed",
            "eval_accuracy",
            "eval_results",
            "examples",
            "feedback",
            "iteration_accuracy",
            "iterations",
            "model_versions",
            "relabels",
            "run_eval_items",
            "run_tasks",
            "runs",
            "sample_details",
            "samples",
            "tasks",
            "trainer_states",
            "training_batches",
            "training_steps",
        ]
    );
}

#[sqlx::test(migrator = "hir_store::MIGRATOR")]
async fn running_migrations_again_is_a_no_op(pool: PgPool) {
    let store = hir_store::Store::from_pool(pool);
    store
        .migrate()
        .await
        .expect("second migration run succeeds");
}
