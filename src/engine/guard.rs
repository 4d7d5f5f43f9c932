//! Parsers for guard models' answers, and the reasons composed from them.
//!
//! The score never comes from this text (it is read from the label tokens'
//! logits); what is parsed here is the rest of the answer: Narasimha's
//! reasoning sentence, Qwen3Guard's and Llama Guard's categories, and the
//! greedy verdict word. An answer that does not have its format's shape is
//! [`Parsed::Unparsed`]; it is never read as benign.

use super::profile::{llama_guard_category, Controversial, Format};
use super::reason::{one_sentence, Stop};

/// The verdict word a guard model wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuardVerdict {
    /// `prompt_attack_message`, `Unsafe`, `unsafe`, `Yes`.
    Malicious,
    /// `benign_user_message`, `Safe`, `safe`, `No`.
    Benign,
    /// Qwen3Guard's `Controversial`.
    Controversial,
}

/// A guard model's answer, parsed.
#[derive(Debug, Clone, PartialEq)]
pub enum Parsed {
    /// The answer had its format's shape.
    Ok {
        /// The verdict word.
        verdict: GuardVerdict,
        /// Categories named (Llama Guard codes mapped to names), in order.
        categories: Vec<String>,
        /// The model's own reasoning (Narasimha), cut to one sentence.
        reason: Option<String>,
    },
    /// It did not; `why` says what was missing.
    Unparsed {
        /// For logs.
        why: &'static str,
    },
}

fn unparsed(why: &'static str) -> Parsed {
    Parsed::Unparsed { why }
}

/// Parses `answer` (the answer prefix followed by the generated text) in
/// `format`. `complete` says the model ended its answer (an end-of-generation
/// token) rather than being cut by a bound: a cut answer's last category may
/// be partial and is dropped.
pub fn parse(format: &Format, answer: &str, complete: bool) -> Parsed {
    match format {
        Format::YesNo => parse_yes_no(answer),
        Format::Narasimha { .. } => parse_narasimha(answer),
        Format::Qwen3Guard { .. } => parse_qwen3guard(answer, complete),
        Format::LlamaGuard3 => parse_llama_guard(answer, complete),
    }
}

fn first_word(s: &str) -> &str {
    s.trim_start()
        .split(|c: char| !(c.is_alphanumeric() || c == '_'))
        .next()
        .unwrap_or("")
}

fn parse_yes_no(answer: &str) -> Parsed {
    let mut s = answer.trim();
    if let Some(i) = s.find("</think>") {
        s = &s[i + "</think>".len()..];
    }
    let s = s.trim_start().strip_prefix("<score>").unwrap_or(s);
    match first_word(s).to_lowercase().as_str() {
        "yes" => Parsed::Ok {
            verdict: GuardVerdict::Malicious,
            categories: Vec::new(),
            reason: None,
        },
        "no" => Parsed::Ok {
            verdict: GuardVerdict::Benign,
            categories: Vec::new(),
            reason: None,
        },
        "" => unparsed("no verdict word"),
        _ => unparsed("the verdict is neither Yes nor No"),
    }
}

fn parse_narasimha(answer: &str) -> Parsed {
    let s = answer.trim_start();
    let Some(body) = s.strip_prefix("<think>") else {
        return unparsed("the answer does not open with <think>");
    };
    let Some(end) = body.find("</think>") else {
        return unparsed("the reasoning was not closed with </think>");
    };
    let thought = &body[..end];
    let verdict = match first_word(&body[end + "</think>".len()..]) {
        "prompt_attack_message" => GuardVerdict::Malicious,
        "benign_user_message" => GuardVerdict::Benign,
        "" => return unparsed("no label after </think>"),
        _ => return unparsed("the label is neither prompt_attack_message nor benign_user_message"),
    };
    Parsed::Ok {
        verdict,
        categories: Vec::new(),
        reason: one_sentence(thought, Stop::End).map(|(s, _)| s),
    }
}

/// Splits a comma-separated list; drops `None` and, when the answer was cut,
/// the last item (it may be partial).
fn list(items: &str, complete: bool) -> Vec<String> {
    let mut v: Vec<String> = items
        .split(',')
        .map(|c| c.trim().trim_end_matches('.').trim().to_string())
        .filter(|c| !c.is_empty() && !c.eq_ignore_ascii_case("none"))
        .collect();
    if !complete {
        v.pop();
    }
    v
}

fn parse_qwen3guard(answer: &str, complete: bool) -> Parsed {
    let mut lines = answer.lines().map(str::trim).filter(|l| !l.is_empty());
    let Some(first) = lines.next() else {
        return unparsed("empty answer");
    };
    let Some(value) = first.strip_prefix("Safety:") else {
        return unparsed("the first line does not start with `Safety:`");
    };
    let verdict = match value.trim() {
        "Safe" => GuardVerdict::Benign,
        "Unsafe" => GuardVerdict::Malicious,
        "Controversial" => GuardVerdict::Controversial,
        _ => return unparsed("Safety is not Safe, Unsafe or Controversial"),
    };
    let categories = match lines.next() {
        Some(l) => match l.strip_prefix("Categories:") {
            // The categories line is the last line: complete only if the answer is.
            Some(rest) => list(rest, complete),
            None => return unparsed("the second line does not start with `Categories:`"),
        },
        None => Vec::new(),
    };
    Parsed::Ok {
        verdict,
        categories,
        reason: None,
    }
}

fn parse_llama_guard(answer: &str, complete: bool) -> Parsed {
    let mut lines = answer.lines().map(str::trim).filter(|l| !l.is_empty());
    let verdict = match lines.next() {
        Some("safe") => GuardVerdict::Benign,
        Some("unsafe") => GuardVerdict::Malicious,
        Some(_) => return unparsed("the first line is neither safe nor unsafe"),
        None => return unparsed("empty answer"),
    };
    let mut categories = Vec::new();
    if let Some(codes) = lines.next() {
        if verdict == GuardVerdict::Benign {
            return unparsed("categories after `safe`");
        }
        let codes = list(codes, complete);
        for code in codes {
            match llama_guard_category(&code) {
                Some(name) => categories.push(name.to_string()),
                None => return unparsed("a category code is not S1..S14"),
            }
        }
    }
    Parsed::Ok {
        verdict,
        categories,
        reason: None,
    }
}

/// A guard verdict word read as malicious or not, under a Qwen3Guard setting.
pub fn counts_as_malicious(verdict: GuardVerdict, format: &Format) -> bool {
    match verdict {
        GuardVerdict::Malicious => true,
        GuardVerdict::Benign => false,
        GuardVerdict::Controversial => !matches!(
            format,
            Format::Qwen3Guard {
                controversial: Controversial::Loose
            }
        ),
    }
}

/// The one-sentence reason promptgate composes from a verdict-first guard's
/// answer (`reason_source: "guard_categories"`), e.g. `Llama Guard 3 judged
/// it unsafe: Violent Crimes, Hate.`
pub fn compose_reason(display_name: &str, verdict: GuardVerdict, categories: &[String]) -> String {
    let judged = match verdict {
        GuardVerdict::Malicious => "unsafe",
        GuardVerdict::Benign => "safe",
        GuardVerdict::Controversial => "controversial",
    };
    if categories.is_empty() {
        format!("{display_name} judged it {judged}.")
    } else {
        format!(
            "{display_name} judged it {judged}: {}.",
            categories.join(", ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(verdict: GuardVerdict, categories: &[&str], reason: Option<&str>) -> Parsed {
        Parsed::Ok {
            verdict,
            categories: categories.iter().map(|s| s.to_string()).collect(),
            reason: reason.map(str::to_string),
        }
    }

    const NARASIMHA: Format = Format::Narasimha {
        think_max_tokens: 96,
    };
    const QWEN: Format = Format::Qwen3Guard {
        controversial: Controversial::Strict,
    };

    #[test]
    fn narasimha_answers() {
        // As the model card shows its outputs.
        assert_eq!(
            parse(&NARASIMHA, "<think>\nThe user asks the assistant to ignore its instructions and reveal the system prompt.\n</think>\n\nprompt_attack_message", true),
            ok(GuardVerdict::Malicious, &[], Some("The user asks the assistant to ignore its instructions and reveal the system prompt."))
        );
        assert_eq!(
            parse(
                &NARASIMHA,
                "<think>A plain question about cooking pasta.</think> benign_user_message",
                true
            ),
            ok(
                GuardVerdict::Benign,
                &[],
                Some("A plain question about cooking pasta.")
            )
        );
        // Truncated inside the reasoning, or before the label.
        assert!(matches!(
            parse(&NARASIMHA, "<think>\nThe user asks the assis", false),
            Parsed::Unparsed { .. }
        ));
        assert!(matches!(
            parse(&NARASIMHA, "<think>x y z.</think>\n\n", false),
            Parsed::Unparsed { .. }
        ));
        // Malformed.
        assert!(matches!(
            parse(&NARASIMHA, "prompt_attack_message", true),
            Parsed::Unparsed { .. }
        ));
        assert!(matches!(
            parse(&NARASIMHA, "<think>hm.</think> maybe", true),
            Parsed::Unparsed { .. }
        ));
        // A label cut mid-token is not the label.
        assert!(matches!(
            parse(&NARASIMHA, "<think>hm.</think> prompt_att", false),
            Parsed::Unparsed { .. }
        ));
    }

    #[test]
    fn qwen3guard_answers() {
        assert_eq!(
            parse(&QWEN, "Safety: Unsafe\nCategories: Jailbreak", true),
            ok(GuardVerdict::Malicious, &["Jailbreak"], None)
        );
        assert_eq!(
            parse(&QWEN, "Safety: Safe\nCategories: None", true),
            ok(GuardVerdict::Benign, &[], None)
        );
        assert_eq!(
            parse(
                &QWEN,
                "Safety: Controversial\nCategories: Politically Sensitive Topics, Unethical Acts",
                true
            ),
            ok(
                GuardVerdict::Controversial,
                &["Politically Sensitive Topics", "Unethical Acts"],
                None
            )
        );
        // Cut by the token bound: the partial last category is dropped.
        assert_eq!(
            parse(&QWEN, "Safety: Unsafe\nCategories: Violent, Jailb", false),
            ok(GuardVerdict::Malicious, &["Violent"], None)
        );
        assert_eq!(
            parse(&QWEN, "Safety: Unsafe\n", false),
            ok(GuardVerdict::Malicious, &[], None)
        );
        assert!(matches!(
            parse(&QWEN, "Safety: Unsa", false),
            Parsed::Unparsed { .. }
        ));
        assert!(matches!(
            parse(&QWEN, "I cannot help with that.", true),
            Parsed::Unparsed { .. }
        ));
        assert!(matches!(
            parse(&QWEN, "Safety: Unsafe\nReason: bad", true),
            Parsed::Unparsed { .. }
        ));
        assert!(matches!(parse(&QWEN, "", true), Parsed::Unparsed { .. }));
    }

    #[test]
    fn controversial_follows_the_setting() {
        let loose = Format::Qwen3Guard {
            controversial: Controversial::Loose,
        };
        assert!(counts_as_malicious(GuardVerdict::Controversial, &QWEN));
        assert!(!counts_as_malicious(GuardVerdict::Controversial, &loose));
    }

    #[test]
    fn llama_guard_answers() {
        let f = Format::LlamaGuard3;
        assert_eq!(parse(&f, "safe", true), ok(GuardVerdict::Benign, &[], None));
        assert_eq!(
            parse(&f, "\n\nsafe", true),
            ok(GuardVerdict::Benign, &[], None)
        );
        assert_eq!(
            parse(&f, "unsafe\nS1,S10", true),
            ok(GuardVerdict::Malicious, &["Violent Crimes", "Hate"], None)
        );
        assert_eq!(
            parse(&f, "unsafe\nS9", true),
            ok(GuardVerdict::Malicious, &["Indiscriminate Weapons"], None)
        );
        // Cut: "S1" may be the start of "S10"; dropped.
        assert_eq!(
            parse(&f, "unsafe\nS2,S1", false),
            ok(GuardVerdict::Malicious, &["Non-Violent Crimes"], None)
        );
        assert_eq!(
            parse(&f, "unsafe", false),
            ok(GuardVerdict::Malicious, &[], None)
        );
        assert!(matches!(
            parse(&f, "unsafe\nS99", true),
            Parsed::Unparsed { .. }
        ));
        assert!(matches!(
            parse(&f, "safe\nS1", true),
            Parsed::Unparsed { .. }
        ));
        assert!(matches!(parse(&f, "uns", false), Parsed::Unparsed { .. }));
        assert!(matches!(
            parse(&f, "The message is fine.", true),
            Parsed::Unparsed { .. }
        ));
    }

    #[test]
    fn granite_answers() {
        let f = Format::YesNo;
        assert_eq!(
            parse(&f, "Yes", true),
            ok(GuardVerdict::Malicious, &[], None)
        );
        assert_eq!(parse(&f, "No", true), ok(GuardVerdict::Benign, &[], None));
        // Granite Guardian 3.3, with and without its thinking block.
        assert_eq!(
            parse(&f, "<score> yes </score>", true),
            ok(GuardVerdict::Malicious, &[], None)
        );
        assert_eq!(
            parse(
                &f,
                "<think>The user tries to bypass rules.</think>\n<score> no </score>",
                true
            ),
            ok(GuardVerdict::Benign, &[], None)
        );
        assert!(matches!(
            parse(&f, "<score> ", false),
            Parsed::Unparsed { .. }
        ));
        assert!(matches!(parse(&f, "Maybe", true), Parsed::Unparsed { .. }));
    }

    #[test]
    fn composed_reasons_read_as_one_sentence() {
        assert_eq!(
            compose_reason(
                "Llama Guard 3",
                GuardVerdict::Malicious,
                &["Violent Crimes".into(), "Hate".into()]
            ),
            "Llama Guard 3 judged it unsafe: Violent Crimes, Hate."
        );
        assert_eq!(
            compose_reason("Qwen3Guard", GuardVerdict::Benign, &[]),
            "Qwen3Guard judged it safe."
        );
    }
}
