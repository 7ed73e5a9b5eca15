//! An incremental, validating JSON scanner. Streaming parsers feed it one
//! character at a time so they can pass argument text on as soon as it is known
//! to be valid JSON so far, and learn where keys and values begin and end
//! without re-parsing the whole text at every step.

/// Something structural the scanner saw; positions are byte offsets in the
/// text the caller fed, `end` exclusive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ScanEvent {
    /// An object key (the string literal, quotes included) whose object is at
    /// nesting `depth - 1`; members of the outermost object have depth 1.
    Key {
        depth: usize,
        start: usize,
        end: usize,
    },
    /// A value begins; the outermost value has depth 0.
    ValueStart {
        depth: usize,
        pos: usize,
    },
    ValueEnd {
        depth: usize,
        end: usize,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ScanError;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Container {
    Object,
    Array,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    Value,
    FirstKeyOrObjectEnd,
    Key,
    Colon,
    FirstValueOrArrayEnd,
    CommaOrEnd,
    Done,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Escape {
    None,
    Backslash,
    Hex(u8),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Number {
    Minus,
    Zero,
    Int,
    Dot,
    Frac,
    Exponent,
    ExponentSign,
    ExponentDigits,
}

impl Number {
    fn next(self, c: char) -> Option<Number> {
        use Number::*;
        match (self, c) {
            (Minus, '0') => Some(Zero),
            (Minus, '1'..='9') => Some(Int),
            (Zero | Int, '.') => Some(Dot),
            (Int, '0'..='9') => Some(Int),
            (Zero | Int | Frac, 'e' | 'E') => Some(Exponent),
            (Dot | Frac, '0'..='9') => Some(Frac),
            (Exponent, '+' | '-') => Some(ExponentSign),
            (Exponent | ExponentSign | ExponentDigits, '0'..='9') => Some(ExponentDigits),
            _ => None,
        }
    }

    fn can_end(self) -> bool {
        matches!(self, Number::Zero | Number::Int | Number::Frac | Number::ExponentDigits)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Token {
    None,
    String {
        is_key: bool,
        start: usize,
        escape: Escape,
    },
    Number(Number),
    /// The rest of `true`, `false` or `null`.
    Literal(&'static str),
}

#[derive(Clone, Debug)]
pub(crate) struct JsonScanner {
    stack: Vec<Container>,
    expect: Expect,
    token: Token,
}

pub(crate) fn is_json_whitespace(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\r')
}

impl JsonScanner {
    pub(crate) fn new() -> Self {
        JsonScanner { stack: Vec::new(), expect: Expect::Value, token: Token::None }
    }

    /// The outermost value is complete (a trailing number only once `finish` ran).
    pub(crate) fn is_done(&self) -> bool {
        self.expect == Expect::Done
    }

    /// Feeds the character at byte offset `pos`.
    pub(crate) fn step(&mut self, c: char, pos: usize, events: &mut Vec<ScanEvent>) -> Result<(), ScanError> {
        match self.token {
            Token::Number(n) => {
                if let Some(next) = n.next(c) {
                    self.token = Token::Number(next);
                    return Ok(());
                }
                if !n.can_end() {
                    return Err(ScanError);
                }
                // A number ends only at the character after it, which is then
                // read as structure.
                self.token = Token::None;
                self.value_ended(pos, events);
            }
            Token::String { is_key, start, escape } => {
                let escape = match (escape, c) {
                    (Escape::None, '"') => {
                        self.token = Token::None;
                        if is_key {
                            events.push(ScanEvent::Key { depth: self.stack.len(), start, end: pos + 1 });
                            self.expect = Expect::Colon;
                        } else {
                            self.value_ended(pos + 1, events);
                        }
                        return Ok(());
                    }
                    (Escape::None, '\\') => Escape::Backslash,
                    (Escape::None, c) if c < ' ' => return Err(ScanError),
                    (Escape::None, _) => Escape::None,
                    (Escape::Backslash, '"' | '\\' | '/' | 'b' | 'f' | 'n' | 'r' | 't') => Escape::None,
                    (Escape::Backslash, 'u') => Escape::Hex(4),
                    (Escape::Hex(left), c) if c.is_ascii_hexdigit() => {
                        if left == 1 {
                            Escape::None
                        } else {
                            Escape::Hex(left - 1)
                        }
                    }
                    _ => return Err(ScanError),
                };
                self.token = Token::String { is_key, start, escape };
                return Ok(());
            }
            Token::Literal(rest) => {
                if !rest.starts_with(c) {
                    return Err(ScanError);
                }
                let rest = &rest[1..];
                if rest.is_empty() {
                    self.token = Token::None;
                    self.value_ended(pos + 1, events);
                } else {
                    self.token = Token::Literal(rest);
                }
                return Ok(());
            }
            Token::None => {}
        }
        if is_json_whitespace(c) {
            return Ok(());
        }
        match (self.expect, c) {
            (Expect::Value, _) => self.begin_value(c, pos, events),
            (Expect::FirstValueOrArrayEnd, ']') | (Expect::FirstKeyOrObjectEnd, '}') => {
                self.close(pos, events);
                Ok(())
            }
            (Expect::FirstValueOrArrayEnd, _) => self.begin_value(c, pos, events),
            (Expect::FirstKeyOrObjectEnd | Expect::Key, '"') => {
                self.token = Token::String { is_key: true, start: pos, escape: Escape::None };
                Ok(())
            }
            (Expect::Colon, ':') => {
                self.expect = Expect::Value;
                Ok(())
            }
            (Expect::CommaOrEnd, ',') => {
                self.expect = match self.stack.last() {
                    Some(Container::Object) => Expect::Key,
                    _ => Expect::Value,
                };
                Ok(())
            }
            (Expect::CommaOrEnd, '}') if self.stack.last() == Some(&Container::Object) => {
                self.close(pos, events);
                Ok(())
            }
            (Expect::CommaOrEnd, ']') if self.stack.last() == Some(&Container::Array) => {
                self.close(pos, events);
                Ok(())
            }
            _ => Err(ScanError),
        }
    }

    /// End of input at byte offset `pos`: completes a trailing top-level number.
    /// (Calls are objects, so only the tests need this.)
    #[cfg(test)]
    pub(crate) fn finish(&mut self, pos: usize, events: &mut Vec<ScanEvent>) {
        if let Token::Number(n) = self.token {
            if n.can_end() {
                self.token = Token::None;
                self.value_ended(pos, events);
            }
        }
    }

    fn begin_value(&mut self, c: char, pos: usize, events: &mut Vec<ScanEvent>) -> Result<(), ScanError> {
        let depth = self.stack.len();
        match c {
            '{' => {
                self.stack.push(Container::Object);
                self.expect = Expect::FirstKeyOrObjectEnd;
            }
            '[' => {
                self.stack.push(Container::Array);
                self.expect = Expect::FirstValueOrArrayEnd;
            }
            '"' => self.token = Token::String { is_key: false, start: pos, escape: Escape::None },
            '-' => self.token = Token::Number(Number::Minus),
            '0' => self.token = Token::Number(Number::Zero),
            '1'..='9' => self.token = Token::Number(Number::Int),
            't' => self.token = Token::Literal("rue"),
            'f' => self.token = Token::Literal("alse"),
            'n' => self.token = Token::Literal("ull"),
            _ => return Err(ScanError),
        }
        events.push(ScanEvent::ValueStart { depth, pos });
        Ok(())
    }

    fn close(&mut self, pos: usize, events: &mut Vec<ScanEvent>) {
        self.stack.pop();
        self.value_ended(pos + 1, events);
    }

    fn value_ended(&mut self, end: usize, events: &mut Vec<ScanEvent>) {
        events.push(ScanEvent::ValueEnd { depth: self.stack.len(), end });
        self.expect = if self.stack.is_empty() { Expect::Done } else { Expect::CommaOrEnd };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(text: &str) -> Result<bool, ScanError> {
        let mut scanner = JsonScanner::new();
        let mut events = Vec::new();
        for (pos, c) in text.char_indices() {
            scanner.step(c, pos, &mut events)?;
        }
        scanner.finish(text.len(), &mut events);
        Ok(scanner.is_done())
    }

    #[test]
    fn agrees_with_serde_json_on_validity() {
        let cases = [
            r#"{"a": [1, -2.5e+3, 0, true, false, null, "x\"y\u00e9"], "b": {}}"#,
            "[]",
            "[[]]",
            "12",
            "-0.5",
            r#""\ud83d\ude00""#,
            "{,}",
            "[1,]",
            "01",
            "-",
            "1.",
            "tru",
            r#"{"a" 1}"#,
            r#"{"a":1}}"#,
            "\"a\nb\"",
            "[1 2]",
            r#"{"a":1,}"#,
            "{\"é\": \"ü\"}",
        ];
        for case in cases {
            let ours = matches!(scan(case), Ok(true));
            let serde = serde_json::from_str::<serde_json::Value>(case).is_ok();
            assert_eq!(ours, serde, "{case}");
        }
    }

    #[test]
    fn reports_members_of_the_outer_object() {
        let text = r#"{"name": "f", "arguments": {"x": [1]}}"#;
        let mut scanner = JsonScanner::new();
        let mut events = Vec::new();
        for (pos, c) in text.char_indices() {
            scanner.step(c, pos, &mut events).unwrap();
        }
        let keys: Vec<&str> = events
            .iter()
            .filter_map(|e| match *e {
                ScanEvent::Key { depth: 1, start, end } => Some(&text[start..end]),
                _ => None,
            })
            .collect();
        assert_eq!(keys, [r#""name""#, r#""arguments""#]);
        let values: Vec<&str> = events
            .iter()
            .filter_map(|e| match *e {
                ScanEvent::ValueEnd { depth: 1, end } => Some(end),
                _ => None,
            })
            .zip(events.iter().filter_map(|e| match *e {
                ScanEvent::ValueStart { depth: 1, pos } => Some(pos),
                _ => None,
            }))
            .map(|(end, start)| &text[start..end])
            .collect();
        assert_eq!(values, [r#""f""#, r#"{"x": [1]}"#]);
        assert!(scanner.is_done());
    }
}
