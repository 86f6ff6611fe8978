//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;

use candle_core::Device;
use hir_model::llama::{Config, Model};
use hir_model::weights::{WeightMode, Weights};
use hir_model::LoadedModel;
use tokenizers::models::wordlevel::WordLevel;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{SplitDelimiterBehavior, Tokenizer};

/// Characters of the tiny test vocabulary; id 0 is `<eos>`, id 1 `<unk>`.
pub const CHARS: &str = "abcdefghijklmnopqrstuvwxyz0123456789 .,?!:;()ABCDEFGHIJKLMNOPQ";

/// A character-level tokenizer with 64 ids.
pub fn char_tokenizer() -> Tokenizer {
    let mut vocab = std::collections::HashMap::new();
    vocab.insert("<eos>".to_string(), 0u32);
    vocab.insert("<unk>".to_string(), 1u32);
    for (i, c) in CHARS.chars().take(62).enumerate() {
        vocab.insert(c.to_string(), i as u32 + 2);
    }
    let model = WordLevel::builder()
        .vocab(vocab.into_iter().collect())
        .unk_token("<unk>".into())
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
    tok.add_special_tokens([tokenizers::AddedToken::from("<eos>", true)])
        .expect("adds");
    tok
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

/// Repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Path of the SmolLM2 GGUF, fetched by `scripts/fetch-model.sh` if missing.
pub fn smollm2_gguf() -> PathBuf {
    let root = repo_root();
    let path = root.join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !path.is_file() {
        let status = Command::new("bash")
            .arg(root.join("scripts/fetch-model.sh"))
            .status()
            .expect("runs scripts/fetch-model.sh");
        assert!(status.success(), "scripts/fetch-model.sh failed");
    }
    path
}

/// A scratch directory unique to the test.
pub fn scratch(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("creates scratch dir");
    d
}
