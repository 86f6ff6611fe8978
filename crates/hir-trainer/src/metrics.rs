//! Prometheus metrics of the trainer.

use std::sync::{Arc, Mutex};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

/// Every metric the trainer exports.
#[derive(Debug)]
pub struct Metrics {
    /// Optimizer steps taken.
    pub steps: Counter,
    /// Tokens processed by training (rate() gives tokens/s).
    pub tokens: Counter,
    /// Loss of the last step.
    pub loss: Gauge<f64, AtomicU64>,
    /// Wall time of one optimizer step.
    pub step_seconds: Histogram,
    /// Wall time of one swap into one generator, as the generator measured it.
    pub swap_seconds: Histogram,
    /// Iterations the generators are behind the trainer's newest version (0 when all
    /// serve it).
    pub version_lag: Gauge,
    /// Runs being driven now.
    pub active_runs: Gauge,
    /// The registry to serve.
    pub registry: Arc<Mutex<Registry>>,
}

impl Metrics {
    /// Creates and registers the metrics.
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("hir_trainer");
        let m = Metrics {
            steps: Counter::default(),
            tokens: Counter::default(),
            loss: Gauge::default(),
            step_seconds: Histogram::new(exponential_buckets(0.01, 2.0, 16)),
            swap_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            version_lag: Gauge::default(),
            active_runs: Gauge::default(),
            registry: Arc::new(Mutex::new(Registry::default())),
        };
        registry.register("steps", "Optimizer steps taken", m.steps.clone());
        registry.register(
            "tokens",
            "Tokens processed by training (positive and negative sequences)",
            m.tokens.clone(),
        );
        registry.register("loss", "Loss of the last optimizer step", m.loss.clone());
        registry.register(
            "step_seconds",
            "Wall time of one optimizer step",
            m.step_seconds.clone(),
        );
        registry.register(
            "swap_seconds",
            "Wall time of one swap into one generator",
            m.swap_seconds.clone(),
        );
        registry.register(
            "version_lag",
            "Iterations the generators are behind the newest trained version",
            m.version_lag.clone(),
        );
        registry.register("active_runs", "Runs being driven", m.active_runs.clone());
        *m.registry.lock().expect("fresh mutex") = registry;
        Arc::new(m)
    }
}
