//! Generator throughput and swap latency, measured in one process against baselines run in
//! the same process.
//!
//! `cargo bench -p hir-generator --bench generator [-- --max-new-tokens 32 --sequential 8 --concurrency 1,8,64]`
//!
//! On a GPU host without the GGUF: `--export-shape DIR` (here) writes SmolLM2's config and
//! tokenizer to DIR; `--random-from DIR --device cuda:0 --weights bf16` (there) serves a
//! model of that shape with random weights. `--random-t5-base` serves a FLAN-T5-base-shaped
//! model with random weights and a word-level tokenizer over the prompts' words.
//!
//! * Throughput: C concurrent requests of 4 samples each (distinct BIG-bench prompts)
//!   against the same kind of requests sent one at a time, as the reference's sampling loop
//!   does.
//! * Swap: SwapWeights of a LoRA adapter of the served model (and sampling with it beside
//!   the weights), then of a dense checkpoint of the served model against reading the same
//!   bytes.

use std::path::PathBuf;
use std::time::Instant;

use hir_core::prompt::{Prompt, PromptVariant, DEFAULT_INSTRUCTION};
use hir_core::task::Catalog;
use hir_generator::config::GeneratorConfig;
use hir_generator::Application;
use hir_proto::pb;
use hir_proto::pb::generator_service_client::GeneratorServiceClient;
use tonic::transport::Channel;

struct Args {
    model: PathBuf,
    max_new_tokens: u32,
    sequential: usize,
    concurrency: Vec<usize>,
    swap: bool,
    weights: hir_generator::config::Weights,
    device: String,
    export_shape: Option<PathBuf>,
    random_from: Option<PathBuf>,
    random_t5_base: bool,
}

fn args() -> Args {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut a = Args {
        model: root.join(hir_runtime::models::SMOLLM2_GGUF),
        max_new_tokens: 32,
        sequential: 8,
        concurrency: vec![1, 8, 64],
        swap: true,
        weights: hir_generator::config::Weights::Auto,
        device: "cpu".into(),
        export_shape: None,
        random_from: None,
        random_t5_base: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--model" => a.model = PathBuf::from(value()),
            "--max-new-tokens" => a.max_new_tokens = value().parse().expect("a number"),
            "--sequential" => a.sequential = value().parse().expect("a number"),
            "--concurrency" => {
                a.concurrency = value()
                    .split(',')
                    .map(|c| c.parse().expect("numbers"))
                    .collect()
            }
            "--no-swap" => a.swap = false,
            "--device" => a.device = value(),
            "--export-shape" => a.export_shape = Some(PathBuf::from(value())),
            "--random-from" => a.random_from = Some(PathBuf::from(value())),
            "--random-t5-base" => a.random_t5_base = true,
            "--weights" => {
                a.weights = match value().as_str() {
                    "quantized" => hir_generator::config::Weights::Quantized,
                    "f32" => hir_generator::config::Weights::F32,
                    "bf16" => hir_generator::config::Weights::Bf16,
                    _ => hir_generator::config::Weights::Auto,
                }
            }
            _ => {} // cargo bench passes --bench
        }
    }
    let random = a.random_from.is_some() || a.random_t5_base;
    if !random && !a.model.is_file() && !a.model.is_dir() {
        hir_runtime::models::fetch_smollm2(&root).expect("SmolLM2 is fetched");
    }
    a
}

/// Writes the model's config and tokenizer files (no weights) to `dir`.
fn export_shape(model: &std::path::Path, dir: &std::path::Path) {
    let m = hir_model::LoadedModel::load(
        model,
        &candle_core::Device::Cpu,
        hir_model::WeightMode::Dense(candle_core::DType::F32),
    )
    .expect("model loads");
    let tmp = std::env::temp_dir().join(format!("hir-bench-shape-{}", std::process::id()));
    m.save(&tmp).expect("saves");
    std::fs::create_dir_all(dir).unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        if tmp.join(f).is_file() {
            std::fs::copy(tmp.join(f), dir.join(f)).unwrap();
        }
    }
    let _ = std::fs::remove_dir_all(&tmp);
}

/// A model folder with the config and tokenizer of `shape` and random weights.
fn random_model(shape: &std::path::Path, out: &std::path::Path) {
    let cfg: hir_model::arch::llama::Config =
        serde_json::from_slice(&std::fs::read(shape.join("config.json")).unwrap()).unwrap();
    let tokenizer = tokenizers::Tokenizer::from_file(shape.join("tokenizer.json")).unwrap();
    let w = hir_model::formats::weights::Weights::random(
        1,
        0.02,
        &candle_core::Device::Cpu,
        hir_model::WeightMode::Dense(candle_core::DType::F32),
    );
    let model = hir_model::arch::llama::Model::new(&cfg, &w).expect("builds");
    let eos = cfg.eos_ids();
    hir_model::LoadedModel::from_parts(model, tokenizer, vec![], eos)
        .expect("assembles")
        .save(out)
        .expect("saves");
}

/// A FLAN-T5-base-shaped folder with random weights and a word-level tokenizer over the
/// words of `texts` (T5's special ids: `<pad>` 0, `</s>` 1, `<unk>` 2).
fn random_t5_base(texts: &[String], out: &std::path::Path) {
    use tokenizers::models::wordlevel::WordLevel;
    let cfg = hir_model::arch::t5::Config::flan_t5_base();
    let mut vocab: std::collections::HashMap<String, u32> = ["<pad>", "</s>", "<unk>"]
        .iter()
        .enumerate()
        .map(|(i, s)| (s.to_string(), i as u32))
        .collect();
    for word in texts.iter().flat_map(|t| t.split_whitespace()) {
        let next = vocab.len() as u32;
        if (next as usize) < cfg.vocab_size {
            vocab.entry(word.to_string()).or_insert(next);
        }
    }
    let model = WordLevel::builder()
        .vocab(vocab.into_iter().collect())
        .unk_token("<unk>".into())
        .build()
        .expect("vocabulary is valid");
    let mut tokenizer = tokenizers::Tokenizer::new(model);
    tokenizer.with_pre_tokenizer(Some(
        tokenizers::pre_tokenizers::whitespace::WhitespaceSplit,
    ));
    let w = hir_model::formats::weights::Weights::random(
        1,
        0.02,
        &candle_core::Device::Cpu,
        hir_model::WeightMode::Dense(candle_core::DType::F32),
    );
    hir_model::arch::t5::Model::new(&cfg, &w)
        .expect("builds")
        .save(out, Some(&tokenizer))
        .expect("saves");
}

fn prompts(count: usize) -> Vec<String> {
    let mut root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../data/bigbench");
    if !root.is_dir() {
        // A binary run away from its build tree, from the repository root.
        root = PathBuf::from("data/bigbench");
    }
    let task = Catalog::discover(&root)
        .unwrap()
        .load("tracking_shuffled_objects_three_objects")
        .unwrap();
    task.examples
        .iter()
        .cycle()
        .take(count)
        .map(|ex| Prompt::build(&task, ex, DEFAULT_INSTRUCTION, PromptVariant::Sampler).text())
        .collect()
}

/// Sends `prompts` one request after another; returns new tokens and tokens per second.
async fn sequential(
    client: &mut GeneratorServiceClient<Channel>,
    prompts: &[String],
    max_new: u32,
) -> (usize, f64) {
    let t = Instant::now();
    let mut tokens = 0;
    for (i, p) in prompts.iter().enumerate() {
        tokens += one(client, p.clone(), max_new, i as u64).await;
    }
    (tokens, tokens as f64 / t.elapsed().as_secs_f64())
}

async fn one(
    client: &mut GeneratorServiceClient<Channel>,
    prompt: String,
    max_new: u32,
    seed: u64,
) -> usize {
    let request = pb::GenerateRequest {
        prompts: vec![prompt],
        n: 4,
        sampling: Some(pb::SamplingParams {
            temperature: 1.0,
            top_k: 50,
            top_p: 1.0,
            max_new_tokens: max_new,
            stop: vec![],
            seed: Some(seed),
        }),
        ..Default::default()
    };
    let mut stream = client
        .generate(request)
        .await
        .expect("generate")
        .into_inner();
    let mut tokens = 0;
    while let Some(r) = stream.message().await.expect("stream") {
        tokens += r.completion.map(|c| c.token_ids.len()).unwrap_or(0);
    }
    tokens
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut a = args();
    if let Some(dir) = &a.export_shape {
        export_shape(&a.model, dir);
        println!(
            "wrote the config and tokenizer of {} to {}",
            a.model.display(),
            dir.display()
        );
        return;
    }
    let random = a.random_from.is_some() || a.random_t5_base;
    let max_c = a
        .concurrency
        .iter()
        .copied()
        .max()
        .unwrap_or(1)
        .max(a.sequential);
    let prompts = prompts(max_c);
    let random_dir = std::env::temp_dir().join(format!("hir-bench-random-{}", std::process::id()));
    if let Some(shape) = a.random_from.clone() {
        random_model(&shape, &random_dir);
        a.model = random_dir.clone();
    } else if a.random_t5_base {
        random_t5_base(&prompts, &random_dir);
        a.model = random_dir.clone();
    }
    let mut config = GeneratorConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen: None,
        model: a.model.clone(),
        ..GeneratorConfig::default()
    };
    let swap_root = std::env::temp_dir().join(format!("hir-bench-swap-{}", std::process::id()));
    config.swap.checkpoint_root = Some(swap_root.clone());
    config.weights = a.weights;
    config.device = a.device.clone();
    config.auth.token = Some("bench".into());
    config.engine.max_batch_sequences = 4 * a.concurrency.iter().copied().max().unwrap_or(1);
    config.engine.token_budget = usize::MAX / 2;
    config.engine.queue_capacity = 1024;
    let t = Instant::now();
    let app = Application::build(config).await.expect("generator starts");
    println!(
        "model {} loaded and warmed up in {:.2} s",
        a.model.display(),
        t.elapsed().as_secs_f64()
    );
    let addr = app.local_addr();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until(async { drop(stopped.await) }));
    let mut client = GeneratorServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let info = client
        .get_model_info(pb::GetModelInfoRequest {})
        .await
        .expect("model info")
        .into_inner();

    // The reference's loop: one request after another.
    let (seq_tokens, seq_rate) =
        sequential(&mut client, &prompts[..a.sequential], a.max_new_tokens).await;

    println!("\nThroughput: requests of 1 prompt x 4 samples, up to {} new tokens, temperature 1, top-k 50", a.max_new_tokens);
    println!("| requests | in flight | new tokens | seconds | tokens/s | vs one at a time |");
    println!("|---:|---:|---:|---:|---:|---:|");
    println!(
        "| {} | 1 (sequential) | {seq_tokens} | {:.2} | {seq_rate:.1} | 1.00x |",
        a.sequential,
        seq_tokens as f64 / seq_rate
    );
    for &c in &a.concurrency {
        let t = Instant::now();
        let tasks: Vec<_> = prompts
            .iter()
            .take(c)
            .enumerate()
            .map(|(i, p)| {
                let mut client = client.clone();
                let (p, max_new) = (p.clone(), a.max_new_tokens);
                tokio::spawn(async move { one(&mut client, p, max_new, 1000 + i as u64).await })
            })
            .collect();
        let mut tokens = 0;
        for task in tasks {
            tokens += task.await.unwrap();
        }
        let secs = t.elapsed().as_secs_f64();
        let rate = tokens as f64 / secs;
        println!(
            "| {c} | {c} | {tokens} | {secs:.2} | {rate:.1} | {:.2}x |",
            rate / seq_rate
        );
    }

    let mut serving = "base";
    if a.swap && info.architecture != "t5" {
        // A LoRA adapter of the served model (rank 8 on q_proj and v_proj, B drawn at
        // random so it changes the outputs), as a LoRA run's trainer writes it.
        let cfg = hir_model::arch::lora::LoraConfig::from_knobs(8, 16.0, "q_proj,v_proj").unwrap();
        let trained = hir_model::LoadedModel::load_lora(
            &a.model,
            &candle_core::Device::Cpu,
            candle_core::DType::F32,
            &cfg,
            None,
            1,
        )
        .expect("adapters attach");
        for (name, var) in trained.vars() {
            if name.ends_with("lora_B.weight") {
                let w = hir_model::formats::weights::RandomSource::new(2, 0.01)
                    .tensor(name, var.dims(), &candle_core::Device::Cpu)
                    .unwrap();
                var.set(&w).unwrap();
            }
        }
        let dir = swap_root.join("adapter");
        trained.save(&dir).expect("save adapter");
        drop(trained);
        let sha =
            hir_generator::swap::sha256_hex(&std::fs::read(dir.join("manifest.json")).unwrap());
        let mut req = tonic::Request::new(pb::SwapWeightsRequest {
            checkpoint: "adapter".into(),
            sha256: sha,
            version: "adapter".into(),
            expected_version: "base".into(),
        });
        req.metadata_mut()
            .insert("authorization", "Bearer bench".parse().unwrap());
        let r = client
            .swap_weights(req)
            .await
            .expect("adapter swap")
            .into_inner();
        println!(
            "\nSwap of a LoRA adapter (r=8, q_proj and v_proj), {:.1} MB: verify {:.1} ms, load \
             {:.1} ms, activate {:.2} ms, total {:.1} ms",
            r.bytes as f64 / 1e6,
            r.verify_ms,
            r.load_ms,
            r.activate_ms,
            r.total_ms
        );
        let (_, rate) = sequential(&mut client, &prompts[..a.sequential], a.max_new_tokens).await;
        println!(
            "With the adapter beside the weights: {rate:.1} new tokens/s one request at a time \
             ({:.2}x without)",
            rate / seq_rate
        );
        serving = "adapter";
    }
    if a.swap {
        // A dense checkpoint of the same model, as a trainer would write it.
        let dense = hir_model::LoadedModel::load(
            &a.model,
            &candle_core::Device::Cpu,
            hir_model::WeightMode::Dense(if a.device == "cpu" {
                candle_core::DType::F32
            } else {
                candle_core::DType::BF16
            }),
        )
        .expect("dense load");
        let dir = swap_root.join("dense");
        dense.save(&dir).expect("save checkpoint");
        drop(dense);
        // The same files under a manifest without BLAKE3 digests, as written before them:
        // its weights are checked by SHA-256.
        let sha_dir = swap_root.join("dense-sha256");
        std::fs::create_dir_all(&sha_dir).unwrap();
        for f in std::fs::read_dir(&dir).unwrap() {
            let f = f.unwrap().path();
            let to = sha_dir.join(f.file_name().unwrap());
            std::fs::copy(&f, &to).unwrap();
            // On disk before anything is timed, so that no write-back runs beside the reads.
            std::fs::File::open(&to).unwrap().sync_all().unwrap();
        }
        let mp = sha_dir.join("manifest.json");
        let mut m: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&mp).unwrap()).unwrap();
        m.as_object_mut().unwrap().remove("blake3");
        std::fs::write(&mp, serde_json::to_vec_pretty(&m).unwrap()).unwrap();
        let mut rows = Vec::new();
        // Each check twice, alternately.
        for (checkpoint, version, check) in [
            ("dense-sha256", "dense-sha256-1", "SHA-256"),
            ("dense", "dense-1", "BLAKE3"),
            ("dense-sha256", "dense-sha256-2", "SHA-256"),
            ("dense", "dense-2", "BLAKE3"),
        ] {
            let dir = swap_root.join(checkpoint);
            let sha =
                hir_generator::swap::sha256_hex(&std::fs::read(dir.join("manifest.json")).unwrap());
            // Raw reads of the same bytes (warm page cache, as for the swap): the median of
            // three, each file read whole into memory.
            let mut raw = Vec::new();
            let mut bytes = 0usize;
            for _ in 0..3 {
                let t = Instant::now();
                bytes = 0;
                for f in std::fs::read_dir(&dir).unwrap() {
                    bytes += std::hint::black_box(std::fs::read(f.unwrap().path()).unwrap()).len();
                }
                raw.push(t.elapsed().as_secs_f64() * 1e3);
            }
            raw.sort_by(f64::total_cmp);
            let raw_ms = raw[1];
            let mut req = tonic::Request::new(pb::SwapWeightsRequest {
                checkpoint: checkpoint.into(),
                sha256: sha,
                version: version.into(),
                expected_version: serving.into(),
            });
            req.metadata_mut()
                .insert("authorization", "Bearer bench".parse().unwrap());
            let r = client.swap_weights(req).await.expect("swap").into_inner();
            serving = version;
            rows.push((check, bytes, raw_ms, r));
        }
        println!(
            "\nSwap: {} ({:.0} M parameters) dense {} checkpoint, {:.0} MB",
            info.architecture,
            info.parameters as f64 / 1e6,
            if a.device == "cpu" { "f32" } else { "bf16" },
            rows[0].1 as f64 / 1e6
        );
        println!("| weights checked by | raw read, ms | verify manifest | load (digests, tensors, shapes) | activate | total, ms | total / raw read |");
        println!("|---|---:|---:|---:|---:|---:|---:|");
        for (check, _, raw_ms, r) in &rows {
            println!(
                "| {check} | {raw_ms:.1} | {:.1} | {:.1} | {:.2} | {:.1} | {:.2}x |",
                r.verify_ms,
                r.load_ms,
                r.activate_ms,
                r.total_ms,
                r.total_ms / raw_ms
            );
        }
        let after = client
            .get_model_info(pb::GetModelInfoRequest {})
            .await
            .expect("model info")
            .into_inner();
        let (_, rate) = sequential(&mut client, &prompts[..a.sequential], a.max_new_tokens).await;
        println!(
            "\nAfter the swap ({} weights, as served): {rate:.1} new tokens/s one request at a \
             time ({:.2}x before the swap)",
            after.dtype,
            rate / seq_rate
        );
        let _ = std::fs::remove_dir_all(&swap_root);
    }
    if random {
        let _ = std::fs::remove_dir_all(&random_dir);
    }
    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
}
