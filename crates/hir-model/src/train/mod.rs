//! Training: batches with labels ([`TrainBatch`]), the logits a model trains on
//! ([`TrainLogits`]), the language-model and HIR losses of a batch, and the
//! [`Optimizer`] (AdamW with fp32 state, gradient accumulation and global-norm
//! clipping).
//!
//! One job per file: `batch` (examples into padded batches), `optimizer` (the update
//! rule and its state); the losses of a model's batch are here.

mod batch;
mod optimizer;

use candle_core::Tensor;

pub use batch::{Example, TrainBatch};
pub use optimizer::{AdamW, AdamWConfig, GradAccumulator, Optimizer, StepReport};

use crate::arch::AnyModel;
use crate::error::{ModelError, Result};
use crate::loss::{self, HirLoss, HirLossConfig};
use crate::{llama, t5};

/// A model that turns a [`TrainBatch`] into logits aligned with its labels.
pub trait TrainLogits {
    /// Logits `[B, T, V]` and labels `[B, T]`, position by position.
    fn aligned_logits(&self, batch: &TrainBatch) -> Result<(Tensor, Tensor)>;
    /// Whether two forward passes of the same batch differ (training-mode dropout).
    fn has_dropout(&self) -> bool {
        false
    }
}

impl TrainLogits for llama::Model {
    fn aligned_logits(&self, batch: &TrainBatch) -> Result<(Tensor, Tensor)> {
        if batch.decoder.is_some() {
            return Err(ModelError::InvalidRequest(
                "an encoder-decoder batch given to a decoder-only model".into(),
            ));
        }
        let logits = self.forward(&batch.input_ids, &batch.mask)?;
        loss::shift_for_causal(&logits, &batch.labels)
    }
}

impl TrainLogits for t5::Model {
    fn aligned_logits(&self, batch: &TrainBatch) -> Result<(Tensor, Tensor)> {
        let Some((dec, dec_mask)) = &batch.decoder else {
            return Err(ModelError::InvalidRequest(
                "a decoder-only batch given to T5; build it with TrainBatch::for_model".into(),
            ));
        };
        let logits = self.forward(&batch.input_ids, &batch.mask, dec, dec_mask)?;
        Ok((logits, batch.labels.clone()))
    }
    fn has_dropout(&self) -> bool {
        t5::Model::has_dropout(self)
    }
}

impl TrainLogits for AnyModel {
    fn aligned_logits(&self, batch: &TrainBatch) -> Result<(Tensor, Tensor)> {
        match self {
            Self::Llama(m) => m.aligned_logits(batch),
            Self::T5(m) => m.aligned_logits(batch),
        }
    }
    fn has_dropout(&self) -> bool {
        match self {
            Self::Llama(m) => m.has_dropout(),
            Self::T5(m) => TrainLogits::has_dropout(m),
        }
    }
}

/// Plain language-model loss (label-smoothed cross-entropy) of a batch.
pub fn lm_loss(model: &impl TrainLogits, batch: &TrainBatch, epsilon: f64) -> Result<Tensor> {
    let (logits, labels) = model.aligned_logits(batch)?;
    loss::label_smoothed_cross_entropy(&logits, &labels, epsilon)
}

/// The HIR loss of paired batches: `pos[i]` and `neg[i]` share a completion
/// under the relabeled and the opposite instruction. Each term is a per-example
/// token mean, averaged over the examples (see [`crate::loss`]).
///
/// A model with training-mode dropout takes the reference's three forward passes
/// (label smoothing and entropy on the first, the contrastive term on a second
/// positive pass and the negative one, each with its own masks); without dropout
/// the first two are the same computation and one is skipped.
pub fn hir_loss(
    model: &impl TrainLogits,
    pos: &TrainBatch,
    neg: &TrainBatch,
    cfg: &HirLossConfig,
) -> Result<HirLoss> {
    let supervised = if model.has_dropout() {
        Some(model.aligned_logits(pos)?.0)
    } else {
        None
    };
    let (pl, py) = model.aligned_logits(pos)?;
    let (nl, ny) = model.aligned_logits(neg)?;
    loss::hir_loss(supervised.as_ref(), &pl, &py, &nl, &ny, cfg)
}
