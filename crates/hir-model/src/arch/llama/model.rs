//! The Llama-family network: attention masks, RMSNorm, RoPE, grouped-query attention,
//! the SwiGLU MLP, and [`Model`]'s forward passes with an optional KV cache.

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Module, Tensor, D};

use super::Config;
use crate::arch::kv_cache::{KvCache, LayerKv};
use crate::error::{ModelError, Result};
use crate::formats::weights::{Linear, WeightMatrix, WeightMode, Weights};

// === attention masks ===

/// Additive attention bias `[B, 1, 1, Tq, Tk]` for queries at the last `Tq`
/// of `Tk` key positions: a query sees real (mask 1) keys at or before itself.
pub fn causal_bias(
    key_mask: &[Vec<u8>],
    tq: usize,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let b = key_mask.len();
    let tk = key_mask.first().map(|m| m.len()).unwrap_or(0);
    if tq > tk || key_mask.iter().any(|m| m.len() != tk) {
        return Err(ModelError::InvalidRequest(format!(
            "attention mask rows must all have {tk} >= {tq} entries"
        )));
    }
    let neg = if dtype == DType::F16 {
        -6.0e4f32
    } else {
        -1.0e9f32
    };
    let mut v = vec![0f32; b * tq * tk];
    for (bi, m) in key_mask.iter().enumerate() {
        for i in 0..tq {
            let last = tk - tq + i;
            let row = &mut v[(bi * tq + i) * tk..(bi * tq + i + 1) * tk];
            for (j, slot) in row.iter_mut().enumerate() {
                if j > last || m[j] == 0 {
                    *slot = neg;
                }
            }
        }
    }
    Ok(Tensor::from_vec(v, (b, 1, 1, tq, tk), device)?.to_dtype(dtype)?)
}

/// Positions of real tokens under a left- or right-padded mask:
/// `cumsum(mask) - 1`, clamped at 0 for padding.
pub fn positions_from_mask(mask: &[Vec<u8>]) -> Vec<Vec<u32>> {
    mask.iter()
        .map(|m| {
            let mut c = 0u32;
            m.iter()
                .map(|&x| {
                    c += u32::from(x != 0);
                    c.saturating_sub(1)
                })
                .collect()
        })
        .collect()
}

// === layers ===

/// RMSNorm: candle's inference kernel (`fused`), else, for training, the kernel with a
/// backward pass on the CPU or the same maths in primitive ops.
fn rms_norm(x: &Tensor, w: &Tensor, eps: f64, fused: bool) -> candle_core::Result<Tensor> {
    if fused {
        return candle_nn::ops::rms_norm(x, w, eps as f32);
    }
    if crate::kernels::cpu::applies(x) {
        return crate::kernels::fused::rms_norm(x, w, eps);
    }
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    let x = x.broadcast_div(&(ms + eps)?.sqrt()?)?;
    x.to_dtype(dtype)?.broadcast_mul(w)
}

fn softmax(x: &Tensor, fused: bool) -> candle_core::Result<Tensor> {
    if fused {
        candle_nn::ops::softmax_last_dim(x)
    } else {
        candle_nn::ops::softmax(x, D::Minus1)
    }
}

fn rotate_half(x: &Tensor) -> candle_core::Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)
}

/// Applies RoPE to `x` `[B, H, T, D]` with `cos`/`sin` `[B, T, D/2]`.
fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, fused: bool) -> candle_core::Result<Tensor> {
    if fused {
        return candle_nn::rotary_emb::rope(&x.contiguous()?, cos, sin);
    }
    let cos = Tensor::cat(&[cos, cos], D::Minus1)?.unsqueeze(1)?;
    let sin = Tensor::cat(&[sin, sin], D::Minus1)?.unsqueeze(1)?;
    x.broadcast_mul(&cos)? + rotate_half(x)?.broadcast_mul(&sin)?
}

#[derive(Debug, Clone)]
struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    n_heads: usize,
    n_kv: usize,
    head_dim: usize,
}

impl Attention {
    fn new(cfg: &Config, w: &Weights) -> Result<Self> {
        let (h, hd) = (cfg.hidden_size, cfg.head_size());
        let (nh, nkv) = (cfg.num_attention_heads, cfg.kv_heads());
        let bias = cfg.qkv_bias();
        Ok(Self {
            q: w.linear("q_proj", h, nh * hd, bias)?,
            k: w.linear("k_proj", h, nkv * hd, bias)?,
            v: w.linear("v_proj", h, nkv * hd, bias)?,
            o: w.linear("o_proj", nh * hd, h, false)?,
            n_heads: nh,
            n_kv: nkv,
            head_dim: hd,
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        bias: &Tensor,
        cache: Option<&mut Option<LayerKv>>,
        fused: bool,
    ) -> candle_core::Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (nh, nkv, hd) = (self.n_heads, self.n_kv, self.head_dim);
        let (q, k) = (self.q.forward(x)?, self.k.forward(x)?);
        let (q, k) = if !fused && crate::kernels::cpu::applies(&q) {
            // Training on the CPU: split the heads and rotate them as one node.
            (
                crate::kernels::fused::rope_heads(&q, cos, sin, nh)?,
                crate::kernels::fused::rope_heads(&k, cos, sin, nkv)?,
            )
        } else {
            let q = q.reshape((b, t, nh, hd))?.transpose(1, 2)?;
            let k = k.reshape((b, t, nkv, hd))?.transpose(1, 2)?;
            (
                rope(&q, cos, sin, fused)?,
                rope(&k, cos, sin, fused)?.contiguous()?,
            )
        };
        let v = self
            .v
            .forward(x)?
            .reshape((b, t, nkv, hd))?
            .transpose(1, 2)?
            .contiguous()?;
        let (k, v) = match cache {
            Some(slot) => match slot {
                Some(layer) => layer.append(&k, &v)?,
                None => {
                    let layer = LayerKv::new(&k, &v)?;
                    let views = layer.views()?;
                    *slot = Some(layer);
                    views
                }
            },
            None => (k, v),
        };
        let tk = k.dim(2)?;
        let rep = nh / nkv;
        // Group query heads by their key/value head instead of repeating K and V.
        let q = q.contiguous()?.reshape((b, nkv, rep * t, hd))?;
        let scale = 1.0 / (hd as f64).sqrt();
        let qk = q.matmul(&k.t()?)?;
        let p = if !fused && crate::kernels::cpu::applies(&qk) {
            // Training on the CPU: scale, mask and softmax as one node.
            crate::kernels::fused::masked_softmax(
                &qk.reshape((b, nh * t, tk))?,
                &bias.reshape((b, t, tk))?,
                scale,
            )?
            .reshape((b, nkv, rep * t, tk))?
        } else {
            let scores = (qk * scale)?.reshape((b, nkv, rep, t, tk))?;
            let scores = scores.broadcast_add(bias)?;
            softmax(&scores, fused)?.reshape((b, nkv, rep * t, tk))?
        };
        let y = p.matmul(&v)?.reshape((b, nh, t, hd))?.transpose(1, 2)?;
        let y = y.reshape((b, t, nh * hd))?;
        self.o.forward(&y)
    }
}

#[derive(Debug, Clone)]
struct Mlp {
    gate: Linear,
    up: Linear,
    down: Linear,
}

impl Mlp {
    fn new(cfg: &Config, w: &Weights) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            gate: w.linear("gate_proj", h, i, false)?,
            up: w.linear("up_proj", h, i, false)?,
            down: w.linear("down_proj", i, h, false)?,
        })
    }

    fn forward(&self, x: &Tensor, fused: bool) -> candle_core::Result<Tensor> {
        let (g, u) = (self.gate.forward(x)?, self.up.forward(x)?);
        let h = if !fused && crate::kernels::cpu::applies(&g) {
            crate::kernels::fused::swiglu(&g, &u)?
        } else {
            (candle_nn::ops::silu(&g)? * u)?
        };
        self.down.forward(&h)
    }
}

#[derive(Debug, Clone)]
struct Layer {
    attn: Attention,
    mlp: Mlp,
    ln1: Tensor,
    ln2: Tensor,
}

impl Layer {
    fn new(cfg: &Config, w: &Weights) -> Result<Self> {
        let h = cfg.hidden_size;
        Ok(Self {
            attn: Attention::new(cfg, &w.pp("self_attn"))?,
            mlp: Mlp::new(cfg, &w.pp("mlp"))?,
            ln1: w.tensor("input_layernorm.weight", &[h])?,
            ln2: w.tensor("post_attention_layernorm.weight", &[h])?,
        })
    }
}

// === impl Model ===

/// What every layer of one forward pass shares: RoPE tables and the attention bias.
#[derive(Debug)]
pub(crate) struct LayerShared {
    cos: Tensor,
    sin: Tensor,
    bias: Tensor,
}

/// Batched inputs for one forward pass.
#[derive(Debug, Clone)]
pub struct Batch<'a> {
    /// Token ids `[B, T]` (u32).
    pub input_ids: &'a Tensor,
    /// Key padding mask over cached + new positions, one row per sequence of
    /// length `cache_len + T` (1 = real token, 0 = padding).
    pub key_mask: &'a [Vec<u8>],
    /// RoPE position of every new token, `[B][T]`.
    pub positions: &'a [Vec<u32>],
}

/// A Llama-family causal language model.
#[derive(Debug, Clone)]
pub struct Model {
    cfg: Config,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Linear,
    inv_freq: Vec<f32>,
    fused: bool,
    kept_products: usize,
    device: Device,
    dtype: DType,
}

impl Model {
    /// Builds the model from weights named as in Hugging Face checkpoints
    /// (`model.embed_tokens.weight`, `model.layers.{i}.self_attn.q_proj.weight`, ...).
    ///
    /// Inference uses fused kernels unless the weights are trainable.
    pub fn new(cfg: &Config, w: &Weights) -> Result<Self> {
        cfg.validate()?;
        let (h, v) = (cfg.hidden_size, cfg.vocab_size);
        let m = w.pp("model");
        let embed = m.tensor("embed_tokens.weight", &[v, h])?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            layers.push(Layer::new(cfg, &m.pp("layers").pp(i))?);
        }
        let norm = m.tensor("norm.weight", &[h])?;
        let lm_head = if cfg.tie_word_embeddings {
            if w.mode().is_quantized() {
                // The head's f32 copy (for products of many rows) is the embedding itself:
                // one f32 copy of the matrix, not two.
                let head = match m.matrix("embed_tokens.weight", v, h)? {
                    WeightMatrix::Quant(q, Some(_)) => WeightMatrix::Quant(q, Some(embed.clone())),
                    other => other,
                };
                Linear::from_matrix(head, None)
            } else {
                Linear::from_dense(embed.clone(), None)
            }
        } else {
            w.linear("lm_head", h, v, false)?
        };
        let hd = cfg.head_size();
        let inv_freq = (0..hd / 2)
            .map(|i| 1.0 / (cfg.rope_base() as f32).powf(2.0 * i as f32 / hd as f32))
            .collect();
        let fused = !matches!(w.mode(), WeightMode::Trainable(_));
        Ok(Self {
            cfg: cfg.clone(),
            embed,
            layers,
            norm,
            lm_head,
            inv_freq,
            fused,
            kept_products: 0,
            device: w.device().clone(),
            dtype: w.mode().dtype(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The dtype of activations.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Uses differentiable primitive ops (`false`) or fused kernels (`true`).
    pub fn set_fused(&mut self, fused: bool) {
        self.fused = fused;
    }

    /// Bytes the layer-by-layer gradient pass may spend keeping the matrix products of its
    /// first forward pass for the recomputation (see the layer-by-layer training step): each
    /// layer that fits, from the top, is recomputed without multiplying again. 0 keeps none.
    pub fn set_kept_products(&mut self, bytes: usize) {
        self.kept_products = bytes;
    }

    /// See [`Model::set_kept_products`].
    pub fn kept_products(&self) -> usize {
        self.kept_products
    }

    /// Values one layer's matrix products produce per token: the attention's four
    /// projections and the MLP's three (what keeping a layer's products holds).
    pub(crate) fn product_width(&self) -> usize {
        let c = &self.cfg;
        (c.num_attention_heads + 2 * c.kv_heads()) * c.head_size()
            + 2 * c.hidden_size
            + 2 * c.intermediate_size
    }

    /// An empty KV cache for this model.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.cfg.num_hidden_layers)
    }

    fn rope_tables(&self, positions: &[Vec<u32>]) -> Result<(Tensor, Tensor)> {
        let b = positions.len();
        let t = positions.first().map(|p| p.len()).unwrap_or(0);
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(b * t * half);
        let mut sin = Vec::with_capacity(b * t * half);
        for row in positions {
            for &p in row {
                for f in &self.inv_freq {
                    let a = p as f32 * f;
                    cos.push(a.cos());
                    sin.push(a.sin());
                }
            }
        }
        let cos = Tensor::from_vec(cos, (b, t, half), &self.device)?.to_dtype(self.dtype)?;
        let sin = Tensor::from_vec(sin, (b, t, half), &self.device)?.to_dtype(self.dtype)?;
        Ok((cos, sin))
    }

    /// Final hidden states `[B, T, hidden]` (after the last norm).
    pub fn forward_hidden(
        &self,
        batch: &Batch<'_>,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let past = cache.as_ref().map(|c| c.seq_len()).unwrap_or(0);
        if let Some(c) = cache.as_ref() {
            let b = batch.input_ids.dim(0)?;
            if c.seq_len() > 0 && c.batch_size() != b {
                return Err(ModelError::InvalidRequest(format!(
                    "cache holds {} sequences, batch has {b}",
                    c.batch_size()
                )));
            }
        }
        let shared = self.prepare(batch, past)?;
        let mut x = self.embed_tokens(batch.input_ids)?;
        for i in 0..self.layers.len() {
            let slot = cache.as_deref_mut().map(|c| c.layer_mut(i));
            x = self.layer(i, &x, &shared, slot)?;
        }
        self.final_norm(&x)
    }

    /// Checks a batch against `past` cached positions and builds what its layers share.
    pub(crate) fn prepare(&self, batch: &Batch<'_>, past: usize) -> Result<LayerShared> {
        let (b, t) = batch.input_ids.dims2()?;
        if batch.positions.len() != b || batch.positions.iter().any(|p| p.len() != t) {
            return Err(ModelError::InvalidRequest(format!(
                "positions must be [{b}][{t}]"
            )));
        }
        if batch.key_mask.len() != b || batch.key_mask.iter().any(|m| m.len() != past + t) {
            return Err(ModelError::InvalidRequest(format!(
                "key mask must be [{b}][{}]",
                past + t
            )));
        }
        let max_id = batch.input_ids.flatten_all()?.max(0)?.to_scalar::<u32>()?;
        if max_id as usize >= self.cfg.vocab_size {
            return Err(ModelError::InvalidRequest(format!(
                "token id {max_id} out of vocabulary ({})",
                self.cfg.vocab_size
            )));
        }
        let (cos, sin) = self.rope_tables(batch.positions)?;
        let bias = causal_bias(batch.key_mask, t, self.dtype, &self.device)?;
        Ok(LayerShared { cos, sin, bias })
    }

    /// The embeddings `[B, T, hidden]` of token ids `[B, T]`.
    pub(crate) fn embed_tokens(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        Ok(self
            .embed
            .index_select(&input_ids.flatten_all()?, 0)?
            .reshape((b, t, self.cfg.hidden_size))?)
    }

    /// The gradient of `Σ embed_tokens(ids) ⊙ upstream` at the embedding matrix, computed
    /// directly on the CPU: each upstream row added into the row its token picked, in
    /// token order, as candle's `index_add` (the graph's backward pass) adds them, so the
    /// values are the same; only the picked rows of the zeroed matrix are touched. An
    /// empty store when the embedding is not trained; `None` where the graph must do it
    /// (a GPU, or not f32).
    pub(crate) fn embedding_gradient(
        &self,
        input_ids: &Tensor,
        upstream: &Tensor,
    ) -> Result<Option<GradStore>> {
        if !crate::kernels::cpu::applies(&self.embed)
            || !crate::kernels::cpu::applies(upstream)
            || input_ids.dtype() != DType::U32
        {
            return Ok(None);
        }
        let mut store = GradStore::default();
        if !self.embed.is_variable() {
            return Ok(Some(store));
        }
        let (vocab, h) = self.embed.dims2()?;
        let ids = input_ids.flatten_all()?.to_vec1::<u32>()?;
        if upstream.elem_count() != ids.len() * h {
            return Err(ModelError::InvalidRequest(format!(
                "an upstream gradient of shape {:?} for {} tokens of width {h}",
                upstream.shape(),
                ids.len()
            )));
        }
        let mut grad = vec![0f32; vocab * h];
        crate::kernels::cpu::with_values(upstream, |up| {
            for (row, &id) in ids.iter().enumerate() {
                if id == u32::MAX {
                    continue;
                }
                let id = id as usize;
                if id >= vocab {
                    candle_core::bail!("token id {id} outside the vocabulary of {vocab}");
                }
                let src = &up[row * h..(row + 1) * h];
                for (d, &s) in grad[id * h..(id + 1) * h].iter_mut().zip(src) {
                    *d += s;
                }
            }
            Ok(())
        })?;
        let grad = Tensor::from_vec(grad, (vocab, h), self.embed.device())?;
        store.insert(&self.embed, grad);
        Ok(Some(store))
    }

    /// Layer `i` applied to hidden states `x` `[B, T, hidden]`, extending its cache slot.
    pub(crate) fn layer(
        &self,
        i: usize,
        x: &Tensor,
        shared: &LayerShared,
        slot: Option<&mut Option<LayerKv>>,
    ) -> Result<Tensor> {
        let layer = &self.layers[i];
        let eps = self.cfg.rms_norm_eps;
        let h = rms_norm(x, &layer.ln1, eps, self.fused)?;
        let h = layer
            .attn
            .forward(&h, &shared.cos, &shared.sin, &shared.bias, slot, self.fused)?;
        let x = (x + h)?;
        let h = rms_norm(&x, &layer.ln2, eps, self.fused)?;
        Ok((&x + layer.mlp.forward(&h, self.fused)?)?)
    }

    /// The number of layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// The last norm, applied to the last layer's output.
    pub(crate) fn final_norm(&self, x: &Tensor) -> Result<Tensor> {
        Ok(rms_norm(x, &self.norm, self.cfg.rms_norm_eps, self.fused)?)
    }

    /// The same model with every weight detached from the autograd graph and the fused
    /// kernels on: a forward pass that records nothing to differentiate. The weights are
    /// shared, not copied.
    pub(crate) fn detached(&self) -> Self {
        let mut m = self.clone();
        m.embed = m.embed.detach();
        m.norm = m.norm.detach();
        m.lm_head = m.lm_head.detached();
        for (_, lin) in m.layer_linears_mut() {
            *lin = lin.detached();
        }
        for l in &mut m.layers {
            l.ln1 = l.ln1.detach();
            l.ln2 = l.ln2.detach();
        }
        m.fused = true;
        m
    }

    /// Every projection of every layer under its Hugging Face module name
    /// (`model.layers.3.self_attn.q_proj`), in layer order: what LoRA adapters attach to.
    pub fn layer_linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let mut out = Vec::with_capacity(self.layers.len() * 7);
        for (i, l) in self.layers.iter_mut().enumerate() {
            let (a, m) = (&mut l.attn, &mut l.mlp);
            for (part, name, lin) in [
                ("self_attn", "q_proj", &mut a.q),
                ("self_attn", "k_proj", &mut a.k),
                ("self_attn", "v_proj", &mut a.v),
                ("self_attn", "o_proj", &mut a.o),
                ("mlp", "gate_proj", &mut m.gate),
                ("mlp", "up_proj", &mut m.up),
                ("mlp", "down_proj", &mut m.down),
            ] {
                out.push((format!("model.layers.{i}.{part}.{name}"), lin));
            }
        }
        out
    }

    /// Logits `[..., vocab]` from hidden states `[..., hidden]`.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        Ok(self.lm_head.forward(hidden)?)
    }

    /// Full-sequence logits `[B, T, V]` for a padded batch without cache.
    /// `mask` is `[B][T]` (1 = real token); positions follow the mask, so
    /// left and right padding both work.
    pub fn forward(&self, input_ids: &Tensor, mask: &[Vec<u8>]) -> Result<Tensor> {
        let positions = positions_from_mask(mask);
        let h = self.forward_hidden(
            &Batch {
                input_ids,
                key_mask: mask,
                positions: &positions,
            },
            None,
        )?;
        self.logits(&h)
    }

    /// Logits of the last position only, `[B, V]`, extending `cache`.
    pub fn forward_last(&self, batch: &Batch<'_>, cache: Option<&mut KvCache>) -> Result<Tensor> {
        let h = self.forward_hidden(batch, cache)?;
        let t = h.dim(1)?;
        let last = h.narrow(1, t - 1, 1)?.squeeze(1)?;
        self.logits(&last)
    }

    /// All weights as dense tensors under their Hugging Face names (for saving).
    /// Fails for quantized models.
    pub fn named_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        fn dense(l: &Linear, name: &str) -> Result<Tensor> {
            l.dense_weight().cloned().ok_or_else(|| {
                ModelError::InvalidRequest(format!(
                    "{name} is quantized; load dense weights to save"
                ))
            })
        }
        let mut out = vec![("model.embed_tokens.weight".to_string(), self.embed.clone())];
        for (i, l) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            let a = &l.attn;
            for (n, lin) in [
                ("q_proj", &a.q),
                ("k_proj", &a.k),
                ("v_proj", &a.v),
                ("o_proj", &a.o),
            ] {
                let name = format!("{p}.self_attn.{n}.weight");
                out.push((name.clone(), dense(lin, &name)?));
                if let Some(b) = lin.bias_tensor() {
                    out.push((format!("{p}.self_attn.{n}.bias"), b.clone()));
                }
            }
            for (n, lin) in [
                ("gate_proj", &l.mlp.gate),
                ("up_proj", &l.mlp.up),
                ("down_proj", &l.mlp.down),
            ] {
                let name = format!("{p}.mlp.{n}.weight");
                out.push((name.clone(), dense(lin, &name)?));
            }
            out.push((format!("{p}.input_layernorm.weight"), l.ln1.clone()));
            out.push((
                format!("{p}.post_attention_layernorm.weight"),
                l.ln2.clone(),
            ));
        }
        out.push(("model.norm.weight".into(), self.norm.clone()));
        if !self.cfg.tie_word_embeddings {
            out.push((
                "lm_head.weight".into(),
                dense(&self.lm_head, "lm_head.weight")?,
            ));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::weights::{WeightMode, Weights};

    #[test]
    fn the_direct_embedding_gradient_is_the_graphs_bit_for_bit() {
        let cfg = Config::tiny();
        let dev = Device::Cpu;
        let w = Weights::random(5, 0.2, &dev, WeightMode::Trainable(DType::F32));
        let m = Model::new(&cfg, &w).unwrap();
        // Repeated tokens: their rows add up in token order.
        let ids = Tensor::new(&[[3u32, 7, 3, 1], [7, 7, 2, 0]], &dev).unwrap();
        let n = 8 * cfg.hidden_size;
        let up: Vec<f32> = (0..n).map(|i| (i as f32 * 0.61).sin()).collect();
        let up = Tensor::from_vec(up, (2, 4, cfg.hidden_size), &dev).unwrap();
        let graph = (m.embed_tokens(&ids).unwrap() * &up)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let direct = m
            .embedding_gradient(&ids, &up)
            .unwrap()
            .expect("f32 on the CPU");
        let bits = |t: &Tensor| -> Vec<u32> {
            t.flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|x| x.to_bits())
                .collect()
        };
        assert_eq!(
            bits(direct.get(&m.embed).unwrap()),
            bits(graph.get(&m.embed).unwrap())
        );

        let frozen = m.detached();
        let none = frozen.embedding_gradient(&ids, &up).unwrap().unwrap();
        assert!(none.get(&frozen.embed).is_none());
        let outside = Tensor::new(&[[cfg.vocab_size as u32, 1, 2, 3], [0, 0, 0, 0]], &dev).unwrap();
        assert!(m.embedding_gradient(&outside, &up).is_err());
    }
}
