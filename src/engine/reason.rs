//! One-sentence reasons: what an answer's `reason` is, where it came from,
//! the bounds on writing it, and how generated text is cut to one sentence.
//!
//! A reason is written greedily (argmax at every step, so the same prompt and
//! model give the same words) and stops at the first of: the end of the first
//! sentence, an end-of-generation token, `max_tokens` generated tokens, or
//! `max_ms` milliseconds. Text cut by a bound ends at the last whole word,
//! followed by `…`; it is never cut inside a word.

use std::time::Duration;

/// Bounds on writing one reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExplainLimits {
    /// Most tokens generated (at least 1).
    pub max_tokens: usize,
    /// Most wall-clock time spent generating, prompt evaluation included.
    pub max_time: Duration,
}

/// Default for [`ExplainLimits::max_tokens`] (`--explain-max-tokens`).
pub const DEFAULT_EXPLAIN_MAX_TOKENS: usize = 48;
/// Default for [`ExplainLimits::max_time`] in milliseconds (`--explain-max-ms`).
pub const DEFAULT_EXPLAIN_MAX_MS: u64 = 3000;

impl Default for ExplainLimits {
    fn default() -> Self {
        ExplainLimits {
            max_tokens: DEFAULT_EXPLAIN_MAX_TOKENS,
            max_time: Duration::from_millis(DEFAULT_EXPLAIN_MAX_MS),
        }
    }
}

pub use crate::protocol::ReasonSource;

/// A reason for one verdict.
#[derive(Debug, Clone, PartialEq)]
pub struct Reason {
    /// One sentence, or `None` when there is none (unparsed, unavailable).
    pub text: Option<String>,
    /// Who wrote it.
    pub source: ReasonSource,
    /// Categories a guard model named (Llama Guard names, Qwen3Guard
    /// categories), in its order; empty when it named none.
    pub categories: Vec<String>,
    /// Tokens generated for it (0 when it was composed or kept from scoring).
    pub generated_tokens: usize,
    /// Milliseconds spent writing it (0 when kept from scoring).
    pub ms: f64,
    /// Whether a bound (tokens or time) cut it.
    pub truncated: bool,
}

/// The answer's reason fields for a job's outcome: nothing when no reason
/// was asked for; `unavailable` with `reason_error` when none could be written.
pub fn explained(reason: Option<&Result<Reason, String>>) -> crate::protocol::Explained {
    use crate::protocol::{Explained, ReasonCost};
    match reason {
        None => Explained::default(),
        Some(Ok(r)) => Explained {
            reason: r.text.clone(),
            reason_source: Some(r.source),
            categories: r.categories.clone(),
            reason_error: None,
            reason_cost: Some(ReasonCost {
                tokens: r.generated_tokens,
                ms: r.ms,
                truncated: r.truncated,
            }),
        },
        Some(Err(e)) => Explained {
            reason_source: Some(ReasonSource::Unavailable),
            reason_error: Some(e.clone()),
            ..Explained::default()
        },
    }
}

/// Why generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// The first sentence was complete.
    Sentence,
    /// An end-of-generation token, or a stop string.
    End,
    /// `max_tokens` or `max_time` ran out.
    Budget,
}

const TERMINATORS: [char; 6] = ['.', '!', '?', '。', '！', '？'];
const ABBREVIATIONS: [&str; 8] = ["e.g", "i.e", "vs", "mr", "mrs", "dr", "st", "cf"];

/// The end (byte index) of the first complete sentence in `text`, if any.
///
/// A sentence ends at `.`, `!` or `?` (and the CJK forms) followed by white
/// space, or at the end of `text` when `finished` (no more text will come); or
/// at a line break after some text. A `.` after a single letter or a common
/// abbreviation (`e.g.`, `i.e.`, `vs.`, `Dr.`) does not end it, nor does a
/// leading list marker such as `1.`.
pub fn sentence_end(text: &str, finished: bool) -> Option<usize> {
    let mut chars = text.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        let before = &text[..i];
        let has_words = before.chars().filter(|c| c.is_alphabetic()).count() >= 3;
        if c == '\n' {
            if before.trim().chars().any(char::is_alphanumeric) && has_words {
                return Some(i);
            }
            continue;
        }
        if !TERMINATORS.contains(&c) || !has_words {
            continue;
        }
        let next = chars.peek().map(|&(_, n)| n);
        let boundary = match next {
            None => finished,
            Some(n) => n.is_whitespace() || matches!(n, '"' | '\'' | ')' | '”' | '’'),
        };
        if !boundary {
            continue;
        }
        if c == '.' {
            let word = before
                .rsplit(|ch: char| ch.is_whitespace() || ch == '(')
                .next()
                .unwrap_or("")
                .to_lowercase();
            let single = word.chars().count() == 1 && word.chars().all(char::is_alphabetic);
            if single || ABBREVIATIONS.contains(&word.as_str()) {
                continue;
            }
        }
        let mut end = i + c.len_utf8();
        // Keep a closing quote or bracket right after the terminator.
        if let Some(&(j, q)) = chars.peek() {
            if matches!(q, '"' | '\'' | ')' | '”' | '’') {
                end = j + q.len_utf8();
            }
        }
        return Some(end);
    }
    None
}

/// `text` cut to one clean sentence: the first complete sentence when there
/// is one; otherwise, when `stop` is [`Stop::Budget`], the text up to its
/// last whole word followed by `…`; otherwise the whole text. Leading and
/// trailing white space, and a trailing `,;:-(` before `…`, are removed. Line
/// breaks become spaces. `None` when nothing worth saying is left.
///
/// The second value says whether the sentence was cut by the bound.
pub fn one_sentence(text: &str, stop: Stop) -> Option<(String, bool)> {
    let text = text.trim_start_matches(|c: char| c.is_whitespace() || c == '"' || c == '*');
    let finished = stop != Stop::Budget;
    if let Some(end) = sentence_end(text, finished) {
        let s = tidy(&text[..end]);
        return (!s.is_empty()).then_some((s, false));
    }
    if stop != Stop::Budget {
        let s = tidy(text);
        return (s.chars().any(char::is_alphanumeric)).then_some((s, false));
    }
    // Cut by a bound: the last word may be cut, so drop it.
    let trimmed = text.trim_end();
    let cut = if trimmed.len() < text.len() {
        // The text ended in white space: its last word is whole.
        trimmed
    } else {
        match trimmed.rfind(char::is_whitespace) {
            Some(i) => &trimmed[..i],
            None => return None,
        }
    };
    let cut = cut.trim_end_matches(|c: char| {
        c.is_whitespace() || matches!(c, ',' | ';' | ':' | '-' | '–' | '—' | '(' | '"' | '*')
    });
    let s = tidy(cut);
    if s.chars().filter(|c| c.is_alphanumeric()).count() < 2 {
        return None;
    }
    Some((format!("{s}…"), true))
}

fn tidy(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_sentence_is_taken() {
        assert_eq!(
            one_sentence(" It asks to ignore the rules. Then more.", Stop::End),
            Some(("It asks to ignore the rules.".into(), false))
        );
        assert_eq!(
            sentence_end("It asks to ignore the rules.", false),
            None,
            "a final period may still be followed by more text"
        );
        assert_eq!(sentence_end("It asks to ignore the rules.", true), Some(28));
        assert_eq!(
            sentence_end("It asks to ignore the rules. ", false),
            Some(28)
        );
    }

    #[test]
    fn abbreviations_numbers_and_lists_do_not_end_a_sentence() {
        let t = "It uses tricks, e.g. role play, and version 3.5 of a jailbreak. Next";
        let (s, cut) = one_sentence(t, Stop::Sentence).unwrap();
        assert_eq!(
            s,
            "It uses tricks, e.g. role play, and version 3.5 of a jailbreak."
        );
        assert!(!cut);
        let (s, _) = one_sentence("1. The prompt is a plain question. 2. More", Stop::End).unwrap();
        assert_eq!(s, "1. The prompt is a plain question.");
        let (s, _) = one_sentence("Asked by J. Smith about tides! ok", Stop::End).unwrap();
        assert_eq!(s, "Asked by J. Smith about tides!");
    }

    #[test]
    fn a_line_break_ends_a_sentence_without_punctuation() {
        let (s, cut) =
            one_sentence("A harmless question about cooking\nSecond", Stop::End).unwrap();
        assert_eq!(s, "A harmless question about cooking");
        assert!(!cut);
    }

    #[test]
    fn a_budget_cut_never_splits_a_word() {
        let (s, cut) = one_sentence("The prompt tries to override the sys", Stop::Budget).unwrap();
        assert_eq!(s, "The prompt tries to override the…");
        assert!(cut);
        let (s, _) = one_sentence("The prompt tries to override, ", Stop::Budget).unwrap();
        assert_eq!(s, "The prompt tries to override…");
        assert_eq!(one_sentence("Overridi", Stop::Budget), None);
        assert_eq!(one_sentence("   ", Stop::End), None);
    }

    #[test]
    fn quotes_after_the_terminator_are_kept() {
        let (s, _) = one_sentence("It says \"ignore all rules.\" Then", Stop::End).unwrap();
        assert_eq!(s, "It says \"ignore all rules.\"");
    }

    #[test]
    fn end_of_generation_keeps_an_unpunctuated_sentence() {
        let (s, cut) = one_sentence("It is a benign question", Stop::End).unwrap();
        assert_eq!(s, "It is a benign question");
        assert!(!cut);
    }
}
