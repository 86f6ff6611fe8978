//! The real SmolLM2-135M-Instruct (Q4_1 GGUF), fetched by `scripts/fetch-model.sh`.

mod common;

use candle_core::{DType, Device, Tensor};
use hir_model::train::{Example, Optimizer, TrainBatch};
use hir_model::{LoadedModel, SamplingParams, WeightMode};

const PROMPTS: [&str; 5] = [
    "Solve the question with correct answer.\n\nQ: If you have 3 apples and buy 2 more, how many apples do you have?\nA:",
    "Solve the question with correct answer.\n\nQ: Alice, Bob, and Claire are holding a red, a green and a blue ball. Alice swaps with Bob. Who holds the red ball?\nOptions:\n(A) Alice\n(B) Bob\n(C) Claire\nA:",
    "Solve the question with correct answer.\n\nQ: Sort the words alphabetically: pear apple mango\nA:",
    "Solve the question with correct answer.\n\nQ: What is the color of the sky on a clear day?\nA: The",
    "Solve the question with correct answer.\n\nQ: How many legs does a spider have?\nA: A spider has",
];

fn load(mode: WeightMode) -> LoadedModel {
    LoadedModel::load(&common::smollm2_gguf(), &Device::Cpu, mode).expect("SmolLM2 loads")
}

fn last_logits(m: &LoadedModel, prompt: &str) -> Vec<f32> {
    let ids = m.encode(prompt).unwrap();
    let t = ids.len();
    let x = Tensor::from_vec(ids, (1, t), &Device::Cpu).unwrap();
    let logits = m
        .model()
        .as_llama()
        .unwrap()
        .forward(&x, &[vec![1u8; t]])
        .unwrap();
    logits
        .get(0)
        .unwrap()
        .get(t - 1)
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(i, _)| i)
        .unwrap()
}

#[test]
fn smollm2_metadata_and_tokenizer_come_from_the_gguf() {
    let m = load(WeightMode::Quantized);
    let info = m.info();
    assert_eq!(info.architecture, "llama");
    assert_eq!(info.vocab_size, 49152);
    assert_eq!(info.eos_token_ids, vec![2]);
    assert!(
        (134_000_000..136_000_000).contains(&info.parameters),
        "{}",
        info.parameters
    );
    assert_eq!(m.encode("<|im_end|>").unwrap(), vec![2]);
    assert_eq!(m.encode("<|im_start|>").unwrap(), vec![1]);
    // Digits are split one by one (StarCoder-style pre-tokenizer).
    let ids = m.encode("1234 apples").unwrap();
    assert_eq!(m.decode(&ids).unwrap(), "1234 apples");
    assert!(ids.len() >= 5, "{ids:?}");
    assert!(m.chat_prompt("hi").starts_with("<|im_start|>system\n"));
}

fn probs(logits: &[f32]) -> Vec<f32> {
    let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let z: f32 = logits.iter().map(|l| (l - m).exp()).sum();
    logits.iter().map(|l| (l - m).exp() / z).collect()
}

#[test]
fn quantized_and_dequantized_models_agree_on_the_next_token() {
    let f = load(WeightMode::Dense(DType::F32));
    // Q4_1 kept as is: the same weights as the dequantized model.
    let raw = load(WeightMode::QuantizedAsIs);
    // Q4_1 re-quantized to Q8_0: adds about 0.5% weight error.
    let q8 = load(WeightMode::Quantized);
    let mut prompts: Vec<String> = PROMPTS.iter().map(|p| p.to_string()).collect();
    prompts.push(f.chat_prompt("What is the capital of France?"));
    let mut strict = 0;
    for p in &prompts {
        let pf = probs(&last_logits(&f, p));
        let top = argmax(&pf);
        let mut sorted = pf.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let clear = sorted[0] - sorted[1] > 0.1;
        strict += usize::from(clear);
        for (label, m) in [("Q4_1", &raw), ("Q8_0", &q8)] {
            let pq = probs(&last_logits(m, p));
            let tq = argmax(&pq);
            if clear {
                assert_eq!(tq, top, "{label} vs f32 on {p:?}");
            } else {
                // Near-ties (the raw HIR prompt hesitates between "\n" and
                // <|im_end|>) may flip: accept the dense model's runner-up.
                assert!(pf[tq] >= sorted[1], "{label} picks {tq} on {p:?}");
            }
            assert!(
                (pq[top] - pf[top]).abs() < 0.1,
                "{label}: {} vs {}",
                pq[top],
                pf[top]
            );
        }
    }
    assert!(strict >= 3, "only {strict} prompts with a clear top-1");
}

#[test]
fn greedy_chat_answer_is_sensible_text() {
    let m = load(WeightMode::Quantized);
    let prompts = vec![
        m.chat_prompt("What is the capital of France?"),
        m.chat_prompt("Name three colours."),
    ];
    let out = m
        .generate_text(&prompts, &SamplingParams::greedy(24))
        .unwrap();
    let paris = &out[0][0];
    assert!(paris.text.contains("Paris"), "{:?}", paris.text);
    let names_a_colour = |text: &str| {
        let text = text.to_lowercase();
        ["red", "blue", "green", "yellow"]
            .iter()
            .any(|c| text.contains(*c))
    };
    assert!(names_a_colour(&out[1][0].text), "{:?}", out[1][0].text);
    // Batched and alone agree on the next token and on a sensible answer. Not to the bit:
    // a batch's prompts together reach the row count from which quantized matrices
    // multiply with their f32 copy, while one short prompt alone uses Q8_0 dot products.
    let ids: Vec<Vec<u32>> = prompts.iter().map(|p| m.encode(p).unwrap()).collect();
    let both = hir_model::sampling::prefill(m.model(), &[&ids[0], &ids[1]], m.pad_token_id())
        .unwrap()
        .logits;
    let alone = hir_model::sampling::prefill(m.model(), &[&ids[1]], m.pad_token_id())
        .unwrap()
        .logits;
    let top = |t: &Tensor| argmax(&t.to_vec1::<f32>().unwrap());
    assert_eq!(top(&both.get(1).unwrap()), top(&alone.get(0).unwrap()));
    let alone = m
        .generate_text(&prompts[1..], &SamplingParams::greedy(24))
        .unwrap();
    assert!(names_a_colour(&alone[0][0].text), "{:?}", alone[0][0].text);
}

#[test]
fn raw_hir_prompt_often_ends_the_turn_at_once() {
    // HIR.md §7: under the raw paper prompt the first token is <|im_end|>.
    let m = load(WeightMode::Quantized);
    let out = m
        .generate_text(&[PROMPTS[1].to_string()], &SamplingParams::greedy(8))
        .unwrap();
    let s = &out[0][0];
    assert_eq!(s.finish_reason, hir_model::FinishReason::Eos);
    assert_eq!(s.token_ids.last(), Some(&2));
}

#[test]
fn dequantized_smollm2_trains_on_a_fixed_batch() {
    let m = load(WeightMode::Trainable(DType::F32));
    assert_eq!(m.vars().len(), 1 + 30 * 9 + 1);
    let ex = vec![Example {
        prompt: m
            .encode(&m.chat_prompt("Which ball does Alice hold?"))
            .unwrap(),
        completion: m.encode("(C) The blue ball.<|im_end|>").unwrap(),
    }];
    let batch = TrainBatch::new(&ex, m.pad_token_id(), &Device::Cpu).unwrap();
    let cfg = hir_model::train::AdamWConfig {
        lr: 1e-4,
        ..Default::default()
    };
    let mut optimizer = Optimizer::new(m.vars(), cfg, 1, Some(1.0));
    let mut losses = Vec::new();
    for _ in 0..3 {
        let loss = hir_model::train::lm_loss(m.model().as_llama().unwrap(), &batch, 0.0).unwrap();
        losses.push(loss.to_scalar::<f32>().unwrap());
        optimizer.backward(&loss).unwrap();
    }
    assert!(losses[2] < losses[0], "{losses:?}");
}

#[test]
fn a_dense_checkpoint_served_quantized_stays_within_the_probe_tolerance() {
    // What a CPU generator started from the GGUF does with a trainer's dense checkpoint:
    // its matrices become Q8_0 again.
    let dense = load(WeightMode::Dense(DType::F32));
    let dir = common::scratch("smollm2_dense_checkpoint");
    dense.save(&dir).unwrap();
    let q8 = LoadedModel::load(&dir, &Device::Cpu, WeightMode::Quantized).unwrap();
    assert_eq!(q8.info().dtype, "quantized");
    // The trainer's swap probe: the last 8 tokens of a prompt scored after the rest, mean
    // |log p| difference within its default tolerance for quantized generators (0.2);
    // measured up to about 0.07.
    for p in PROMPTS {
        let ids = dense.encode(p).unwrap();
        let (prompt, continuation) = ids.split_at(ids.len() - 8);
        let a = dense
            .model()
            .continuation_logprobs(prompt, continuation)
            .unwrap();
        let b = q8
            .model()
            .continuation_logprobs(prompt, continuation)
            .unwrap();
        let diff = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).sum::<f32>() / 8.0;
        assert!(diff < 0.2, "{p:?}: mean |diff| {diff}");
        assert!(diff > 0.0, "the matrices were quantized");
    }
}

#[test]
fn the_real_gguf_passes_the_start_check_and_a_cut_copy_does_not() {
    let path = common::smollm2_gguf();
    assert_eq!(hir_model::probe::probe(&path).as_deref(), Ok("llama"));
    // The same file cut short: its last tensors lie past the end.
    let bytes = std::fs::read(&path).unwrap();
    let cut = std::env::temp_dir().join(format!("hir-cut-{}.gguf", std::process::id()));
    std::fs::write(&cut, &bytes[..bytes.len() * 9 / 10]).unwrap();
    let err = hir_model::probe::probe(&cut).unwrap_err();
    assert!(err.contains("truncated"), "{err}");
    std::fs::remove_file(&cut).unwrap();
}

#[test]
fn a_lora_adapter_trained_on_the_gguf_serves_beside_the_quantized_weights() {
    let gguf = common::smollm2_gguf();
    let cfg = hir_model::arch::lora::LoraConfig::from_knobs(8, 16.0, "q_proj,v_proj").unwrap();
    let lm = LoadedModel::load_lora(&gguf, &Device::Cpu, DType::F32, &cfg, None, 1).unwrap();
    assert_eq!(lm.vars().len(), 30 * 2 * 2);
    let ex = vec![Example {
        prompt: lm
            .encode(&lm.chat_prompt("Which ball does Alice hold?"))
            .unwrap(),
        completion: lm.encode("(C) The blue ball.<|im_end|>").unwrap(),
    }];
    let batch = TrainBatch::new(&ex, lm.pad_token_id(), &Device::Cpu).unwrap();
    let adamw = hir_model::train::AdamWConfig {
        lr: 1e-2,
        ..Default::default()
    };
    let mut optimizer = lm.optimizer(adamw, 1, Some(1.0)).unwrap();
    for _ in 0..2 {
        let loss = hir_model::train::lm_loss(lm.model(), &batch, 0.0).unwrap();
        optimizer.backward(&loss).unwrap();
    }
    let dir = common::scratch("smollm2_lora");
    let adapter_dir = dir.join("adapter");
    lm.save(&adapter_dir).unwrap();

    // A generator holding the GGUF quantized serves the adapter beside its weights: within
    // the trainer's swap-probe tolerance of the trained model, and not the base's answer.
    let q8 = load(WeightMode::Quantized);
    let adapter =
        hir_model::arch::lora::Adapter::read(&adapter_dir, &Device::Cpu).expect("adapter reads");
    adapter
        .check_base(&hir_model::formats::checkpoint::model_digest(&gguf).unwrap())
        .unwrap();
    let served = q8.with_adapter(&adapter, &adapter_dir).unwrap();
    let (prompt, continuation) = (&ex[0].prompt, &ex[0].completion);
    let mean_diff = |a: &LoadedModel, b: &LoadedModel| {
        let x = a
            .model()
            .continuation_logprobs(prompt, continuation)
            .unwrap();
        let y = b
            .model()
            .continuation_logprobs(prompt, continuation)
            .unwrap();
        x.iter().zip(&y).map(|(p, q)| (p - q).abs()).sum::<f32>() / x.len() as f32
    };
    let (to_trained, base_to_trained) = (mean_diff(&served, &lm), mean_diff(&q8, &lm));
    assert!(to_trained < 0.2, "served adapter vs trained: {to_trained}");
    assert!(
        base_to_trained > 5.0 * to_trained,
        "{base_to_trained} vs {to_trained}"
    );

    // The logits of the prompt, for `scripts/check-peft-load.py` with the GGUF as base.
    let t = prompt.len();
    let x = Tensor::from_vec(prompt.clone(), (1, t), &Device::Cpu).unwrap();
    let logits = lm
        .model()
        .as_llama()
        .unwrap()
        .forward(&x, &[vec![1u8; t]])
        .unwrap();
    let out = std::collections::HashMap::from([
        ("input_ids".to_string(), x.to_dtype(DType::I64).unwrap()),
        ("logits".to_string(), logits),
    ]);
    candle_core::safetensors::save(&out, dir.join("expected.safetensors")).unwrap();
}

#[test]
fn a_frozen_base_dequantized_on_use_trains_adapters_bit_for_bit_as_the_dense_base() {
    // What a LoRA run on the CPU holds: the GGUF's matrices as the file has them,
    // dequantized for each product, against the same base dequantized once at load.
    let cfg = hir_model::arch::lora::LoraConfig::from_knobs(8, 16.0, "q_proj,v_proj").unwrap();
    let llama = |mode| match load(mode).into_model() {
        hir_model::AnyModel::Llama(m) => m,
        hir_model::AnyModel::T5(_) => unreachable!("SmolLM2 is a Llama"),
    };
    let mut on_use = llama(WeightMode::DequantizeOnUse);
    let mut dense = llama(WeightMode::Dense(DType::F32));
    let held = |m: &mut hir_model::arch::llama::Model| {
        m.layer_linears_mut()
            .iter()
            .filter(|(_, l)| l.dense_weight().is_some())
            .count()
    };
    // All but q_proj and k_proj, which the GGUF reader un-permutes into dense tensors.
    assert_eq!(
        held(&mut on_use),
        30 * 2,
        "the other matrices stay quantized"
    );
    assert_eq!(held(&mut dense), 30 * 7);

    let tokenizer = load(WeightMode::QuantizedAsIs);
    let ex = vec![Example {
        prompt: tokenizer.encode(PROMPTS[1]).unwrap(),
        completion: tokenizer.encode(" (C) Claire<|im_end|>").unwrap(),
    }];
    let batch = TrainBatch::new(&ex, tokenizer.pad_token_id(), &Device::Cpu).unwrap();
    let run = |m: &mut hir_model::arch::llama::Model| {
        let vars = hir_model::arch::lora::attach_trainable(m, &cfg, None, 3).unwrap();
        // B away from zero, so that A's gradients are not zero too.
        for (name, var) in &vars {
            if name.ends_with("lora_B.weight") {
                let w = hir_model::formats::weights::RandomSource::new(2, 0.01)
                    .tensor(name, var.dims(), &Device::Cpu)
                    .unwrap();
                var.set(&w).unwrap();
            }
        }
        let loss = hir_model::train::lm_loss(&*m, &batch, 0.1).unwrap();
        let grads = loss.backward().unwrap();
        let grads: Vec<Vec<f32>> = vars
            .iter()
            .map(|(_, v)| {
                grads
                    .get(v.as_tensor())
                    .expect("every adapter has a gradient")
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap()
            })
            .collect();
        (loss.to_scalar::<f32>().unwrap(), grads)
    };
    let (loss_a, grads_a) = run(&mut on_use);
    let (loss_b, grads_b) = run(&mut dense);
    assert_eq!(loss_a.to_bits(), loss_b.to_bits(), "{loss_a} vs {loss_b}");
    assert_eq!(grads_a.len(), 30 * 2 * 2);
    for (a, b) in grads_a.iter().zip(&grads_b) {
        assert!(a.iter().any(|g| *g != 0.0));
        assert!(a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()));
    }
}
