//! StartRun's checks, before anything is written: the request's fields (ids, names, tasks,
//! the model path, the knobs), the starting model's header and LoRA settings, and whether
//! every generator can sample and evaluate the run.

use std::path::Path;
use std::time::Duration;

use hir_core::run::RunConfig;
use hir_core::text_enum::bounded;
use hir_proto::{convert, pb};
use uuid::Uuid;

use super::Trainer;
use crate::error::{Result, TrainerError};

/// A run id from the request field `field`.
pub(super) fn parse_run_id(field: &str, s: &str) -> Result<Uuid> {
    Uuid::parse_str(s.trim())
        .map_err(|e| TrainerError::invalid(field, format!("{:?} is not a UUID: {e}", bounded(s))))
}

/// Longest run name and task name, in bytes.
pub const MAX_NAME_BYTES: usize = 256;
/// Longest model path, in bytes.
pub const MAX_PATH_BYTES: usize = 4096;
/// How long StartRun waits for each generator's GetModelInfo.
const GENERATOR_CHECK_TIMEOUT: Duration = Duration::from_secs(10);

/// Checks one text field of a request: at most `max` bytes and no NUL byte (which the
/// store cannot hold). `field` names it in the error.
fn check_text(field: impl FnOnce() -> String, value: &str, max: usize) -> Result<()> {
    if value.len() > max {
        return Err(TrainerError::invalid(
            field(),
            format!("is {} bytes; at most {max}", value.len()),
        ));
    }
    if let Some(at) = value.find('\0') {
        return Err(TrainerError::invalid(
            field(),
            format!("holds a NUL byte (at byte {at}); text cannot contain one"),
        ));
    }
    Ok(())
}

impl Trainer {
    /// Validates a StartRun request into (run id, name, policy, config, task names).
    pub(super) fn validate_start(
        &self,
        r: &pb::StartRunRequest,
    ) -> Result<(Uuid, String, RunConfig, Vec<String>)> {
        let run_id = if r.run_id.trim().is_empty() {
            Uuid::new_v4()
        } else {
            parse_run_id("run_id", &r.run_id)?
        };
        if r.tasks.is_empty() {
            return Err(TrainerError::invalid(
                "tasks",
                "name at least one BIG-bench task, e.g. tracking_shuffled_objects_three_objects",
            ));
        }
        check_text(|| "name".into(), &r.name, MAX_NAME_BYTES)?;
        let mut names = Vec::with_capacity(r.tasks.len());
        for (i, t) in r.tasks.iter().enumerate() {
            check_text(|| format!("tasks[{i}]"), t, MAX_NAME_BYTES)?;
            let task = self
                .ctx
                .tasks
                .get(t)
                .map_err(|e| TrainerError::invalid(format!("tasks[{i}]"), e.to_string()))?;
            names.push(task.name.clone());
        }
        if r.model.trim().is_empty() {
            return Err(TrainerError::invalid(
                "model",
                "give the starting model: a Hugging Face folder or a .gguf file the trainer can read",
            ));
        }
        check_text(|| "model".into(), &r.model, MAX_PATH_BYTES)?;
        let model = Path::new(&r.model);
        if !(model.is_dir() && model.join("config.json").is_file()
            || model.is_file() && model.extension().is_some_and(|e| e == "gguf"))
        {
            return Err(TrainerError::invalid(
                "model",
                format!(
                    "{:?} is neither a model folder with config.json nor a .gguf file on the \
                     trainer's disk",
                    bounded(&r.model)
                ),
            ));
        }
        let policy = if r.policy.is_empty() {
            "hir"
        } else {
            r.policy.as_str()
        };
        hir_core::relabel::policy_by_name(policy)
            .map_err(|e| TrainerError::invalid("policy", e.to_string()))?;
        let config = convert::run_config(&r.model, r.hyperparameters.as_ref())
            .and_then(|c| c.validate().map(|()| c))
            .map_err(|e| match e {
                hir_core::CoreError::InvalidArgument { field, reason } => {
                    TrainerError::invalid(format!("hyperparameters.{field}"), reason)
                }
                other => TrainerError::invalid("hyperparameters", other.to_string()),
            })?;
        Ok((run_id, policy.to_string(), config, names))
    }

    /// Reads the starting model's header (see [`probe_model`]); returns its architecture.
    pub(super) async fn check_model(&self, model: &str) -> Result<String> {
        let path = std::path::PathBuf::from(model);
        tokio::task::spawn_blocking(move || hir_model::probe::probe(&path))
            .await
            .map_err(|e| TrainerError::Internal(format!("checking the model: {e}")))?
            .map_err(|reason| {
                TrainerError::invalid("model", format!("{:?} {reason}", bounded(model)))
            })
    }

    /// With `lora_rank` set, checks the adapters fit the starting model: a Llama-family
    /// model whose targeted projections are at least that wide.
    pub(super) async fn check_lora(&self, config: &RunConfig) -> Result<()> {
        if config.lora_rank == 0 {
            return Ok(());
        }
        let lora = hir_model::arch::lora::LoraConfig::from_knobs(
            config.lora_rank,
            config.lora_alpha,
            &config.lora_targets,
        );
        let path = std::path::PathBuf::from(&config.model);
        let checked = tokio::task::spawn_blocking(move || {
            lora.and_then(|l| hir_model::probe::check_lora(&path, &l))
        })
        .await
        .map_err(|e| TrainerError::Internal(format!("checking the LoRA settings: {e}")))?;
        match checked {
            Ok(()) => Ok(()),
            Err(hir_model::ModelError::InvalidAdapter { field, reason }) => Err(
                TrainerError::invalid(format!("hyperparameters.{field}"), reason),
            ),
            Err(other) => Err(TrainerError::invalid(
                "model",
                format!("{:?}: {}", bounded(&config.model), other),
            )),
        }
    }

    /// Asks every generator what it serves and refuses a run it cannot sample or
    /// evaluate: another architecture than the starting model's, more new tokens or
    /// samples per prompt than it allows, a top-k beyond its vocabulary. A generator that
    /// does not answer is passed over (it is brought to the run's version when it is back);
    /// when none answers the call is UNAVAILABLE.
    pub(super) async fn check_generators(
        &self,
        config: &RunConfig,
        architecture: &str,
    ) -> Result<()> {
        let remotes = &self.ctx.remotes;
        remotes.refresh_generators().await;
        let mut unanswered = None;
        let mut answered = 0;
        for g in remotes.generators().iter() {
            let info = match tokio::time::timeout(GENERATOR_CHECK_TIMEOUT, remotes.model_info(g))
                .await
            {
                Ok(Ok(info)) => info,
                Ok(Err(e @ (TrainerError::Unreachable { .. } | TrainerError::Remote { .. }))) => {
                    tracing::warn!(generator = %g.address, error = %e, "a generator does not answer at StartRun");
                    unanswered = Some(e);
                    continue;
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => {
                    unanswered = Some(TrainerError::Unreachable {
                        service: format!("generator {}", g.address),
                        message: format!(
                            "no answer to GetModelInfo within {} s",
                            GENERATOR_CHECK_TIMEOUT.as_secs()
                        ),
                    });
                    continue;
                }
            };
            answered += 1;
            let at = &g.address;
            if !info.architecture.is_empty() && info.architecture != architecture {
                return Err(TrainerError::invalid(
                    "model",
                    format!(
                        "is a {architecture} model but generator {at} serves a {} model \
                         (version {}); start from a {} model or serve a {architecture} one",
                        info.architecture, info.version, info.architecture
                    ),
                ));
            }
            // A generator's bound of 0 means it sets none.
            let limits = info.limits.unwrap_or_default();
            for (field, value, bound, what) in [
                (
                    "hyperparameters.max_new_tokens",
                    config.max_new_tokens,
                    limits.max_new_tokens,
                    format!("generator {at} allows at most {}", limits.max_new_tokens),
                ),
                (
                    "hyperparameters.samples_per_prompt",
                    config.samples_per_prompt,
                    limits.max_n,
                    format!("generator {at} samples at most {} per prompt", limits.max_n),
                ),
                (
                    "hyperparameters.max_new_tokens",
                    config.max_new_tokens,
                    info.context_length,
                    format!(
                        "the model generator {at} serves has a context of {} tokens",
                        info.context_length
                    ),
                ),
                (
                    "hyperparameters.top_k",
                    config.top_k,
                    info.vocab_size,
                    format!(
                        "the vocabulary of the model generator {at} serves has {} tokens",
                        info.vocab_size
                    ),
                ),
            ] {
                if bound > 0 && value > bound {
                    return Err(TrainerError::invalid(field, format!("is {value}; {what}")));
                }
            }
        }
        match unanswered {
            Some(e) if answered == 0 => Err(e),
            _ => Ok(()),
        }
    }
}
