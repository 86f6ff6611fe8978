//! The sampling state of T5 and the passes that fill it: [`T5Cache`] (the decoder's KV
//! cache and the encoded prompts' cross-attention keys and values, held once per prompt),
//! [`Model::prefill`], which encodes the prompts, and [`Model::decode_step`], which runs
//! one decoder token per sequence against the cache.

use candle_core::{Module, Tensor};

use super::layers::{mask_bias, relative_position_bucket, t5_norm};
use super::Model;
use crate::arch::kv_cache::{KvCache, LayerKv};
use crate::error::{ModelError, Result};

/// The sampling state of a batch of T5 sequences: the decoder's self-attention KV cache (a
/// row per sequence), and each decoder layer's cross-attention keys and values over the
/// encoded prompts with the prompts' padding mask (a row per *group*). A group is a run of
/// consecutive sequences that share one encoded prompt (the `n` samples of a request), so
/// the cross-attention cache is held once per prompt, not once per sample.
#[derive(Debug)]
pub struct T5Cache {
    pub(super) self_kv: KvCache,
    /// Per decoder layer, keys and values `[G, H, Ts, d_kv]` of the encoder output.
    pub(super) cross: Vec<(Tensor, Tensor)>,
    /// Padding mask of each group's encoder input, `[G][Ts]`.
    pub(super) enc_mask: Vec<Vec<u8>>,
    /// Sequences per group, in row order: group g covers the next `group_len[g]` rows.
    pub(super) group_len: Vec<usize>,
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
}

impl Model {
    /// An empty sampling cache.
    pub fn new_cache(&self) -> T5Cache {
        T5Cache {
            self_kv: KvCache::new(self.cfg.decoder_layers()),
            cross: Vec::new(),
            enc_mask: Vec::new(),
            group_len: Vec::new(),
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
            let (k, v) = &cache.cross[i];
            x = (&x + attn.attend_grouped(&q, k, v, &cache.group_len, &cross_bias)?)?;
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
}
