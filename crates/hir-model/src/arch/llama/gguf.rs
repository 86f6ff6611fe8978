//! Loading Llama-family models from GGUF files (llama.cpp's format).
//!
//! Tensors are renamed to their Hugging Face names, and llama.cpp's row
//! permutation of the q/k projections (done by its converter so that its
//! interleaved RoPE matches) is undone, so one model file serves both formats.
//! The tokenizer is rebuilt from the `tokenizer.ggml.*` metadata.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, Tokenizer};

use crate::arch::llama::Config;
use crate::error::{ModelError, Result};
use crate::formats::weights::{Param, WeightSource};

/// A parsed GGUF file: metadata plus all tensors, still quantized.
pub struct GgufFile {
    metadata: HashMap<String, gguf_file::Value>,
    /// Every tensor's shape, from the header.
    shapes: HashMap<String, Vec<usize>>,
    /// The tensors, unless only the header was read.
    tensors: HashMap<String, Arc<QTensor>>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("metadata_keys", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile {
    /// Reads the whole file. Unknown quantization types are reported by name.
    pub fn read(path: &Path) -> Result<Self> {
        Self::read_with(path, true)
    }

    /// Reads the header only: the metadata, no tensor.
    pub fn read_header(path: &Path) -> Result<Self> {
        Self::read_with(path, false)
    }

    fn read_with(path: &Path, tensors_too: bool) -> Result<Self> {
        let mut f = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
        let content = gguf_file::Content::read(&mut f).map_err(|e| {
            ModelError::InvalidConfig(format!("{}: not a readable GGUF file: {e}", path.display()))
        })?;
        let shapes = content
            .tensor_infos
            .iter()
            .map(|(name, info)| (name.clone(), info.shape.dims().to_vec()))
            .collect();
        let mut tensors = HashMap::new();
        if !tensors_too {
            return Ok(Self {
                metadata: content.metadata,
                shapes,
                tensors,
            });
        }
        for (name, info) in &content.tensor_infos {
            check_dtype(name, info.ggml_dtype)?;
            let q = info.read(&mut f, content.tensor_data_offset, &Device::Cpu)?;
            tensors.insert(name.clone(), Arc::new(q));
        }
        Ok(Self {
            metadata: content.metadata,
            shapes,
            tensors,
        })
    }

    /// A metadata value.
    pub fn get(&self, key: &str) -> Result<&gguf_file::Value> {
        self.metadata
            .get(key)
            .ok_or_else(|| ModelError::GgufMetadata {
                key: key.into(),
                reason: "missing".into(),
            })
    }

    fn u64(&self, key: &str) -> Result<u64> {
        let v = self.get(key)?;
        v.to_u64()
            .or_else(|_| v.to_u32().map(u64::from))
            .or_else(|_| v.to_i32().map(|x| x as u64))
            .map_err(|e| ModelError::GgufMetadata {
                key: key.into(),
                reason: e.to_string(),
            })
    }

    fn f64(&self, key: &str) -> Result<f64> {
        let v = self.get(key)?;
        v.to_f32()
            .map(f64::from)
            .or_else(|_| v.to_f64())
            .map_err(|e| ModelError::GgufMetadata {
                key: key.into(),
                reason: e.to_string(),
            })
    }

    fn string(&self, key: &str) -> Result<&str> {
        self.get(key)?
            .to_string()
            .map(|s| s.as_str())
            .map_err(|e| ModelError::GgufMetadata {
                key: key.into(),
                reason: e.to_string(),
            })
    }

    /// The quantization of a tensor (GGUF name).
    pub fn tensor_dtype(&self, gguf_name: &str) -> Option<GgmlDType> {
        self.tensors.get(gguf_name).map(|t| t.dtype())
    }

    /// The equivalent Hugging Face `config.json`.
    pub fn llama_config(&self) -> Result<Config> {
        let arch = self.string("general.architecture")?.to_string();
        if arch != "llama" && arch != "qwen2" {
            return Err(ModelError::UnsupportedArchitecture(arch));
        }
        let k = |s: &str| format!("{arch}.{s}");
        let n_heads = self.u64(&k("attention.head_count"))? as usize;
        let n_kv = self
            .u64(&k("attention.head_count_kv"))
            .map(|v| v as usize)
            .unwrap_or(n_heads);
        let hidden = self.u64(&k("embedding_length"))? as usize;
        let emb =
            self.shapes
                .get("token_embd.weight")
                .ok_or_else(|| ModelError::MissingTensor {
                    name: "token_embd.weight".into(),
                    expected: vec![0, hidden],
                })?;
        let vocab = emb[0];
        let head_dim = self
            .u64(&k("attention.key_length"))
            .map(|v| v as usize)
            .unwrap_or(hidden / n_heads);
        let eos = self.u64("tokenizer.ggml.eos_token_id").ok();
        let bos = self.u64("tokenizer.ggml.bos_token_id").ok();
        let cfg = serde_json::json!({
            "model_type": arch,
            "vocab_size": vocab,
            "hidden_size": hidden,
            "intermediate_size": self.u64(&k("feed_forward_length"))?,
            "num_hidden_layers": self.u64(&k("block_count"))?,
            "num_attention_heads": n_heads,
            "num_key_value_heads": n_kv,
            "head_dim": head_dim,
            "rms_norm_eps": self.f64(&k("attention.layer_norm_rms_epsilon"))?,
            "rope_theta": self.f64(&k("rope.freq_base")).unwrap_or(10_000.0),
            "max_position_embeddings": self.u64(&k("context_length")).unwrap_or(2048),
            "tie_word_embeddings": !self.shapes.contains_key("output.weight"),
            "attention_bias": self.shapes.contains_key("blk.0.attn_q.bias"),
            "bos_token_id": bos,
            "eos_token_id": eos,
        });
        serde_json::from_value(cfg).map_err(|e| ModelError::InvalidConfig(e.to_string()))
    }

    /// The tokenizer described by `tokenizer.ggml.*` (GPT-2 style byte-level BPE).
    pub fn tokenizer(&self) -> Result<Tokenizer> {
        let model = self.string("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(ModelError::Tokenizer(format!(
                "GGUF tokenizer model {model:?} is not supported (only gpt2 byte-level BPE)"
            )));
        }
        let tokens = self.string_list("tokenizer.ggml.tokens")?;
        let merges = self.string_list("tokenizer.ggml.merges")?;
        let types: Vec<i32> = match self.metadata.get("tokenizer.ggml.token_type") {
            Some(v) => v
                .to_vec()
                .map_err(|e| ModelError::GgufMetadata {
                    key: "tokenizer.ggml.token_type".into(),
                    reason: e.to_string(),
                })?
                .iter()
                .map(|x| x.to_i32().unwrap_or(1))
                .collect(),
            None => vec![1; tokens.len()],
        };
        let vocab: tokenizers::models::bpe::Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.to_string(), i as u32))
            .collect();
        let merges: Vec<(String, String)> = merges
            .iter()
            .filter_map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
            })
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(ModelError::tokenizer)?;
        let mut tok = Tokenizer::new(bpe);
        let pre = self
            .string("tokenizer.ggml.pre")
            .unwrap_or("default")
            .to_string();
        let byte_level = ByteLevel::new(false, true, true);
        // StarCoder-family vocabularies (SmolLM) split digits one by one first.
        if matches!(
            pre.as_str(),
            "smollm" | "starcoder" | "refact" | "codeshell"
        ) {
            tok.with_pre_tokenizer(Some(Sequence::new(vec![
                Digits::new(true).into(),
                byte_level.into(),
            ])));
        } else {
            tok.with_pre_tokenizer(Some(byte_level));
        }
        tok.with_decoder(Some(ByteLevel::default()));
        // Control (3) and user-defined (4) tokens match as whole strings.
        let special: Vec<AddedToken> = tokens
            .iter()
            .zip(types.iter())
            .filter(|(_, t)| **t == 3 || **t == 4)
            .map(|(s, t)| AddedToken::from(s.to_string(), *t == 3))
            .collect();
        tok.add_special_tokens(special)
            .map_err(ModelError::tokenizer)?;
        Ok(tok)
    }

    fn string_list(&self, key: &str) -> Result<Vec<&str>> {
        let err = |reason: String| ModelError::GgufMetadata {
            key: key.into(),
            reason,
        };
        self.get(key)?
            .to_vec()
            .map_err(|e| err(e.to_string()))?
            .iter()
            .map(|v| {
                v.to_string()
                    .map(|s| s.as_str())
                    .map_err(|e| err(e.to_string()))
            })
            .collect()
    }

    /// End-of-sequence id from `tokenizer.ggml.eos_token_id`.
    pub fn eos_token_id(&self) -> Option<u32> {
        self.u64("tokenizer.ggml.eos_token_id")
            .ok()
            .map(|v| v as u32)
    }

    /// The chat template (`tokenizer.chat_template`), if any.
    pub fn chat_template(&self) -> Option<String> {
        self.string("tokenizer.chat_template")
            .ok()
            .map(str::to_string)
    }
}

fn check_dtype(name: &str, dtype: GgmlDType) -> Result<()> {
    use GgmlDType::*;
    match dtype {
        F32 | F16 | BF16 | Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 | Q2K | Q3K | Q4K | Q5K | Q6K | Q8K => {
            Ok(())
        }
        #[allow(unreachable_patterns)]
        other => Err(ModelError::UnsupportedQuantization {
            name: name.into(),
            dtype: format!("{other:?}"),
        }),
    }
}

/// Maps a Hugging Face Llama tensor name to its GGUF name.
pub fn gguf_name(hf: &str) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (idx, rest) = rest.split_once('.')?;
    let (module, kind) = rest.rsplit_once('.')?;
    let g = match module {
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        _ => return None,
    };
    Some(format!("blk.{idx}.{g}.{kind}"))
}

/// Undoes llama.cpp's q/k permutation of the rows of a `[heads * head_dim, ...]` tensor.
pub fn unpermute_rows(t: &Tensor, n_head: usize) -> candle_core::Result<Tensor> {
    let dims = t.dims().to_vec();
    let rows = dims[0];
    let rest: usize = dims[1..].iter().product();
    let half = rows / n_head / 2;
    t.reshape((n_head, half, 2, rest))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)
}

/// A [`WeightSource`] over a GGUF file, answering to Hugging Face names.
pub struct GgufSource {
    file: Arc<GgufFile>,
    n_head: usize,
    n_kv: usize,
    keep_quantized: bool,
    permuted: bool,
}

impl GgufSource {
    /// A source over `file`. With `keep_quantized`, q/k matrices are
    /// re-quantized to Q8_0 after un-permuting; otherwise they are dense f32.
    pub fn new(file: Arc<GgufFile>, cfg: &Config, keep_quantized: bool) -> Self {
        Self {
            file,
            n_head: cfg.num_attention_heads,
            n_kv: cfg.kv_heads(),
            keep_quantized,
            // llama.cpp permutes q/k only for the Llama architecture.
            permuted: cfg.model_type == "llama",
        }
    }
}

impl WeightSource for GgufSource {
    fn contains(&self, name: &str) -> bool {
        gguf_name(name).is_some_and(|g| self.file.tensors.contains_key(&g))
    }

    fn get(&self, name: &str, device: &Device) -> Result<Option<Param>> {
        let Some(g) = gguf_name(name) else {
            return Ok(None);
        };
        let Some(q) = self.file.tensors.get(&g) else {
            return Ok(None);
        };
        let heads = if !self.permuted {
            None
        } else if g.ends_with("attn_q.weight") || g.ends_with("attn_q.bias") {
            Some(self.n_head)
        } else if g.ends_with("attn_k.weight") || g.ends_with("attn_k.bias") {
            Some(self.n_kv)
        } else {
            None
        };
        let is_float = matches!(q.dtype(), GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16);
        match heads {
            None if is_float || q.shape().rank() == 1 => {
                Ok(Some(Param::Dense(q.dequantize(device)?)))
            }
            None => Ok(Some(Param::Quant(q.clone()))),
            Some(h) => {
                // Un-permute on the host; quantized results move to the device later.
                let t = unpermute_rows(&q.dequantize(&Device::Cpu)?, h)?;
                if self.keep_quantized && !is_float && t.rank() == 2 {
                    Ok(Some(Param::Quant(Arc::new(QTensor::quantize(
                        &t,
                        GgmlDType::Q8_0,
                    )?))))
                } else {
                    Ok(Some(Param::Dense(t.to_device(device)?)))
                }
            }
        }
    }
}
