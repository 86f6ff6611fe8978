//! LoRA adapters on the tiny Llama fixture: training touches only the adapters, a saved
//! PEFT folder applies to the base as the merged weights `W + (α/r)·B·A`, and unusable
//! adapters are refused naming what is wrong.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::{max_abs_diff, repo_root, scratch};
use hir_model::arch::llama::Model;
use hir_model::arch::lora::{Adapter, LoraConfig, ADAPTER_CONFIG, ADAPTER_WEIGHTS};
use hir_model::formats::weights::{MemorySource, WeightMode, Weights};
use hir_model::train::loss::HirLossConfig;
use hir_model::train::{AdamWConfig, Example, TrainBatch};
use hir_model::{AnyModel, LoadedModel, ModelError};

fn base_dir() -> PathBuf {
    repo_root().join("crates/hir-model/tests/fixtures/llama")
}

fn lora(rank: usize, targets: &[&str]) -> LoraConfig {
    LoraConfig::new(rank, 16.0, targets, ["r", "alpha", "targets"]).unwrap()
}

fn llama(m: &LoadedModel) -> &Model {
    match m.model() {
        AnyModel::Llama(m) => m,
        AnyModel::T5(_) => unreachable!("the fixture is a Llama"),
    }
}

fn ids() -> (Tensor, Vec<Vec<u8>>) {
    let rows: [[u32; 6]; 2] = [[3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 13, 1]];
    let flat: Vec<u32> = rows.iter().flatten().copied().collect();
    (
        Tensor::from_vec(flat, (2, 6), &Device::Cpu).unwrap(),
        vec![vec![1u8; 6]; 2],
    )
}

fn logits(m: &Model) -> Tensor {
    let (x, mask) = ids();
    m.forward(&x, &mask).unwrap()
}

/// A few HIR steps on the adapters, at a learning rate that moves them visibly.
fn train(lm: &LoadedModel, steps: usize) {
    let mut opt = lm
        .optimizer(
            AdamWConfig {
                lr: 5e-2,
                ..Default::default()
            },
            1,
            None,
        )
        .unwrap();
    let batch = |prompt: Vec<u32>| {
        TrainBatch::new(
            &[Example {
                prompt,
                completion: vec![30, 31, 32, 0],
            }],
            0,
            &Device::Cpu,
        )
        .unwrap()
    };
    let (pos, neg) = (batch(vec![20, 21, 22]), batch(vec![23, 24, 22]));
    for _ in 0..steps {
        opt.backward_hir(lm.model(), &pos, &neg, &HirLossConfig::default(), 1.0)
            .unwrap();
    }
}

fn trained(name: &str, cfg: &LoraConfig) -> (LoadedModel, PathBuf) {
    let lm = LoadedModel::load_lora(&base_dir(), &Device::Cpu, DType::F32, cfg, None, 7).unwrap();
    train(&lm, 4);
    let dir = scratch(name).join("adapter");
    lm.save(&dir).unwrap();
    (lm, dir)
}

#[test]
fn adapters_start_as_the_base_and_training_moves_only_them() {
    let base = LoadedModel::load(&base_dir(), &Device::Cpu, WeightMode::Dense(DType::F32)).unwrap();
    let cfg = lora(4, &["q_proj", "v_proj", "down_proj"]);
    let lm = LoadedModel::load_lora(&base_dir(), &Device::Cpu, DType::F32, &cfg, None, 7).unwrap();
    // Two layers, three targets, an A and a B each; nothing else trains.
    let names: Vec<&str> = lm.vars().iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names.len(), 12);
    assert_eq!(
        &names[..2],
        [
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
        ]
    );
    assert!(lm.trains_adapters());
    // B starts at zero: the first forward pass is the base model's (up to the rounding of
    // the training kernels).
    assert!(max_abs_diff(&logits(llama(&lm)), &logits(llama(&base))) < 1e-5);
    // A starts in ±1/√in and is seeded.
    let a0 = lm.vars()[0]
        .1
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let bound = 1.0 / (32f32).sqrt();
    assert!(a0.iter().all(|v| v.abs() <= bound) && a0.iter().any(|v| v.abs() > bound / 2.0));
    let again =
        LoadedModel::load_lora(&base_dir(), &Device::Cpu, DType::F32, &cfg, None, 7).unwrap();
    let other =
        LoadedModel::load_lora(&base_dir(), &Device::Cpu, DType::F32, &cfg, None, 8).unwrap();
    let first = |m: &LoadedModel| m.vars()[0].1.as_tensor().clone();
    assert_eq!(max_abs_diff(&first(&lm), &first(&again)), 0.0);
    assert!(max_abs_diff(&first(&lm), &first(&other)) > 0.0);

    let before: Vec<(String, Tensor)> = llama(&lm).named_tensors().unwrap();
    train(&lm, 3);
    assert!(max_abs_diff(&logits(llama(&lm)), &logits(llama(&base))) > 1e-4);
    for ((name, w0), (_, w1)) in before.iter().zip(llama(&lm).named_tensors().unwrap()) {
        assert_eq!(max_abs_diff(w0, &w1), 0.0, "{name} is frozen");
    }
}

/// The base's weights with every adapted projection merged: `W + s·B·A`.
fn merged(base: &Model, adapter: &LoadedModel, cfg: &LoraConfig) -> Model {
    let vars: HashMap<&str, &Tensor> = adapter
        .vars()
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_tensor()))
        .collect();
    let mut tensors = HashMap::new();
    for (name, w) in base.named_tensors().unwrap() {
        let module = name.trim_end_matches(".weight");
        let a = vars.get(format!("base_model.model.{module}.lora_A.weight").as_str());
        let b = vars.get(format!("base_model.model.{module}.lora_B.weight").as_str());
        let w = match (a, b) {
            (Some(a), Some(b)) => {
                (w + b.matmul(a).unwrap().affine(cfg.scale(), 0.0).unwrap()).unwrap()
            }
            _ => w,
        };
        tensors.insert(name, w);
    }
    let src = std::sync::Arc::new(MemorySource::new(tensors));
    let w = Weights::new(src, &Device::Cpu, WeightMode::Dense(DType::F32));
    Model::new(base.config(), &w).unwrap()
}

#[test]
fn a_saved_adapter_applies_to_the_base_as_its_merged_weights() {
    let cfg = lora(4, &["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"]);
    let (lm, dir) = trained("lora_saved", &cfg);
    for f in [ADAPTER_CONFIG, ADAPTER_WEIGHTS, "manifest.json"] {
        assert!(dir.join(f).is_file(), "{f}");
    }
    assert!(
        !dir.join("model.safetensors").exists(),
        "only the adapter is written"
    );
    let peft: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join(ADAPTER_CONFIG)).unwrap()).unwrap();
    assert_eq!(peft["peft_type"], "LORA");
    assert_eq!(peft["r"], 4);
    assert_eq!(peft["lora_alpha"], 16.0);

    let base = LoadedModel::load(&base_dir(), &Device::Cpu, WeightMode::Dense(DType::F32)).unwrap();
    let adapter = Adapter::read(&dir, &Device::Cpu).unwrap();
    let digest = hir_model::formats::checkpoint::model_digest(&base_dir()).unwrap();
    adapter.check_base(&digest).unwrap();
    let served = base.with_adapter(&adapter, &dir).unwrap();
    let want = logits(llama(&lm));
    assert!(max_abs_diff(&logits(llama(&served)), &want) < 1e-5);
    let merged = merged(llama(&base), &lm, &cfg);
    assert!(max_abs_diff(&logits(&merged), &want) < 1e-4);
    assert!(
        max_abs_diff(&logits(llama(&base)), &want) > 1e-3,
        "the adapter matters"
    );

    // Beside quantized weights (what a GGUF generator serves) it applies the same way.
    let q = LoadedModel::load(&base_dir(), &Device::Cpu, WeightMode::Quantized).unwrap();
    let served_q = q.with_adapter(&adapter, &dir).unwrap();
    let (with, without) = (
        max_abs_diff(&logits(llama(&served_q)), &want),
        max_abs_diff(&logits(llama(&q)), &want),
    );
    eprintln!("quantized: {with} with the adapter, {without} without");
    assert!(with < 0.2 * without, "{with} vs {without}");

    // Resuming from the folder gives the same adapter, still trainable.
    let resumed =
        LoadedModel::load_lora(&base_dir(), &Device::Cpu, DType::F32, &cfg, Some(&dir), 99)
            .unwrap();
    assert_eq!(max_abs_diff(&logits(llama(&resumed)), &want), 0.0);
    assert_eq!(resumed.vars().len(), lm.vars().len());

    // The expected logits for the PEFT check (scripts/check-peft-load.py).
    let (x, _) = ids();
    let out: HashMap<String, Tensor> = HashMap::from([
        ("input_ids".to_string(), x.to_dtype(DType::I64).unwrap()),
        ("logits".to_string(), want),
    ]);
    candle_core::safetensors::save(&out, dir.parent().unwrap().join("expected.safetensors"))
        .unwrap();
}

fn refusal(err: ModelError) -> (String, String) {
    match err {
        ModelError::InvalidAdapter { field, reason } => (field, reason),
        other => panic!("expected an adapter refusal, got {other}"),
    }
}

fn edit_json(dir: &Path, file: &str, edit: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join(file);
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&p, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
    if file == "manifest.json" {
        return;
    }
    // Re-sign the manifest so that only the edit is wrong.
    let mp = dir.join("manifest.json");
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&mp).unwrap()).unwrap();
    m["files"][file] = hir_model::formats::checkpoint::sha256_file(&p)
        .unwrap()
        .into();
    std::fs::write(&mp, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
}

#[test]
fn unusable_settings_and_adapters_are_refused_naming_the_field() {
    // Settings of a run.
    let knobs = |r, a, t| refusal(LoraConfig::from_knobs(r, a, t).unwrap_err()).0;
    assert_eq!(knobs(0, 16.0, "q_proj"), "lora_rank");
    assert_eq!(knobs(4, 0.0, "q_proj"), "lora_alpha");
    assert_eq!(knobs(4, 16.0, "q_proj,wq"), "lora_targets");
    assert_eq!(knobs(4, 16.0, " , "), "lora_targets");
    let base = LoadedModel::load(&base_dir(), &Device::Cpu, WeightMode::Dense(DType::F32)).unwrap();
    let base_cfg = llama(&base).config().clone();
    // k_proj is 32 → 16 wide in the fixture.
    let (field, reason) = refusal(
        lora(17, &["k_proj"])
            .check_widths(&base_cfg, "lora_rank")
            .unwrap_err(),
    );
    assert_eq!(field, "lora_rank");
    assert!(reason.contains("k_proj (32 → 16)"), "{reason}");
    lora(16, &["k_proj"])
        .check_widths(&base_cfg, "lora_rank")
        .unwrap();
    let err = hir_model::probe::check_lora(&base_dir(), &lora(17, &["k_proj"])).unwrap_err();
    assert_eq!(refusal(err).0, "lora_rank");
    let t5 = repo_root().join("crates/hir-model/tests/fixtures/t5");
    let (field, reason) =
        refusal(hir_model::probe::check_lora(&t5, &lora(4, &["q_proj"])).unwrap_err());
    assert_eq!(field, "lora_rank");
    assert!(reason.contains("Llama-family"), "{reason}");

    // Adapter folders.
    let cfg = lora(4, &["q_proj", "v_proj"]);
    let (_, good) = trained("lora_refusals", &cfg);
    let copy = |name: &str| {
        let d = good.parent().unwrap().join(name);
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        for f in std::fs::read_dir(&good).unwrap() {
            let f = f.unwrap().path();
            std::fs::copy(&f, d.join(f.file_name().unwrap())).unwrap();
        }
        d
    };
    let read = |d: &Path| Adapter::read(d, &Device::Cpu);
    for (edit, field) in [
        (
            Box::new(|v: &mut serde_json::Value| v["r"] = 0.into())
                as Box<dyn FnOnce(&mut serde_json::Value)>,
            "adapter_config.json: r",
        ),
        (
            Box::new(|v: &mut serde_json::Value| {
                v["target_modules"] = serde_json::json!(["q_proj", "qkv"])
            }),
            "adapter_config.json: target_modules",
        ),
        (
            Box::new(|v: &mut serde_json::Value| v["target_modules"] = ".*proj".into()),
            "adapter_config.json: target_modules",
        ),
        (
            Box::new(|v: &mut serde_json::Value| v["use_dora"] = true.into()),
            "adapter_config.json: use_dora",
        ),
        (
            Box::new(|v: &mut serde_json::Value| v["peft_type"] = "IA3".into()),
            "adapter_config.json: peft_type",
        ),
        (
            // The file's pairs have rank 4.
            Box::new(|v: &mut serde_json::Value| v["r"] = 8.into()),
            ADAPTER_WEIGHTS,
        ),
        (
            // Targets the file has no pairs for.
            Box::new(|v: &mut serde_json::Value| {
                v["target_modules"] = serde_json::json!(["q_proj", "v_proj", "o_proj"])
            }),
            ADAPTER_WEIGHTS,
        ),
        (
            // Pairs (v_proj's) the targets do not call for.
            Box::new(|v: &mut serde_json::Value| {
                v["target_modules"] = serde_json::json!(["q_proj"])
            }),
            ADAPTER_WEIGHTS,
        ),
    ] {
        let d = copy("edited");
        edit_json(&d, ADAPTER_CONFIG, edit);
        let applied = read(&d).and_then(|a| a.apply(llama(&base)));
        assert_eq!(refusal(applied.unwrap_err()).0, field);
    }

    // Another base model.
    let adapter = read(&good).unwrap();
    let (field, reason) = refusal(adapter.check_base(&"0".repeat(64)).unwrap_err());
    assert_eq!(field, "manifest.json: base_model_sha256");
    assert!(reason.contains(&"0".repeat(64)), "{reason}");
    let d = copy("no_base");
    edit_json(&d, "manifest.json", |m| {
        m.as_object_mut().unwrap().remove("base_model_sha256");
    });
    assert_eq!(
        refusal(read(&d).unwrap().check_base("x").unwrap_err()).0,
        "manifest.json: base_model_sha256"
    );

    // A flipped byte in the weights is a checksum error, not an adapter.
    let d = copy("flipped");
    let p = d.join(ADAPTER_WEIGHTS);
    let mut bytes = std::fs::read(&p).unwrap();
    let n = bytes.len();
    bytes[n - 3] ^= 0x40;
    std::fs::write(&p, bytes).unwrap();
    assert!(matches!(read(&d), Err(ModelError::ChecksumMismatch { .. })));
}

#[test]
fn settings_are_checked_against_a_gguf_header_without_reading_the_weights() {
    let gguf = common::smollm2_gguf();
    hir_model::probe::check_lora(&gguf, &lora(8, &["q_proj", "v_proj"])).unwrap();
    // SmolLM2's k_proj maps 576 features to 192.
    hir_model::probe::check_lora(&gguf, &lora(192, &["k_proj"])).unwrap();
    let (field, reason) =
        refusal(hir_model::probe::check_lora(&gguf, &lora(193, &["k_proj"])).unwrap_err());
    assert_eq!(field, "lora_rank");
    assert!(reason.contains("k_proj (576 → 192)"), "{reason}");
}
