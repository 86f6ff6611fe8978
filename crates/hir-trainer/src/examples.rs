//! Building HIR training examples from relabeled samples, with sub-output relabeling
//! exactly as the reference (HIR.md §1.5), adapted to a decoder-only model (§7): what the
//! reference feeds the encoder (instruction, query, output prefix) is the prompt part of
//! one sequence, and only the label span carries loss.
//!
//! For a sample whose output text is `text`:
//! 1. `o` = the tokens of `text` tokenized again, plus end-of-sequence, as the reference's
//!    tokenizer builds its labels (so `L = |o|` counts re-tokenized tokens, not the
//!    generated ids). An output cut by `max_new_tokens` gets no end-of-sequence unless
//!    [`BuildOptions::eos_after_cut`]: it did not end there;
//! 2. draw a span `start..end` of `o` ([`hir_core::suboutput::sample_span`]);
//! 3. decide its case from the decoded prefix `o[..end]` and the gold answer as the
//!    tokenizer gives it back (`decode(encode(gold))`) ([`hir_core::suboutput::plan`]),
//!    swapping the instructions when a wrong sample's prefix agrees with the gold answer.
//!    "Wrong" is the verifier's verdict (`relabel_match`), the one the instruction pair came
//!    from;
//! 4. prompt = instruction + the sample's query + `o[..start]`; labels = `o[start..end]`,
//!    re-tokenized from its text and ended with end-of-sequence except in case (b) (and
//!    except at the end of a cut output).
//!
//! The negative sequence has the same labels under the other instruction. For T5 the
//! prompt is the encoder input, as in the reference, and ends with end-of-sequence.

use hir_core::rng::SplitMix64;
use hir_core::suboutput::{plan, sample_span, SubOutputCase};
use hir_model::train::Example;

use crate::error::{Result, TrainerError};

/// Tokenization the examples need (implemented by the loaded model).
pub trait Codec {
    /// Token ids of `text`, adding no special tokens.
    fn encode(&self, text: &str) -> Result<Vec<u32>>;
    /// Text of `ids`, special tokens skipped.
    fn decode(&self, ids: &[u32]) -> Result<String>;
    /// The end-of-sequence id appended to labels.
    fn eos(&self) -> u32;
    /// Whether `id` ends a sequence (a model may have several such ids).
    fn is_eos(&self, id: u32) -> bool {
        id == self.eos()
    }
    /// `text` as one user turn of the model's chat template.
    fn chat(&self, text: &str) -> String {
        text.to_string()
    }
    /// Whether the prompt is an encoder input (T5), which ends with end-of-sequence.
    fn encoder_decoder(&self) -> bool {
        false
    }
}

impl Codec for hir_model::LoadedModel {
    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(hir_model::LoadedModel::encode(self, text)?)
    }
    fn decode(&self, ids: &[u32]) -> Result<String> {
        Ok(hir_model::LoadedModel::decode(self, ids)?)
    }
    fn eos(&self) -> u32 {
        self.eos_token_ids()
            .first()
            .copied()
            .unwrap_or(self.pad_token_id())
    }
    fn is_eos(&self, id: u32) -> bool {
        self.eos_token_ids().contains(&id)
    }
    fn chat(&self, text: &str) -> String {
        self.chat_prompt(text)
    }
    fn encoder_decoder(&self) -> bool {
        self.model().is_encoder_decoder()
    }
}

/// A relabeled sample, as the store holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct RelabeledSample {
    /// The sample's id in the store.
    pub sample_id: i64,
    /// Seeds the sample's span (with the batch); from the sample's natural key, so the
    /// same work in another database draws the same spans.
    pub seed_key: u64,
    /// The prompt it was sampled from: instruction, blank line, query.
    pub prompt: String,
    /// Its output tokens as generated; empty for a sample that was written, not generated
    /// (a gold answer under `sft`), whose `output` text is tokenized instead.
    pub output_tokens: Vec<u32>,
    /// Its output text.
    pub output: String,
    /// Whether generation stopped at `max_new_tokens` rather than ending on its own.
    pub cut: bool,
    /// Whether the output was correct by the run's verifier, the one the relabel came from
    /// ([`hir_core::run::Verifier`]).
    pub correct: bool,
    /// The gold answer.
    pub gold: String,
    /// The instruction it is trained under.
    pub positive: String,
    /// The instruction it is contrasted against.
    pub negative: String,
}

/// One training pair: the same labels under the positive and the negative instruction.
#[derive(Debug, Clone, PartialEq)]
pub struct HirExample {
    /// Under the positive instruction.
    pub positive: Example,
    /// Under the negative instruction.
    pub negative: Example,
    /// The sub-output case the span fell into.
    pub case: SubOutputCase,
}

impl HirExample {
    /// Tokens of both sequences.
    pub fn tokens(&self) -> usize {
        self.positive.prompt.len()
            + self.positive.completion.len()
            + self.negative.prompt.len()
            + self.negative.completion.len()
    }
}

/// The seed key of a sample: its (iteration, task, example, sample index).
pub fn seed_key(iteration: i32, task_id: i64, example_idx: i32, sample_idx: i32) -> u64 {
    let mut rng = SplitMix64::new((iteration as u64) << 48 ^ (task_id as u64) << 32);
    rng.next_u64() ^ ((example_idx as u64) << 16 | sample_idx as u64)
}

/// The seed of one sample's span in one batch (given by its iteration and index): a
/// batch trained again after a crash draws the same spans.
pub fn span_seed(run_seed: u64, iteration: i32, batch_idx: i32, seed_key: u64) -> u64 {
    SplitMix64::new(
        run_seed ^ ((iteration as u64) << 40 | batch_idx as u64).rotate_left(7) ^ seed_key,
    )
    .next_u64()
}

/// How [`build`] turns samples into examples; the default is the reference's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BuildOptions {
    /// Wrap the relabeled prompt in the model's chat template, as the generator wrapped it
    /// when sampling.
    pub chat: bool,
    /// End a cut output with end-of-sequence anyway (the reference's T5 tokenizer does).
    pub eos_after_cut: bool,
    /// End a case (c) span that stops inside the output with end-of-sequence, as the
    /// reference does.
    pub eos_after_span: bool,
}

impl Default for BuildOptions {
    fn default() -> Self {
        Self {
            chat: false,
            eos_after_cut: false,
            eos_after_span: true,
        }
    }
}

/// Builds the training pair of one sample; see the module docs.
pub fn build(
    sample: &RelabeledSample,
    codec: &dyn Codec,
    opts: BuildOptions,
    rng: &mut SplitMix64,
) -> Result<HirExample> {
    let eos = codec.eos();
    let generated: Vec<u32> = sample
        .output_tokens
        .iter()
        .copied()
        .filter(|&t| !codec.is_eos(t))
        .collect();
    let text = if sample.output_tokens.is_empty() {
        sample.output.clone()
    } else {
        codec.decode(&generated)?
    };
    let mut out = codec.encode(&text)?;
    let ends = !sample.cut || opts.eos_after_cut;
    if ends {
        out.push(eos);
    }
    let span = sample_span(out.len(), rng);
    let prefix_text = codec.decode(&out[..span.end])?;
    let gold = codec.decode(&codec.encode(&sample.gold)?)?;
    let p = plan(span, out.len(), &prefix_text, &gold, sample.correct);
    let (pos_instr, neg_instr) = if p.swap_instructions {
        (&sample.negative, &sample.positive)
    } else {
        (&sample.positive, &sample.negative)
    };
    let Some(split) = sample.prompt.find("\n\n") else {
        return Err(TrainerError::FailedPrecondition(format!(
            "sample {}: its prompt has no blank line after the instruction, so the \
             instruction cannot be relabeled",
            sample.sample_id
        )));
    };
    let body = &sample.prompt[split..];
    let labels = if p.retokenize_with_eos {
        let mut l = codec.encode(&codec.decode(&out[span.start..span.end])?)?;
        // The tail of a cut output did not end there: no end-of-sequence after it. A span
        // that stops inside the output ends with one unless the knob says otherwise
        // (case a always: the answer ends there).
        let inside = span.end < out.len();
        let inside_eos = p.case == SubOutputCase::PrefixIsAnswer || opts.eos_after_span;
        if (ends && !inside) || (inside && inside_eos) {
            l.push(eos);
        }
        l
    } else {
        out[span.start..span.end].to_vec()
    };
    // A span of tokens that decode to nothing re-tokenizes to nothing: train its tokens.
    let labels = if labels.is_empty() {
        out[span.start..span.end].to_vec()
    } else {
        labels
    };
    let side = |instruction: &str| -> Result<Example> {
        let text = format!("{instruction}{body}");
        let text = text.trim_start_matches(' ');
        let mut prompt = if opts.chat {
            codec.encode(&codec.chat(text))?
        } else {
            codec.encode(text)?
        };
        prompt.extend_from_slice(&out[..span.start]);
        if codec.encoder_decoder() {
            prompt.push(eos);
        }
        Ok(Example {
            prompt,
            completion: labels.clone(),
        })
    };
    Ok(HirExample {
        positive: side(pos_instr)?,
        negative: side(neg_instr)?,
        case: p.case,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One token per character; id 0 is end-of-sequence.
    struct Chars;

    impl Codec for Chars {
        fn encode(&self, text: &str) -> Result<Vec<u32>> {
            Ok(text.chars().map(|c| c as u32).collect())
        }
        fn decode(&self, ids: &[u32]) -> Result<String> {
            Ok(ids
                .iter()
                .filter(|&&i| i != 0)
                .filter_map(|&i| char::from_u32(i))
                .collect())
        }
        fn eos(&self) -> u32 {
            0
        }
        fn chat(&self, text: &str) -> String {
            format!("<{text}>")
        }
    }

    /// [`Chars`] as an encoder-decoder model's codec.
    struct EncoderChars;

    impl Codec for EncoderChars {
        fn encode(&self, text: &str) -> Result<Vec<u32>> {
            Chars.encode(text)
        }
        fn decode(&self, ids: &[u32]) -> Result<String> {
            Chars.decode(ids)
        }
        fn eos(&self) -> u32 {
            0
        }
        fn encoder_decoder(&self) -> bool {
            true
        }
    }

    const PLAIN: BuildOptions = BuildOptions {
        chat: false,
        eos_after_cut: false,
        eos_after_span: true,
    };
    const CHAT: BuildOptions = BuildOptions {
        chat: true,
        ..PLAIN
    };

    fn sample(output: &str, correct: bool) -> RelabeledSample {
        let (pos, neg) = if correct { ("P", "N") } else { ("N", "P") };
        RelabeledSample {
            sample_id: 1,
            seed_key: 1,
            prompt: "Solve.\n\nQ: q\nA:".into(),
            output_tokens: Chars.encode(output).unwrap(),
            output: output.to_string(),
            cut: false,
            correct,
            gold: "(C)".into(),
            positive: pos.into(),
            negative: neg.into(),
        }
    }

    fn ids(s: &str) -> Vec<u32> {
        Chars.encode(s).unwrap()
    }

    #[test]
    fn a_written_sample_without_tokens_trains_its_text_as_a_generated_one_would() {
        for seed in 0..20 {
            let generated = sample("(C) blue", true);
            let written = RelabeledSample {
                output_tokens: vec![],
                ..generated.clone()
            };
            let a = build(&generated, &Chars, PLAIN, &mut SplitMix64::new(seed)).unwrap();
            let b = build(&written, &Chars, PLAIN, &mut SplitMix64::new(seed)).unwrap();
            assert_eq!(a, b, "seed {seed}");
        }
    }

    #[test]
    fn short_outputs_are_trained_whole_with_eos_under_their_relabel() {
        // "(A" + EOS is 3 tokens: never truncated, case (c).
        let ex = build(&sample("(A", false), &Chars, PLAIN, &mut SplitMix64::new(3)).unwrap();
        assert_eq!(ex.case, SubOutputCase::Other);
        assert_eq!(ex.positive.prompt, ids("N\n\nQ: q\nA:"));
        assert_eq!(ex.negative.prompt, ids("P\n\nQ: q\nA:"));
        let mut want = ids("(A");
        want.push(0);
        assert_eq!(ex.positive.completion, want);
        assert_eq!(ex.negative.completion, want);
    }

    #[test]
    fn encoder_inputs_end_with_eos_after_the_output_prefix() {
        // A long output, so that spans start after the first token for some seeds.
        let s = sample("(B) because it is so", false);
        let mut with_prefix = 0;
        for seed in 0..50 {
            let dec = build(&s, &Chars, PLAIN, &mut SplitMix64::new(seed)).unwrap();
            let enc = build(&s, &EncoderChars, PLAIN, &mut SplitMix64::new(seed)).unwrap();
            // The same span and labels; the encoder input is the prompt plus EOS.
            assert_eq!(enc.positive.completion, dec.positive.completion);
            for (e, d) in [
                (&enc.positive, &dec.positive),
                (&enc.negative, &dec.negative),
            ] {
                assert_eq!(e.prompt.last(), Some(&0));
                assert_eq!(&e.prompt[..e.prompt.len() - 1], d.prompt.as_slice());
            }
            with_prefix += usize::from(dec.positive.prompt.len() > ids("N\n\nQ: q\nA:").len());
        }
        assert!(
            with_prefix > 0,
            "some spans keep an output prefix in the input"
        );
    }

    #[test]
    fn every_case_of_the_reference_appears_with_its_rules() {
        // A wrong "(C)x" (gold "(C)"): 5 tokens with EOS. Spans over many seeds reach
        // (a) prefix "(C)" == gold, (b) prefix "(" or "(C" inside the gold, and (c).
        let s = sample("(C)x", false);
        let mut seen = std::collections::BTreeSet::new();
        for seed in 0..200 {
            let ex = build(&s, &Chars, PLAIN, &mut SplitMix64::new(seed)).unwrap();
            seen.insert(format!("{:?}", ex.case));
            let labels = &ex.positive.completion;
            match ex.case {
                SubOutputCase::PrefixIsAnswer | SubOutputCase::PrefixInAnswer => {
                    // A wrong sample whose prefix agrees with the gold is trained as correct.
                    assert!(ex.positive.prompt.starts_with(&ids("P\n\n")), "{ex:?}");
                    assert!(ex.negative.prompt.starts_with(&ids("N\n\n")));
                }
                SubOutputCase::Other => {
                    assert!(ex.positive.prompt.starts_with(&ids("N\n\n")), "{ex:?}");
                    assert_eq!(labels.last(), Some(&0), "case (c) ends in EOS");
                }
            }
            if ex.case == SubOutputCase::PrefixInAnswer {
                assert_ne!(labels.last(), Some(&0), "case (b) has no EOS");
            }
            // The output before the span moved into the prompt.
            let body = ids("\n\nQ: q\nA:");
            let moved = &ex.positive.prompt[1 + body.len()..];
            assert!(ids("(C)x").starts_with(moved), "{moved:?}");
            assert_eq!(ex.positive.completion, ex.negative.completion);
        }
        assert_eq!(seen.len(), 3, "{seen:?}");
    }

    #[test]
    fn chat_style_wraps_both_relabeled_prompts_before_the_output_prefix() {
        let ex = build(&sample("(A", false), &Chars, CHAT, &mut SplitMix64::new(3)).unwrap();
        assert_eq!(ex.positive.prompt, ids("<N\n\nQ: q\nA:>"));
        assert_eq!(ex.negative.prompt, ids("<P\n\nQ: q\nA:>"));
    }

    #[test]
    fn a_prompt_without_an_instruction_line_is_refused() {
        let mut s = sample("(C)", true);
        s.prompt = "Q: q\nA:".into();
        let err = build(&s, &Chars, PLAIN, &mut SplitMix64::new(1)).unwrap_err();
        assert!(err.to_string().contains("no blank line"), "{err}");
    }

    #[test]
    fn a_cut_output_is_not_taught_to_stop_where_it_was_cut() {
        let mut s = sample("(A", false);
        s.cut = true;
        // "(A" without EOS is 2 tokens: never truncated, trained whole, no EOS.
        let ex = build(&s, &Chars, PLAIN, &mut SplitMix64::new(3)).unwrap();
        assert_eq!(ex.positive.completion, ids("(A"));
        let with = BuildOptions {
            eos_after_cut: true,
            ..PLAIN
        };
        let ex = build(&s, &Chars, with, &mut SplitMix64::new(3)).unwrap();
        assert_eq!(
            ex.positive.completion.last(),
            Some(&0),
            "the knob restores it"
        );
        // A long cut output (odd length, so that spans can reach its end): spans reaching
        // its end carry no EOS, shorter ones do (case c).
        let mut long = sample("(B) because i", false);
        long.cut = true;
        let (mut tail, mut inner) = (0, 0);
        for seed in 0..200 {
            let ex = build(&long, &Chars, PLAIN, &mut SplitMix64::new(seed)).unwrap();
            let labels = &ex.positive.completion;
            let prefix = ex.positive.prompt.len() - ids("N\n\nQ: q\nA:").len();
            let covered = labels.len() - usize::from(labels.last() == Some(&0));
            if prefix + covered == ids("(B) because i").len() {
                assert_ne!(labels.last(), Some(&0), "{labels:?}");
                tail += 1;
            } else if ex.case == SubOutputCase::Other {
                assert_eq!(labels.last(), Some(&0), "{labels:?}");
                inner += 1;
            }
        }
        assert!(tail > 0 && inner > 0, "{tail} {inner}");
    }

    #[test]
    fn the_span_knob_leaves_case_c_spans_open_and_keeps_the_rest() {
        let open = BuildOptions {
            eos_after_span: false,
            ..PLAIN
        };
        let query = ids("N\n\nQ: q\nA:").len();
        // A span that stops before the output's end-of-sequence is inside it, even when it
        // holds all of its text. Cases seen: (c) inside with the knob on, (c) inside with it
        // off, reaching the end with it off, (a) with it off.
        let mut seen = [0; 4];
        for output in ["(B) because i", "(C) no"] {
            let s = sample(output, false);
            let whole = ids(output).len();
            for seed in 0..300 {
                for (opts, on) in [(PLAIN, true), (open, false)] {
                    let ex = build(&s, &Chars, opts, &mut SplitMix64::new(seed)).unwrap();
                    let labels = &ex.positive.completion;
                    let eos = labels.last() == Some(&0);
                    // The span `build` drew: the output and its end-of-sequence.
                    let span = sample_span(whole + 1, &mut SplitMix64::new(seed));
                    assert_eq!(ex.positive.prompt.len() - query, span.start);
                    let reaches_end = span.end == whole + 1;
                    match (ex.case, reaches_end, on) {
                        (SubOutputCase::Other, false, true) => {
                            assert!(eos, "{labels:?}");
                            seen[0] += 1;
                        }
                        (SubOutputCase::Other, false, false) => {
                            assert!(!eos, "{labels:?}");
                            seen[1] += 1;
                        }
                        (_, true, false) => {
                            assert!(eos, "the output ended there: {labels:?}");
                            seen[2] += 1;
                        }
                        (SubOutputCase::PrefixIsAnswer, false, false) => {
                            assert!(eos, "the answer ends there: {labels:?}");
                            seen[3] += 1;
                        }
                        _ => {}
                    }
                }
            }
        }
        assert!(seen.iter().all(|&n| n > 0), "{seen:?}");
    }

    /// Tokenizes "(C)" as one token (id 1000) and each other character as itself; decodes
    /// back. Generated ids may split "(C)" into characters: re-tokenizing merges them.
    struct Merging;

    impl Codec for Merging {
        fn encode(&self, text: &str) -> Result<Vec<u32>> {
            let mut out = Vec::new();
            let mut rest = text;
            while !rest.is_empty() {
                if let Some(r) = rest.strip_prefix("(C)") {
                    out.push(1000);
                    rest = r;
                } else {
                    let c = rest.chars().next().unwrap();
                    out.push(c as u32);
                    rest = &rest[c.len_utf8()..];
                }
            }
            Ok(out)
        }
        fn decode(&self, ids: &[u32]) -> Result<String> {
            Ok(ids
                .iter()
                .filter(|&&i| i != 0)
                .map(|&i| {
                    if i == 1000 {
                        "(C)".to_string()
                    } else {
                        char::from_u32(i).map(String::from).unwrap_or_default()
                    }
                })
                .collect())
        }
        fn eos(&self) -> u32 {
            0
        }
    }

    #[test]
    fn the_span_is_drawn_over_the_retokenized_output() {
        // Generated as 3 character ids; re-tokenized it is 1 token + EOS = 2 <= 3: kept
        // whole. Over the generated ids (3 + EOS = 4) spans would truncate it.
        let mut s = sample("", true);
        s.output_tokens = ids("(C)");
        for seed in 0..20 {
            let ex = build(&s, &Merging, PLAIN, &mut SplitMix64::new(seed)).unwrap();
            assert_eq!(ex.positive.completion, vec![1000, 0]);
            assert_eq!(ex.case, SubOutputCase::Other);
        }
    }
}
