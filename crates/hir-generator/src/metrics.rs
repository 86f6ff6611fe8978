//! Prometheus metrics of the generator.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Label of the version-info gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VersionLabel {
    /// The version name.
    pub version: String,
}

/// Every metric the generator exports, registered in [`Metrics::registry`].
#[derive(Debug)]
pub struct Metrics {
    /// Requests waiting for admission.
    pub queue_depth: Gauge,
    /// Sequences decoding.
    pub running_sequences: Gauge,
    /// Most sequences ever decoding together.
    pub peak_running_sequences: Gauge,
    /// Tokens sampled.
    pub generated_tokens: Counter,
    /// Completions streamed.
    pub completions: Counter,
    /// Requests refused because the queue was full.
    pub rejected: Counter,
    /// Tokens per second over the last decode step.
    pub tokens_per_second: Gauge<f64, AtomicU64>,
    /// From queueing a request to its first sampled token.
    pub time_to_first_token: Histogram,
    /// Wall time of weight swaps.
    pub swap_seconds: Histogram,
    /// 1 for the version serving, 0 for versions served before.
    pub version: Family<VersionLabel, Gauge>,
    current: Mutex<Option<String>>,
    /// The registry to serve.
    pub registry: Arc<Mutex<Registry>>,
}

impl Metrics {
    /// Creates and registers the metrics.
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("hir_generator");
        let m = Metrics {
            queue_depth: Gauge::default(),
            running_sequences: Gauge::default(),
            peak_running_sequences: Gauge::default(),
            generated_tokens: Counter::default(),
            completions: Counter::default(),
            rejected: Counter::default(),
            tokens_per_second: Gauge::default(),
            time_to_first_token: Histogram::new(exponential_buckets(0.005, 2.0, 14)),
            swap_seconds: Histogram::new(exponential_buckets(0.01, 2.0, 14)),
            version: Family::default(),
            current: Mutex::new(None),
            registry: Arc::new(Mutex::new(Registry::default())),
        };
        registry.register(
            "queue_depth",
            "Requests waiting for admission",
            m.queue_depth.clone(),
        );
        registry.register(
            "running_sequences",
            "Sequences decoding",
            m.running_sequences.clone(),
        );
        registry.register(
            "peak_running_sequences",
            "Most sequences ever decoding together",
            m.peak_running_sequences.clone(),
        );
        registry.register(
            "generated_tokens",
            "Tokens sampled",
            m.generated_tokens.clone(),
        );
        registry.register("completions", "Completions streamed", m.completions.clone());
        registry.register(
            "rejected_requests",
            "Requests refused because the queue was full",
            m.rejected.clone(),
        );
        registry.register(
            "tokens_per_second",
            "Tokens per second over the last decode step",
            m.tokens_per_second.clone(),
        );
        registry.register(
            "time_to_first_token_seconds",
            "From queueing a request to its first sampled token",
            m.time_to_first_token.clone(),
        );
        registry.register(
            "swap_seconds",
            "Wall time of weight swaps",
            m.swap_seconds.clone(),
        );
        registry.register(
            "model_version",
            "1 for the version serving",
            m.version.clone(),
        );
        *m.registry.lock().expect("fresh mutex") = registry;
        Arc::new(m)
    }

    /// Marks `version` as the one serving.
    pub fn set_version(&self, version: &str) {
        let Ok(mut current) = self.current.lock() else {
            return;
        };
        if let Some(old) = current.replace(version.to_string()) {
            self.version
                .get_or_create(&VersionLabel { version: old })
                .set(0);
        }
        self.version
            .get_or_create(&VersionLabel {
                version: version.to_string(),
            })
            .set(1);
    }
}
