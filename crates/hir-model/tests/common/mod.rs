//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

use candle_core::{Device, Tensor, D};
use hir_model::arch::llama::{Config, Model};
use hir_model::formats::weights::{WeightMode, Weights};
use hir_model::LoadedModel;
use tokenizers::models::wordlevel::WordLevel;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{SplitDelimiterBehavior, Tokenizer};

/// Characters of the tiny test vocabulary; id 0 is `<eos>`, id 1 `<unk>`.
pub const CHARS: &str = "abcdefghijklmnopqrstuvwxyz0123456789 .,?!:;()ABCDEFGHIJKLMNOPQ";

/// A character-level tokenizer with 64 ids.
pub fn char_tokenizer() -> Tokenizer {
    special_char_tokenizer(&["<eos>", "<unk>"], "<unk>")
}

/// A character-level tokenizer with 64 ids laid out as T5's: `<pad>` 0, `</s>` 1, `<unk>` 2.
pub fn t5_char_tokenizer() -> Tokenizer {
    special_char_tokenizer(&["<pad>", "</s>", "<unk>"], "<unk>")
}

/// `specials` take the first ids (and are skipped when decoding), characters the rest.
fn special_char_tokenizer(specials: &[&str], unk: &str) -> Tokenizer {
    let mut vocab = std::collections::HashMap::new();
    for (i, s) in specials.iter().enumerate() {
        vocab.insert(s.to_string(), i as u32);
    }
    let n = specials.len();
    for (i, c) in CHARS.chars().take(64 - n).enumerate() {
        vocab.insert(c.to_string(), (i + n) as u32);
    }
    let model = WordLevel::builder()
        .vocab(vocab.into_iter().collect())
        .unk_token(unk.into())
        .build()
        .expect("vocab is valid");
    let mut tok = Tokenizer::new(model);
    tok.with_pre_tokenizer(Some(
        Split::new(
            SplitPattern::Regex(".".into()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .expect("regex is valid"),
    ));
    tok.add_special_tokens(
        specials
            .iter()
            .map(|s| tokenizers::AddedToken::from(*s, true)),
    )
    .expect("adds");
    tok
}

/// A folder holding a tiny random FLAN-T5 (seeded) with [`t5_char_tokenizer`].
pub fn tiny_t5_folder(name: &str, seed: u64) -> PathBuf {
    let w = Weights::random(
        seed,
        0.3,
        &Device::Cpu,
        WeightMode::Dense(candle_core::DType::F32),
    );
    let m = hir_model::arch::t5::Model::new(&hir_model::arch::t5::Config::tiny(), &w)
        .expect("tiny T5 builds");
    let dir = scratch(name);
    m.save(&dir, Some(&t5_char_tokenizer())).expect("saves");
    dir
}

/// Greedy decoding with T5 by full recomputation (no cache): up to `max_new_tokens`
/// tokens per row, rows that reached EOS padded after it. The reference that cached
/// sampling is checked against.
pub fn t5_greedy(
    m: &hir_model::arch::t5::Model,
    input_ids: &Tensor,
    mask: &[Vec<u8>],
    max_new_tokens: usize,
) -> hir_model::Result<Vec<Vec<u32>>> {
    let cfg = m.config();
    let b = input_ids.dim(0)?;
    let enc = m.encode(input_ids, mask)?;
    let mut seqs: Vec<Vec<u32>> = vec![vec![cfg.decoder_start_token_id]; b];
    let mut done = vec![false; b];
    for _ in 0..max_new_tokens {
        let t = seqs[0].len();
        let flat: Vec<u32> = seqs.iter().flatten().copied().collect();
        let ids = Tensor::from_vec(flat, (b, t), m.device())?;
        let logits = m.decode(&ids, &vec![vec![1u8; t]; b], &enc, mask)?;
        let next: Vec<u32> = logits
            .narrow(1, t - 1, 1)?
            .squeeze(1)?
            .argmax(D::Minus1)?
            .to_vec1()?;
        for (i, s) in seqs.iter_mut().enumerate() {
            let tok = if done[i] { cfg.pad_token_id } else { next[i] };
            if tok == cfg.eos_token_id {
                done[i] = true;
            }
            s.push(tok);
        }
        if done.iter().all(|d| *d) {
            break;
        }
    }
    Ok(seqs.into_iter().map(|s| s[1..].to_vec()).collect())
}

/// A tiny random Llama (seeded) in the given mode.
pub fn tiny_model(mode: WeightMode, seed: u64) -> (Model, Vec<(String, candle_core::Var)>) {
    let cfg = Config::tiny();
    let w = Weights::random(seed, 0.2, &Device::Cpu, mode);
    let m = Model::new(&cfg, &w).expect("tiny model builds");
    (m, w.vars())
}

/// The tiny model with the char tokenizer, EOS 0.
pub fn tiny_loaded(mode: WeightMode, seed: u64) -> LoadedModel {
    let (m, vars) = tiny_model(mode, seed);
    LoadedModel::from_parts(m, char_tokenizer(), vars, vec![0]).expect("parts fit")
}

/// Largest absolute value of a tensor.
pub fn max_abs(t: &candle_core::Tensor) -> f32 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// Largest absolute difference of two tensors.
pub fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    max_abs(&(a - b).unwrap())
}

/// Repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Path of the SmolLM2 GGUF, fetched by `scripts/fetch-model.sh` if missing.
pub fn smollm2_gguf() -> PathBuf {
    hir_runtime::models::fetch_smollm2(&repo_root()).expect("SmolLM2 is fetched")
}

/// A scratch directory unique to the test.
pub fn scratch(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("creates scratch dir");
    d
}
