//! A real server on a real socket serves health and reflection for the hir.v1 contract,
//! which is what `grpcurl list` and load-balancer probes rely on.

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Channel, Server};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use tonic_reflection::pb::v1::ServerReflectionRequest;

async fn serve() -> (
    Channel,
    tonic_health::server::HealthReporter,
    tokio::sync::oneshot::Sender<()>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (reporter, health) = hir_proto::health_service();
    // As a generator serves it: its own service, not the others of the contract.
    let reflection = hir_proto::reflection_service(&["hir.v1.GeneratorService"]).unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(
        Server::builder()
            .add_service(health)
            .add_service(reflection)
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                drop(stopped.await)
            }),
    );
    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    (channel, reporter, stop)
}

#[tokio::test]
async fn reflection_lists_the_served_service_and_health_only() {
    let (channel, _reporter, _stop) = serve().await;
    let mut client = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::once(request))
        .await
        .unwrap()
        .into_inner();
    let response = responses.message().await.unwrap().expect("one response");
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection answer: {response:?}");
    };
    let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    names.sort();
    let mut want: Vec<&str> = hir_proto::COMMON_SERVICES.to_vec();
    want.push("hir.v1.GeneratorService");
    want.sort();
    assert_eq!(names, want);
}

#[tokio::test]
async fn reflection_resolves_a_method_symbol() {
    let (channel, _reporter, _stop) = serve().await;
    let mut client = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::FileContainingSymbol(
            "hir.v1.GeneratorService.Generate".into(),
        )),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::once(request))
        .await
        .unwrap()
        .into_inner();
    let response = responses.message().await.unwrap().expect("one response");
    assert!(
        matches!(response.message_response, Some(MessageResponse::FileDescriptorResponse(ref f)) if !f.file_descriptor_proto.is_empty()),
        "{response:?}"
    );
}

#[tokio::test]
async fn health_reports_what_the_server_sets() {
    let (channel, reporter, _stop) = serve().await;
    let mut client = HealthClient::new(channel);
    let service = "hir.v1.GeneratorService".to_string();
    reporter
        .set_service_status(&service, tonic_health::ServingStatus::NotServing)
        .await;
    let status = client
        .check(HealthCheckRequest {
            service: service.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(status, ServingStatus::NotServing as i32);
    reporter
        .set_service_status(&service, tonic_health::ServingStatus::Serving)
        .await;
    let status = client
        .check(HealthCheckRequest { service })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(status, ServingStatus::Serving as i32);
    let unknown = client
        .check(HealthCheckRequest {
            service: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);
}
