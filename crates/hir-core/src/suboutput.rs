//! Sub-output relabeling: the reference's `DynamicLengthSampler` and the three cases it
//! leads to (HIR.md §1.5).
//!
//! For an output of `L` tokens (its end-of-sequence token included) a span `start..end` is
//! drawn: `start` uniformly from the even numbers in `0..=L-4`, `end` uniformly from
//! `start+1, start+3, …` up to `L`. The tokens before `start` join the prompt, the span
//! becomes the labels, and the instruction pair may swap when the output's prefix already
//! agrees with the gold answer. Tokenising is the model's job; this module decides.

use crate::rng::SplitMix64;
use crate::score::normalize;

/// A span of output tokens: `labels[start..end]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Span {
    /// First label token.
    pub start: usize,
    /// One past the last label token.
    pub end: usize,
}

/// Draws a span for an output of `len` tokens; outputs of 3 tokens or fewer are kept whole.
pub fn sample_span(len: usize, rng: &mut SplitMix64) -> Span {
    if len <= 3 {
        return Span { start: 0, end: len };
    }
    let starts = (len - 4) / 2 + 1; // 0, 2, …, ≤ len-4
    let start = 2 * rng.below(starts as u64) as usize;
    let ends = (len - start - 1) / 2 + 1; // start+1, start+3, …, ≤ len
    let end = start + 1 + 2 * rng.below(ends as u64) as usize;
    Span { start, end }
}

/// Which of the reference's three cases a drawn span falls into.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SubOutputCase {
    /// (a) Truncated, and the output up to `end` equals the gold answer.
    PrefixIsAnswer,
    /// (b) Truncated, and the output up to `end` is part of the gold answer.
    PrefixInAnswer,
    /// (c) Anything else, including no truncation.
    Other,
}

/// How to build one training example from a span.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct SubOutputPlan {
    /// The label span.
    pub span: Span,
    /// The case it falls into.
    pub case: SubOutputCase,
    /// Swap the positive and negative instructions: a wrong sample whose prefix agrees with
    /// the gold answer is trained under the "correct" instruction.
    pub swap_instructions: bool,
    /// Labels are re-tokenised from their decoded text and end with end-of-sequence; when
    /// false (case b) the raw span tokens are used with no end-of-sequence.
    pub retokenize_with_eos: bool,
}

/// Decides how to train on `span` of an output of `len` tokens. `prefix_text` is the
/// decoded output up to `span.end` (special tokens skipped), `gold` the gold answer, and
/// `correct` whether the whole output was correct.
pub fn plan(span: Span, len: usize, prefix_text: &str, gold: &str, correct: bool) -> SubOutputPlan {
    let truncated = span.end < len;
    let prefix = normalize(prefix_text);
    let target = normalize(&gold.replace('\n', " "));
    let case = if truncated && prefix == target {
        SubOutputCase::PrefixIsAnswer
    } else if truncated && target.contains(&prefix) {
        SubOutputCase::PrefixInAnswer
    } else {
        SubOutputCase::Other
    };
    SubOutputPlan {
        span,
        case,
        swap_instructions: case != SubOutputCase::Other && !correct,
        retokenize_with_eos: case != SubOutputCase::PrefixInAnswer,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn short_outputs_are_not_truncated() {
        let mut rng = SplitMix64::new(1);
        for len in 0..=3 {
            assert_eq!(sample_span(len, &mut rng), Span { start: 0, end: len });
        }
    }

    #[test]
    fn spans_cover_exactly_the_reference_support() {
        for len in 4..=9usize {
            let mut rng = SplitMix64::new(len as u64);
            let seen: BTreeSet<(usize, usize)> = (0..4000)
                .map(|_| sample_span(len, &mut rng))
                .map(|s| (s.start, s.end))
                .collect();
            let mut expected = BTreeSet::new();
            for start in (0..=len - 4).step_by(2) {
                for end in (start + 1..=len).step_by(2) {
                    expected.insert((start, end));
                }
            }
            assert_eq!(seen, expected, "len {len}");
            if len % 2 == 0 {
                assert!(
                    seen.iter().all(|&(_, end)| end < len),
                    "even lengths always truncate"
                );
            }
        }
    }

    #[test]
    fn same_seed_same_spans() {
        let a: Vec<Span> = {
            let mut r = SplitMix64::new(9);
            (0..50).map(|_| sample_span(17, &mut r)).collect()
        };
        let b: Vec<Span> = {
            let mut r = SplitMix64::new(9);
            (0..50).map(|_| sample_span(17, &mut r)).collect()
        };
        assert_eq!(a, b);
    }

    #[test]
    fn the_worked_example_of_the_reference() {
        // Wrong sample "(A)" for gold "(C)", four tokens with </s>.
        let at1 = plan(Span { start: 0, end: 1 }, 4, "(", "(C)", false);
        assert_eq!(at1.case, SubOutputCase::PrefixInAnswer);
        assert!(at1.swap_instructions && !at1.retokenize_with_eos);
        let at3 = plan(Span { start: 0, end: 3 }, 4, "(A)", "(C)", false);
        assert_eq!(at3.case, SubOutputCase::Other);
        assert!(!at3.swap_instructions && at3.retokenize_with_eos);
    }

    #[test]
    fn a_prefix_equal_to_the_answer_swaps_a_wrong_sample_only() {
        let wrong = plan(Span { start: 0, end: 3 }, 6, "(C)", "(C)", false);
        assert_eq!(wrong.case, SubOutputCase::PrefixIsAnswer);
        assert!(wrong.swap_instructions && wrong.retokenize_with_eos);
        let right = plan(Span { start: 0, end: 3 }, 6, "(C)", "(C)", true);
        assert!(!right.swap_instructions);
        let whole = plan(Span { start: 0, end: 4 }, 4, "(C)", "(C)", true);
        assert_eq!(
            whole.case,
            SubOutputCase::Other,
            "an untruncated output is case (c)"
        );
    }
}
