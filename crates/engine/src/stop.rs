//! Stop strings: find the first occurrence of any stop string in generated
//! text, and hold back from streaming the tail that could still grow into one.
//!
//! A request's stop strings are compiled once into an Aho-Corasick automaton
//! ([`StopChecker`]); each sequence keeps its place in it ([`StopScan`]). A
//! new token then costs time in its own bytes only, whatever the number and
//! length of the stop strings: the engine thread checks every sequence of
//! every request after every token, so that cost is paid by all requests.

use std::collections::VecDeque;

/// Most stop strings one request may give. OpenAI allows 4 and vLLM has no
/// bound; 64 leaves room for long lists of delimiters while keeping the
/// automaton of one request small (see [`MAX_STOP_STRING_BYTES`]).
pub const MAX_STOP_STRINGS: usize = 64;

/// Longest stop string, in bytes. Stop strings are delimiters of a few
/// tokens; 1 KiB (some 250 tokens) is far beyond any real use. The bound
/// limits the text held back from streaming (up to one stop string less a
/// byte) and, with [`MAX_STOP_STRINGS`], the automaton to 64 Ki states.
pub const MAX_STOP_STRING_BYTES: usize = 1024;

const ROOT: u32 = 0;
const NO_STOP: u32 = u32::MAX;

/// One state of the automaton: the prefix of some stop string that ends the
/// text scanned so far, as long as possible.
#[derive(Clone, Debug)]
struct State {
    /// Length of that prefix in bytes.
    depth: u32,
    /// The state of its longest proper suffix that is also a prefix.
    fail: u32,
    /// The longest stop string that ends here (this prefix itself or one of
    /// its suffixes), as an index into `stops`; `NO_STOP` if none.
    longest_stop: u32,
    /// Outgoing edges: `edge_bytes[first_edge..][..num_edges]`, sorted.
    first_edge: u32,
    num_edges: u32,
}

/// A request's stop strings, compiled. Shared by the request's sequences;
/// each keeps its own [`StopScan`].
#[derive(Clone, Debug)]
pub struct StopChecker {
    stops: Vec<String>,
    include_in_output: bool,
    states: Vec<State>,
    edge_bytes: Vec<u8>,
    edge_targets: Vec<u32>,
}

/// Where one sequence is in its request's [`StopChecker`]: the automaton
/// state after the text scanned so far, and how many bytes that was.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StopScan {
    state: u32,
    scanned: usize,
}

/// A stop string matched: the text is to be cut at `truncate_at` (bytes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StopMatch {
    pub stop: String,
    pub truncate_at: usize,
}

impl Default for StopChecker {
    fn default() -> Self {
        Self::new(Vec::new(), false)
    }
}

impl StopChecker {
    /// Compiles `stops` (empty strings are ignored). Time and memory are
    /// linear in their total length.
    pub fn new(stops: Vec<String>, include_in_output: bool) -> Self {
        let stops: Vec<String> = stops.into_iter().filter(|s| !s.is_empty()).collect();
        // The trie first, with one child list per state.
        let mut children: Vec<Vec<(u8, u32)>> = vec![Vec::new()];
        let mut own_stop: Vec<u32> = vec![NO_STOP];
        let mut depth: Vec<u32> = vec![0];
        for (index, stop) in stops.iter().enumerate() {
            let mut state = ROOT;
            for &byte in stop.as_bytes() {
                let at = state as usize;
                state = match children[at].iter().find(|&&(b, _)| b == byte) {
                    Some(&(_, next)) => next,
                    None => {
                        let next = children.len() as u32;
                        children[at].push((byte, next));
                        children.push(Vec::new());
                        own_stop.push(NO_STOP);
                        depth.push(depth[at] + 1);
                        next
                    }
                };
            }
            // A repeated stop string keeps its first index.
            if own_stop[state as usize] == NO_STOP {
                own_stop[state as usize] = index as u32;
            }
        }
        let mut states = Vec::with_capacity(children.len());
        let mut edge_bytes = Vec::with_capacity(children.len());
        let mut edge_targets = Vec::with_capacity(children.len());
        for (i, edges) in children.iter_mut().enumerate() {
            edges.sort_unstable_by_key(|&(b, _)| b);
            states.push(State {
                depth: depth[i],
                fail: ROOT,
                longest_stop: own_stop[i],
                first_edge: edge_bytes.len() as u32,
                num_edges: edges.len() as u32,
            });
            edge_bytes.extend(edges.iter().map(|&(b, _)| b));
            edge_targets.extend(edges.iter().map(|&(_, t)| t));
        }
        let mut checker = Self { stops, include_in_output, states, edge_bytes, edge_targets };
        // Failure links in breadth-first order: a state's link is found
        // through links of shallower states, all set by then.
        let mut queue: VecDeque<u32> = VecDeque::new();
        for &(_, child) in &children[ROOT as usize] {
            queue.push_back(child);
        }
        while let Some(state) = queue.pop_front() {
            for &(byte, child) in &children[state as usize] {
                let fail = if state == ROOT {
                    ROOT
                } else {
                    checker.next(checker.states[state as usize].fail, byte)
                };
                let inherited = checker.states[fail as usize].longest_stop;
                let child_state = &mut checker.states[child as usize];
                child_state.fail = fail;
                if child_state.longest_stop == NO_STOP {
                    child_state.longest_stop = inherited;
                }
                queue.push_back(child);
            }
        }
        checker
    }

    pub fn is_empty(&self) -> bool {
        self.stops.is_empty()
    }

    fn child(&self, state: u32, byte: u8) -> Option<u32> {
        let s = &self.states[state as usize];
        let first = s.first_edge as usize;
        let bytes = &self.edge_bytes[first..first + s.num_edges as usize];
        bytes.binary_search(&byte).ok().map(|i| self.edge_targets[first + i])
    }

    /// The state after `byte` from `state` (amortised O(1) over a scan: each
    /// failure link taken shortens the current prefix).
    fn next(&self, mut state: u32, byte: u8) -> u32 {
        loop {
            if let Some(next) = self.child(state, byte) {
                return next;
            }
            if state == ROOT {
                return ROOT;
            }
            state = self.states[state as usize].fail;
        }
    }

    /// Scans the text added since the last call (`text[scan's end..]`) and
    /// returns the stop string that starts earliest among those ending in
    /// it (the longest of those starting there); earlier text was checked
    /// before. `text` only ever grows between calls for one sequence.
    pub fn check(&self, scan: &mut StopScan, text: &str) -> Option<StopMatch> {
        let bytes = text.as_bytes();
        let from = scan.scanned.min(bytes.len());
        scan.scanned = bytes.len();
        if self.stops.is_empty() {
            return None;
        }
        // (start, stop index) of the best match so far.
        let mut best: Option<(usize, u32)> = None;
        for (pos, &byte) in bytes.iter().enumerate().skip(from) {
            scan.state = self.next(scan.state, byte);
            let stop = self.states[scan.state as usize].longest_stop;
            if stop == NO_STOP {
                continue;
            }
            let start = pos + 1 - self.stops[stop as usize].len();
            // Same start, later end: a longer stop string, which wins.
            if best.is_none_or(|(best_start, _)| start <= best_start) {
                best = Some((start, stop));
            }
        }
        let (start, stop) = best?;
        let stop = self.stops[stop as usize].clone();
        let truncate_at = if self.include_in_output { start + stop.len() } else { start };
        Some(StopMatch { stop, truncate_at })
    }

    /// How many bytes of `text` are safe to stream now: everything except a
    /// tail that is a proper prefix of some stop string. `scan` is the
    /// sequence's scan; text it has not seen yet is scanned here (on a copy).
    pub fn streamable_len(&self, scan: &StopScan, text: &str) -> usize {
        let mut state = scan.state;
        for &byte in text.as_bytes().iter().skip(scan.scanned) {
            state = self.next(state, byte);
        }
        // A stop string starts with a whole UTF-8 character, so the held
        // tail starts on a character boundary.
        text.len() - self.states[state as usize].depth as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The plain checker the automaton replaced: every stop string searched
    /// in the window a new delta can complete. The reference for the
    /// property test below.
    struct NaiveStops {
        stops: Vec<String>,
        include_in_output: bool,
        max_len: usize,
    }

    impl NaiveStops {
        fn new(stops: Vec<String>, include_in_output: bool) -> Self {
            let stops: Vec<String> = stops.into_iter().filter(|s| !s.is_empty()).collect();
            let max_len = stops.iter().map(|s| s.len()).max().unwrap_or(0);
            Self { stops, include_in_output, max_len }
        }

        fn check(&self, text: &str, new_len: usize) -> Option<StopMatch> {
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

        fn streamable_len(&self, text: &str) -> usize {
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

    /// Feeds `deltas` one by one, as the engine does, until a stop matches.
    fn run(c: &StopChecker, deltas: &[&str]) -> (String, Option<StopMatch>, usize) {
        let mut scan = StopScan::default();
        let mut text = String::new();
        for d in deltas {
            text.push_str(d);
            if let Some(m) = c.check(&mut scan, &text) {
                return (text, Some(m), 0);
            }
        }
        let streamable = c.streamable_len(&scan, &text);
        (text, None, streamable)
    }

    #[test]
    fn finds_the_earliest_stop_across_deltas() {
        let c = StopChecker::new(vec!["\n\n".into(), "END".into()], false);
        let (_, m, streamable) = run(&c, &["hello ", "E"]);
        assert_eq!((m, streamable), (None, 6));
        let (_, m, streamable) = run(&c, &["hello E", "N"]);
        assert_eq!((m, streamable), (None, 6));
        let (_, m, _) = run(&c, &["hello EN", "D and more"]);
        assert_eq!(m.unwrap(), StopMatch { stop: "END".into(), truncate_at: 6 });
        let inc = StopChecker::new(vec!["END".into()], true);
        assert_eq!(run(&inc, &["hello ", "END"]).1.unwrap().truncate_at, 9);
    }

    #[test]
    fn the_earliest_start_wins_over_the_earliest_end() {
        // "bc" ends first, but "abcd" starts first.
        let c = StopChecker::new(vec!["bc".into(), "abcd".into(), "ab".into()], false);
        let (_, m, _) = run(&c, &["xabcd"]);
        assert_eq!(m.unwrap(), StopMatch { stop: "abcd".into(), truncate_at: 1 });
        let (_, m, _) = run(&c, &["xabc"]);
        assert_eq!(m.unwrap(), StopMatch { stop: "ab".into(), truncate_at: 1 });
    }

    #[test]
    fn holds_back_possible_stop_prefixes() {
        let c = StopChecker::new(vec!["</s>".into()], false);
        assert_eq!(run(&c, &["abc</"]).2, 3);
        assert_eq!(run(&c, &["abc", "<"]).2, 3);
        assert_eq!(run(&c, &["abc"]).2, 3);
        assert_eq!(run(&c, &["a</x"]).2, 4);
        // Unscanned text is taken into account too.
        assert_eq!(c.streamable_len(&StopScan::default(), "ab</"), 2);
    }

    #[test]
    fn multibyte_text_is_cut_on_char_boundaries() {
        let c = StopChecker::new(vec!["世界".into()], false);
        let (text, m, _) = run(&c, &["你好", "世界"]);
        assert_eq!(&text[..m.unwrap().truncate_at], "你好");
        assert_eq!(run(&c, &["你好世"]).2, "你好".len());
    }

    #[test]
    fn no_stop_strings_stream_everything() {
        let c = StopChecker::new(vec![String::new()], false);
        assert!(c.is_empty());
        assert_eq!(run(&c, &["abc", "def"]), ("abcdef".into(), None, 6));
    }

    /// Text and stop strings over a small alphabet (multi-byte characters
    /// included), so that matches and near-matches are frequent.
    fn small_text(max_chars: usize) -> impl Strategy<Value = String> {
        proptest::collection::vec(
            prop_oneof![Just('a'), Just('b'), Just('c'), Just('é'), Just('世')],
            0..max_chars,
        )
        .prop_map(|chars| chars.into_iter().collect())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        /// The automaton agrees with the plain search at every delta: the
        /// same match (stop string and cut), or the same streamable length.
        #[test]
        fn automaton_matches_the_naive_checker(
            stops in proptest::collection::vec(small_text(5), 0..6),
            deltas in proptest::collection::vec(small_text(4), 1..12),
            include in any::<bool>(),
        ) {
            let naive = NaiveStops::new(stops.clone(), include);
            let fast = StopChecker::new(stops, include);
            let mut scan = StopScan::default();
            let mut text = String::new();
            for delta in &deltas {
                text.push_str(delta);
                let want = naive.check(&text, delta.len());
                let got = fast.check(&mut scan, &text);
                prop_assert_eq!(&got, &want, "text {:?}", text);
                if got.is_some() {
                    break;
                }
                prop_assert_eq!(fast.streamable_len(&scan, &text), naive.streamable_len(&text), "text {:?}", text);
            }
        }
    }
}
