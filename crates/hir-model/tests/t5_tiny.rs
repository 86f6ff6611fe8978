//! Tiny random FLAN-T5: padding masks, gradients, loading from a folder.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use hir_model::loss::{label_smoothed_cross_entropy, IGNORE_INDEX};
use hir_model::t5::{load_folder, Config, Model};
use hir_model::weights::{WeightMode, Weights};
use hir_model::ModelError;

fn tiny(mode: WeightMode) -> (Model, Vec<(String, candle_core::Var)>) {
    let w = Weights::random(21, 0.3, &Device::Cpu, mode);
    (Model::new(&Config::tiny(), &w).unwrap(), w.vars())
}

fn ids(rows: &[&[u32]]) -> Tensor {
    let t = rows[0].len();
    let flat: Vec<u32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
    Tensor::from_vec(flat, (rows.len(), t), &Device::Cpu).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

#[test]
fn t5_padding_does_not_change_real_positions() {
    let (m, _) = tiny(WeightMode::Dense(DType::F32));
    let src_long: &[u32] = &[5, 6, 7, 8, 9, 1];
    let src_short: &[u32] = &[10, 11, 1];
    let dec_long: &[u32] = &[0, 20, 21, 22];
    let dec_short: &[u32] = &[0, 30];
    let batch = m
        .forward(
            &ids(&[src_long, &[10, 11, 1, 0, 0, 0]]),
            &[vec![1; 6], vec![1, 1, 1, 0, 0, 0]],
            &ids(&[dec_long, &[0, 30, 0, 0]]),
            &[vec![1; 4], vec![1, 1, 0, 0]],
        )
        .unwrap();
    let alone = m
        .forward(
            &ids(&[src_short]),
            &[vec![1; 3]],
            &ids(&[dec_short]),
            &[vec![1; 2]],
        )
        .unwrap();
    assert_eq!(batch.dims(), &[2, 4, 64]);
    let got = batch.get(1).unwrap().narrow(0, 0, 2).unwrap();
    assert!(max_abs_diff(&got, &alone.get(0).unwrap()) < 1e-5);
    let long_alone = m
        .forward(
            &ids(&[src_long]),
            &[vec![1; 6]],
            &ids(&[dec_long]),
            &[vec![1; 4]],
        )
        .unwrap();
    let d = max_abs_diff(&batch.get(0).unwrap(), &long_alone.get(0).unwrap());
    let scale: f32 = long_alone
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap();
    assert!(d < 1e-5 * scale.max(1.0), "{d} (logits up to {scale})");
}

#[test]
fn t5_decoder_is_causal() {
    let (m, _) = tiny(WeightMode::Dense(DType::F32));
    let src = ids(&[&[5, 6, 7, 1]]);
    let a = m
        .forward(&src, &[vec![1; 4]], &ids(&[&[0, 9, 10, 11]]), &[vec![1; 4]])
        .unwrap();
    let b = m
        .forward(&src, &[vec![1; 4]], &ids(&[&[0, 9, 40, 41]]), &[vec![1; 4]])
        .unwrap();
    assert!(max_abs_diff(&a.narrow(1, 0, 2).unwrap(), &b.narrow(1, 0, 2).unwrap()) < 1e-6);
    assert!(max_abs_diff(&a.narrow(1, 2, 2).unwrap(), &b.narrow(1, 2, 2).unwrap()) > 1e-4);
}

#[test]
fn every_t5_weight_gets_a_nonzero_gradient() {
    let (m, vars) = tiny(WeightMode::Trainable(DType::F32));
    // shared + 2 encoder blocks (4+1+3+1, +1 rel bias) + 2 decoder blocks
    // (4+1+4+1+3+1, +1 rel bias) + 2 final norms + lm_head.
    assert_eq!(vars.len(), 1 + (2 * 9 + 1) + (2 * 14 + 1) + 2 + 1);
    let labels = vec![vec![20i64, 21, 1], vec![30, 1, IGNORE_INDEX]];
    let (dec, dmask) = m.shift_right(&labels).unwrap();
    let logits = m
        .forward(
            &ids(&[&[5, 6, 7, 1], &[8, 9, 1, 0]]),
            &[vec![1; 4], vec![1, 1, 1, 0]],
            &dec,
            &dmask,
        )
        .unwrap();
    let y = Tensor::new(labels, &Device::Cpu).unwrap();
    let loss = label_smoothed_cross_entropy(&logits, &y, 0.2).unwrap();
    let grads = loss.backward().unwrap();
    for (name, v) in &vars {
        let g = grads
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("{name} has no gradient"));
        let n: f32 = g.abs().unwrap().sum_all().unwrap().to_scalar().unwrap();
        assert!(n > 0.0 && n.is_finite(), "{name}: |grad| = {n}");
    }
}

#[test]
fn t5_loads_from_a_hugging_face_folder() {
    let (m, _) = tiny(WeightMode::Dense(DType::F32));
    let dir = common::scratch("t5_folder");
    let tensors: HashMap<String, Tensor> = m.named_tensors().into_iter().collect();
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_vec(&Config::tiny()).unwrap(),
    )
    .unwrap();
    let loaded = load_folder(&dir, &Device::Cpu, WeightMode::Dense(DType::F32)).unwrap();
    assert!(loaded.tokenizer.is_none() && loaded.vars.is_empty());
    let back = loaded.model;
    let src = ids(&[&[5, 6, 7, 1]]);
    let dec = ids(&[&[0, 9, 10]]);
    let a = m.forward(&src, &[vec![1; 4]], &dec, &[vec![1; 3]]).unwrap();
    let b = back
        .forward(&src, &[vec![1; 4]], &dec, &[vec![1; 3]])
        .unwrap();
    assert_eq!(max_abs_diff(&a, &b), 0.0);
    let greedy = back.greedy(&src, &[vec![1; 4]], 5).unwrap();
    assert_eq!(greedy[0].len(), 5.min(greedy[0].len()));

    // A missing tensor is named.
    let mut partial = tensors.clone();
    partial.remove("decoder.block.1.layer.1.EncDecAttention.k.weight");
    candle_core::safetensors::save(&partial, dir.join("model.safetensors")).unwrap();
    match load_folder(&dir, &Device::Cpu, WeightMode::Dense(DType::F32)) {
        Err(ModelError::MissingTensor { name, expected }) => {
            assert_eq!(name, "decoder.block.1.layer.1.EncDecAttention.k.weight");
            assert_eq!(expected, vec![32, 32]);
        }
        other => panic!("expected MissingTensor, got {:?}", other.map(|_| ())),
    }
}

#[test]
fn t5_checkpoints_reload_bit_exactly_and_refuse_corruption() {
    let (m, _) = tiny(WeightMode::Trainable(DType::F32));
    let dir = common::scratch("t5_checkpoint");
    let manifest = m.save(&dir, None).unwrap();
    assert!(manifest.files.contains_key("model.safetensors"));
    let back = load_folder(&dir, &Device::Cpu, WeightMode::Dense(DType::F32))
        .unwrap()
        .model;
    let theirs: HashMap<String, Tensor> = back.named_tensors().into_iter().collect();
    for (name, t) in m.named_tensors() {
        let a: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = theirs[&name].flatten_all().unwrap().to_vec1().unwrap();
        assert!(
            a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
            "{name}"
        );
    }
    let cfg = dir.join("config.json");
    let mut text = std::fs::read_to_string(&cfg).unwrap();
    text = text.replace("\"d_ff\": 48", "\"d_ff\":48");
    std::fs::write(&cfg, text).unwrap();
    match load_folder(&dir, &Device::Cpu, WeightMode::Dense(DType::F32)) {
        Err(ModelError::ChecksumMismatch { path, .. }) => assert!(path.ends_with("config.json")),
        other => panic!("expected ChecksumMismatch, got {:?}", other.map(|_| ())),
    }
}
