//! The gRPC server every hindsight service runs.
//!
//! A service binds its [`Listeners`], hands them to a [`ServerBuilder`], adds its own gRPC
//! service(s) and says when it is ready; the builder supplies the rest:
//!
//! * `grpc.health.v1`: the overall status (`""`) and that of every added service are
//!   NOT_SERVING until the service is ready ([`ServerBuilder::ready_when`]; at once by
//!   default), SERVING then, and NOT_SERVING again once shutdown begins.
//!   [`ServerBuilder::health`] hands out the reporter for statuses of the service's own.
//! * server reflection under both `grpc.reflection.v1` and `grpc.reflection.v1alpha`,
//!   describing the `hir.v1` contract, the files it imports, health and reflection.
//! * the bearer-token layer ([`ServerBuilder::auth`]), checked before any service sees a
//!   call, and a tracing span per call.
//! * RESOURCE_EXHAUSTED for a request message over a service's size limit, as gRPC
//!   specifies (tonic itself answers OUT_OF_RANGE; [`MessageSizeLayer`]).
//! * the Prometheus endpoint on the metrics listener, if bound ([`ServerBuilder::metrics`]).
//! * graceful shutdown: when the `shutdown` future given to [`ServerBuilder::serve`]
//!   resolves, or the service fails to get ready, the server closes its gRPC listener,
//!   reports NOT_SERVING, stops the metrics endpoint and runs the
//!   [`ServerBuilder::on_shutdown`] hooks; running calls then get the grace period
//!   ([`ServerBuilder::grace`]) to finish. Past it, the [`ServerBuilder::on_grace_over`]
//!   hooks run and `serve` returns without waiting for the calls still running.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::TryFutureExt;

use prometheus_client::registry::Registry;
use tonic::body::Body;
use tonic::server::NamedService;
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

use crate::auth::{BearerAuthLayer, Guard};
use crate::listeners::Listeners;
use crate::{Result, RuntimeError};

/// How long running calls may take to finish once shutdown begins, unless
/// [`ServerBuilder::grace`] says otherwise.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(30);

/// The error a readiness future may fail with.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

type Hook = Box<dyn FnOnce() + Send>;
type Ready = Pin<Box<dyn Future<Output = std::result::Result<(), BoxError>> + Send>>;

/// A gRPC server with health, reflection, bearer-token auth, metrics and graceful
/// shutdown; see the [module docs](self).
pub struct ServerBuilder {
    listeners: Listeners,
    routes: tonic::service::Routes,
    health: HealthReporter,
    /// Health names that follow readiness: `""` and every added service.
    names: Vec<&'static str>,
    auth: BearerAuthLayer,
    registry: Arc<Mutex<Registry>>,
    grace: Duration,
    ready: Option<Ready>,
    on_shutdown: Vec<Hook>,
    on_grace_over: Vec<Hook>,
}

impl std::fmt::Debug for ServerBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerBuilder")
            .field("listen", &self.listeners.grpc_addr())
            .field("services", &self.names)
            .field("grace", &self.grace)
            .finish_non_exhaustive()
    }
}

impl ServerBuilder {
    /// A server on `listeners` serving health and reflection (which lists the services
    /// added by the time it serves); no method needs a token, and the metrics endpoint
    /// serves an empty registry until [`ServerBuilder::metrics`].
    pub fn new(listeners: Listeners) -> Result<Self> {
        let (health, health_service) = hir_proto::health_service();
        let routes = tonic::service::Routes::new(health_service);
        Ok(Self {
            listeners,
            routes,
            health,
            names: vec![""],
            auth: BearerAuthLayer::new(None, Guard::Methods(Default::default())),
            registry: Arc::default(),
            grace: DEFAULT_GRACE,
            ready: None,
            on_shutdown: Vec::new(),
            on_grace_over: Vec::new(),
        })
    }

    /// Adds a gRPC service; its health status follows readiness.
    pub fn add_service<S>(mut self, service: S) -> Self
    where
        S: tower::Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
            + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        self.names.push(S::NAME);
        self.routes = self.routes.add_service(service);
        self
    }

    /// Checks every call with `auth`, e.g. `BearerAuthLayer::methods(token, MUTATING)`.
    pub fn auth(mut self, auth: BearerAuthLayer) -> Self {
        self.auth = auth;
        self
    }

    /// Serves `registry` on the metrics listener.
    pub fn metrics(mut self, registry: Arc<Mutex<Registry>>) -> Self {
        self.registry = registry;
        self
    }

    /// How long running calls may take to finish once shutdown begins.
    pub fn grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// Reports SERVING only once `ready` succeeds, while the server already answers (health
    /// first of all). If `ready` fails, the server shuts down and [`ServerBuilder::serve`]
    /// returns [`RuntimeError::NotReady`] with the reason.
    pub fn ready_when<F, E>(mut self, ready: F) -> Self
    where
        F: Future<Output = std::result::Result<(), E>> + Send + 'static,
        E: Into<BoxError>,
    {
        self.ready = Some(Box::pin(async move { ready.await.map_err(Into::into) }));
        self
    }

    /// Runs `hook` when shutdown begins, once the server admits no more calls.
    pub fn on_shutdown(mut self, hook: impl FnOnce() + Send + 'static) -> Self {
        self.on_shutdown.push(Box::new(hook));
        self
    }

    /// Runs `hook` if calls are still running when the grace period is over, just before
    /// [`ServerBuilder::serve`] returns.
    pub fn on_grace_over(mut self, hook: impl FnOnce() + Send + 'static) -> Self {
        self.on_grace_over.push(Box::new(hook));
        self
    }

    /// The health reporter, for statuses beyond the readiness of the added services.
    pub fn health(&self) -> HealthReporter {
        self.health.clone()
    }

    /// Serves until `shutdown` resolves (or the service fails to get ready), then shuts down
    /// gracefully as the [module docs](self) describe.
    pub async fn serve(self, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<()> {
        let Self {
            listeners,
            routes,
            health,
            names,
            auth,
            registry,
            grace,
            ready,
            on_shutdown,
            on_grace_over,
        } = self;
        let reflection =
            |e: tonic_reflection::server::Error| RuntimeError::Reflection(e.to_string());
        let served: Vec<&str> = names.iter().copied().filter(|n| !n.is_empty()).collect();
        let routes = routes
            .add_service(hir_proto::reflection_service(&served).map_err(reflection)?)
            .add_service(hir_proto::reflection_v1alpha_service(&served).map_err(reflection)?);
        let addr = listeners.grpc_addr();
        let statuses = Statuses {
            health,
            names: names.into(),
        };

        // Readiness: now, or once `ready` succeeds; a failure ends the server.
        let (failed_tx, failed_rx) = tokio::sync::oneshot::channel::<BoxError>();
        let readiness = match ready {
            None => {
                statuses.set(ServingStatus::Serving).await;
                None
            }
            Some(ready) => {
                statuses.set(ServingStatus::NotServing).await;
                let statuses = statuses.clone();
                Some(tokio::spawn(async move {
                    match ready.await {
                        Ok(()) => statuses.set(ServingStatus::Serving).await,
                        Err(err) => drop(failed_tx.send(err)),
                    }
                }))
            }
        };

        let (grpc, metrics_stop) = listeners.start_metrics(registry);
        let failure = Arc::new(Mutex::new(None));
        let (began_tx, began_rx) = tokio::sync::oneshot::channel::<()>();
        let stop = {
            let failure = Arc::clone(&failure);
            async move {
                tokio::select! {
                    () = shutdown => {}
                    Ok(err) = failed_rx => {
                        tracing::error!(error = %format!("{err:#}"), "the service failed to get ready");
                        *failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(err);
                    }
                }
                // A readiness still pending must not report SERVING from now on.
                if let Some(readiness) = readiness {
                    readiness.abort();
                    let _ = readiness.await;
                }
                tracing::info!(
                    ?grace,
                    "shutting down: no new calls; running ones may finish"
                );
                statuses.set(ServingStatus::NotServing).await;
                metrics_stop.stop();
                on_shutdown.into_iter().for_each(|hook| hook());
                let _ = began_tx.send(());
            }
        };
        let grace_over = async move {
            // No shutdown began if the server failed on its own: nothing to time.
            if began_rx.await.is_err() {
                std::future::pending::<()>().await;
            }
            tokio::time::sleep(grace).await;
        };

        tracing::info!(%addr, "serving gRPC");
        let server = tonic::transport::Server::builder()
            .layer(auth)
            .layer(MessageSizeLayer)
            .trace_fn(|request| tracing::info_span!("grpc", path = %request.uri().path()))
            .add_routes(routes)
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(grpc),
                stop,
            );
        tokio::select! {
            biased;
            served = server => served?,
            () = grace_over => {
                tracing::warn!(?grace, "grace period over; leaving the calls still running");
                on_grace_over.into_iter().for_each(|hook| hook());
            }
        }
        let failed = failure.lock().unwrap_or_else(|p| p.into_inner()).take();
        match failed {
            Some(err) => Err(RuntimeError::NotReady(err)),
            None => Ok(()),
        }
    }
}

/// The health statuses that follow readiness.
#[derive(Clone)]
struct Statuses {
    health: HealthReporter,
    names: Arc<[&'static str]>,
}

impl Statuses {
    async fn set(&self, status: ServingStatus) {
        for name in self.names.iter() {
            self.health.set_service_status(name, status).await;
        }
    }
}

/// The status gRPC specifies for a message larger than the receiver accepts
/// (RESOURCE_EXHAUSTED), if `status` is tonic's report of one (OUT_OF_RANGE, "... message
/// length too large ..."); `None` for any other status.
pub fn message_too_large(status: &tonic::Status) -> Option<tonic::Status> {
    (status.code() == tonic::Code::OutOfRange
        && status.message().contains("message length too large"))
    .then(|| tonic::Status::resource_exhausted(status.message()))
}

/// Answers a request message over a service's size limit with RESOURCE_EXHAUSTED instead of
/// tonic's OUT_OF_RANGE ([`message_too_large`]). Tonic refuses such a message before the
/// service sees the call, in the response's headers; this layer rewrites them.
#[derive(Debug, Clone, Copy, Default)]
pub struct MessageSizeLayer;

impl<S> tower::Layer<S> for MessageSizeLayer {
    type Service = MessageSize<S>;

    fn layer(&self, inner: S) -> Self::Service {
        MessageSize { inner }
    }
}

/// The service [`MessageSizeLayer`] wraps around a router.
#[derive(Debug, Clone)]
pub struct MessageSize<S> {
    inner: S,
}

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for MessageSize<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
{
    type Response = http::Response<ResBody>;
    type Error = S::Error;
    type Future = futures_util::future::MapOk<
        S::Future,
        fn(http::Response<ResBody>) -> http::Response<ResBody>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<std::result::Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        self.inner
            .call(request)
            .map_ok(resource_exhausted_if_too_large)
    }
}

fn resource_exhausted_if_too_large<B>(mut response: http::Response<B>) -> http::Response<B> {
    let code = response.headers().get("grpc-status").map(|v| v.as_bytes());
    if code.map(tonic::Code::from_bytes) != Some(tonic::Code::OutOfRange) {
        return response;
    }
    let rewritten = tonic::Status::from_header_map(response.headers())
        .as_ref()
        .and_then(message_too_large);
    if let Some(status) = rewritten {
        if let Err(err) = status.add_header(response.headers_mut()) {
            tracing::warn!(%err, "could not rewrite an oversize message's status");
        }
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oversize_messages_are_resource_exhausted_and_nothing_else_changes() {
        let tonic_says = tonic::Status::out_of_range(
            "Error, decoded message length too large: found 90024 bytes, the limit is: 65536 bytes",
        );
        let rewritten = resource_exhausted_if_too_large(tonic_says.into_http::<()>());
        let status = tonic::Status::from_header_map(rewritten.headers()).unwrap();
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert!(
            status.message().contains("found 90024 bytes"),
            "{}",
            status.message()
        );
        for other in [
            tonic::Status::out_of_range("step 12 is past the end"),
            tonic::Status::invalid_argument("message length too large"),
        ] {
            let code = other.code();
            let kept = resource_exhausted_if_too_large(other.into_http::<()>());
            assert_eq!(
                tonic::Status::from_header_map(kept.headers())
                    .unwrap()
                    .code(),
                code
            );
        }
    }
}
