//! Training throughput of HIR's supervised phase.
//!
//! For SmolLM2-135M (the GGUF of `scripts/fetch-model.sh`, dequantized to f32) and a
//! FLAN-T5-base-shaped model (random weights, 248M parameters), prints the step time and
//! training tokens/s of one optimizer step over HIR pairs (positive and negative sequence
//! per example, AdamW with clipping), and of the reference implementation's step, which
//! runs a third, redundant forward pass (HIR.md §1.6), measured in the same process; for
//! SmolLM2 also the step with LoRA adapters (rank 8 on `q_proj` and `v_proj`) beside the
//! frozen weights.
//!
//! Run: `cargo bench -p hir-trainer --bench trainer [-- --device cuda:0] [--random] [bf16] [quick]
//! [trainer-only]` (`bf16`: bf16 weights with f32 master copies, as the trainer trains on a
//! GPU; `trainer-only`: the trainer's own step alone, for comparing two builds).
//! SmolLM2 pairs are built by the trainer's own example builder from TSO-3 prompts;
//! `--random` uses random weights of SmolLM2's shape and random pairs of the same lengths.

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use hir_core::rng::SplitMix64;
use hir_model::formats::weights::Weights;
use hir_model::train::loss::{self, HirLossConfig};
use hir_model::train::{AdamWConfig, Optimizer, TrainBatch, TrainLogits};
use hir_model::WeightMode;
use hir_trainer::examples::{self, HirExample, RelabeledSample};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn smollm2_path() -> PathBuf {
    hir_runtime::models::fetch_smollm2(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.."))
        .expect("SmolLM2 is fetched")
}

/// Timed steps: median step seconds, tokens per step, and the peak resident memory the
/// steps added to what the process held before them.
struct Timing {
    step_s: f64,
    tokens: usize,
    peak_mib: Option<f64>,
}

impl Timing {
    fn tps(&self) -> f64 {
        self.tokens as f64 / self.step_s
    }

    fn memory(&self) -> String {
        match self.peak_mib {
            Some(m) => format!("peak +{m:.0} MiB"),
            None => "peak n/a".into(),
        }
    }
}

/// Runs `steps + 1` steps (the first a warm-up) and times them, recording the peak
/// resident memory above the level before the first.
fn timed(steps: usize, tokens: usize, device: &Device, mut step: impl FnMut()) -> Timing {
    // What an earlier measurement freed goes back first, so that its pages are not
    // reused here unseen.
    hir_runtime::memory::release_free();
    let start = hir_runtime::memory::reset_peak()
        .then(hir_runtime::memory::Rss::read)
        .flatten();
    let mut times = Vec::new();
    for _ in 0..steps + 1 {
        let t = Instant::now();
        step();
        sync(device);
        times.push(t.elapsed().as_secs_f64());
    }
    times.remove(0); // warm-up
    let peak_mib = start.and_then(|s| {
        let end = hir_runtime::memory::Rss::read()?;
        Some(hir_runtime::memory::mib(end.peak.saturating_sub(s.now)))
    });
    Timing {
        step_s: median(times),
        tokens,
        peak_mib,
    }
}

/// How a step computes its gradients.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Path {
    /// The trainer's: `Optimizer::backward_hir` (layer by layer for the Llama family).
    Trainer,
    /// One backward pass over the whole graph of both sequences.
    WholeGraph,
    /// The reference's: the whole graph with a third, redundant forward pass.
    Reference,
}

/// HIR pairs of TSO-3 training prompts with plausible outputs, built like the trainer does.
fn smollm2_examples(model: &hir_model::LoadedModel, n: usize) -> Vec<HirExample> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../data/bigbench");
    let catalog = hir_core::task::Catalog::discover(&root).expect("BIG-bench data");
    let task = catalog
        .load("tracking_shuffled_objects_three_objects")
        .expect("TSO-3");
    (0..n)
        .map(|i| {
            let ex = &task.examples[i];
            let prompt = hir_core::prompt::Prompt::build(
                &task,
                ex,
                hir_core::prompt::DEFAULT_INSTRUCTION,
                hir_core::prompt::PromptVariant::Sampler,
            )
            .text();
            let output = ["(A)", "The answer is (B).", "(C) the blue ball."][i % 3];
            let sample = RelabeledSample {
                sample_id: i as i64,
                seed_key: i as u64,
                prompt,
                output_tokens: hir_model::LoadedModel::encode(model, output).expect("encodes"),
                output: output.into(),
                cut: false,
                correct: i % 2 == 0,
                gold: ex.answer.gold(),
                positive: "Solve the question with wrong answer.".into(),
                negative: "Solve the question with correct answer.".into(),
            };
            let opts = examples::BuildOptions::default();
            examples::build(&sample, model, opts, &mut SplitMix64::new(i as u64)).expect("builds")
        })
        .collect()
}

/// SmolLM2-135M's shape (for random weights where the GGUF is not at hand).
fn smollm2_config() -> hir_model::arch::llama::Config {
    serde_json::from_value(serde_json::json!({
        "model_type": "llama", "vocab_size": 49152, "hidden_size": 576,
        "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
        "num_key_value_heads": 3, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
        "max_position_embeddings": 8192, "tie_word_embeddings": true
    }))
    .expect("static config")
}

/// Random pairs shaped like the trainer's TSO-3 pairs: ~220 prompt tokens, 6 labels.
fn random_pairs(n: usize) -> Vec<HirExample> {
    let mut rng = SplitMix64::new(3);
    let mut ids =
        |len: usize| -> Vec<u32> { (0..len).map(|_| 3 + rng.below(49000) as u32).collect() };
    (0..n)
        .map(|i| {
            let completion = ids(6);
            let prompt = ids(210 + 4 * (i % 5));
            let mut neg_prompt = prompt.clone();
            neg_prompt[..8].copy_from_slice(&ids(8));
            HirExample {
                positive: hir_model::train::Example {
                    prompt,
                    completion: completion.clone(),
                },
                negative: hir_model::train::Example {
                    prompt: neg_prompt,
                    completion,
                },
                case: hir_core::suboutput::SubOutputCase::Other,
            }
        })
        .collect()
}

fn smollm2(
    device: &Device,
    dtype: DType,
    steps: usize,
    random: bool,
    only_trainer: bool,
) -> (Vec<Timing>, &'static str, Option<TorchStep>) {
    let micro = 4;
    let (model, vars, pairs, pad, label) = if random {
        let w = Weights::random(1, 0.02, device, WeightMode::Trainable(dtype));
        let model = hir_model::arch::llama::Model::new(&smollm2_config(), &w).expect("builds");
        (
            model,
            w.vars(),
            random_pairs(8),
            2,
            "random weights, TSO-3-shaped pairs",
        )
    } else {
        let loaded =
            hir_model::LoadedModel::load(&smollm2_path(), device, WeightMode::Trainable(dtype))
                .expect("SmolLM2 loads");
        let pairs = smollm2_examples(&loaded, 8);
        let (pad, vars) = (loaded.pad_token_id(), loaded.vars().to_vec());
        (
            match loaded.into_model() {
                hir_model::AnyModel::Llama(m) => m,
                hir_model::AnyModel::T5(_) => panic!("SmolLM2 is decoder-only"),
            },
            vars,
            pairs,
            pad,
            "the GGUF dequantized, 8 TSO-3 pairs",
        )
    };
    let tokens: usize = pairs.iter().map(HirExample::tokens).sum();
    let cfg = HirLossConfig::default();
    let mut optimizer = Optimizer::new(&vars, AdamWConfig::default(), 2, Some(1.0));
    let mut first_loss = None;
    let mut run = |path: Path| {
        timed(steps, tokens, device, || {
            let mut step_loss = 0.0;
            for chunk in pairs.chunks(micro) {
                let pos: Vec<_> = chunk.iter().map(|e| e.positive.clone()).collect();
                let neg: Vec<_> = chunk.iter().map(|e| e.negative.clone()).collect();
                let pos = TrainBatch::new(&pos, pad, device).expect("batch");
                let neg = TrainBatch::new(&neg, pad, device).expect("batch");
                if path == Path::Trainer {
                    let (l, _) = optimizer
                        .backward_hir(&model, &pos, &neg, &cfg, 1.0)
                        .expect("backward");
                    step_loss += f64::from(l.total.to_scalar::<f32>().expect("loss")) / 2.0;
                    continue;
                }
                let (pl, py) = model.aligned_logits(&pos).expect("forward");
                let (nl, ny) = model.aligned_logits(&neg).expect("forward");
                let l = if path == Path::Reference {
                    // The reference: `outputs` and `outputs_pos` are the same computation.
                    let (pl2, _) = model.aligned_logits(&pos).expect("forward");
                    reference_loss(&pl, &pl2, &py, &nl, &ny, &cfg)
                } else {
                    loss::hir_loss(None, &pl, &py, &nl, &ny, &cfg)
                        .expect("loss")
                        .total
                };
                optimizer.backward(&l).expect("backward");
            }
            if path == Path::Trainer {
                first_loss.get_or_insert(step_loss);
            }
        })
    };
    let trainer = run(Path::Trainer);
    if only_trainer {
        return (vec![trainer], label, None);
    }
    let timings = vec![trainer, run(Path::WholeGraph), run(Path::Reference)];
    let baseline = (!random && device.is_cpu()).then(|| TorchStep {
        pairs,
        pad,
        micro,
        steps,
        first_loss: first_loss.unwrap_or(f64::NAN),
    });
    (timings, label, baseline)
}

/// The SmolLM2 step as `scripts/torch-hir-step.py` takes it, to time PyTorch eager on it.
struct TorchStep {
    pairs: Vec<HirExample>,
    pad: u32,
    micro: usize,
    steps: usize,
    /// The trainer's loss at the first step, to compare with PyTorch's.
    first_loss: f64,
}

impl TorchStep {
    /// Runs the script (with `$HIR_PYTHON`, default `python3`): its JSON reply, or why
    /// there is none (torch not installed, the script failed).
    fn run(&self) -> Result<serde_json::Value, String> {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
        let example = |e: &hir_model::train::Example| serde_json::json!({"prompt": e.prompt, "completion": e.completion});
        let cfg = HirLossConfig::default();
        let spec = serde_json::json!({
            "model": smollm2_path(),
            "pad": self.pad,
            "micro_batch": self.micro,
            "steps": self.steps,
            "threads": candle_core::utils::get_num_threads(),
            "lr": AdamWConfig::default().lr,
            "max_grad_norm": 1.0,
            "label_smoothing": cfg.label_smoothing,
            "contrastive_coef": cfg.contrastive_coef,
            "entropy_coef": cfg.entropy_coef,
            "pairs": self.pairs.iter().map(|p| serde_json::json!({
                "pos": example(&p.positive),
                "neg": example(&p.negative),
            })).collect::<Vec<_>>(),
        });
        let path = std::env::temp_dir().join(format!("hir-torch-step-{}.json", std::process::id()));
        std::fs::write(&path, spec.to_string()).map_err(|e| e.to_string())?;
        let python = std::env::var("HIR_PYTHON").unwrap_or_else(|_| "python3".into());
        let out = std::process::Command::new(&python)
            .arg(root.join("scripts/torch-hir-step.py"))
            .arg(&path)
            .output();
        let _ = std::fs::remove_file(&path);
        let out = out.map_err(|e| format!("{python}: {e}"))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let reply: Option<serde_json::Value> = stdout
            .lines()
            .last()
            .and_then(|l| serde_json::from_str(l).ok());
        match (out.status.code(), reply) {
            (Some(0), Some(v)) => Ok(v),
            (Some(3), Some(v)) => Err(format!("skipped: {}", v["skipped"])),
            (code, _) => Err(format!(
                "the script failed ({code:?}): {}",
                String::from_utf8_lossy(&out.stderr)
                    .lines()
                    .last()
                    .unwrap_or_default()
            )),
        }
    }
}

/// The reference's loss graph: supervised and entropy terms from the first forward, the
/// contrastive term from a second forward of the same positive sequences.
fn reference_loss(
    first: &Tensor,
    second: &Tensor,
    labels: &Tensor,
    neg: &Tensor,
    neg_labels: &Tensor,
    cfg: &HirLossConfig,
) -> Tensor {
    let ls = loss::label_smoothed_cross_entropy(first, labels, cfg.label_smoothing).expect("ls");
    let con = loss::contrastive_loss(
        &loss::sequence_mean_logprob(second, labels).expect("lp"),
        &loss::sequence_mean_logprob(neg, neg_labels).expect("lp"),
        cfg.label_smoothing,
    )
    .expect("con");
    let h = loss::mean_entropy(first, labels).expect("h");
    ((ls + con).expect("add") - h.affine(cfg.entropy_coef, 0.0).expect("h")).expect("sub")
}

/// Padded encoder inputs, mask and label rows (-100 padded) of `b` rows.
fn t5_batch(
    rng: &mut SplitMix64,
    b: usize,
    src: usize,
    tgt: usize,
    device: &Device,
) -> (Tensor, Vec<Vec<u8>>, Vec<Vec<i64>>) {
    let ids: Vec<u32> = (0..b * src).map(|_| 2 + rng.below(32000) as u32).collect();
    let labels: Vec<Vec<i64>> = (0..b)
        .map(|_| {
            let mut row: Vec<i64> = (0..tgt - 1).map(|_| 2 + rng.below(32000) as i64).collect();
            row.push(1);
            row
        })
        .collect();
    (
        Tensor::from_vec(ids, (b, src), device).expect("ids"),
        vec![vec![1u8; src]; b],
        labels,
    )
}

fn t5(device: &Device, dtype: DType, steps: usize) -> (Timing, Timing, usize) {
    let cfg = hir_model::arch::t5::Config::flan_t5_base();
    let w = Weights::random(1, 0.02, device, WeightMode::Trainable(dtype));
    let model = hir_model::arch::t5::Model::new(&cfg, &w).expect("T5 builds");
    let vars = w.vars();
    let params: usize = vars.iter().map(|(_, v)| v.elem_count()).sum();
    let mut optimizer = Optimizer::new(&vars, AdamWConfig::default(), 2, Some(1.0));
    let (b, src, tgt) = (4usize, 200usize, 8usize);
    let lcfg = HirLossConfig::default();
    let tokens = 2 * 2 * b * (src + tgt);
    let mut run = |three_forwards: bool| {
        let mut rng = SplitMix64::new(11);
        timed(steps, tokens, device, || {
            for _ in 0..2 {
                let (pos_ids, mask, labels) = t5_batch(&mut rng, b, src, tgt, device);
                // The negative side: the same labels under another instruction.
                let (neg_ids, _, _) = t5_batch(&mut rng, b, src, tgt, device);
                let (dec, dec_mask) = model.shift_right(&labels).expect("shift");
                let label_t = Tensor::new(labels.clone(), device).expect("labels");
                let fwd =
                    |ids: &Tensor| model.forward(ids, &mask, &dec, &dec_mask).expect("forward");
                let pl = fwd(&pos_ids);
                let nl = fwd(&neg_ids);
                let l = if three_forwards {
                    let pl2 = fwd(&pos_ids);
                    reference_loss(&pl, &pl2, &label_t, &nl, &label_t, &lcfg)
                } else {
                    loss::hir_loss(None, &pl, &label_t, &nl, &label_t, &lcfg)
                        .expect("loss")
                        .total
                };
                optimizer.backward(&l).expect("backward");
            }
        })
    };
    let ours = run(false);
    let reference = run(true);
    (ours, reference, params)
}

/// The trainer's step on SmolLM2 with LoRA adapters (rank 8 on `q_proj` and `v_proj`,
/// PEFT's default targets) beside the frozen weights: the same pairs and micro-batches.
/// Returns the timing and the adapters' parameter count.
fn smollm2_lora(device: &Device, dtype: DType, steps: usize) -> (Timing, usize) {
    let cfg =
        hir_model::arch::lora::LoraConfig::from_knobs(8, 16.0, "q_proj,v_proj").expect("valid");
    let loaded = hir_model::LoadedModel::load_lora(&smollm2_path(), device, dtype, &cfg, None, 1)
        .expect("SmolLM2 loads with adapters");
    let pairs = smollm2_examples(&loaded, 8);
    let tokens: usize = pairs.iter().map(HirExample::tokens).sum();
    let params = loaded.vars().iter().map(|(_, v)| v.elem_count()).sum();
    let pad = loaded.pad_token_id();
    let mut optimizer = Optimizer::new(loaded.vars(), AdamWConfig::default(), 2, Some(1.0));
    let cfg = HirLossConfig::default();
    let timing = timed(steps, tokens, device, || {
        for chunk in pairs.chunks(4) {
            let pos: Vec<_> = chunk.iter().map(|e| e.positive.clone()).collect();
            let neg: Vec<_> = chunk.iter().map(|e| e.negative.clone()).collect();
            let pos = TrainBatch::new(&pos, pad, device).expect("batch");
            let neg = TrainBatch::new(&neg, pad, device).expect("batch");
            optimizer
                .backward_hir(loaded.model(), &pos, &neg, &cfg, 1.0)
                .expect("backward");
        }
    });
    (timing, params)
}

fn sync(device: &Device) {
    let _ = device.synchronize();
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "quick");
    let device_name = args
        .iter()
        .position(|a| a == "--device")
        .and_then(|i| args.get(i + 1))
        .map_or("cpu", String::as_str);
    let device = hir_model::parse_device(device_name).expect("device");
    let (dtype, dtype_name) = if args.iter().any(|a| a == "bf16") {
        (
            DType::BF16,
            "bf16 weights, f32 master copies and AdamW state",
        )
    } else {
        (DType::F32, "f32 weights and AdamW state")
    };
    let steps = if quick { 1 } else { 3 };
    println!(
        "HIR training step (AdamW, clip 1.0, 2 micro-batches), {device_name}, {dtype_name}, {} threads",
        candle_core::utils::get_num_threads()
    );
    let random = args.iter().any(|a| a == "--random");
    let only_trainer = args.iter().any(|a| a == "trainer-only");
    let (timings, label, torch) = smollm2(&device, dtype, steps, random, only_trainer);
    let ours = &timings[0];
    println!("SmolLM2-135M, {label} ({} tokens/step):", ours.tokens);
    println!(
        "  trainer (layer by layer, recomputed): {:.3} s/step, {:.0} tok/s, {}",
        ours.step_s,
        ours.tps(),
        ours.memory()
    );
    if only_trainer {
        return;
    }
    for (name, t) in [
        "whole graph, 2 forwards",
        "reference, whole graph, 3 forwards",
    ]
    .into_iter()
    .zip(&timings[1..])
    {
        println!(
            "  {name}: {:.3} s/step ({:.2}x the trainer's time), {}",
            t.step_s,
            t.step_s / ours.step_s,
            t.memory()
        );
    }
    if !random {
        let full_step = ours.step_s;
        let (lora, params) = smollm2_lora(&device, dtype, steps);
        println!(
            "  trainer, LoRA r=8 on q_proj and v_proj ({:.2}M parameters trained): {:.3} s/step \
             ({:.2}x the full step's time), {}",
            params as f64 / 1e6,
            lora.step_s,
            lora.step_s / full_step,
            lora.memory()
        );
    }
    match torch.as_ref().map(TorchStep::run) {
        Some(Ok(v)) => {
            let step_s = v["step_s"].as_f64().unwrap_or(f64::NAN);
            println!(
                "  PyTorch {} eager, same step and threads: {step_s:.3} s/step, peak +{:.0} MiB; \
                 the trainer at {:.2}x PyTorch's speed; first-step loss {:.5} (trainer {:.5})",
                v["torch"].as_str().unwrap_or("?"),
                v["peak_mib"].as_f64().unwrap_or(f64::NAN),
                step_s / ours.step_s,
                v["first_loss"].as_f64().unwrap_or(f64::NAN),
                torch.as_ref().map_or(f64::NAN, |t| t.first_loss),
            );
        }
        Some(Err(why)) => println!("  PyTorch baseline not run: {why}"),
        None => println!("  PyTorch baseline: only for the GGUF's weights on the CPU"),
    }
    let (ours, reference, params) = t5(&device, dtype, steps);
    println!(
        "FLAN-T5-base shape ({:.0}M params), 8 pairs of 200+8 tokens ({} tokens/step): \
         {:.3} s/step, {:.0} tok/s, {}; reference 3-forward step {:.3} s ({:.2}x slower), {}",
        params as f64 / 1e6,
        ours.tokens,
        ours.step_s,
        ours.tps(),
        ours.memory(),
        reference.step_s,
        reference.step_s / ours.step_s,
        reference.memory()
    );
}
