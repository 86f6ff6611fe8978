//! Tiny random FLAN-T5: padding masks, gradients, loading from a folder.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use hir_model::arch::t5::{load_folder, Config, Model};
use hir_model::formats::weights::{WeightMode, Weights};
use hir_model::train::loss::{label_smoothed_cross_entropy, IGNORE_INDEX};
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
    assert!(common::max_abs_diff(&got, &alone.get(0).unwrap()) < 1e-5);
    let long_alone = m
        .forward(
            &ids(&[src_long]),
            &[vec![1; 6]],
            &ids(&[dec_long]),
            &[vec![1; 4]],
        )
        .unwrap();
    let d = common::max_abs_diff(&batch.get(0).unwrap(), &long_alone.get(0).unwrap());
    let scale = common::max_abs(&long_alone);
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
    assert!(common::max_abs_diff(&a.narrow(1, 0, 2).unwrap(), &b.narrow(1, 0, 2).unwrap()) < 1e-6);
    assert!(common::max_abs_diff(&a.narrow(1, 2, 2).unwrap(), &b.narrow(1, 2, 2).unwrap()) > 1e-4);
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
    assert_eq!(common::max_abs_diff(&a, &b), 0.0);
    let greedy = common::t5_greedy(&back, &src, &[vec![1; 4]], 5).unwrap();
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

fn loaded_t5(name: &str, seed: u64) -> hir_model::LoadedModel {
    let dir = common::tiny_t5_folder(name, seed);
    hir_model::LoadedModel::load(&dir, &Device::Cpu, WeightMode::Dense(DType::F32)).unwrap()
}

#[test]
fn t5_folder_loads_as_a_generating_model() {
    let lm = loaded_t5("t5_loaded", 3);
    let info = lm.info();
    assert_eq!(info.architecture, "t5");
    assert_eq!((info.vocab_size, info.context_length), (64, 512));
    assert_eq!(info.eos_token_ids, vec![1]);
    assert_eq!(lm.pad_token_id(), 0);
    let expected_params: usize = lm
        .model()
        .as_t5()
        .unwrap()
        .named_tensors()
        .iter()
        .map(|(_, t)| t.elem_count())
        .sum();
    assert_eq!(info.parameters, expected_params);
    // Counted from the shapes, so a quantized model has the same count.
    let dir = common::tiny_t5_folder("t5_loaded_q", 3);
    let q = hir_model::LoadedModel::load(&dir, &Device::Cpu, WeightMode::Quantized).unwrap();
    assert_eq!(q.info().dtype, "quantized");
    assert_eq!(q.info().parameters, expected_params);
    // The encoder input ends with </s>, as T5's tokenizer adds; once.
    let ids = lm.encode_prompt("abc").unwrap();
    assert_eq!(ids.len(), 4);
    assert_eq!(ids.last(), Some(&1));
    assert_eq!(lm.encode_prompt("abc</s>").unwrap(), ids);
    // No chat template: the chat prompt is the text.
    assert_eq!(lm.chat_prompt("abc"), "abc");
}

#[test]
fn t5_greedy_generation_with_the_cache_matches_full_recomputation() {
    let lm = loaded_t5("t5_greedy", 4);
    let m = lm.model().as_t5().unwrap();
    let prompts = ["what is 2 + 3?", "hi", "a longer prompt, with more words."];
    let got = lm
        .generate_text(
            &prompts.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
            &hir_model::SamplingParams::greedy(12),
        )
        .unwrap();
    for (p, out) in prompts.iter().zip(&got) {
        let ids = lm.encode_prompt(p).unwrap();
        let src = Tensor::from_vec(ids.clone(), (1, ids.len()), &Device::Cpu).unwrap();
        let want = common::t5_greedy(m, &src, &[vec![1; ids.len()]], 12)
            .unwrap()
            .remove(0);
        // The reference pads after EOS; the batch stops there.
        let want: Vec<u32> = match want.iter().position(|&t| t == 1) {
            Some(e) => want[..=e].to_vec(),
            None => want,
        };
        assert_eq!(out[0].token_ids, want, "prompt {p:?}");
        assert_eq!(out[0].logprobs.len(), want.len());
        // Sampled log-probabilities agree with a full teacher-forced pass.
        let full = lm.model().continuation_logprobs(&ids, &want).unwrap();
        for (a, b) in out[0].logprobs.iter().zip(&full) {
            assert!((a - b).abs() < 1e-4, "{a} vs {b}");
        }
    }
}

#[test]
fn t5_sampling_is_seeded_and_shares_the_prompt() {
    let lm = loaded_t5("t5_sampling", 5);
    let params = hir_model::SamplingParams {
        temperature: 1.0,
        top_k: Some(20),
        top_p: 0.95,
        seed: 11,
        max_new_tokens: 10,
        stop: Vec::new(),
        n: 4,
    };
    let prompts = vec!["abc".to_string(), "a much longer prompt".to_string()];
    let a = lm.generate_text(&prompts, &params).unwrap();
    let b = lm.generate_text(&prompts, &params).unwrap();
    assert_eq!(a, b, "the same seed gives the same samples");
    assert_eq!(a[0].len(), 4);
    let distinct: std::collections::HashSet<_> = a[1].iter().map(|s| &s.token_ids).collect();
    assert!(distinct.len() > 1, "n samples differ: {:?}", a[1]);
    let other = lm
        .generate_text(&prompts, &hir_model::SamplingParams { seed: 12, ..params })
        .unwrap();
    assert_ne!(a, other);
}

#[test]
fn t5_sequences_admitted_mid_batch_decode_as_if_alone() {
    use hir_model::{DecodeBatch, GenerationRequest, SamplingParams};
    let lm = loaded_t5("t5_continuous", 6);
    let (model, tok) = (lm.model(), lm.tokenizer());
    let req = |id: u64, text: &str| GenerationRequest {
        id,
        prompt_ids: lm.encode_prompt(text).unwrap(),
        params: SamplingParams::greedy(8),
    };
    let alone = |r: &GenerationRequest| {
        let mut b = DecodeBatch::new(lm.eos_token_ids(), lm.pad_token_id());
        b.admit(model, std::slice::from_ref(r), &[0]).unwrap();
        let mut out = Vec::new();
        while !b.is_empty() {
            out.extend(b.step(model, tok).unwrap());
        }
        out.remove(0).token_ids
    };
    let (first, second) = (req(1, "the first prompt is long"), req(2, "short"));
    let mut batch = DecodeBatch::new(lm.eos_token_ids(), lm.pad_token_id());
    batch
        .admit(model, std::slice::from_ref(&first), &[0])
        .unwrap();
    let mut done = Vec::new();
    for _ in 0..3 {
        done.extend(batch.step(model, tok).unwrap());
    }
    // A second request joins with a shorter encoder input and a shorter decoder cache.
    batch
        .admit(model, std::slice::from_ref(&second), &[0])
        .unwrap();
    while !batch.is_empty() {
        done.extend(batch.step(model, tok).unwrap());
    }
    for r in [&first, &second] {
        let got = done.iter().find(|s| s.request_id == r.id).unwrap();
        assert_eq!(got.token_ids, alone(r), "request {}", r.id);
    }
}

#[test]
fn t5_checkpoint_round_trips_through_loaded_model() {
    let lm = loaded_t5("t5_roundtrip_src", 7);
    let dir = common::scratch("t5_roundtrip_dst");
    lm.save(&dir).unwrap();
    let back =
        hir_model::LoadedModel::load(&dir, &Device::Cpu, WeightMode::Dense(DType::F32)).unwrap();
    assert_eq!(back.info().architecture, "t5");
    let prompts = vec!["abc".to_string()];
    let p = hir_model::SamplingParams::greedy(8);
    assert_eq!(
        lm.generate_text(&prompts, &p).unwrap(),
        back.generate_text(&prompts, &p).unwrap()
    );
    // A corrupted weight file is refused by its manifest digest.
    let w = dir.join("model.safetensors");
    let mut bytes = std::fs::read(&w).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&w, bytes).unwrap();
    match hir_model::LoadedModel::load(&dir, &Device::Cpu, WeightMode::Dense(DType::F32)) {
        Err(ModelError::ChecksumMismatch { path, .. }) => assert_eq!(path, w),
        other => panic!("expected a checksum mismatch, got {other:?}"),
    }
}

#[test]
fn t5_folder_without_a_tokenizer_is_refused_for_generation() {
    let dir = common::tiny_t5_folder("t5_no_tokenizer", 8);
    std::fs::remove_file(dir.join("tokenizer.json")).unwrap();
    std::fs::remove_file(dir.join(hir_model::formats::checkpoint::MANIFEST)).unwrap();
    match hir_model::LoadedModel::load(&dir, &Device::Cpu, WeightMode::Dense(DType::F32)) {
        Err(ModelError::MissingFile { path }) => assert!(path.ends_with("tokenizer.json")),
        other => panic!("expected a missing tokenizer, got {other:?}"),
    }
}

#[test]
fn t5_training_batches_shift_labels_and_the_hir_loss_falls() {
    use hir_model::train::{hir_loss, AdamWConfig, Example, Optimizer, TrainBatch};
    let (m, vars) = tiny(WeightMode::Trainable(DType::F32));
    let model = hir_model::AnyModel::from(m);
    let pos = [
        Example {
            prompt: vec![5, 6, 7, 1],
            completion: vec![20, 21, 1],
        },
        Example {
            prompt: vec![8, 1],
            completion: vec![30, 1],
        },
    ];
    let neg: Vec<Example> = pos
        .iter()
        .map(|e| Example {
            prompt: [&[40u32][..], &e.prompt].concat(),
            completion: e.completion.clone(),
        })
        .collect();
    let b = TrainBatch::for_model(&model, &pos, 0, &Device::Cpu).unwrap();
    // Encoder input right-padded; labels -100-padded; decoder input behind the start token.
    assert_eq!(b.mask, vec![vec![1, 1, 1, 1], vec![1, 1, 0, 0]]);
    let labels: Vec<Vec<i64>> = b.labels.to_vec2().unwrap();
    assert_eq!(labels, vec![vec![20, 21, 1], vec![30, 1, IGNORE_INDEX]]);
    let (dec, dec_mask) = b.decoder.clone().unwrap();
    assert_eq!(
        dec.to_vec2::<u32>().unwrap(),
        vec![vec![0, 20, 21], vec![0, 30, 1]]
    );
    assert_eq!(dec_mask, vec![vec![1, 1, 1], vec![1, 1, 0]]);
    assert_eq!(b.n_labels, 5);
    // A decoder-only batch is refused by T5, with the way out.
    let flat = TrainBatch::new(&pos, 0, &Device::Cpu).unwrap();
    let err = hir_model::train::lm_loss(&model, &flat, 0.0).unwrap_err();
    assert!(err.to_string().contains("for_model"), "{err}");

    let n = TrainBatch::for_model(&model, &neg, 0, &Device::Cpu).unwrap();
    let cfg = hir_model::train::loss::HirLossConfig::default();
    let mut optimizer = Optimizer::new(
        &vars,
        AdamWConfig {
            lr: 3e-3,
            ..Default::default()
        },
        1,
        Some(1.0),
    );
    let first = hir_loss(&model, &b, &n, &cfg).unwrap();
    let first_total: f32 = first.total.to_scalar().unwrap();
    for _ in 0..20 {
        let l = hir_loss(&model, &b, &n, &cfg).unwrap();
        optimizer.backward(&l.total).unwrap();
    }
    let last: f32 = hir_loss(&model, &b, &n, &cfg)
        .unwrap()
        .total
        .to_scalar()
        .unwrap();
    assert!(last < first_total - 0.5, "loss {first_total} -> {last}");
}

/// The dtype the CUDA path uses: sampling and a training step run in bf16 too.
#[test]
fn t5_samples_and_trains_in_bf16() {
    use hir_model::train::{hir_loss, AdamWConfig, Example, Optimizer, TrainBatch};
    let dir = common::tiny_t5_folder("t5_bf16", 9);
    let lm =
        hir_model::LoadedModel::load(&dir, &Device::Cpu, WeightMode::Dense(DType::BF16)).unwrap();
    assert_eq!(lm.info().dtype, "bf16");
    let params = hir_model::SamplingParams {
        n: 2,
        seed: 3,
        ..hir_model::SamplingParams::greedy(6)
    };
    let out = lm
        .generate_text(&["abc".to_string(), "a longer one".to_string()], &params)
        .unwrap();
    for s in out.iter().flatten() {
        assert!(!s.token_ids.is_empty() && s.token_ids.len() <= 6);
        assert!(s.logprobs.iter().all(|l| l.is_finite() && *l <= 0.0));
    }
    let trainable =
        hir_model::LoadedModel::load(&dir, &Device::Cpu, WeightMode::Trainable(DType::BF16))
            .unwrap();
    let model = trainable.model();
    let ex = |p: Vec<u32>| Example {
        prompt: p,
        completion: vec![20, 21, 1],
    };
    let pos = TrainBatch::for_model(model, &[ex(vec![5, 6, 1])], 0, &Device::Cpu).unwrap();
    let neg = TrainBatch::for_model(model, &[ex(vec![7, 1])], 0, &Device::Cpu).unwrap();
    let l = hir_loss(model, &pos, &neg, &Default::default()).unwrap();
    let mut optimizer = Optimizer::new(trainable.vars(), AdamWConfig::default(), 1, Some(1.0));
    let report = optimizer
        .backward(&l.total)
        .unwrap()
        .expect("one micro-batch steps");
    assert!(report.grad_norm.is_finite() && report.grad_norm > 0.0);
}

#[test]
fn samples_of_a_prompt_share_one_encoded_prompt() {
    let (m, _) = tiny(WeightMode::Dense(DType::F32));
    let (p0, p1): (&[u32], &[u32]) = (&[5, 6, 7, 8, 9, 1], &[10, 11, 1]);
    // Two prompts, three and two samples: two encoded prompts for five rows.
    let (cache, _) = m.prefill(&[p0, p1], 0).unwrap();
    let mut shared = cache.select(&[0, 0, 0, 1, 1]).unwrap();
    assert_eq!((shared.rows(), shared.groups()), (5, 2));
    // The same rows, each with its own copy.
    let (mut copies, _) = m.prefill(&[p0, p0, p0, p1, p1], 0).unwrap();
    assert_eq!(copies.groups(), 5);
    let tokens = [20u32, 21, 22, 30, 31];
    let mask = vec![vec![1u8, 1]; 5];
    let a = m.decode_step(&tokens, &mask, &mut shared).unwrap();
    let b = m.decode_step(&tokens, &mask, &mut copies).unwrap();
    assert!(common::max_abs_diff(&a, &b) < 1e-5);
    // Retiring rows keeps the sharing; rows of one group apart from each other split it.
    let mut kept = shared.select(&[1, 2, 4]).unwrap();
    assert_eq!((kept.rows(), kept.groups()), (3, 2));
    let mut apart = shared.select(&[0, 3, 1]).unwrap();
    assert_eq!((apart.rows(), apart.groups()), (3, 3));
    let mask = vec![vec![1u8, 1, 1]; 3];
    let k = m.decode_step(&[40, 41, 42], &mask, &mut kept).unwrap();
    let k_ref = m
        .decode_step(
            &[40, 41, 42],
            &mask,
            &mut copies.select(&[1, 2, 4]).unwrap(),
        )
        .unwrap();
    assert!(common::max_abs_diff(&k, &k_ref) < 1e-5);
    let p = m.decode_step(&[40, 41, 42], &mask, &mut apart).unwrap();
    let p_ref = m
        .decode_step(
            &[40, 41, 42],
            &mask,
            &mut copies.select(&[0, 3, 1]).unwrap(),
        )
        .unwrap();
    assert!(common::max_abs_diff(&p, &p_ref) < 1e-5);
    assert!(
        m.decode_step(&[1], &[vec![1, 1, 1]], &mut kept).is_err(),
        "row count checked"
    );
}

#[test]
fn training_dropout_draws_seeded_masks_and_takes_three_passes() {
    use hir_model::train::{hir_loss, Example, TrainBatch, TrainLogits};
    let (mut m, _) = tiny(WeightMode::Trainable(DType::F32));
    let src = ids(&[&[5, 6, 7, 1]]);
    let dec = ids(&[&[0, 20, 21]]);
    let forward = |m: &Model| m.forward(&src, &[vec![1; 4]], &dec, &[vec![1; 3]]).unwrap();
    let plain = forward(&m);
    assert!(!TrainLogits::has_dropout(&m));
    assert!(
        m.set_train_dropout(1.0, 1).is_err(),
        "a rate of 1 drops everything"
    );
    m.set_train_dropout(0.1, 7).unwrap();
    assert!(TrainLogits::has_dropout(&m));
    let first = forward(&m);
    let second = forward(&m);
    assert!(
        common::max_abs_diff(&first, &second) > 1e-4,
        "each pass draws new masks"
    );
    assert!(common::max_abs_diff(&first, &plain) > 1e-4);
    m.reseed_dropout(7);
    assert_eq!(
        common::max_abs_diff(&forward(&m), &first),
        0.0,
        "the same seed, the same masks"
    );
    // The HIR loss under dropout: repeatable for a seed, another value for another seed.
    let ex = [Example {
        prompt: vec![5, 6, 7, 1],
        completion: vec![20, 21, 1],
    }];
    let any = hir_model::AnyModel::T5(m.clone());
    let b = TrainBatch::for_model(&any, &ex, 0, &Device::Cpu).unwrap();
    m.reseed_dropout(3);
    let l = hir_loss(&m, &b, &b, &Default::default()).unwrap();
    m.reseed_dropout(3);
    let again = hir_loss(&m, &b, &b, &Default::default()).unwrap();
    assert_eq!(l.label_smoothed, again.label_smoothed, "seeded: repeatable");
    assert_eq!(l.contrastive, again.contrastive);
    m.reseed_dropout(4);
    let other = hir_loss(&m, &b, &b, &Default::default()).unwrap();
    assert_ne!(
        l.label_smoothed, other.label_smoothed,
        "another seed, other masks"
    );
    m.set_train_dropout(0.0, 0).unwrap();
    assert!(!TrainLogits::has_dropout(&m), "rate 0 turns it off");
}
