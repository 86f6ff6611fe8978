//! Strict weight loading shared by the model files.
//!
//! Unlike a `VarMap`-backed `VarBuilder`, nothing here ever creates a weight
//! that the checkpoint lacks: a missing or mis-shaped tensor is an error that
//! names the tensor and both shapes. Tensor names are always the Hugging Face
//! names; sources with other naming (GGUF) translate them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor, Var};

use crate::error::{ModelError, Result};
use crate::kernels::ops::{fnv1a, mix, normal_values};

/// A loaded weight: dense, or quantized (GGUF).
#[derive(Debug, Clone)]
pub enum Param {
    /// A dense tensor.
    Dense(Tensor),
    /// A quantized tensor (row-major, `[out, in]` for matrices).
    Quant(Arc<QTensor>),
}

impl Param {
    /// The tensor's shape.
    pub fn dims(&self) -> Vec<usize> {
        match self {
            Param::Dense(t) => t.dims().to_vec(),
            Param::Quant(q) => q.shape().dims().to_vec(),
        }
    }
}

/// Something that hands out weights by Hugging Face name.
pub trait WeightSource: Send + Sync {
    /// Whether the source holds a tensor of that name.
    fn contains(&self, name: &str) -> bool;
    /// The tensor of that name, on `device`. Shape checks are done by the caller.
    fn get(&self, name: &str, device: &Device) -> Result<Option<Param>>;
}

/// Dense tensors held in memory.
#[derive(Debug, Default, Clone)]
pub struct MemorySource {
    tensors: HashMap<String, Tensor>,
}

impl MemorySource {
    /// A source over the given tensors.
    pub fn new(tensors: HashMap<String, Tensor>) -> Self {
        Self { tensors }
    }
}

impl WeightSource for MemorySource {
    fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
    fn get(&self, name: &str, device: &Device) -> Result<Option<Param>> {
        match self.tensors.get(name) {
            Some(t) => Ok(Some(Param::Dense(t.to_device(device)?))),
            None => Ok(None),
        }
    }
}

/// Memory-mapped `.safetensors` files (one file or a sharded set).
pub struct SafetensorsSource {
    st: candle_core::safetensors::MmapedSafetensors,
}

impl SafetensorsSource {
    /// Maps the given files.
    pub fn open(files: &[std::path::PathBuf]) -> Result<Self> {
        for f in files {
            if !f.is_file() {
                return Err(ModelError::MissingFile { path: f.clone() });
            }
        }
        // SAFETY: the files are mapped read-only; as with every mmap-based
        // loader, they must not be modified while the model is loading.
        let st = unsafe { candle_core::safetensors::MmapedSafetensors::multi(files)? };
        Ok(Self { st })
    }
}

impl WeightSource for SafetensorsSource {
    fn contains(&self, name: &str) -> bool {
        self.st.get(name).is_ok()
    }
    fn get(&self, name: &str, device: &Device) -> Result<Option<Param>> {
        if !self.contains(name) {
            return Ok(None);
        }
        Ok(Some(Param::Dense(self.st.load(name, device)?)))
    }
}

/// Deterministic random weights for tests and benchmarks: every tensor is
/// drawn from a generator seeded by `(seed, name)`, so the values do not depend
/// on the order in which tensors are requested. Norm weights (names ending in
/// `norm.weight` or `layer_norm.weight`) are ones.
#[derive(Debug, Clone)]
pub struct RandomSource {
    seed: u64,
    std: f32,
}

impl RandomSource {
    /// Normal(0, `std`) weights seeded by `seed`.
    pub fn new(seed: u64, std: f32) -> Self {
        Self { seed, std }
    }

    /// The tensor for `name` with `shape`.
    pub fn tensor(&self, name: &str, shape: &[usize], device: &Device) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        if name.ends_with("norm.weight") {
            return Ok(Tensor::ones(shape, DType::F32, device)?);
        }
        let v = normal_values(mix(self.seed, fnv1a(name.as_bytes())), n, self.std);
        Ok(Tensor::from_vec(v, shape, device)?)
    }
}

/// The empty source behind [`Weights::random`], which makes up every tensor.
pub(crate) struct NoWeights;

impl WeightSource for NoWeights {
    fn contains(&self, _name: &str) -> bool {
        false
    }
    fn get(&self, _name: &str, _device: &Device) -> Result<Option<Param>> {
        Ok(None)
    }
}

/// How weights are materialised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightMode {
    /// Dense tensors of the given dtype, no gradients.
    Dense(DType),
    /// Dense tensors of the given dtype, registered as trainable [`Var`]s.
    Trainable(DType),
    /// Hold weight matrices quantized: GGUF blocks as they are, Q4_1 and other
    /// types without a fast CPU kernel re-quantized to Q8_0, and dense matrices
    /// (a safetensors folder, F16/F32 tensors of a GGUF file) quantized to Q8_0
    /// where their width is a multiple of its 32-value blocks. Norms and
    /// embeddings are dense f32. Each quantized matrix also keeps its values
    /// dequantized to f32 for products of [`DENSE_ROWS`] rows or more (prompts,
    /// large batches): 4 more bytes per parameter for a faster prefill.
    Quantized,
    /// Keep quantized matrices in their GGUF type, even where candle has no
    /// fast CPU kernel, and no dense copy (for comparisons).
    QuantizedAsIs,
    /// Frozen weights with the values of `Dense(F32)` in the memory of the source's
    /// quantization: quantized matrices stay in their GGUF type and are dequantized to f32
    /// each time they are used (the very values `Dense(F32)` holds, so results are
    /// bit-identical), everything else is dense f32. For training adapters over a frozen
    /// base (LoRA): a product costs a dequantization more, the base a fraction of its f32
    /// size. Dense sources (safetensors folders) load as `Dense(F32)`.
    DequantizeOnUse,
}

impl WeightMode {
    /// The dtype of dense tensors.
    pub fn dtype(&self) -> DType {
        match self {
            WeightMode::Dense(d) | WeightMode::Trainable(d) => *d,
            WeightMode::Quantized | WeightMode::QuantizedAsIs | WeightMode::DequantizeOnUse => {
                DType::F32
            }
        }
    }

    /// Whether matrices stay quantized.
    pub fn is_quantized(&self) -> bool {
        matches!(self, WeightMode::Quantized | WeightMode::QuantizedAsIs)
    }
}

/// Strict weight builder: a source, a name prefix, a device and a mode.
#[derive(Clone)]
pub struct Weights {
    src: Arc<dyn WeightSource>,
    random: Option<RandomSource>,
    prefix: String,
    device: Device,
    mode: WeightMode,
    vars: Arc<Mutex<Vec<(String, Var)>>>,
}

impl Weights {
    /// A builder over `src`.
    pub fn new(src: Arc<dyn WeightSource>, device: &Device, mode: WeightMode) -> Self {
        Self {
            src,
            random: None,
            prefix: String::new(),
            device: device.clone(),
            mode,
            vars: Arc::new(Mutex::new(Vec::new())),
        }
    }

    /// A builder that makes up every tensor from a seeded generator.
    pub fn random(seed: u64, std: f32, device: &Device, mode: WeightMode) -> Self {
        let r = RandomSource::new(seed, std);
        let mut w = Self::new(Arc::new(NoWeights), device, mode);
        w.random = Some(r);
        w
    }

    /// The same builder with `name.` appended to the prefix.
    pub fn pp(&self, name: impl std::fmt::Display) -> Self {
        let mut w = self.clone();
        w.prefix = self.path(&name.to_string());
        w
    }

    fn path(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    /// The device tensors are put on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The weight mode.
    pub fn mode(&self) -> WeightMode {
        self.mode
    }

    /// Whether the source holds `name` (under the prefix). Random sources hold nothing.
    pub fn contains(&self, name: &str) -> bool {
        self.src.contains(&self.path(name))
    }

    /// The trainable variables registered so far, with their full names.
    pub fn vars(&self) -> Vec<(String, Var)> {
        self.vars
            .lock()
            .expect("var registry lock is never poisoned")
            .clone()
    }

    fn fetch(&self, name: &str, shape: &[usize]) -> Result<Param> {
        let full = self.path(name);
        if let Some(r) = &self.random {
            return Ok(Param::Dense(r.tensor(&full, shape, &self.device)?));
        }
        let p = self
            .src
            .get(&full, &self.device)?
            .ok_or_else(|| ModelError::MissingTensor {
                name: full.clone(),
                expected: shape.to_vec(),
            })?;
        let actual = p.dims();
        if actual != shape {
            return Err(ModelError::ShapeMismatch {
                name: full,
                expected: shape.to_vec(),
                actual,
            });
        }
        Ok(p)
    }

    fn finish_dense(&self, name: &str, t: Tensor) -> Result<Tensor> {
        let t = t.to_dtype(self.mode.dtype())?;
        match self.mode {
            WeightMode::Trainable(_) => {
                let var = Var::from_tensor(&t)?;
                let t = var.as_tensor().clone();
                self.vars
                    .lock()
                    .expect("var registry lock is never poisoned")
                    .push((self.path(name), var));
                Ok(t)
            }
            _ => Ok(t),
        }
    }

    /// A dense tensor (dequantized if the source is quantized).
    pub fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = match self.fetch(name, shape)? {
            Param::Dense(t) => t,
            Param::Quant(q) => q.dequantize(&self.device)?,
        };
        self.finish_dense(name, t)
    }

    /// A dense tensor that is never trained (buffers, frozen parts): same as
    /// [`Weights::tensor`] but not registered as a variable.
    pub fn frozen(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = match self.fetch(name, shape)? {
            Param::Dense(t) => t,
            Param::Quant(q) => q.dequantize(&self.device)?,
        };
        Ok(t.to_dtype(self.mode.dtype())?)
    }

    /// A linear layer `prefix.weight` `[out, in]` with optional `prefix.bias`.
    pub fn linear(
        &self,
        prefix: &str,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
    ) -> Result<Linear> {
        let w = self.pp(prefix);
        let b = if bias {
            Some(w.tensor("bias", &[out_dim])?)
        } else {
            None
        };
        let weight = w.matrix("weight", out_dim, in_dim)?;
        Ok(Linear::from_matrix(weight, b))
    }

    /// A weight matrix `[out, in]`, quantized if the mode and source allow.
    pub fn matrix(&self, name: &str, out_dim: usize, in_dim: usize) -> Result<WeightMatrix> {
        let p = self.fetch(name, &[out_dim, in_dim])?;
        match (p, self.mode) {
            (Param::Quant(q), WeightMode::Quantized) => {
                WeightMatrix::quantized(to_qtensor(q, true, &self.device)?, true)
            }
            (Param::Quant(q), WeightMode::QuantizedAsIs) => {
                WeightMatrix::quantized(to_qtensor(q, false, &self.device)?, false)
            }
            (Param::Dense(t), WeightMode::Quantized | WeightMode::QuantizedAsIs) => {
                let t = t.to_dtype(DType::F32)?;
                if in_dim % GgmlDType::Q8_0.block_size() != 0 {
                    return Ok(WeightMatrix::Dense(t));
                }
                let q = QTensor::quantize_onto(
                    &t.to_device(&Device::Cpu)?,
                    GgmlDType::Q8_0,
                    &self.device,
                )?;
                WeightMatrix::quantized(Arc::new(q), self.mode == WeightMode::Quantized)
            }
            (Param::Quant(q), WeightMode::DequantizeOnUse) => Ok(WeightMatrix::OnUse(q)),
            (Param::Quant(q), _) => {
                let t = q.dequantize(&self.device)?;
                Ok(WeightMatrix::Dense(self.finish_dense(name, t)?))
            }
            (Param::Dense(t), _) => Ok(WeightMatrix::Dense(self.finish_dense(name, t)?)),
        }
    }
}

/// A quantized matrix on `device`. With `requant`, types without a fast CPU
/// kernel (Q4_1, Q5_0, Q5_1, Q8_1) become Q8_0; otherwise the blocks are
/// copied as they are.
fn to_qtensor(q: Arc<QTensor>, requant: bool, device: &Device) -> Result<Arc<QTensor>> {
    let slow = matches!(
        q.dtype(),
        GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q5_1 | GgmlDType::Q8_1
    );
    let q = if requant && slow {
        let t = q.dequantize(&Device::Cpu)?;
        Arc::new(QTensor::quantize_onto(&t, GgmlDType::Q8_0, device)?)
    } else if device.is_cpu() {
        q
    } else {
        let storage = candle_core::quantized::QStorage::from_data(q.data()?, device, q.dtype())?;
        Arc::new(QTensor::new(storage, q.shape().clone())?)
    };
    Ok(q)
}

/// From this many rows (tokens × sequences) on, a quantized matrix with a dense copy
/// multiplies with the copy. Decoding reads the weights once per step and is bound by
/// memory, where Q8_0 wins: twice as fast as f32 at batch 1, and FLAN-T5-base decodes 32
/// sequences at 268 tokens/s against 150 when they go through the copy (2 cores). A prompt
/// is bound by arithmetic, where the f32 GEMM is 2.6 times faster than Q8_0 dot products
/// (SmolLM2: 389 against 147 prompt tokens/s).
pub const DENSE_ROWS: usize = 64;

/// A weight matrix, dense or quantized.
#[derive(Debug, Clone)]
pub enum WeightMatrix {
    /// Dense `[out, in]`.
    Dense(Tensor),
    /// Quantized `[out, in]`, with the same values dequantized to f32 for products of
    /// [`DENSE_ROWS`] rows or more, when kept.
    Quant(QMatMul, Option<Tensor>),
    /// Quantized `[out, in]`, dequantized to f32 for each product
    /// ([`WeightMode::DequantizeOnUse`]).
    OnUse(Arc<QTensor>),
}

impl WeightMatrix {
    /// A quantized matrix, with its dequantized copy when `with_dense`.
    fn quantized(q: Arc<QTensor>, with_dense: bool) -> Result<Self> {
        let dense = if with_dense {
            Some(q.dequantize(&q.device())?)
        } else {
            None
        };
        Ok(WeightMatrix::Quant(QMatMul::from_arc(q)?, dense))
    }
}

/// A low-rank update beside a layer's weight (LoRA): `y += scale · (x Aᵀ) Bᵀ`, with `A`
/// `[r, in]` and `B` `[out, r]`, as Hugging Face PEFT computes it (see the `arch::lora` module).
#[derive(Debug, Clone)]
pub struct LowRank {
    /// `lora_A`, `[r, in]`.
    pub a: Tensor,
    /// `lora_B`, `[out, r]`.
    pub b: Tensor,
    /// `lora_alpha / r` (or `/ √r` with rank-stabilised scaling).
    pub scale: f64,
}

/// `y = x W^T + b` over a dense or quantized `W`, plus a low-rank update when one is
/// attached.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: WeightMatrix,
    bias: Option<Tensor>,
    lora: Option<LowRank>,
}

/// `x Wᵀ` for a dense `W` `[out, in]` and `x` `[..., in]`.
fn dense_product(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    let dims = x.dims();
    let (rows, k) = (x.elem_count() / dims[dims.len() - 1], dims[dims.len() - 1]);
    let x = x.reshape((rows, k))?;
    let y = if crate::kernels::gemm::applies(&x, w) {
        crate::kernels::gemm::linear(&x, w)?
    } else {
        x.matmul(&w.t()?)?
    };
    let mut out = dims[..dims.len() - 1].to_vec();
    out.push(w.dim(0)?);
    y.reshape(out)
}

impl Linear {
    /// A dense layer from its parts.
    pub fn from_dense(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self::from_matrix(WeightMatrix::Dense(weight), bias)
    }

    /// A layer from a (possibly quantized) matrix.
    pub fn from_matrix(weight: WeightMatrix, bias: Option<Tensor>) -> Self {
        Self {
            weight,
            bias,
            lora: None,
        }
    }

    /// `(out, in)`: the shape of the weight.
    pub fn dims(&self) -> (usize, usize) {
        let d = match &self.weight {
            WeightMatrix::Dense(t) => t.dims().to_vec(),
            WeightMatrix::Quant(_, Some(t)) => t.dims().to_vec(),
            WeightMatrix::Quant(QMatMul::QTensor(q), None) => q.shape().dims().to_vec(),
            WeightMatrix::Quant(QMatMul::Tensor(t) | QMatMul::TensorF16(t), None) => {
                t.dims().to_vec()
            }
            WeightMatrix::OnUse(q) => q.shape().dims().to_vec(),
        };
        (d[0], d.get(1).copied().unwrap_or(1))
    }

    /// The low-rank update, if one is attached.
    pub fn lora(&self) -> Option<&LowRank> {
        self.lora.as_ref()
    }

    /// Attaches `lora` (replacing any), or removes it with `None`. The weight is shared.
    pub fn set_lora(&mut self, lora: Option<LowRank>) {
        self.lora = lora;
    }

    /// The same layer with its tensors detached from the autograd graph (shared, not
    /// copied).
    pub fn detached(&self) -> Self {
        let weight = match &self.weight {
            WeightMatrix::Dense(t) => WeightMatrix::Dense(t.detach()),
            WeightMatrix::Quant(q, d) => {
                WeightMatrix::Quant(q.clone(), d.as_ref().map(Tensor::detach))
            }
            WeightMatrix::OnUse(q) => WeightMatrix::OnUse(Arc::clone(q)),
        };
        Self {
            weight,
            bias: self.bias.as_ref().map(Tensor::detach),
            lora: self.lora.as_ref().map(|l| LowRank {
                a: l.a.detach(),
                b: l.b.detach(),
                scale: l.scale,
            }),
        }
    }

    /// The bias, if any.
    pub fn bias_tensor(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// The dense weight, if the layer is dense.
    pub fn dense_weight(&self) -> Option<&Tensor> {
        match &self.weight {
            WeightMatrix::Dense(t) => Some(t),
            WeightMatrix::Quant(..) | WeightMatrix::OnUse(_) => None,
        }
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let rows = x.elem_count() / x.dims().last().copied().unwrap_or(1).max(1);
        let y = match &self.weight {
            WeightMatrix::Dense(w) => dense_product(x, w)?,
            WeightMatrix::Quant(_, Some(w)) if rows >= DENSE_ROWS => dense_product(x, w)?,
            WeightMatrix::Quant(q, _) => q.forward(&x.contiguous()?)?,
            WeightMatrix::OnUse(q) => dense_product(x, &q.dequantize(&q.device())?)?,
        };
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        match &self.lora {
            Some(l) => {
                let x = x.to_dtype(l.a.dtype())?;
                let update = dense_product(&dense_product(&x, &l.a)?, &l.b)?;
                let update = update.affine(l.scale, 0.0)?.to_dtype(y.dtype())?;
                y + update
            }
            None => Ok(y),
        }
    }
}
