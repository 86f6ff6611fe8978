//! Prometheus metrics of the relabeler.

use std::sync::{Arc, Mutex};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Every metric the relabeler exports.
#[derive(Debug)]
pub struct Metrics {
    /// Samples stored (rate() gives samples/s).
    pub samples: Counter,
    /// Of those, correct under exact match (correct / samples is the correct rate).
    pub correct: Counter,
    /// Failed generator calls (each retried).
    pub generator_errors: Counter,
    /// Feedback items stored.
    pub feedback: Counter,
    /// Latency of one batched store write.
    pub write_seconds: Histogram,
    /// The registry to serve.
    pub registry: Arc<Mutex<Registry>>,
}

impl Metrics {
    /// Creates and registers the metrics.
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("hir_relabeler");
        let m = Metrics {
            samples: Counter::default(),
            correct: Counter::default(),
            generator_errors: Counter::default(),
            feedback: Counter::default(),
            write_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 14)),
            registry: Arc::new(Mutex::new(Registry::default())),
        };
        registry.register("samples", "Samples stored", m.samples.clone());
        registry.register(
            "correct_samples",
            "Stored samples correct under exact match",
            m.correct.clone(),
        );
        registry.register(
            "generator_errors",
            "Failed generator calls (retried)",
            m.generator_errors.clone(),
        );
        registry.register(
            "feedback_items",
            "Feedback items stored",
            m.feedback.clone(),
        );
        registry.register(
            "write_seconds",
            "Latency of one batched store write",
            m.write_seconds.clone(),
        );
        *m.registry.lock().expect("fresh mutex") = registry;
        Arc::new(m)
    }
}
