//! The domain of hindsight: everything HIR needs that does no network or database I/O.
//!
//! * [`task`]: BIG-bench JSON tasks (multiple choice and generative) and a catalog over a
//!   `benchmark_tasks/`-style folder.
//! * [`prompt`]: prompts built exactly as the reference implementation builds them.
//! * [`split`]: the reference's 80/20 split, reproducing numpy's `RandomState(seed).permutation`.
//! * [`score`]: the paper's exact-match score and a stricter answer-extraction score.
//! * [`relabel`]: hindsight relabel policies (the paper's binary policy and a richer one).
//! * [`suboutput`]: the sub-output truncation sampler of HIR's training phase.
//! * [`run`]: a run's hyperparameters with the reference's defaults.
//! * [`rng`]: the small seeded generator the samplers use.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod digest;
pub mod error;
pub mod eval;
pub mod prompt;
pub mod relabel;
pub mod rng;
pub mod run;
pub mod score;
pub mod split;
pub mod status;
pub mod suboutput;
pub mod task;
pub mod text_enum;

pub use error::{CoreError, ErrorClass, Result};
