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
fn result_starts(text: &str) -> Vec<usize> {
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

/// A number as an output states it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Stated {
    /// A whole number, not negative: `7`, `1,234`, `3.0`, `twenty-one`.
    Whole(u64),
    /// Any other number in digits, as written: `-3`, `2.5`, or one too large for a `u64`.
    Other(String),
}

/// The number an output gives as its answer, the way a grader reads it: the final stated
/// result (the first number after the last result mark that is followed by one, see
/// [`result_starts`]: `2 + 2 + 1 = 5 apples` gives 5, `The answer is 7` gives 7); with no
/// such mark, the first number stated.
fn stated_answer(span: &str) -> Option<Stated> {
    result_starts(span)
        .iter()
        .rev()
        .find_map(|&i| first_stated(&span[i..]))
        .or_else(|| first_stated(span))
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
/// Scale words after a group below one thousand, largest last.
const SCALES: [(&str, u64); 3] = [
    ("thousand", 1_000),
    ("million", 1_000_000),
    ("billion", 1_000_000_000),
];

/// A whole number written in digits (with or without thousands separators: `1,234`) or in
/// English words (`twenty-one`, `one hundred and five`, `a thousand`, `zero`); a trailing
/// period and case are ignored. Anything else, a list like `3, 4` included, is `None`.
pub fn parse_number(text: &str) -> Option<u64> {
    let t = text.trim().trim_end_matches('.').to_lowercase();
    if let Some(n) = parse_digits(&t) {
        return Some(n);
    }
    let words: Vec<&str> = t.split_whitespace().flat_map(|w| w.split('-')).collect();
    match number_words(&words) {
        Some((n, used)) if used == words.len() => Some(n),
        _ => None,
    }
}

/// At most 18 digits, optionally grouped by thousands separators (`12,345,678`).
fn parse_digits(text: &str) -> Option<u64> {
    let digits: String = if is_thousands_grouped(text) {
        text.chars().filter(|c| *c != ',').collect()
    } else {
        text.to_string()
    };
    let all_digits = !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit());
    (all_digits && digits.len() <= 18)
        .then(|| digits.parse().ok())
        .flatten()
}

/// Whether `run` is digits in thousands groups: 1 to 3 digits, then one or more `,ddd`.
fn is_thousands_grouped(run: &str) -> bool {
    let digits = |g: &str| g.bytes().all(|b| b.is_ascii_digit());
    let mut groups = run.split(',');
    let lead = groups.next().unwrap_or("");
    let rest: Vec<&str> = groups.collect();
    (1..=3).contains(&lead.len())
        && digits(lead)
        && !rest.is_empty()
        && rest.iter().all(|g| g.len() == 3 && digits(g))
}

/// The first number an output states, in digits (`1,234`) or words (`twenty-one`,
/// `twenty one`, `one hundred and five`); `None` when it states none, or when the first
/// number it states is not a whole number (`-3`, `2.5`).
pub fn first_number(output: &str) -> Option<u64> {
    match first_stated(output)? {
        Stated::Whole(n) => Some(n),
        Stated::Other(_) => None,
    }
}

/// The first number `text` states, whole or not.
fn first_stated(text: &str) -> Option<Stated> {
    let toks = tokens(text);
    let mut i = 0;
    while i < toks.len() {
        match &toks[i] {
            Tok::Digits(stated) => return Some(stated.clone()),
            Tok::Break => i += 1,
            Tok::Word(_) => {
                let run: Vec<&str> = toks[i..].iter().map_while(Tok::word).collect();
                if let Some(n) = number_in_words(&run) {
                    return Some(Stated::Whole(n));
                }
                i += run.len();
            }
        }
    }
    None
}

/// The first number a run of words spells, starting and ending at whole words: the parts
/// of `twenty-one` read as `twenty one`, but `twenty-zero` is no number.
fn number_in_words(words: &[&str]) -> Option<u64> {
    let mut parts = Vec::new();
    let mut starts = Vec::new();
    let mut ends = Vec::new();
    for word in words {
        starts.push(parts.len());
        parts.extend(word.split('-'));
        ends.push(parts.len());
    }
    starts.iter().find_map(|&s| {
        let (n, used) = number_words(&parts[s..])?;
        ends.contains(&(s + used)).then_some(n)
    })
}

/// One piece of an output as the number reader sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    /// A number written in digits.
    Digits(Stated),
    /// A lowercase word: letters and digits, with inner apostrophes and hyphens.
    Word(String),
    /// Punctuation, which ends a number written in words (`one hundred, five` is two).
    Break,
}

impl Tok {
    fn word(&self) -> Option<&str> {
        match self {
            Tok::Word(w) => Some(w),
            _ => None,
        }
    }
}

/// Splits `text` into [`Tok`]s: spaces separate words, other punctuation is a break, and
/// thousands separators are dropped first. A hyphenated word stays one word (`twenty-one`,
/// and `3-4`, which is no number).
fn tokens(text: &str) -> Vec<Tok> {
    let chars: Vec<char> = without_thousands_separators(text).chars().collect();
    let mut toks = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_alphanumeric() {
            let (start, end) = (i, word_end(&chars, i));
            let word: String = chars[start..end].iter().collect();
            i = end;
            if word.bytes().all(|b| b.is_ascii_digit()) {
                let (stated, stop) = digits_at(&chars, start, end);
                toks.push(Tok::Digits(stated));
                i = stop;
            } else {
                toks.push(Tok::Word(word.to_lowercase()));
            }
            continue;
        }
        if !c.is_whitespace() {
            toks.push(Tok::Break);
        }
        i += 1;
    }
    toks
}

/// The end of the word starting at `start`: letters and digits, with apostrophes and
/// hyphens inside.
fn word_end(chars: &[char], start: usize) -> usize {
    let mut end = start;
    while end < chars.len() {
        let inner = matches!(chars[end], '\'' | '’' | '-')
            && end > start
            && chars.get(end + 1).is_some_and(|n| n.is_alphanumeric());
        if !(chars[end].is_alphanumeric() || inner) {
            break;
        }
        end += 1;
    }
    end
}

/// The number whose digits are `chars[start..end]`, with a minus sign just before it and
/// a decimal fraction just after it (`-3`, `2.5`), and where that reading ends.
fn digits_at(chars: &[char], start: usize, end: usize) -> (Stated, usize) {
    let negative = start > 0
        && matches!(chars[start - 1], '-' | '−')
        && (start < 2 || !chars[start - 2].is_alphanumeric());
    let mut stop = end;
    if chars.get(end) == Some(&'.') && chars.get(end + 1).is_some_and(char::is_ascii_digit) {
        stop = end + 1;
        while chars.get(stop).is_some_and(char::is_ascii_digit) {
            stop += 1;
        }
    }
    let whole_part: String = chars[start..end].iter().collect();
    let fraction_is_zero = chars[end..stop].iter().all(|c| matches!(c, '.' | '0'));
    let value = whole_part
        .parse()
        .ok()
        .filter(|_| !negative && fraction_is_zero);
    let from = if negative { start - 1 } else { start };
    let stated = match value {
        Some(n) => Stated::Whole(n),
        None => Stated::Other(chars[from..stop].iter().collect()),
    };
    (stated, stop)
}

/// `text` with the commas of well-formed thousands groups (`1,234`, `12,345,678`) removed;
/// other commas between digits (`3,4`, `1,23`) are kept, so they still separate numbers.
fn without_thousands_separators(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find(|c: char| c.is_ascii_digit()) {
        out.push_str(&rest[..start]);
        let tail = &rest[start..];
        let len = tail
            .find(|c: char| !c.is_ascii_digit() && c != ',')
            .unwrap_or(tail.len());
        let run = tail[..len].trim_end_matches(',');
        if is_thousands_grouped(run) {
            out.extend(run.chars().filter(|c| *c != ','));
        } else {
            out.push_str(run);
        }
        rest = &tail[run.len()..];
    }
    out.push_str(rest);
    out
}

/// The number the words at the start of `words` spell, and how many words it takes:
/// `zero`, or groups below one thousand joined by decreasing scale words, with an optional
/// `and` after a scale (`three thousand and twelve`, `one million two hundred thousand`).
fn number_words(words: &[&str]) -> Option<(u64, usize)> {
    let (mut value, mut used) = group(words)?;
    if value == 0 {
        return Some((0, used));
    }
    let mut total = 0;
    let mut limit = u64::MAX;
    loop {
        match words.get(used).and_then(|w| scale(w)) {
            Some(s) if s < limit => {
                total += value * s;
                used += 1;
                limit = s;
            }
            _ => return Some((total + value, used)),
        }
        match group_after_scale(&words[used..], limit) {
            Some((v, n)) => {
                value = v;
                used += n;
            }
            None => return Some((total, used)),
        }
    }
}

/// The group that goes on a number after a scale word worth `limit`: an optional `and`,
/// then a group above zero not followed by a scale word as large as `limit`.
fn group_after_scale(words: &[&str], limit: u64) -> Option<(u64, usize)> {
    let skip = usize::from(words.first() == Some(&"and"));
    let (value, n) = group(&words[skip..])?;
    let next_scale = words.get(skip + n).and_then(|w| scale(w));
    (value > 0 && next_scale.is_none_or(|s| s < limit)).then_some((value, skip + n))
}

/// A number below one thousand at the start of `words`, and how many words it takes:
/// `seven`, `twenty one`, `two hundred thirty four`, `one hundred and five`, `a hundred`;
/// `a` alone counts as one only before a scale word (`a thousand`).
fn group(words: &[&str]) -> Option<(u64, usize)> {
    let first = *words.first()?;
    let (lead, used) = if first == "a" {
        (1, 1)
    } else {
        below_hundred(words)?
    };
    if words.get(used) != Some(&"hundred") || !(1..10).contains(&lead) {
        let a_alone = first == "a" && words.get(1).and_then(|w| scale(w)).is_none();
        return (!a_alone).then_some((lead, used));
    }
    let rest = &words[used + 1..];
    let skip = usize::from(rest.first() == Some(&"and"));
    match below_hundred(&rest[skip..]) {
        Some((tail, n)) if tail > 0 => Some((lead * 100 + tail, used + 1 + skip + n)),
        _ => Some((lead * 100, used + 1)),
    }
}

/// A number below one hundred at the start of `words`: a unit, a teen, a ten, or a ten
/// and a unit (`twenty one`, from `twenty-one`), and how many words it takes.
fn below_hundred(words: &[&str]) -> Option<(u64, usize)> {
    let first = small_number(words.first()?)?;
    match words.get(1).and_then(|w| small_number(w)) {
        Some(unit) if first >= 20 && (1..10).contains(&unit) => Some((first + unit, 2)),
        _ => Some((first, 1)),
    }
}

/// The value of one word from `zero` to `nineteen` or a ten from `twenty` to `ninety`.
fn small_number(word: &str) -> Option<u64> {
    if let Some(u) = UNITS.iter().position(|u| *u == word) {
        return Some(u as u64);
    }
    TENS.iter()
        .position(|t| *t == word)
        .map(|t| 20 + 10 * t as u64)
}

/// The value of a scale word (`thousand`, `million`, `billion`).
fn scale(word: &str) -> Option<u64> {
    SCALES.iter().find(|(w, _)| *w == word).map(|(_, s)| *s)
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
