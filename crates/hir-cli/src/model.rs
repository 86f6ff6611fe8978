//! `hir generate` and `hir model info`: try a model locally, without any service.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use hir_model::{LoadedModel, SamplingParams};
use serde_json::json;

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// A HF folder (config.json, model.safetensors, tokenizer.json) or a GGUF file.
    #[arg(long)]
    model: PathBuf,
    /// The prompt, used as is.
    #[arg(long)]
    prompt: String,
    /// Wrap the prompt in the model's chat template (when it has one).
    #[arg(long)]
    chat: bool,
    /// Samples to draw.
    #[arg(long, default_value_t = 1)]
    n: usize,
    /// Softmax temperature; 0 decodes greedily.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Keep only the k most likely tokens (0: all).
    #[arg(long, default_value_t = 50)]
    top_k: usize,
    /// Nucleus sampling mass in (0, 1].
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// New tokens per sample at most.
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// Stop at this string (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Print one JSON object per sample.
    #[arg(long)]
    json: bool,
    /// `cpu` or `cuda:N` (CUDA needs a build with the `cuda` feature).
    #[arg(long, default_value = "cpu")]
    device: String,
}

#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Architecture, parameters, dtype, vocabulary and context of a model.
    Info {
        /// A HF folder or a GGUF file.
        path: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Quantized weights for a GGUF file, f32 on CPU or bf16 on CUDA for a folder.
fn load(path: &std::path::Path, device: &candle_core::Device) -> Result<LoadedModel> {
    let mode = hir_generator::weight_mode(hir_generator::config::Weights::Auto, path, device);
    LoadedModel::load(path, device, mode).with_context(|| format!("loading {}", path.display()))
}

pub fn generate(args: GenerateArgs) -> Result<()> {
    if !(args.temperature >= 0.0 && args.temperature.is_finite()) {
        anyhow::bail!("--temperature must be finite and >= 0 (0 is greedy)");
    }
    if args.n == 0 || args.max_new_tokens == 0 {
        anyhow::bail!("--n and --max-new-tokens must be at least 1");
    }
    let device = hir_generator::parse_device(&args.device)?;
    let model = load(&args.model, &device)?;
    let prompt = if args.chat {
        model.chat_prompt(&args.prompt)
    } else {
        args.prompt.clone()
    };
    let params = SamplingParams {
        temperature: args.temperature,
        top_k: (args.top_k > 0).then_some(args.top_k),
        top_p: args.top_p,
        seed: args.seed,
        max_new_tokens: args.max_new_tokens,
        stop: args.stop.clone(),
        n: args.n,
    };
    let started = std::time::Instant::now();
    let samples = model
        .generate_text(&[prompt], &params)?
        .into_iter()
        .next()
        .unwrap_or_default();
    let elapsed = started.elapsed().as_secs_f64();
    let tokens: usize = samples.iter().map(|s| s.token_ids.len()).sum();
    for s in &samples {
        if args.json {
            println!(
                "{}",
                json!({ "sample": s.sample_index, "text": s.text, "tokens": s.token_ids.len(), "finish_reason": format!("{:?}", s.finish_reason).to_lowercase() })
            );
        } else {
            println!(
                "--- sample {} ({} tokens, {:?})\n{}",
                s.sample_index,
                s.token_ids.len(),
                s.finish_reason,
                s.text
            );
        }
    }
    if !args.json {
        eprintln!(
            "{tokens} tokens in {elapsed:.2} s ({:.1} tokens/s)",
            tokens as f64 / elapsed.max(1e-9)
        );
    }
    Ok(())
}

pub fn run(cmd: ModelCommand) -> Result<()> {
    match cmd {
        ModelCommand::Info { path, json } => {
            let model = load(&path, &candle_core::Device::Cpu)?;
            let i = model.info();
            if json {
                println!("{}", serde_json::to_string_pretty(i)?);
            } else {
                println!("architecture: {}", i.architecture);
                println!(
                    "parameters:   {} ({:.1} M)",
                    i.parameters,
                    i.parameters as f64 / 1e6
                );
                println!("dtype:        {}", i.dtype);
                println!("vocabulary:   {}", i.vocab_size);
                println!("context:      {}", i.context_length);
                println!("eos tokens:   {:?}", i.eos_token_ids);
            }
            Ok(())
        }
    }
}
