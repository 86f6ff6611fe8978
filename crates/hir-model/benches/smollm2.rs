//! CPU throughput of SmolLM2-135M-Instruct (the Q4_1 GGUF of `scripts/fetch-model.sh`).
//!
//! Prints prompt tokens/s (250-token prompt), decode tokens/s at batch 1 and
//! with 16 sequences, and training tokens/s, for Q4_1 re-quantized to Q8_0,
//! Q4_1 as is, and dense f32, with ratios measured in the same run.
//! Thread count follows `RAYON_NUM_THREADS` (default: all cores).
//!
//! Run: `cargo bench -p hir-model --bench smollm2` (add `-- quick` for fewer repeats).

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Device};
use hir_model::sampling::{prefill, DecodeBatch, GenerationRequest, SamplingParams};
use hir_model::train::{Example, Optimizer, TrainBatch};
use hir_model::{LoadedModel, WeightMode};

const TEXT: &str = "Alice, Bob, Claire, Dave, and Eve are playing a game. At the start of the game, they are each holding a ball: Alice has a pink ball, Bob has a white ball, Claire has a red ball, Dave has a purple ball, and Eve has a yellow ball. As the game progresses, pairs of players trade balls. First, Alice and Dave swap balls. Then, Claire and Eve swap balls. Then, Alice and Bob swap balls. Then, Dave and Claire swap balls. Finally, Alice and Claire swap balls. At the end of the game, Alice has the";

fn model_path() -> PathBuf {
    hir_runtime::models::fetch_smollm2(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.."))
        .expect("SmolLM2 is fetched")
}

/// A prompt of exactly `n` tokens.
fn prompt_ids(m: &LoadedModel, n: usize) -> Vec<u32> {
    let mut ids = Vec::new();
    while ids.len() < n {
        ids.extend(m.encode(TEXT).expect("encodes"));
    }
    ids.truncate(n);
    ids
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Prompt tokens per second for one prompt of `n` tokens.
fn prefill_tps(m: &LoadedModel, n: usize, reps: usize) -> f64 {
    let ids = prompt_ids(m, n);
    let times = (0..reps)
        .map(|_| {
            let t = Instant::now();
            prefill(m.model(), &[&ids], m.pad_token_id()).expect("prefill");
            t.elapsed().as_secs_f64()
        })
        .collect();
    n as f64 / median(times)
}

/// New tokens per second with `batch` sequences decoding `steps` tokens
/// after a `prompt_len`-token prompt (EOS disabled, prefill excluded).
fn decode_tps(m: &LoadedModel, batch: usize, prompt_len: usize, steps: usize) -> f64 {
    let model = m.model();
    let base = prompt_ids(m, prompt_len + batch);
    let reqs: Vec<GenerationRequest> = (0..batch)
        .map(|i| GenerationRequest {
            id: i as u64,
            prompt_ids: base[i..i + prompt_len].to_vec(),
            params: SamplingParams {
                temperature: 1.0,
                top_k: Some(50),
                seed: 1,
                max_new_tokens: steps + 1,
                ..SamplingParams::default()
            },
        })
        .collect();
    let streams: Vec<u64> = (0..batch as u64).collect();
    let mut b = DecodeBatch::new(&[], m.pad_token_id());
    b.admit(model, &reqs, &streams).expect("admit");
    b.step(model, m.tokenizer()).expect("first step");
    let t = Instant::now();
    let mut n = 0;
    for _ in 0..steps - 1 {
        n += b.len();
        b.step(model, m.tokenizer()).expect("step");
    }
    n as f64 / t.elapsed().as_secs_f64()
}

/// Training tokens per second (forward + backward + AdamW) on `b` × `t` tokens.
fn train_tps(m: &LoadedModel, b: usize, t: usize, steps: usize) -> (f64, f32, f32) {
    let ids = prompt_ids(m, t + b);
    let ex: Vec<Example> = (0..b)
        .map(|i| Example {
            prompt: ids[i..i + t / 2].to_vec(),
            completion: ids[i + t / 2..i + t].to_vec(),
        })
        .collect();
    let batch = TrainBatch::new(&ex, m.pad_token_id(), &Device::Cpu).expect("batch");
    let mut tr = Optimizer::new(
        m.vars(),
        hir_model::train::AdamWConfig {
            lr: 1e-4,
            ..Default::default()
        },
        1,
        Some(1.0),
    );
    let mut times = Vec::new();
    let (mut first, mut last) = (0.0, 0.0);
    for s in 0..steps {
        let t0 = Instant::now();
        let loss = hir_model::train::lm_loss(m.model().as_llama().expect("llama"), &batch, 0.0)
            .expect("loss");
        let l = loss.to_scalar::<f32>().expect("scalar");
        tr.backward(&loss).expect("step");
        times.push(t0.elapsed().as_secs_f64());
        if s == 0 {
            first = l;
        }
        last = l;
    }
    ((b * t) as f64 / median(times), first, last)
}

fn main() {
    let quick = std::env::args().any(|a| a == "quick");
    let reps = if quick { 1 } else { 3 };
    let path = model_path();
    let threads = candle_core::utils::get_num_threads();
    println!("SmolLM2-135M-Instruct Q4_1 GGUF, CPU, {threads} threads");

    let mut rows = Vec::new();
    for (label, mode) in [
        ("Q4_1 -> Q8_0", WeightMode::Quantized),
        ("Q4_1 as is", WeightMode::QuantizedAsIs),
        ("f32", WeightMode::Dense(DType::F32)),
    ] {
        let t = Instant::now();
        let m = LoadedModel::load(&path, &Device::Cpu, mode).expect("loads");
        let load_s = t.elapsed().as_secs_f64();
        let pp = prefill_tps(&m, 250, reps);
        let d1 = decode_tps(&m, 1, 250, if quick { 16 } else { 64 });
        let d16 = decode_tps(&m, 16, 250, if quick { 8 } else { 32 });
        println!(
            "{label:>13}: load {load_s:.2} s | prompt {pp:.0} tok/s | decode b=1 {d1:.1} tok/s | decode 16 seqs {d16:.1} tok/s"
        );
        rows.push((label, pp, d1, d16));
    }
    let (q8, f32_) = (&rows[0], &rows[2]);
    println!(
        "ratios Q8_0/f32: prompt {:.2}x, decode b=1 {:.2}x, decode 16 {:.2}x; Q8_0/Q4_1-as-is decode b=1 {:.2}x",
        q8.1 / f32_.1,
        q8.2 / f32_.2,
        q8.3 / f32_.3,
        q8.2 / rows[1].2
    );
    println!(
        "vs llama.cpp Q4_1 on this machine (BASELINES.md: prompt 165-190, decode 52-65 tok/s): decode b=1 {:.2}x of 58.5",
        q8.2 / 58.5
    );
    let m =
        LoadedModel::load(&path, &Device::Cpu, WeightMode::Trainable(DType::F32)).expect("loads");
    let (tps, l0, l1) = train_tps(&m, 2, 128, if quick { 2 } else { 3 });
    println!("training f32, batch 2 x 128 tokens: {tps:.1} tok/s (loss {l0:.3} -> {l1:.3})");
}
