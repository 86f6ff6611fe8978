//! Training: batches with labels ([`TrainBatch`]), the logits a model trains on
//! ([`TrainLogits`]), the language-model and HIR losses of a batch, and the
//! [`Optimizer`] (AdamW with fp32 state, gradient accumulation and global-norm
//! clipping).
//!
//! One job per file: `batch` (examples into padded batches), `optimizer` (the update
//! rule and its state); the losses of a model's batch are here.

mod batch;
mod layerwise;
pub mod loss;
mod optimizer;

use candle_core::backprop::GradStore;
use candle_core::Tensor;

pub use batch::{Example, TrainBatch};
pub use optimizer::{AdamW, AdamWConfig, GradAccumulator, MomentValues, Optimizer, StepReport};

use crate::arch::AnyModel;
use crate::arch::{llama, t5};
use crate::error::{ModelError, Result};
use loss::{HirLoss, HirLossConfig};

/// A model that turns a [`TrainBatch`] into logits aligned with its labels.
pub trait TrainLogits {
    /// Logits `[B, T, V]` and labels `[B, T]`, position by position.
    fn aligned_logits(&self, batch: &TrainBatch) -> Result<(Tensor, Tensor)>;
    /// Whether two forward passes of the same batch differ (training-mode dropout).
    fn has_dropout(&self) -> bool {
        false
    }
    /// The HIR loss of paired batches (see [`hir_loss`]), with the gradients of its total
    /// handed to `add`, in one or more parts that sum to them.
    ///
    /// By default one backward pass over the whole graph; a model may instead compute the
    /// same gradients in parts that need less memory.
    fn hir_gradients(
        &self,
        pos: &TrainBatch,
        neg: &TrainBatch,
        cfg: &HirLossConfig,
        add: &mut dyn FnMut(&GradStore) -> Result<()>,
    ) -> Result<HirLoss>
    where
        Self: Sized,
    {
        let loss = hir_loss(self, pos, neg, cfg)?;
        add(&loss.total.backward()?)?;
        Ok(loss)
    }
}

impl TrainLogits for llama::Model {
    fn aligned_logits(&self, batch: &TrainBatch) -> Result<(Tensor, Tensor)> {
        if batch.decoder.is_some() {
            return Err(ModelError::InvalidRequest(
                "an encoder-decoder batch given to a decoder-only model".into(),
            ));
        }
        let positions = llama::positions_from_mask(&batch.mask);
        let hidden = self.forward_hidden(
            &llama::Batch {
                input_ids: &batch.input_ids,
                key_mask: &batch.mask,
                positions: &positions,
            },
            None,
        )?;
        head_logits(self, &hidden, batch)
    }

    /// Layer by layer, recomputing each layer's activations for its backward pass: the
    /// same gradients in a fraction of the memory (see [`layerwise`]).
    fn hir_gradients(
        &self,
        pos: &TrainBatch,
        neg: &TrainBatch,
        cfg: &HirLossConfig,
        add: &mut dyn FnMut(&GradStore) -> Result<()>,
    ) -> Result<HirLoss> {
        layerwise::hir_gradients(self, pos, neg, cfg, add)
    }
}

/// Logits and labels of each row's labelled span from a decoder's final hidden states
/// `[B, T, H]` (after the last norm): position t predicts token t + 1.
fn head_logits(
    model: &llama::Model,
    hidden: &Tensor,
    batch: &TrainBatch,
) -> Result<(Tensor, Tensor)> {
    let (hidden, labels) = loss::shift_for_causal(hidden, &batch.labels)?;
    let (hidden, labels) = label_span(&hidden, &labels)?;
    Ok((model.logits(&hidden)?, labels))
}

/// The hidden states `[B, L, H]` and labels `[B, L]` of each row's labelled span, `L` the
/// longest span, from aligned `[B, T, H]` and `[B, T]`. Rows shorter than `L` are padded
/// with ignored labels. Only these positions reach the language-model head, so its logits
/// and their gradient cost `L` positions instead of `T`: a completion is a few tokens, its
/// prompt hundreds. The losses are the same, since every other position is ignored.
fn label_span(hidden: &Tensor, labels: &Tensor) -> Result<(Tensor, Tensor)> {
    let (b, t, h) = hidden.dims3()?;
    let rows = labels.to_dtype(candle_core::DType::I64)?.to_vec2::<i64>()?;
    let spans: Vec<(usize, usize)> = rows
        .iter()
        .map(|row| {
            let first = row.iter().position(|&l| l != loss::IGNORE_INDEX);
            let last = row.iter().rposition(|&l| l != loss::IGNORE_INDEX);
            match (first, last) {
                (Some(f), Some(l)) => (f, l + 1 - f),
                _ => (0, 0),
            }
        })
        .collect();
    let l = spans.iter().map(|s| s.1).max().unwrap_or(0).max(1);
    if l >= t {
        return Ok((hidden.clone(), labels.clone()));
    }
    let mut index = Vec::with_capacity(b * l);
    let mut kept = Vec::with_capacity(b * l);
    for (row, &(start, len)) in rows.iter().zip(&spans) {
        for j in 0..l {
            let at = (start + j).min(t - 1);
            index.push(at as u32);
            kept.push(if j < len { row[at] } else { loss::IGNORE_INDEX });
        }
    }
    let device = hidden.device();
    let index = Tensor::from_vec(index, (b, l, 1), device)?
        .broadcast_as((b, l, h))?
        .contiguous()?;
    let labels = Tensor::from_vec(kept, (b, l), device)?.to_dtype(labels.dtype())?;
    Ok((hidden.contiguous()?.gather(&index, 1)?, labels))
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
    fn hir_gradients(
        &self,
        pos: &TrainBatch,
        neg: &TrainBatch,
        cfg: &HirLossConfig,
        add: &mut dyn FnMut(&GradStore) -> Result<()>,
    ) -> Result<HirLoss> {
        match self {
            Self::Llama(m) => m.hir_gradients(pos, neg, cfg, add),
            Self::T5(m) => m.hir_gradients(pos, neg, cfg, add),
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
/// token mean, averaged over the examples (see [`crate::train::loss`]).
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
