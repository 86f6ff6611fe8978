//! The HIR gradients of a Llama-family model computed one layer at a time, recomputing each
//! layer's activations for its backward pass (activation checkpointing).
//!
//! One backward pass over the whole graph keeps every intermediate tensor of every layer of
//! both sequences alive until it ends: attention scores and their softmax, MLP activations,
//! norms, for 30 layers. Here instead:
//!
//! 1. A forward pass that records nothing (the weights detached, the fused kernels) keeps
//!    only each layer's input `[B, T, H]`.
//! 2. The head (last norm, label-span language-model head, the HIR loss) is differentiated
//!    from the last layer's output, which gives the head's weight gradients and the
//!    gradient at that output.
//! 3. From the last layer down, each layer is run again with its graph from its saved
//!    input, and `Σ output ⊙ upstream` is differentiated: the layer's weight gradients and
//!    the gradient at its input, which is the previous layer's upstream. Its graph is then
//!    dropped.
//! 4. The embedding's gradient comes the same way from the first layer's input gradient.
//!
//! The gradients are the same as the whole-graph pass's, up to the rounding of the fused
//! kernels in step 1 (tested against it and against the reference's gradients); the cost
//! is one more forward pass without a graph, and at most one layer's activations are
//! held at a time.
//!
//! The recomputation's matrix products repeat the first pass's. Within a memory budget
//! ([`llama::Model::set_kept_products`]) the top layers keep the outputs of their seven
//! projections from step 1 ([`crate::kernels::gemm::recording`]), and step 3 copies them
//! instead of multiplying again ([`crate::kernels::gemm::replaying`]); their backward passes
//! are unchanged. On SmolLM2 that is 20.7 KB per token and layer, against the whole
//! graph's ~95 KB.

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor, Var};

use super::{head_logits, TrainBatch};
use crate::arch::llama::{self, positions_from_mask};
use crate::error::Result;
use crate::train::loss::{self, HirLoss, HirLossConfig};

/// One side (positive or negative sequences) of a paired batch in flight.
struct Side<'a> {
    batch: &'a TrainBatch,
    shared: llama::LayerShared,
    /// The input of every layer, from the forward pass without a graph; consumed from the
    /// top down.
    inputs: Vec<Tensor>,
    /// The gradient of the loss at the output of the layer processed next.
    upstream: Tensor,
    /// The products of the top layers' forward passes, kept for their recomputation;
    /// consumed from the top down.
    products: Vec<Option<Vec<Tensor>>>,
}

impl<'a> Side<'a> {
    /// The forward pass without a graph; `upstream` holds the last layer's output.
    fn forward(
        model: &llama::Model,
        plain: &llama::Model,
        batch: &'a TrainBatch,
        keep_from: usize,
    ) -> Result<Self> {
        let positions = positions_from_mask(&batch.mask);
        let inputs = llama::Batch {
            input_ids: &batch.input_ids,
            key_mask: &batch.mask,
            positions: &positions,
        };
        let shared = model.prepare(&inputs, 0)?;
        let mut x = plain.embed_tokens(&batch.input_ids)?;
        let mut saved = Vec::with_capacity(model.num_layers());
        let mut products = Vec::with_capacity(model.num_layers());
        for i in 0..model.num_layers() {
            let next = if i >= keep_from {
                let (next, kept) =
                    crate::kernels::gemm::recording(|| plain.layer(i, &x, &shared, None))?;
                products.push(Some(kept));
                next
            } else {
                products.push(None);
                plain.layer(i, &x, &shared, None)?
            };
            saved.push(x);
            x = next;
        }
        Ok(Self {
            batch,
            shared,
            inputs: saved,
            upstream: x,
            products,
        })
    }
}

/// The gradient of `Σ output ⊙ upstream` with respect to `input` and every weight on the
/// way: the vector-Jacobian product of `f` at `input`. The weight gradients go to `add`,
/// the input's is returned.
fn pull_back(
    input: &Tensor,
    upstream: &Tensor,
    f: impl FnOnce(&Tensor) -> Result<Tensor>,
    add: &mut dyn FnMut(&GradStore) -> Result<()>,
) -> Result<Tensor> {
    let x = Var::from_tensor(input)?;
    let out = f(x.as_tensor())?;
    let grads = seeded_sum(&out, upstream)?.backward()?;
    add(&grads)?;
    grad_of(&grads, &x)
}

/// `Σ out ⊙ upstream`, a scalar whose gradient at `out` is `upstream`.
///
/// On the CPU it is one graph node ([`Seed`]) whose backward pass hands `upstream` to
/// `out`. Written as a product and a sum, candle's backward pass would also differentiate
/// the product's untracked side and fill zeros to add each part to: eight passes over a
/// layer's output and four fresh tensors, against two passes here. The gradient is the
/// same to the bit either way (`1 · u`, then `0 + u`).
fn seeded_sum(out: &Tensor, upstream: &Tensor) -> Result<Tensor> {
    let fused = crate::kernels::cpu::applies(out)
        && crate::kernels::cpu::applies(upstream)
        && out.is_contiguous()
        && out.shape() == upstream.shape();
    Ok(if fused {
        out.apply_op1(Seed(upstream.clone()))?
    } else {
        (out * upstream)?.sum_all()?
    })
}

/// See [`seeded_sum`]: the node's value is the sum (accumulated in f64), its gradient at
/// its input is `upstream` times the incoming scalar gradient.
struct Seed(Tensor);

impl CustomOp1 for Seed {
    fn name(&self) -> &'static str {
        "seeded-sum"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = crate::kernels::cpu::input(s, l)?;
        let sum = crate::kernels::cpu::with_values(&self.0, |up| {
            if up.len() != out.len() {
                candle_core::bail!(
                    "seeded sum: {} outputs, {} upstream values",
                    out.len(),
                    up.len()
                );
            }
            Ok(out
                .iter()
                .zip(up)
                .map(|(&o, &u)| o as f64 * u as f64)
                .sum::<f64>())
        })?;
        Ok((CpuStorage::F32(vec![sum as f32]), Shape::from(())))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(self.0.broadcast_mul(grad)?))
    }
}

/// The gradient of `x` in `grads`; zeros where the loss does not depend on it.
fn grad_of(grads: &GradStore, x: &Var) -> Result<Tensor> {
    match grads.get(x.as_tensor()) {
        Some(g) => Ok(g.clone()),
        None => Ok(x.as_tensor().zeros_like()?),
    }
}

/// How many layers, from the top, keep their products within the model's budget
/// ([`llama::Model::set_kept_products`]): every token of both sides holds one f32 per
/// output of the layer's seven projections. Only where the products run on the CPU
/// kernels that keep them.
fn kept_layers(model: &llama::Model, pos: &TrainBatch, neg: &TrainBatch) -> usize {
    let budget = model.kept_products();
    if budget == 0 || !model.device().is_cpu() || model.dtype() != candle_core::DType::F32 {
        return 0;
    }
    let tokens = pos.input_ids.elem_count() + neg.input_ids.elem_count();
    let per_layer = (tokens * model.product_width() * 4).max(1);
    (budget / per_layer).min(model.num_layers())
}

/// See the module documentation.
pub(super) fn hir_gradients(
    model: &llama::Model,
    pos: &TrainBatch,
    neg: &TrainBatch,
    cfg: &HirLossConfig,
    add: &mut dyn FnMut(&GradStore) -> Result<()>,
) -> Result<HirLoss> {
    if pos.decoder.is_some() || neg.decoder.is_some() {
        return Err(crate::error::ModelError::InvalidRequest(
            "an encoder-decoder batch given to a decoder-only model".into(),
        ));
    }
    let keep_from = model.num_layers() - kept_layers(model, pos, neg);
    let plain = model.detached();
    let mut sides = [
        Side::forward(model, &plain, pos, keep_from)?,
        Side::forward(model, &plain, neg, keep_from)?,
    ];
    drop(plain);

    // The head and the loss, differentiated from the last layer's outputs.
    let tops = [
        Var::from_tensor(&sides[0].upstream)?,
        Var::from_tensor(&sides[1].upstream)?,
    ];
    let (pl, py) = head_logits(model, &model.final_norm(tops[0].as_tensor())?, pos)?;
    let (nl, ny) = head_logits(model, &model.final_norm(tops[1].as_tensor())?, neg)?;
    let hir = loss::hir_loss(None, &pl, &py, &nl, &ny, cfg)?;
    let grads = hir.total.backward()?;
    add(&grads)?;
    for (side, top) in sides.iter_mut().zip(&tops) {
        side.upstream = grad_of(&grads, top)?;
    }
    drop(grads);
    // The loss value stays; its graph (logits over the label spans) goes.
    let hir = HirLoss {
        total: hir.total.detach(),
        ..hir
    };

    // The layers, from the top down, each recomputed with its graph.
    for i in (0..model.num_layers()).rev() {
        for side in &mut sides {
            let input = side.inputs.pop().expect("one saved input per layer");
            let kept = side.products.pop().expect("one entry per layer");
            let shared = &side.shared;
            side.upstream = pull_back(
                &input,
                &side.upstream,
                |x| match kept {
                    Some(kept) => {
                        crate::kernels::gemm::replaying(kept, || model.layer(i, x, shared, None))
                    }
                    None => model.layer(i, x, shared, None),
                },
                add,
            )?;
        }
    }

    // The embedding rows the tokens picked.
    for side in &sides {
        let ids = &side.batch.input_ids;
        if let Some(grads) = model.embedding_gradient(ids, &side.upstream)? {
            add(&grads)?;
            continue;
        }
        let embedded = model.embed_tokens(ids)?;
        let grads = seeded_sum(&embedded, &side.upstream)?.backward()?;
        add(&grads)?;
    }
    Ok(hir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::weights::Weights;
    use crate::train::Example;
    use crate::WeightMode;
    use candle_core::{DType, Device};

    #[test]
    fn the_seeded_sum_gives_the_gradients_of_the_product_and_sum_bit_for_bit() {
        let dev = Device::Cpu;
        let w = Weights::random(5, 0.1, &dev, WeightMode::Trainable(DType::F32));
        let m = llama::Model::new(&llama::Config::tiny(), &w).unwrap();
        let ex = |n: usize| Example {
            prompt: vec![5; n],
            completion: vec![6, 0],
        };
        let batch = TrainBatch::new(&[ex(3), ex(5)], 0, &dev).unwrap();
        let positions = positions_from_mask(&batch.mask);
        let shared = m
            .prepare(
                &llama::Batch {
                    input_ids: &batch.input_ids,
                    key_mask: &batch.mask,
                    positions: &positions,
                },
                0,
            )
            .unwrap();
        let input = m.embed_tokens(&batch.input_ids).unwrap().detach();
        let upstream = Tensor::randn(0f32, 1.0, input.shape(), &dev).unwrap();
        let run = |seeded: bool| {
            let x = Var::from_tensor(&input).unwrap();
            let out = m.layer(0, x.as_tensor(), &shared, None).unwrap();
            let sum = if seeded {
                seeded_sum(&out, &upstream).unwrap()
            } else {
                (out * &upstream).unwrap().sum_all().unwrap()
            };
            let value: f32 = sum.to_scalar().unwrap();
            let grads = sum.backward().unwrap();
            let mut all = vec![grad_of(&grads, &x).unwrap()];
            for (name, var) in w.vars() {
                if name.starts_with("model.layers.0.") {
                    all.push(
                        grads
                            .get(var.as_tensor())
                            .expect("a layer weight's gradient")
                            .clone(),
                    );
                }
            }
            (value, all)
        };
        let ((v1, seeded), (v2, plain)) = (run(true), run(false));
        assert!((v1 - v2).abs() <= 1e-4 * v2.abs().max(1.0), "{v1} vs {v2}");
        assert_eq!(seeded.len(), plain.len());
        assert!(seeded.len() > 7, "the input and the layer's weights");
        for (a, b) in seeded.iter().zip(&plain) {
            let (a, b) = (
                a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                b.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            );
            assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()));
            assert!(a.iter().any(|&x| x != 0.0));
        }
    }

    #[test]
    fn the_budget_keeps_the_layers_that_fit() {
        let w = Weights::random(3, 0.1, &Device::Cpu, WeightMode::Trainable(DType::F32));
        let mut m = llama::Model::new(&llama::Config::tiny(), &w).unwrap();
        let ex = |n: usize| Example {
            prompt: vec![5; n],
            completion: vec![6, 0],
        };
        let pos = TrainBatch::new(&[ex(3), ex(5)], 0, &Device::Cpu).unwrap();
        let neg = TrainBatch::new(&[ex(4)], 0, &Device::Cpu).unwrap();
        // Every token of both batches, padding included; seven projections of
        // 32+16+16+32+48+48+32 outputs.
        let tokens = pos.input_ids.elem_count() + neg.input_ids.elem_count();
        assert_eq!(tokens, 2 * 7 + 6);
        let layer = tokens * 224 * 4;
        assert_eq!(m.product_width(), 224);
        for (budget, layers) in [
            (0, 0),
            (layer - 1, 0),
            (layer, 1),
            (2 * layer - 1, 1),
            (2 * layer, 2),
            (usize::MAX, 2),
        ] {
            m.set_kept_products(budget);
            assert_eq!(kept_layers(&m, &pos, &neg), layers, "budget {budget}");
        }
    }
}
