//! Health, graceful shutdown and a model that fails to load.

use super::*;

#[tokio::test]
async fn health_and_graceful_shutdown() {
    let mut s = start("health", |_| {}).await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(s.channel.clone());
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "hir.v1.GeneratorService".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    // A stream running when shutdown starts still completes.
    let mut client = s.client.clone();
    let running = tokio::spawn(async move {
        collect(&mut client, request(&["w2 w3"], 4, 1.0, 100, Some(5))).await
    });
    // Wait until the engine has admitted it, then stop the server.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while scrape(s.metrics, "hir_generator_running_sequences").await == 0.0 {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::task::yield_now().await;
    }
    s.stop.take().unwrap().send(()).unwrap();
    let completions = running
        .await
        .unwrap()
        .expect("the running stream finishes during shutdown");
    assert_eq!(completions.len(), 4);
    s.done.await.unwrap().unwrap();
    let _ = std::fs::remove_dir_all(&s.root);
}

#[tokio::test]
async fn a_model_that_fails_to_load_ends_the_server_with_the_reason() {
    let config = GeneratorConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen: None,
        model: PathBuf::from("/no/such/model"),
        ..GeneratorConfig::default()
    };
    let app = Application::bind(config)
        .await
        .expect("binding needs no model");
    let err = app.run_until(std::future::pending()).await.unwrap_err();
    assert!(format!("{err:#}").contains("/no/such/model"), "{err:#}");
}
