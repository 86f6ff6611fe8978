//! Crash points for the fault suite: named places in the services where a process can be
//! made to kill itself with SIGKILL, so that a kill lands in a chosen phase of the loop
//! (while a sampling stream is sent, between a training step and its commit, while a
//! checkpoint is written, …) instead of wherever a timer happens to fall.
//!
//! The points are compiled in only with the `fault-injection` feature (the fault suite
//! builds `hir` with it; release images do not have it), where they are
//! [`fail`](https://docs.rs/fail) fail points configured by the `FAILPOINTS` environment
//! variable: `FAILPOINTS='trainer.step=2*off->return'` kills the process at the third
//! time it reaches `trainer.step`. Without the feature [`point`] compiles to nothing.
//!
//! Every point the services define is listed in [`POINTS`], in the order a loop iteration
//! reaches them, which the suite plans its kills from.

/// A crash point: its name and the service that reaches it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Point {
    /// The fail point's name, `<service>.<phase>`.
    pub name: &'static str,
    /// The service whose process reaches it: `generator`, `relabeler` or `trainer`.
    pub service: &'static str,
    /// What the process is doing there.
    pub phase: &'static str,
}

const fn p(name: &'static str, service: &'static str, phase: &'static str) -> Point {
    Point {
        name,
        service,
        phase,
    }
}

/// Every crash point, in the order an iteration of a run reaches them.
pub const POINTS: &[Point] = &[
    p(
        GENERATOR_SAMPLE,
        "generator",
        "sending a sampled completion",
    ),
    p(
        RELABELER_STREAM,
        "relabeler",
        "reading a generator's stream",
    ),
    p(
        RELABELER_WRITE,
        "relabeler",
        "writing a batch of scored samples",
    ),
    p(
        TRAINER_STEP,
        "trainer",
        "between a training step and its commit",
    ),
    p(TRAINER_SNAPSHOT, "trainer", "writing a training snapshot"),
    p(TRAINER_CHECKPOINT, "trainer", "writing a checkpoint"),
    p(GENERATOR_UPLOAD, "generator", "receiving an upload"),
    p(GENERATOR_SWAP, "generator", "loading swapped weights"),
    p(
        TRAINER_SWAP,
        "trainer",
        "between a swap and its verification",
    ),
    p(
        GENERATOR_EVALUATE,
        "generator",
        "sending a greedy (evaluation) completion",
    ),
    p(
        TRAINER_EVALUATE,
        "trainer",
        "between evaluation answers and their scores",
    ),
];

/// The generator sends one completion of a sampling request (temperature above 0).
pub const GENERATOR_SAMPLE: &str = "generator.sample";
/// The generator sends one completion of a greedy request: the trainer's evaluation.
pub const GENERATOR_EVALUATE: &str = "generator.evaluate";
/// The generator has written a chunk of an upload into its staging folder.
pub const GENERATOR_UPLOAD: &str = "generator.upload";
/// The generator has loaded swapped weights and not yet made them the serving ones.
pub const GENERATOR_SWAP: &str = "generator.swap";
/// The relabeler has received a generator's response and not yet stored it.
pub const RELABELER_STREAM: &str = "relabeler.stream";
/// The relabeler is about to write a batch of scored samples.
pub const RELABELER_WRITE: &str = "relabeler.write";
/// The trainer has taken an optimizer step that is not yet committed.
pub const TRAINER_STEP: &str = "trainer.step";
/// The trainer has written part of a snapshot (its weights and optimizer, not yet renamed
/// into place).
pub const TRAINER_SNAPSHOT: &str = "trainer.snapshot";
/// The trainer has written a checkpoint's files and not yet registered the version.
pub const TRAINER_CHECKPOINT: &str = "trainer.checkpoint";
/// A generator has taken a new version and the trainer has not yet verified it.
pub const TRAINER_SWAP: &str = "trainer.swap";
/// The trainer has the evaluation answers and has not yet recorded their scores.
pub const TRAINER_EVALUATE: &str = "trainer.evaluate";

/// Reads the `FAILPOINTS` configuration. Call once at start-up, before serving.
pub fn init() {
    #[cfg(feature = "fault-injection")]
    {
        // Kept for the life of the process: the configuration is never torn down.
        std::mem::forget(fail::FailScenario::setup());
        if let Ok(points) = std::env::var("FAILPOINTS") {
            tracing::warn!(%points, "fault injection is armed");
        }
    }
}

/// A crash point: with the `fault-injection` feature, and when `FAILPOINTS` arms `name`
/// with `return`, the process kills itself here with SIGKILL; otherwise nothing.
#[inline]
pub fn point(name: &'static str) {
    #[cfg(feature = "fault-injection")]
    fail::fail_point!(name, |_| kill(name));
    #[cfg(not(feature = "fault-injection"))]
    let _ = name;
}

#[cfg(feature = "fault-injection")]
fn kill(name: &str) {
    eprintln!("fault injection: killing this process at {name}");
    // SAFETY: kill(2) on this process's own id with a signal number; no memory is touched.
    #[allow(unsafe_code)]
    unsafe {
        libc::kill(libc::getpid(), libc::SIGKILL);
    }
    // SIGKILL cannot be caught: the process ends before kill(2) returns.
    unreachable!("SIGKILL did not end the process");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_point_is_named_after_its_service_and_listed_once() {
        for (i, p) in POINTS.iter().enumerate() {
            assert!(
                p.name.starts_with(&format!("{}.", p.service)),
                "{} belongs to {}",
                p.name,
                p.service
            );
            assert!(
                POINTS[i + 1..].iter().all(|q| q.name != p.name),
                "{} is listed twice",
                p.name
            );
        }
    }

    #[test]
    fn an_unarmed_point_does_nothing() {
        init();
        for p in POINTS {
            point(p.name);
        }
    }
}
