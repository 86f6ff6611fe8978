//! The building blocks of T5: relative position buckets, the RMS layer norm without
//! bias, attention (including the grouped cross-attention of cached sampling), the
//! feed-forward, blocks and stacks, padding masks, and training-mode dropout.

use candle_core::{DType, Device, Module, Tensor, D};

use super::Config;
use crate::error::Result;
use crate::formats::weights::{Linear, Weights};

/// T5's relative position bucket (Hugging Face `_relative_position_bucket`).
pub fn relative_position_bucket(
    rel: i64,
    bidirectional: bool,
    num_buckets: usize,
    max_distance: usize,
) -> usize {
    let mut nb = num_buckets as i64;
    let mut bucket = 0i64;
    let mut n = rel;
    if bidirectional {
        nb /= 2;
        if n > 0 {
            bucket += nb;
        }
        n = n.abs();
    } else {
        n = -n.min(0);
    }
    let max_exact = nb / 2;
    if n < max_exact {
        bucket += n;
    } else {
        // f32 arithmetic and truncation toward zero, as in the PyTorch code.
        let ratio = (n as f32 / max_exact as f32).ln();
        let scale = (max_distance as f64 / max_exact as f64).ln() as f32;
        let large = max_exact + ((ratio / scale) * (nb - max_exact) as f32) as i64;
        bucket += large.min(nb - 1);
    }
    bucket as usize
}

/// T5's layer norm: RMS scaling (in f32) without mean subtraction or bias.
pub(super) fn t5_norm(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let dtype = x.dtype();
    let x32 = x.to_dtype(DType::F32)?;
    let var = x32.sqr()?.mean_keepdim(D::Minus1)?;
    let y = x32.broadcast_div(&(var + eps)?.sqrt()?)?;
    y.to_dtype(dtype)?.broadcast_mul(w)
}

#[derive(Debug, Clone)]
pub(super) struct Attention {
    pub(super) q: Linear,
    pub(super) k: Linear,
    pub(super) v: Linear,
    pub(super) o: Linear,
    pub(super) rel_bias: Option<Tensor>,
    n_heads: usize,
    d_kv: usize,
}

impl Attention {
    fn new(cfg: &Config, w: &Weights, has_rel: bool) -> Result<Self> {
        let inner = cfg.num_heads * cfg.d_kv;
        Ok(Self {
            q: w.linear("q", cfg.d_model, inner, false)?,
            k: w.linear("k", cfg.d_model, inner, false)?,
            v: w.linear("v", cfg.d_model, inner, false)?,
            o: w.linear("o", inner, cfg.d_model, false)?,
            rel_bias: if has_rel {
                Some(w.tensor(
                    "relative_attention_bias.weight",
                    &[cfg.relative_attention_num_buckets, cfg.num_heads],
                )?)
            } else {
                None
            },
            n_heads: cfg.num_heads,
            d_kv: cfg.d_kv,
        })
    }

    pub(super) fn heads(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        x.reshape((b, t, self.n_heads, self.d_kv))?
            .transpose(1, 2)?
            .contiguous()
    }

    /// `bias` `[B or 1, H, Tq, Tk]` holds position bias plus mask.
    pub(super) fn forward(
        &self,
        x: &Tensor,
        kv: &Tensor,
        bias: &Tensor,
        drop: Option<&Dropout>,
    ) -> candle_core::Result<Tensor> {
        let q = self.heads(&self.q.forward(x)?)?;
        let (k, v) = self.keys_values(kv)?;
        self.attend(&q, &k, &v, bias, drop)
    }

    /// Keys and values `[B, H, T, d_kv]` of `kv` `[B, T, d_model]`.
    pub(super) fn keys_values(&self, kv: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        Ok((
            self.heads(&self.k.forward(kv)?)?,
            self.heads(&self.v.forward(kv)?)?,
        ))
    }

    /// Unscaled dot-product attention of queries `[B, H, Tq, d_kv]` over keys and values
    /// `[B, H, Tk, d_kv]`: `[B, H, Tq, d_kv]`. With `drop`, the attention weights
    /// go through dropout, as in Hugging Face's training mode.
    fn attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        bias: &Tensor,
        drop: Option<&Dropout>,
    ) -> candle_core::Result<Tensor> {
        let scores = q.matmul(&k.t()?)?.broadcast_add(bias)?;
        let p = candle_nn::ops::softmax(&scores.to_dtype(DType::F32)?, D::Minus1)?
            .to_dtype(q.dtype())?;
        let p = match drop {
            Some(d) => d.apply(&p)?,
            None => p,
        };
        p.matmul(&v.contiguous()?)
    }

    /// [`Attention::attention`], then the output projection: `[B, Tq, d_model]`.
    pub(super) fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        bias: &Tensor,
        drop: Option<&Dropout>,
    ) -> candle_core::Result<Tensor> {
        let (b, _, t, _) = q.dims4()?;
        let y = self
            .attention(q, k, v, bias, drop)?
            .transpose(1, 2)?
            .reshape((b, t, self.n_heads * self.d_kv))?;
        self.o.forward(&y)
    }

    /// Attention of one query per row over its group's keys and values
    /// `[G, H, Ts, d_kv]`, group g covering the next `group_len[g]` rows: the rows of each
    /// group are gathered into `[G, H, n_max, d_kv]` (padding slots repeat the group's
    /// first row), attend together, and are scattered back to `[B, 1, H * d_kv]`, then
    /// projected.
    pub(super) fn attend_grouped(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        group_len: &[usize],
        bias: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let (b, h, _, d) = q.dims4()?;
        let g = group_len.len();
        if g == b {
            return self.attend(q, k, v, bias, None);
        }
        let n_max = group_len.iter().copied().max().unwrap_or(1);
        let mut gather = Vec::with_capacity(g * n_max);
        let mut scatter = Vec::with_capacity(b);
        let mut start = 0u32;
        for (gi, &n) in group_len.iter().enumerate() {
            for j in 0..n_max {
                gather.push(start + j.min(n - 1) as u32);
            }
            scatter.extend((0..n).map(|j| (gi * n_max + j) as u32));
            start += n as u32;
        }
        let dev = q.device();
        let gather = Tensor::new(gather.as_slice(), dev)?;
        let scatter = Tensor::new(scatter.as_slice(), dev)?;
        // [B, H, 1, D] -> [G * n_max, H, D] -> [G, H, n_max, D]
        let qg = q
            .squeeze(2)?
            .index_select(&gather, 0)?
            .reshape((g, n_max, h, d))?
            .transpose(1, 2)?
            .contiguous()?;
        let y = self
            .attention(&qg, k, v, bias, None)?
            .transpose(1, 2)?
            .reshape((g * n_max, h * d))?
            .index_select(&scatter, 0)?
            .reshape((b, 1, h * d))?;
        self.o.forward(&y)
    }
}

#[derive(Debug, Clone)]
pub(super) struct FeedForward {
    pub(super) wi_0: Linear,
    pub(super) wi_1: Option<Linear>,
    pub(super) wo: Linear,
}

impl FeedForward {
    fn new(cfg: &Config, w: &Weights) -> Result<Self> {
        let (d, f) = (cfg.d_model, cfg.d_ff);
        Ok(if cfg.gated()? {
            Self {
                wi_0: w.linear("wi_0", d, f, false)?,
                wi_1: Some(w.linear("wi_1", d, f, false)?),
                wo: w.linear("wo", f, d, false)?,
            }
        } else {
            Self {
                wi_0: w.linear("wi", d, f, false)?,
                wi_1: None,
                wo: w.linear("wo", f, d, false)?,
            }
        })
    }

    pub(super) fn forward(
        &self,
        x: &Tensor,
        drop: Option<&Dropout>,
    ) -> candle_core::Result<Tensor> {
        let h = match &self.wi_1 {
            Some(wi_1) => (self.wi_0.forward(x)?.gelu()? * wi_1.forward(x)?)?,
            None => self.wi_0.forward(x)?.relu()?,
        };
        let h = match drop {
            Some(d) => d.apply(&h)?,
            None => h,
        };
        self.wo.forward(&h)
    }
}

#[derive(Debug, Clone)]
pub(super) struct Block {
    pub(super) self_attn: Attention,
    pub(super) ln_self: Tensor,
    pub(super) cross: Option<(Attention, Tensor)>,
    pub(super) ff: FeedForward,
    pub(super) ln_ff: Tensor,
}

impl Block {
    fn new(cfg: &Config, w: &Weights, first: bool, decoder: bool) -> Result<Self> {
        let d = cfg.d_model;
        let l = w.pp("layer");
        let self_attn = Attention::new(cfg, &l.pp(0).pp("SelfAttention"), first)?;
        let ln_self = l.pp(0).tensor("layer_norm.weight", &[d])?;
        let (cross, ff_idx) = if decoder {
            let a = Attention::new(cfg, &l.pp(1).pp("EncDecAttention"), false)?;
            (Some((a, l.pp(1).tensor("layer_norm.weight", &[d])?)), 2)
        } else {
            (None, 1)
        };
        Ok(Self {
            self_attn,
            ln_self,
            cross,
            ff: FeedForward::new(cfg, &l.pp(ff_idx).pp("DenseReluDense"))?,
            ln_ff: l.pp(ff_idx).tensor("layer_norm.weight", &[d])?,
        })
    }
}

#[derive(Debug, Clone)]
pub(super) struct Stack {
    pub(super) blocks: Vec<Block>,
    pub(super) final_ln: Tensor,
    pub(super) decoder: bool,
}

impl Stack {
    pub(super) fn new(cfg: &Config, w: &Weights, decoder: bool) -> Result<Self> {
        let n = if decoder {
            cfg.decoder_layers()
        } else {
            cfg.num_layers
        };
        let blocks = (0..n)
            .map(|i| Block::new(cfg, &w.pp("block").pp(i), i == 0, decoder))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            blocks,
            final_ln: w.tensor("final_layer_norm.weight", &[cfg.d_model])?,
            decoder,
        })
    }
}

/// Additive mask `[B, 1, Tq, Tk]`: 0 where allowed, a large negative number elsewhere.
pub(super) fn mask_bias(
    key_mask: &[Vec<u8>],
    tq: usize,
    causal: bool,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let b = key_mask.len();
    let tk = key_mask.first().map(|m| m.len()).unwrap_or(0);
    let neg = if dtype == DType::F16 {
        -6.0e4f32
    } else {
        -1.0e9f32
    };
    let mut v = vec![0f32; b * tq * tk];
    for (bi, m) in key_mask.iter().enumerate() {
        for i in 0..tq {
            for j in 0..tk {
                if m[j] == 0 || (causal && j > i) {
                    v[(bi * tq + i) * tk + j] = neg;
                }
            }
        }
    }
    Ok(Tensor::from_vec(v, (b, 1, tq, tk), device)?.to_dtype(dtype)?)
}

/// Inverted dropout with a seeded mask generator: each element is zeroed with probability
/// `rate` and the rest scaled by `1 / (1 - rate)`, as `torch.nn.Dropout` in training mode.
#[derive(Debug)]
pub struct Dropout {
    rate: f32,
    rng: std::sync::Mutex<rand::rngs::StdRng>,
}

impl Dropout {
    pub(super) fn new(rate: f32, seed: u64) -> Self {
        use rand::SeedableRng;
        Self {
            rate,
            rng: std::sync::Mutex::new(rand::rngs::StdRng::seed_from_u64(seed)),
        }
    }

    pub(super) fn reseed(&self, seed: u64) {
        use rand::SeedableRng;
        if let Ok(mut rng) = self.rng.lock() {
            *rng = rand::rngs::StdRng::seed_from_u64(seed);
        }
    }

    fn apply(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        use rand::Rng;
        let keep = 1.0 / (1.0 - self.rate);
        let n = x.elem_count();
        let mask: Vec<f32> = {
            let mut rng = self
                .rng
                .lock()
                .map_err(|_| candle_core::Error::Msg("dropout generator poisoned".into()))?;
            (0..n)
                .map(|_| {
                    if rng.random::<f32>() < self.rate {
                        0.0
                    } else {
                        keep
                    }
                })
                .collect()
        };
        let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
        x * mask
    }
}

/// `x` through `drop` when dropout is on.
pub(super) fn dropout(drop: Option<&Dropout>, x: Tensor) -> candle_core::Result<Tensor> {
    match drop {
        Some(d) => d.apply(&x),
        None => Ok(x),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_buckets_match_hugging_face_values() {
        // Values from transformers' T5Attention._relative_position_bucket
        // (32 buckets, max distance 128).
        let bi = |r| relative_position_bucket(r, true, 32, 128);
        assert_eq!(bi(0), 0);
        assert_eq!(bi(-1), 1);
        assert_eq!(bi(1), 17);
        assert_eq!(bi(-7), 7);
        assert_eq!(bi(-8), 8);
        assert_eq!(bi(-20), 10);
        assert_eq!(bi(-200), 15);
        assert_eq!(bi(200), 31);
        let uni = |r| relative_position_bucket(r, false, 32, 128);
        assert_eq!(uni(3), 0);
        assert_eq!(uni(-3), 3);
        assert_eq!(uni(-15), 15);
        assert_eq!(uni(-16), 16);
        assert_eq!(uni(-40), 23);
        assert_eq!(uni(-1000), 31);
    }
}
