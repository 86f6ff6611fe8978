//! Tiny random Llama: numerics, gradients, strict loading, generation, training, checkpoints.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use common::{char_tokenizer, scratch, tiny_loaded, tiny_model};
use hir_model::arch::llama::{positions_from_mask, Batch, Config, Model};
use hir_model::formats::weights::{MemorySource, WeightMode, Weights};
use hir_model::sampling::{DecodeBatch, GenerationRequest, SamplingParams};
use hir_model::train::{Example, Optimizer, TrainBatch};
use hir_model::{LoadedModel, ModelError};

fn ids(rows: &[&[u32]]) -> Tensor {
    let t = rows[0].len();
    let flat: Vec<u32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
    Tensor::from_vec(flat, (rows.len(), t), &Device::Cpu).unwrap()
}

#[test]
fn fused_and_differentiable_paths_agree() {
    let (mut m, _) = tiny_model(WeightMode::Dense(DType::F32), 1);
    let x = ids(&[&[3, 4, 5, 6, 7], &[9, 9, 2, 8, 1]]);
    let mask = vec![vec![1u8; 5]; 2];
    let a = m.forward(&x, &mask).unwrap();
    m.set_fused(false);
    let b = m.forward(&x, &mask).unwrap();
    assert_eq!(a.dims(), &[2, 5, 64]);
    assert!(common::max_abs_diff(&a, &b) < 1e-5);
}

#[test]
fn left_padded_batch_matches_each_sequence_alone() {
    let (m, _) = tiny_model(WeightMode::Dense(DType::F32), 2);
    let long: &[u32] = &[3, 4, 5, 6, 7, 8];
    let short: &[u32] = &[10, 11, 12];
    let batch = ids(&[long, &[0, 0, 0, 10, 11, 12]]);
    let mask = vec![vec![1u8; 6], vec![0, 0, 0, 1, 1, 1]];
    let both = m.forward(&batch, &mask).unwrap();
    let alone = m.forward(&ids(&[short]), &[vec![1u8; 3]]).unwrap();
    let padded_rows = both.get(1).unwrap().narrow(0, 3, 3).unwrap();
    assert!(common::max_abs_diff(&padded_rows, &alone.get(0).unwrap()) < 1e-5);
    let alone_long = m.forward(&ids(&[long]), &[vec![1u8; 6]]).unwrap();
    assert!(common::max_abs_diff(&both.get(0).unwrap(), &alone_long.get(0).unwrap()) < 1e-5);
}

#[test]
fn kv_cache_steps_match_the_full_forward() {
    let (m, _) = tiny_model(WeightMode::Dense(DType::F32), 3);
    let seq: Vec<u32> = vec![5, 6, 7, 8, 9, 10, 11];
    let full = m.forward(&ids(&[&seq]), &[vec![1u8; 7]]).unwrap();
    let mut cache = m.new_cache();
    let mut mask = vec![vec![1u8; 4]];
    let pos = positions_from_mask(&mask);
    let first = m
        .forward_last(
            &Batch {
                input_ids: &ids(&[&seq[..4]]),
                key_mask: &mask,
                positions: &pos,
            },
            Some(&mut cache),
        )
        .unwrap();
    assert!(
        common::max_abs_diff(
            &first.get(0).unwrap(),
            &full.get(0).unwrap().get(3).unwrap()
        ) < 1e-5
    );
    for (t, &tok) in seq.iter().enumerate().skip(4) {
        mask[0].push(1);
        let step = m
            .forward_last(
                &Batch {
                    input_ids: &ids(&[&[tok]]),
                    key_mask: &mask,
                    positions: &[vec![t as u32]],
                },
                Some(&mut cache),
            )
            .unwrap();
        assert!(
            common::max_abs_diff(&step.get(0).unwrap(), &full.get(0).unwrap().get(t).unwrap())
                < 1e-5
        );
    }
    assert_eq!(cache.seq_len(), 7);
}

#[test]
fn every_weight_gets_a_nonzero_gradient() {
    let (m, vars) = tiny_model(WeightMode::Trainable(DType::F32), 4);
    let cfg = Config::tiny();
    // Embeddings are tied: one var per tensor of the checkpoint.
    let expected = 1 + cfg.num_hidden_layers * 9 + 1;
    assert_eq!(vars.len(), expected);
    let ex = [
        Example {
            prompt: vec![3, 4, 5],
            completion: vec![6, 7, 8, 9],
        },
        Example {
            prompt: vec![10, 11],
            completion: vec![12, 13],
        },
    ];
    let batch = TrainBatch::new(&ex, 0, &Device::Cpu).unwrap();
    let loss = hir_model::train::lm_loss(&m, &batch, 0.2).unwrap();
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
fn missing_or_misshaped_tensors_are_named_errors() {
    let (m, _) = tiny_model(WeightMode::Dense(DType::F32), 5);
    let mut tensors: HashMap<String, Tensor> = m.named_tensors().unwrap().into_iter().collect();
    let cfg = Config::tiny();
    let ok = Weights::new(
        Arc::new(MemorySource::new(tensors.clone())),
        &Device::Cpu,
        WeightMode::Dense(DType::F32),
    );
    Model::new(&cfg, &ok).expect("complete checkpoint loads");

    let name = "model.layers.1.mlp.up_proj.weight";
    let removed = tensors.remove(name).unwrap();
    let w = Weights::new(
        Arc::new(MemorySource::new(tensors.clone())),
        &Device::Cpu,
        WeightMode::Dense(DType::F32),
    );
    match Model::new(&cfg, &w) {
        Err(ModelError::MissingTensor { name: n, expected }) => {
            assert_eq!(n, name);
            assert_eq!(expected, vec![48, 32]);
        }
        other => panic!("expected MissingTensor, got {other:?}"),
    }
    tensors.insert(name.into(), removed.narrow(0, 0, 40).unwrap());
    let w = Weights::new(
        Arc::new(MemorySource::new(tensors)),
        &Device::Cpu,
        WeightMode::Dense(DType::F32),
    );
    let err = Model::new(&cfg, &w).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains(name) && msg.contains("[40, 32]") && msg.contains("[48, 32]"),
        "{msg}"
    );
}

#[test]
fn unsupported_architecture_is_an_error() {
    let dir = scratch("unsupported_arch");
    std::fs::write(
        dir.join("config.json"),
        r#"{"model_type": "gpt_neox", "vocab_size": 10}"#,
    )
    .unwrap();
    match LoadedModel::load(&dir, &Device::Cpu, WeightMode::Dense(DType::F32)) {
        Err(ModelError::UnsupportedArchitecture(a)) => assert_eq!(a, "gpt_neox"),
        other => panic!("expected UnsupportedArchitecture, got {other:?}"),
    }
}

fn request(id: u64, prompt: &str, params: SamplingParams) -> GenerationRequest {
    let tok = char_tokenizer();
    GenerationRequest {
        id,
        prompt_ids: tok.encode(prompt, false).unwrap().get_ids().to_vec(),
        params,
    }
}

#[test]
fn greedy_generation_is_deterministic_and_matches_unbatched() {
    let lm = tiny_loaded(WeightMode::Dense(DType::F32), 6);
    let p = SamplingParams::greedy(12);
    let reqs = vec![
        request(0, "hello there", p.clone()),
        request(1, "ab", p.clone()),
    ];
    let a = lm.generate(&reqs, 8).unwrap();
    let b = lm.generate(&reqs, 8).unwrap();
    assert_eq!(a, b);
    let alone = lm.generate(&reqs[1..], 8).unwrap();
    assert_eq!(a[1][0].token_ids, alone[0][0].token_ids);
    for s in a.iter().flatten() {
        assert!(s.token_ids.len() <= 12);
        assert_eq!(s.logprobs.len(), s.token_ids.len());
        assert!(s.logprobs.iter().all(|l| *l <= 0.0));
    }
}

#[test]
fn seeded_samples_do_not_depend_on_batch_composition() {
    let lm = tiny_loaded(WeightMode::Dense(DType::F32), 7);
    let p = SamplingParams {
        temperature: 1.0,
        top_k: Some(20),
        top_p: 0.9,
        seed: 42,
        max_new_tokens: 10,
        stop: vec![],
        n: 3,
    };
    let model = lm.model();
    let tok = lm.tokenizer();
    let target = request(7, "what is it?", p.clone());
    let run = |others: Vec<GenerationRequest>| {
        let mut batch = DecodeBatch::new(&[0], 0);
        let mut reqs = others;
        let streams: Vec<u64> = (0..reqs.len() as u64).map(|i| 100 + i).collect();
        reqs.push(target.clone());
        let mut streams = streams;
        streams.push(5);
        batch.admit(model, &reqs, &streams).unwrap();
        let mut out = Vec::new();
        while !batch.is_empty() {
            out.extend(batch.step(model, tok).unwrap());
        }
        let mut mine: Vec<_> = out.into_iter().filter(|s| s.request_id == 7).collect();
        mine.sort_by_key(|s| s.sample_index);
        mine.into_iter().map(|s| s.token_ids).collect::<Vec<_>>()
    };
    let alone = run(vec![]);
    let crowded = run(vec![
        request(1, "a much longer prompt than the others", p.clone()),
        request(2, "x", SamplingParams { n: 2, ..p.clone() }),
    ]);
    assert_eq!(alone, crowded);
    assert_eq!(alone.len(), 3);
    assert!(
        alone[0] != alone[1] || alone[1] != alone[2],
        "samples differ"
    );
}

#[test]
fn sequences_can_be_admitted_into_a_running_batch() {
    let lm = tiny_loaded(WeightMode::Dense(DType::F32), 8);
    let (model, tok) = (lm.model(), lm.tokenizer());
    let g = SamplingParams::greedy(8);
    let first = request(1, "first prompt", g.clone());
    let late = request(2, "late", g.clone());
    let mut batch = DecodeBatch::new(&[0], 0);
    batch
        .admit(model, std::slice::from_ref(&first), &[0])
        .unwrap();
    let mut out = Vec::new();
    for _ in 0..3 {
        out.extend(batch.step(model, tok).unwrap());
    }
    batch
        .admit(model, std::slice::from_ref(&late), &[1])
        .unwrap();
    while !batch.is_empty() {
        out.extend(batch.step(model, tok).unwrap());
    }
    let reference = lm.generate(&[first, late], 4).unwrap();
    for s in out {
        let want = &reference[(s.request_id - 1) as usize][0];
        assert_eq!(s.token_ids, want.token_ids, "request {}", s.request_id);
    }
}

#[test]
fn stop_strings_and_max_tokens_end_generation() {
    let lm = tiny_loaded(WeightMode::Dense(DType::F32), 9);
    let g = SamplingParams::greedy(16);
    let free = lm
        .generate(&[request(0, "stop test", g.clone())], 1)
        .unwrap();
    let s = &free[0][0];
    if s.finish_reason == hir_model::FinishReason::Length {
        assert_eq!(s.token_ids.len(), 16);
    }
    // Stop on the 3rd generated character.
    let stop: String = s.text.chars().skip(2).take(1).collect();
    if !stop.is_empty() {
        let p = SamplingParams {
            stop: vec![stop.clone()],
            ..g
        };
        let cut = lm.generate(&[request(0, "stop test", p)], 1).unwrap();
        assert_eq!(cut[0][0].finish_reason, hir_model::FinishReason::Stop);
        assert!(!cut[0][0].text.contains(&stop));
    }
}

#[test]
fn training_lowers_the_loss_on_a_fixed_batch() {
    let (m, vars) = tiny_model(WeightMode::Trainable(DType::F32), 10);
    let ex = [
        Example {
            prompt: vec![3, 4, 5],
            completion: vec![6, 7, 8, 9, 0],
        },
        Example {
            prompt: vec![10, 11],
            completion: vec![12, 13, 0],
        },
    ];
    let batch = TrainBatch::new(&ex, 0, &Device::Cpu).unwrap();
    let cfg = hir_model::train::AdamWConfig {
        lr: 1e-2,
        ..Default::default()
    };
    let mut optimizer = Optimizer::new(&vars, cfg, 2, Some(1.0));
    let mut losses = Vec::new();
    for _ in 0..16 {
        let loss = hir_model::train::lm_loss(&m, &batch, 0.0).unwrap();
        losses.push(loss.to_scalar::<f32>().unwrap());
        optimizer.backward(&loss).unwrap();
    }
    assert_eq!(optimizer.adamw().steps(), 8);
    assert!(losses[15] < 0.5 * losses[0], "{losses:?}");
}

#[test]
fn hir_loss_trains_on_paired_instructions() {
    let (m, vars) = tiny_model(WeightMode::Trainable(DType::F32), 11);
    let pos = TrainBatch::new(
        &[Example {
            prompt: vec![20, 21, 22],
            completion: vec![30, 31, 0],
        }],
        0,
        &Device::Cpu,
    )
    .unwrap();
    let neg = TrainBatch::new(
        &[Example {
            prompt: vec![23, 24, 22],
            completion: vec![30, 31, 0],
        }],
        0,
        &Device::Cpu,
    )
    .unwrap();
    let cfg = hir_model::train::loss::HirLossConfig::default();
    let mut optimizer = Optimizer::new(
        &vars,
        hir_model::train::AdamWConfig {
            lr: 1e-2,
            ..Default::default()
        },
        1,
        Some(1.0),
    );
    let first = hir_model::train::hir_loss(&m, &pos, &neg, &cfg).unwrap();
    let l0 = first.total.to_scalar::<f32>().unwrap();
    optimizer.backward(&first.total).unwrap();
    let mut last = l0;
    for _ in 0..6 {
        let l = hir_model::train::hir_loss(&m, &pos, &neg, &cfg).unwrap();
        last = l.total.to_scalar::<f32>().unwrap();
        optimizer.backward(&l.total).unwrap();
    }
    assert!(last < l0, "{l0} -> {last}");
}

#[test]
fn checkpoints_reload_bit_exactly_and_refuse_corruption() {
    let lm = tiny_loaded(WeightMode::Trainable(DType::F32), 12);
    let dir = scratch("checkpoint_roundtrip");
    let manifest = lm.save(&dir).unwrap();
    assert!(manifest.files.contains_key("model.safetensors"));
    // transformers validates config fields strictly: unset options are left out, not null.
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    let nulls: Vec<&String> = cfg
        .as_object()
        .unwrap()
        .iter()
        .filter(|(_, v)| v.is_null())
        .map(|(k, _)| k)
        .collect();
    assert!(nulls.is_empty(), "null fields in config.json: {nulls:?}");
    // An intact copy for scripts/check-hf-load.py (this one is corrupted below).
    lm.save(&scratch("checkpoint_intact")).unwrap();
    let back = LoadedModel::load(&dir, &Device::Cpu, WeightMode::Dense(DType::F32)).unwrap();
    let a = lm.model().as_llama().unwrap().named_tensors().unwrap();
    let b: HashMap<String, Tensor> = back
        .model()
        .as_llama()
        .unwrap()
        .named_tensors()
        .unwrap()
        .into_iter()
        .collect();
    assert_eq!(a.len(), b.len());
    for (name, t) in &a {
        let u = &b[name];
        let x: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        let y: Vec<f32> = u.flatten_all().unwrap().to_vec1().unwrap();
        assert!(
            x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits()),
            "{name} differs"
        );
    }
    assert_eq!(back.eos_token_ids(), &[0]);
    assert_eq!(back.encode("abc").unwrap(), lm.encode("abc").unwrap());

    // Flip one byte of the weights.
    let st = dir.join("model.safetensors");
    let mut bytes = std::fs::read(&st).unwrap();
    let n = bytes.len();
    bytes[n - 1] ^= 0x01;
    std::fs::write(&st, &bytes).unwrap();
    let refusal =
        |dir: &Path| match LoadedModel::load(dir, &Device::Cpu, WeightMode::Dense(DType::F32)) {
            Err(ModelError::ChecksumMismatch {
                path, algorithm, ..
            }) => {
                assert!(path.ends_with("model.safetensors"));
                algorithm
            }
            other => panic!("expected ChecksumMismatch, got {other:?}"),
        };
    // Checked against the weights' BLAKE3, which the manifest records beside the SHA-256.
    assert_eq!(refusal(&dir), "BLAKE3");
    // A manifest without BLAKE3 digests (as written before them) is checked by SHA-256: it
    // still refuses the flipped byte, and still loads the intact file.
    let mp = dir.join("manifest.json");
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(&mp).unwrap()).unwrap();
    assert_eq!(
        m["blake3"]["model.safetensors"].as_str(),
        manifest.blake3.get("model.safetensors").map(String::as_str)
    );
    m.as_object_mut().unwrap().remove("blake3");
    std::fs::write(&mp, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
    assert_eq!(refusal(&dir), "SHA-256");
    bytes[n - 1] ^= 0x01;
    std::fs::write(&st, &bytes).unwrap();
    LoadedModel::load(&dir, &Device::Cpu, WeightMode::Dense(DType::F32)).unwrap();
}

#[test]
fn a_tokenizer_larger_than_the_vocabulary_is_refused() {
    let cfg: Config = serde_json::from_value(serde_json::json!({
        "model_type": "llama", "vocab_size": 32, "hidden_size": 32, "intermediate_size": 48,
        "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
        "tie_word_embeddings": true
    }))
    .unwrap();
    let w = Weights::random(1, 0.2, &Device::Cpu, WeightMode::Dense(DType::F32));
    let m = Model::new(&cfg, &w).unwrap();
    match LoadedModel::from_parts(m, char_tokenizer(), vec![], vec![0]) {
        Err(ModelError::TokenizerMismatch(msg)) => assert!(msg.contains("64"), "{msg}"),
        other => panic!("expected TokenizerMismatch, got {other:?}"),
    }
}

#[test]
fn sharded_safetensors_folders_load() {
    let lm = tiny_loaded(WeightMode::Dense(DType::F32), 13);
    let dir = scratch("sharded");
    lm.save(&dir).unwrap();
    std::fs::remove_file(dir.join("manifest.json")).unwrap();
    let all = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    let mut names: Vec<&String> = all.keys().collect();
    names.sort();
    let (a, b) = names.split_at(names.len() / 2);
    let mut map = serde_json::Map::new();
    for (file, part) in [
        ("model-00001-of-00002.safetensors", a),
        ("model-00002-of-00002.safetensors", b),
    ] {
        let shard: HashMap<String, Tensor> = part
            .iter()
            .map(|n| ((*n).clone(), all[*n].clone()))
            .collect();
        candle_core::safetensors::save(&shard, dir.join(file)).unwrap();
        for n in part {
            map.insert((*n).clone(), serde_json::json!(file));
        }
    }
    let index = serde_json::json!({ "metadata": {}, "weight_map": map });
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let back = LoadedModel::load(&dir, &Device::Cpu, WeightMode::Dense(DType::F32)).unwrap();
    let x = Tensor::new(&[[3u32, 4, 5]], &Device::Cpu).unwrap();
    let mask = [vec![1u8; 3]];
    let d = common::max_abs_diff(
        &lm.model().as_llama().unwrap().forward(&x, &mask).unwrap(),
        &back.model().as_llama().unwrap().forward(&x, &mask).unwrap(),
    );
    assert_eq!(d, 0.0);
}

#[test]
fn cancelled_requests_leave_the_others_untouched() {
    let lm = tiny_loaded(WeightMode::Dense(DType::F32), 14);
    let (model, tok) = (lm.model(), lm.tokenizer());
    let g = SamplingParams::greedy(10);
    let keep = request(1, "keep this one", g.clone());
    let drop = request(2, "drop me", SamplingParams { n: 2, ..g.clone() });
    let mut batch = DecodeBatch::new(&[], 0);
    batch.admit(model, &[keep.clone(), drop], &[0, 1]).unwrap();
    assert_eq!(batch.request_ids(), [1, 2].into_iter().collect());
    batch.step(model, tok).unwrap();
    assert_eq!(batch.retain_requests(|id| id != 2).unwrap(), 2);
    assert_eq!(batch.request_ids(), [1].into_iter().collect());
    let mut out = Vec::new();
    while !batch.is_empty() {
        out.extend(batch.step(model, tok).unwrap());
    }
    let reference = lm.generate(&[keep], 1).unwrap();
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].token_ids, reference[0][0].token_ids);
    assert_eq!(batch.retain_requests(|_| false).unwrap(), 0);
}

#[test]
fn layer_by_layer_gradients_equal_the_whole_graph_for_every_weight() {
    use hir_model::train::{GradAccumulator, TrainLogits};
    let (m, vars) = tiny_model(WeightMode::Trainable(DType::F32), 13);
    let ex = |prompt: Vec<u32>, completion: Vec<u32>| Example { prompt, completion };
    // Mixed prompt and completion lengths: padding inside both batches.
    let pos = TrainBatch::new(
        &[
            ex(vec![20, 21, 22, 5, 6, 7], vec![30, 31, 0]),
            ex(vec![23, 24], vec![32, 0]),
            ex(vec![9, 8, 7, 6], vec![33, 34, 35, 0]),
        ],
        0,
        &Device::Cpu,
    )
    .unwrap();
    let neg = TrainBatch::new(
        &[
            ex(vec![25, 21, 22], vec![30, 31, 0]),
            ex(vec![26, 24, 27, 28, 29], vec![32, 0]),
            ex(vec![9, 8], vec![33, 34, 35, 0]),
        ],
        0,
        &Device::Cpu,
    )
    .unwrap();
    let cfg = hir_model::train::loss::HirLossConfig::default();
    let plain: Vec<_> = vars.iter().map(|(_, v)| v.clone()).collect();

    let whole = hir_model::train::hir_loss(&m, &pos, &neg, &cfg).unwrap();
    let mut want = GradAccumulator::new(plain.len());
    want.add(&plain, &whole.total.backward().unwrap(), 0.5)
        .unwrap();

    // Keeping no layer's products, the top layer's, and every layer's.
    let c = m.config();
    let width = (c.num_attention_heads + 2 * c.kv_heads()) * c.head_size()
        + 2 * c.hidden_size
        + 2 * c.intermediate_size;
    let one_layer = 4 * width * (pos.input_ids.elem_count() + neg.input_ids.elem_count());
    for budget in [0, one_layer, usize::MAX] {
        let mut m = m.clone();
        m.set_kept_products(budget);
        let mut got = GradAccumulator::new(plain.len());
        let mut parts = 0;
        let layered = m
            .hir_gradients(&pos, &neg, &cfg, &mut |g| {
                parts += 1;
                got.add_part(&plain, g, 0.5)
            })
            .unwrap();
        // Head, two sides per layer, two embeddings.
        assert_eq!(parts, 1 + 2 * m.config().num_hidden_layers + 2);
        let (a, b) = (
            whole.total.to_scalar::<f32>().unwrap(),
            layered.total.to_scalar::<f32>().unwrap(),
        );
        assert!((a - b).abs() < 1e-5, "budget {budget}: {a} vs {b}");
        for (i, (name, _)) in vars.iter().enumerate() {
            let w = want
                .grad(i)
                .unwrap_or_else(|| panic!("no gradient for {name}"));
            let g = got
                .grad(i)
                .unwrap_or_else(|| panic!("no layered gradient for {name}"));
            let scale = w
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let d = common::max_abs_diff(g, w);
            assert!(
                d <= 1e-4 * scale.max(1e-3),
                "budget {budget}, {name}: max |diff| {d} (scale {scale})"
            );
        }
        assert!(
            !layered.total.track_op(),
            "the returned loss holds no graph"
        );
    }
}
