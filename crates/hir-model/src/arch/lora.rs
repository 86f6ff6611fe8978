//! LoRA adapters (Hu et al., 2021) for Llama-family models, in Hugging Face PEFT's format.
//!
//! A targeted projection `y = x Wᵀ` becomes `y = x Wᵀ + s · (x Aᵀ) Bᵀ` with `A` `[r, in]`,
//! `B` `[out, r]` and `s = lora_alpha / r` (or `lora_alpha / √r` with `use_rslora`), as PEFT
//! computes it; `W` stays frozen and shared. Training starts, as PEFT's default, from `A`
//! drawn uniformly in `±1/√in` (Kaiming-uniform with `a = √5`) and `B = 0`, so the first
//! forward pass is the base model's; here `A` is drawn from a generator seeded by the run and
//! the layer's name, so a seeded run starts from the same adapter.
//!
//! An adapter folder is what `PeftModel.from_pretrained(base, folder)` loads:
//! `adapter_config.json` and `adapter_model.safetensors`, whose tensors are named
//! `base_model.model.<module>.lora_A.weight` / `lora_B.weight`. Ours adds `manifest.json`
//! with every file's SHA-256 and the digest of the base model it was trained on
//! ([`crate::formats::checkpoint::Manifest::base_model_sha256`]), so that it is never applied to
//! another base.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::arch::llama;
use crate::error::{ModelError, Result};
use crate::formats::checkpoint::{self, Manifest, MANIFEST};
use crate::formats::tensor_file::{self, Entry};
use crate::formats::weights::LowRank;
use crate::kernels::ops::{fnv1a, mix};
use hir_core::run::LoraKnob;

/// PEFT's configuration file of an adapter.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
/// PEFT's weight file of an adapter.
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
/// The projections of a Llama-family layer an adapter can target.
pub use hir_core::run::LORA_TARGETS as TARGETS;
/// The prefix PEFT gives every tensor name of a causal language model's adapter.
const PEFT_PREFIX: &str = "base_model.model.";

/// What an adapter is: rank, scaling and the projections it targets.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    /// `r`, at least 1 and at most the narrower side of every targeted projection.
    pub rank: usize,
    /// `lora_alpha`, positive.
    pub alpha: f64,
    /// Targeted projections, names of [`TARGETS`], sorted and without repeats.
    pub targets: Vec<String>,
    /// PEFT's `use_rslora`: scale by `alpha / √r` instead of `alpha / r`.
    pub rslora: bool,
}

fn invalid(field: &str, reason: impl Into<String>) -> ModelError {
    ModelError::InvalidAdapter {
        field: field.to_string(),
        reason: reason.into(),
    }
}

impl LoraConfig {
    /// A checked configuration; `fields` names the rank, alpha and targets settings in
    /// errors (`lora_rank` for a run, `adapter_config.json: r` for a file).
    pub fn new(rank: usize, alpha: f64, targets: &[&str], fields: [&str; 3]) -> Result<Self> {
        if rank == 0 {
            return Err(invalid(fields[0], "must be at least 1"));
        }
        let targets: Vec<&str> = targets.iter().map(|t| t.trim()).collect();
        if let Err((knob, reason)) = hir_core::run::check_lora(alpha, &targets) {
            let field = match knob {
                LoraKnob::Alpha => fields[1],
                LoraKnob::Targets => fields[2],
            };
            return Err(invalid(field, reason));
        }
        let mut targets: Vec<String> = targets.into_iter().map(str::to_string).collect();
        targets.sort_unstable();
        targets.dedup();
        Ok(Self {
            rank,
            alpha,
            targets,
            rslora: false,
        })
    }

    /// A configuration from a run's knobs: `lora_rank`, `lora_alpha` and `lora_targets`
    /// (comma-separated).
    pub fn from_knobs(rank: u32, alpha: f64, targets: &str) -> Result<Self> {
        Self::new(
            rank as usize,
            alpha,
            &hir_core::run::split_lora_targets(targets),
            ["lora_rank", "lora_alpha", "lora_targets"],
        )
    }

    /// The factor of the low-rank product.
    pub fn scale(&self) -> f64 {
        if self.rslora {
            self.alpha / (self.rank as f64).sqrt()
        } else {
            self.alpha / self.rank as f64
        }
    }

    /// Whether the module `model.layers.3.self_attn.q_proj` is targeted.
    pub fn targets_module(&self, module: &str) -> bool {
        let last = module.rsplit('.').next().unwrap_or(module);
        self.targets.iter().any(|t| t == last)
    }

    /// Checks the rank against every targeted projection of a model of `cfg`: it may not
    /// exceed the narrower side, where the low-rank product would no longer be low-rank.
    /// `field` names the rank in the error.
    pub fn check_widths(&self, cfg: &llama::Config, field: &str) -> Result<()> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let (q, kv) = (
            cfg.num_attention_heads * cfg.head_size(),
            cfg.kv_heads() * cfg.head_size(),
        );
        for t in &self.targets {
            let (inp, out) = match t.as_str() {
                "q_proj" => (h, q),
                "k_proj" | "v_proj" => (h, kv),
                "o_proj" => (q, h),
                "gate_proj" | "up_proj" => (h, i),
                _ => (i, h),
            };
            if self.rank > inp.min(out) {
                return Err(invalid(
                    field,
                    format!(
                        "is {}, larger than {t} ({inp} → {out}); at most {}",
                        self.rank,
                        inp.min(out)
                    ),
                ));
            }
        }
        Ok(())
    }

    fn peft_json(&self, base_model: &str) -> serde_json::Value {
        serde_json::json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "r": self.rank,
            "lora_alpha": self.alpha,
            "lora_dropout": 0.0,
            "target_modules": self.targets,
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "use_rslora": self.rslora,
            "use_dora": false,
            "init_lora_weights": true,
            "modules_to_save": null,
            "layers_to_transform": null,
            "rank_pattern": {},
            "alpha_pattern": {},
        })
    }
}

/// The PEFT names of a module's pair.
fn peft_names(module: &str) -> [String; 2] {
    [
        format!("{PEFT_PREFIX}{module}.lora_A.weight"),
        format!("{PEFT_PREFIX}{module}.lora_B.weight"),
    ]
}

/// `A`'s starting values for `module`: uniform in `±1/√in`, seeded by `seed` and the name.
fn initial_a(seed: u64, module: &str, rank: usize, inp: usize, device: &Device) -> Result<Tensor> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(mix(seed, fnv1a(module.as_bytes())));
    let bound = 1.0 / (inp as f32).sqrt();
    let v: Vec<f32> = (0..rank * inp)
        .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * bound)
        .collect();
    Ok(Tensor::from_vec(v, (rank, inp), device)?)
}

/// Attaches trainable adapters to every targeted projection of `model` and returns their
/// variables under their PEFT names, `A` then `B` per module in layer order. They start
/// from `from` (an adapter read back, to resume) or from PEFT's initialisation under
/// `seed`. The model's own weights are left as they are (load them frozen); the model is
/// switched to its differentiable kernels.
pub fn attach_trainable(
    model: &mut llama::Model,
    cfg: &LoraConfig,
    from: Option<&Adapter>,
    seed: u64,
) -> Result<Vec<(String, Var)>> {
    cfg.check_widths(model.config(), "lora_rank")?;
    if let Some(a) = from {
        if &a.config != cfg {
            return Err(invalid(
                ADAPTER_CONFIG,
                "the adapter's rank, alpha or targets differ from the run's",
            ));
        }
    }
    // Training needs the differentiable kernels (the inference ones record no graph).
    model.set_fused(false);
    let (dtype, device) = (model.dtype(), model.device().clone());
    let mut vars = Vec::new();
    let linears = model.layer_linears_mut();
    if let Some(a) = from {
        a.check_pairs(linears.iter().map(|(m, _)| m.as_str()))?;
    }
    for (module, lin) in linears {
        if !cfg.targets_module(&module) {
            lin.set_lora(None);
            continue;
        }
        let (out, inp) = lin.dims();
        let [na, nb] = peft_names(&module);
        let (a, b) = match from {
            Some(adapter) => (adapter.tensor(&na)?.clone(), adapter.tensor(&nb)?.clone()),
            None => (
                initial_a(seed, &module, cfg.rank, inp, &device)?,
                Tensor::zeros((out, cfg.rank), DType::F32, &device)?,
            ),
        };
        let a = Var::from_tensor(&a.to_dtype(dtype)?)?;
        let b = Var::from_tensor(&b.to_dtype(dtype)?)?;
        lin.set_lora(Some(LowRank {
            a: a.as_tensor().clone(),
            b: b.as_tensor().clone(),
            scale: cfg.scale(),
        }));
        vars.push((na, a));
        vars.push((nb, b));
    }
    Ok(vars)
}

/// `adapter_config.json` as read: the PEFT fields this loader understands. Any other PEFT
/// feature that changes the computation is refused rather than ignored.
#[derive(Debug, Deserialize, Serialize)]
struct PeftConfig {
    peft_type: Option<String>,
    r: Option<serde_json::Value>,
    lora_alpha: Option<f64>,
    target_modules: Option<serde_json::Value>,
    #[serde(default)]
    base_model_name_or_path: Option<String>,
    #[serde(default)]
    fan_in_fan_out: bool,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    use_dora: bool,
    #[serde(default)]
    bias: Option<String>,
    #[serde(default)]
    modules_to_save: Option<serde_json::Value>,
    #[serde(default)]
    layers_to_transform: Option<serde_json::Value>,
    #[serde(default)]
    rank_pattern: Option<BTreeMap<String, serde_json::Value>>,
    #[serde(default)]
    alpha_pattern: Option<BTreeMap<String, serde_json::Value>>,
}

impl PeftConfig {
    fn lora_config(&self) -> Result<LoraConfig> {
        let field = |k: &str| format!("{ADAPTER_CONFIG}: {k}");
        if self.peft_type.as_deref() != Some("LORA") {
            return Err(invalid(&field("peft_type"), "must be \"LORA\""));
        }
        let rank = self
            .r
            .as_ref()
            .and_then(|r| r.as_u64())
            .ok_or_else(|| invalid(&field("r"), "must be a whole number"))?;
        let alpha = self
            .lora_alpha
            .ok_or_else(|| invalid(&field("lora_alpha"), "is missing"))?;
        let targets: Vec<String> = match &self.target_modules {
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .map(|v| {
                    v.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| invalid(&field("target_modules"), "must list names"))
                })
                .collect::<Result<_>>()?,
            Some(serde_json::Value::String(_)) => {
                return Err(invalid(
                    &field("target_modules"),
                    "a regular expression is not supported; list the projections",
                ))
            }
            _ => return Err(invalid(&field("target_modules"), "must list names")),
        };
        for (set, key, why) in [
            (self.fan_in_fan_out, "fan_in_fan_out", "must be false"),
            (self.use_dora, "use_dora", "DoRA is not supported"),
            (
                self.bias.as_deref().is_some_and(|b| b != "none"),
                "bias",
                "trained biases are not supported; must be \"none\"",
            ),
            (
                self.modules_to_save.as_ref().is_some_and(|m| !m.is_null()),
                "modules_to_save",
                "fully trained modules are not supported; must be null",
            ),
            (
                self.layers_to_transform
                    .as_ref()
                    .is_some_and(|m| !m.is_null()),
                "layers_to_transform",
                "must be null: every layer is adapted",
            ),
            (
                self.rank_pattern.as_ref().is_some_and(|m| !m.is_empty())
                    || self.alpha_pattern.as_ref().is_some_and(|m| !m.is_empty()),
                "rank_pattern",
                "per-layer ranks and alphas are not supported",
            ),
        ] {
            if set {
                return Err(invalid(&field(key), why));
            }
        }
        let targets: Vec<&str> = targets.iter().map(String::as_str).collect();
        let mut cfg = LoraConfig::new(
            usize::try_from(rank).unwrap_or(usize::MAX),
            alpha,
            &targets,
            [&field("r"), &field("lora_alpha"), &field("target_modules")],
        )?;
        cfg.rslora = self.use_rslora;
        Ok(cfg)
    }
}

/// An adapter read from a PEFT folder: its configuration and its `A`/`B` tensors by
/// PEFT name.
#[derive(Debug, Clone)]
pub struct Adapter {
    /// Rank, alpha and targets.
    pub config: LoraConfig,
    /// `base_model_name_or_path`, as written.
    pub base_model: String,
    /// The SHA-256 of the base model it was trained on, from its manifest, if recorded.
    pub base_model_sha256: Option<String>,
    tensors: HashMap<String, Tensor>,
}

impl Adapter {
    /// Reads and checks the adapter folder `dir`: its manifest (every file's digest, the
    /// weights' while they are read), the PEFT configuration, and that every tensor has
    /// rank `r`. Whether the pairs are exactly those of a model's targeted projections,
    /// with their shapes, is checked against that model by [`Adapter::apply`] (and by
    /// [`attach_trainable`] when it resumes from the adapter).
    pub fn read(dir: &Path, device: &Device) -> Result<Self> {
        let manifest = checkpoint::verify_except(dir, |n| n == ADAPTER_WEIGHTS)?;
        let cfg_path = dir.join(ADAPTER_CONFIG);
        let bytes = std::fs::read(&cfg_path).map_err(|e| ModelError::io(&cfg_path, e))?;
        let peft: PeftConfig = serde_json::from_slice(&bytes)
            .map_err(|e| invalid(ADAPTER_CONFIG, format!("is not a PEFT LoRA config: {e}")))?;
        let config = peft.lora_config()?;
        let weights = dir.join(ADAPTER_WEIGHTS);
        let want = manifest.expected(ADAPTER_WEIGHTS).ok_or_else(|| {
            invalid(
                MANIFEST,
                format!("does not list {ADAPTER_WEIGHTS}; the adapter cannot be verified"),
            )
        })?;
        let tensors = tensor_file::read_verified(&weights, want, device)?;
        for (name, t) in &tensors {
            let r = if name.ends_with(".lora_A.weight") {
                t.dims().first().copied()
            } else {
                t.dims().get(1).copied()
            };
            if t.rank() != 2 || r != Some(config.rank) {
                return Err(invalid(
                    ADAPTER_WEIGHTS,
                    format!(
                        "tensor {name:?} has shape {:?}, not rank r = {}",
                        t.dims(),
                        config.rank
                    ),
                ));
            }
        }
        Ok(Self {
            config,
            base_model: peft.base_model_name_or_path.unwrap_or_default(),
            base_model_sha256: manifest.base_model_sha256,
            tensors,
        })
    }

    /// Checks that the adapter holds exactly one pair per targeted module of `modules`
    /// (a model's projections, as [`llama::Model::layer_linears_mut`] names them): no pair
    /// missing, no tensor left over.
    fn check_pairs<'a>(&self, modules: impl Iterator<Item = &'a str>) -> Result<()> {
        let mut expected: Vec<String> = modules
            .filter(|m| self.config.targets_module(m))
            .flat_map(peft_names)
            .collect();
        expected.sort_unstable();
        let mut held: Vec<&String> = self.tensors.keys().collect();
        held.sort_unstable();
        if let Some(extra) = held
            .into_iter()
            .find(|&n| expected.binary_search(n).is_err())
        {
            return Err(invalid(
                ADAPTER_WEIGHTS,
                format!(
                    "tensor {:?} is not a pair of a targeted projection of this model",
                    hir_core::text_enum::bounded(extra)
                ),
            ));
        }
        if let Some(missing) = expected.iter().find(|n| !self.tensors.contains_key(*n)) {
            return Err(invalid(
                ADAPTER_WEIGHTS,
                format!("lacks {missing:?}, which its target_modules call for"),
            ));
        }
        Ok(())
    }

    /// Checks that the adapter was trained on the model whose digest
    /// ([`checkpoint::model_digest`]) is `base_sha256`.
    pub fn check_base(&self, base_sha256: &str) -> Result<()> {
        let field = format!("{MANIFEST}: base_model_sha256");
        match &self.base_model_sha256 {
            Some(s) if s == base_sha256 => Ok(()),
            Some(s) => Err(invalid(
                &field,
                format!(
                    "the adapter was trained on base model {s} ({:?}); this model is {base_sha256}",
                    hir_core::text_enum::bounded(&self.base_model)
                ),
            )),
            None => Err(invalid(
                &field,
                "is missing: the adapter does not name the base model it was trained on",
            )),
        }
    }

    fn tensor(&self, name: &str) -> Result<&Tensor> {
        self.tensors
            .get(name)
            .ok_or_else(|| invalid(ADAPTER_WEIGHTS, format!("lacks {name:?}")))
    }

    /// Bytes of the adapter's tensors.
    pub fn bytes(&self) -> usize {
        self.tensors
            .values()
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum()
    }

    /// `base` with this adapter beside its weights (which are shared, not copied): the
    /// targeted projections get their pair, the others none. The ranks are checked against
    /// the base's widths and every pair's shape against its projection.
    pub fn apply(&self, base: &llama::Model) -> Result<llama::Model> {
        self.config
            .check_widths(base.config(), &format!("{ADAPTER_CONFIG}: r"))?;
        let mut model = base.clone();
        let dtype = model.dtype();
        let scale = self.config.scale();
        let linears = model.layer_linears_mut();
        self.check_pairs(linears.iter().map(|(m, _)| m.as_str()))?;
        for (module, lin) in linears {
            if !self.config.targets_module(&module) {
                lin.set_lora(None);
                continue;
            }
            let (out, inp) = lin.dims();
            let [na, nb] = peft_names(&module);
            let (a, b) = (self.tensor(&na)?, self.tensor(&nb)?);
            for (name, t, want) in [
                (&na, a, [self.config.rank, inp]),
                (&nb, b, [out, self.config.rank]),
            ] {
                if t.dims() != want {
                    return Err(invalid(
                        ADAPTER_WEIGHTS,
                        format!(
                            "tensor {name:?} has shape {:?}; the base model's projection needs {want:?}",
                            t.dims()
                        ),
                    ));
                }
            }
            lin.set_lora(Some(LowRank {
                a: a.to_dtype(dtype)?,
                b: b.to_dtype(dtype)?,
                scale,
            }));
        }
        Ok(model)
    }
}

/// Writes the adapter `vars` (PEFT-named, as [`attach_trainable`] returns them) as a PEFT
/// folder in `dir`: `adapter_config.json`, `adapter_model.safetensors` (hashed while it is
/// written) and `manifest.json`, which records `base_model_sha256`.
pub fn write_adapter(
    dir: &Path,
    cfg: &LoraConfig,
    vars: &[(String, Var)],
    base_model: &str,
    base_model_sha256: &str,
) -> Result<Manifest> {
    std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
    let cfg_path = dir.join(ADAPTER_CONFIG);
    let json = serde_json::to_vec_pretty(&cfg.peft_json(base_model))
        .map_err(|e| ModelError::json(&cfg_path, e))?;
    std::fs::write(&cfg_path, json).map_err(|e| ModelError::io(&cfg_path, e))?;
    let entries = vars
        .iter()
        .map(|(n, v)| {
            Ok((
                n.clone(),
                Entry::Tensor(v.as_tensor().to_dtype(DType::F32)?),
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    let weights = tensor_file::write(&dir.join(ADAPTER_WEIGHTS), entries)?;
    let mut m = Manifest::for_weights(
        ADAPTER_WEIGHTS,
        weights,
        Some(base_model_sha256.to_string()),
    );
    m.files.insert(
        ADAPTER_CONFIG.to_string(),
        checkpoint::sha256_file(&cfg_path)?,
    );
    checkpoint::write_manifest(dir, &m)?;
    Ok(m)
}

/// Whether `dir` holds an adapter rather than a whole model.
pub fn is_adapter(dir: &Path) -> bool {
    dir.join(ADAPTER_CONFIG).is_file()
}
