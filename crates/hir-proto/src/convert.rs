//! The one place where wire types and domain types meet: statuses, finish reasons,
//! timestamps, model versions and a run's configuration. Services call these on the way in
//! and out and keep domain types everywhere else.

use hir_core::run::RunConfig;
use hir_core::status::{FinishReason, IterationStatus, RunStatus};

use crate::pb;

impl From<RunStatus> for pb::RunStatus {
    fn from(s: RunStatus) -> Self {
        match s {
            RunStatus::Pending => pb::RunStatus::Pending,
            RunStatus::Running => pb::RunStatus::Running,
            RunStatus::Stopped => pb::RunStatus::Stopped,
            RunStatus::Done => pb::RunStatus::Done,
            RunStatus::Failed => pb::RunStatus::Failed,
        }
    }
}

impl From<IterationStatus> for pb::IterationStatus {
    fn from(s: IterationStatus) -> Self {
        match s {
            IterationStatus::Pending => pb::IterationStatus::Pending,
            IterationStatus::Sampling => pb::IterationStatus::Sampling,
            IterationStatus::Sampled => pb::IterationStatus::Sampled,
            IterationStatus::Training => pb::IterationStatus::Training,
            IterationStatus::Trained => pb::IterationStatus::Trained,
            IterationStatus::Evaluating => pb::IterationStatus::Evaluating,
            IterationStatus::Done => pb::IterationStatus::Done,
            IterationStatus::Failed => pb::IterationStatus::Failed,
        }
    }
}

/// The domain status of a wire run status (`None` for `UNSPECIFIED` or an unknown number).
pub fn run_status(code: i32) -> Option<RunStatus> {
    Some(match pb::RunStatus::try_from(code).ok()? {
        pb::RunStatus::Unspecified => return None,
        pb::RunStatus::Pending => RunStatus::Pending,
        pb::RunStatus::Running => RunStatus::Running,
        pb::RunStatus::Stopped => RunStatus::Stopped,
        pb::RunStatus::Done => RunStatus::Done,
        pb::RunStatus::Failed => RunStatus::Failed,
    })
}

/// The domain status of a wire iteration status (`None` for `UNSPECIFIED` or an unknown
/// number).
pub fn iteration_status(code: i32) -> Option<IterationStatus> {
    Some(match pb::IterationStatus::try_from(code).ok()? {
        pb::IterationStatus::Unspecified => return None,
        pb::IterationStatus::Pending => IterationStatus::Pending,
        pb::IterationStatus::Sampling => IterationStatus::Sampling,
        pb::IterationStatus::Sampled => IterationStatus::Sampled,
        pb::IterationStatus::Training => IterationStatus::Training,
        pb::IterationStatus::Trained => IterationStatus::Trained,
        pb::IterationStatus::Evaluating => IterationStatus::Evaluating,
        pb::IterationStatus::Done => IterationStatus::Done,
        pb::IterationStatus::Failed => IterationStatus::Failed,
    })
}

impl From<FinishReason> for pb::FinishReason {
    fn from(r: FinishReason) -> Self {
        match r {
            FinishReason::Eos => pb::FinishReason::Eos,
            FinishReason::Stop => pb::FinishReason::Stop,
            FinishReason::Length => pb::FinishReason::Length,
            FinishReason::Unspecified => pb::FinishReason::Unspecified,
        }
    }
}

/// The domain reason of a wire finish reason (an unknown number is unspecified).
pub fn finish_reason(code: i32) -> FinishReason {
    match pb::FinishReason::try_from(code) {
        Ok(pb::FinishReason::Eos) => FinishReason::Eos,
        Ok(pb::FinishReason::Stop) => FinishReason::Stop,
        Ok(pb::FinishReason::Length) => FinishReason::Length,
        _ => FinishReason::Unspecified,
    }
}

/// A wire timestamp.
pub fn timestamp(t: chrono::DateTime<chrono::Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}

/// The wire timestamp of now.
pub fn now() -> prost_types::Timestamp {
    timestamp(chrono::Utc::now())
}

/// Applies the knobs set in `h` over the preset it names (`paper` when none), for `model`.
/// Values are not range-checked here: [`RunConfig::validate`] does that, naming the field.
pub fn run_config(
    model: &str,
    h: Option<&pb::Hyperparameters>,
) -> Result<RunConfig, hir_core::CoreError> {
    let preset = h.and_then(|h| h.preset.as_deref()).unwrap_or("paper");
    let mut c = RunConfig {
        model: model.to_string(),
        ..RunConfig::preset(preset)?
    };
    let Some(h) = h else { return Ok(c) };
    if let Some(style) = &h.prompt_style {
        c.prompt_style = hir_core::run::PromptStyle::parse(style)?;
    }
    if let Some(verifier) = &h.verifier {
        c.verifier = hir_core::run::Verifier::parse(verifier)?;
    }
    if h.lora_rank == Some(0) {
        return Err(hir_core::CoreError::InvalidArgument {
            field: "lora_rank",
            reason: "must be at least 1; leave it unset to train every weight".into(),
        });
    }
    if let Some(targets) = &h.lora_targets {
        c.lora_targets = targets.clone();
    }
    macro_rules! set {
        ($($(#[doc = $d:literal])* $f:ident : $t:ty = $flag:literal,)*) => {
            $( if let Some(v) = h.$f { c.$f = v; } )*
        };
    }
    hir_core::for_each_knob!(set);
    Ok(c)
}

/// Every knob of `c`, as used: what `GetRun` reports and what [`run_config`] reads back to
/// the same configuration.
pub fn hyperparameters(c: &RunConfig) -> pb::Hyperparameters {
    let mut h = pb::Hyperparameters {
        prompt_style: Some(c.prompt_style.as_str().to_string()),
        verifier: Some(c.verifier.as_str().to_string()),
        preset: Some(c.preset.clone()),
        ..Default::default()
    };
    macro_rules! get {
        ($($(#[doc = $d:literal])* $f:ident : $t:ty = $flag:literal,)*) => {
            $( h.$f = Some(c.$f); )*
        };
    }
    hir_core::for_each_knob!(get);
    if c.lora_rank == 0 {
        // Every weight is trained: the adapter's knobs are not used.
        (h.lora_rank, h.lora_alpha) = (None, None);
    } else {
        h.lora_targets = Some(c.lora_targets.clone());
    }
    h
}

/// Sets the knob `name` (a field of [`RunConfig`]) of `h` from its text, as a command line
/// gives it, read by [`hir_core::run::parse_knob`]; the error names the knob and the value's
/// expected type.
pub fn set_hyperparameter(
    h: &mut pb::Hyperparameters,
    name: &str,
    value: &str,
) -> Result<(), hir_core::CoreError> {
    hir_core::run::check_knob_name(name)?;
    macro_rules! parse {
        ($($(#[doc = $d:literal])* $f:ident : $t:ty = $flag:literal,)*) => {
            match name {
                $( stringify!($f) => {
                    h.$f = Some(hir_core::run::parse_knob::<$t>(stringify!($f), value)?);
                } )*
                "prompt_style" => h.prompt_style = Some(value.to_owned()),
                "verifier" => h.verifier = Some(value.to_owned()),
                "preset" => h.preset = Some(value.to_owned()),
                "lora_targets" => h.lora_targets = Some(value.to_owned()),
                _ => {}
            }
        };
    }
    hir_core::for_each_knob!(parse);
    Ok(())
}

/// One task's accuracy on the wire.
pub fn task_accuracy(t: &hir_core::eval::TaskEval) -> pb::TaskAccuracy {
    pb::TaskAccuracy {
        task: t.task.clone(),
        examples: t.examples,
        exact: t.exact,
        extracted: t.extracted,
        predicted_counts: t.predicted.clone().into_iter().collect(),
        // Item by item from the store, in the run's view (GetRun).
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_status_round_trips_through_the_wire() {
        for s in IterationStatus::ALL {
            assert_eq!(
                iteration_status(pb::IterationStatus::from(*s) as i32),
                Some(*s)
            );
        }
        assert_eq!(iteration_status(0), None);
        for s in RunStatus::ALL {
            assert_eq!(run_status(pb::RunStatus::from(*s) as i32), Some(*s));
        }
        for r in FinishReason::ALL {
            assert_eq!(finish_reason(pb::FinishReason::from(*r) as i32), *r);
        }
    }

    #[test]
    fn a_configuration_round_trips_through_hyperparameters() {
        let mut c = RunConfig::preset("reference").unwrap();
        c.model = "m".into();
        c.learning_rate = 1e-5;
        c.eos_after_cut = true;
        c.prompt_style = hir_core::run::PromptStyle::Chat;
        c.verifier = hir_core::run::Verifier::Extracted;
        c.same_prompt_text = true;
        assert_eq!(run_config("m", Some(&hyperparameters(&c))).unwrap(), c);
        c.lora_rank = 8;
        c.lora_alpha = 32.0;
        c.lora_targets = "q_proj,k_proj,v_proj,o_proj".into();
        assert_eq!(run_config("m", Some(&hyperparameters(&c))).unwrap(), c);
    }

    #[test]
    fn lora_is_off_unless_a_rank_is_given_and_a_zero_rank_is_refused() {
        let full = hyperparameters(&RunConfig::default());
        assert_eq!(
            (full.lora_rank, full.lora_alpha, full.lora_targets),
            (None, None, None)
        );
        let h = pb::Hyperparameters {
            lora_rank: Some(0),
            ..Default::default()
        };
        let err = run_config("m", Some(&h)).unwrap_err();
        assert!(
            matches!(
                err,
                hir_core::CoreError::InvalidArgument {
                    field: "lora_rank",
                    ..
                }
            ),
            "{err}"
        );
        let h = pb::Hyperparameters {
            lora_rank: Some(4),
            lora_targets: Some("q_proj,w_proj".into()),
            ..Default::default()
        };
        let err = run_config("m", Some(&h)).unwrap().validate().unwrap_err();
        assert!(
            matches!(
                err,
                hir_core::CoreError::InvalidArgument {
                    field: "lora_targets",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn every_knob_is_a_field_of_the_wire_message_and_back() {
        use prost::Message;
        let set = prost_types::FileDescriptorSet::decode(crate::FILE_DESCRIPTOR_SET).unwrap();
        let message = set
            .file
            .iter()
            .flat_map(|f| &f.message_type)
            .find(|m| m.name() == "Hyperparameters")
            .expect("Hyperparameters is in the descriptor set");
        let mut wire: Vec<&str> = message.field.iter().map(|f| f.name()).collect();
        let mut ours: Vec<&str> = hir_core::run::KNOBS.iter().map(|k| k.name).collect();
        ours.extend(["prompt_style", "verifier", "preset", "lora_targets"]);
        wire.sort_unstable();
        ours.sort_unstable();
        assert_eq!(wire, ours);
    }

    #[test]
    fn a_knob_set_from_text_reads_back_and_bad_text_names_the_knob() {
        let mut h = pb::Hyperparameters::default();
        set_hyperparameter(&mut h, "learning_rate", "2e-5").unwrap();
        set_hyperparameter(&mut h, "dedup_outputs", "false").unwrap();
        assert_eq!(
            (h.learning_rate, h.dedup_outputs),
            (Some(2e-5), Some(false))
        );
        let err = set_hyperparameter(&mut h, "batch_size", "-3").unwrap_err();
        assert!(err.to_string().contains("batch_size"), "{err}");
        assert!(set_hyperparameter(&mut h, "no_such_knob", "1").is_err());
    }
}
