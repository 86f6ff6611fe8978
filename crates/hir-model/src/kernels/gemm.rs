//! Dense f32 matrix products on the CPU, split across candle's own worker threads.
//!
//! candle runs its element-wise kernels on a barrier pool (the calling thread plus
//! `threads - 1` workers that spin for a while after each kernel) and its matrix products
//! on rayon's pool (`threads` more threads, which also spin when they run out of work). A
//! training step alternates between the two thousands of times, so on a small machine the
//! idle threads of one pool compete for the cores with the busy threads of the other. Here
//! a product is cut into one block of rows (or columns) per barrier-pool thread, and each
//! thread multiplies its block with a single-threaded `gemm` call: the products and the
//! element-wise kernels then run on the same threads, one per core.
//!
//! [`linear`] is `x Wᵀ` as a graph node whose backward pass uses the same products
//! (`dx = g W`, `dW = gᵀ x`), skipping the gradient of a side that takes none (a frozen
//! base under LoRA adapters). Every block goes through the same `gemm` kernels, in a split
//! that depends only on the shapes and the thread count, so a run repeats bit for bit on the
//! same machine.

use std::ops::Range;

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};
use gemm::{gemm, Parallelism};

use super::cpu::{for_each_range, input, with_values, SharedMut, ALIGN};

/// Products below this many multiply-adds run on the calling thread alone: waking the
/// other threads costs more than they save.
const PARALLEL_FROM: usize = 1 << 20;

/// A read-only strided matrix: element `(i, j)` is at `data[i·rs + j·cs]`.
#[derive(Clone, Copy)]
struct View<'a> {
    data: &'a [f32],
    rs: usize,
    cs: usize,
}

impl<'a> View<'a> {
    fn row_major(data: &'a [f32], cols: usize) -> Self {
        View {
            data,
            rs: cols,
            cs: 1,
        }
    }

    fn transposed(self) -> Self {
        View {
            data: self.data,
            rs: self.cs,
            cs: self.rs,
        }
    }

    /// Whether a `rows × cols` matrix fits in `data`.
    fn holds(&self, rows: usize, cols: usize) -> bool {
        rows == 0 || cols == 0 || (rows - 1) * self.rs + (cols - 1) * self.cs < self.data.len()
    }
}

/// `lhs · rhs` for an `m × k` `lhs` and a `k × n` `rhs`, as a row-major `m × n` vector.
fn product(m: usize, n: usize, k: usize, lhs: View, rhs: View) -> candle_core::Result<Vec<f32>> {
    if !lhs.holds(m, k) || !rhs.holds(k, n) {
        candle_core::bail!("matrix product: operands smaller than {m}×{k} · {k}×{n}");
    }
    let mut dst: Vec<f32> = Vec::with_capacity(m * n);
    if k == 0 {
        dst.resize(m * n, 0.0);
        return Ok(dst);
    }
    let out = SharedMut(dst.as_mut_ptr());
    // One block: rows [r0, r1) and columns [c0, c1) of the destination.
    let block = |rows: Range<usize>, cols: Range<usize>| {
        // SAFETY: `holds` checked both operands' extents; the block lies inside the
        // destination's `m × n` capacity and no other block overlaps it; `read_dst` is
        // false, so gemm writes every element of the block without reading it.
        unsafe {
            gemm(
                rows.len(),
                cols.len(),
                k,
                out.at(rows.start * n + cols.start),
                1,
                n as isize,
                false,
                lhs.data.as_ptr().add(rows.start * lhs.rs),
                lhs.cs as isize,
                lhs.rs as isize,
                rhs.data.as_ptr().add(cols.start * rhs.cs),
                rhs.cs as isize,
                rhs.rs as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                Parallelism::None,
            )
        }
    };
    if m * n * k < PARALLEL_FROM {
        block(0..m, 0..n);
    } else if m >= n {
        for_each_range(m, ALIGN, |_, rows| block(rows, 0..n));
    } else {
        for_each_range(n, ALIGN, |_, cols| block(0..m, cols));
    }
    // SAFETY: the blocks above cover every element of the `m × n` destination.
    unsafe { dst.set_len(m * n) };
    Ok(dst)
}

/// Whether [`linear`] takes `x` and `w`: both f32 on the CPU.
pub fn applies(x: &Tensor, w: &Tensor) -> bool {
    super::cpu::applies(x) && super::cpu::applies(w)
}

/// `x Wᵀ` for `x` `[rows, in]` and `W` `[out, in]`, f32 on the CPU.
///
/// Inside [`recording`] the output is also kept; inside [`replaying`] the next kept output
/// is copied instead of multiplying.
pub fn linear(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    let replayed = TAPE.with(|t| match &mut *t.borrow_mut() {
        Some(Tape::Replay(kept)) => Some(kept.next()),
        _ => None,
    });
    let y = match replayed {
        None => x.apply_op2(&w, Linear)?,
        Some(Some(out)) => x.apply_op2(&w, Replayed(out))?,
        Some(None) => candle_core::bail!("a replayed forward pass ran more products than it kept"),
    };
    TAPE.with(|t| {
        if let Some(Tape::Record(kept)) = &mut *t.borrow_mut() {
            kept.push(y.detach());
        }
    });
    Ok(y)
}

// === products kept from one forward pass for the next ===

/// What [`linear`] does on this thread besides multiplying: keep each output (`Record`),
/// or take its output from the kept ones, in order (`Replay`).
enum Tape {
    Record(Vec<Tensor>),
    Replay(std::vec::IntoIter<Tensor>),
}

thread_local! {
    static TAPE: std::cell::RefCell<Option<Tape>> = const { std::cell::RefCell::new(None) };
}

/// Runs `f` and returns, with its result, the output of every [`linear`] product it ran
/// on this thread, in order.
pub(crate) fn recording<R, E: From<candle_core::Error>>(
    f: impl FnOnce() -> Result<R, E>,
) -> Result<(R, Vec<Tensor>), E> {
    let outer = TAPE.with(|t| t.replace(Some(Tape::Record(Vec::new()))));
    let result = f();
    let tape = TAPE.with(|t| t.replace(outer));
    let kept = match tape {
        Some(Tape::Record(kept)) => kept,
        _ => Vec::new(),
    };
    Ok((result?, kept))
}

/// Runs `f`, a forward pass that runs the same products in the same order as the one
/// [`recording`] kept `kept` from, with each [`linear`] product taking its output from
/// `kept` (a copy) instead of multiplying. The products are graph nodes as usual: their
/// backward passes multiply as before. An error if `f` runs another number of products
/// or another shape.
pub(crate) fn replaying<R, E: From<candle_core::Error>>(
    kept: Vec<Tensor>,
    f: impl FnOnce() -> Result<R, E>,
) -> Result<R, E> {
    let outer = TAPE.with(|t| t.replace(Some(Tape::Replay(kept.into_iter()))));
    let result = f();
    let tape = TAPE.with(|t| t.replace(outer));
    let result = result?;
    if let Some(Tape::Replay(mut rest)) = tape {
        if rest.next().is_some() {
            return Err(candle_core::Error::Msg(
                "a replayed forward pass ran fewer products than it kept".into(),
            )
            .into());
        }
    }
    Ok(result)
}

/// [`Linear`] whose output is given: a kept product (see [`replaying`]).
struct Replayed(Tensor);

impl CustomOp2 for Replayed {
    fn name(&self) -> &'static str {
        "linear-replayed"
    }

    fn cpu_fwd(
        &self,
        _s1: &CpuStorage,
        l1: &Layout,
        _s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, n, _) = linear_dims(l1, l2)?;
        if self.0.dims() != [rows, n] {
            candle_core::bail!(
                "a replayed product of shape {:?} where {rows}x{n} is computed",
                self.0.shape()
            );
        }
        let y = with_values(&self.0, |v| Ok(v.to_vec()))?;
        Ok((CpuStorage::F32(y), Shape::from((rows, n))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        y: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        Linear.bwd(x, w, y, g)
    }
}

struct Linear;

/// `(rows, out, in)` of `x Wᵀ` for `x` `[rows, in]` and `W` `[out, in]`; an error when the
/// inner dimensions differ.
fn linear_dims(x: &Layout, w: &Layout) -> candle_core::Result<(usize, usize, usize)> {
    let ((rows, k), (n, wk)) = (x.shape().dims2()?, w.shape().dims2()?);
    if wk != k {
        candle_core::bail!("linear: input {:?}, weight {:?}", x.shape(), w.shape());
    }
    Ok((rows, n, k))
}

impl CustomOp2 for Linear {
    fn name(&self) -> &'static str {
        "linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, n, k) = linear_dims(l1, l2)?;
        let (x, w) = (input(s1, l1)?, input(s2, l2)?);
        let y = product(
            rows,
            n,
            k,
            View::row_major(x, k),
            View::row_major(w, k).transposed(),
        )?;
        Ok((CpuStorage::F32(y), Shape::from((rows, n))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let ((rows, n), k) = (g.dims2()?, x.dim(1)?);
        let (dx, dw) = with_values(g, |g| {
            let g = View::row_major(g, n);
            // dx = g W: [rows, out] · [out, in].
            let dx = x
                .track_op()
                .then(|| with_values(w, |w| product(rows, k, n, g, View::row_major(w, k))))
                .transpose()?;
            // dW = gᵀ x: [out, rows] · [rows, in].
            let dw = w
                .track_op()
                .then(|| {
                    with_values(x, |x| {
                        product(n, k, rows, g.transposed(), View::row_major(x, k))
                    })
                })
                .transpose()?;
            Ok((dx, dw))
        })?;
        let tensor = |v: Vec<f32>, like: &Tensor| Tensor::from_vec(v, like.shape(), like.device());
        Ok((
            dx.map(|v| tensor(v, x)).transpose()?,
            dw.map(|v| tensor(v, w)).transpose()?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::cpu::testing::{max_diff, probed, random};
    use candle_core::Var;

    fn max_rel_diff(a: &Tensor, b: &Tensor) -> f32 {
        let scale: f32 = b.abs().unwrap().max_all().unwrap().to_scalar().unwrap();
        max_diff(a, b) / scale.max(1e-30)
    }

    /// `y`, `dx` and `dW` of `Σ (x Wᵀ) ⊙ probe`, from [`linear`] or from candle's matmul.
    fn run(x: &Tensor, w: &Tensor, fused: bool) -> (Tensor, Tensor, Tensor) {
        let (xv, wv) = (Var::from_tensor(x).unwrap(), Var::from_tensor(w).unwrap());
        let y = if fused {
            linear(xv.as_tensor(), wv.as_tensor()).unwrap()
        } else {
            xv.as_tensor().matmul(&wv.as_tensor().t().unwrap()).unwrap()
        };
        let probe = random(y.dims(), 77);
        let grads = probed(&y, &probe);
        (
            y.detach(),
            grads.get(xv.as_tensor()).unwrap().clone(),
            grads.get(wv.as_tensor()).unwrap().clone(),
        )
    }

    #[test]
    fn values_and_gradients_match_candles_matmul_on_split_and_unsplit_shapes() {
        // Tall (split by rows), wide (split by columns, as the LM head at labelled
        // positions), ragged sizes, and one below the parallel threshold.
        for (i, &(rows, k, n)) in [(203, 96, 80), (24, 64, 1000), (130, 77, 131), (3, 5, 7)]
            .iter()
            .enumerate()
        {
            let x = random(&[rows, k], 10 + i as u64);
            let w = random(&[n, k], 20 + i as u64);
            let (y1, dx1, dw1) = run(&x, &w, true);
            let (y2, dx2, dw2) = run(&x, &w, false);
            assert_eq!(y1.dims(), [rows, n]);
            for (name, a, b) in [("y", &y1, &y2), ("dx", &dx1, &dx2), ("dW", &dw1, &dw2)] {
                let d = max_rel_diff(a, b);
                assert!(d < 1e-5, "{rows}×{k}·{n}: {name} differs by {d} (relative)");
            }
        }
    }

    #[test]
    fn repeated_products_are_bit_identical() {
        let x = random(&[300, 128], 1);
        let w = random(&[200, 128], 2);
        let a = run(&x, &w, true);
        let b = run(&x, &w, true);
        for (p, q) in [(&a.0, &b.0), (&a.1, &b.1), (&a.2, &b.2)] {
            let (p, q) = (
                p.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                q.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            );
            assert!(p.iter().zip(&q).all(|(a, b)| a.to_bits() == b.to_bits()));
        }
    }

    #[test]
    fn a_frozen_weight_takes_no_gradient() {
        let x = Var::from_tensor(&random(&[150, 64], 3)).unwrap();
        let w = random(&[120, 64], 4);
        let y = linear(x.as_tensor(), &w).unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(x.as_tensor()).is_some());
        assert!(grads.get(&w).is_none());
    }

    #[test]
    fn mismatched_or_strided_inputs_are_errors_not_panics() {
        assert!(linear(&random(&[4, 8], 5), &random(&[3, 9], 6)).is_err());
        assert!(linear(&random(&[2, 4, 8], 5), &random(&[3, 8], 6)).is_err());
        let v = View::row_major(&[0.0; 6], 3);
        assert!(product(3, 3, 3, v, v).is_err());
    }

    /// `y`, `dx` and `dW` of `Σ linear(x, W) ⊙ probe` for fresh variables.
    fn pass(x: &Tensor, w: &Tensor, probe: &Tensor) -> (Tensor, Tensor, Tensor) {
        let (xv, wv) = (Var::from_tensor(x).unwrap(), Var::from_tensor(w).unwrap());
        let y = linear(xv.as_tensor(), wv.as_tensor()).unwrap();
        let grads = (&y * probe).unwrap().sum_all().unwrap().backward().unwrap();
        (
            y.detach(),
            grads.get(xv.as_tensor()).unwrap().clone(),
            grads.get(wv.as_tensor()).unwrap().clone(),
        )
    }

    #[test]
    fn replayed_products_are_the_kept_outputs_with_the_same_backward() {
        let (x, w1, w2) = (
            random(&[70, 24], 1),
            random(&[40, 24], 2),
            random(&[24, 40], 3),
        );
        // Two products in a row, kept in order.
        let forward = || -> candle_core::Result<Tensor> { linear(&linear(&x, &w1)?, &w2) };
        let (y, kept) = recording(forward).unwrap();
        assert_eq!(kept.len(), 2);
        let h = linear(&x, &w1).unwrap();
        assert_eq!(max_diff(&kept[0], &h), 0.0);
        assert_eq!(max_diff(&kept[1], &y), 0.0);
        assert!(
            kept.iter().all(|t| !t.track_op()),
            "kept outputs hold no graph"
        );

        // Replayed: the output is the kept one, bit for bit, even where it is not what
        // the product would give, and the gradients are the product's.
        let probe = random(&[70, 40], 4);
        let want = pass(&x, &w1, &probe);
        let shifted = (&kept[0] + 1.0).unwrap();
        let got = replaying(vec![shifted.clone()], || {
            Ok::<_, candle_core::Error>(pass(&x, &w1, &probe))
        })
        .unwrap();
        assert_eq!(max_diff(&got.0, &shifted), 0.0, "the kept output is used");
        assert_eq!(max_diff(&got.1, &want.1), 0.0, "dx as the product's");
        assert_eq!(max_diff(&got.2, &want.2), 0.0, "dW as the product's");
        // Outside a replay, products multiply again.
        assert_eq!(max_diff(&linear(&x, &w1).unwrap(), &h), 0.0);
    }

    #[test]
    fn a_replay_that_does_not_match_what_was_kept_is_an_error() {
        let (x, w) = (random(&[8, 6], 1), random(&[5, 6], 2));
        let y = linear(&x, &w).unwrap();
        let once = || linear(&x, &w);
        let too_few = replaying(vec![], once).unwrap_err();
        assert!(too_few.to_string().contains("more products"), "{too_few}");
        let too_many = replaying(vec![y.clone(), y.clone()], once).unwrap_err();
        assert!(
            too_many.to_string().contains("fewer products"),
            "{too_many}"
        );
        let wrong = replaying(vec![y.t().unwrap().contiguous().unwrap()], once).unwrap_err();
        assert!(wrong.to_string().contains("replayed product"), "{wrong}");
        let inner = replaying(vec![y.clone()], || linear(&random(&[8, 7], 3), &w)).unwrap_err();
        assert!(inner.to_string().contains("linear: input"), "{inner}");
        // An error does not leave the thread replaying (a product would fail) or recording.
        assert_eq!(max_diff(&linear(&x, &w).unwrap(), &y), 0.0);
        let failed: candle_core::Result<((), Vec<Tensor>)> =
            recording(|| linear(&x, &w).and_then(|_| candle_core::bail!("inner")));
        assert!(failed.is_err());
        let (_, kept) = recording(once).unwrap();
        assert_eq!(kept.len(), 1, "a new recording keeps only its own products");
        assert_eq!(max_diff(&linear(&x, &w).unwrap(), &y), 0.0);
    }
}
