//! GBNF (llama.cpp's grammar format, which vLLM's `guided_grammar` accepts)
//! translated to llguidance's Lark dialect, which has no GBNF reader.
//!
//! A GBNF rule is `name ::= alternatives`; the translation keeps the
//! structure (sequences, `|`, groups, `* + ?`, `{m,n}`) and rewrites the
//! atoms: `root` becomes Lark's `start`, other names become lowercase Lark
//! rule names, string literals become JSON-quoted strings and character
//! classes and `.` become regexes.

use std::collections::HashMap;
use std::fmt::Write;

/// Whether `grammar` is GBNF rather than Lark: some line defines a rule with `::=`.
pub(crate) fn looks_like_gbnf(grammar: &str) -> bool {
    grammar.lines().any(|line| {
        let line = line.trim_start();
        let name_len = line.find(|c: char| !is_name_char(c)).unwrap_or(line.len());
        name_len > 0 && line[name_len..].trim_start().starts_with("::=")
    })
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '-' || c == '_'
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Name(String),
    Define,
    /// A decoded string literal.
    Literal(String),
    /// A character class as a Lark regex (`/[...]/`).
    Class(String),
    /// Punctuation and quantifiers passed through as they are: `( ) | * + ?` and `{m,n}`.
    Verbatim(String),
}

/// A Lark grammar for the GBNF `grammar`, or a message saying where it is malformed.
pub(crate) fn gbnf_to_lark(grammar: &str) -> Result<String, String> {
    let tokens = lex(grammar)?;
    // Rules: each starts at `name ::=` and runs to the next one.
    let mut rules: Vec<(String, Vec<Token>)> = Vec::new();
    let mut i = 0;
    while i < tokens.len() {
        match (&tokens[i], tokens.get(i + 1)) {
            (Token::Name(name), Some(Token::Define)) => {
                rules.push((name.clone(), Vec::new()));
                i += 2;
            }
            (tok, _) => match rules.last_mut() {
                Some((_, body)) => {
                    body.push(tok.clone());
                    i += 1;
                }
                None => return Err("a GBNF grammar must start with a rule (`name ::= ...`)".into()),
            },
        }
    }
    if rules.is_empty() {
        return Err("the GBNF grammar defines no rules".into());
    }
    if !rules.iter().any(|(name, _)| name == "root") {
        return Err("the GBNF grammar has no `root` rule".into());
    }

    let names = lark_names(rules.iter().map(|(n, _)| n.as_str()));
    let mut lark = String::new();
    for (name, body) in &rules {
        if body.is_empty() {
            return Err(format!("GBNF rule `{name}` is empty"));
        }
        let _ = write!(lark, "{}:", names[name.as_str()]);
        for tok in body {
            lark.push(' ');
            match tok {
                // An undefined name stays as written (lowercased), so llguidance reports it.
                Token::Name(n) => lark.push_str(names.get(n.as_str()).map_or(&lark_name(n), |s| s)),
                Token::Literal(s) => lark.push_str(&lark_string(s)),
                Token::Class(rx) | Token::Verbatim(rx) => lark.push_str(rx),
                Token::Define => unreachable!("`::=` only follows a rule name"),
            }
        }
        lark.push('\n');
    }
    Ok(lark)
}

/// Lark rule names for GBNF ones: lowercase (uppercase names are Lark
/// terminals), `root` as `start`, made unique.
fn lark_names<'a>(gbnf: impl Iterator<Item = &'a str>) -> HashMap<&'a str, String> {
    let mut names = HashMap::new();
    let mut taken = std::collections::HashSet::new();
    taken.insert("start".to_string());
    for name in gbnf {
        if names.contains_key(name) {
            continue;
        }
        let lark = if name == "root" {
            "start".to_string()
        } else {
            let base = lark_name(name);
            let mut candidate = base.clone();
            let mut n = 1;
            while taken.contains(&candidate) {
                n += 1;
                candidate = format!("{base}_{n}");
            }
            taken.insert(candidate.clone());
            candidate
        };
        names.insert(name, lark);
    }
    names
}

fn lark_name(gbnf: &str) -> String {
    let lower = gbnf.to_ascii_lowercase().replace('-', "_");
    if lower.starts_with(|c: char| c.is_ascii_lowercase()) {
        lower
    } else {
        format!("r_{lower}")
    }
}

/// A Lark string literal (JSON syntax, control characters escaped).
pub(crate) fn lark_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 || c == '\x7f' => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// One character of a regex class, escaped so that no character is special
/// (`\x{..}` for everything but ASCII letters and digits).
fn class_char(c: char) -> String {
    if c.is_ascii_alphanumeric() {
        c.to_string()
    } else {
        format!("\\x{{{:x}}}", c as u32)
    }
}

fn lex(src: &str) -> Result<Vec<Token>, String> {
    let chars: Vec<char> = src.chars().collect();
    let mut tokens = Vec::new();
    let mut i = 0;
    let line_of = |pos: usize| chars[..pos].iter().filter(|&&c| c == '\n').count() + 1;
    while i < chars.len() {
        let c = chars[i];
        match c {
            c if c.is_whitespace() => i += 1,
            '#' => {
                while i < chars.len() && chars[i] != '\n' {
                    i += 1;
                }
            }
            ':' if chars[i..].starts_with(&[':', ':', '=']) => {
                tokens.push(Token::Define);
                i += 3;
            }
            '"' => {
                let start = i;
                i += 1;
                let mut text = String::new();
                loop {
                    match chars.get(i) {
                        None => return Err(format!("GBNF line {}: unterminated string", line_of(start))),
                        Some('"') => {
                            i += 1;
                            break;
                        }
                        Some('\\') => {
                            let (ch, next) =
                                escape(&chars, i).map_err(|e| format!("GBNF line {}: {e}", line_of(i)))?;
                            text.push(ch);
                            i = next;
                        }
                        Some(&ch) => {
                            text.push(ch);
                            i += 1;
                        }
                    }
                }
                tokens.push(Token::Literal(text));
            }
            '[' => {
                let start = i;
                i += 1;
                let mut class = String::from("/[");
                if chars.get(i) == Some(&'^') {
                    class.push('^');
                    i += 1;
                }
                let mut empty = true;
                loop {
                    let first = match chars.get(i) {
                        None => {
                            return Err(format!("GBNF line {}: unterminated character class", line_of(start)))
                        }
                        Some(']') => {
                            i += 1;
                            break;
                        }
                        Some('\\') => {
                            let (ch, next) =
                                escape(&chars, i).map_err(|e| format!("GBNF line {}: {e}", line_of(i)))?;
                            i = next;
                            ch
                        }
                        Some(&ch) => {
                            i += 1;
                            ch
                        }
                    };
                    empty = false;
                    class.push_str(&class_char(first));
                    // A range `a-z` (a `-` before `]` is a literal dash).
                    if chars.get(i) == Some(&'-') && chars.get(i + 1).is_some_and(|&c| c != ']') {
                        i += 1;
                        let last = if chars[i] == '\\' {
                            let (ch, next) =
                                escape(&chars, i).map_err(|e| format!("GBNF line {}: {e}", line_of(i)))?;
                            i = next;
                            ch
                        } else {
                            i += 1;
                            chars[i - 1]
                        };
                        if last < first {
                            return Err(format!(
                                "GBNF line {}: character range {first:?}-{last:?} is backwards",
                                line_of(start)
                            ));
                        }
                        class.push('-');
                        class.push_str(&class_char(last));
                    }
                }
                if empty {
                    return Err(format!("GBNF line {}: empty character class", line_of(start)));
                }
                class.push_str("]/");
                tokens.push(Token::Class(class));
            }
            // Any character, newlines included.
            '.' => {
                tokens.push(Token::Class("/(?s:.)/".into()));
                i += 1;
            }
            '(' | ')' | '|' | '*' | '+' | '?' => {
                tokens.push(Token::Verbatim(c.to_string()));
                i += 1;
            }
            '{' => {
                let start = i;
                let end = chars[i..]
                    .iter()
                    .position(|&c| c == '}')
                    .map(|p| i + p)
                    .ok_or_else(|| format!("GBNF line {}: unterminated `{{`", line_of(start)))?;
                let inner: String = chars[i + 1..end].iter().filter(|c| !c.is_whitespace()).collect();
                let valid = !inner.is_empty()
                    && inner.chars().all(|c| c.is_ascii_digit() || c == ',')
                    && inner.matches(',').count() <= 1
                    && inner != ",";
                if !valid {
                    return Err(format!("GBNF line {}: bad repetition `{{{inner}}}`", line_of(start)));
                }
                tokens.push(Token::Verbatim(format!("{{{inner}}}")));
                i = end + 1;
            }
            c if is_name_char(c) => {
                let start = i;
                while i < chars.len() && is_name_char(chars[i]) {
                    i += 1;
                }
                tokens.push(Token::Name(chars[start..i].iter().collect()));
            }
            c => return Err(format!("GBNF line {}: unexpected character {c:?}", line_of(i))),
        }
    }
    Ok(tokens)
}

/// The character a backslash escape at `chars[at]` stands for, and the index after it.
fn escape(chars: &[char], at: usize) -> Result<(char, usize), String> {
    let hex = |len: usize| -> Result<(char, usize), String> {
        let digits: String = chars.get(at + 2..at + 2 + len).unwrap_or_default().iter().collect();
        u32::from_str_radix(&digits, 16)
            .ok()
            .filter(|_| digits.len() == len)
            .and_then(char::from_u32)
            .map(|c| (c, at + 2 + len))
            .ok_or_else(|| format!("bad escape \\{}{digits}", chars[at + 1]))
    };
    match chars.get(at + 1) {
        Some('x') => hex(2),
        Some('u') => hex(4),
        Some('U') => hex(8),
        Some('n') => Ok(('\n', at + 2)),
        Some('r') => Ok(('\r', at + 2)),
        Some('t') => Ok(('\t', at + 2)),
        Some('0') => Ok(('\0', at + 2)),
        Some(&c) => Ok((c, at + 2)),
        None => Err("a backslash ends the grammar".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_gbnf() {
        assert!(looks_like_gbnf("root ::= \"a\""));
        assert!(looks_like_gbnf("# c\n  my-rule ::= [a-z]\nroot::=my-rule"));
        assert!(!looks_like_gbnf("start: \"a\" | \"b\""));
    }

    #[test]
    fn translates_rules_literals_classes_and_repeats() {
        let lark = gbnf_to_lark(
            "root ::= Item (\",\" Item){0,3} # list\nItem ::= [a-z0-9_] +\n  | \"q\\\"\\n\" | .",
        )
        .unwrap();
        assert_eq!(
            lark,
            "start: item ( \",\" item ) {0,3}\n\
             item: /[az09\\x{5f}]/ + | \"q\\\"\\u000a\" | /(?s:.)/\n"
                .replace("az09", "a-z0-9")
        );
    }

    #[test]
    fn malformed_gbnf_is_an_error() {
        assert!(gbnf_to_lark("root ::= \"a").unwrap_err().contains("unterminated string"));
        assert!(gbnf_to_lark("root ::= [a-").unwrap_err().contains("unterminated"));
        assert!(gbnf_to_lark("item ::= \"a\"").unwrap_err().contains("root"));
        assert!(gbnf_to_lark("root ::= [z-a]").unwrap_err().contains("backwards"));
    }
}
