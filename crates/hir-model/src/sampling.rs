//! Batched sampling with a KV cache.
//!
//! Prompts of different lengths are left-padded into one batch with a key
//! padding mask (for T5, the encoder input is right-padded and the decoder
//! cache left-padded); each prompt is prefilled once and its cache is copied
//! for the `n` samples drawn from it. Every sequence has its own random generator,
//! seeded from `(seed, stream, sample index)`, so its tokens do not depend on
//! which other sequences share the batch, up to floating-point differences:
//! padding, and for quantized weights the product path, since a batch of 64 rows
//! or more multiplies with the f32 copy of the weights ([`crate::formats::weights::DENSE_ROWS`]).
//!
//! [`DecodeBatch`] is the step-by-step interface a continuous-batching engine
//! drives: [`DecodeBatch::admit`] prefills new requests and merges them into
//! the running batch, [`DecodeBatch::step`] samples one token per sequence and
//! retires finished ones. [`generate`] runs a fixed set of requests to completion.

use std::collections::HashSet;

use candle_core::Tensor;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use crate::arch::llama::{positions_from_mask, Batch};
use crate::arch::{AnyModel, BatchCache};
use crate::error::{ModelError, Result};
pub use crate::kernels::ops::log_softmax_at;
use crate::kernels::ops::mix;

/// How to pick tokens and when to stop.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    /// Softmax temperature; 0 means greedy (argmax).
    pub temperature: f32,
    /// Keep only the k most likely tokens (`None` or 0: all).
    pub top_k: Option<usize>,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches `top_p`.
    pub top_p: f32,
    /// Seed of the random generators.
    pub seed: u64,
    /// Maximum number of generated tokens per sequence.
    pub max_new_tokens: usize,
    /// Stop as soon as the generated text contains one of these strings
    /// (the text is cut before it).
    pub stop: Vec<String>,
    /// Samples drawn per prompt (sharing one prefill).
    pub n: usize,
}

impl Default for SamplingParams {
    /// Transformers' defaults as used by the HIR sampler: temperature 1,
    /// top-k 50, top-p 1.0, 256 new tokens, one sample.
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: Some(50),
            top_p: 1.0,
            seed: 0,
            max_new_tokens: 256,
            stop: Vec::new(),
            n: 1,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding with `max_new_tokens`.
    pub fn greedy(max_new_tokens: usize) -> Self {
        Self {
            temperature: 0.0,
            top_k: None,
            max_new_tokens,
            ..Self::default()
        }
    }

    fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(ModelError::InvalidRequest(format!(
                "temperature {} must be finite and >= 0",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(ModelError::InvalidRequest(format!(
                "top_p {} must be in (0, 1]",
                self.top_p
            )));
        }
        if self.max_new_tokens == 0 {
            return Err(ModelError::InvalidRequest(
                "max_new_tokens must be at least 1".into(),
            ));
        }
        if self.n == 0 {
            return Err(ModelError::InvalidRequest("n must be at least 1".into()));
        }
        Ok(())
    }
}

/// One prompt to sample from.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationRequest {
    /// Caller's id of the request, echoed in the results.
    pub id: u64,
    /// Prompt token ids (non-empty).
    pub prompt_ids: Vec<u32>,
    /// Sampling parameters.
    pub params: SamplingParams,
}

/// Why a sequence stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FinishReason {
    /// An end-of-sequence token was sampled.
    Eos,
    /// A stop string appeared.
    Stop,
    /// `max_new_tokens` were generated.
    Length,
}

impl From<FinishReason> for hir_core::status::FinishReason {
    fn from(r: FinishReason) -> Self {
        match r {
            FinishReason::Eos => Self::Eos,
            FinishReason::Stop => Self::Stop,
            FinishReason::Length => Self::Length,
        }
    }
}

/// A finished sequence.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GeneratedSequence {
    /// The request's id.
    pub request_id: u64,
    /// Which of the request's `n` samples this is.
    pub sample_index: usize,
    /// Generated token ids, including the EOS token when `finish_reason` is `Eos`.
    pub token_ids: Vec<u32>,
    /// Decoded text without special tokens, cut before a stop string.
    pub text: String,
    /// Why generation stopped.
    pub finish_reason: FinishReason,
    /// `log p(token)` of each generated token under the model (temperature 1,
    /// before top-k/top-p filtering).
    pub logprobs: Vec<f32>,
}

/// Generation state of one sequence.
#[derive(Debug, Clone)]
struct SeqState {
    request_id: u64,
    sample_index: usize,
    params: SamplingParams,
    rng: rand::rngs::StdRng,
    tokens: Vec<u32>,
    logprobs: Vec<f32>,
    next_pos: u32,
}

/// A set of sequences decoding together, with their shared KV cache.
#[derive(Debug)]
pub struct DecodeBatch {
    seqs: Vec<SeqState>,
    /// `None` while the batch is empty.
    cache: Option<BatchCache>,
    key_mask: Vec<Vec<u8>>,
    /// Next-token logits `[B, V]` for every sequence, f32.
    logits: Option<Tensor>,
    eos: HashSet<u32>,
    pad_id: u32,
}

/// Result of prefilling a set of prompts.
#[derive(Debug)]
pub struct Prefill {
    /// The prompts' cache, `[P, ...]`, left-padded to the longest prompt.
    pub cache: BatchCache,
    /// Key padding mask of the (decoder) cache, one row per prompt.
    pub key_mask: Vec<Vec<u8>>,
    /// Logits of the next token `[P, V]` (f32).
    pub logits: Tensor,
    /// Position of the next token of each prompt.
    pub next_pos: Vec<u32>,
}

/// Runs the prompts through the model in one batch: a left-padded forward pass for a
/// decoder-only model; for T5 the encoder and the decoder start token.
pub fn prefill(model: &AnyModel, prompts: &[&[u32]], pad_id: u32) -> Result<Prefill> {
    if prompts.is_empty() || prompts.iter().any(|p| p.is_empty()) {
        return Err(ModelError::InvalidRequest(
            "prompts must be non-empty".into(),
        ));
    }
    let t = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
    if t > model.context_length() {
        return Err(ModelError::InvalidRequest(format!(
            "prompt of {t} tokens exceeds the context of {}",
            model.context_length()
        )));
    }
    let model = match model {
        AnyModel::T5(m) => {
            let (cache, logits) = m.prefill(prompts, pad_id)?;
            return Ok(Prefill {
                cache: BatchCache::T5(cache),
                key_mask: vec![vec![1u8]; prompts.len()],
                logits: logits.to_dtype(candle_core::DType::F32)?,
                next_pos: vec![1; prompts.len()],
            });
        }
        AnyModel::Llama(m) => m,
    };
    let mut ids = Vec::with_capacity(prompts.len() * t);
    let mut mask = Vec::with_capacity(prompts.len());
    for p in prompts {
        let pad = t - p.len();
        ids.extend(std::iter::repeat_n(pad_id, pad));
        ids.extend_from_slice(p);
        let mut m = vec![0u8; pad];
        m.extend(std::iter::repeat_n(1u8, p.len()));
        mask.push(m);
    }
    let input = Tensor::from_vec(ids, (prompts.len(), t), model.device())?;
    let positions = positions_from_mask(&mask);
    let mut cache = model.new_cache();
    let logits = model.forward_last(
        &Batch {
            input_ids: &input,
            key_mask: &mask,
            positions: &positions,
        },
        Some(&mut cache),
    )?;
    Ok(Prefill {
        cache: BatchCache::Llama(cache),
        key_mask: mask,
        logits: logits.to_dtype(candle_core::DType::F32)?,
        next_pos: prompts.iter().map(|p| p.len() as u32).collect(),
    })
}

impl DecodeBatch {
    /// An empty batch. `eos` ends a sequence; `pad_id` fills padding (any valid id).
    pub fn new(eos: &[u32], pad_id: u32) -> Self {
        Self {
            seqs: Vec::new(),
            cache: None,
            key_mask: Vec::new(),
            logits: None,
            eos: eos.iter().copied().collect(),
            pad_id,
        }
    }

    /// Number of running sequences.
    pub fn len(&self) -> usize {
        self.seqs.len()
    }

    /// Whether no sequence is running.
    pub fn is_empty(&self) -> bool {
        self.seqs.is_empty()
    }

    /// Cached length (including padding).
    pub fn cache_len(&self) -> usize {
        self.cache.as_ref().map_or(0, BatchCache::seq_len)
    }

    /// Prefills `requests` (each prompt once) and adds their `n` samples to the
    /// batch. `streams[i]` seeds request i's generators together with its
    /// `params.seed`: the same (seed, stream) gives the same samples.
    pub fn admit(
        &mut self,
        model: &AnyModel,
        requests: &[GenerationRequest],
        streams: &[u64],
    ) -> Result<()> {
        if requests.is_empty() {
            return Ok(());
        }
        if streams.len() != requests.len() {
            return Err(ModelError::InvalidRequest("one stream per request".into()));
        }
        for r in requests {
            r.params.validate()?;
        }
        let prompts: Vec<&[u32]> = requests.iter().map(|r| r.prompt_ids.as_slice()).collect();
        let pre = prefill(model, &prompts, self.pad_id)?;
        // Copy each prompt's cache row for its n samples.
        let mut rows = Vec::new();
        let mut new_seqs = Vec::new();
        for (i, r) in requests.iter().enumerate() {
            for j in 0..r.params.n {
                rows.push(i as u32);
                let seed = mix(mix(r.params.seed, streams[i]), j as u64);
                new_seqs.push(SeqState {
                    request_id: r.id,
                    sample_index: j,
                    params: r.params.clone(),
                    rng: rand::rngs::StdRng::seed_from_u64(seed),
                    tokens: Vec::new(),
                    logprobs: Vec::new(),
                    next_pos: pre.next_pos[i],
                });
            }
        }
        let mut cache = pre.cache.select(&rows)?;
        let mut mask: Vec<Vec<u8>> = rows
            .iter()
            .map(|&i| pre.key_mask[i as usize].clone())
            .collect();
        let logits = pre
            .logits
            .index_select(&Tensor::new(rows.as_slice(), pre.logits.device())?, 0)?;
        let current = match &self.cache {
            Some(c) if !self.seqs.is_empty() => c,
            _ => {
                self.cache = Some(cache);
                self.key_mask = mask;
                self.logits = Some(logits);
                self.seqs = new_seqs;
                return Ok(());
            }
        };
        // Left-pad the shorter cache so both have the same length; nothing changes on error.
        let (cur, new) = (current.seq_len(), cache.seq_len());
        let len = cur.max(new);
        if new < len {
            cache = cache.left_pad(len)?;
        }
        let merged = if cur < len {
            BatchCache::concat(&current.left_pad(len)?, &cache)?
        } else {
            BatchCache::concat(current, &cache)?
        };
        let old = self.logits.as_ref().expect("a non-empty batch has logits");
        let logits = Tensor::cat(&[old, &logits], 0)?;
        let pad_rows = |rows: &mut [Vec<u8>], by: usize| {
            for m in rows {
                let mut p = vec![0u8; by];
                p.extend_from_slice(m);
                *m = p;
            }
        };
        pad_rows(&mut self.key_mask, len - cur);
        pad_rows(&mut mask, len - new);
        self.cache = Some(merged);
        self.logits = Some(logits);
        self.key_mask.extend(mask);
        self.seqs.extend(new_seqs);
        Ok(())
    }

    /// Samples one token for every sequence, returns the sequences that
    /// finished, and runs the rest one step forward.
    pub fn step(
        &mut self,
        model: &AnyModel,
        tokenizer: &Tokenizer,
    ) -> Result<Vec<GeneratedSequence>> {
        let Some(logits) = self.logits.take() else {
            return Ok(Vec::new());
        };
        let rows: Vec<Vec<f32>> = logits.to_vec2()?;
        // Sampling reads the whole vocabulary for every sequence: spread the sequences over
        // the cores (each has its own generator, so the result does not depend on it).
        let picks: Vec<(u32, f32)> = {
            use rayon::prelude::*;
            self.seqs
                .par_iter_mut()
                .zip(rows.par_iter())
                .map(|(seq, row)| sample(row, &seq.params, &mut seq.rng))
                .collect()
        };
        let mut done = Vec::new();
        let mut keep = Vec::new();
        let mut next_tokens = Vec::new();
        for (i, (seq, &(tok, lp))) in self.seqs.iter_mut().zip(picks.iter()).enumerate() {
            seq.tokens.push(tok);
            seq.logprobs.push(lp);
            let finish = if self.eos.contains(&tok) {
                Some(FinishReason::Eos)
            } else {
                None
            };
            let mut text = None;
            let finish = finish.or_else(|| {
                if seq.params.stop.is_empty() {
                    return None;
                }
                let t = tokenizer.decode(&seq.tokens, true).ok()?;
                let cut = seq
                    .params
                    .stop
                    .iter()
                    .filter(|s| !s.is_empty())
                    .filter_map(|s| t.find(s.as_str()))
                    .min()?;
                text = Some(t[..cut].to_string());
                Some(FinishReason::Stop)
            });
            let finish = finish.or_else(|| {
                (seq.tokens.len() >= seq.params.max_new_tokens
                    || seq.next_pos as usize + 1 >= model.context_length())
                .then_some(FinishReason::Length)
            });
            match finish {
                Some(reason) => {
                    let text = match text {
                        Some(t) => t,
                        // The end-of-sequence token is not part of the text, even for a
                        // tokenizer that does not mark it special.
                        None => {
                            let body = match reason {
                                FinishReason::Eos => &seq.tokens[..seq.tokens.len() - 1],
                                _ => &seq.tokens[..],
                            };
                            tokenizer
                                .decode(body, true)
                                .map_err(ModelError::tokenizer)?
                        }
                    };
                    done.push((
                        i,
                        GeneratedSequence {
                            request_id: seq.request_id,
                            sample_index: seq.sample_index,
                            token_ids: seq.tokens.clone(),
                            text,
                            finish_reason: reason,
                            logprobs: seq.logprobs.clone(),
                        },
                    ));
                }
                None => {
                    keep.push(i as u32);
                    next_tokens.push(tok);
                }
            }
        }
        if !done.is_empty() {
            self.retire(&keep)?;
        }
        if self.seqs.is_empty() {
            return Ok(done.into_iter().map(|(_, s)| s).collect());
        }
        for m in &mut self.key_mask {
            m.push(1);
        }
        let positions: Vec<u32> = self.seqs.iter().map(|s| s.next_pos).collect();
        let cache = self
            .cache
            .as_mut()
            .expect("a batch with running sequences has a cache");
        let logits = model.decode_step(next_tokens, &self.key_mask, &positions, cache)?;
        for s in &mut self.seqs {
            s.next_pos += 1;
        }
        self.logits = Some(logits.to_dtype(candle_core::DType::F32)?);
        Ok(done.into_iter().map(|(_, s)| s).collect())
    }

    /// Keeps only rows `keep` and drops cache columns that became all-padding.
    fn retire(&mut self, keep: &[u32]) -> Result<()> {
        if keep.is_empty() {
            self.seqs.clear();
            self.key_mask.clear();
            self.cache = None;
            self.logits = None;
            return Ok(());
        }
        let seqs = keep
            .iter()
            .map(|&i| self.seqs[i as usize].clone())
            .collect();
        let mask: Vec<Vec<u8>> = keep
            .iter()
            .map(|&i| self.key_mask[i as usize].clone())
            .collect();
        let lead = (0..mask[0].len())
            .take_while(|&j| mask.iter().all(|m| m[j] == 0))
            .count();
        let cache = self
            .cache
            .as_ref()
            .expect("a batch with running sequences has a cache");
        self.cache = Some(cache.select(keep)?.trim_front(lead)?);
        self.key_mask = mask.into_iter().map(|m| m[lead..].to_vec()).collect();
        self.seqs = seqs;
        Ok(())
    }
}

/// Picks a token from one row of logits; returns it with its model log-probability.
pub fn sample(logits: &[f32], p: &SamplingParams, rng: &mut impl Rng) -> (u32, f32) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = max + logits.iter().map(|&l| (l - max).exp()).sum::<f32>().ln();
    if p.temperature == 0.0 {
        let (i, _) =
            logits
                .iter()
                .enumerate()
                .fold((0usize, f32::NEG_INFINITY), |(bi, bv), (i, &v)| {
                    if v > bv {
                        (i, v)
                    } else {
                        (bi, bv)
                    }
                });
        return (i as u32, logits[i] - lse);
    }
    let inv_t = 1.0 / p.temperature;
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    let by_logit = |a: &u32, b: &u32| {
        logits[*b as usize]
            .total_cmp(&logits[*a as usize])
            .then(a.cmp(b))
    };
    match p.top_k {
        Some(k) if k > 0 && k < idx.len() => {
            idx.select_nth_unstable_by(k - 1, by_logit);
            idx.truncate(k);
            idx.sort_unstable_by(by_logit);
        }
        _ => {
            if p.top_p < 1.0 {
                idx.sort_unstable_by(by_logit);
            }
        }
    }
    let top = idx
        .iter()
        .map(|&i| logits[i as usize])
        .fold(f32::NEG_INFINITY, f32::max);
    let mut probs: Vec<f32> = idx
        .iter()
        .map(|&i| ((logits[i as usize] - top) * inv_t).exp())
        .collect();
    let total: f32 = probs.iter().sum();
    if p.top_p < 1.0 {
        // idx is sorted by decreasing probability here.
        let mut acc = 0.0;
        let mut cut = probs.len();
        for (j, q) in probs.iter().enumerate() {
            acc += q / total;
            if acc >= p.top_p {
                cut = j + 1;
                break;
            }
        }
        probs.truncate(cut);
        idx.truncate(cut);
    }
    let total: f32 = probs.iter().sum();
    let mut u = rng.random::<f32>() * total;
    let mut pick = idx[idx.len() - 1];
    for (j, q) in probs.iter().enumerate() {
        if u < *q {
            pick = idx[j];
            break;
        }
        u -= q;
    }
    (pick, logits[pick as usize] - lse)
}

/// Runs `requests` to completion, at most `max_batch` prompts prefilled at a
/// time, and returns each request's samples ordered by sample index.
/// Request i uses stream i for its random generators.
pub fn generate(
    model: &AnyModel,
    tokenizer: &Tokenizer,
    eos: &[u32],
    pad_id: u32,
    requests: &[GenerationRequest],
    max_batch: usize,
) -> Result<Vec<Vec<GeneratedSequence>>> {
    let mut out: Vec<Vec<GeneratedSequence>> = vec![Vec::new(); requests.len()];
    let index: std::collections::HashMap<u64, usize> = requests
        .iter()
        .enumerate()
        .map(|(i, r)| (r.id, i))
        .collect();
    if index.len() != requests.len() {
        return Err(ModelError::InvalidRequest(
            "request ids must be unique".into(),
        ));
    }
    for (c, chunk) in requests.chunks(max_batch.max(1)).enumerate() {
        let mut batch = DecodeBatch::new(eos, pad_id);
        let base = (c * max_batch.max(1)) as u64;
        let streams: Vec<u64> = (0..chunk.len() as u64).map(|i| base + i).collect();
        batch.admit(model, chunk, &streams)?;
        while !batch.is_empty() {
            for s in batch.step(model, tokenizer)? {
                out[index[&s.request_id]].push(s);
            }
        }
    }
    for o in &mut out {
        o.sort_by_key(|s| s.sample_index);
    }
    Ok(out)
}

impl DecodeBatch {
    /// Ids of the requests that still have running sequences.
    pub fn request_ids(&self) -> HashSet<u64> {
        self.seqs.iter().map(|s| s.request_id).collect()
    }

    /// Drops every running sequence whose request id fails `keep` (a cancelled request),
    /// freeing its share of the KV cache. Returns how many sequences were dropped.
    pub fn retain_requests(&mut self, keep: impl Fn(u64) -> bool) -> Result<usize> {
        let rows: Vec<u32> = (0..self.seqs.len() as u32)
            .filter(|&i| keep(self.seqs[i as usize].request_id))
            .collect();
        let dropped = self.seqs.len() - rows.len();
        if dropped == 0 {
            return Ok(0);
        }
        if let Some(logits) = self.logits.take() {
            if !rows.is_empty() {
                self.logits =
                    Some(logits.index_select(&Tensor::new(rows.as_slice(), logits.device())?, 0)?);
            }
        }
        self.retire(&rows)?;
        Ok(dropped)
    }
}
