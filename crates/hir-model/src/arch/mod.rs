//! The architectures: Llama-family decoders ([`llama`], with GGUF loading) and FLAN-T5
//! ([`t5`]), LoRA adapters for the former ([`lora`]), the decoder KV cache ([`kv_cache`]),
//! and [`AnyModel`]: both architectures behind the few operations that batched sampling
//! needs, with [`BatchCache`], the matching sampling state.

use candle_core::{DType, Device, Tensor};

use crate::error::{ModelError, Result};
use crate::kernels::ops::log_softmax_at;
use kv_cache::KvCache;

pub mod kv_cache;
pub mod llama;
pub mod lora;
pub mod t5;

/// A decoder-only Llama-family model or a T5 encoder-decoder.
#[derive(Debug)]
pub enum AnyModel {
    /// SmolLM2, Llama, Qwen2.
    Llama(llama::Model),
    /// FLAN-T5 (T5 v1.1).
    T5(t5::Model),
}

impl From<llama::Model> for AnyModel {
    fn from(m: llama::Model) -> Self {
        Self::Llama(m)
    }
}

impl From<t5::Model> for AnyModel {
    fn from(m: t5::Model) -> Self {
        Self::T5(m)
    }
}

/// The sampling state of a batch: a decoder KV cache, plus the encoded prompts for T5.
#[derive(Debug)]
pub enum BatchCache {
    /// Keys and values of every layer.
    Llama(KvCache),
    /// Decoder keys and values with the encoder's cross-attention keys and values.
    T5(t5::T5Cache),
}

impl AnyModel {
    /// The Llama-family model, if this is one.
    pub fn as_llama(&self) -> Option<&llama::Model> {
        match self {
            Self::Llama(m) => Some(m),
            Self::T5(_) => None,
        }
    }

    /// The T5 model, if this is one.
    pub fn as_t5(&self) -> Option<&t5::Model> {
        match self {
            Self::T5(m) => Some(m),
            Self::Llama(_) => None,
        }
    }

    /// `model_type` of the config.
    pub fn architecture(&self) -> &str {
        match self {
            Self::Llama(m) => &m.config().model_type,
            Self::T5(m) => &m.config().model_type,
        }
    }

    /// Turns training-mode dropout on at the rate of the model's config (T5's
    /// `dropout_rate`, 0.1 when absent), seeded with `seed`. Returns the rate, 0 for a
    /// model without dropout (the Llama family here).
    pub fn enable_train_dropout(&mut self, seed: u64) -> Result<f32> {
        match self {
            Self::Llama(_) => Ok(0.0),
            Self::T5(m) => {
                let rate = m
                    .config()
                    .extra
                    .get("dropout_rate")
                    .and_then(serde_json::Value::as_f64)
                    .unwrap_or(0.1) as f32;
                m.set_train_dropout(rate, seed)?;
                Ok(rate)
            }
        }
    }

    /// Restarts the dropout masks at `seed`, so a training step is repeatable (no-op
    /// without dropout).
    pub fn reseed_dropout(&self, seed: u64) {
        if let Self::T5(m) = self {
            m.reseed_dropout(seed);
        }
    }

    /// See [`llama::Model::set_kept_products`] (no-op for T5, which trains on the whole
    /// graph).
    pub fn set_kept_products(&mut self, bytes: usize) {
        if let Self::Llama(m) = self {
            m.set_kept_products(bytes);
        }
    }

    /// Whether prompts go to an encoder (T5) rather than before the completion.
    pub fn is_encoder_decoder(&self) -> bool {
        matches!(self, Self::T5(_))
    }

    /// The device of the weights.
    pub fn device(&self) -> &Device {
        match self {
            Self::Llama(m) => m.device(),
            Self::T5(m) => m.device(),
        }
    }

    /// The dtype of the weights.
    pub fn dtype(&self) -> DType {
        match self {
            Self::Llama(m) => m.dtype(),
            Self::T5(m) => m.dtype(),
        }
    }

    /// Vocabulary size.
    pub fn vocab_size(&self) -> usize {
        match self {
            Self::Llama(m) => m.config().vocab_size,
            Self::T5(m) => m.config().vocab_size,
        }
    }

    /// The longest prompt, and the longest prompt plus completion for a decoder-only model.
    pub fn context_length(&self) -> usize {
        match self {
            Self::Llama(m) => m.config().max_position_embeddings,
            Self::T5(m) => m.context_length(),
        }
    }

    /// The context a prompt and a completion of these lengths take: their sum for a
    /// decoder-only model; for T5, whose encoder and decoder positions are separate, the
    /// longer of the two. Compare with [`AnyModel::context_length`].
    pub fn context_needed(&self, prompt: usize, completion: usize) -> usize {
        match self {
            Self::Llama(_) => prompt + completion,
            Self::T5(_) => prompt.max(completion),
        }
    }

    /// An empty sampling cache.
    pub fn new_cache(&self) -> BatchCache {
        match self {
            Self::Llama(m) => BatchCache::Llama(m.new_cache()),
            Self::T5(m) => BatchCache::T5(m.new_cache()),
        }
    }

    /// Runs one token per row against `cache`: `key_mask` covers the cached positions and
    /// the new one, `positions` is each row's position of the new token. Returns `[B, V]`.
    pub(crate) fn decode_step(
        &self,
        tokens: Vec<u32>,
        key_mask: &[Vec<u8>],
        positions: &[u32],
        cache: &mut BatchCache,
    ) -> Result<Tensor> {
        match (self, cache) {
            (Self::Llama(m), BatchCache::Llama(cache)) => {
                let b = tokens.len();
                let input = Tensor::from_vec(tokens, (b, 1), m.device())?;
                let positions: Vec<Vec<u32>> = positions.iter().map(|&p| vec![p]).collect();
                m.forward_last(
                    &llama::Batch {
                        input_ids: &input,
                        key_mask,
                        positions: &positions,
                    },
                    Some(cache),
                )
            }
            (Self::T5(m), BatchCache::T5(cache)) => m.decode_step(&tokens, key_mask, cache),
            _ => Err(ModelError::InvalidRequest(
                "the cache belongs to another architecture".into(),
            )),
        }
    }

    /// Log-probabilities of `continuation` after `prompt` (decoder-only) or given the
    /// encoder input `prompt` (T5), one per continuation token.
    pub fn continuation_logprobs(&self, prompt: &[u32], continuation: &[u32]) -> Result<Vec<f32>> {
        let m = match self {
            Self::T5(m) => return m.continuation_logprobs(prompt, continuation),
            Self::Llama(m) => m,
        };
        if prompt.is_empty() || continuation.is_empty() {
            return Err(ModelError::InvalidRequest(
                "prompt and continuation must be non-empty".into(),
            ));
        }
        let ids: Vec<u32> = prompt.iter().chain(continuation).copied().collect();
        let n = ids.len();
        let input = Tensor::from_vec(ids, (1, n), m.device())?;
        let logits = m
            .forward(&input, &[vec![1u8; n]])?
            .squeeze(0)?
            .narrow(0, prompt.len() - 1, continuation.len())?
            .to_dtype(DType::F32)?
            .to_vec2::<f32>()?;
        Ok(continuation
            .iter()
            .zip(&logits)
            .map(|(&t, row)| log_softmax_at(row, t))
            .collect())
    }
}

impl BatchCache {
    /// Cached (decoder) length, padding included.
    pub fn seq_len(&self) -> usize {
        match self {
            Self::Llama(c) => c.seq_len(),
            Self::T5(c) => c.seq_len(),
        }
    }

    /// Keeps the rows `idx` (in that order; repeats allowed).
    pub fn select(&self, idx: &[u32]) -> Result<Self> {
        Ok(match self {
            Self::Llama(c) => Self::Llama(c.select(idx)?),
            Self::T5(c) => Self::T5(c.select(idx)?),
        })
    }

    /// Left-pads the (decoder) cache to `len` positions.
    pub fn left_pad(&self, len: usize) -> Result<Self> {
        Ok(match self {
            Self::Llama(c) => Self::Llama(c.left_pad(len)?),
            Self::T5(c) => Self::T5(c.left_pad(len)?),
        })
    }

    /// Drops the first `n` (decoder) positions of every row.
    pub fn trim_front(&self, n: usize) -> Result<Self> {
        Ok(match self {
            Self::Llama(c) => Self::Llama(c.trim_front(n)?),
            Self::T5(c) => Self::T5(c.trim_front(n)?),
        })
    }

    /// Stacks two caches of equal (decoder) length along the batch.
    pub fn concat(a: &Self, b: &Self) -> Result<Self> {
        Ok(match (a, b) {
            (Self::Llama(a), Self::Llama(b)) => Self::Llama(KvCache::concat(&[a, b])?),
            (Self::T5(a), Self::T5(b)) => Self::T5(t5::T5Cache::concat(&[a, b])?),
            _ => {
                return Err(ModelError::InvalidRequest(
                    "caches of different architectures".into(),
                ))
            }
        })
    }
}
