//! The two sockets of a hindsight server: gRPC, and optionally the Prometheus endpoint.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::{Result, RuntimeError};

/// Bound listeners; binding early lets callers learn the ports (port 0 in tests) before
/// serving.
#[derive(Debug)]
pub struct Listeners {
    grpc: TcpListener,
    metrics: Option<TcpListener>,
}

impl Listeners {
    /// Binds the gRPC address and, if given, the metrics address.
    pub async fn bind(grpc: SocketAddr, metrics: Option<SocketAddr>) -> Result<Self> {
        let bind = |addr: SocketAddr, what: &'static str| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| RuntimeError::Io {
                    what: format!("binding the {what} address {addr}"),
                    source,
                })
        };
        let grpc = bind(grpc, "gRPC").await?;
        let metrics = match metrics {
            Some(addr) => Some(bind(addr, "metrics").await?),
            None => None,
        };
        Ok(Self { grpc, metrics })
    }

    /// The bound gRPC address.
    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// The bound metrics address, if enabled.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Starts serving `registry` on the metrics listener (if any) and hands back the gRPC
    /// listener with a handle that stops the metrics endpoint.
    pub fn start_metrics(self, registry: Arc<Mutex<Registry>>) -> (TcpListener, MetricsStop) {
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        if let Some(listener) = self.metrics {
            tokio::spawn(crate::metrics::serve(listener, registry, async move {
                // Resolves on stop() or when the handle is dropped.
                let _ = stopped.wait_for(|s| *s).await;
            }));
        }
        (self.grpc, MetricsStop(stop))
    }
}

/// Stops a metrics endpoint started by [`Listeners::start_metrics`]; dropping it does too.
#[derive(Debug)]
pub struct MetricsStop(tokio::sync::watch::Sender<bool>);

impl MetricsStop {
    /// Stops the endpoint.
    pub fn stop(&self) {
        self.0.send_replace(true);
    }
}
