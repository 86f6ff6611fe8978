//! The generators a service talks to: one lazily connected channel per address (connected
//! on first use, reconnected after failures), picked round-robin, with the bearer token
//! they expect, and [`Backoff`] for calls that may meet a generator restarting.
//!
//! The relabeler samples through a pool; the trainer swaps, verifies and evaluates
//! through one.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
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

/// The generators of a service, used round-robin.
#[derive(Debug, Clone)]
pub struct GeneratorPool {
    endpoints: Arc<Vec<GeneratorEndpoint>>,
    token: Option<Arc<str>>,
    next: Arc<AtomicUsize>,
}

impl GeneratorPool {
    /// Lazy channels to `addresses`, sending `token` as a bearer token.
    pub fn new(addresses: &[String], token: Option<String>) -> Result<Self, PoolError> {
        if addresses.is_empty() {
            return Err(PoolError::Empty);
        }
        let endpoints = addresses
            .iter()
            .map(|a| {
                let channel = Channel::from_shared(a.clone())
                    .map_err(|e| PoolError::BadAddress {
                        address: a.clone(),
                        reason: e.to_string(),
                    })?
                    .connect_lazy();
                Ok(GeneratorEndpoint {
                    address: a.clone(),
                    client: GeneratorServiceClient::new(channel)
                        .max_decoding_message_size(MAX_REPLY),
                })
            })
            .collect::<Result<Vec<_>, PoolError>>()?;
        Ok(Self {
            endpoints: Arc::new(endpoints),
            token: token.map(Arc::from),
            next: Arc::new(AtomicUsize::new(0)),
        })
    }

    /// Every generator, in configuration order.
    pub fn endpoints(&self) -> &[GeneratorEndpoint] {
        &self.endpoints
    }

    /// The next generator, round-robin.
    pub fn pick(&self) -> &GeneratorEndpoint {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.endpoints.len();
        &self.endpoints[i]
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
        let picked: Vec<&str> = (0..4).map(|_| pool.pick().address.as_str()).collect();
        assert_eq!(
            picked,
            ["http://a:1", "http://b:2", "http://a:1", "http://b:2"]
        );
        let r = pool.request(());
        assert_eq!(r.metadata().get("authorization").unwrap(), "Bearer t");
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
