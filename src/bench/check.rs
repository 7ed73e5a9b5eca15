//! The self-check of a benchmark run: under `ignore_eos` every request must
//! finish with exactly its `max_tokens`, so the tokens produced are the sum of
//! `max_tokens`. A run that falls short (a request cut off by the length
//! limit, aborted, lost, or streamed without all its tokens) measured
//! something else, and the figure must not be reported.

use serde::Serialize;

/// What one request was asked for and what came back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestCompletion {
    pub id: String,
    pub max_tokens: usize,
    pub output_tokens: usize,
    pub finished: bool,
}

/// The result of the check, as the JSON output records it.
#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct CompletionCheck {
    pub requests: usize,
    pub finished_requests: usize,
    /// The sum of `max_tokens`.
    pub expected_output_tokens: usize,
    pub output_tokens: usize,
    /// Requests that finished with another number of tokens than their `max_tokens`.
    pub mismatched_requests: usize,
    pub passed: bool,
    /// Why it failed (empty when it passed).
    pub message: String,
}

/// How many failing requests the message names.
const NAMED: usize = 3;

impl CompletionCheck {
    pub fn of(requests: &[RequestCompletion]) -> Self {
        let finished = requests.iter().filter(|r| r.finished).count();
        let expected: usize = requests.iter().map(|r| r.max_tokens).sum();
        let produced: usize = requests.iter().map(|r| r.output_tokens).sum();
        let unfinished: Vec<&RequestCompletion> = requests.iter().filter(|r| !r.finished).collect();
        let mismatched: Vec<&RequestCompletion> =
            requests.iter().filter(|r| r.finished && r.output_tokens != r.max_tokens).collect();
        let passed = unfinished.is_empty() && mismatched.is_empty() && produced == expected;
        let mut message = String::new();
        if !passed {
            let name = |rs: &[&RequestCompletion]| {
                let mut s: Vec<String> = rs
                    .iter()
                    .take(NAMED)
                    .map(|r| format!("{} ({} of {} tokens)", r.id, r.output_tokens, r.max_tokens))
                    .collect();
                if rs.len() > NAMED {
                    s.push(format!("{} more", rs.len() - NAMED));
                }
                s.join(", ")
            };
            message = format!(
                "{produced} output tokens where the requests' max_tokens sum to {expected}; \
                 {finished} of {} requests finished",
                requests.len()
            );
            if !unfinished.is_empty() {
                message += &format!("; unfinished: {}", name(&unfinished));
            }
            if !mismatched.is_empty() {
                message += &format!("; finished with another length than max_tokens: {}", name(&mismatched));
            }
        }
        Self {
            requests: requests.len(),
            finished_requests: finished,
            expected_output_tokens: expected,
            output_tokens: produced,
            mismatched_requests: mismatched.len(),
            passed,
            message,
        }
    }

    /// An error that fails the command (after the figures and the JSON are written).
    pub fn ensure(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.passed,
            "self-check failed, the figures above are not a valid measurement: {} \
             (under ignore_eos every request must finish with exactly its max_tokens)",
            self.message
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(id: usize, max_tokens: usize, output_tokens: usize, finished: bool) -> RequestCompletion {
        RequestCompletion { id: format!("r{id}"), max_tokens, output_tokens, finished }
    }

    #[test]
    fn complete_runs_pass() {
        let check = CompletionCheck::of(&[req(0, 4, 4, true), req(1, 7, 7, true)]);
        assert!(check.passed && check.message.is_empty(), "{check:?}");
        assert_eq!((check.expected_output_tokens, check.output_tokens, check.finished_requests), (11, 11, 2));
        check.ensure().unwrap();
    }

    #[test]
    fn an_unfinished_request_fails_and_is_named() {
        let check = CompletionCheck::of(&[req(0, 4, 4, true), req(1, 7, 3, false)]);
        assert!(!check.passed);
        let err = check.ensure().unwrap_err().to_string();
        assert!(err.starts_with("self-check failed"), "{err}");
        assert!(err.contains("7 output tokens where the requests' max_tokens sum to 11"), "{err}");
        assert!(err.contains("1 of 2 requests finished; unfinished: r1 (3 of 7 tokens)"), "{err}");
    }

    #[test]
    fn a_request_cut_short_fails_even_when_the_sum_matches() {
        // One short by two, one over by two: the sum alone would pass.
        let rs: Vec<RequestCompletion> = (0..5).map(|i| req(i, 8, 8, true)).collect();
        let mut rs = rs;
        rs[1].output_tokens = 6;
        rs[3].output_tokens = 10;
        let check = CompletionCheck::of(&rs);
        assert_eq!((check.output_tokens, check.expected_output_tokens), (40, 40));
        assert!(!check.passed);
        assert_eq!(check.mismatched_requests, 2);
        assert!(check
            .message
            .contains("another length than max_tokens: r1 (6 of 8 tokens), r3 (10 of 8 tokens)"));
    }

    #[test]
    fn long_lists_are_cut_in_the_message() {
        let rs: Vec<RequestCompletion> = (0..6).map(|i| req(i, 8, 0, false)).collect();
        let check = CompletionCheck::of(&rs);
        assert!(check
            .message
            .ends_with("unfinished: r0 (0 of 8 tokens), r1 (0 of 8 tokens), r2 (0 of 8 tokens), 3 more"));
        let json = serde_json::to_value(&check).unwrap();
        assert_eq!(json["passed"], false);
        assert_eq!(json["expected_output_tokens"], 48);
    }
}
