//! Scheduling policies: the order in which requests are served and preempted.

use std::fmt;

use crate::RequestId;

/// A request's place in line: smaller keys are admitted first, decoded first
/// and preempted last. Ties are broken by sequence id (creation order).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RankKey(pub i64, pub u64);

/// What a policy may look at when it ranks a request.
#[derive(Clone, Copy, Debug)]
pub struct RequestView {
    pub request_id: RequestId,
    pub priority: i32,
    pub arrival: f64,
    /// 0 for the first request ever added, then 1, 2... (arrival order).
    pub arrival_index: u64,
    pub num_prompt_tokens: usize,
    pub max_tokens: usize,
    pub n: usize,
}

/// A pluggable scheduling policy. The rank is computed once, when the request
/// arrives, and every sequence of the request keeps it, including after a
/// preemption: a preempted request therefore resumes ahead of any request
/// ranked after it, which is what rules out starvation under FCFS.
pub trait SchedulingPolicy: Send + Sync + fmt::Debug {
    fn name(&self) -> &str;

    fn rank(&self, request: &RequestView) -> RankKey;
}

/// First come, first served.
#[derive(Clone, Copy, Debug, Default)]
pub struct Fcfs;

impl SchedulingPolicy for Fcfs {
    fn name(&self) -> &str {
        "fcfs"
    }

    fn rank(&self, request: &RequestView) -> RankKey {
        RankKey(0, request.arrival_index)
    }
}

/// Lowest `priority` value first, then first come, first served (vLLM's
/// convention).
#[derive(Clone, Copy, Debug, Default)]
pub struct Priority;

impl SchedulingPolicy for Priority {
    fn name(&self) -> &str {
        "priority"
    }

    fn rank(&self, request: &RequestView) -> RankKey {
        RankKey(i64::from(request.priority), request.arrival_index)
    }
}

/// The built-in policies, by name (for configuration files and the CLI).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Policy {
    #[default]
    Fcfs,
    Priority,
}

impl Policy {
    pub fn build(self) -> Box<dyn SchedulingPolicy> {
        match self {
            Policy::Fcfs => Box::new(Fcfs),
            Policy::Priority => Box::new(Priority),
        }
    }
}
