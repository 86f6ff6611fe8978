//! The training state of a run: the model's weights as candle `Var`s, AdamW with fp32
//! moments, and the optimizer step, together with its durable snapshots.
//!
//! A snapshot is a folder `step-<N>/` holding the model in Hugging Face layout (with its
//! `manifest.json`), `optimizer.safetensors` (first and second moments, and the f32 master
//! copies of bf16 weights, by variable name),
//! `trainer.json` (step, iteration) and `snapshot.json`, the SHA-256 of the other three.
//! The SHA-256 of `snapshot.json` identifies the snapshot in the store. A snapshot is
//! written under a temporary name and renamed into place, so a crash never leaves a
//! half-written one under its real name.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::Device;
use hir_core::digest::Expected;
use hir_core::run::RunConfig;
use hir_model::arch::lora::LoraConfig;
use hir_model::formats::tensor_file::{self, Entry};
use hir_model::train::loss::HirLossConfig;
use hir_model::train::{AdamWConfig, Optimizer, TrainBatch};
use hir_model::{LoadedModel, ModelError, WeightMode};
use serde::{Deserialize, Serialize};

use crate::config::Recompute;
use crate::error::{Result, TrainerError};
use crate::examples::HirExample;

/// What one optimizer step measured.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct StepStats {
    /// Optimizer step within the run, from 1.
    pub step: u64,
    /// Total loss, averaged over the step's examples.
    pub loss: f64,
    /// Label-smoothed cross-entropy under the positive instruction.
    pub loss_supervised: f64,
    /// Two-way contrastive term.
    pub loss_contrastive: f64,
    /// Mean entropy of the predictions.
    pub entropy: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Examples in the step.
    pub examples: usize,
    /// Tokens processed (both sequences of every example).
    pub tokens: usize,
}

/// `trainer.json` of a snapshot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct SnapshotInfo {
    step: u64,
    iteration: u32,
}

/// A model being trained, with its optimizer.
#[derive(Debug)]
pub struct TrainState {
    /// The model and tokenizer.
    pub model: LoadedModel,
    optimizer: Optimizer,
    loss: HirLossConfig,
    micro_batch: usize,
    /// The run's seed: with the step count it seeds each step's dropout masks.
    seed: u64,
    /// Train layer by layer, recomputing activations ([`Optimizer::backward_hir`]), rather
    /// than with one backward pass over the whole graph.
    pub recompute: bool,
}

impl TrainState {
    /// Loads the starting model for training with the run's optimizer settings.
    ///
    /// Weights are f32 on the CPU; on a GPU they are bf16 for the forward and backward
    /// passes, with f32 master copies in the optimizer.
    ///
    /// With `lora_rank` set, the model's weights are frozen and LoRA adapters are the
    /// variables ([`LoadedModel::load_lora`]).
    pub fn load(path: &Path, device: &Device, config: &RunConfig) -> Result<Self> {
        Self::load_from(path, None, device, config)
    }

    /// [`TrainState::load`], with a LoRA run's adapters resumed from the folder `adapter`.
    fn load_from(
        path: &Path,
        adapter: Option<&Path>,
        device: &Device,
        config: &RunConfig,
    ) -> Result<Self> {
        let dtype = if device.is_cpu() {
            candle_core::DType::F32
        } else {
            candle_core::DType::BF16
        };
        let mut model = if config.lora_rank > 0 {
            let lora =
                LoraConfig::from_knobs(config.lora_rank, config.lora_alpha, &config.lora_targets)?;
            LoadedModel::load_lora(path, device, dtype, &lora, adapter, config.seed)?
        } else {
            LoadedModel::load(path, device, WeightMode::Trainable(dtype))?
        };
        if config.train_dropout {
            model.model_mut().enable_train_dropout(config.seed)?;
        }
        let optimizer = model.optimizer(
            AdamWConfig {
                lr: config.learning_rate,
                weight_decay: config.weight_decay,
                ..AdamWConfig::default()
            },
            1,
            (config.max_grad_norm > 0.0).then_some(config.max_grad_norm),
        )?;
        Ok(Self {
            model,
            optimizer,
            loss: HirLossConfig {
                label_smoothing: config.label_smoothing,
                contrastive_coef: config.contrastive_coef,
                entropy_coef: config.entropy_coef,
            },
            micro_batch: config.micro_batch_size.max(1) as usize,
            seed: config.seed,
            recompute: Recompute::default().on(device),
        })
    }

    /// Optimizer steps taken.
    pub fn step_count(&self) -> u64 {
        self.optimizer.adamw().steps()
    }

    /// One optimizer step over `examples`: micro-batches of the configured size, their
    /// gradients accumulated (each example weighs the same, as in the reference's batches
    /// of one), clipped if configured, then AdamW.
    pub fn step(&mut self, examples: &[HirExample]) -> Result<StepStats> {
        if examples.is_empty() {
            return Err(TrainerError::FailedPrecondition(
                "a training step needs at least one example".into(),
            ));
        }
        // Dropout masks depend only on the run and the step, so a step repeated after a
        // restart draws the same ones.
        let step_seed = hir_core::rng::SplitMix64::new(
            self.seed ^ (self.step_count() + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15),
        )
        .next_u64();
        self.model.model().reseed_dropout(step_seed);
        // Memory freed since the last step (this process's, or in a process that hosts
        // every service, a generator's finished caches) goes back before the step
        // allocates its own.
        hir_runtime::memory::release_free();
        let chunks: Vec<&[HirExample]> = examples.chunks(self.micro_batch).collect();
        self.optimizer.accumulation_steps = chunks.len();
        let total = examples.len() as f64;
        let pad = self.model.pad_token_id();
        let device = self.model.model().device().clone();
        let mut stats = StepStats {
            examples: examples.len(),
            ..StepStats::default()
        };
        let mut report = None;
        for chunk in &chunks {
            let pos: Vec<_> = chunk.iter().map(|e| e.positive.clone()).collect();
            let neg: Vec<_> = chunk.iter().map(|e| e.negative.clone()).collect();
            let model = self.model.model();
            let pos = TrainBatch::for_model(model, &pos, pad, &device)?;
            let neg = TrainBatch::for_model(model, &neg, pad, &device)?;
            let share = chunk.len() as f64 / total;
            // The optimizer divides by the number of micro-batches; weigh by examples instead.
            let weight = share * chunks.len() as f64;
            let (l, stepped) = if self.recompute {
                self.optimizer
                    .backward_hir(model, &pos, &neg, &self.loss, weight)?
            } else {
                let l = hir_model::train::hir_loss(model, &pos, &neg, &self.loss)?;
                let stepped = self.optimizer.backward(&l.total.affine(weight, 0.0)?)?;
                (l, stepped)
            };
            stats.loss += share * f64::from(l.total.to_scalar::<f32>()?);
            stats.loss_supervised += share * f64::from(l.label_smoothed);
            stats.loss_contrastive += share * f64::from(l.contrastive);
            stats.entropy += share * f64::from(l.entropy);
            stats.tokens += chunk.iter().map(HirExample::tokens).sum::<usize>();
            report = stepped;
        }
        // The step's activations and gradients are freed; give their memory back so it
        // does not stay resident between steps and phases.
        hir_runtime::memory::release_free();
        let report = report
            .ok_or_else(|| TrainerError::FailedPrecondition("the optimizer did not step".into()))?;
        stats.step = report.step;
        stats.grad_norm = report.grad_norm;
        Ok(stats)
    }

    /// Log-probabilities of each `continuation` token after `prompt` and the tokens
    /// before it.
    pub fn logprobs(&self, prompt: &[u32], continuation: &[u32]) -> Result<Vec<f32>> {
        Ok(self
            .model
            .model()
            .continuation_logprobs(prompt, continuation)?)
    }

    /// Writes a snapshot of this state as `dir/step-<N>` and returns its folder and the
    /// SHA-256 of its `snapshot.json`.
    pub fn save_snapshot(&self, dir: &Path, iteration: u32) -> Result<(PathBuf, String)> {
        let step = self.step_count();
        let final_dir = dir.join(format!("step-{step}"));
        let sha = write_folder(&final_dir, |tmp| self.write_snapshot(tmp, step, iteration))?;
        Ok((final_dir, sha))
    }

    /// The snapshot's files in `tmp`; returns the SHA-256 of its `snapshot.json`.
    fn write_snapshot(&self, tmp: &Path, step: u64, iteration: u32) -> Result<String> {
        self.model.save(tmp)?;
        // The optimizer state is streamed from where it lives, hashed as it is written.
        let opt = self.optimizer.adamw();
        let moments = opt.moment_values()?;
        let masters = opt.masters()?;
        let mut entries = Vec::new();
        for (((name, var), m), w) in self.model.vars().iter().zip(moments).zip(masters) {
            if let Some((m, v)) = m {
                let shape = var.dims().to_vec();
                entries.push((format!("m.{name}"), Entry::F32(m, shape.clone())));
                entries.push((format!("v.{name}"), Entry::F32(v, shape)));
            }
            if let Some(w) = w {
                entries.push((format!("w.{name}"), Entry::Tensor(w)));
            }
        }
        let optimizer = tensor_file::write(&tmp.join("optimizer.safetensors"), entries)?;
        hir_runtime::fault::point(hir_runtime::fault::TRAINER_SNAPSHOT);
        write_json(&tmp.join("trainer.json"), &SnapshotInfo { step, iteration })?;
        let manifest_sha = hir_model::formats::checkpoint::sha256_file(&tmp.join("manifest.json"))?;
        let trainer_sha = hir_model::formats::checkpoint::sha256_file(&tmp.join("trainer.json"))?;
        let files = BTreeMap::from([
            ("manifest.json".to_string(), manifest_sha),
            ("optimizer.safetensors".to_string(), optimizer.sha256),
            ("trainer.json".to_string(), trainer_sha),
        ]);
        let snapshot = tmp.join("snapshot.json");
        write_json(&snapshot, &files)?;
        Ok(hir_model::formats::checkpoint::sha256_file(&snapshot)?)
    }

    /// Loads the snapshot in `dir` after checking it against `sha256` (of its
    /// `snapshot.json`) and every file against its digest.
    pub fn load_snapshot(
        dir: &Path,
        sha256: &str,
        device: &Device,
        config: &RunConfig,
    ) -> Result<(Self, u32)> {
        let snapshot = dir.join("snapshot.json");
        let got = hir_model::formats::checkpoint::sha256_file(&snapshot)?;
        if got != sha256 {
            return Err(TrainerError::FailedPrecondition(format!(
                "{}: SHA-256 {got}, but the store committed {sha256}; the snapshot was \
                 changed or replaced, so the run cannot resume from it",
                snapshot.display()
            )));
        }
        let files: BTreeMap<String, String> = read_json(&snapshot)?;
        // The small files are hashed here; the model's weights are checked against its
        // manifest and the optimizer state against the snapshot while they are read.
        for (name, want) in &files {
            if name.ends_with(".safetensors") {
                continue;
            }
            let actual = hir_model::formats::checkpoint::sha256_file(&dir.join(name))?;
            if &actual != want {
                return Err(TrainerError::FailedPrecondition(format!(
                    "{}: SHA-256 {actual}, the snapshot lists {want}; it is corrupt",
                    dir.join(name).display()
                )));
            }
        }
        let info: SnapshotInfo = read_json(&dir.join("trainer.json"))?;
        // A LoRA run's snapshot holds its adapters, which go beside the starting model.
        let mut state = if config.lora_rank > 0 {
            Self::load_from(Path::new(&config.model), Some(dir), device, config)?
        } else {
            Self::load(dir, device, config)?
        };
        let opt_path = dir.join("optimizer.safetensors");
        let want = files.get("optimizer.safetensors").ok_or_else(|| {
            TrainerError::FailedPrecondition(format!(
                "{}: the snapshot does not list optimizer.safetensors",
                snapshot.display()
            ))
        })?;
        let mut saved =
            match tensor_file::read_verified(&opt_path, Expected::Sha256(want), &Device::Cpu) {
                Err(ModelError::ChecksumMismatch { actual, .. }) => {
                    return Err(TrainerError::FailedPrecondition(format!(
                        "{}: SHA-256 {actual}, the snapshot lists {want}; it is corrupt",
                        opt_path.display()
                    )))
                }
                other => other?,
            };
        let moments = state
            .model
            .vars()
            .iter()
            .map(|(name, _)| {
                match (
                    saved.remove(&format!("m.{name}")),
                    saved.remove(&format!("v.{name}")),
                ) {
                    (Some(m), Some(v)) => Some((m, v)),
                    _ => None,
                }
            })
            .collect();
        let masters = state
            .model
            .vars()
            .iter()
            .map(|(name, _)| saved.remove(&format!("w.{name}")))
            .collect();
        let opt = state.optimizer.adamw_mut();
        opt.restore(info.step, moments)?;
        opt.restore_masters(masters)?;
        Ok((state, info.iteration))
    }
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(value)
        .map_err(|e| TrainerError::FailedPrecondition(format!("{}: {e}", path.display())))?;
    std::fs::write(path, bytes).map_err(|e| TrainerError::io(path, e))
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let bytes = std::fs::read(path).map_err(|e| TrainerError::io(path, e))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| TrainerError::FailedPrecondition(format!("{}: {e}", path.display())))
}

/// Writes the folder `dest` whole or not at all: `write` fills `.<name>.tmp` beside it
/// (what an earlier attempt left there, and `dest` itself, removed first), which is then
/// flushed and renamed to `dest`. A crash leaves at most the temporary folder, which the
/// next attempt removes.
pub(crate) fn write_folder<T>(dest: &Path, write: impl FnOnce(&Path) -> Result<T>) -> Result<T> {
    let name = dest.file_name().unwrap_or_default().to_string_lossy();
    let tmp = dest.with_file_name(format!(".{name}.tmp"));
    for d in [&tmp, dest] {
        if d.exists() {
            std::fs::remove_dir_all(d).map_err(|e| TrainerError::io(d, e))?;
        }
    }
    let out = write(&tmp)?;
    sync_dir(&tmp)?;
    std::fs::rename(&tmp, dest).map_err(|e| TrainerError::io(dest, e))?;
    if let Some(parent) = dest.parent() {
        sync_dir(parent)?;
    }
    Ok(out)
}

/// Flushes a folder's entries (new files, a rename) to disk.
fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| TrainerError::io(dir, e))
}

/// Removes snapshots in `dir` other than `keep` (older ones, and newer ones a crash left
/// uncommitted).
pub fn prune_snapshots(dir: &Path, keep: &Path) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if path != keep && (name.starts_with("step-") || name.starts_with(".step-")) {
            std::fs::remove_dir_all(&path).map_err(|e| TrainerError::io(&path, e))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use hir_core::suboutput::SubOutputCase;
    use hir_model::train::Example;

    fn tiny_llama() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../hir-model/tests/fixtures/llama")
    }

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("hir-state-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn examples() -> Vec<HirExample> {
        let ex = |p: &[u32], c: &[u32]| Example {
            prompt: p.to_vec(),
            completion: c.to_vec(),
        };
        (0..6u32)
            .map(|i| HirExample {
                positive: ex(&[5 + i, 6, 7, 8 + i % 3], &[20 + i, 21, 0]),
                negative: ex(&[9, 10 + i, 11], &[20 + i, 21, 0]),
                case: SubOutputCase::Other,
            })
            .collect()
    }

    fn config() -> RunConfig {
        RunConfig {
            micro_batch_size: 4,
            learning_rate: 1e-2,
            ..RunConfig::default()
        }
    }

    fn weights(s: &TrainState) -> Vec<Vec<f32>> {
        s.model
            .vars()
            .iter()
            .map(|(_, v)| v.as_tensor().flatten_all().unwrap().to_vec1().unwrap())
            .collect()
    }

    #[test]
    fn a_snapshot_resumes_bit_exactly_and_a_changed_one_is_refused() {
        let dev = Device::Cpu;
        let mut a = TrainState::load(&tiny_llama(), &dev, &config()).unwrap();
        a.step(&examples()).unwrap();
        let dir = scratch("snapshot");
        let (folder, sha) = a.save_snapshot(&dir, 1).unwrap();
        let (mut b, iteration) = TrainState::load_snapshot(&folder, &sha, &dev, &config()).unwrap();
        assert_eq!((iteration, b.step_count()), (1, 1));
        assert_eq!(weights(&a), weights(&b));
        let (sa, sb) = (a.step(&examples()).unwrap(), b.step(&examples()).unwrap());
        assert_eq!(sa, sb, "the resumed state steps exactly like the original");
        assert_eq!(weights(&a), weights(&b));

        // One flipped byte in the optimizer state or the weights: refused, named.
        for file in ["optimizer.safetensors", "model.safetensors"] {
            let path = folder.join(file);
            let good = std::fs::read(&path).unwrap();
            let mut bad = good.clone();
            let at = bad.len() - 5;
            bad[at] ^= 0x40;
            std::fs::write(&path, &bad).unwrap();
            let err = TrainState::load_snapshot(&folder, &sha, &dev, &config()).unwrap_err();
            assert!(err.to_string().contains(file), "{file}: {err}");
            std::fs::write(&path, &good).unwrap();
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_lora_run_trains_and_snapshots_only_its_adapters_and_resumes_bit_exactly() {
        let dev = Device::Cpu;
        let cfg = RunConfig {
            model: tiny_llama().to_string_lossy().into_owned(),
            lora_rank: 4,
            lora_targets: "q_proj,v_proj".into(),
            ..config()
        };
        let mut a = TrainState::load(&tiny_llama(), &dev, &cfg).unwrap();
        assert_eq!(
            a.model.vars().len(),
            2 * 2 * 2,
            "A and B of 2 targets in 2 layers"
        );
        let before = weights(&a);
        a.step(&examples()).unwrap();
        assert_ne!(weights(&a), before, "the adapters train");
        let dir = scratch("lora-snapshot");
        let (folder, sha) = a.save_snapshot(&dir, 2).unwrap();
        assert!(folder
            .join(hir_model::arch::lora::ADAPTER_WEIGHTS)
            .is_file());
        assert!(
            !folder.join("model.safetensors").exists(),
            "the frozen base is not copied"
        );
        let (mut b, iteration) = TrainState::load_snapshot(&folder, &sha, &dev, &cfg).unwrap();
        assert_eq!((iteration, b.step_count()), (2, 1));
        assert_eq!(weights(&a), weights(&b));
        let (sa, sb) = (a.step(&examples()).unwrap(), b.step(&examples()).unwrap());
        assert_eq!(
            sa, sb,
            "the resumed adapters and moments step exactly like the original"
        );
        assert_eq!(weights(&a), weights(&b));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn recomputing_activations_takes_the_same_step() {
        let dev = Device::Cpu;
        let mut a = TrainState::load(&tiny_llama(), &dev, &config()).unwrap();
        let mut b = TrainState::load(&tiny_llama(), &dev, &config()).unwrap();
        (a.recompute, b.recompute) = (true, false);
        for _ in 0..2 {
            let (sa, sb) = (a.step(&examples()).unwrap(), b.step(&examples()).unwrap());
            assert!((sa.loss - sb.loss).abs() < 1e-5, "{sa:?} {sb:?}");
            assert!((sa.grad_norm - sb.grad_norm).abs() < 1e-4 * sb.grad_norm.max(1.0));
        }
        for (x, y) in weights(&a).iter().zip(weights(&b)) {
            let d = x
                .iter()
                .zip(&y)
                .map(|(p, q)| (p - q).abs())
                .fold(0f32, f32::max);
            assert!(d < 1e-4, "weights differ by {d}");
        }
    }
}
