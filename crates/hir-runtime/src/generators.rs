//! The generators a service talks to: one lazily connected channel per address (connected
//! on first use, reconnected after failures), picked round-robin, with the bearer token
//! they expect, and [`Backoff`] for calls that may meet a generator restarting.
//!
//! The relabeler samples through a pool; the trainer swaps, verifies and evaluates
//! through one.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use hir_proto::pb::generator_service_client::GeneratorServiceClient;
use tonic::transport::Channel;

use crate::auth::with_bearer;

/// Largest reply a generator may send (a batch of completions with log-probabilities).
const MAX_REPLY: usize = 64 << 20;

/// One generator of a pool.
#[derive(Debug, Clone)]
pub struct GeneratorEndpoint {
    /// Its address, as configured.
    pub address: String,
    client: GeneratorServiceClient<Channel>,
}

impl GeneratorEndpoint {
    /// A client over the endpoint's shared channel.
    pub fn client(&self) -> GeneratorServiceClient<Channel> {
        self.client.clone()
    }
}

/// Why a pool cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// No address was given.
    #[error("at least one generator address is required")]
    Empty,
    /// An address is not a URI a channel can use.
    #[error("`{address}`: {reason}")]
    BadAddress {
        /// The address.
        address: String,
        /// Why it is unusable.
        reason: String,
    },
}

/// How often names given as `dns://host:port` are resolved again.
pub const RESOLVE_EVERY: Duration = Duration::from_secs(5);

/// Where a pool finds its generators.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Source {
    /// One generator at this URI.
    Fixed(String),
    /// Every address this name resolves to (a Kubernetes headless Service), on this port.
    Dns { host: String, port: u16 },
}

impl Source {
    fn parse(address: &str) -> Result<Self, PoolError> {
        let bad = |reason: &str| PoolError::BadAddress {
            address: hir_core::text_enum::bounded(address),
            reason: reason.to_owned(),
        };
        let Some(rest) = address.strip_prefix("dns://") else {
            // A fixed address must be a URI a channel can use.
            Channel::from_shared(address.to_owned()).map_err(|e| bad(&e.to_string()))?;
            return Ok(Source::Fixed(address.to_owned()));
        };
        // `dns://host:port` or gRPC's `dns:///host:port`.
        let rest = rest.trim_start_matches('/');
        let (host, port) = rest
            .rsplit_once(':')
            .ok_or_else(|| bad("expected dns://host:port"))?;
        let port = port.parse().map_err(|_| bad("the port must be a number"))?;
        if host.is_empty() {
            return Err(bad("expected dns://host:port"));
        }
        Ok(Source::Dns {
            host: host.to_owned(),
            port,
        })
    }

    /// The URIs this source stands for now.
    async fn resolve(&self) -> Vec<String> {
        match self {
            Source::Fixed(uri) => vec![uri.clone()],
            Source::Dns { host, port } => {
                match tokio::net::lookup_host((host.as_str(), *port)).await {
                    Ok(addrs) => {
                        let mut uris: Vec<String> = addrs.map(|a| format!("http://{a}")).collect();
                        uris.sort();
                        uris.dedup();
                        uris
                    }
                    Err(e) => {
                        tracing::warn!(host, port, error = %e, "cannot resolve the generators' name");
                        Vec::new()
                    }
                }
            }
        }
    }
}

/// Resolves `sources` and makes the result the pool's endpoints.
async fn resolve_into(sources: &[Source], endpoints: &RwLock<Arc<Vec<GeneratorEndpoint>>>) {
    let mut uris = Vec::new();
    for source in sources {
        for uri in source.resolve().await {
            if !uris.contains(&uri) {
                uris.push(uri);
            }
        }
    }
    let current = Arc::clone(&endpoints.read().unwrap_or_else(|p| p.into_inner()));
    if current.iter().map(|e| &e.address).eq(uris.iter()) {
        return;
    }
    let next: Vec<GeneratorEndpoint> = uris
        .iter()
        .map(|uri| {
            current
                .iter()
                .find(|e| &e.address == uri)
                .cloned()
                .unwrap_or_else(|| endpoint(uri))
        })
        .collect();
    tracing::info!(generators = ?uris, "the generators changed");
    *endpoints.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(next);
}

/// The generators of a service, used round-robin: fixed addresses, and names resolved
/// again every [`RESOLVE_EVERY`] (`dns://host:port`: every address behind a headless
/// Service), so replicas that join are used and replicas that leave are dropped.
#[derive(Debug, Clone)]
pub struct GeneratorPool {
    sources: Arc<Vec<Source>>,
    endpoints: Arc<RwLock<Arc<Vec<GeneratorEndpoint>>>>,
    token: Option<Arc<str>>,
    next: Arc<AtomicUsize>,
}

fn endpoint(uri: &str) -> GeneratorEndpoint {
    // Validated when the source was parsed or built from a resolved socket address.
    let channel = Channel::from_shared(uri.to_owned())
        .expect("a valid URI")
        .connect_lazy();
    GeneratorEndpoint {
        address: uri.to_owned(),
        client: GeneratorServiceClient::new(channel).max_decoding_message_size(MAX_REPLY),
    }
}

impl GeneratorPool {
    /// Lazy channels to `addresses` (URIs, or `dns://host:port` names resolved now and then
    /// again in the background), sending `token` as a bearer token. Must be called within a
    /// Tokio runtime when a name is given.
    pub fn new(addresses: &[String], token: Option<String>) -> Result<Self, PoolError> {
        if addresses.is_empty() {
            return Err(PoolError::Empty);
        }
        let sources = addresses
            .iter()
            .map(|a| Source::parse(a))
            .collect::<Result<Vec<_>, _>>()?;
        let fixed: Vec<GeneratorEndpoint> = sources
            .iter()
            .filter_map(|s| match s {
                Source::Fixed(uri) => Some(endpoint(uri)),
                Source::Dns { .. } => None,
            })
            .collect();
        let pool = Self {
            sources: Arc::new(sources),
            endpoints: Arc::new(RwLock::new(Arc::new(fixed))),
            token: token.map(Arc::from),
            next: Arc::new(AtomicUsize::new(0)),
        };
        if pool.sources.iter().any(|s| matches!(s, Source::Dns { .. })) {
            // Resolves until the last clone of the pool is gone.
            let (sources, endpoints) = (Arc::clone(&pool.sources), Arc::downgrade(&pool.endpoints));
            tokio::spawn(async move {
                while let Some(endpoints) = endpoints.upgrade() {
                    resolve_into(&sources, &endpoints).await;
                    drop(endpoints);
                    tokio::time::sleep(RESOLVE_EVERY).await;
                }
            });
        }
        Ok(pool)
    }

    /// Resolves the pool's names again now; endpoints that stay keep their channels.
    pub async fn refresh(&self) {
        resolve_into(&self.sources, &self.endpoints).await;
    }

    /// Every generator known now, in configuration (then address) order.
    pub fn endpoints(&self) -> Arc<Vec<GeneratorEndpoint>> {
        Arc::clone(&self.endpoints.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// The next generator, round-robin; UNAVAILABLE while the pool's names resolve to no
    /// address (a retry can succeed once a replica is up).
    pub fn pick(&self) -> Result<GeneratorEndpoint, tonic::Status> {
        let endpoints = self.endpoints();
        if endpoints.is_empty() {
            return Err(tonic::Status::unavailable(
                "no generator is known: the generators' name resolves to no address yet",
            ));
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % endpoints.len();
        Ok(endpoints[i].clone())
    }

    /// `message` as a request carrying the pool's bearer token.
    pub fn request<T>(&self, message: T) -> tonic::Request<T> {
        with_bearer(message, self.token.as_deref())
    }
}

/// Whether a failed call may succeed if made again: the generator is down, restarting,
/// busy, or the connection broke.
pub fn retryable(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unavailable
            | tonic::Code::ResourceExhausted
            | tonic::Code::Unknown
            | tonic::Code::Cancelled
    )
}

/// The version a generator serves, when it refused a request for naming another one (it
/// has not been brought to the run's version yet: restarted, or newly joined).
pub fn serving_other_version(status: &tonic::Status) -> Option<&str> {
    if status.code() != tonic::Code::FailedPrecondition {
        return None;
    }
    status
        .metadata()
        .get(hir_proto::SERVING_VERSION_KEY)
        .and_then(|v| v.to_str().ok())
}

/// Exponential backoff: the first retry after `initial`, each next one after twice the
/// last (at most `max`), no retry once `give_up` has passed since the first attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// Delay before the first retry.
    pub initial: Duration,
    /// Longest delay between attempts.
    pub max: Duration,
    /// No retry after this long.
    pub give_up: Duration,
}

impl Backoff {
    /// Calls `call` until it succeeds, fails with an error `retryable` refuses, or
    /// `give_up` has passed; `on_retry` sees each error that is retried, the attempt
    /// number and the delay before the next attempt.
    pub async fn retry<T, E, F, Fut>(
        &self,
        mut call: F,
        retryable: impl Fn(&E) -> bool,
        mut on_retry: impl FnMut(&E, u32, Duration),
    ) -> Result<T, E>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let started = Instant::now();
        let mut delay = self.initial;
        let mut attempt = 0;
        loop {
            attempt += 1;
            match call().await {
                Err(e) if retryable(&e) && started.elapsed() < self.give_up => {
                    on_retry(&e, attempt, delay);
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(self.max);
                }
                outcome => return outcome,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pool_needs_usable_addresses_and_picks_round_robin() {
        assert!(matches!(
            GeneratorPool::new(&[], None),
            Err(PoolError::Empty)
        ));
        assert!(matches!(
            GeneratorPool::new(&["not a uri".into()], None),
            Err(PoolError::BadAddress { .. })
        ));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _guard = rt.enter();
        let pool = GeneratorPool::new(
            &["http://a:1".into(), "http://b:2".into()],
            Some("t".into()),
        )
        .unwrap();
        let picked: Vec<String> = (0..4).map(|_| pool.pick().unwrap().address).collect();
        assert_eq!(
            picked,
            ["http://a:1", "http://b:2", "http://a:1", "http://b:2"]
        );
        let r = pool.request(());
        assert_eq!(r.metadata().get("authorization").unwrap(), "Bearer t");
    }

    #[tokio::test]
    async fn a_name_resolves_to_every_address_behind_it_and_bad_names_are_refused() {
        for bad in ["dns://", "dns://host", "dns://host:port", "not a uri"] {
            assert!(
                matches!(
                    GeneratorPool::new(&[bad.into()], None),
                    Err(PoolError::BadAddress { .. })
                ),
                "{bad}"
            );
        }
        let pool = GeneratorPool::new(
            &["dns:///localhost:50051".into(), "http://10.0.0.9:1".into()],
            None,
        )
        .unwrap();
        pool.refresh().await;
        let addresses: Vec<String> = pool.endpoints().iter().map(|e| e.address.clone()).collect();
        assert!(
            addresses.iter().any(|a| a == "http://127.0.0.1:50051"),
            "{addresses:?}"
        );
        assert!(addresses.contains(&"http://10.0.0.9:1".to_string()));
        // A name that resolves to nothing leaves no endpoint, and picking says so.
        let empty = GeneratorPool::new(&["dns://no-such-host.invalid:1".into()], None).unwrap();
        empty.refresh().await;
        assert_eq!(empty.pick().unwrap_err().code(), tonic::Code::Unavailable);
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_doubles_up_to_its_cap_and_gives_up() {
        let backoff = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_millis(300),
            give_up: Duration::from_secs(1),
        };
        let mut delays = Vec::new();
        let mut calls = 0;
        let out: Result<(), &str> = backoff
            .retry(
                || {
                    calls += 1;
                    async { Err("down") }
                },
                |_| true,
                |_, _, d| delays.push(d.as_millis()),
            )
            .await;
        assert_eq!(out, Err("down"));
        assert_eq!(&delays[..4], [100, 200, 300, 300]);
        assert_eq!(calls, delays.len() + 1);

        let mut calls = 0;
        let out: Result<u32, &str> = backoff
            .retry(
                || {
                    calls += 1;
                    let n = calls;
                    async move {
                        if n < 3 {
                            Err("busy")
                        } else {
                            Ok(n)
                        }
                    }
                },
                |e| *e == "busy",
                |_, _, _| {},
            )
            .await;
        assert_eq!(out, Ok(3));
    }
}
