//! The KV cache of the decoder-only models: per layer, keys and values in
//! preallocated buffers that decode steps append to in place, plus the batch
//! surgery a continuous-batching engine needs (select rows, pad, trim, stack).

use candle_core::Tensor;

use crate::error::Result;

/// Extra positions allocated whenever a layer cache is built or grows (a cache that fills
/// up grows by at least half its length, so long generations copy it rarely). Sampling for
/// HIR asks for few new tokens (16–32 on the CPU): a larger margin would be memory that
/// every sequence of a batch holds and never uses.
const CACHE_CHUNK: usize = 32;

/// One layer's keys and values in preallocated buffers
/// `[B, kv_heads, capacity, head_dim]`, of which the first `len` positions are used.
#[derive(Debug)]
pub(crate) struct LayerKv {
    k: Tensor,
    v: Tensor,
    len: usize,
}

impl LayerKv {
    /// Copies `k`/`v` `[B, H, T, D]` into new buffers with room to grow.
    pub(crate) fn new(k: &Tensor, v: &Tensor) -> candle_core::Result<Self> {
        let (b, h, t, d) = k.dims4()?;
        let cap = t + CACHE_CHUNK;
        let kb = Tensor::zeros((b, h, cap, d), k.dtype(), k.device())?;
        let vb = Tensor::zeros((b, h, cap, d), v.dtype(), v.device())?;
        kb.slice_set(&k.contiguous()?, 2, 0)?;
        vb.slice_set(&v.contiguous()?, 2, 0)?;
        Ok(Self {
            k: kb,
            v: vb,
            len: t,
        })
    }

    pub(crate) fn views(&self) -> candle_core::Result<(Tensor, Tensor)> {
        Ok((
            self.k.narrow(2, 0, self.len)?,
            self.v.narrow(2, 0, self.len)?,
        ))
    }

    /// Writes `k`/`v` after the cached positions (in place) and returns views
    /// of everything cached.
    pub(crate) fn append(
        &mut self,
        k: &Tensor,
        v: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let t = k.dim(2)?;
        if self.len + t > self.k.dim(2)? {
            let (kv, vv) = self.views()?;
            let (b, h, _, d) = self.k.dims4()?;
            let cap = self.len + t + CACHE_CHUNK.max(self.len / 2);
            let kb = Tensor::zeros((b, h, cap, d), self.k.dtype(), self.k.device())?;
            let vb = Tensor::zeros((b, h, cap, d), self.v.dtype(), self.v.device())?;
            kb.slice_set(&kv.contiguous()?, 2, 0)?;
            vb.slice_set(&vv.contiguous()?, 2, 0)?;
            self.k = kb;
            self.v = vb;
        }
        self.k.slice_set(&k.contiguous()?, 2, self.len)?;
        self.v.slice_set(&v.contiguous()?, 2, self.len)?;
        self.len += t;
        self.views()
    }
}

/// Keys and values of every layer for one batch. Positions are appended in
/// place into preallocated buffers, so a decode step does not copy the cache.
/// Not `Clone`: the buffers are written in place.
#[derive(Debug, Default)]
pub struct KvCache {
    layers: Vec<Option<LayerKv>>,
}

impl KvCache {
    /// An empty cache for `n_layers` layers.
    pub fn new(n_layers: usize) -> Self {
        Self {
            layers: (0..n_layers).map(|_| None).collect(),
        }
    }

    pub(crate) fn layer_mut(&mut self, i: usize) -> &mut Option<LayerKv> {
        &mut self.layers[i]
    }

    /// Cached length (0 when empty).
    pub fn seq_len(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map(|l| l.len)
            .unwrap_or(0)
    }

    /// Batch size (0 when empty).
    pub fn batch_size(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map(|l| l.k.dim(0).unwrap_or(0))
            .unwrap_or(0)
    }

    fn map(&self, f: impl Fn(&Tensor) -> candle_core::Result<Tensor>) -> Result<Self> {
        let mut layers = Vec::with_capacity(self.layers.len());
        for l in &self.layers {
            layers.push(match l {
                Some(l) => {
                    let (k, v) = l.views()?;
                    Some(LayerKv::new(&f(&k)?, &f(&v)?)?)
                }
                None => None,
            });
        }
        Ok(Self { layers })
    }

    /// Keeps the rows `idx` (in that order; repeats allowed), e.g. to retire
    /// finished sequences or to copy a prompt's cache for n samples.
    pub fn select(&self, idx: &[u32]) -> Result<Self> {
        let dev = match self.layers.first().and_then(|l| l.as_ref()) {
            Some(l) => l.k.device().clone(),
            None => return Ok(Self::new(self.layers.len())),
        };
        let ids = Tensor::new(idx, &dev)?;
        self.map(|t| t.contiguous()?.index_select(&ids, 0))
    }

    /// Left-pads the cache with zeros to length `len` (padded keys must be masked).
    pub fn left_pad(&self, len: usize) -> Result<Self> {
        let cur = self.seq_len();
        let extra = len.saturating_sub(cur);
        self.map(|t| {
            if extra == 0 {
                return Ok(t.clone());
            }
            let (b, h, _, d) = t.dims4()?;
            let z = Tensor::zeros((b, h, extra, d), t.dtype(), t.device())?;
            Tensor::cat(&[&z, t], 2)
        })
    }

    /// Drops the first `n` cached positions of every row (all-padding columns).
    pub fn trim_front(&self, n: usize) -> Result<Self> {
        let len = self.seq_len();
        self.map(|t| t.narrow(2, n.min(len), len - n.min(len)))
    }

    /// Stacks caches of equal length along the batch.
    pub fn concat(caches: &[&KvCache]) -> Result<Self> {
        let n_layers = caches.first().map(|c| c.layers.len()).unwrap_or(0);
        let mut layers = Vec::with_capacity(n_layers);
        for i in 0..n_layers {
            let mut ks = Vec::new();
            let mut vs = Vec::new();
            for c in caches {
                if let Some(l) = &c.layers[i] {
                    let (k, v) = l.views()?;
                    ks.push(k);
                    vs.push(v);
                }
            }
            layers.push(if ks.is_empty() {
                None
            } else {
                Some(LayerKv::new(&Tensor::cat(&ks, 0)?, &Tensor::cat(&vs, 0)?)?)
            });
        }
        Ok(Self { layers })
    }
}
