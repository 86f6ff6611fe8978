//! [`LoadedModel`]: a model, its tokenizer and metadata, loaded from disk.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{Device, Var};
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;

use crate::arch::llama::gguf::{GgufFile, GgufSource};
use crate::arch::llama::{self, Config};
use crate::arch::lora::{self, Adapter, LoraConfig};
use crate::arch::t5;
use crate::arch::AnyModel;
use crate::error::{ModelError, Result};
use crate::formats::checkpoint::Manifest;
use crate::formats::hf_folder::HfFolder;
use crate::formats::weights::{WeightMode, Weights};
use crate::sampling::{generate, GeneratedSequence, GenerationRequest, SamplingParams};
use crate::train::{AdamWConfig, Optimizer};

/// What a loaded model is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    /// `model_type` (`llama`, `qwen2`, `t5`).
    pub architecture: String,
    /// Number of parameters.
    pub parameters: usize,
    /// How the weights are held: `f32`, `bf16`, or `quantized`.
    pub dtype: String,
    /// Vocabulary size of the model.
    pub vocab_size: usize,
    /// Context length (for T5, the longest encoder input).
    pub context_length: usize,
    /// End-of-sequence token ids.
    pub eos_token_ids: Vec<u32>,
    /// Where it was loaded from.
    pub source: PathBuf,
}

/// A Llama-family or T5 model with its tokenizer, ready to generate or train.
#[derive(Debug)]
pub struct LoadedModel {
    model: AnyModel,
    tokenizer: Arc<Tokenizer>,
    info: ModelInfo,
    pad_id: u32,
    vars: Vec<(String, Var)>,
    chat_system: Option<String>,
    chatml: bool,
    chat_template: Option<String>,
    lora: Option<TrainedAdapter>,
}

/// What a model training LoRA adapters saves: the adapter and the base it belongs to.
#[derive(Debug, Clone)]
struct TrainedAdapter {
    config: LoraConfig,
    base_model: String,
    base_model_sha256: String,
}

impl LoadedModel {
    /// Loads a model from a Hugging Face folder (`config.json`,
    /// `model.safetensors` or a sharded index, `tokenizer.json`) or a `.gguf` file.
    ///
    /// With `WeightMode::Quantized` a folder's weight matrices are quantized to Q8_0.
    /// A folder whose `config.json` says `"model_type": "t5"` loads FLAN-T5.
    pub fn load(path: &Path, device: &Device, mode: WeightMode) -> Result<Self> {
        if path.is_dir() {
            Self::load_hf(path, device, mode)
        } else if path.extension().is_some_and(|e| e == "gguf") {
            Self::load_gguf(path, device, mode)
        } else if path.exists() {
            Err(ModelError::InvalidConfig(format!(
                "{}: expected a model folder or a .gguf file",
                path.display()
            )))
        } else {
            Err(ModelError::MissingFile {
                path: path.to_path_buf(),
            })
        }
    }

    fn load_hf(dir: &Path, device: &Device, mode: WeightMode) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        if !cfg_path.is_file() {
            return Err(ModelError::MissingFile { path: cfg_path });
        }
        let folder = HfFolder::open(dir)?;
        match folder.model_type() {
            "t5" => Self::load_t5(&folder, device, mode),
            "llama" | "qwen2" => Self::load_llama(&folder, device, mode),
            other => Err(ModelError::UnsupportedArchitecture(other.to_string())),
        }
    }

    fn load_llama(folder: &HfFolder, device: &Device, mode: WeightMode) -> Result<Self> {
        let cfg: Config = folder.config()?;
        cfg.validate()?;
        let tokenizer = folder.tokenizer()?.ok_or_else(|| ModelError::MissingFile {
            path: folder.tokenizer_path(),
        })?;
        let w = folder.weights(device, mode)?;
        let model = llama::Model::new(&cfg, &w)?;
        let mut eos = cfg.eos_ids();
        if let Some(gen) = folder.optional_json("generation_config.json") {
            if let Some(e) = gen.get("eos_token_id") {
                let extra: Vec<u32> = match e {
                    serde_json::Value::Number(n) => {
                        n.as_u64().map(|v| v as u32).into_iter().collect()
                    }
                    serde_json::Value::Array(a) => a
                        .iter()
                        .filter_map(|v| v.as_u64())
                        .map(|v| v as u32)
                        .collect(),
                    _ => Vec::new(),
                };
                for x in extra {
                    if !eos.contains(&x) {
                        eos.push(x);
                    }
                }
            }
        }
        let chat = folder.optional_json("tokenizer_config.json").and_then(|v| {
            v.get("chat_template")
                .and_then(|t| t.as_str())
                .map(str::to_string)
        });
        Self::decoder_only(model, tokenizer, &w, eos, chat, folder.dir(), false)
    }

    fn load_t5(folder: &HfFolder, device: &Device, mode: WeightMode) -> Result<Self> {
        let tok_path = folder.tokenizer_path();
        if !tok_path.is_file() {
            return Err(ModelError::MissingFile { path: tok_path });
        }
        let t5::LoadedT5 {
            model,
            tokenizer,
            vars,
        } = t5::load::from_folder(folder, device, mode)?;
        let tokenizer = tokenizer.ok_or(ModelError::MissingFile { path: tok_path })?;
        let cfg = model.config();
        let (eos, pad) = (vec![cfg.eos_token_id], cfg.pad_token_id);
        Self::assemble(
            model.into(),
            tokenizer,
            vars,
            mode,
            (eos, pad),
            None,
            folder.dir(),
            false,
        )
    }

    fn load_gguf(path: &Path, device: &Device, mode: WeightMode) -> Result<Self> {
        let file = Arc::new(GgufFile::read(path)?);
        let cfg = file.llama_config()?;
        cfg.validate()?;
        let tokenizer = file.tokenizer()?;
        let n_tok = tokenizer.get_vocab_size(true);
        if n_tok != cfg.vocab_size {
            return Err(ModelError::TokenizerMismatch(format!(
                "GGUF tokenizer has {n_tok} tokens, the embedding has {} rows",
                cfg.vocab_size
            )));
        }
        let src = GgufSource::new(file.clone(), &cfg, mode.is_quantized());
        let w = Weights::new(Arc::new(src), device, mode);
        let model = llama::Model::new(&cfg, &w)?;
        let eos: Vec<u32> = file.eos_token_id().into_iter().collect();
        Self::decoder_only(model, tokenizer, &w, eos, file.chat_template(), path, true)
    }

    /// A decoder-only model pads with its first EOS id.
    fn decoder_only(
        model: llama::Model,
        tokenizer: Tokenizer,
        w: &Weights,
        eos: Vec<u32>,
        chat_template: Option<String>,
        source: &Path,
        exact_vocab: bool,
    ) -> Result<Self> {
        let pad = eos.first().copied().unwrap_or(0);
        Self::assemble(
            model.into(),
            tokenizer,
            w.vars(),
            w.mode(),
            (eos, pad),
            chat_template,
            source,
            exact_vocab,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn assemble(
        model: AnyModel,
        tokenizer: Tokenizer,
        vars: Vec<(String, Var)>,
        mode: WeightMode,
        (eos, pad_id): (Vec<u32>, u32),
        chat_template: Option<String>,
        source: &Path,
        exact_vocab: bool,
    ) -> Result<Self> {
        let vocab_size = model.vocab_size();
        let n_tok = tokenizer.get_vocab_size(true);
        if n_tok > vocab_size || (exact_vocab && n_tok != vocab_size) {
            return Err(ModelError::TokenizerMismatch(format!(
                "tokenizer has {n_tok} tokens, the model's vocabulary is {vocab_size}"
            )));
        }
        if let Some(bad) = eos
            .iter()
            .chain([&pad_id])
            .find(|&&e| e as usize >= vocab_size)
        {
            return Err(ModelError::TokenizerMismatch(format!(
                "EOS or padding id {bad} is outside the vocabulary"
            )));
        }
        let dtype = match mode {
            WeightMode::Quantized | WeightMode::QuantizedAsIs => "quantized".to_string(),
            m => format!("{:?}", m.dtype()).to_lowercase(),
        };
        let parameters = match &model {
            AnyModel::Llama(m) => m.config().num_parameters(),
            AnyModel::T5(m) => m.num_parameters(),
        };
        let info = ModelInfo {
            architecture: model.architecture().to_string(),
            parameters,
            dtype,
            vocab_size,
            context_length: model.context_length(),
            eos_token_ids: eos,
            source: source.to_path_buf(),
        };
        let (chatml, chat_system) = match &chat_template {
            Some(t) if t.contains("<|im_start|>") => (true, default_system_prompt(t)),
            _ => (false, None),
        };
        Ok(Self {
            model,
            tokenizer: Arc::new(tokenizer),
            info,
            pad_id,
            vars,
            chat_system,
            chatml,
            chat_template,
            lora: None,
        })
    }

    /// Loads `path` (as [`LoadedModel::load`]) with its weights frozen and trainable LoRA
    /// adapters beside the projections `cfg` targets: the adapters are the only
    /// variables. They start from the adapter folder `resume` when given (a snapshot),
    /// else from PEFT's initialisation under `seed`. Llama-family models only.
    pub fn load_lora(
        path: &Path,
        device: &Device,
        dtype: candle_core::DType,
        cfg: &LoraConfig,
        resume: Option<&Path>,
        seed: u64,
    ) -> Result<Self> {
        // The base is frozen: in f32, its quantized matrices stay as the file has them and
        // are dequantized as they are used (the same values, a fraction of the memory).
        let mode = if dtype == candle_core::DType::F32 {
            WeightMode::DequantizeOnUse
        } else {
            WeightMode::Dense(dtype)
        };
        let mut loaded = Self::load(path, device, mode)?;
        let AnyModel::Llama(model) = &mut loaded.model else {
            return Err(ModelError::InvalidAdapter {
                field: "lora_rank".into(),
                reason: format!(
                    "LoRA adapters are trained on Llama-family models; this model is {}",
                    loaded.info.architecture
                ),
            });
        };
        let base_model_sha256 = crate::formats::checkpoint::model_digest(path)?;
        let from = match resume {
            Some(dir) => {
                let a = Adapter::read(dir, device)?;
                a.check_base(&base_model_sha256)?;
                Some(a)
            }
            None => None,
        };
        loaded.vars = lora::attach_trainable(model, cfg, from.as_ref(), seed)?;
        loaded.lora = Some(TrainedAdapter {
            config: cfg.clone(),
            base_model: path.to_string_lossy().into_owned(),
            base_model_sha256,
        });
        Ok(loaded)
    }

    /// This model with `adapter` beside its weights in place of any it had (the weights
    /// and tokenizer are shared, not copied): what a generator serves after swapping in an
    /// adapter. Llama-family models only.
    pub fn with_adapter(&self, adapter: &Adapter, source: &Path) -> Result<Self> {
        let AnyModel::Llama(base) = &self.model else {
            return Err(ModelError::InvalidAdapter {
                field: lora::ADAPTER_CONFIG.into(),
                reason: format!(
                    "LoRA adapters apply to Llama-family models; the served model is {}",
                    self.info.architecture
                ),
            });
        };
        Ok(Self {
            model: AnyModel::Llama(adapter.apply(base)?),
            tokenizer: Arc::clone(&self.tokenizer),
            info: ModelInfo {
                source: source.to_path_buf(),
                ..self.info.clone()
            },
            pad_id: self.pad_id,
            vars: Vec::new(),
            chat_system: self.chat_system.clone(),
            chatml: self.chatml,
            chat_template: self.chat_template.clone(),
            lora: None,
        })
    }

    /// The number of decoder layers of a Llama-family model (what an adapter must cover).
    pub fn num_layers(&self) -> Option<usize> {
        match &self.model {
            AnyModel::Llama(m) => Some(m.num_layers()),
            AnyModel::T5(_) => None,
        }
    }

    /// Whether the model trains LoRA adapters (and saves them, not its weights).
    pub fn trains_adapters(&self) -> bool {
        self.lora.is_some()
    }

    /// Wraps an already built model and tokenizer (tests, checkpoints). A T5 model pads
    /// with its config's `pad_token_id`, a decoder-only one with the first EOS id.
    pub fn from_parts(
        model: impl Into<AnyModel>,
        tokenizer: Tokenizer,
        vars: Vec<(String, Var)>,
        eos: Vec<u32>,
    ) -> Result<Self> {
        let model = model.into();
        let pad = match &model {
            AnyModel::T5(m) => m.config().pad_token_id,
            AnyModel::Llama(_) => eos.first().copied().unwrap_or(0),
        };
        let mode = if vars.is_empty() {
            WeightMode::Dense(model.dtype())
        } else {
            WeightMode::Trainable(model.dtype())
        };
        Self::assemble(
            model,
            tokenizer,
            vars,
            mode,
            (eos, pad),
            None,
            Path::new(""),
            false,
        )
    }

    /// The model itself, dropping the tokenizer.
    pub fn into_model(self) -> AnyModel {
        self.model
    }

    /// The chat template (Jinja source), if the model has one.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// Architecture, size, dtype, vocabulary and context.
    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The model.
    pub fn model(&self) -> &AnyModel {
        &self.model
    }

    /// The model, to change its training mode.
    pub fn model_mut(&mut self) -> &mut AnyModel {
        &mut self.model
    }

    /// Trainable variables with their Hugging Face names (empty unless loaded
    /// with [`WeightMode::Trainable`]).
    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    /// End-of-sequence ids.
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.info.eos_token_ids
    }

    /// Token id used to pad batches: T5's `pad_token_id`, else the first EOS id (or 0).
    pub fn pad_token_id(&self) -> u32 {
        self.pad_id
    }

    /// Tokenizes `text`, special tokens in the text included, without adding any.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self
            .tokenizer
            .encode(text, false)
            .map_err(ModelError::tokenizer)?
            .get_ids()
            .to_vec())
    }

    /// Tokenizes a prompt for generation. T5's encoder input ends with EOS, as its
    /// tokenizer adds; a decoder-only prompt is [`LoadedModel::encode`]'s.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = self.encode(text)?;
        if self.model.is_encoder_decoder() {
            let eos = self.info.eos_token_ids.first().copied();
            if let Some(eos) = eos.filter(|e| ids.last() != Some(e)) {
                ids.push(eos);
            }
        }
        Ok(ids)
    }

    /// Decodes ids, skipping special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, true)
            .map_err(ModelError::tokenizer)
    }

    /// A single-turn user prompt under the model's chat template (ChatML for
    /// SmolLM2 and Qwen2, with the template's default system prompt), or the
    /// text unchanged when the model has no chat template.
    pub fn chat_prompt(&self, user: &str) -> String {
        if !self.chatml {
            return user.to_string();
        }
        let mut s = String::new();
        if let Some(sys) = &self.chat_system {
            s.push_str(&format!("<|im_start|>system\n{sys}<|im_end|>\n"));
        }
        s.push_str(&format!(
            "<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
        ));
        s
    }

    /// An optimizer (AdamW, accumulation, clipping) over the model's variables;
    /// the model must have been loaded with [`WeightMode::Trainable`].
    pub fn optimizer(
        &self,
        cfg: AdamWConfig,
        accumulation_steps: usize,
        max_grad_norm: Option<f64>,
    ) -> Result<Optimizer> {
        if self.vars.is_empty() {
            return Err(ModelError::InvalidRequest(
                "the model has no trainable variables; load it with WeightMode::Trainable".into(),
            ));
        }
        Ok(Optimizer::new(
            &self.vars,
            cfg,
            accumulation_steps,
            max_grad_norm,
        ))
    }

    /// Saves the model in Hugging Face layout with a manifest. Weights are
    /// written in their current dtype; quantized models cannot be saved. A model training
    /// LoRA adapters saves them instead, as a PEFT folder ([`lora::write_adapter`]).
    pub fn save(&self, dir: &Path) -> Result<Manifest> {
        if let Some(t) = &self.lora {
            return lora::write_adapter(
                dir,
                &t.config,
                &self.vars,
                &t.base_model,
                &t.base_model_sha256,
            );
        }
        match &self.model {
            AnyModel::T5(m) => m.save(dir, Some(self.tokenizer.as_ref())),
            AnyModel::Llama(m) => llama::save(
                m,
                dir,
                self.eos_token_ids(),
                &self.tokenizer,
                self.chat_template(),
            ),
        }
    }

    /// Samples from text prompts (all with the same parameters); request i is
    /// seeded with stream i.
    pub fn generate_text(
        &self,
        prompts: &[String],
        params: &SamplingParams,
    ) -> Result<Vec<Vec<GeneratedSequence>>> {
        let requests = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| {
                Ok(GenerationRequest {
                    id: i as u64,
                    prompt_ids: self.encode_prompt(p)?,
                    params: params.clone(),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        self.generate(&requests, 64)
    }

    /// Samples from tokenized requests, at most `max_batch` prompts at a time.
    pub fn generate(
        &self,
        requests: &[GenerationRequest],
        max_batch: usize,
    ) -> Result<Vec<Vec<GeneratedSequence>>> {
        generate(
            &self.model,
            &self.tokenizer,
            &self.info.eos_token_ids,
            self.pad_token_id(),
            requests,
            max_batch,
        )
    }
}

/// The literal default system prompt of a ChatML Jinja template, if it has one.
fn default_system_prompt(template: &str) -> Option<String> {
    // The newline may be a real one (GGUF metadata) or a Jinja escape (tokenizer_config.json).
    let i = ["<|im_start|>system\n", "<|im_start|>system\\n"]
        .iter()
        .find_map(|start| template.find(start).map(|i| i + start.len()))?;
    let rest = &template[i..];
    let end = rest.find("<|im_end|>")?;
    let s = &rest[..end];
    // A template that inserts a variable here has no literal default.
    if s.contains("{{") || s.contains('\'') && s.contains('+') {
        return None;
    }
    Some(s.replace("\\n", "\n"))
}

#[cfg(test)]
mod tests {
    use super::default_system_prompt;

    #[test]
    fn default_system_prompt_is_read_from_a_chatml_template() {
        let t = "{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}{% endif %}";
        assert_eq!(
            default_system_prompt(t).as_deref(),
            Some("You are a helpful AI assistant named SmolLM, trained by Hugging Face")
        );
        assert_eq!(
            default_system_prompt("{{ '<|im_start|>system\\n' + m + '<|im_end|>' }}"),
            None
        );
    }
}
