//! Scoring an output against its example.
//!
//! Two scores are kept side by side:
//! * **exact**: the paper's metric (HIR.md §3.4). The output and the gold answer are compared
//!   after removing spaces and periods and lowercasing, so a multiple-choice answer must be the
//!   letter, e.g. `(C)`, and object_counting needs the digit.
//! * **extracted**: a stricter reading of what the output *means*: the option it picks (by
//!   letter or by text), the number it states (digit or number word), or the text it gives;
//!   any correct option counts.

use crate::task::{option_label, option_letter, Answer};

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

fn extract_generative(targets: &[String], output: &str) -> (bool, Option<String>) {
    let numeric: Vec<u64> = targets
        .iter()
        .filter_map(|t| parse_number(t.trim()))
        .collect();
    if !numeric.is_empty() {
        return match first_number(output) {
            Some(n) => (numeric.contains(&n), Some(n.to_string())),
            None => (false, None),
        };
    }
    let line = output
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("");
    let given = normalize_words(line);
    if given.is_empty() {
        return (false, None);
    }
    let correct = targets.iter().any(|t| normalize_words(t) == given);
    (correct, Some(given))
}

const UNITS: [&str; 20] = [
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
    "sixteen",
    "seventeen",
    "eighteen",
    "nineteen",
];
const TENS: [&str; 8] = [
    "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety",
];

/// A whole number written in digits or in English words up to ninety-nine.
pub fn parse_number(text: &str) -> Option<u64> {
    let t = text.trim().trim_end_matches('.').to_lowercase();
    if !t.is_empty() && t.len() <= 18 && t.bytes().all(|b| b.is_ascii_digit()) {
        return t.parse().ok();
    }
    let word = |w: &str| -> Option<u64> {
        if let Some(u) = UNITS.iter().position(|u| *u == w) {
            return Some(u as u64);
        }
        TENS.iter()
            .position(|x| *x == w)
            .map(|x| 20 + 10 * x as u64)
    };
    match t.split_once(['-', ' ']) {
        Some((tens, unit)) => {
            let (tens, unit) = (word(tens)?, word(unit)?);
            (tens >= 20 && tens % 10 == 0 && (1..10).contains(&unit)).then_some(tens + unit)
        }
        None => word(&t),
    }
}

/// The first number an output states, in digits or words (`twenty-one`, `twenty one`).
pub fn first_number(output: &str) -> Option<u64> {
    let words: Vec<String> = normalize_words(output)
        .split(' ')
        .map(str::to_string)
        .collect();
    for (i, w) in words.iter().enumerate() {
        if let Some(pair) = words
            .get(i + 1)
            .and_then(|next| parse_number(&format!("{w} {next}")))
        {
            return Some(pair);
        }
        if let Some(n) = parse_number(w) {
            return Some(n);
        }
    }
    None
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
}
