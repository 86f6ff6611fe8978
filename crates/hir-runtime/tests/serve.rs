//! The runtime's layers on real sockets.

use std::sync::{Arc, Mutex};

use hir_runtime::auth::BearerAuthLayer;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Channel, Server};
use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};

#[tokio::test]
async fn the_auth_layer_refuses_and_admits_real_calls() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (reporter, health) = hir_proto::health_service();
    reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let layer = BearerAuthLayer::methods(Some("s3cret".into()), ["/grpc.health.v1.Health/Check"]);
    tokio::spawn(
        Server::builder()
            .layer(layer)
            .add_service(health)
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();

    let mut client = HealthClient::new(channel.clone());
    let refused = client
        .check(HealthCheckRequest::default())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    assert!(
        refused.message().contains("Bearer"),
        "{}",
        refused.message()
    );

    let mut authed = HealthClient::with_interceptor(channel, |mut req: tonic::Request<()>| {
        req.metadata_mut()
            .insert("authorization", "Bearer s3cret".parse().unwrap());
        Ok(req)
    });
    assert!(authed.check(HealthCheckRequest::default()).await.is_ok());
}

#[tokio::test]
async fn metrics_are_served_in_the_text_format() {
    let mut registry = Registry::default();
    let counter = Counter::<u64>::default();
    registry.register("hir_test_events", "Events seen", counter.clone());
    counter.inc_by(3);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(hir_runtime::metrics::serve(
        listener,
        Arc::new(Mutex::new(registry)),
        async {
            drop(stopped.await);
        },
    ));

    let get = |path: &'static str| async move {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(
                format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
            )
            .await
            .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        response
    };
    let response = get("/metrics").await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.contains("hir_test_events_total 3"), "{response}");
    assert!(get("/other").await.starts_with("HTTP/1.1 404"));

    stop.send(()).unwrap();
    server.await.unwrap();
}
