//! Seeded uniform values made where the tensor lives ([`Backend::fill_uniform`]):
//! random weights for shapes no file holds (`--load-format dummy`).
//!
//! The value of a counter is a pure function of it, so a backend may compute
//! the elements in any order, on any number of threads, and every backend
//! gets the same bits: element counter `i` under key `k` is the `i`-th draw
//! (from 0) of a SplitMix64 generator seeded with `k` (Steele, Lea and Flood),
//! `bits = mix(k + (i + 1)·γ)`; its top 24 bits make `u = (bits >> 40) / 2^24`,
//! exactly representable in f32, in `[0, 1)`; the value is
//! `low + width · u` with `width = high - low`, each operation rounded once
//! in f32 (no fused multiply-add), then rounded to the tensor's dtype
//! (nearest even).
//!
//! ```
//! use pagoda_backend::{splitmix64_draw, UniformFill};
//! // The first draws of SplitMix64 seeded with 0.
//! assert_eq!(splitmix64_draw(0, 0), 0xE220_A839_7B1D_CDAF);
//! let fill = UniformFill::new(7, -1.0, 1.0);
//! let v = fill.value(3);
//! assert!((-1.0..1.0).contains(&v));
//! assert_eq!(v, fill.value(3), "a pure function of the counter");
//! ```

use crate::{Backend, BackendError, HostSlice, Result, Tensor};

/// SplitMix64's increment: the golden ratio as a 64-bit fraction.
const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// 2^-24: `u` from the top 24 bits of a draw.
const U24: f32 = 1.0 / (1u32 << 24) as f32;

/// Elements a host-side fill computes and writes at once (4 MiB of f32).
const HOST_CHUNK: usize = 1 << 20;

/// Draw `counter` (from 0) of a SplitMix64 generator seeded with `key`.
pub fn splitmix64_draw(key: u64, counter: u64) -> u64 {
    let mut z = key.wrapping_add(counter.wrapping_add(1).wrapping_mul(GAMMA));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// What [`Backend::fill_uniform`] writes: element `(r, c)` of the destination,
/// seen as `[rows, cols]` with `cols` its last dimension (a vector is one
/// row), gets the value of counter `first + r·row_stride + c`.
///
/// With `first = 0` and `row_stride = cols` the counter is the element's
/// row-major index. A part of a larger tensor `[R, C]` gets the values that
/// tensor would hold there: rows `a..b` with `first = a·C`, `row_stride = C`;
/// columns `a..b` of every row with `first = a`, `row_stride = C`. So a
/// tensor-parallel rank fills its shard alone and holds exactly the elements
/// of the whole tensor it would have cut out.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct UniformFill {
    /// The generator's seed: one per tensor.
    pub key: u64,
    /// Values lie in `[low, high)` (before rounding to the tensor's dtype).
    pub low: f32,
    pub high: f32,
    /// The counter of element `(0, 0)`.
    pub first: u64,
    /// Counters from one row to the next (at least the row's length).
    pub row_stride: u64,
}

impl UniformFill {
    /// Row-major counters from 0 over a whole tensor, values in `[low, high)`.
    pub fn new(key: u64, low: f32, high: f32) -> Self {
        Self { key, low, high, first: 0, row_stride: 0 }
    }

    /// The same values, for the part of a `[rows, full_cols]` tensor whose
    /// top-left element is `(row, col)` (see the type's docs).
    pub fn at(self, row: usize, col: usize, full_cols: usize) -> Self {
        let (row, col, full_cols) = (row as u64, col as u64, full_cols as u64);
        Self { first: row.wrapping_mul(full_cols).wrapping_add(col), row_stride: full_cols, ..self }
    }

    /// `high - low`, rounded to f32: what `u` is scaled by.
    pub fn width(&self) -> f32 {
        self.high - self.low
    }

    /// The value of `counter`, in f32 (before rounding to a tensor's dtype).
    pub fn value(&self, counter: u64) -> f32 {
        let u = (splitmix64_draw(self.key, counter) >> 40) as f32 * U24;
        self.low + self.width() * u
    }

    /// Checks `dst` (a float tensor: F32, F16 or BF16) and the parameters
    /// (`low <= high`, both finite; counters that fit in 64 bits) and returns
    /// the destination as `(rows, cols, row_stride)`: `cols` its last
    /// dimension, `row_stride` resolved (0 means `cols`). Every backend calls
    /// this first.
    pub fn check<B: Backend>(&self, dst: &Tensor<B>) -> Result<(usize, usize, u64)> {
        const OP: &str = "fill_uniform";
        if !dst.dtype().is_float() {
            return Err(BackendError::DType { op: OP, dtype: dst.dtype() });
        }
        if !(self.low.is_finite()
            && self.high.is_finite()
            && self.low <= self.high
            && self.width().is_finite())
        {
            return Err(BackendError::shape(
                OP,
                format!("the range [{}, {}) is not a finite interval", self.low, self.high),
            ));
        }
        let cols = dst.dims().last().copied().unwrap_or(1);
        let rows = dst.numel().checked_div(cols).unwrap_or(0);
        let row_stride = if self.row_stride == 0 { cols as u64 } else { self.row_stride };
        if row_stride < cols as u64 {
            return Err(BackendError::shape(OP, format!("a row stride of {row_stride} for rows of {cols}")));
        }
        let last = (rows.max(1) as u64 - 1)
            .checked_mul(row_stride)
            .and_then(|x| x.checked_add(cols as u64))
            .and_then(|x| x.checked_add(self.first));
        if last.is_none() {
            return Err(BackendError::shape(OP, "the counters overflow 64 bits"));
        }
        Ok((rows, cols, row_stride))
    }

    /// The f32 values of rows `rows` of a destination of `cols` columns
    /// (`row_stride` resolved, as [`UniformFill::check`] returns it):
    /// the reference every backend's fill must equal after rounding.
    /// Large ranges are split over the host's threads (the values are a pure
    /// function of the counter, so the split changes nothing).
    pub fn host_values(&self, rows: std::ops::Range<usize>, cols: usize, row_stride: u64) -> Vec<f32> {
        let mut out = vec![0f32; rows.len() * cols];
        let fill = |first_row: usize, out: &mut [f32]| {
            for (i, row) in out.chunks_mut(cols.max(1)).enumerate() {
                let base = self.first + (first_row + i) as u64 * row_stride;
                for (c, v) in row.iter_mut().enumerate() {
                    *v = self.value(base + c as u64);
                }
            }
        };
        // Below ~1M values a thread costs more than it saves.
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(out.len() >> 20).max(1);
        if threads == 1 || cols == 0 {
            fill(rows.start, &mut out);
            return out;
        }
        let rows_per = rows.len().div_ceil(threads);
        std::thread::scope(|scope| {
            for (i, chunk) in out.chunks_mut(rows_per * cols).enumerate() {
                let fill = &fill;
                scope.spawn(move || fill(rows.start + i * rows_per, chunk));
            }
        });
        out
    }
}

/// [`Backend::fill_uniform`] computed on the host and written in chunks of
/// whole rows: the default for a backend without a kernel of its own (the
/// CPU reference, whose "device" memory is the host's).
pub(crate) fn fill_uniform_on_host<B: Backend>(
    backend: &B,
    dst: &Tensor<B>,
    fill: &UniformFill,
) -> Result<()> {
    let (rows, cols, row_stride) = fill.check(dst)?;
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    let flat = dst.reshape(&[rows, cols])?;
    let chunk_rows = (HOST_CHUNK / cols).max(1);
    let mut start = 0;
    while start < rows {
        let n = chunk_rows.min(rows - start);
        let values = fill.host_values(start..start + n, cols, row_stride);
        backend.write(&flat.narrow(start, n)?, HostSlice::F32(&values))?;
        start += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SplitMix64 as a stateful generator, the way it is usually written.
    struct SplitMix64(u64);

    impl SplitMix64 {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(GAMMA);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
    }

    #[test]
    fn draws_are_splitmix64s_outputs_in_order() {
        for key in [0u64, 1, 0xDEAD_BEEF, u64::MAX] {
            let mut g = SplitMix64(key);
            for i in 0..100 {
                assert_eq!(splitmix64_draw(key, i), g.next(), "key {key}, draw {i}");
            }
        }
        // The published first outputs of SplitMix64 seeded with 0.
        assert_eq!(splitmix64_draw(0, 0), 0xE220_A839_7B1D_CDAF);
        assert_eq!(splitmix64_draw(0, 1), 0x6E78_9E6A_A1B9_65F4);
    }

    #[test]
    fn values_cover_the_range_uniformly() {
        let fill = UniformFill::new(42, -0.5, 1.5);
        let n = 200_000u64;
        let values: Vec<f32> = (0..n).map(|i| fill.value(i)).collect();
        assert!(values.iter().all(|v| (-0.5..1.5).contains(v)));
        let mean = values.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
        let var = values.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n as f64;
        // U(-0.5, 1.5): mean 0.5, variance 4/12; the mean's standard error is 1.3e-3.
        assert!((mean - 0.5).abs() < 0.01, "mean {mean}");
        assert!((var - 1.0 / 3.0).abs() < 0.01, "variance {var}");
        // Eight bins hold an eighth each.
        let mut bins = [0usize; 8];
        values.iter().for_each(|&v| bins[((v + 0.5) * 4.0) as usize] += 1);
        assert!(bins.iter().all(|&b| (b as f64 / n as f64 - 0.125).abs() < 0.005), "{bins:?}");
    }

    #[test]
    fn large_ranges_split_over_threads_give_the_same_values() {
        let fill = UniformFill::new(3, -1.0, 1.0);
        let (rows, cols) = (2100usize, 1024usize); // over 2^21 values: two threads or more
        let all = fill.host_values(5..5 + rows, cols, 2048);
        for r in [0, 1049, 1050, rows - 1] {
            let base = 5 * 2048 + r as u64 * 2048;
            let want: Vec<f32> = (0..cols as u64).map(|c| fill.value(base + c)).collect();
            assert_eq!(all[r * cols..(r + 1) * cols], want[..], "row {r}");
        }
    }

    #[test]
    fn a_part_gets_the_whole_tensors_values() {
        let (rows, cols) = (5usize, 7usize);
        let whole = UniformFill::new(9, -1.0, 1.0);
        let all = whole.host_values(0..rows, cols, cols as u64);
        // Rows 2..4, and columns 3..6 of every row.
        let part = whole.at(2, 0, cols);
        assert_eq!(part.host_values(0..2, cols, part.row_stride), all[2 * cols..4 * cols]);
        let part = whole.at(0, 3, cols);
        let got = part.host_values(0..rows, 3, part.row_stride);
        let want: Vec<f32> = (0..rows).flat_map(|r| all[r * cols + 3..r * cols + 6].to_vec()).collect();
        assert_eq!(got, want);
    }
}
