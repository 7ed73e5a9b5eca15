//! The result of a conformance run: one row per (op, case).

use std::fmt;

use pagoda_backend::DType;

/// One comparison of a device output against the reference.
#[derive(Clone, Debug, PartialEq)]
pub struct CheckResult {
    /// The op, with the output compared when an op has several
    /// (e.g. `rotary_and_cache/k_cache`).
    pub op: String,
    pub case: String,
    /// `||device - reference|| / ||reference||` over the whole output (f64);
    /// for token checks, the fraction of rows that differ without excuse.
    pub rel_err: f64,
    /// The same ratio for the worst row (a row is one token's hidden vector,
    /// one head of one token, or one cache slot of one head).
    pub max_row_err: f64,
    pub tolerance: f64,
    pub passed: bool,
    /// Why it failed, or what was excused.
    pub note: String,
}

/// All rows of a run, in the order they ran.
#[derive(Clone, Debug)]
pub struct ConformanceReport {
    pub device: String,
    pub activation_dtype: DType,
    pub grid: String,
    pub checks: Vec<CheckResult>,
}

impl ConformanceReport {
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.passed)
    }

    pub fn failures(&self) -> impl Iterator<Item = &CheckResult> {
        self.checks.iter().filter(|c| !c.passed)
    }

    /// The largest `rel_err` among the checks of `op` (prefix match, so
    /// `"rotary_and_cache"` covers its q_out and cache rows).
    pub fn max_rel_err(&self, op: &str) -> Option<f64> {
        self.checks.iter().filter(|c| c.op.starts_with(op)).map(|c| c.rel_err).reduce(f64::max)
    }

    /// Panics with the failing rows (and a summary) unless every check passed.
    pub fn assert_all_passed(&self) {
        if self.passed() {
            return;
        }
        let failed: Vec<&CheckResult> = self.failures().collect();
        let mut table = String::new();
        write_rows(&mut table, failed.iter().copied()).ok();
        panic!(
            "{} of {} conformance checks failed on {} ({:?}, grid {}):\n{table}",
            failed.len(),
            self.checks.len(),
            self.device,
            self.activation_dtype,
            self.grid
        );
    }
}

fn fmt_err(x: f64) -> String {
    if x.is_nan() {
        "NaN".into()
    } else if x == 0.0 {
        "0".into()
    } else {
        format!("{x:.2e}")
    }
}

fn write_rows<'a>(f: &mut impl fmt::Write, rows: impl Iterator<Item = &'a CheckResult>) -> fmt::Result {
    let rows: Vec<&CheckResult> = rows.collect();
    let op_w = rows.iter().map(|r| r.op.len()).max().unwrap_or(2).max(2);
    let case_w = rows.iter().map(|r| r.case.len()).max().unwrap_or(4).max(4);
    writeln!(
        f,
        "{:<op_w$}  {:<case_w$}  {:>9}  {:>9}  {:>8}  result",
        "op", "case", "rel err", "worst row", "tol"
    )?;
    for r in rows {
        write!(
            f,
            "{:<op_w$}  {:<case_w$}  {:>9}  {:>9}  {:>8}  {}",
            r.op,
            r.case,
            fmt_err(r.rel_err),
            fmt_err(r.max_row_err),
            fmt_err(r.tolerance),
            if r.passed { "ok" } else { "FAIL" }
        )?;
        if !r.note.is_empty() {
            write!(f, "  ({})", r.note)?;
        }
        writeln!(f)?;
    }
    Ok(())
}

impl fmt::Display for ConformanceReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "conformance of {} ({:?}) against cpu-ref, grid {}: {} checks, {} failed",
            self.device,
            self.activation_dtype,
            self.grid,
            self.checks.len(),
            self.failures().count()
        )?;
        write_rows(f, self.checks.iter())
    }
}
