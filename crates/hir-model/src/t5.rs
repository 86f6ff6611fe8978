//! FLAN-T5 (T5 v1.1) encoder-decoder.
//!
//! T5's RMS layer norm without bias, relative position buckets (shared by all
//! layers of a stack, bidirectional in the encoder, causal in the decoder),
//! unscaled dot-product attention, gated-GELU feed-forward (`gelu_new`, the
//! tanh approximation), and an untied `lm_head`; when embeddings are tied the
//! decoder output is scaled by `d_model^-0.5` as in Hugging Face. See
//! <https://huggingface.co/docs/transformers/model_doc/flan-t5>.
//!
//! Batches carry padding masks for encoder and decoder. All ops are
//! differentiable. For sampling, [`Model::prefill`] encodes the prompts once and
//! keeps each decoder layer's cross-attention keys and values in a [`T5Cache`],
//! together with the decoder's self-attention KV cache, so that
//! [`Model::decode_step`] runs one token per sequence.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Module, Tensor, D};
use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};
use crate::kv_cache::{KvCache, LayerKv};
use crate::weights::{Linear, SafetensorsSource, WeightMode, Weights};

/// Hugging Face `config.json` of a T5 model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    /// `model_type` (`t5`).
    #[serde(default = "default_t5")]
    pub model_type: String,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub d_model: usize,
    /// Per-head width.
    pub d_kv: usize,
    /// Feed-forward width.
    pub d_ff: usize,
    /// Encoder layers.
    pub num_layers: usize,
    /// Decoder layers (defaults to `num_layers`).
    #[serde(default)]
    pub num_decoder_layers: Option<usize>,
    /// Attention heads.
    pub num_heads: usize,
    /// Relative position buckets.
    #[serde(default = "default_buckets")]
    pub relative_attention_num_buckets: usize,
    /// Largest relative distance told apart.
    #[serde(default = "default_max_distance")]
    pub relative_attention_max_distance: usize,
    /// Layer-norm epsilon.
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
    /// `gated-gelu` (FLAN-T5) or `relu` (original T5).
    #[serde(default = "default_ff")]
    pub feed_forward_proj: String,
    /// Whether `lm_head` shares the embedding matrix (transformers 4 layout:
    /// also whether the decoder output is scaled by `d_model^-0.5`).
    #[serde(default = "default_true")]
    pub tie_word_embeddings: bool,
    /// transformers 5 layout: whether the decoder output is scaled by
    /// `d_model^-0.5` (defaults to `tie_word_embeddings`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scale_decoder_outputs: Option<bool>,
    /// First decoder input token.
    #[serde(default)]
    pub decoder_start_token_id: u32,
    /// Padding token.
    #[serde(default)]
    pub pad_token_id: u32,
    /// End-of-sequence token.
    #[serde(default = "default_eos")]
    pub eos_token_id: u32,
    /// Any other fields, kept so that a saved config round-trips.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

fn default_t5() -> String {
    "t5".into()
}
fn default_buckets() -> usize {
    32
}
fn default_max_distance() -> usize {
    128
}
fn default_eps() -> f64 {
    1e-6
}
fn default_ff() -> String {
    "relu".into()
}
fn default_true() -> bool {
    true
}
fn default_eos() -> u32 {
    1
}

impl Config {
    fn gated(&self) -> Result<bool> {
        match self.feed_forward_proj.as_str() {
            "gated-gelu" => Ok(true),
            "relu" => Ok(false),
            other => Err(ModelError::InvalidConfig(format!(
                "feed_forward_proj {other:?} (supported: gated-gelu, relu)"
            ))),
        }
    }

    /// Whether the decoder output is scaled by `d_model^-0.5` before `lm_head`.
    pub fn scales_decoder_output(&self) -> bool {
        self.scale_decoder_outputs
            .unwrap_or(self.tie_word_embeddings)
    }

    /// Decoder depth.
    pub fn decoder_layers(&self) -> usize {
        self.num_decoder_layers.unwrap_or(self.num_layers)
    }

    /// FLAN-T5-base's shape: 12 + 12 layers, d_model 768, 12 heads, gated-GELU,
    /// 32,128 tokens, untied `lm_head` (for benchmarks with random weights).
    pub fn flan_t5_base() -> Self {
        serde_json::from_value(serde_json::json!({
            "model_type": "t5", "vocab_size": 32128, "d_model": 768, "d_kv": 64, "d_ff": 2048,
            "num_layers": 12, "num_decoder_layers": 12, "num_heads": 12,
            "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
            "layer_norm_epsilon": 1e-6, "feed_forward_proj": "gated-gelu",
            "tie_word_embeddings": false, "decoder_start_token_id": 0, "pad_token_id": 0,
            "eos_token_id": 1, "n_positions": 512
        }))
        .expect("static config parses")
    }

    /// A tiny FLAN-T5-shaped configuration for tests.
    pub fn tiny() -> Self {
        serde_json::from_value(serde_json::json!({
            "model_type": "t5",
            "vocab_size": 64,
            "d_model": 32,
            "d_kv": 8,
            "d_ff": 48,
            "num_layers": 2,
            "num_decoder_layers": 2,
            "num_heads": 4,
            "relative_attention_num_buckets": 8,
            "relative_attention_max_distance": 20,
            "layer_norm_epsilon": 1e-6,
            "feed_forward_proj": "gated-gelu",
            "tie_word_embeddings": false,
            "decoder_start_token_id": 0,
            "pad_token_id": 0,
            "eos_token_id": 1,
        }))
        .expect("static config parses")
    }
}

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

fn t5_norm(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let dtype = x.dtype();
    let x32 = x.to_dtype(DType::F32)?;
    let var = x32.sqr()?.mean_keepdim(D::Minus1)?;
    let y = x32.broadcast_div(&(var + eps)?.sqrt()?)?;
    y.to_dtype(dtype)?.broadcast_mul(w)
}

#[derive(Debug, Clone)]
struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    rel_bias: Option<Tensor>,
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

    fn heads(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        x.reshape((b, t, self.n_heads, self.d_kv))?
            .transpose(1, 2)?
            .contiguous()
    }

    /// `bias` `[B or 1, H, Tq, Tk]` holds position bias plus mask.
    fn forward(
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
    fn keys_values(&self, kv: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
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
    fn attend(
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
}

#[derive(Debug, Clone)]
struct FeedForward {
    wi_0: Linear,
    wi_1: Option<Linear>,
    wo: Linear,
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

    fn forward(&self, x: &Tensor, drop: Option<&Dropout>) -> candle_core::Result<Tensor> {
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
struct Block {
    self_attn: Attention,
    ln_self: Tensor,
    cross: Option<(Attention, Tensor)>,
    ff: FeedForward,
    ln_ff: Tensor,
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
struct Stack {
    blocks: Vec<Block>,
    final_ln: Tensor,
    decoder: bool,
}

impl Stack {
    fn new(cfg: &Config, w: &Weights, decoder: bool) -> Result<Self> {
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
fn mask_bias(
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
    fn new(rate: f32, seed: u64) -> Self {
        use rand::SeedableRng;
        Self {
            rate,
            rng: std::sync::Mutex::new(rand::rngs::StdRng::seed_from_u64(seed)),
        }
    }

    fn reseed(&self, seed: u64) {
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
fn dropout(drop: Option<&Dropout>, x: Tensor) -> candle_core::Result<Tensor> {
    match drop {
        Some(d) => d.apply(&x),
        None => Ok(x),
    }
}

/// A T5 encoder-decoder with its language-model head.
#[derive(Debug, Clone)]
pub struct Model {
    cfg: Config,
    shared: Tensor,
    encoder: Stack,
    decoder: Stack,
    lm_head: Linear,
    lm_head_untied: bool,
    device: Device,
    dtype: DType,
    /// Training-mode dropout; `None` (inference) unless [`Model::set_train_dropout`].
    dropout: Option<Arc<Dropout>>,
}

impl Model {
    /// Builds the model from Hugging Face weight names (`shared.weight`,
    /// `encoder.block.{i}.layer.0.SelfAttention.q.weight`, ..., `lm_head.weight`).
    pub fn new(cfg: &Config, w: &Weights) -> Result<Self> {
        if cfg.model_type != "t5" {
            return Err(ModelError::UnsupportedArchitecture(cfg.model_type.clone()));
        }
        cfg.gated()?;
        let (v, d) = (cfg.vocab_size, cfg.d_model);
        let shared = w.tensor("shared.weight", &[v, d])?;
        let encoder = Stack::new(cfg, &w.pp("encoder"), false)?;
        let decoder = Stack::new(cfg, &w.pp("decoder"), true)?;
        // An untied config needs `lm_head.weight`; a tied one uses it only if
        // the checkpoint has one (transformers 5 always declares ties).
        let lm_head = if !cfg.tie_word_embeddings || w.contains("lm_head.weight") {
            w.linear("lm_head", d, v, false)?
        } else {
            Linear::from_dense(shared.clone(), None)
        };
        Ok(Self {
            cfg: cfg.clone(),
            shared,
            encoder,
            decoder,
            lm_head_untied: !cfg.tie_word_embeddings || w.contains("lm_head.weight"),
            lm_head,
            device: w.device().clone(),
            dtype: w.mode().dtype(),
            dropout: None,
        })
    }

    /// Turns Hugging Face's training-mode dropout on (`rate > 0`) or off, at every place
    /// `T5ForConditionalGeneration.train()` applies it: the embeddings, attention weights,
    /// each sublayer's output, the feed-forward's hidden layer and each stack's output.
    /// Masks come from a generator seeded with `seed` (see [`Model::reseed_dropout`]), so a
    /// training step is repeatable.
    pub fn set_train_dropout(&mut self, rate: f32, seed: u64) -> Result<()> {
        if !(0.0..1.0).contains(&rate) {
            return Err(ModelError::InvalidRequest(format!(
                "dropout rate {rate} is not in [0, 1)"
            )));
        }
        self.dropout = (rate > 0.0).then(|| Arc::new(Dropout::new(rate, seed)));
        Ok(())
    }

    /// Restarts the dropout masks' generator at `seed` (no-op without dropout).
    pub fn reseed_dropout(&self, seed: u64) {
        if let Some(d) = &self.dropout {
            d.reseed(seed);
        }
    }

    /// Whether training-mode dropout is on.
    pub fn has_dropout(&self) -> bool {
        self.dropout.is_some()
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The dtype of the weights.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    fn position_bias(
        &self,
        rel: &Tensor,
        tq: usize,
        tk: usize,
        bidirectional: bool,
    ) -> Result<Tensor> {
        let c = &self.cfg;
        let mut buckets = Vec::with_capacity(tq * tk);
        for i in 0..tq {
            for j in 0..tk {
                buckets.push(relative_position_bucket(
                    j as i64 - i as i64,
                    bidirectional,
                    c.relative_attention_num_buckets,
                    c.relative_attention_max_distance,
                ) as u32);
            }
        }
        let idx = Tensor::from_vec(buckets, tq * tk, &self.device)?;
        // [Tq*Tk, H] -> [1, H, Tq, Tk]
        Ok(rel
            .index_select(&idx, 0)?
            .reshape((tq, tk, c.num_heads))?
            .permute((2, 0, 1))?
            .unsqueeze(0)?)
    }

    fn run_stack(
        &self,
        stack: &Stack,
        ids: &Tensor,
        mask: &[Vec<u8>],
        enc: Option<(&Tensor, &[Vec<u8>])>,
    ) -> Result<Tensor> {
        let (_, t) = ids.dims2()?;
        let eps = self.cfg.layer_norm_epsilon;
        let drop = self.dropout.as_deref();
        let mut x = dropout(
            drop,
            self.shared.index_select(&ids.flatten_all()?, 0)?.reshape((
                ids.dim(0)?,
                t,
                self.cfg.d_model,
            ))?,
        )?;
        let rel = stack.blocks[0]
            .self_attn
            .rel_bias
            .as_ref()
            .expect("the first block has the relative attention bias");
        let self_bias = self
            .position_bias(rel, t, t, !stack.decoder)?
            .broadcast_add(&mask_bias(
                mask,
                t,
                stack.decoder,
                self.dtype,
                &self.device,
            )?)?;
        let cross_bias = match enc {
            Some((_, m)) => Some(mask_bias(m, t, false, self.dtype, &self.device)?),
            None => None,
        };
        for block in &stack.blocks {
            let h = t5_norm(&x, &block.ln_self, eps)?;
            x = (&x + dropout(drop, block.self_attn.forward(&h, &h, &self_bias, drop)?)?)?;
            if let (Some((attn, ln)), Some((e, _)), Some(cb)) = (&block.cross, enc, &cross_bias) {
                let h = t5_norm(&x, ln, eps)?;
                x = (&x + dropout(drop, attn.forward(&h, e, cb, drop)?)?)?;
            }
            let h = t5_norm(&x, &block.ln_ff, eps)?;
            x = (&x + dropout(drop, block.ff.forward(&h, drop)?)?)?;
        }
        Ok(dropout(drop, t5_norm(&x, &stack.final_ln, eps)?)?)
    }

    /// Encoder output `[B, Ts, d_model]` for source ids `[B, Ts]` with padding mask.
    pub fn encode(&self, input_ids: &Tensor, mask: &[Vec<u8>]) -> Result<Tensor> {
        self.run_stack(&self.encoder, input_ids, mask, None)
    }

    /// Decoder logits `[B, Tt, V]` for decoder inputs `[B, Tt]` (with padding mask)
    /// attending to an encoder output.
    pub fn decode(
        &self,
        decoder_ids: &Tensor,
        decoder_mask: &[Vec<u8>],
        encoder_out: &Tensor,
        encoder_mask: &[Vec<u8>],
    ) -> Result<Tensor> {
        let h = self.run_stack(
            &self.decoder,
            decoder_ids,
            decoder_mask,
            Some((encoder_out, encoder_mask)),
        )?;
        let h = if self.cfg.scales_decoder_output() {
            (h * (self.cfg.d_model as f64).powf(-0.5))?
        } else {
            h
        };
        Ok(self.lm_head.forward(&h)?)
    }

    /// Full forward: logits `[B, Tt, V]`.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        mask: &[Vec<u8>],
        decoder_ids: &Tensor,
        decoder_mask: &[Vec<u8>],
    ) -> Result<Tensor> {
        let e = self.encode(input_ids, mask)?;
        self.decode(decoder_ids, decoder_mask, &e, mask)
    }

    /// Decoder inputs for teacher forcing: labels shifted right behind
    /// `decoder_start_token_id`, with -100 replaced by the pad id. Returns ids
    /// and mask (1 up to the last labelled position of each row).
    pub fn shift_right(&self, labels: &[Vec<i64>]) -> Result<(Tensor, Vec<Vec<u8>>)> {
        let t = labels.first().map(|l| l.len()).unwrap_or(0);
        let mut ids = Vec::with_capacity(labels.len() * t);
        let mut mask = Vec::with_capacity(labels.len());
        for row in labels {
            if row.len() != t {
                return Err(ModelError::InvalidRequest(
                    "label rows differ in length".into(),
                ));
            }
            let last = row
                .iter()
                .rposition(|&x| x != crate::loss::IGNORE_INDEX)
                .map_or(0, |p| p + 1);
            ids.push(self.cfg.decoder_start_token_id);
            for &x in &row[..t.saturating_sub(1)] {
                ids.push(if x < 0 {
                    self.cfg.pad_token_id
                } else {
                    x as u32
                });
            }
            mask.push((0..t).map(|i| u8::from(i < last.max(1))).collect());
        }
        Ok((
            Tensor::from_vec(ids, (labels.len(), t), &self.device)?,
            mask,
        ))
    }

    /// Greedy decoding of up to `max_new_tokens` tokens per row (stops at EOS).
    pub fn greedy(
        &self,
        input_ids: &Tensor,
        mask: &[Vec<u8>],
        max_new_tokens: usize,
    ) -> Result<Vec<Vec<u32>>> {
        let b = input_ids.dim(0)?;
        let enc = self.encode(input_ids, mask)?;
        let mut seqs: Vec<Vec<u32>> = vec![vec![self.cfg.decoder_start_token_id]; b];
        let mut done = vec![false; b];
        for _ in 0..max_new_tokens {
            let t = seqs[0].len();
            let flat: Vec<u32> = seqs.iter().flatten().copied().collect();
            let ids = Tensor::from_vec(flat, (b, t), &self.device)?;
            let logits = self.decode(&ids, &vec![vec![1u8; t]; b], &enc, mask)?;
            let next: Vec<u32> = logits
                .narrow(1, t - 1, 1)?
                .squeeze(1)?
                .argmax(D::Minus1)?
                .to_vec1()?;
            for (i, s) in seqs.iter_mut().enumerate() {
                let tok = if done[i] {
                    self.cfg.pad_token_id
                } else {
                    next[i]
                };
                if tok == self.cfg.eos_token_id {
                    done[i] = true;
                }
                s.push(tok);
            }
            if done.iter().all(|d| *d) {
                break;
            }
        }
        Ok(seqs.into_iter().map(|s| s[1..].to_vec()).collect())
    }

    /// Number of parameters (quantized matrices included).
    pub fn num_parameters(&self) -> usize {
        let c = &self.cfg;
        let (d, inner, v) = (c.d_model, c.num_heads * c.d_kv, c.vocab_size);
        let attention = 4 * d * inner;
        let ff = if self.encoder.blocks[0].ff.wi_1.is_some() {
            3 * d * c.d_ff
        } else {
            2 * d * c.d_ff
        };
        let rel = 2 * c.relative_attention_num_buckets * c.num_heads;
        let encoder = c.num_layers * (attention + ff + 2 * d);
        let decoder = c.decoder_layers() * (2 * attention + ff + 3 * d);
        let lm_head = if self.lm_head_untied { v * d } else { 0 };
        v * d + encoder + decoder + rel + 2 * d + lm_head
    }

    /// An empty sampling cache.
    pub fn new_cache(&self) -> T5Cache {
        T5Cache {
            self_kv: KvCache::new(self.cfg.decoder_layers()),
            cross: Vec::new(),
            enc_mask: Vec::new(),
            group_len: Vec::new(),
        }
    }

    /// The device of the weights.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The longest input the model takes (`n_positions`, 512 when the config has none;
    /// T5's relative positions have no hard limit).
    pub fn context_length(&self) -> usize {
        self.cfg
            .extra
            .get("n_positions")
            .and_then(|v| v.as_u64())
            .map_or(512, |n| n as usize)
    }

    fn check_ids(&self, ids: &[u32]) -> Result<()> {
        match ids.iter().find(|&&i| i as usize >= self.cfg.vocab_size) {
            Some(bad) => Err(ModelError::InvalidRequest(format!(
                "token id {bad} out of vocabulary ({})",
                self.cfg.vocab_size
            ))),
            None => Ok(()),
        }
    }

    /// Encodes the prompts (right-padded with `pad_id`), keeps every decoder layer's
    /// cross-attention keys and values, and runs the decoder start token: returns the cache
    /// and the logits of the first generated token `[P, V]`.
    pub fn prefill(&self, prompts: &[&[u32]], pad_id: u32) -> Result<(T5Cache, Tensor)> {
        let ts = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
        if prompts.is_empty() || prompts.iter().any(|p| p.is_empty()) {
            return Err(ModelError::InvalidRequest(
                "prompts must be non-empty".into(),
            ));
        }
        let mut ids = Vec::with_capacity(prompts.len() * ts);
        let mut enc_mask = Vec::with_capacity(prompts.len());
        for p in prompts {
            self.check_ids(p)?;
            ids.extend_from_slice(p);
            ids.extend(std::iter::repeat_n(pad_id, ts - p.len()));
            let mut m = vec![1u8; p.len()];
            m.resize(ts, 0);
            enc_mask.push(m);
        }
        let input = Tensor::from_vec(ids, (prompts.len(), ts), &self.device)?;
        let enc = self.encode(&input, &enc_mask)?;
        let cross = self
            .decoder
            .blocks
            .iter()
            .map(|b| {
                let (attn, _) = b
                    .cross
                    .as_ref()
                    .expect("decoder blocks attend to the encoder");
                Ok(attn.keys_values(&enc)?)
            })
            .collect::<Result<Vec<_>>>()?;
        let mut cache = T5Cache {
            self_kv: KvCache::new(self.cfg.decoder_layers()),
            cross,
            group_len: vec![1; enc_mask.len()],
            enc_mask,
        };
        let start = vec![self.cfg.decoder_start_token_id; prompts.len()];
        let logits = self.decode_step(&start, &vec![vec![1u8]; prompts.len()], &mut cache)?;
        Ok((cache, logits))
    }

    /// Runs one decoder token per sequence against the cache: `tokens[b]` is the next input
    /// of row b, `key_mask[b]` marks the real decoder positions of the row, the new token's
    /// included (its last entry). Appends to the cache and returns logits `[B, V]`.
    pub fn decode_step(
        &self,
        tokens: &[u32],
        key_mask: &[Vec<u8>],
        cache: &mut T5Cache,
    ) -> Result<Tensor> {
        let b = tokens.len();
        let tk = cache.self_kv.seq_len() + 1;
        if key_mask.len() != b
            || key_mask
                .iter()
                .any(|m| m.len() != tk || m.last() != Some(&1))
            || cache.rows() != b
        {
            return Err(ModelError::InvalidRequest(format!(
                "decoder mask must be [{b}][{tk}] ending in 1, for a cache of {} rows",
                cache.rows()
            )));
        }
        self.check_ids(tokens)?;
        let c = &self.cfg;
        let eps = c.layer_norm_epsilon;
        let ids = Tensor::from_vec(tokens.to_vec(), b, &self.device)?;
        let mut x = self
            .shared
            .index_select(&ids, 0)?
            .reshape((b, 1, c.d_model))?;
        // Relative position of every cached key to the new token, per row.
        let mut buckets = Vec::with_capacity(b * tk);
        for m in key_mask {
            let query = m.iter().filter(|&&v| v != 0).count() as i64 - 1;
            let mut pos = 0i64;
            for &v in m {
                buckets.push(relative_position_bucket(
                    pos - query,
                    false,
                    c.relative_attention_num_buckets,
                    c.relative_attention_max_distance,
                ) as u32);
                pos += i64::from(v != 0);
            }
        }
        let rel = self.decoder.blocks[0]
            .self_attn
            .rel_bias
            .as_ref()
            .expect("the first block has the relative attention bias");
        let idx = Tensor::from_vec(buckets, b * tk, &self.device)?;
        let self_bias = rel
            .index_select(&idx, 0)?
            .reshape((b, tk, c.num_heads))?
            .transpose(1, 2)?
            .unsqueeze(2)?
            .broadcast_add(&mask_bias(key_mask, 1, false, self.dtype, &self.device)?)?;
        let cross_bias = mask_bias(&cache.enc_mask, 1, false, self.dtype, &self.device)?;
        for (i, block) in self.decoder.blocks.iter().enumerate() {
            let h = t5_norm(&x, &block.ln_self, eps)?;
            let a = &block.self_attn;
            let q = a.heads(&a.q.forward(&h)?)?;
            let (k, v) = a.keys_values(&h)?;
            let (k, v) = match cache.self_kv.layer_mut(i) {
                Some(layer) => layer.append(&k, &v)?,
                slot => {
                    *slot = Some(LayerKv::new(&k, &v)?);
                    (k, v)
                }
            };
            x = (&x + a.attend(&q, &k, &v, &self_bias, None)?)?;
            let (attn, ln) = block
                .cross
                .as_ref()
                .expect("decoder blocks attend to the encoder");
            let h = t5_norm(&x, ln, eps)?;
            let q = attn.heads(&attn.q.forward(&h)?)?;
            x = (&x + cache.cross_attend(attn, &q, i, &cross_bias)?)?;
            let h = t5_norm(&x, &block.ln_ff, eps)?;
            x = (&x + block.ff.forward(&h, None)?)?;
        }
        let h = t5_norm(&x, &self.decoder.final_ln, eps)?;
        let h = if c.scales_decoder_output() {
            (h * (c.d_model as f64).powf(-0.5))?
        } else {
            h
        };
        Ok(self.lm_head.forward(&h)?.squeeze(1)?)
    }

    /// Log-probabilities of `continuation` given the encoder input `prompt`, one per token.
    pub fn continuation_logprobs(&self, prompt: &[u32], continuation: &[u32]) -> Result<Vec<f32>> {
        if prompt.is_empty() || continuation.is_empty() {
            return Err(ModelError::InvalidRequest(
                "prompt and continuation must be non-empty".into(),
            ));
        }
        self.check_ids(prompt)?;
        self.check_ids(continuation)?;
        let labels: Vec<i64> = continuation.iter().map(|&t| t as i64).collect();
        let (dec, dmask) = self.shift_right(std::slice::from_ref(&labels))?;
        let src = Tensor::from_vec(prompt.to_vec(), (1, prompt.len()), &self.device)?;
        let logits = self.forward(&src, &[vec![1u8; prompt.len()]], &dec, &dmask)?;
        let rows = logits.squeeze(0)?.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        Ok(continuation
            .iter()
            .zip(&rows)
            .map(|(&t, row)| crate::generate::log_softmax_at(row, t))
            .collect())
    }

    /// All weights under their Hugging Face names (for saving).
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![("shared.weight".to_string(), self.shared.clone())];
        for (prefix, stack) in [("encoder", &self.encoder), ("decoder", &self.decoder)] {
            for (i, b) in stack.blocks.iter().enumerate() {
                let p = format!("{prefix}.block.{i}.layer");
                let attn = |out: &mut Vec<(String, Tensor)>, a: &Attention, name: &str| {
                    for (n, l) in [("q", &a.q), ("k", &a.k), ("v", &a.v), ("o", &a.o)] {
                        if let Some(w) = l.dense_weight() {
                            out.push((format!("{name}.{n}.weight"), w.clone()));
                        }
                    }
                    if let Some(r) = &a.rel_bias {
                        out.push((format!("{name}.relative_attention_bias.weight"), r.clone()));
                    }
                };
                attn(&mut out, &b.self_attn, &format!("{p}.0.SelfAttention"));
                out.push((format!("{p}.0.layer_norm.weight"), b.ln_self.clone()));
                let ff_idx = if let Some((a, ln)) = &b.cross {
                    attn(&mut out, a, &format!("{p}.1.EncDecAttention"));
                    out.push((format!("{p}.1.layer_norm.weight"), ln.clone()));
                    2
                } else {
                    1
                };
                let ff = format!("{p}.{ff_idx}.DenseReluDense");
                let names: &[(&str, &Linear)] = match &b.ff.wi_1 {
                    Some(wi_1) => &[("wi_0", &b.ff.wi_0), ("wi_1", wi_1), ("wo", &b.ff.wo)],
                    None => &[("wi", &b.ff.wi_0), ("wo", &b.ff.wo)],
                };
                for (n, l) in names {
                    if let Some(w) = l.dense_weight() {
                        out.push((format!("{ff}.{n}.weight"), w.clone()));
                    }
                }
                out.push((format!("{p}.{ff_idx}.layer_norm.weight"), b.ln_ff.clone()));
            }
            out.push((
                format!("{prefix}.final_layer_norm.weight"),
                stack.final_ln.clone(),
            ));
        }
        if !self.cfg.tie_word_embeddings || self.lm_head_untied {
            if let Some(w) = self.lm_head.dense_weight() {
                out.push(("lm_head.weight".into(), w.clone()));
            }
        }
        out
    }
}

/// The sampling state of a batch of T5 sequences: the decoder's self-attention KV cache (a
/// row per sequence), and each decoder layer's cross-attention keys and values over the
/// encoded prompts with the prompts' padding mask (a row per *group*). A group is a run of
/// consecutive sequences that share one encoded prompt (the `n` samples of a request), so
/// the cross-attention cache is held once per prompt, not once per sample.
#[derive(Debug)]
pub struct T5Cache {
    self_kv: KvCache,
    /// Per decoder layer, keys and values `[G, H, Ts, d_kv]` of the encoder output.
    cross: Vec<(Tensor, Tensor)>,
    /// Padding mask of each group's encoder input, `[G][Ts]`.
    enc_mask: Vec<Vec<u8>>,
    /// Sequences per group, in row order: group g covers the next `group_len[g]` rows.
    group_len: Vec<usize>,
}

impl T5Cache {
    /// Cached decoder length (including padding).
    pub fn seq_len(&self) -> usize {
        self.self_kv.seq_len()
    }

    /// Number of sequences.
    pub fn rows(&self) -> usize {
        self.group_len.iter().sum()
    }

    /// Number of encoded prompts held (groups of sequences sharing one).
    pub fn groups(&self) -> usize {
        self.group_len.len()
    }

    /// The group of each row.
    fn row_groups(&self) -> Vec<usize> {
        self.group_len
            .iter()
            .enumerate()
            .flat_map(|(g, &n)| std::iter::repeat_n(g, n))
            .collect()
    }

    /// Keeps the rows `idx` (in that order; repeats allowed). Consecutive kept rows of one
    /// group stay one group; encoder columns that no kept group uses are dropped.
    pub fn select(&self, idx: &[u32]) -> Result<Self> {
        let of_row = self.row_groups();
        let mut picked: Vec<u32> = Vec::new();
        let mut group_len: Vec<usize> = Vec::new();
        let mut last = None;
        for &i in idx {
            let g = *of_row.get(i as usize).ok_or_else(|| {
                ModelError::InvalidRequest(format!("row {i} of a {}-row cache", of_row.len()))
            })?;
            if last == Some(g) {
                *group_len.last_mut().expect("a run is open") += 1;
            } else {
                picked.push(g as u32);
                group_len.push(1);
                last = Some(g);
            }
        }
        let enc_mask: Vec<Vec<u8>> = picked
            .iter()
            .map(|&g| self.enc_mask[g as usize].clone())
            .collect();
        let used = enc_mask
            .iter()
            .map(|m| m.iter().rposition(|&v| v != 0).map_or(0, |p| p + 1))
            .max()
            .unwrap_or(0);
        let cross = match self.cross.first() {
            Some((k0, _)) => {
                let ids = Tensor::new(picked.as_slice(), k0.device())?;
                self.cross
                    .iter()
                    .map(|(k, v)| {
                        let pick =
                            |t: &Tensor| t.index_select(&ids, 0)?.narrow(2, 0, used)?.contiguous();
                        Ok((pick(k)?, pick(v)?))
                    })
                    .collect::<Result<Vec<_>>>()?
            }
            None => Vec::new(),
        };
        Ok(Self {
            self_kv: self.self_kv.select(idx)?,
            cross,
            enc_mask: enc_mask.into_iter().map(|m| m[..used].to_vec()).collect(),
            group_len,
        })
    }

    fn with_self_kv(&self, self_kv: KvCache) -> Self {
        Self {
            self_kv,
            cross: self.cross.clone(),
            enc_mask: self.enc_mask.clone(),
            group_len: self.group_len.clone(),
        }
    }

    /// Left-pads the decoder cache to `len` positions (padded keys must be masked).
    pub fn left_pad(&self, len: usize) -> Result<Self> {
        Ok(self.with_self_kv(self.self_kv.left_pad(len)?))
    }

    /// Drops the first `n` decoder positions of every row (all-padding columns).
    pub fn trim_front(&self, n: usize) -> Result<Self> {
        Ok(self.with_self_kv(self.self_kv.trim_front(n)?))
    }

    /// Stacks caches of equal decoder length along the batch; encoder outputs of different
    /// lengths are right-padded (and masked) to the longest.
    pub fn concat(caches: &[&T5Cache]) -> Result<Self> {
        let ts = caches
            .iter()
            .flat_map(|c| c.enc_mask.first())
            .map(|m| m.len())
            .max()
            .unwrap_or(0);
        let layers = caches.iter().map(|c| c.cross.len()).max().unwrap_or(0);
        let mut cross = Vec::with_capacity(layers);
        for i in 0..layers {
            let mut ks = Vec::new();
            let mut vs = Vec::new();
            for c in caches.iter().filter(|c| !c.cross.is_empty()) {
                let (k, v) = &c.cross[i];
                let extra = ts - k.dim(2)?;
                let pad = |t: &Tensor| -> candle_core::Result<Tensor> {
                    if extra == 0 {
                        return Ok(t.clone());
                    }
                    let (b, h, _, d) = t.dims4()?;
                    let z = Tensor::zeros((b, h, extra, d), t.dtype(), t.device())?;
                    Tensor::cat(&[t, &z], 2)
                };
                ks.push(pad(k)?);
                vs.push(pad(v)?);
            }
            cross.push((Tensor::cat(&ks, 0)?, Tensor::cat(&vs, 0)?));
        }
        let enc_mask = caches
            .iter()
            .flat_map(|c| c.enc_mask.iter())
            .map(|m| {
                let mut m = m.clone();
                m.resize(ts, 0);
                m
            })
            .collect();
        let self_kvs: Vec<&KvCache> = caches.iter().map(|c| &c.self_kv).collect();
        Ok(Self {
            self_kv: KvCache::concat(&self_kvs)?,
            cross,
            enc_mask,
            group_len: caches
                .iter()
                .flat_map(|c| c.group_len.iter().copied())
                .collect(),
        })
    }

    /// Cross-attention of one query per row over its group's encoder output: the rows of
    /// each group are gathered into `[G, H, n_max, d_kv]` (padding slots repeat the group's
    /// first row), attend together, and are scattered back to `[B, 1, H * d_kv]`.
    fn cross_attend(
        &self,
        attn: &Attention,
        q: &Tensor,
        layer: usize,
        bias: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let (k, v) = &self.cross[layer];
        let (b, h, _, d) = q.dims4()?;
        let g = self.group_len.len();
        if g == b {
            return attn.attend(q, k, v, bias, None);
        }
        let n_max = self.group_len.iter().copied().max().unwrap_or(1);
        let mut gather = Vec::with_capacity(g * n_max);
        let mut scatter = Vec::with_capacity(b);
        let mut start = 0u32;
        for (gi, &n) in self.group_len.iter().enumerate() {
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
        let y = attn
            .attention(&qg, k, v, bias, None)?
            .transpose(1, 2)?
            .reshape((g * n_max, h * d))?
            .index_select(&scatter, 0)?
            .reshape((b, 1, h * d))?;
        attn.o.forward(&y)
    }
}

/// A T5 model loaded from a folder, with its tokenizer and variables.
#[derive(Debug)]
pub struct LoadedT5 {
    /// The model.
    pub model: Model,
    /// `tokenizer.json`, if the folder has one.
    pub tokenizer: Option<tokenizers::Tokenizer>,
    /// Trainable variables with their names (empty unless trainable).
    pub vars: Vec<(String, candle_core::Var)>,
}

/// Loads a T5 model from a Hugging Face folder (`config.json`,
/// `model.safetensors` or a sharded index; `tokenizer.json` if present).
/// With [`WeightMode::Trainable`] the weights are returned as variables.
pub fn load_folder(dir: &Path, device: &Device, mode: WeightMode) -> Result<LoadedT5> {
    if dir.join(crate::checkpoint::MANIFEST).is_file() {
        crate::checkpoint::verify(dir)?;
    }
    let cfg_path = dir.join("config.json");
    let bytes = std::fs::read(&cfg_path).map_err(|e| ModelError::io(&cfg_path, e))?;
    let raw: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| ModelError::json(&cfg_path, e))?;
    let mt = raw.get("model_type").and_then(|v| v.as_str()).unwrap_or("");
    if mt != "t5" {
        return Err(ModelError::UnsupportedArchitecture(mt.to_string()));
    }
    let cfg: Config = serde_json::from_value(raw).map_err(|e| ModelError::json(&cfg_path, e))?;
    let src = SafetensorsSource::open(&crate::loaded::safetensors_files(dir)?)?;
    let w = Weights::new(Arc::new(src), device, mode);
    let model = Model::new(&cfg, &w)?;
    let tok_path = dir.join("tokenizer.json");
    let tokenizer = if tok_path.is_file() {
        let t = tokenizers::Tokenizer::from_file(&tok_path).map_err(ModelError::tokenizer)?;
        if t.get_vocab_size(true) > cfg.vocab_size {
            return Err(ModelError::TokenizerMismatch(format!(
                "tokenizer has {} tokens, the model's vocabulary is {}",
                t.get_vocab_size(true),
                cfg.vocab_size
            )));
        }
        Some(t)
    } else {
        None
    };
    Ok(LoadedT5 {
        model,
        tokenizer,
        vars: w.vars(),
    })
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
