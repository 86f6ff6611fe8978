//! A run's knobs, with the reference's values as defaults (HIR.md §2). Stored as JSON with
//! the run, read by every service that works on it.
//!
//! Two named presets set every knob at once ([`RunConfig::preset`]): `reference`, what the
//! reference's `run.sh` runs (1 sample per prompt), and `paper`, the paper's 4 samples per
//! prompt with everything else the same. The defaults are the `paper` preset. Where a knob
//! departs from the reference its documentation says so and why.

use serde::{Deserialize, Serialize};

use crate::error::{CoreError, Result};

/// The default AdamW learning rate (the reference's `lr=5e-4`). The optimizer's own default
/// (`hir_model::train::AdamWConfig`) is this value.
pub const DEFAULT_LEARNING_RATE: f64 = 5e-4;
/// The default label smoothing ε of the supervised and contrastive terms (the reference's
/// `LabelSmoother(epsilon=0.2)`). The loss's own default is this value.
pub const DEFAULT_LABEL_SMOOTHING: f64 = 0.2;
/// The default weight β of the entropy bonus.
pub const DEFAULT_ENTROPY_COEF: f64 = 0.001;
/// The default weight α of the contrastive term.
pub const DEFAULT_CONTRASTIVE_COEF: f64 = 1.0;

/// Calls `$m!` with every numeric and boolean knob of a run, declared here once: its
/// documentation, field, type and command-line flag. [`RunConfig`] and [`KNOBS`] are built
/// from it, the wire conversion in `hir-proto` reads and writes each knob through it, and
/// the CLI's `hir run` derives its flags and their help from [`KNOBS`]. A boolean knob's
/// flag sets the opposite of its default (`--no-replay` turns `replay_buffer` off).
#[macro_export]
macro_rules! for_each_knob {
    ($m:ident) => {
        $m! {
            /// AdamW learning rate, constant.
            learning_rate: f64 = "learning-rate",
            /// Effective batch size in examples (reached by gradient accumulation), at most 65536.
            batch_size: u32 = "batch-size",
            /// Examples per forward/backward pass; divides `batch_size`.
            micro_batch_size: u32 = "micro-batch-size",
            /// Passes over an iteration's training data, at most 1000.
            epochs_per_iteration: u32 = "epochs",
            /// Label smoothing of the supervised and contrastive terms.
            label_smoothing: f64 = "label-smoothing",
            /// Weight of the entropy bonus.
            entropy_coef: f64 = "entropy-coef",
            /// Weight of the contrastive term.
            contrastive_coef: f64 = "contrastive-coef",
            /// Samples per training prompt per iteration, 1 to 64 (and at most the generators'
            /// `max_n`).
            samples_per_prompt: u32 = "samples-per-prompt",
            /// Sample → train → evaluate rounds after the base evaluation, 1 to 1000: `run.sh`
            /// runs 1 + 30.
            iterations: u32 = "iterations",
            /// Sampling temperature.
            temperature: f32 = "temperature",
            /// Sampling top-k (0 disables), at most the model's vocabulary size.
            top_k: u32 = "top-k",
            /// Sampling nucleus mass.
            top_p: f32 = "top-p",
            /// New tokens per sample and per evaluation answer, 1 to 4096 (and at most the
            /// generators' `max_new_tokens` and the model's context).
            max_new_tokens: u32 = "max-new-tokens",
            /// Global gradient-norm clip (0 disables, as the reference).
            max_grad_norm: f64 = "max-grad-norm",
            /// AdamW weight decay.
            weight_decay: f64 = "weight-decay",
            /// Seed of the split, sampling and sub-output sampler.
            seed: u64 = "seed",
            /// Draw each iteration's training set from every iteration's samples so far (the
            /// reference's replay buffer), not only the iteration's own.
            replay_buffer: bool = "no-replay",
            /// Share of the pool held out each iteration, never trained (the reference's 10%
            /// `train_test_split`, used there only for a perplexity report).
            replay_holdout: f64 = "replay-holdout",
            /// Train on at most this many samples per training prompt per iteration, a seeded
            /// uniform subset of the pool (the reference's `idx < 4·⌊0.8N⌋`; 0 = no cap).
            replay_cap_per_prompt: u32 = "replay-cap-per-prompt",
            /// Keep one copy of each distinct output of a prompt in an iteration (the reference's
            /// `list(set(outputs))`).
            dedup_outputs: bool = "no-dedup",
            /// Append end-of-sequence to an output cut by `max_new_tokens`. Off by default, a
            /// departure: the reference's T5 tokenizer ends every label with `</s>`, which for a cut
            /// output teaches the model to stop mid-answer. Outputs that ended on their own keep it.
            eos_after_cut: bool = "eos-after-cut",
            /// End a label span that stops inside a sample's output (before its end-of-sequence)
            /// with end-of-sequence when it is neither the gold answer nor part of it (HIR.md
            /// §1.5, case c), as the reference does. Off is a departure: such a span then ends
            /// without end-of-sequence, as case (b)'s do, so a wrong output cut at a random
            /// point no longer teaches the model to stop there.
            eos_after_span: bool = "no-eos-after-span",
            /// Train encoder-decoder models with the dropout of their config (`dropout_rate`), as
            /// the reference trains FLAN-T5 in `train()` mode; each HIR step then takes the
            /// reference's three forward passes. Decoder-only models here have no dropout.
            train_dropout: bool = "no-train-dropout",
            /// At most this many training prompts per task (0 = all).
            max_train_prompts: u32 = "max-train-prompts",
            /// At most this many test prompts per task (0 = all).
            max_test_prompts: u32 = "max-test-prompts",
            /// Optimizer steps per iteration at most (0 = no cap).
            max_steps_per_iteration: u32 = "max-steps",
            /// Train LoRA adapters of this rank beside frozen weights instead of every weight
            /// (Llama-family models). Unset, every weight trains, as the paper (stored as 0;
            /// a request that sets it to 0 is refused). A departure when set: far less
            /// memory and a swap that moves only the adapter, at a cost in what the model
            /// can learn.
            lora_rank: u32 = "lora-rank",
            /// LoRA's alpha: the adapters' product is scaled by `lora_alpha / lora_rank`.
            lora_alpha: f64 = "lora-alpha",
            /// Sample, train and evaluate a decoder-only model on the same prompt text. Off
            /// (the reference), evaluation prompts carry one more newline than sampling and
            /// training prompts (invisible to T5's tokenizer, another token sequence for a
            /// BPE model), and the `hir` policy relabels a correct output to "Solve question
            /// with correct answer." (no "the"), which is not the instruction evaluation
            /// asks under. On is a departure: evaluation uses the sampling prompt, and a
            /// correct output is relabeled to the evaluation's instruction.
            same_prompt_text: bool = "same-prompt-text",
            /// Share of the training split held out as validation, in [0, 1): its prompts are
            /// never sampled or trained, and the run is evaluated on them instead of the test
            /// split, so that settings can be compared without looking at the test split. 0
            /// (the reference) evaluates on the test split.
            validation_share: f64 = "validation-share",
            /// Evaluate after every this many iterations, and always after the base model and
            /// the last iteration; 0 evaluates only those two. 1 (the reference) evaluates
            /// every iteration. Larger values save a whole-split evaluation per skipped
            /// iteration, which dominates a CPU run.
            eval_every: u32 = "eval-every",
        }
    };
}

/// One knob of a run as the command line shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Knob {
    /// The field of [`RunConfig`] and of the wire's `Hyperparameters`.
    pub name: &'static str,
    /// The command-line flag, without `--`.
    pub flag: &'static str,
    /// The field's documentation.
    pub help: &'static str,
    /// Whether the knob is a switch (its flag takes no value).
    pub switch: bool,
}

macro_rules! declare_run_config {
    ($($(#[doc = $doc:literal])* $field:ident : $ty:ty = $flag:literal,)*) => {
        /// HIR's hyperparameters and sampling settings for one run.
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
        #[serde(default, deny_unknown_fields)]
        pub struct RunConfig {
            /// The preset the knobs started from (`reference`, `paper`), recorded with the run.
            pub preset: String,
            /// The starting model (a Hugging Face folder or a GGUF file) as the trainer sees it.
            pub model: String,
            /// The projections LoRA adapts when `lora_rank` is set, comma-separated
            /// (`q_proj,v_proj`, PEFT's default for Llama).
            pub lora_targets: String,
            $( $(#[doc = $doc])* pub $field: $ty, )*
            /// How prompts reach the model.
            pub prompt_style: PromptStyle,
            /// What makes a sample correct for relabeling and filtering.
            pub verifier: Verifier,
        }

        /// Every numeric and boolean knob, in declaration order.
        pub const KNOBS: &[Knob] = &[
            $( Knob {
                name: stringify!($field),
                flag: $flag,
                help: concat!($($doc),*),
                switch: is_switch(stringify!($ty)),
            }, )*
        ];
    };
}

const fn is_switch(ty: &str) -> bool {
    matches!(ty.as_bytes(), b"bool")
}

for_each_knob!(declare_run_config);

/// The knobs whose value is text (a name or a list) rather than a number or a switch: they
/// are not in [`for_each_knob!`] because each has its own type, checked by
/// [`RunConfig::validate`].
pub const TEXT_KNOBS: &[&str] = &["prompt_style", "verifier", "preset", "lora_targets"];

/// Reads the value of the knob `field` from its text, as a command line gives it; the
/// error names the knob and the type it expects.
pub fn parse_knob<T>(field: &'static str, text: &str) -> Result<T>
where
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    text.trim()
        .parse::<T>()
        .map_err(|e| CoreError::InvalidArgument {
            field,
            reason: format!(
                "{:?} is not a {}: {e}",
                crate::text_enum::bounded(text),
                std::any::type_name::<T>()
            ),
        })
}

/// Refuses a name that is no knob: neither in [`KNOBS`] nor in [`TEXT_KNOBS`].
pub fn check_knob_name(name: &str) -> Result<()> {
    if KNOBS.iter().any(|k| k.name == name) || TEXT_KNOBS.contains(&name) {
        Ok(())
    } else {
        Err(CoreError::InvalidArgument {
            field: "hyperparameters",
            reason: format!("no knob is named {:?}", crate::text_enum::bounded(name)),
        })
    }
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
                reason: format!(
                    "is {:?}; must be \"raw\" or \"chat\"",
                    crate::text_enum::bounded(other)
                ),
            }),
        }
    }
}

/// What makes a sampled output correct when it is relabeled (`hir`, `hindsight_answer`)
/// or kept (`farl`). Evaluation always reports both exact match and extraction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verifier {
    /// The reference's verdict: the whole output equals the gold answer after
    /// normalization ([`crate::score::relabel_match`]).
    #[default]
    Exact,
    /// The answer read out of the output ([`crate::score::score`]'s extraction) equals the
    /// gold answer. A departure: a small model's "There are 8 objects." counts as the
    /// answer 8, so the few right answers it gives are seen.
    Extracted,
}

impl Verifier {
    /// `exact` or `extracted`, as recorded with the run.
    pub fn as_str(self) -> &'static str {
        match self {
            Verifier::Exact => "exact",
            Verifier::Extracted => "extracted",
        }
    }

    /// Parses `exact` or `extracted`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "exact" => Ok(Verifier::Exact),
            "extracted" => Ok(Verifier::Extracted),
            other => Err(CoreError::InvalidArgument {
                field: "verifier",
                reason: format!(
                    "is {:?}; must be \"exact\" or \"extracted\"",
                    crate::text_enum::bounded(other)
                ),
            }),
        }
    }

    /// The verdict on `output` against `gold`, given whether extraction read the gold
    /// answer out of it (`extracted`, as [`crate::score::score`] reports).
    pub fn correct(self, output: &str, gold: &str, extracted: bool) -> bool {
        match self {
            Verifier::Exact => crate::score::relabel_match(output, gold),
            Verifier::Extracted => extracted,
        }
    }
}

/// The largest value of each bounded knob. A run is checked against these when it starts,
/// so that it never fails later on a value nothing can run (an iteration count no one
/// waits for, more samples or tokens than a generator serves). The trainer also checks
/// `samples_per_prompt`, `max_new_tokens` and `top_k` against what its generators report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KnobLimits {
    /// Most iterations after the base evaluation.
    pub iterations: u32,
    /// Most samples per training prompt per iteration.
    pub samples_per_prompt: u32,
    /// Most new tokens per sample or evaluation answer.
    pub max_new_tokens: u32,
    /// Largest effective batch (and micro-batch) in examples.
    pub batch_size: u32,
    /// Most passes over an iteration's training data.
    pub epochs_per_iteration: u32,
}

/// The bounds [`RunConfig::validate`] enforces.
pub const LIMITS: KnobLimits = KnobLimits {
    iterations: 1000,
    samples_per_prompt: 64,
    max_new_tokens: 4096,
    batch_size: 65_536,
    epochs_per_iteration: 1000,
};

/// The projections of a Llama-family layer a LoRA adapter can target, by their Hugging
/// Face module names.
pub const LORA_TARGETS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// `lora_targets` (`"q_proj, v_proj"`) as a list of names.
pub fn split_lora_targets(targets: &str) -> Vec<&str> {
    targets
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .collect()
}

/// Which LoRA setting [`check_lora`] refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraKnob {
    /// `lora_alpha`.
    Alpha,
    /// `lora_targets`.
    Targets,
}

impl LoraKnob {
    /// The run setting's name.
    pub fn field(self) -> &'static str {
        match self {
            LoraKnob::Alpha => "lora_alpha",
            LoraKnob::Targets => "lora_targets",
        }
    }
}

/// The rules for LoRA's alpha and targets, shared by a run's settings and an adapter's
/// `adapter_config.json`: alpha finite and positive, one or more targets, each one of
/// [`LORA_TARGETS`]. On a refusal, the setting and why.
pub fn check_lora(alpha: f64, targets: &[&str]) -> Result<(), (LoraKnob, String)> {
    if !(alpha.is_finite() && alpha > 0.0) {
        return Err((
            LoraKnob::Alpha,
            format!("is {alpha}; must be finite and positive"),
        ));
    }
    if targets.is_empty() {
        return Err((
            LoraKnob::Targets,
            format!("is empty; name one or more of {}", LORA_TARGETS.join(", ")),
        ));
    }
    if let Some(t) = targets.iter().find(|t| !LORA_TARGETS.contains(t)) {
        return Err((
            LoraKnob::Targets,
            format!(
                "{:?} is not a projection of a Llama-family layer; known: {}",
                crate::text_enum::bounded(t),
                LORA_TARGETS.join(", ")
            ),
        ));
    }
    Ok(())
}

/// The names of the presets.
pub const PRESETS: [&str; 2] = ["reference", "paper"];

impl Default for RunConfig {
    fn default() -> Self {
        Self {
            preset: "paper".into(),
            model: String::new(),
            learning_rate: DEFAULT_LEARNING_RATE,
            batch_size: 64,
            micro_batch_size: 8,
            epochs_per_iteration: 10,
            label_smoothing: DEFAULT_LABEL_SMOOTHING,
            entropy_coef: DEFAULT_ENTROPY_COEF,
            contrastive_coef: DEFAULT_CONTRASTIVE_COEF,
            samples_per_prompt: 4,
            iterations: 31,
            temperature: 1.0,
            top_k: 50,
            top_p: 1.0,
            max_new_tokens: 256,
            max_grad_norm: 0.0,
            weight_decay: 0.0,
            seed: 1,
            replay_buffer: true,
            replay_holdout: 0.1,
            replay_cap_per_prompt: 4,
            dedup_outputs: true,
            eos_after_cut: false,
            eos_after_span: true,
            train_dropout: true,
            max_train_prompts: 0,
            max_test_prompts: 0,
            max_steps_per_iteration: 0,
            lora_rank: 0,
            lora_alpha: 16.0,
            lora_targets: "q_proj,v_proj".into(),
            same_prompt_text: false,
            validation_share: 0.0,
            eval_every: 1,
            prompt_style: PromptStyle::Raw,
            verifier: Verifier::Exact,
        }
    }
}

impl RunConfig {
    /// Whether iteration `k` (0 = the base model) is evaluated under `eval_every`.
    pub fn evaluates(&self, k: u32) -> bool {
        k == 0 || k >= self.iterations || (self.eval_every > 0 && k % self.eval_every == 0)
    }

    /// The prompt evaluation uses: the reference evaluator's, or the sampler's under
    /// `same_prompt_text`.
    pub fn eval_prompt_variant(&self) -> crate::prompt::PromptVariant {
        if self.same_prompt_text {
            crate::prompt::PromptVariant::Sampler
        } else {
            crate::prompt::PromptVariant::Eval
        }
    }

    /// How evaluation results are keyed in the store beside the model version: the prompt
    /// style, with `+sampler_text` when the prompt is the sampler's, `+validation<share>`
    /// when the run evaluates on validation prompts, and `+new<max_new_tokens>`, so that
    /// results of different prompt texts, example sets or answer lengths never stand in
    /// for each other (a version's stored answers are reused by the next run that
    /// evaluates it the same way).
    pub fn eval_style_key(&self) -> String {
        let mut key = self.prompt_style.as_str().to_string();
        if self.same_prompt_text {
            key.push_str("+sampler_text");
        }
        if self.validation_share > 0.0 {
            key.push_str(&format!("+validation{}", self.validation_share));
        }
        key.push_str(&format!("+new{}", self.max_new_tokens));
        key
    }

    /// The knobs of a named preset: `reference` (what `run.sh` runs: 1 sample per prompt,
    /// 31 rounds, no clipping, the replay cap and de-duplication) or `paper` (the same with
    /// the paper's 4 samples per prompt).
    pub fn preset(name: &str) -> Result<Self> {
        match name {
            "paper" => Ok(Self::default()),
            "reference" => Ok(Self {
                preset: "reference".into(),
                samples_per_prompt: 1,
                ..Self::default()
            }),
            other => Err(CoreError::InvalidArgument {
                field: "preset",
                reason: format!(
                    "unknown preset {:?}; known presets: {}",
                    crate::text_enum::bounded(other),
                    PRESETS.join(", ")
                ),
            }),
        }
    }

    /// Checks every knob's range; the error names the field.
    pub fn validate(&self) -> Result<()> {
        let bad =
            |field: &'static str, reason: String| Err(CoreError::InvalidArgument { field, reason });
        if !self.preset.is_empty() && !PRESETS.contains(&self.preset.as_str()) {
            return bad(
                "preset",
                format!(
                    "is {:?}; known presets: {}",
                    crate::text_enum::bounded(&self.preset),
                    PRESETS.join(", ")
                ),
            );
        }
        if !(0.0..1.0).contains(&self.validation_share) {
            return bad(
                "validation_share",
                format!(
                    "is {}; must be in (0, 1), or 0 to evaluate on the test split",
                    self.validation_share
                ),
            );
        }
        if !(0.0..1.0).contains(&self.replay_holdout) {
            return bad(
                "replay_holdout",
                format!("is {}; must be in [0, 1)", self.replay_holdout),
            );
        }
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return bad(
                "learning_rate",
                format!("is {}; must be positive", self.learning_rate),
            );
        }
        for (field, v, max) in [
            ("batch_size", self.batch_size, LIMITS.batch_size),
            ("micro_batch_size", self.micro_batch_size, LIMITS.batch_size),
            (
                "epochs_per_iteration",
                self.epochs_per_iteration,
                LIMITS.epochs_per_iteration,
            ),
            (
                "samples_per_prompt",
                self.samples_per_prompt,
                LIMITS.samples_per_prompt,
            ),
            ("iterations", self.iterations, LIMITS.iterations),
            ("max_new_tokens", self.max_new_tokens, LIMITS.max_new_tokens),
        ] {
            if v == 0 {
                return bad(field, "must be positive".into());
            }
            if v > max {
                return bad(field, format!("is {v}; at most {max}"));
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
        if self.lora_rank > 0 {
            let targets = split_lora_targets(&self.lora_targets);
            if let Err((knob, reason)) = check_lora(self.lora_alpha, &targets) {
                return bad(knob.field(), reason);
            }
        }
        Ok(())
    }

    /// The seed of the tasks' train/test permutation (the reference's numpy seed, a
    /// 32-bit value; a seed beyond it falls back to the reference's 1).
    pub fn split_seed(&self) -> u32 {
        u32::try_from(self.seed).unwrap_or(1)
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
    fn knob_text_is_read_by_type_and_bad_text_names_the_knob() {
        assert_eq!(parse_knob::<f64>("learning_rate", " 2e-5 ").unwrap(), 2e-5);
        assert!(parse_knob::<bool>("dedup_outputs", "true").unwrap());
        let err = parse_knob::<u32>("batch_size", "-3").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("batch_size") && msg.contains("u32"), "{msg}");
        // Every knob, numeric or text, is a field of the configuration; nothing else is.
        let fields = serde_json::to_value(RunConfig::default()).unwrap();
        for name in KNOBS
            .iter()
            .map(|k| k.name)
            .chain(TEXT_KNOBS.iter().copied())
        {
            check_knob_name(name).unwrap();
            assert!(
                fields.get(name).is_some(),
                "{name} is no field of RunConfig"
            );
        }
        assert!(check_knob_name("no_such_knob").is_err());
    }

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
        assert_eq!(
            (c.iterations, c.max_grad_norm),
            (31, 0.0),
            "run.sh: 1 + 30, no clip"
        );
        assert_eq!((c.replay_holdout, c.replay_cap_per_prompt), (0.1, 4));
        assert!(c.dedup_outputs && c.replay_buffer && c.train_dropout && !c.eos_after_cut);
        assert!(
            c.eos_after_span,
            "the reference ends every case (c) span with </s>"
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
            (
                RunConfig {
                    iterations: u32::MAX,
                    ..Default::default()
                },
                "iterations",
            ),
            (
                RunConfig {
                    samples_per_prompt: 1_000_000,
                    ..Default::default()
                },
                "samples_per_prompt",
            ),
            (
                RunConfig {
                    max_new_tokens: 1_000_000_000,
                    ..Default::default()
                },
                "max_new_tokens",
            ),
            (
                RunConfig {
                    batch_size: 1 << 20,
                    micro_batch_size: 1 << 20,
                    ..Default::default()
                },
                "batch_size",
            ),
        ] {
            let err = c.validate().unwrap_err().to_string();
            assert!(err.contains(field), "{err}");
        }
    }

    #[test]
    fn the_limits_are_inclusive_and_echoes_are_bounded() {
        let at_limits = RunConfig {
            iterations: LIMITS.iterations,
            samples_per_prompt: LIMITS.samples_per_prompt,
            max_new_tokens: LIMITS.max_new_tokens,
            epochs_per_iteration: LIMITS.epochs_per_iteration,
            batch_size: LIMITS.batch_size,
            micro_batch_size: 8,
            ..Default::default()
        };
        at_limits.validate().unwrap();
        let huge = "x".repeat(20_000);
        let preset = RunConfig {
            preset: huge.clone(),
            ..Default::default()
        };
        assert!(preset.validate().unwrap_err().to_string().len() < 200);
        assert!(RunConfig::preset(&huge).unwrap_err().to_string().len() < 200);
        assert!(PromptStyle::parse(&huge).unwrap_err().to_string().len() < 200);
    }

    #[test]
    fn presets_differ_only_in_samples_per_prompt() {
        let reference = RunConfig::preset("reference").unwrap();
        let paper = RunConfig::preset("paper").unwrap();
        assert_eq!(
            (reference.samples_per_prompt, paper.samples_per_prompt),
            (1, 4)
        );
        assert_eq!(
            RunConfig {
                preset: "paper".into(),
                samples_per_prompt: 4,
                ..reference.clone()
            },
            paper
        );
        reference.validate().unwrap();
        let err = RunConfig::preset("fast").unwrap_err().to_string();
        assert!(err.contains("preset") && err.contains("reference"), "{err}");
        let bad = RunConfig {
            preset: "fast".into(),
            ..RunConfig::default()
        };
        assert!(bad.validate().unwrap_err().to_string().contains("preset"));
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

    #[test]
    fn the_verifier_is_exact_match_or_extraction_and_unknown_names_are_refused() {
        use super::Verifier;
        assert_eq!(RunConfig::default().verifier, Verifier::Exact);
        assert_eq!(Verifier::parse("exact").unwrap(), Verifier::Exact);
        assert_eq!(Verifier::parse("extracted").unwrap(), Verifier::Extracted);
        let err = Verifier::parse("fuzzy").unwrap_err().to_string();
        assert!(err.contains("verifier"), "{err}");
        // A right number inside a sentence: extraction sees it, exact match does not.
        assert!(!Verifier::Exact.correct("There are 8 objects.", "8", true));
        assert!(Verifier::Extracted.correct("There are 8 objects.", "8", true));
        assert!(Verifier::Exact.correct("8", "8", true));
        assert!(!Verifier::Extracted.correct("9", "8", false));
    }

    #[test]
    fn same_prompt_text_evaluates_on_the_sampler_prompt_under_its_own_key() {
        let mut c = RunConfig::default();
        assert_eq!(c.eval_prompt_variant(), crate::prompt::PromptVariant::Eval);
        assert_eq!(c.eval_style_key(), "raw+new256");
        c.same_prompt_text = true;
        c.prompt_style = PromptStyle::Chat;
        assert_eq!(
            c.eval_prompt_variant(),
            crate::prompt::PromptVariant::Sampler
        );
        assert_eq!(c.eval_style_key(), "chat+sampler_text+new256");
        c.validation_share = 0.25;
        c.max_new_tokens = 16;
        assert_eq!(c.eval_style_key(), "chat+sampler_text+validation0.25+new16");
    }

    #[test]
    fn eval_every_keeps_the_base_and_the_last_iteration() {
        let mut c = RunConfig {
            iterations: 5,
            ..RunConfig::default()
        };
        assert!((0..=5).all(|k| c.evaluates(k)));
        c.eval_every = 0;
        assert_eq!(
            (0..=5).filter(|&k| c.evaluates(k)).collect::<Vec<_>>(),
            [0, 5]
        );
        c.eval_every = 2;
        assert_eq!(
            (0..=5).filter(|&k| c.evaluates(k)).collect::<Vec<_>>(),
            [0, 2, 4, 5]
        );
    }

    #[test]
    fn a_validation_share_outside_its_range_is_refused_by_name() {
        for bad in [-0.1, 1.0, 1.5, f64::NAN] {
            let c = RunConfig {
                validation_share: bad,
                ..RunConfig::default()
            };
            let err = c.validate().unwrap_err().to_string();
            assert!(err.contains("validation_share"), "{bad}: {err}");
        }
        for good in [0.0, 0.2, 0.99] {
            let c = RunConfig {
                validation_share: good,
                ..RunConfig::default()
            };
            c.validate().unwrap();
        }
    }
}
