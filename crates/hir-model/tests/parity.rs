//! Logits parity with Hugging Face transformers on tiny random models.
//!
//! The fixtures under `tests/fixtures/` were written by
//! `tests/fixtures/make_fixtures.py` (transformers 5.23, torch 2.15, CPU, f32).

use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use hir_model::formats::weights::{SafetensorsSource, WeightMode, Weights};
use hir_model::LoadedModel;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn expected(name: &str) -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(name).join("expected.safetensors"), &Device::Cpu)
        .unwrap()
}

fn mask_rows(t: &Tensor) -> Vec<Vec<u8>> {
    t.to_vec2::<i64>()
        .unwrap()
        .into_iter()
        .map(|r| r.into_iter().map(|x| x as u8).collect())
        .collect()
}

/// Largest difference over the positions where `mask` is 1.
fn masked_max_diff(a: &Tensor, b: &Tensor, mask: &[Vec<u8>]) -> f32 {
    let a: Vec<Vec<Vec<f32>>> = a.to_vec3().unwrap();
    let b: Vec<Vec<Vec<f32>>> = b.to_vec3().unwrap();
    let mut worst = 0f32;
    for (i, row) in mask.iter().enumerate() {
        for (t, &m) in row.iter().enumerate() {
            if m == 1 {
                for (x, y) in a[i][t].iter().zip(&b[i][t]) {
                    worst = worst.max((x - y).abs());
                }
            }
        }
    }
    worst
}

fn decoder_only_parity(name: &str) {
    let exp = expected(name);
    let mask = mask_rows(&exp["attention_mask"]);
    let ids = exp["input_ids"].to_dtype(DType::U32).unwrap();
    for mode in [
        WeightMode::Dense(DType::F32),
        WeightMode::Trainable(DType::F32),
    ] {
        let m = LoadedModel::load(&fixture(name), &Device::Cpu, mode).unwrap();
        let logits = m.model().as_llama().unwrap().forward(&ids, &mask).unwrap();
        let d = masked_max_diff(&logits, &exp["logits"], &mask);
        assert!(d < 1e-4, "{name} {mode:?}: max |diff| {d}");
    }
}

#[test]
fn llama_logits_match_transformers() {
    decoder_only_parity("llama");
}

#[test]
fn qwen2_logits_match_transformers() {
    decoder_only_parity("qwen2");
}

#[test]
fn llama_greedy_steps_match_the_transformers_logits() {
    // Cached decoding of the unpadded row reproduces the reference logits.
    let exp = expected("llama");
    let m = LoadedModel::load(
        &fixture("llama"),
        &Device::Cpu,
        WeightMode::Dense(DType::F32),
    )
    .unwrap();
    let ids: Vec<Vec<i64>> = exp["input_ids"].to_vec2().unwrap();
    let row: Vec<u32> = ids[0].iter().map(|&x| x as u32).collect();
    let want: Vec<Vec<f32>> = exp["logits"].get(0).unwrap().to_vec2().unwrap();
    let model = m.model().as_llama().unwrap();
    let mut cache = model.new_cache();
    let mut mask = Vec::new();
    for (t, &tok) in row.iter().enumerate() {
        mask.push(1u8);
        let x = Tensor::new(&[[tok]], &Device::Cpu).unwrap();
        let l = model
            .forward_last(
                &hir_model::arch::llama::Batch {
                    input_ids: &x,
                    key_mask: std::slice::from_ref(&mask),
                    positions: &[vec![t as u32]],
                },
                Some(&mut cache),
            )
            .unwrap();
        let got: Vec<f32> = l.get(0).unwrap().to_vec1().unwrap();
        let d = got
            .iter()
            .zip(&want[t])
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(d < 1e-4, "step {t}: {d}");
    }
}

fn t5_parity(name: &str) {
    let exp = expected(name);
    let src_mask = mask_rows(&exp["attention_mask"]);
    let dec_mask = mask_rows(&exp["decoder_attention_mask"]);
    for mode in [
        WeightMode::Dense(DType::F32),
        WeightMode::Trainable(DType::F32),
    ] {
        let m = hir_model::arch::t5::load_folder(&fixture(name), &Device::Cpu, mode)
            .unwrap()
            .model;
        let logits = m
            .forward(
                &exp["input_ids"].to_dtype(DType::U32).unwrap(),
                &src_mask,
                &exp["decoder_input_ids"].to_dtype(DType::U32).unwrap(),
                &dec_mask,
            )
            .unwrap();
        let d = masked_max_diff(&logits, &exp["logits"], &dec_mask);
        assert!(d < 1e-4, "{name} {mode:?}: max |diff| {d}");
        let counted: usize = m.named_tensors().iter().map(|(_, t)| t.elem_count()).sum();
        assert_eq!(m.num_parameters(), counted, "{name}");
    }
}

#[test]
fn flan_t5_logits_match_transformers() {
    t5_parity("t5");
}

#[test]
fn tied_t5_logits_match_transformers() {
    t5_parity("t5_tied");
}

#[test]
fn fixture_weights_load_strictly() {
    // Every tensor of the fixture is used: loading from exactly those names works,
    // and the model's names are the file's names.
    let dir = fixture("llama");
    let src = SafetensorsSource::open(&[dir.join("model.safetensors")]).unwrap();
    let cfg: hir_model::arch::llama::Config =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    let w = Weights::new(Arc::new(src), &Device::Cpu, WeightMode::Dense(DType::F32));
    let m = hir_model::arch::llama::Model::new(&cfg, &w).unwrap();
    let st = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    let mut ours: Vec<String> = m
        .named_tensors()
        .unwrap()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    let mut theirs: Vec<String> = st.keys().cloned().collect();
    ours.sort();
    theirs.sort();
    assert_eq!(ours, theirs);
}

/// Cached decoding (prefill, then one decoder token per step, rows retired on the way)
/// gives transformers' full-sequence logits at every real decoder position.
fn t5_cached_parity(name: &str) {
    let exp = expected(name);
    let m = hir_model::arch::t5::load_folder(
        &fixture(name),
        &Device::Cpu,
        WeightMode::Dense(DType::F32),
    )
    .unwrap()
    .model;
    let src: Vec<Vec<i64>> = exp["input_ids"].to_vec2().unwrap();
    let src_mask = mask_rows(&exp["attention_mask"]);
    let prompts: Vec<Vec<u32>> = src
        .iter()
        .zip(&src_mask)
        .map(|(r, m)| {
            r.iter()
                .zip(m)
                .filter(|(_, &k)| k == 1)
                .map(|(&t, _)| t as u32)
                .collect()
        })
        .collect();
    let dec: Vec<Vec<i64>> = exp["decoder_input_ids"].to_vec2().unwrap();
    let dec_len: Vec<usize> = mask_rows(&exp["decoder_attention_mask"])
        .iter()
        .map(|m| m.iter().filter(|&&k| k == 1).count())
        .collect();
    let want: Vec<Vec<Vec<f32>>> = exp["logits"].to_vec3().unwrap();
    let check = |logits: &Tensor, rows: &[usize], t: usize| {
        let got: Vec<Vec<f32>> = logits.to_vec2().unwrap();
        for (g, &b) in got.iter().zip(rows) {
            let d = g
                .iter()
                .zip(&want[b][t])
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            assert!(d < 1e-4, "{name} row {b} position {t}: max |diff| {d}");
        }
    };
    let refs: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
    let (mut cache, first) = m.prefill(&refs, 0).unwrap();
    check(&first, &[0, 1], 0);
    let mut rows = vec![0usize, 1];
    for t in 1..dec_len.iter().copied().max().unwrap() {
        // Retire rows whose decoder input ended (the cache keeps the others).
        let keep: Vec<u32> = (0..rows.len() as u32)
            .filter(|&i| t < dec_len[rows[i as usize]])
            .collect();
        if keep.len() < rows.len() {
            cache = cache.select(&keep).unwrap();
            rows = keep.iter().map(|&i| rows[i as usize]).collect();
        }
        let tokens: Vec<u32> = rows
            .iter()
            .map(|&b| dec[b].get(t).map(|&x| x as u32).unwrap())
            .collect();
        let mask = vec![vec![1u8; t + 1]; rows.len()];
        let logits = m.decode_step(&tokens, &mask, &mut cache).unwrap();
        check(&logits, &rows, t);
    }
}

#[test]
fn cached_flan_t5_decoding_matches_transformers() {
    t5_cached_parity("t5");
}

#[test]
fn cached_tied_t5_decoding_matches_transformers() {
    t5_cached_parity("t5_tied");
}
