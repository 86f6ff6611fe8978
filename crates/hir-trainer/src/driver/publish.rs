//! Publishing an iteration's model: the checkpoint registered as a new version, the swap
//! into every generator, and the check that each generator then serves those weights.

use std::path::PathBuf;
use std::time::Instant;

use hir_store::{ModelVersion, NewModelVersion, StoreError};

use hir_runtime::generators::GeneratorEndpoint;

use super::{version_name, Driver};
use crate::error::{Result, TrainerError};

impl Driver<'_> {
    /// Writes iteration `k`'s model as a checkpoint and registers it as a new version. The
    /// folder is written whole or not at all ([`crate::state::write_folder`]), so a crash
    /// leaves no half-written checkpoint under the version's name.
    pub(super) async fn checkpoint(&mut self, k: u32) -> Result<ModelVersion> {
        let name = version_name(self.run_id, k);
        let folder = self.checkpoint_folder(k);
        let f = folder.clone();
        self.with_train_state(move |s| {
            crate::state::write_folder(&f, |tmp| {
                s.model.save(tmp)?;
                hir_runtime::fault::point(hir_runtime::fault::TRAINER_CHECKPOINT);
                Ok(())
            })
        })
        .await??;
        let sha256 = hir_model::formats::checkpoint::sha256_file(&folder.join("manifest.json"))?;
        let parent = if k == 1 {
            None
        } else {
            Some(
                self.ctx
                    .store
                    .get_model_version_by_name(&version_name(self.run_id, k - 1))
                    .await?
                    .id,
            )
        };
        let training = self.ctx.store.training_summary(self.run_id).await?;
        let it = training.iter().find(|s| s.iteration == k as i32);
        let version = self
            .ctx
            .store
            .register_model_version(&NewModelVersion {
                name,
                run_id: Some(self.run_id),
                iteration: Some(k as i32),
                parent_id: parent,
                checkpoint_uri: folder.to_string_lossy().into_owned(),
                sha256,
                metrics: serde_json::json!({
                    "train_loss": it.and_then(|s| s.mean_loss),
                    "steps": it.map_or(0, |s| s.steps),
                }),
            })
            .await?;
        self.events.checkpoint(&version);
        // The generators serve the previous version until the swap.
        self.ctx.metrics.version_lag.set(1);
        Ok(version)
    }

    fn checkpoint_folder(&self, k: u32) -> PathBuf {
        self.ctx
            .config
            .checkpoint_dir
            .join(self.run_id.to_string())
            .join(format!("it{k:03}"))
    }

    /// Swaps iteration `k`'s version into every generator and verifies each serves it. A
    /// generator that cannot be reached is passed over (it refuses work for this version
    /// until [`Driver::reconcile`] brings it there); at least one must take the version.
    pub(super) async fn swap_all(&mut self, k: u32) -> Result<()> {
        let version = self
            .ctx
            .store
            .get_model_version_by_name(&version_name(self.run_id, k))
            .await?;
        let remotes = &self.ctx.remotes;
        remotes.refresh_generators().await;
        let mut serving = 0;
        let mut unreachable = None;
        for g in remotes.generators().iter() {
            match self.swap_into(g, &version).await {
                Ok(_) => {}
                Err(e @ TrainerError::Unreachable { .. }) => {
                    tracing::warn!(generator = %g.address, error = %e, "passing over an unreachable generator; it is brought to the run's version when it is back");
                    unreachable = Some(e);
                    continue;
                }
                Err(e) => return Err(e),
            }
            self.verify(g, &version.name).await?;
            serving += 1;
        }
        if serving == 0 {
            return Err(unreachable.unwrap_or_else(|| TrainerError::Unreachable {
                service: "generators".into(),
                message: "no generator is known".into(),
            }));
        }
        self.ctx.metrics.version_lag.set(0);
        Ok(())
    }

    /// Brings every generator to the version iteration `k` samples from (the run's latest
    /// trained version), so that a generator that restarted (serving its starting model) or
    /// joined gets the run's version before it gets work; the sampler's requests name the
    /// version, so until then it refuses work rather than mixing versions. A generator that
    /// cannot be reached is left for the next round. Before the first trained version
    /// there is nothing to bring: generators start with the starting model.
    pub(super) async fn reconcile(&self, k: u32) -> Result<()> {
        let store = &self.ctx.store;
        let Some(version) = store.run_version_before(self.run_id, k as i32).await? else {
            return Ok(());
        };
        if version.run_id != Some(self.run_id) {
            return Ok(());
        }
        self.ctx.remotes.refresh_generators().await;
        for g in self.ctx.remotes.generators().iter() {
            match self.swap_into(g, &version).await {
                Ok(_) => {}
                Err(e @ TrainerError::Unreachable { .. }) => {
                    tracing::warn!(generator = %g.address, error = %e, "cannot bring a generator to the run's version yet");
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Swaps `version` (one of this run's checkpoints) into generator `g` unless it serves
    /// it already; returns whether it swapped.
    async fn swap_into(&self, g: &GeneratorEndpoint, version: &ModelVersion) -> Result<bool> {
        let remotes = &self.ctx.remotes;
        let info = remotes.model_info(g).await?;
        if info.version == version.name {
            return Ok(false);
        }
        if !self.is_ours_or_base(&info.version).await? {
            return Err(TrainerError::FailedPrecondition(format!(
                "generator {} serves version {:?}, which belongs to another run; \
                 give each run its own generators",
                g.address,
                hir_core::text_enum::bounded(&info.version)
            )));
        }
        let folder = PathBuf::from(&version.checkpoint_uri);
        let relative = format!("{}/it{:03}", self.run_id, version.iteration.unwrap_or(0));
        let started = Instant::now();
        let target = crate::remote::SwapTarget {
            folder: &folder,
            relative: &relative,
            version: &version.name,
            sha256: &version.sha256,
            expected: &info.version,
        };
        let r = remotes.swap(g, &target, self.ctx.config.upload).await?;
        hir_runtime::fault::point(hir_runtime::fault::TRAINER_SWAP);
        self.ctx
            .metrics
            .swap_seconds
            .observe(started.elapsed().as_secs_f64());
        tracing::info!(generator = %g.address, version = %r.version, previous = %r.previous_version, total_ms = r.total_ms, "swapped");
        self.events
            .swap(&g.address, &r.version, &r.previous_version, r.total_ms);
        Ok(true)
    }

    /// A version this run produced, or one no run produced (a base model).
    async fn is_ours_or_base(&self, name: &str) -> Result<bool> {
        Ok(match self.ctx.store.get_model_version_by_name(name).await {
            Ok(v) => v.run_id.is_none_or(|r| r == self.run_id),
            Err(StoreError::NotFound { .. }) => true,
            Err(e) => return Err(e.into()),
        })
    }

    /// Checks that a generator reports `version` and that its log-probabilities of a fixed
    /// probe agree with the trainer's model.
    async fn verify(
        &mut self,
        g: &hir_runtime::generators::GeneratorEndpoint,
        version: &str,
    ) -> Result<()> {
        let info = self.ctx.remotes.model_info(g).await?;
        if info.version != version {
            return Err(TrainerError::Verification(format!(
                "generator {} reports version {:?} after the swap to {version:?}",
                g.address, info.version
            )));
        }
        let probe_text = self
            .tasks
            .first()
            .map(|t| {
                hir_core::prompt::Prompt::build(
                    &t.task,
                    &t.task.examples[0],
                    hir_core::prompt::DEFAULT_INSTRUCTION,
                    hir_core::prompt::PromptVariant::Sampler,
                )
                .text()
            })
            .unwrap_or_default();
        let ids = self
            .with_train_state(move |s| s.model.encode(&probe_text))
            .await??;
        // The last few tokens of a real prompt, scored after the rest.
        let cut = ids.len().saturating_sub(8).max(1);
        if cut >= ids.len() {
            return Ok(());
        }
        let (prompt, continuation) = (ids[..cut].to_vec(), ids[cut..].to_vec());
        let remote = self
            .ctx
            .remotes
            .logprobs(g, version, &prompt, &continuation)
            .await?;
        let local = self
            .with_train_state(move |s| s.logprobs(&prompt, &continuation))
            .await??;
        if remote.len() != local.len() {
            return Err(TrainerError::Verification(format!(
                "generator {} returned {} log-probabilities for {} probe tokens",
                g.address,
                remote.len(),
                local.len()
            )));
        }
        let diff = remote
            .iter()
            .zip(&local)
            .map(|(a, b)| f64::from((a - b).abs()))
            .sum::<f64>()
            / local.len() as f64;
        let tolerance = if info.dtype == "quantized" {
            self.ctx.config.probe_tolerance_quantized
        } else {
            self.ctx.config.probe_tolerance
        };
        if diff > tolerance {
            return Err(TrainerError::Verification(format!(
                "generator {} serves {version:?} ({}) but its log-probabilities differ from \
                 the trainer's by {diff:.4} per token on average (tolerance {tolerance}); it \
                 is not serving the trained weights",
                g.address, info.dtype
            )));
        }
        tracing::info!(generator = %g.address, version, mean_abs_diff = diff, "generator verified");
        Ok(())
    }
}
