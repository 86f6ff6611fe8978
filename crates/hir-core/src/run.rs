//! A run's knobs, with the reference's values as defaults (HIR.md §2). Stored as JSON with
//! the run, read by every service that works on it.

use serde::{Deserialize, Serialize};

use crate::error::{CoreError, Result};

/// HIR's hyperparameters and sampling settings for one run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunConfig {
    /// The starting model (a Hugging Face folder or a GGUF file) as the trainer sees it.
    pub model: String,
    /// AdamW learning rate, constant.
    pub learning_rate: f64,
    /// Effective batch size in examples (reached by gradient accumulation).
    pub batch_size: u32,
    /// Examples per forward/backward pass; divides `batch_size`.
    pub micro_batch_size: u32,
    /// Passes over an iteration's training data.
    pub epochs_per_iteration: u32,
    /// Label smoothing of the supervised and contrastive terms.
    pub label_smoothing: f64,
    /// Weight of the entropy bonus.
    pub entropy_coef: f64,
    /// Weight of the contrastive term.
    pub contrastive_coef: f64,
    /// Samples per training prompt per iteration.
    pub samples_per_prompt: u32,
    /// Iterations after the base evaluation.
    pub iterations: u32,
    /// Sampling temperature.
    pub temperature: f32,
    /// Sampling top-k (0 disables).
    pub top_k: u32,
    /// Sampling nucleus mass.
    pub top_p: f32,
    /// New tokens per sample and per evaluation answer.
    pub max_new_tokens: u32,
    /// Global gradient-norm clip (0 disables).
    pub max_grad_norm: f64,
    /// AdamW weight decay.
    pub weight_decay: f64,
    /// Seed of the split, sampling and sub-output sampler.
    pub seed: u64,
    /// Train on every past iteration's samples (the reference's replay buffer).
    pub replay_buffer: bool,
    /// At most this many training prompts per task (0 = all).
    pub max_train_prompts: u32,
    /// At most this many test prompts per task (0 = all).
    pub max_test_prompts: u32,
    /// Optimizer steps per iteration at most (0 = no cap).
    pub max_steps_per_iteration: u32,
    /// How prompts reach the model.
    pub prompt_style: PromptStyle,
}

/// How prompts reach the model when sampling, training and evaluating.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PromptStyle {
    /// The paper's prompt text as is.
    #[default]
    Raw,
    /// The same text as one user turn of the model's chat template.
    Chat,
}

impl PromptStyle {
    /// `raw` or `chat`, as stored with evaluation results.
    pub fn as_str(self) -> &'static str {
        match self {
            PromptStyle::Raw => "raw",
            PromptStyle::Chat => "chat",
        }
    }

    /// Parses `raw` or `chat`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "raw" => Ok(PromptStyle::Raw),
            "chat" => Ok(PromptStyle::Chat),
            other => Err(CoreError::InvalidArgument {
                field: "prompt_style",
                reason: format!("is {other:?}; must be \"raw\" or \"chat\""),
            }),
        }
    }
}

impl Default for RunConfig {
    fn default() -> Self {
        Self {
            model: String::new(),
            learning_rate: 5e-4,
            batch_size: 64,
            micro_batch_size: 8,
            epochs_per_iteration: 10,
            label_smoothing: 0.2,
            entropy_coef: 0.001,
            contrastive_coef: 1.0,
            samples_per_prompt: 4,
            iterations: 30,
            temperature: 1.0,
            top_k: 50,
            top_p: 1.0,
            max_new_tokens: 256,
            max_grad_norm: 1.0,
            weight_decay: 0.0,
            seed: 1,
            replay_buffer: true,
            max_train_prompts: 0,
            max_test_prompts: 0,
            max_steps_per_iteration: 0,
            prompt_style: PromptStyle::Raw,
        }
    }
}

impl RunConfig {
    /// Checks every knob's range; the error names the field.
    pub fn validate(&self) -> Result<()> {
        let bad =
            |field: &'static str, reason: String| Err(CoreError::InvalidArgument { field, reason });
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return bad(
                "learning_rate",
                format!("is {}; must be positive", self.learning_rate),
            );
        }
        for (field, v) in [
            ("batch_size", self.batch_size),
            ("micro_batch_size", self.micro_batch_size),
            ("epochs_per_iteration", self.epochs_per_iteration),
            ("samples_per_prompt", self.samples_per_prompt),
            ("iterations", self.iterations),
            ("max_new_tokens", self.max_new_tokens),
        ] {
            if v == 0 {
                return bad(field, "must be positive".into());
            }
        }
        if self.batch_size % self.micro_batch_size != 0 {
            return bad(
                "micro_batch_size",
                format!(
                    "{} does not divide batch_size {}",
                    self.micro_batch_size, self.batch_size
                ),
            );
        }
        if !(0.0..1.0).contains(&self.label_smoothing) {
            return bad(
                "label_smoothing",
                format!("is {}; must be in [0, 1)", self.label_smoothing),
            );
        }
        for (field, v) in [
            ("entropy_coef", self.entropy_coef),
            ("contrastive_coef", self.contrastive_coef),
            ("max_grad_norm", self.max_grad_norm),
            ("weight_decay", self.weight_decay),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return bad(field, format!("is {v}; must be finite and >= 0"));
            }
        }
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return bad(
                "temperature",
                format!("is {}; must be finite and >= 0", self.temperature),
            );
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", format!("is {}; must be in (0, 1]", self.top_p));
        }
        Ok(())
    }

    /// The seed of one prompt's samples in one iteration: samples are the same whichever
    /// order or grouping prompts are sent in, so an interrupted iteration resumes exactly.
    pub fn sample_seed(&self, iteration: u32, task_id: i64, example: u32) -> u64 {
        let mut rng = crate::rng::SplitMix64::new(
            self.seed
                ^ (u64::from(iteration) << 40)
                ^ ((task_id as u64) << 20)
                ^ u64::from(example),
        );
        rng.next_u64()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_references_and_valid() {
        let c = RunConfig::default();
        assert_eq!(
            (
                c.learning_rate,
                c.batch_size,
                c.label_smoothing,
                c.entropy_coef
            ),
            (5e-4, 64, 0.2, 0.001)
        );
        c.validate().unwrap();
        let parsed: RunConfig = serde_json::from_str(r#"{"samples_per_prompt": 2}"#).unwrap();
        assert_eq!(parsed.samples_per_prompt, 2);
        assert_eq!(parsed.top_k, 50);
        assert!(
            serde_json::from_str::<RunConfig>(r#"{"sample_per_prompt": 2}"#).is_err(),
            "typos are errors"
        );
    }

    #[test]
    fn invalid_knobs_are_named() {
        for (c, field) in [
            (
                RunConfig {
                    learning_rate: 0.0,
                    ..Default::default()
                },
                "learning_rate",
            ),
            (
                RunConfig {
                    batch_size: 0,
                    ..Default::default()
                },
                "batch_size",
            ),
            (
                RunConfig {
                    micro_batch_size: 7,
                    ..Default::default()
                },
                "micro_batch_size",
            ),
            (
                RunConfig {
                    label_smoothing: 1.0,
                    ..Default::default()
                },
                "label_smoothing",
            ),
            (
                RunConfig {
                    top_p: 0.0,
                    ..Default::default()
                },
                "top_p",
            ),
            (
                RunConfig {
                    entropy_coef: f64::NAN,
                    ..Default::default()
                },
                "entropy_coef",
            ),
        ] {
            let err = c.validate().unwrap_err().to_string();
            assert!(err.contains(field), "{err}");
        }
    }

    #[test]
    fn sample_seeds_differ_by_prompt_and_iteration() {
        let c = RunConfig::default();
        let a = c.sample_seed(1, 3, 7);
        assert_eq!(a, c.sample_seed(1, 3, 7));
        assert_ne!(a, c.sample_seed(2, 3, 7));
        assert_ne!(a, c.sample_seed(1, 4, 7));
        assert_ne!(a, c.sample_seed(1, 3, 8));
    }
}
