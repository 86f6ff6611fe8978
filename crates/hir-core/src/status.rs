//! The lifecycles of a run and of its iterations, as the store records them and the
//! services report them. Which moves are allowed lives with the compare-and-set that makes
//! them, in `hir_store::iterations`.

crate::text_enum! {
    /// Lifecycle of a run.
    pub enum RunStatus {
        /// Created, not started yet.
        Pending => "pending",
        /// Iterations are being executed.
        Running => "running",
        /// Stopped by an operator; may be resumed.
        Stopped => "stopped",
        /// All iterations finished.
        Done => "done",
        /// Gave up; `error` says why.
        Failed => "failed",
    }
}

crate::text_enum! {
    /// Where an iteration is in its round.
    pub enum IterationStatus {
        /// Created, nothing done yet.
        Pending => "pending",
        /// The generator is producing samples.
        Sampling => "sampling",
        /// All samples are scored, relabeled and stored.
        Sampled => "sampled",
        /// The trainer is consuming batches.
        Training => "training",
        /// The new model version is registered.
        Trained => "trained",
        /// The new model is being evaluated.
        Evaluating => "evaluating",
        /// Finished.
        Done => "done",
        /// Gave up; `error` says why.
        Failed => "failed",
    }
}

impl IterationStatus {
    /// Whether the iteration can no longer change (done or failed).
    pub fn is_terminal(self) -> bool {
        matches!(self, IterationStatus::Done | IterationStatus::Failed)
    }
}

crate::text_enum! {
    /// Why a completion ended, as the store records it with each sample.
    pub enum FinishReason {
        /// The model emitted its end-of-sequence token.
        Eos => "eos",
        /// The text reached a stop string.
        Stop => "stop",
        /// `max_new_tokens` was reached: the output is cut.
        Length => "length",
        /// The generator did not say (an older or foreign generator).
        Unspecified => "unspecified",
    }
}
