//! GGUF loading on a tiny model written here in llama.cpp's layout
//! (renamed tensors, permuted q/k rows, tokenizer in the metadata).

mod common;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use hir_model::arch::llama::gguf::gguf_name;
use hir_model::{LoadedModel, ModelError, WeightMode};

/// llama.cpp's `permute` of q/k rows: `(H, 2, D/2, in) -> (H, D/2, 2, in)`.
fn permute(t: &Tensor, heads: usize) -> Tensor {
    let (out, inp) = t.dims2().unwrap();
    t.reshape((heads, 2, out / heads / 2, inp))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .contiguous()
        .unwrap()
        .reshape((out, inp))
        .unwrap()
}

fn write_gguf(path: &std::path::Path, arch: &str, n_tokens: usize) {
    let (m, _) = common::tiny_model(WeightMode::Dense(DType::F32), 31);
    let mut tensors = Vec::new();
    for (name, t) in m.named_tensors().unwrap() {
        let t = if name.ends_with("q_proj.weight") {
            permute(&t, 4)
        } else if name.ends_with("k_proj.weight") {
            permute(&t, 2)
        } else {
            t
        };
        let q = QTensor::quantize(&t, GgmlDType::F32).unwrap();
        tensors.push((gguf_name(&name).unwrap(), q));
    }
    let mut tokens = vec![Value::String("<eos>".into())];
    let mut types = vec![Value::I32(3)];
    for i in 1..n_tokens - 1 {
        tokens.push(Value::String(format!("t{i}")));
        types.push(Value::I32(1));
    }
    tokens.push(Value::String("t1t2".into()));
    types.push(Value::I32(1));
    let s = |x: &str| Value::String(x.into());
    let meta: Vec<(String, Value)> = vec![
        ("general.architecture".into(), s(arch)),
        (format!("{arch}.attention.head_count"), Value::U32(4)),
        (format!("{arch}.attention.head_count_kv"), Value::U32(2)),
        (format!("{arch}.embedding_length"), Value::U32(32)),
        (format!("{arch}.block_count"), Value::U32(2)),
        (format!("{arch}.feed_forward_length"), Value::U32(48)),
        (format!("{arch}.context_length"), Value::U32(128)),
        (
            format!("{arch}.attention.layer_norm_rms_epsilon"),
            Value::F32(1e-5),
        ),
        (format!("{arch}.rope.freq_base"), Value::F32(10000.0)),
        ("tokenizer.ggml.model".into(), s("gpt2")),
        ("tokenizer.ggml.tokens".into(), Value::Array(tokens)),
        ("tokenizer.ggml.token_type".into(), Value::Array(types)),
        (
            "tokenizer.ggml.merges".into(),
            Value::Array(vec![s("t1 t2")]),
        ),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(0)),
    ];
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &meta_refs, &tensor_refs).unwrap();
}

fn logits(m: &hir_model::arch::llama::Model) -> Tensor {
    let ids = Tensor::new(&[[3u32, 9, 27, 5, 61, 2]], &Device::Cpu).unwrap();
    m.forward(&ids, &[vec![1u8; 6]]).unwrap()
}

#[test]
fn gguf_weights_are_renamed_and_unpermuted() {
    let dir = common::scratch("gguf_tiny");
    let path = dir.join("tiny.gguf");
    write_gguf(&path, "llama", 64);
    let (reference, _) = common::tiny_model(WeightMode::Dense(DType::F32), 31);
    let want = logits(&reference);
    for mode in [
        WeightMode::Dense(DType::F32),
        WeightMode::Quantized,
        WeightMode::Trainable(DType::F32),
    ] {
        let m = LoadedModel::load(&path, &Device::Cpu, mode).unwrap();
        let d = common::max_abs_diff(&logits(m.model().as_llama().unwrap()), &want);
        // Quantized mode holds the f32 file's matrices as Q8_0 (about 0.5% weight error,
        // up to 10% of the logits' range in this tiny random model; a misplaced tensor
        // is off by the whole range).
        let scale = common::max_abs(&want);
        let tolerance = if mode == WeightMode::Quantized {
            0.1 * scale
        } else {
            1e-5
        };
        assert!(d < tolerance, "{mode:?}: {d} (logits up to {scale})");
        assert_eq!(m.eos_token_ids(), &[0]);
        assert_eq!(m.info().vocab_size, 64);
    }
    let m = LoadedModel::load(&path, &Device::Cpu, WeightMode::Quantized).unwrap();
    assert_eq!(m.encode("<eos>").unwrap(), vec![0]);
}

#[test]
fn gguf_with_another_architecture_is_refused() {
    let dir = common::scratch("gguf_arch");
    let path = dir.join("gpt2.gguf");
    write_gguf(&path, "gpt2", 64);
    match LoadedModel::load(&path, &Device::Cpu, WeightMode::Quantized) {
        Err(ModelError::UnsupportedArchitecture(a)) => assert_eq!(a, "gpt2"),
        other => panic!(
            "expected UnsupportedArchitecture, got {:?}",
            other.map(|_| ())
        ),
    }
}

#[test]
fn gguf_tokenizer_must_cover_the_vocabulary() {
    let dir = common::scratch("gguf_vocab");
    let path = dir.join("short.gguf");
    write_gguf(&path, "llama", 60);
    match LoadedModel::load(&path, &Device::Cpu, WeightMode::Quantized) {
        Err(ModelError::TokenizerMismatch(msg)) => {
            assert!(msg.contains("60") && msg.contains("64"), "{msg}")
        }
        other => panic!("expected TokenizerMismatch, got {:?}", other.map(|_| ())),
    }
}

#[test]
fn a_file_that_is_not_gguf_is_a_clear_error() {
    let dir = common::scratch("gguf_garbage");
    let path = dir.join("garbage.gguf");
    std::fs::write(&path, b"not a gguf file at all").unwrap();
    let err = LoadedModel::load(&path, &Device::Cpu, WeightMode::Quantized).unwrap_err();
    assert!(err.to_string().contains("garbage.gguf"), "{err}");
}
