//! The T5 encoder-decoder network: [`Model`], its encoder and decoder stacks, the
//! language-model head, and the teacher-forced forward passes of training and scoring.

use std::sync::Arc;

use candle_core::{DType, Device, Module, Tensor};

use super::layers::{
    dropout, mask_bias, relative_position_bucket, t5_norm, Attention, Dropout, Stack,
};
use super::Config;
use crate::error::{ModelError, Result};
use crate::formats::weights::{Linear, Weights};
use crate::kernels::ops::{log_softmax_at, IGNORE_INDEX};

/// A T5 encoder-decoder with its language-model head.
#[derive(Debug, Clone)]
pub struct Model {
    pub(super) cfg: Config,
    pub(super) shared: Tensor,
    pub(super) encoder: Stack,
    pub(super) decoder: Stack,
    pub(super) lm_head: Linear,
    pub(super) lm_head_untied: bool,
    pub(super) device: Device,
    pub(super) dtype: DType,
    /// Training-mode dropout; `None` (inference) unless [`Model::set_train_dropout`].
    pub(super) dropout: Option<Arc<Dropout>>,
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
                .rposition(|&x| x != IGNORE_INDEX)
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

    /// Fails for a token id outside the vocabulary.
    pub(super) fn check_ids(&self, ids: &[u32]) -> Result<()> {
        match ids.iter().find(|&&i| i as usize >= self.cfg.vocab_size) {
            Some(bad) => Err(ModelError::InvalidRequest(format!(
                "token id {bad} out of vocabulary ({})",
                self.cfg.vocab_size
            ))),
            None => Ok(()),
        }
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
            .map(|(&t, row)| log_softmax_at(row, t))
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
