//! Scoring an output against its example.
//!
//! Two scores are kept side by side:
//! * **exact**: the paper's metric (HIR.md §3.4). The output and the gold answer are compared
//!   after removing spaces and periods and lowercasing, so a multiple-choice answer must be the
//!   letter, e.g. `(C)`, and object_counting needs the digit.
//! * **extracted**: a stricter reading of what the output *means*: the option it picks (by
//!   letter or by text), the number it gives (digits, `1,234`, or words, `one hundred and
//!   five`; in worked answers the final result, after the last `=`, `->` or "answer is"), or
//!   the text it gives; any correct option counts.

use crate::task::{option_label, option_letter, Answer};

mod numbers;

pub use numbers::{first_number, parse_number};
use numbers::{stated_answer, Stated};

/// Both scores of one output, and the answer read from it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Score {
    /// The paper's exact match (evaluation normalisation).
    pub exact: bool,
    /// Correct under answer extraction.
    pub extracted: bool,
    /// The answer read from the output: an option label like `(B)`, a number in digits, or
    /// the normalised text; `None` when nothing could be read.
    pub predicted: Option<String>,
}

/// Scores `output` for an example whose answer is `answer`.
pub fn score(answer: &Answer, output: &str) -> Score {
    let exact = exact_match(output, &answer.gold());
    let (extracted, predicted) = match answer {
        Answer::MultipleChoice { options, .. } => match extract_option(options, output) {
            Some(i) => (options[i].1 == 1.0, Some(option_label(i))),
            None => (false, None),
        },
        Answer::Generative { targets, .. } => extract_generative(targets, output),
    };
    Score {
        exact,
        extracted,
        predicted,
    }
}

/// The reference's normalisation: drop spaces and periods, lowercase.
pub fn normalize(text: &str) -> String {
    text.chars()
        .filter(|c| *c != ' ' && *c != '.')
        .flat_map(char::to_lowercase)
        .collect()
}

/// The paper's evaluation metric: newlines in the output count as spaces, then [`normalize`].
pub fn exact_match(output: &str, gold: &str) -> bool {
    normalize(&output.replace('\n', " ")) == normalize(&gold.replace('\n', " "))
}

/// The check the reference relabels by (`verifier.py`): like [`exact_match`] but a newline in
/// the output is kept, so an output with a newline never matches a one-line answer.
pub fn relabel_match(output: &str, gold: &str) -> bool {
    normalize(output) == normalize(&gold.replace('\n', " "))
}

// === Multiple choice ===

/// The option an output picks: the first `(X)` label in range; else a leading bare letter
/// (`C`, `C)`, `C.`, `C:`); else the one option whose text the output contains (ignoring
/// options contained in another matching option).
pub fn extract_option(options: &[(String, f64)], output: &str) -> Option<usize> {
    let letter_index =
        |c: char| (0..options.len()).find(|&i| option_letter(i) == c.to_ascii_uppercase());
    let chars: Vec<char> = output.chars().collect();
    for w in chars.windows(3) {
        if w[0] == '(' && w[2] == ')' {
            if let Some(i) = letter_index(w[1]) {
                return Some(i);
            }
        }
    }
    let lead = strip_answer_lead(output.trim());
    let mut it = lead.chars();
    if let Some(first) = it.next() {
        let rest: String = it.collect();
        let bare = rest.is_empty()
            || (rest.starts_with([')', '.', ':'])
                && rest[1..].chars().next().is_none_or(char::is_whitespace));
        if first.is_ascii_alphabetic() && bare {
            if let Some(i) = letter_index(first) {
                return Some(i);
            }
        }
    }
    let text = normalize_words(output);
    let hits: Vec<usize> = (0..options.len())
        .filter(|&i| {
            let opt = normalize_words(&options[i].0);
            !opt.is_empty() && contains_words(&text, &opt)
        })
        .collect();
    let maximal: Vec<usize> = hits
        .iter()
        .copied()
        .filter(|&i| {
            let oi = normalize_words(&options[i].0);
            !hits.iter().any(|&j| {
                j != i && {
                    let oj = normalize_words(&options[j].0);
                    oj.len() > oi.len() && contains_words(&oj, &oi)
                }
            })
        })
        .collect();
    match maximal.as_slice() {
        [one] => Some(*one),
        _ => None,
    }
}

fn strip_answer_lead(text: &str) -> &str {
    let lower = text.to_lowercase();
    for lead in ["the correct answer is", "the answer is", "answer:", "a:"] {
        if lower.starts_with(lead) && text.is_char_boundary(lead.len()) {
            return text[lead.len()..].trim_start();
        }
    }
    text
}

/// Lowercase words separated by single spaces, punctuation other than inner `-`/`'`/`/`
/// removed.
fn normalize_words(text: &str) -> String {
    let cleaned: String = text
        .chars()
        .map(|c| {
            if c.is_alphanumeric() || matches!(c, '-' | '\'' | '/') {
                c.to_ascii_lowercase()
            } else {
                ' '
            }
        })
        .collect();
    cleaned.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn contains_words(haystack: &str, needle: &str) -> bool {
    let padded = format!(" {haystack} ");
    padded.contains(&format!(" {needle} "))
}

// === Generative ===

/// A generative answer: a number when a target is one (see [`stated_answer`]), else text
/// (see [`extract_text`]). Only the part of the output before a new question is read.
fn extract_generative(targets: &[String], output: &str) -> (bool, Option<String>) {
    let numeric: Vec<u64> = targets
        .iter()
        .filter_map(|t| parse_number(t.trim()))
        .collect();
    let span = answer_span(output);
    if numeric.is_empty() {
        return extract_text(targets, span);
    }
    match stated_answer(span) {
        Some(Stated::Whole(n)) => (numeric.contains(&n), Some(n.to_string())),
        Some(Stated::Other(text)) => (false, Some(text)),
        None => (false, None),
    }
}

/// A text answer: the words of the first non-empty line, or, when those are no target, the
/// words after the line's last result mark (`x -> y` gives `y`, see [`result_starts`]).
fn extract_text(targets: &[String], span: &str) -> (bool, Option<String>) {
    let line = span
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("");
    let accepted = |given: &str| targets.iter().any(|t| normalize_words(t) == given);
    let whole = normalize_words(line);
    if whole.is_empty() {
        return (false, None);
    }
    if accepted(&whole) {
        return (true, Some(whole));
    }
    let given = result_starts(line)
        .last()
        .map(|&i| normalize_words(&line[i..]))
        .filter(|r| !r.is_empty())
        .unwrap_or(whole);
    (accepted(&given), Some(given))
}

/// The part of an output that answers its question: everything before the first line that
/// starts a new question (`Q:`), as a model that runs on past its answer writes one.
fn answer_span(output: &str) -> &str {
    let mut end = 0;
    for line in output.split_inclusive('\n') {
        if line.trim_start().to_ascii_lowercase().starts_with("q:") {
            break;
        }
        end += line.len();
    }
    &output[..end]
}

/// Where each stated result begins, in order: just after every `=` (so also `=>`), `->`
/// and `→`, and after the leads "answer is", "answer:", "total is" and "total:" (as whole
/// words, any case).
pub(super) fn result_starts(text: &str) -> Vec<usize> {
    let lower = text.to_ascii_lowercase();
    let mut starts: Vec<usize> = ["=", "->", "→"]
        .iter()
        .flat_map(|mark| lower.match_indices(mark))
        .map(|(i, m)| i + m.len())
        .collect();
    for lead in ["answer is", "answer:", "total is", "total:"] {
        starts.extend(
            lower
                .match_indices(lead)
                .filter(|&(i, m)| is_lead_at(&lower, i, m))
                .map(|(i, m)| i + m.len()),
        );
    }
    starts.sort_unstable();
    starts.dedup();
    starts
}

/// Whether `lead`, found at `text[at..]`, stands as whole words: no letter or digit just
/// before it, nor just after it unless it ends in punctuation (`answer:7`).
fn is_lead_at(text: &str, at: usize, lead: &str) -> bool {
    let glued = |c: Option<char>| c.is_some_and(char::is_alphanumeric);
    let ends_in_word = lead.ends_with(char::is_alphanumeric);
    let glued_before = glued(text[..at].chars().next_back());
    let glued_after = ends_in_word && glued(text[at + lead.len()..].chars().next());
    !glued_before && !glued_after
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mc(opts: &[(&str, f64)]) -> Answer {
        let options: Vec<(String, f64)> = opts.iter().map(|(t, s)| (t.to_string(), *s)).collect();
        let gold = options.iter().position(|o| o.1 == 1.0).unwrap();
        Answer::MultipleChoice { options, gold }
    }

    #[test]
    fn exact_match_is_the_papers_normalisation() {
        assert!(exact_match("(C)", "(C)"));
        assert!(exact_match(" (c). ", "(C)"));
        assert!(exact_match("(C)\n", "(C)"));
        assert!(!exact_match("(C) blue ball", "(C)"));
        assert!(!exact_match("three", "3"));
        assert!(relabel_match("(c).", "(C)"));
        assert!(
            !relabel_match("(C)\n", "(C)"),
            "the relabel check keeps newlines"
        );
    }

    #[test]
    fn extraction_reads_letters_and_option_text() {
        let a = mc(&[
            ("orange ball.", 0.0),
            ("white ball.", 0.0),
            ("blue ball.", 1.0),
        ]);
        for out in [
            "(C)",
            "The correct answer is (C).",
            "(c) blue ball",
            "C",
            "C.",
            "Answer: C)",
            "blue ball",
            "Bob has the blue ball.",
        ] {
            let s = score(&a, out);
            assert!(s.extracted, "{out}: {s:?}");
            assert_eq!(s.predicted.as_deref(), Some("(C)"), "{out}");
        }
        for out in ["(A) blue ball", "A", "orange ball"] {
            assert!(!score(&a, out).extracted, "{out}");
        }
        assert_eq!(
            score(&a, "a ball").predicted,
            None,
            "an article is not an option letter"
        );
        assert_eq!(
            score(&a, "blue ball or white ball").predicted,
            None,
            "two options: no answer"
        );
        assert!(score(&a, "(C)").exact && !score(&a, "blue ball").exact);
    }

    #[test]
    fn extraction_prefers_the_longest_matching_option() {
        let a = mc(&[("ball", 0.0), ("blue ball", 1.0)]);
        assert_eq!(score(&a, "the blue ball").predicted.as_deref(), Some("(B)"));
    }

    #[test]
    fn any_correct_option_counts_under_extraction_only() {
        let a = mc(&[("circle", 1.0), ("ellipse", 1.0), ("square", 0.0)]);
        let s = score(&a, "(B)");
        assert!(s.extracted && !s.exact);
    }

    #[test]
    fn numbers_in_digits_or_words() {
        let a = Answer::Generative {
            targets: vec!["three".into(), "3".into()],
            gold: 1,
        };
        for out in ["3", "three", "You have 3 objects.", "Three."] {
            assert!(score(&a, out).extracted, "{out}");
        }
        assert!(!score(&a, "4").extracted);
        assert!(score(&a, "3").exact && !score(&a, "three").exact);
        assert_eq!(parse_number("twenty-one"), Some(21));
        assert_eq!(first_number("I count twenty one things"), Some(21));
        assert_eq!(parse_number("twenty-zero"), None);
        assert_eq!(first_number("none"), None);
    }

    #[test]
    fn text_answers_compare_words_of_the_first_line() {
        let a = Answer::Generative {
            targets: vec!["gelatine stick".into()],
            gold: 0,
        };
        assert!(score(&a, "gelatine stick.\nQ: next").extracted);
        assert!(score(&a, "Gelatine, stick").extracted);
        assert!(!score(&a, "stick gelatine").extracted);
        assert_eq!(score(&a, "   ").predicted, None);
    }

    fn generative(targets: &[&str]) -> Answer {
        Answer::Generative {
            targets: targets.iter().map(|t| t.to_string()).collect(),
            gold: targets.len().min(2) - 1,
        }
    }

    #[test]
    fn thousands_separators_are_read() {
        assert_eq!(parse_number("1,234"), Some(1234));
        assert_eq!(parse_number("12,345,678"), Some(12_345_678));
        assert_eq!(first_number("There are 1,234 apples."), Some(1234));
        let s = score(&generative(&["1234"]), "I count 12,345,678, no: 1,234.");
        assert_eq!(s.predicted.as_deref(), Some("12345678"));
        let s = score(&generative(&["1234"]), "1,234 apples");
        assert!(
            s.extracted && s.predicted.as_deref() == Some("1234"),
            "{s:?}"
        );
    }

    #[test]
    fn a_list_is_not_one_number() {
        for list in ["3, 4", "3,4", "1,23", "1,2345", "1,234,56"] {
            assert_eq!(parse_number(list), None, "{list}");
        }
        assert_eq!(first_number("3, 4"), Some(3));
        assert_eq!(first_number("1,23"), Some(1));
        let s = score(&generative(&["34"]), "3, 4");
        assert!(!s.extracted && s.predicted.as_deref() == Some("3"), "{s:?}");
    }

    #[test]
    fn multi_word_numbers_are_read() {
        for (text, n) in [
            ("zero", 0),
            ("twenty-one", 21),
            ("twenty one", 21),
            ("Twenty-One.", 21),
            ("one hundred", 100),
            ("a hundred", 100),
            ("one hundred and five", 105),
            ("two hundred thirty-four", 234),
            ("a thousand", 1000),
            ("one thousand two hundred", 1200),
            ("three thousand and twelve", 3012),
            ("ONE HUNDRED AND FIVE.", 105),
            ("one million two hundred thousand and three", 1_200_003),
        ] {
            assert_eq!(parse_number(text), Some(n), "{text}");
        }
        for text in ["a", "hundred", "three and four", "one one", "zero hundred"] {
            assert_eq!(parse_number(text), None, "{text}");
        }
        assert_eq!(first_number("I see one hundred and five birds"), Some(105));
        assert_eq!(first_number("three and four"), Some(3));
        assert_eq!(first_number("one hundred, five"), Some(100));
        assert_eq!(first_number("a twenty-zero"), None);
        assert_eq!(
            first_number("a 3-4 range"),
            None,
            "hyphenated digits are no number"
        );
        let s = score(
            &generative(&["one hundred and five", "105"]),
            "A hundred and five.",
        );
        assert!(
            s.extracted && s.predicted.as_deref() == Some("105"),
            "{s:?}"
        );
    }

    #[test]
    fn worked_answers_take_the_result() {
        for (out, target) in [
            ("3 + 4 = 7", "7"),
            ("2 + 2 + 1 = 5 apples", "5"),
            ("apple, banana -> 2", "2"),
            ("So the total is 5 + 3 = 8.", "8"),
            ("1 + 1 => two", "2"),
            ("3 + 4 = 7 -> done", "7"),
            ("I have 2 pears and 3 plums.\n2 + 3 = 5", "5"),
        ] {
            let s = score(&generative(&[target]), out);
            assert!(s.extracted, "{out}: {s:?}");
            assert_eq!(s.predicted.as_deref(), Some(target), "{out}");
        }
        assert!(!score(&generative(&["3"]), "3 + 4 = 7").extracted);
        let text = score(&generative(&["y"]), "x -> y");
        assert!(
            text.extracted && text.predicted.as_deref() == Some("y"),
            "{text:?}"
        );
        let whole = score(&generative(&["x = y"]), "x = y");
        assert!(
            whole.extracted && whole.predicted.as_deref() == Some("x y"),
            "a line that is an answer is taken whole: {whole:?}"
        );
    }

    #[test]
    fn answer_leads_pick_the_number_after_them() {
        for out in [
            "The answer is 7",
            "Answer: 7",
            "answer:7.",
            "I count 3 and 4, so the answer is seven.",
            "There are 2 cats and 5 dogs; the total is 7.",
        ] {
            let s = score(&generative(&["7"]), out);
            assert!(s.extracted, "{out}: {s:?}");
        }
        assert_eq!(
            score(&generative(&["7"]), "My answer isn't 3")
                .predicted
                .as_deref(),
            Some("3"),
            "'answer isn't' is no lead, so the first number counts"
        );
        let text = score(
            &generative(&["gelatine stick"]),
            "The answer is gelatine stick.",
        );
        assert!(text.extracted, "{text:?}");
    }

    #[test]
    fn without_a_result_mark_the_first_number_counts() {
        assert_eq!(
            score(&generative(&["3"]), "I see 3 apples and 4 pears")
                .predicted
                .as_deref(),
            Some("3")
        );
        assert_eq!(
            score(&generative(&["5"]), "5 apples => ?")
                .predicted
                .as_deref(),
            Some("5")
        );
        assert_eq!(score(&generative(&["5"]), "x -> y").predicted, None);
    }

    #[test]
    fn a_new_question_ends_the_answer() {
        let s = score(
            &generative(&["3"]),
            "3\n\nQ: How many legs? 2 + 2 = 4\nA: 4",
        );
        assert!(s.extracted && s.predicted.as_deref() == Some("3"), "{s:?}");
        assert_eq!(score(&generative(&["3"]), "Q: 3 apples").predicted, None);
        assert_eq!(score(&generative(&["y"]), "\nQ: y").predicted, None);
    }

    #[test]
    fn fractions_and_negatives_are_not_whole_numbers() {
        let a = generative(&["2"]);
        for (out, read) in [("2.5", "2.5"), ("It is -2.", "-2"), ("5 / 2 = 2.5", "2.5")] {
            let s = score(&a, out);
            assert!(!s.extracted, "{out}: {s:?}");
            assert_eq!(s.predicted.as_deref(), Some(read), "{out}");
        }
        assert!(score(&a, "2.0").extracted);
        assert!(
            score(&a, "7 - 5 = 2").extracted,
            "a minus between numbers is no sign"
        );
        assert_eq!(first_number("-3 or 4"), None);
    }
}
