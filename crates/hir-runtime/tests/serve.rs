//! The runtime's layers and the server builder on real sockets.

use std::sync::{Arc, Mutex};

use std::time::Duration;

use hir_runtime::auth::BearerAuthLayer;
use hir_runtime::listeners::Listeners;
use hir_runtime::server::ServerBuilder;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Channel, Server};
use tonic_health::pb::health_check_response::ServingStatus;
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

/// Serves `builder` (bound to `addr`) until the returned sender fires.
async fn start(
    addr: std::net::SocketAddr,
    builder: ServerBuilder,
) -> (
    Channel,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<hir_runtime::Result<()>>,
) {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let done = tokio::spawn(builder.serve(async {
        drop(stopped.await);
    }));
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    (channel, stop, done)
}

/// Listeners on free ports, and the gRPC address.
async fn listeners(metrics: bool) -> (Listeners, std::net::SocketAddr) {
    let any = "127.0.0.1:0".parse().unwrap();
    let listeners = Listeners::bind(any, metrics.then_some(any)).await.unwrap();
    let addr = listeners.grpc_addr();
    (listeners, addr)
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> std::io::Result<String> {
    let mut stream = TcpStream::connect(addr).await?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    Ok(response)
}

/// One reflection client per protocol version: the services listed, and every file reached
/// from the one declaring `symbol` through its imports, asked for on one stream.
macro_rules! reflection_probe {
    ($version:ident) => {
        mod $version {
            use prost::Message;
            use prost_types::FileDescriptorProto;
            use tonic_reflection::pb::$version::server_reflection_client::ServerReflectionClient;
            use tonic_reflection::pb::$version::server_reflection_request::MessageRequest;
            use tonic_reflection::pb::$version::server_reflection_response::MessageResponse;
            use tonic_reflection::pb::$version::ServerReflectionRequest;

            pub async fn probe(
                channel: tonic::transport::Channel,
                symbol: &str,
            ) -> (Vec<String>, Vec<FileDescriptorProto>) {
                let (requests, outbox) = tokio::sync::mpsc::channel(1);
                let mut client = ServerReflectionClient::new(channel);
                let mut responses = client
                    .server_reflection_info(tokio_stream::wrappers::ReceiverStream::new(outbox))
                    .await
                    .unwrap()
                    .into_inner();
                let mut ask = async |request: MessageRequest| {
                    requests
                        .send(ServerReflectionRequest {
                            host: String::new(),
                            message_request: Some(request),
                        })
                        .await
                        .unwrap();
                    let response = responses.message().await.unwrap().expect("an answer");
                    response.message_response.expect("an answer")
                };

                let MessageResponse::ListServicesResponse(list) =
                    ask(MessageRequest::ListServices(String::new())).await
                else {
                    panic!("not a service list");
                };
                let services = list.service.into_iter().map(|s| s.name).collect();

                let mut files: Vec<FileDescriptorProto> = Vec::new();
                let mut next = vec![MessageRequest::FileContainingSymbol(symbol.into())];
                while let Some(request) = next.pop() {
                    let MessageResponse::FileDescriptorResponse(found) = ask(request).await else {
                        panic!("not a file descriptor");
                    };
                    for raw in found.file_descriptor_proto {
                        let file = FileDescriptorProto::decode(raw.as_slice()).unwrap();
                        if files.iter().any(|f| f.name == file.name) {
                            continue;
                        }
                        for import in &file.dependency {
                            next.push(MessageRequest::FileByFilename(import.clone()));
                        }
                        files.push(file);
                    }
                }
                (services, files)
            }
        }
    };
}
reflection_probe!(v1);
reflection_probe!(v1alpha);

#[tokio::test]
async fn the_server_reflects_the_contract_and_its_imports_under_v1_and_v1alpha() {
    let (listeners, addr) = listeners(false).await;
    let (channel, _stop, _done) = start(addr, ServerBuilder::new(listeners).unwrap()).await;
    for (version, (services, files)) in [
        (
            "v1",
            v1::probe(channel.clone(), "hir.v1.TrainerService").await,
        ),
        (
            "v1alpha",
            v1alpha::probe(channel.clone(), "hir.v1.TrainerService").await,
        ),
    ] {
        // A server that adds no hir service lists health and reflection only; the
        // contract's files still resolve (below).
        let mut listed = services.clone();
        listed.sort();
        assert_eq!(listed, hir_proto::COMMON_SERVICES, "{version}");
        let names: Vec<&str> = files.iter().map(|f| f.name()).collect();
        assert_eq!(names[0], "hir/v1/trainer.proto", "{version}");
        for import in ["google/protobuf/timestamp.proto", "hir/v1/common.proto"] {
            assert!(
                names.contains(&import),
                "{version}: {import} not in {names:?}"
            );
        }
        // Every file reached resolves its own imports too.
        for file in &files {
            for import in &file.dependency {
                assert!(
                    names.contains(&import.as_str()),
                    "{version}: {import} unresolved"
                );
            }
        }
    }
}

async fn status(channel: &Channel, service: &str) -> i32 {
    HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status
}

#[tokio::test]
async fn health_follows_readiness_auth_guards_and_metrics_are_served() {
    let mut registry = Registry::default();
    let counter = Counter::<u64>::default();
    registry.register("hir_test_events", "Events seen", counter.clone());
    counter.inc();
    let (listeners, addr) = listeners(true).await;
    let metrics = listeners.metrics_addr().unwrap();
    let (ready, readied) = tokio::sync::oneshot::channel::<()>();
    let builder = ServerBuilder::new(listeners)
        .unwrap()
        .auth(BearerAuthLayer::methods(
            Some("s3cret".into()),
            ["/grpc.health.v1.Health/Watch"],
        ))
        .metrics(Arc::new(Mutex::new(registry)))
        .ready_when(readied);
    let (channel, stop, done) = start(addr, builder).await;

    assert_eq!(status(&channel, "").await, ServingStatus::NotServing as i32);
    let mut health = HealthClient::new(channel.clone());
    let refused = health
        .watch(HealthCheckRequest::default())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    let mut watch = health
        .watch(hir_runtime::auth::with_bearer(
            HealthCheckRequest::default(),
            Some("s3cret"),
        ))
        .await
        .unwrap()
        .into_inner();
    let mut next = async || watch.message().await.unwrap().unwrap().status;
    assert_eq!(next().await, ServingStatus::NotServing as i32);
    ready.send(()).unwrap();
    assert_eq!(next().await, ServingStatus::Serving as i32);

    let response = http_get(metrics, "/metrics").await.unwrap();
    assert!(response.contains("hir_test_events_total 1"), "{response}");

    stop.send(()).unwrap();
    assert_eq!(next().await, ServingStatus::NotServing as i32);
    drop(watch);
    done.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_failed_readiness_ends_the_server_with_the_reason() {
    let builder = ServerBuilder::new(listeners(false).await.0)
        .unwrap()
        .ready_when(async { Err::<(), _>("no model at /nowhere") });
    let err = builder.serve(std::future::pending()).await.unwrap_err();
    assert!(
        matches!(err, hir_runtime::RuntimeError::NotReady(_)),
        "{err}"
    );
    assert_eq!(
        std::error::Error::source(&err).unwrap().to_string(),
        "no model at /nowhere"
    );
}

#[tokio::test]
async fn shutdown_waits_for_running_calls_up_to_the_grace() {
    let hooks = Arc::new(Mutex::new(Vec::new()));
    let (on_shutdown, on_grace_over) = (Arc::clone(&hooks), Arc::clone(&hooks));
    let (listeners, addr) = listeners(false).await;
    let builder = ServerBuilder::new(listeners)
        .unwrap()
        .grace(Duration::from_millis(300))
        .on_shutdown(move || on_shutdown.lock().unwrap().push("shutdown"))
        .on_grace_over(move || on_grace_over.lock().unwrap().push("grace over"));
    let (channel, stop, done) = start(addr, builder).await;
    // A health watch runs until the server cuts it.
    let mut watch = HealthClient::new(channel)
        .watch(HealthCheckRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        watch.message().await.unwrap().unwrap().status,
        ServingStatus::Serving as i32
    );
    stop.send(()).unwrap();
    // Still running after shutdown began: it sees the server go NOT_SERVING.
    assert_eq!(
        watch.message().await.unwrap().unwrap().status,
        ServingStatus::NotServing as i32
    );
    done.await.unwrap().unwrap();
    assert_eq!(*hooks.lock().unwrap(), ["shutdown", "grace over"]);
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "the listener is closed"
    );
}

#[tokio::test]
async fn shutdown_without_running_calls_returns_before_the_grace() {
    let grace_over = Arc::new(Mutex::new(false));
    let flag = Arc::clone(&grace_over);
    let (listeners, addr) = listeners(false).await;
    let builder = ServerBuilder::new(listeners)
        .unwrap()
        .grace(Duration::from_secs(3600))
        .on_grace_over(move || *flag.lock().unwrap() = true);
    let (channel, stop, done) = start(addr, builder).await;
    assert_eq!(status(&channel, "").await, ServingStatus::Serving as i32);
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(60), done)
        .await
        .expect("serve returns once no call runs")
        .unwrap()
        .unwrap();
    assert!(!*grace_over.lock().unwrap());
}
