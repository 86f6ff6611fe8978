//! Fused CPU kernels with backward passes, for training: the attention softmax with its
//! scale and mask, RMSNorm, the SwiGLU gate, and RoPE with its split into heads.
//!
//! Built from primitive ops, each of these is a chain of five to eleven graph nodes, and
//! every node's backward pass allocates, zero-fills and adds a gradient as large as its
//! input: for the attention scores, `[B, heads, T, T]`, that traffic was most of a
//! training step's time outside the matrix products. Here each is one node whose forward
//! and backward read and write each tensor once, row-parallel.
//!
//! They take contiguous f32 tensors on the CPU ([`super::cpu::applies`]); the model uses the
//! primitive ops elsewhere (bf16 on a GPU), with the same maths. Tests check each
//! kernel's values and gradients against the primitive-op graph.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};

use super::cpu::{for_each_row_block, input, threads, with_values};

/// Fills `out` row by row, `width` values a row, one block of rows per thread of candle's
/// CPU pool (the threads its own element-wise kernels and [`super::gemm`]'s products
/// run on): `f(row index, row)`.
fn par_rows(out: &mut [f32], width: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    for_each_row_block(out, &mut [], width, |_, first, block, _| {
        for (i, row) in block.chunks_mut(width).enumerate() {
            f(first + i, row);
        }
    });
}

// === masked softmax ===

/// `softmax(x · scale + bias)` over the last dimension, for attention scores `x`
/// `[B, H·T, Tk]` and an additive mask `bias` `[B, T, Tk]` shared by the `H` heads of a
/// sequence. The mask takes no gradient.
pub fn masked_softmax(x: &Tensor, bias: &Tensor, scale: f64) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op2(
        &bias.contiguous()?,
        MaskedSoftmax {
            scale: scale as f32,
        },
    )
}

/// `exp` rounds to +0 below ln(2⁻¹⁵⁰) ≈ −103.97. Masked keys (bias −1e9, about half the
/// scores under a causal mask) are set to 0 without the call, which takes libm's slow
/// underflow path for them: the same values, bit for bit.
const EXP_IS_ZERO_BELOW: f32 = -104.0;

struct MaskedSoftmax {
    scale: f32,
}

impl CustomOp2 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "masked-softmax"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, bias) = (input(s1, l1)?, input(s2, l2)?);
        let (b, ht, tk) = l1.shape().dims3()?;
        let (bb, t, btk) = l2.shape().dims3()?;
        if bb != b || btk != tk || t == 0 || ht % t != 0 {
            candle_core::bail!(
                "masked softmax: scores {:?}, mask {:?}",
                l1.shape(),
                l2.shape()
            );
        }
        let mut y = vec![0f32; x.len()];
        par_rows(&mut y, tk, |r, row| {
            let (seq, query) = (r / ht, r % t);
            let xs = &x[r * tk..(r + 1) * tk];
            let m = &bias[(seq * t + query) * tk..(seq * t + query + 1) * tk];
            let mut max = f32::NEG_INFINITY;
            for j in 0..tk {
                let v = xs[j] * self.scale + m[j];
                row[j] = v;
                max = max.max(v);
            }
            let mut sum = 0f32;
            for v in row.iter_mut() {
                let d = *v - max;
                *v = if d < EXP_IS_ZERO_BELOW { 0.0 } else { d.exp() };
                sum += *v;
            }
            let inv = 1.0 / sum;
            for v in row.iter_mut() {
                *v *= inv;
            }
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _bias: &Tensor,
        y: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        // dx = scale · y ⊙ (g − Σ_j g_j y_j), row by row.
        let tk = y.dim(candle_core::D::Minus1)?;
        let scale = self.scale;
        let dx = with_values(y, |y| {
            with_values(g, |g| {
                let mut dx = vec![0f32; y.len()];
                par_rows(&mut dx, tk, |r, row| {
                    let (ys, gs) = (&y[r * tk..(r + 1) * tk], &g[r * tk..(r + 1) * tk]);
                    let dot: f32 = ys.iter().zip(gs).map(|(a, b)| a * b).sum();
                    for j in 0..tk {
                        row[j] = scale * ys[j] * (gs[j] - dot);
                    }
                });
                Ok(dx)
            })
        })?;
        Ok((Some(Tensor::from_vec(dx, y.shape(), y.device())?), None))
    }
}

// === RMSNorm ===

/// `x / sqrt(mean(x²) + eps) · w` over the last dimension, with gradients for `x` and `w`.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    x.contiguous()?
        .apply_op2(&w.contiguous()?, RmsNorm { eps: eps as f32 })
}

struct RmsNorm {
    eps: f32,
}

impl RmsNorm {
    fn inv_rms(&self, row: &[f32]) -> f32 {
        let ms = row.iter().map(|v| v * v).sum::<f32>() / row.len() as f32;
        1.0 / (ms + self.eps).sqrt()
    }
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, w) = (input(s1, l1)?, input(s2, l2)?);
        let h = w.len();
        if h == 0 || l1.shape().dims().last() != Some(&h) {
            candle_core::bail!("rms norm: input {:?}, weight {:?}", l1.shape(), l2.shape());
        }
        let mut y = vec![0f32; x.len()];
        par_rows(&mut y, h, |r, row| {
            let xs = &x[r * h..(r + 1) * h];
            let inv = self.inv_rms(xs);
            for j in 0..h {
                row[j] = xs[j] * inv * w[j];
            }
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        // With r = 1/rms(x) and u = g ⊙ w:  dx = r·u − x·r³·mean(u ⊙ x),  dw = Σ_rows g ⊙ x·r.
        // Each thread sums `dw` over its own rows; the sums are added in thread order, so
        // the result does not depend on timing.
        let h = w.elem_count();
        let (dx, dw) = with_values(x, |x| {
            with_values(w, |w| {
                with_values(g, |g| {
                    let mut dx = vec![0f32; x.len()];
                    let partial: Vec<Mutex<Vec<f32>>> =
                        (0..threads()).map(|_| Mutex::new(vec![0f32; h])).collect();
                    for_each_row_block(&mut dx, &mut [], h, |tid, first, block, _| {
                        let mut dw = partial[tid].lock().unwrap_or_else(|p| p.into_inner());
                        for (i, row) in block.chunks_mut(h).enumerate() {
                            let r = first + i;
                            let (xs, gs) = (&x[r * h..(r + 1) * h], &g[r * h..(r + 1) * h]);
                            let inv = self.inv_rms(xs);
                            let mean_ux =
                                (0..h).map(|j| gs[j] * w[j] * xs[j]).sum::<f32>() / h as f32;
                            let k = inv * inv * inv * mean_ux;
                            for j in 0..h {
                                row[j] = inv * gs[j] * w[j] - xs[j] * k;
                                dw[j] += gs[j] * xs[j] * inv;
                            }
                        }
                    });
                    let mut dw = vec![0f32; h];
                    for p in partial {
                        let p = p.into_inner().unwrap_or_else(|p| p.into_inner());
                        dw.iter_mut().zip(p).for_each(|(a, b)| *a += b);
                    }
                    Ok((dx, dw))
                })
            })
        })?;
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), x.device())?),
            Some(Tensor::from_vec(dw, w.shape(), w.device())?),
        ))
    }
}

// === SwiGLU ===

/// `silu(a) ⊙ b`, with gradients for both.
pub fn swiglu(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    a.contiguous()?.apply_op2(&b.contiguous()?, SwiGlu)
}

struct SwiGlu;

fn sigmoid(v: f32) -> f32 {
    1.0 / (1.0 + (-v).exp())
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (a, b) = (input(s1, l1)?, input(s2, l2)?);
        if l1.shape() != l2.shape() {
            candle_core::bail!("swiglu: {:?} and {:?}", l1.shape(), l2.shape());
        }
        let mut y = vec![0f32; a.len()];
        for_each_row_block(&mut y, &mut [], 1, |_, at, out, _| {
            for (i, v) in out.iter_mut().enumerate() {
                let (x, u) = (a[at + i], b[at + i]);
                *v = x * sigmoid(x) * u;
            }
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        // silu'(a) = s(a)·(1 + a·(1 − s(a))).
        let (da, db) = with_values(a, |a| {
            with_values(b, |b| {
                with_values(g, |g| {
                    let mut da = vec![0f32; a.len()];
                    let mut db = vec![0f32; a.len()];
                    for_each_row_block(&mut da, &mut db, 1, |_, at, da, db| {
                        for i in 0..da.len() {
                            let (x, u, gr) = (a[at + i], b[at + i], g[at + i]);
                            let s = sigmoid(x);
                            da[i] = gr * u * s * (1.0 + x * (1.0 - s));
                            db[i] = gr * x * s;
                        }
                    });
                    Ok((da, db))
                })
            })
        })?;
        Ok((
            Some(Tensor::from_vec(da, a.shape(), a.device())?),
            Some(Tensor::from_vec(db, b.shape(), b.device())?),
        ))
    }
}

// === RoPE ===

/// RoPE ("rotate half" pairing) of a projection's output `x` `[B, T, H·D]` for `heads`
/// heads, returned per head `[B, H, T, D]`; `cos`/`sin` `[B, T, D/2]` take no gradient.
///
/// The graph it replaces (split the heads, transpose, `x·cos + rotate_half(x)·sin`) is
/// eleven nodes, and its backward pass differentiates the tables too and pads each half's
/// gradient with zeros. The values and the gradient here are those of that graph to the
/// bit: `x₁c − x₂s` and `x₂c + x₁s`; `g₁c + g₂s` and `g₂c − g₁s`.
pub fn rope_heads(
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    heads: usize,
) -> candle_core::Result<Tensor> {
    let (b, t, width) = x.dims3()?;
    let half = cos.dim(candle_core::D::Minus1)?;
    if heads == 0
        || width != heads * 2 * half
        || cos.dims() != [b, t, half]
        || sin.dims() != cos.dims()
    {
        candle_core::bail!(
            "rope: input {:?} for {heads} heads, tables {:?} and {:?}",
            x.shape(),
            cos.shape(),
            sin.shape()
        );
    }
    x.contiguous()?.apply_op1(RopeHeads {
        cos: cos.contiguous()?,
        sin: sin.contiguous()?,
        heads,
    })
}

struct RopeHeads {
    cos: Tensor,
    sin: Tensor,
    heads: usize,
}

impl RopeHeads {
    /// Runs `f(src, dst, cos, sin)` for every head row: `src` a head's `D` values in the
    /// token-major layout `[B, T, H·D]`, `dst` its row in the head-major `[B, H, T, D]`
    /// (`to_heads`), or the other way round.
    fn rows(
        &self,
        src: &[f32],
        to_heads: bool,
        f: impl Fn(&[f32], &mut [f32], &[f32], &[f32]) + Sync,
    ) -> candle_core::Result<Vec<f32>> {
        let (b, t, half) = self.cos.dims3()?;
        let (h, d) = (self.heads, 2 * half);
        with_values(&self.cos, |cos| {
            with_values(&self.sin, |sin| {
                let mut out = vec![0f32; src.len()];
                par_rows(&mut out, d, |r, row| {
                    // Output row r: head-major (b, head, pos) or token-major (b, pos, head).
                    let (seq, head, pos) = if to_heads {
                        (r / (h * t), r / t % h, r % t)
                    } else {
                        (r / (t * h), r % h, r / h % t)
                    };
                    let other = if to_heads {
                        (seq * t + pos) * h + head
                    } else {
                        (seq * h + head) * t + pos
                    };
                    let at = (seq * t + pos) * half;
                    f(
                        &src[other * d..(other + 1) * d],
                        row,
                        &cos[at..at + half],
                        &sin[at..at + half],
                    );
                });
                debug_assert_eq!(out.len(), b * t * h * d);
                Ok(out)
            })
        })
    }
}

impl candle_core::CustomOp1 for RopeHeads {
    fn name(&self) -> &'static str {
        "rope-heads"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, t, _) = l.shape().dims3()?;
        let half = self.cos.dim(candle_core::D::Minus1)?;
        let y = self.rows(input(s, l)?, true, |x, y, c, s| {
            let (x1, x2) = x.split_at(half);
            let (y1, y2) = y.split_at_mut(half);
            for j in 0..half {
                y1[j] = x1[j] * c[j] + -x2[j] * s[j];
                y2[j] = x2[j] * c[j] + x1[j] * s[j];
            }
        })?;
        Ok((
            CpuStorage::F32(y),
            Shape::from((b, self.heads, t, 2 * half)),
        ))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let half = self.cos.dim(candle_core::D::Minus1)?;
        let dx = with_values(g, |g| {
            self.rows(g, false, |g, dx, c, s| {
                let (g1, g2) = g.split_at(half);
                let (dx1, dx2) = dx.split_at_mut(half);
                for j in 0..half {
                    dx1[j] = g1[j] * c[j] + g2[j] * s[j];
                    dx2[j] = g2[j] * c[j] - g1[j] * s[j];
                }
            })
        })?;
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::cpu::testing::{max_diff, probed, random};
    use candle_core::{Device, Var, D};

    /// Values and the gradients of `Σ f(args) ⊙ probe` from the kernel and from the
    /// primitive-op graph agree.
    fn check(
        args: &[Tensor],
        kernel: impl Fn(&[Tensor]) -> Tensor,
        reference: impl Fn(&[Tensor]) -> Tensor,
        grads_of: &[usize],
    ) {
        let run = |f: &dyn Fn(&[Tensor]) -> Tensor| {
            let vars: Vec<Var> = args.iter().map(|a| Var::from_tensor(a).unwrap()).collect();
            let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
            let y = f(&ts);
            let probe = random(y.dims(), 99);
            let grads = probed(&y, &probe);
            let g: Vec<Option<Tensor>> = grads_of
                .iter()
                .map(|&i| grads.get(vars[i].as_tensor()).cloned())
                .collect();
            (y.detach(), g)
        };
        let (y1, g1) = run(&kernel);
        let (y2, g2) = run(&reference);
        assert!(
            max_diff(&y1, &y2) < 1e-5,
            "values differ by {}",
            max_diff(&y1, &y2)
        );
        for (i, (a, b)) in g1.iter().zip(&g2).enumerate() {
            let (a, b) = (
                a.as_ref().expect("kernel grad"),
                b.as_ref().expect("graph grad"),
            );
            let d = max_diff(a, b);
            assert!(d < 1e-4, "gradient {i} differs by {d}");
        }
    }

    #[test]
    fn exp_is_zero_wherever_the_softmax_skips_it() {
        // Every f32 below the threshold, down to -200.
        let mut x = EXP_IS_ZERO_BELOW;
        let mut checked = 0;
        while x > -200.0 {
            x = f32::from_bits(x.to_bits() + 1);
            assert_eq!(x.exp().to_bits(), 0f32.to_bits(), "exp({x})");
            checked += 1;
        }
        assert!(checked > 1_000_000);
    }

    #[test]
    fn masked_softmax_matches_the_primitive_ops() {
        masked_softmax_case(2, 3, 5, 7);
        masked_softmax_case(3, 9, 31, 67);
    }

    fn masked_softmax_case(b: usize, h: usize, t: usize, tk: usize) {
        let x = random(&[b, h * t, tk], 1);
        // A causal-style mask with a padded key in the second sequence.
        let mut m = vec![0f32; b * t * tk];
        for s in 0..b {
            for q in 0..t {
                for k in 0..tk {
                    if k > q + 2 || (s == 1 && k == 0) {
                        m[(s * t + q) * tk + k] = -1e9;
                    }
                }
            }
        }
        let bias = Tensor::from_vec(m, (b, t, tk), &Device::Cpu).unwrap();
        let scale = 0.125;
        check(
            &[x],
            |a| masked_softmax(&a[0], &bias, scale).unwrap(),
            |a| {
                let s = (&a[0] * scale).unwrap().reshape((b, h, t, tk)).unwrap();
                let s = s.broadcast_add(&bias.unsqueeze(1).unwrap()).unwrap();
                candle_nn::ops::softmax(&s, D::Minus1)
                    .unwrap()
                    .reshape((b, h * t, tk))
                    .unwrap()
            },
            &[0],
        );
    }

    // Each kernel is checked on a small input, filled on the calling thread, and on one
    // large enough to be split across candle's CPU threads (and not evenly).

    #[test]
    fn rms_norm_matches_the_primitive_ops() {
        for (shape, h) in [([3, 4, 16], 16), ([5, 41, 96], 96)] {
            let x = random(&shape, 2);
            let w = (random(&[h], 3) + 1.0).unwrap();
            let eps = 1e-5;
            check(
                &[x, w],
                |a| rms_norm(&a[0], &a[1], eps).unwrap(),
                |a| {
                    let ms = a[0].sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
                    let n = a[0]
                        .broadcast_div(&(ms + eps).unwrap().sqrt().unwrap())
                        .unwrap();
                    n.broadcast_mul(&a[1]).unwrap()
                },
                &[0, 1],
            );
        }
    }

    #[test]
    fn swiglu_matches_the_primitive_ops() {
        for shape in [[2, 5, 24], [3, 37, 211]] {
            let a = random(&shape, 4);
            let b = random(&shape, 5);
            check(
                &[a, b],
                |t| swiglu(&t[0], &t[1]).unwrap(),
                |t| (candle_nn::ops::silu(&t[0]).unwrap() * &t[1]).unwrap(),
                &[0, 1],
            );
        }
    }

    #[test]
    fn rope_heads_matches_the_primitive_ops_bit_for_bit() {
        // (batch, positions, heads, head size): small, and split across threads unevenly.
        for (b, t, h, d) in [(2, 3, 2, 8), (3, 29, 9, 64)] {
            let x = random(&[b, t, h * d], 10);
            let cos = random(&[b, t, d / 2], 11);
            let sin = random(&[b, t, d / 2], 12);
            let probe = random(&[b, h, t, d], 13);
            let run = |kernel: bool| {
                let v = Var::from_tensor(&x).unwrap();
                let y = if kernel {
                    rope_heads(v.as_tensor(), &cos, &sin, h).unwrap()
                } else {
                    let x = v.as_tensor().reshape((b, t, h, d)).unwrap();
                    let x = x.transpose(1, 2).unwrap();
                    let cat = |a: &Tensor| {
                        Tensor::cat(&[a, a], D::Minus1)
                            .unwrap()
                            .unsqueeze(1)
                            .unwrap()
                    };
                    let (x1, x2) = (x.narrow(3, 0, d / 2).unwrap(), x.narrow(3, d / 2, d / 2));
                    let rotated = Tensor::cat(&[&x2.unwrap().neg().unwrap(), &x1], 3).unwrap();
                    (x.broadcast_mul(&cat(&cos)).unwrap()
                        + rotated.broadcast_mul(&cat(&sin)).unwrap())
                    .unwrap()
                };
                let grads = probed(&y, &probe);
                let dx = grads.get(v.as_tensor()).unwrap().clone();
                let bits = |t: &Tensor| {
                    let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                    v.into_iter().map(f32::to_bits).collect::<Vec<_>>()
                };
                assert_eq!(y.dims(), [b, h, t, d]);
                (bits(&y), bits(&dx))
            };
            let (kernel, graph) = (run(true), run(false));
            assert!(kernel.0 == graph.0, "values differ at ({b}, {t}, {h}, {d})");
            assert!(
                kernel.1 == graph.1,
                "gradients differ at ({b}, {t}, {h}, {d})"
            );
        }
    }

    #[test]
    fn mismatched_shapes_are_errors_not_panics() {
        let x = random(&[2, 6, 4], 6);
        assert!(masked_softmax(&x, &random(&[2, 4, 4], 7), 1.0).is_err());
        assert!(rms_norm(&x, &random(&[5], 8), 1e-5).is_err());
        assert!(swiglu(&x, &random(&[2, 6, 5], 9)).is_err());
        let (cos, sin) = (random(&[2, 6, 2], 10), random(&[2, 6, 2], 11));
        assert!(
            rope_heads(&x, &cos, &sin, 2).is_err(),
            "4 values are not 2 heads of 4"
        );
        assert!(rope_heads(&x, &cos, &sin, 1).is_ok());
        assert!(rope_heads(&x, &cos, &random(&[2, 5, 2], 12), 1).is_err());
    }
}
