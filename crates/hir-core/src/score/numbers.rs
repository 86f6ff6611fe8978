//! Reading the number an output states: digits (`1,234`, `3.0`), words (`one hundred and
//! five`, `twenty-one`), and in a worked answer the final result.

use super::result_starts;

/// A number as an output states it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Stated {
    /// A whole number, not negative: `7`, `1,234`, `3.0`, `twenty-one`.
    Whole(u64),
    /// Any other number in digits, as written: `-3`, `2.5`, or one too large for a `u64`.
    Other(String),
}

/// The number an output gives as its answer, the way a grader reads it: the final stated
/// result (the first number after the last result mark that is followed by one, see
/// [`result_starts`]: `2 + 2 + 1 = 5 apples` gives 5, `The answer is 7` gives 7); with no
/// such mark, the first number stated.
pub(super) fn stated_answer(span: &str) -> Option<Stated> {
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
