//! Bearer-token authentication for gRPC methods, as a tower layer.
//!
//! Mutating RPCs (weight swaps, uploads, starting runs, submitting feedback) are guarded: a
//! call must carry `authorization: Bearer <token>` matching the server's configured token,
//! compared in constant time. Other methods (and health and reflection) pass through unless
//! the server guards everything. A guarded call to a server with no token configured is
//! refused as well, so forgetting the token never leaves a server open.

use std::collections::HashSet;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use subtle::ConstantTimeEq;
use tower::{Layer, Service};

/// Which methods need the token.
#[derive(Debug, Clone)]
pub enum Guard {
    /// Only these full method paths, e.g. `/hir.v1.GeneratorService/SwapWeights`.
    Methods(HashSet<String>),
    /// Every method except `grpc.health.v1` and reflection.
    AllButProbes,
}

/// A client request carrying `token` as a bearer token (none when `token` is `None`).
pub fn with_bearer<T>(message: T, token: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(value) = token.and_then(|t| format!("Bearer {t}").parse().ok()) {
        request.metadata_mut().insert("authorization", value);
    }
    request
}

/// The layer; clone it into a `tonic::transport::Server::builder().layer(..)`.
#[derive(Debug, Clone)]
pub struct BearerAuthLayer {
    token: Option<Arc<str>>,
    guard: Arc<Guard>,
}

impl BearerAuthLayer {
    /// Guards `guard` with `token`; `None` refuses every guarded call.
    pub fn new(token: Option<String>, guard: Guard) -> Self {
        Self {
            token: token.filter(|t| !t.is_empty()).map(Arc::from),
            guard: Arc::new(guard),
        }
    }

    /// Guards the given method paths.
    pub fn methods<I, S>(token: Option<String>, methods: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self::new(
            token,
            Guard::Methods(methods.into_iter().map(Into::into).collect()),
        )
    }

    fn is_guarded(&self, path: &str) -> bool {
        match &*self.guard {
            Guard::Methods(methods) => methods.contains(path),
            Guard::AllButProbes => {
                !(path.starts_with("/grpc.health.v1.") || path.starts_with("/grpc.reflection."))
            }
        }
    }

    /// Why a request is refused, or `None` if it may pass.
    fn check(&self, path: &str, header: Option<&http::HeaderValue>) -> Option<tonic::Status> {
        if !self.is_guarded(path) {
            return None;
        }
        let Some(expected) = &self.token else {
            return Some(tonic::Status::unauthenticated(format!(
                "{path} needs a bearer token, but this server has none configured; set its auth.token"
            )));
        };
        let given = header
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match given {
            Some(token) if bool::from(token.as_bytes().ct_eq(expected.as_bytes())) => None,
            Some(_) => Some(tonic::Status::unauthenticated(format!(
                "{path}: the bearer token is wrong"
            ))),
            None => Some(tonic::Status::unauthenticated(format!(
                "{path} needs `authorization: Bearer <token>` metadata"
            ))),
        }
    }
}

impl<S> Layer<S> for BearerAuthLayer {
    type Service = BearerAuth<S>;

    fn layer(&self, inner: S) -> Self::Service {
        BearerAuth {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service the layer wraps around a router.
#[derive(Debug, Clone)]
pub struct BearerAuth<S> {
    inner: S,
    layer: BearerAuthLayer,
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for BearerAuth<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: Default + Send + 'static,
    S::Error: Send + 'static,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = futures_util::future::Either<
        std::future::Ready<Result<Response<ResBody>, S::Error>>,
        S::Future,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        match self.layer.check(
            request.uri().path(),
            request.headers().get(http::header::AUTHORIZATION),
        ) {
            Some(status) => {
                tracing::warn!(
                    path = request.uri().path(),
                    reason = status.message(),
                    "refused unauthenticated call"
                );
                futures_util::future::Either::Left(std::future::ready(Ok(status.into_http())))
            }
            None => futures_util::future::Either::Right(self.inner.call(request)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(v: &str) -> http::HeaderValue {
        http::HeaderValue::from_str(v).unwrap()
    }

    #[test]
    fn guarded_methods_need_the_exact_token() {
        let layer = BearerAuthLayer::methods(Some("s3cret".into()), ["/x.Y/Swap"]);
        assert!(
            layer.check("/x.Y/Generate", None).is_none(),
            "unguarded method passes"
        );
        assert!(layer
            .check("/x.Y/Swap", Some(&header("Bearer s3cret")))
            .is_none());
        for bad in [
            None,
            Some(header("Bearer s3cre")),
            Some(header("s3cret")),
            Some(header("Bearer s3cret2")),
        ] {
            let status = layer.check("/x.Y/Swap", bad.as_ref()).expect("refused");
            assert_eq!(status.code(), tonic::Code::Unauthenticated);
        }
    }

    #[test]
    fn no_configured_token_refuses_guarded_calls() {
        let layer = BearerAuthLayer::methods(None, ["/x.Y/Swap"]);
        let status = layer.check("/x.Y/Swap", Some(&header("Bearer "))).unwrap();
        assert!(
            status.message().contains("none configured"),
            "{}",
            status.message()
        );
    }

    #[test]
    fn guarding_everything_spares_probes() {
        let layer = BearerAuthLayer::new(Some("t".into()), Guard::AllButProbes);
        assert!(layer.check("/grpc.health.v1.Health/Check", None).is_none());
        assert!(layer
            .check(
                "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                None
            )
            .is_none());
        assert!(layer
            .check("/hir.v1.GeneratorService/Generate", None)
            .is_some());
    }
}
