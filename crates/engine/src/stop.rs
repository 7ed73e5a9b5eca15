//! Stop strings: find the first occurrence of any stop string in generated
//! text, and hold back from streaming the tail that could still grow into one.

/// Checks generated text against a request's stop strings.
#[derive(Clone, Debug, Default)]
pub struct StopChecker {
    stops: Vec<String>,
    include_in_output: bool,
    /// Longest stop string, in bytes.
    max_len: usize,
}

/// A stop string matched: the text is to be cut at `truncate_at` (bytes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StopMatch {
    pub stop: String,
    pub truncate_at: usize,
}

impl StopChecker {
    pub fn new(stops: Vec<String>, include_in_output: bool) -> Self {
        let stops: Vec<String> = stops.into_iter().filter(|s| !s.is_empty()).collect();
        let max_len = stops.iter().map(|s| s.len()).max().unwrap_or(0);
        Self { stops, include_in_output, max_len }
    }

    pub fn is_empty(&self) -> bool {
        self.stops.is_empty()
    }

    /// Looks for a stop string that ends inside the last `new_len` bytes of
    /// `text` (earlier text was checked before). The earliest match wins.
    pub fn check(&self, text: &str, new_len: usize) -> Option<StopMatch> {
        if self.stops.is_empty() || new_len == 0 {
            return None;
        }
        let mut from = text.len().saturating_sub(new_len + self.max_len.saturating_sub(1));
        while !text.is_char_boundary(from) {
            from -= 1;
        }
        let window = &text[from..];
        let (pos, stop) = self
            .stops
            .iter()
            .filter_map(|s| window.find(s.as_str()).map(|p| (from + p, s)))
            .min_by_key(|&(p, s)| (p, std::cmp::Reverse(s.len())))?;
        let truncate_at = if self.include_in_output { pos + stop.len() } else { pos };
        Some(StopMatch { stop: stop.clone(), truncate_at })
    }

    /// How many bytes of `text` are safe to stream now: everything except a
    /// tail that is a proper prefix of some stop string.
    pub fn streamable_len(&self, text: &str) -> usize {
        let mut hold = 0;
        for stop in &self.stops {
            for k in (1..stop.len()).rev() {
                if k <= hold {
                    break;
                }
                if stop.is_char_boundary(k) && text.ends_with(&stop[..k]) {
                    hold = k;
                    break;
                }
            }
        }
        text.len() - hold
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_earliest_stop_across_deltas() {
        let c = StopChecker::new(vec!["\n\n".into(), "END".into()], false);
        assert_eq!(c.check("hello E", 2), None);
        let m = c.check("hello EN", 1);
        assert_eq!(m, None);
        let m = c.check("hello END and more", 10).unwrap();
        assert_eq!(m, StopMatch { stop: "END".into(), truncate_at: 6 });
        let inc = StopChecker::new(vec!["END".into()], true);
        assert_eq!(inc.check("hello END", 3).unwrap().truncate_at, 9);
    }

    #[test]
    fn holds_back_possible_stop_prefixes() {
        let c = StopChecker::new(vec!["</s>".into()], false);
        assert_eq!(c.streamable_len("abc</"), 3);
        assert_eq!(c.streamable_len("abc<"), 3);
        assert_eq!(c.streamable_len("abc"), 3);
        assert_eq!(c.streamable_len("a</x"), 4);
    }

    #[test]
    fn multibyte_text_is_cut_on_char_boundaries() {
        let c = StopChecker::new(vec!["世界".into()], false);
        let text = "你好世界";
        let m = c.check(text, 3).unwrap();
        assert_eq!(&text[..m.truncate_at], "你好");
        assert_eq!(c.streamable_len("你好世"), "你好".len());
    }
}
