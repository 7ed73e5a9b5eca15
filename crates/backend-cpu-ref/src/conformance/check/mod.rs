//! The checks, one file per family of ops. Each `run` adds its rows to the harness.

pub(super) mod attention;
pub(super) mod blocks;
pub(super) mod errors;
pub(super) mod fp8_linear;
pub(super) mod linear;
pub(super) mod lora;
pub(super) mod memory;
pub(super) mod rotary;
pub(super) mod rows;
pub(super) mod sample;

/// Elements that differ (NaN never equals anything).
pub(super) fn mismatches(want: &[f32], got: &[f32]) -> usize {
    want.iter().zip(got).filter(|(a, b)| a != b).count() + want.len().abs_diff(got.len())
}
