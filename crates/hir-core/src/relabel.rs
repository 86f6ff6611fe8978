//! Hindsight relabel policies: given what the model produced and how it scored, which
//! instruction did the output follow (positive), and which did it not (negative)?
//!
//! * [`BinaryPolicy`] (`hir`): the paper's policy with the reference's exact strings (HIR.md
//!   §1.4), configurable per task.
//! * [`AnswerPolicy`] (`hindsight_answer`): a wrong output is relabeled to the instruction it
//!   did satisfy: "Solve the question with answer (B)." for a multiple-choice pick, or
//!   "Solve the question with answer <what it gave>." for a generative one.
//! * [`FilterPolicy`] (`farl`): no relabeling; only correct samples are kept under the
//!   original instruction, the FARL-like baseline of the paper.
//! * [`SftPolicy`] (`sft`): the supervised ceiling. The relabeler does not sample for it:
//!   each training prompt's gold answer is written as its one sample, kept under the
//!   original instruction and trained with the same loss and optimizer as the rest.

use crate::error::{CoreError, Result};
use crate::prompt::DEFAULT_INSTRUCTION;
use crate::task::TaskKind;

/// What a policy sees of one scored sample.
#[derive(Debug, Clone, Copy)]
pub struct Outcome<'a> {
    /// The task kind of the example.
    pub kind: TaskKind,
    /// Whether the output counts as correct (the reference decides with
    /// [`crate::score::relabel_match`]).
    pub correct: bool,
    /// The output as generated.
    pub output: &'a str,
    /// The answer read from the output by [`crate::score::score`], if any.
    pub predicted: Option<&'a str>,
}

/// The instruction pair a sample is trained under.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Relabel {
    /// The instruction the output satisfies: trained towards.
    pub positive: String,
    /// The instruction it does not satisfy: the contrastive alternative.
    pub negative: String,
}

impl Relabel {
    /// A pair from two strings.
    pub fn new(positive: impl Into<String>, negative: impl Into<String>) -> Self {
        Self {
            positive: positive.into(),
            negative: negative.into(),
        }
    }

    /// The pair with its sides swapped.
    pub fn swapped(self) -> Self {
        Self {
            positive: self.negative,
            negative: self.positive,
        }
    }
}

/// A hindsight relabel policy. Policies are pure: the same outcome gives the same pair.
pub trait RelabelPolicy: Send + Sync + std::fmt::Debug {
    /// The name recorded on every relabel row (`hir`, `hindsight_answer`, `farl`).
    fn name(&self) -> &'static str;
    /// The instruction pair for one sample, or `None` if the sample is not trained on.
    fn relabel(&self, outcome: &Outcome<'_>) -> Option<Relabel>;
}

/// The names of the built-in policies.
pub const POLICY_NAMES: [&str; 4] = [
    BinaryPolicy::NAME,
    AnswerPolicy::NAME,
    FilterPolicy::NAME,
    SftPolicy::NAME,
];

/// A built-in policy by name, with the reference's strings.
pub fn policy_by_name(name: &str) -> Result<Box<dyn RelabelPolicy>> {
    policy_for(name, false)
}

/// A built-in policy by name for a run: with `same_prompt_text` (a departure, see
/// [`crate::run::RunConfig`]) a correct output is relabeled to the instruction evaluation
/// asks under, [`DEFAULT_INSTRUCTION`], instead of the reference's "Solve question with
/// correct answer.".
pub fn policy_for(name: &str, same_prompt_text: bool) -> Result<Box<dyn RelabelPolicy>> {
    let mut binary = BinaryPolicy::default();
    if same_prompt_text {
        binary.when_correct.positive = DEFAULT_INSTRUCTION.to_string();
    }
    match name {
        BinaryPolicy::NAME => Ok(Box::new(binary)),
        AnswerPolicy::NAME => Ok(Box::new(AnswerPolicy { binary })),
        FilterPolicy::NAME => Ok(Box::new(FilterPolicy::default())),
        SftPolicy::NAME => Ok(Box::new(SftPolicy::default())),
        other => Err(CoreError::InvalidArgument {
            field: "policy",
            reason: format!(
                "unknown relabel policy `{}`; known policies: {}",
                crate::text_enum::bounded(other),
                POLICY_NAMES.join(", ")
            ),
        }),
    }
}

/// The paper's binary policy. The defaults are the reference's strings, typo included: the
/// positive instruction of a correct sample reads "Solve question with correct answer."
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BinaryPolicy {
    /// The pair for a correct output.
    pub when_correct: Relabel,
    /// The pair for a wrong output.
    pub when_wrong: Relabel,
}

impl BinaryPolicy {
    /// The policy's recorded name.
    pub const NAME: &'static str = "hir";
}

impl Default for BinaryPolicy {
    fn default() -> Self {
        Self {
            when_correct: Relabel::new(
                "Solve question with correct answer.",
                "Solve the question with wrong answer.",
            ),
            when_wrong: Relabel::new(
                "Solve the question with wrong answer.",
                "Solve the question with correct answer.",
            ),
        }
    }
}

impl RelabelPolicy for BinaryPolicy {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn relabel(&self, outcome: &Outcome<'_>) -> Option<Relabel> {
        Some(if outcome.correct {
            self.when_correct.clone()
        } else {
            self.when_wrong.clone()
        })
    }
}

/// Relabels a wrong output to the instruction it satisfied; correct outputs as the paper does.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AnswerPolicy {
    binary: BinaryPolicy,
}

impl AnswerPolicy {
    /// The policy's recorded name.
    pub const NAME: &'static str = "hindsight_answer";
    /// Longest generative answer quoted into an instruction, in characters.
    pub const MAX_QUOTED: usize = 200;
}

impl RelabelPolicy for AnswerPolicy {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn relabel(&self, outcome: &Outcome<'_>) -> Option<Relabel> {
        if outcome.correct {
            return self.binary.relabel(outcome);
        }
        let given = match (outcome.kind, outcome.predicted) {
            (TaskKind::MultipleChoice, Some(label)) => label.to_string(),
            (TaskKind::MultipleChoice, None) => return self.binary.relabel(outcome),
            (TaskKind::Generative, _) => {
                let line = outcome
                    .output
                    .lines()
                    .map(str::trim)
                    .find(|l| !l.is_empty())
                    .unwrap_or("");
                if line.is_empty() {
                    return self.binary.relabel(outcome);
                }
                let quoted: String = line.chars().take(Self::MAX_QUOTED).collect();
                quoted.trim_end_matches('.').to_string()
            }
        };
        Some(Relabel::new(
            format!("Solve the question with answer {given}."),
            DEFAULT_INSTRUCTION,
        ))
    }
}

/// The FARL-like baseline: keep correct samples under the original instruction, drop the rest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilterPolicy {
    /// The instruction correct samples are trained under.
    pub instruction: String,
}

impl FilterPolicy {
    /// The policy's recorded name.
    pub const NAME: &'static str = "farl";
}

impl Default for FilterPolicy {
    fn default() -> Self {
        Self {
            instruction: DEFAULT_INSTRUCTION.to_string(),
        }
    }
}

impl RelabelPolicy for FilterPolicy {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn relabel(&self, outcome: &Outcome<'_>) -> Option<Relabel> {
        // No contrastive alternative: the negative side repeats the instruction.
        outcome
            .correct
            .then(|| Relabel::new(self.instruction.clone(), self.instruction.clone()))
    }
}

/// The supervised ceiling: the gold answers trained under the original instruction. Its
/// samples are the gold answers themselves (the relabeler writes them instead of sampling),
/// so every one is correct; like `farl`, the negative side repeats the instruction.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SftPolicy {
    filter: FilterPolicy,
}

impl SftPolicy {
    /// The policy's recorded name.
    pub const NAME: &'static str = "sft";
}

impl RelabelPolicy for SftPolicy {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn relabel(&self, outcome: &Outcome<'_>) -> Option<Relabel> {
        self.filter.relabel(outcome)
    }
}

/// Whether `policy` trains on the gold answers instead of samples (no generation).
pub fn trains_on_gold(policy: &str) -> bool {
    policy == SftPolicy::NAME
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome<'a>(
        kind: TaskKind,
        correct: bool,
        output: &'a str,
        predicted: Option<&'a str>,
    ) -> Outcome<'a> {
        Outcome {
            kind,
            correct,
            output,
            predicted,
        }
    }

    #[test]
    fn binary_policy_uses_the_reference_strings() {
        let p = policy_by_name("hir").unwrap();
        let right = p
            .relabel(&outcome(TaskKind::MultipleChoice, true, "(C)", Some("(C)")))
            .unwrap();
        assert_eq!(right.positive, "Solve question with correct answer.");
        assert_eq!(right.negative, "Solve the question with wrong answer.");
        let wrong = p
            .relabel(&outcome(
                TaskKind::MultipleChoice,
                false,
                "(A)",
                Some("(A)"),
            ))
            .unwrap();
        assert_eq!(wrong.positive, "Solve the question with wrong answer.");
        assert_eq!(wrong.negative, "Solve the question with correct answer.");
    }

    #[test]
    fn same_prompt_text_relabels_correct_outputs_to_the_evaluation_instruction() {
        let right = outcome(TaskKind::Generative, true, "8", Some("8"));
        let wrong = outcome(TaskKind::Generative, false, "9", Some("9"));
        for name in ["hir", "hindsight_answer"] {
            let p = policy_for(name, true).unwrap();
            let r = p.relabel(&right).unwrap();
            assert_eq!(r.positive, DEFAULT_INSTRUCTION, "{name}");
            assert_eq!(
                r.negative, "Solve the question with wrong answer.",
                "{name}"
            );
            // The reference's typo stays the default.
            let r = policy_for(name, false).unwrap().relabel(&right).unwrap();
            assert_eq!(r.positive, "Solve question with correct answer.", "{name}");
        }
        let w = policy_for("hir", true).unwrap().relabel(&wrong).unwrap();
        assert_eq!(w, BinaryPolicy::default().when_wrong);
    }

    #[test]
    fn sft_keeps_its_gold_samples_under_the_original_instruction() {
        let p = policy_by_name("sft").unwrap();
        assert_eq!(p.name(), "sft");
        let gold = p
            .relabel(&outcome(TaskKind::Generative, true, "8", Some("8")))
            .unwrap();
        assert_eq!(gold, Relabel::new(DEFAULT_INSTRUCTION, DEFAULT_INSTRUCTION));
        assert!(p
            .relabel(&outcome(TaskKind::Generative, false, "9", Some("9")))
            .is_none());
        assert!(trains_on_gold("sft") && !trains_on_gold("farl") && !trains_on_gold("hir"));
    }

    #[test]
    fn answer_policy_names_what_was_given() {
        let p = policy_by_name("hindsight_answer").unwrap();
        let mc = p
            .relabel(&outcome(
                TaskKind::MultipleChoice,
                false,
                "(B) x",
                Some("(B)"),
            ))
            .unwrap();
        assert_eq!(mc.positive, "Solve the question with answer (B).");
        assert_eq!(mc.negative, DEFAULT_INSTRUCTION);
        let gen = p
            .relabel(&outcome(
                TaskKind::Generative,
                false,
                "\n apple pear.\nmore",
                None,
            ))
            .unwrap();
        assert_eq!(gen.positive, "Solve the question with answer apple pear.");
        let unreadable = p
            .relabel(&outcome(TaskKind::MultipleChoice, false, "??", None))
            .unwrap();
        assert_eq!(unreadable, BinaryPolicy::default().when_wrong);
        let right = p
            .relabel(&outcome(TaskKind::Generative, true, "3", Some("3")))
            .unwrap();
        assert_eq!(right, BinaryPolicy::default().when_correct);
    }

    #[test]
    fn filter_policy_keeps_only_correct_samples() {
        let p = policy_by_name("farl").unwrap();
        assert!(p
            .relabel(&outcome(TaskKind::Generative, false, "x", None))
            .is_none());
        let kept = p
            .relabel(&outcome(TaskKind::Generative, true, "x", None))
            .unwrap();
        assert_eq!(kept.positive, DEFAULT_INSTRUCTION);
    }

    #[test]
    fn unknown_policy_lists_the_known_ones() {
        let err = policy_by_name("ppo").unwrap_err().to_string();
        assert!(
            err.contains("policy") && err.contains("hir, hindsight_answer, farl, sft"),
            "{err}"
        );
    }
}
