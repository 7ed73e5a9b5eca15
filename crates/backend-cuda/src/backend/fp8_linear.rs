//! `fp8_linear` on the device (`csrc/fp8_linear.cu`): the FP8 GEMV for the
//! weight-only mode, the activation quantization and the cuBLASLt FP8 GEMM
//! for the quantized mode. Which mode a number of rows prefers is
//! [`fp8_linear_mode`]; both modes run for any row count (the GEMV 16 rows a
//! launch), so the conformance suite checks both everywhere.

use std::ffi::c_void;

use pagoda_backend::{
    check_fp8_quantize_rows, fp8_quantize_rows_on_host, BackendError, DType, Fp8InputScale, Fp8LinearArgs,
    Fp8LinearMode, Result, Tensor,
};

use super::{check, dptr, dtype_code, ffi, scratch_args, to_i32, vptr, CudaBackend};

/// Up to this many rows a product streams the FP8 weight (the GEMV is bound
/// by reading it); above, the activations are quantized for the FP8 tensor
/// cores. The CPU reference prefers the same (`CUDA_FP8_GEMV_MAX_TOKENS`).
pub(super) const FP8_GEMV_MAX_TOKENS: usize = 16;

pub(super) fn fp8_linear_mode(tokens: usize) -> Fp8LinearMode {
    if tokens <= FP8_GEMV_MAX_TOKENS {
        Fp8LinearMode::WeightOnly
    } else {
        Fp8LinearMode::QuantizedActivations
    }
}

impl CudaBackend {
    /// Per-row E4M3 quantization in a kernel (`pagoda_fp8_quantize_rows`);
    /// rows of 16-bit values whose length is a multiple of 8 (every Llama
    /// projection's), anything else through the host.
    pub(super) fn fp8_quantize_rows_layer(
        &self,
        x: &Tensor<Self>,
        codes: &Tensor<Self>,
        scales: &Tensor<Self>,
    ) -> Result<()> {
        const OP: &str = "fp8_quantize_rows";
        let (rows, cols) = check_fp8_quantize_rows(OP, x, codes, scales)?;
        let aligned = (dptr(x) % 16 == 0) && (dptr(codes) % 8 == 0);
        if !matches!(x.dtype(), DType::BF16 | DType::F16) || cols % 8 != 0 || !aligned {
            return fp8_quantize_rows_on_host(self, x, codes, scales);
        }
        self.bind()?;
        // SAFETY: shapes, dtypes and aliasing were checked; the pointers are
        // device ranges of rows x cols (codes, x) and rows (scales) elements.
        let rc = unsafe {
            ffi::pagoda_fp8_quantize_rows(
                vptr(x),
                dtype_code(x.dtype()),
                dptr(codes) as *mut u8,
                dptr(scales) as *mut f32,
                to_i32(OP, "rows", rows)?,
                to_i32(OP, "columns", cols)?,
                self.launch_policy(),
                self.stream(),
            )
        };
        Ok(check("pagoda_fp8_quantize_rows", rc)?)
    }

    pub(super) fn fp8_linear_layer(&self, a: &Fp8LinearArgs<'_, Self>) -> Result<()> {
        const OP: &str = "fp8_linear";
        let (t, k, n) = a.check(OP)?;
        if !matches!(a.x.dtype(), DType::BF16 | DType::F16) {
            return Err(BackendError::DType { op: OP, dtype: a.x.dtype() });
        }
        if k % 16 != 0 {
            return Err(BackendError::shape(
                OP,
                format!("in features {k} (the kernels take multiples of 16)"),
            ));
        }
        let mut args = ffi::PagodaFp8LinearArgs {
            x: vptr(a.x),
            weight: dptr(a.weight) as *const u8,
            weight_scale: dptr(a.weight_scale) as *const f32,
            bias: a.bias.map_or(std::ptr::null(), |b| vptr(b) as *const c_void),
            norm_weight: a.fusion.input_norm.map_or(std::ptr::null(), |(g, _)| vptr(g) as *const c_void),
            eps: a.fusion.input_norm.map_or(0.0, |(_, eps)| eps),
            out: vptr(a.out),
            scratch: std::ptr::null_mut(),
            scratch_bytes: 0,
            dtype: dtype_code(a.x.dtype()),
            t: to_i32(OP, "tokens", t)?,
            n: to_i32(OP, "out features", n)?,
            k: to_i32(OP, "in features", k)?,
            silu_mul: a.fusion.silu_mul as i32,
            accumulate: a.fusion.accumulate as i32,
            mode: match a.mode {
                Fp8LinearMode::WeightOnly => ffi::PAGODA_FP8_WEIGHT_ONLY as i32,
                Fp8LinearMode::QuantizedActivations => ffi::PAGODA_FP8_QUANTIZED as i32,
            },
            input_scale: match a.input_scale {
                Fp8InputScale::Dynamic => 0.0,
                Fp8InputScale::Static(s) => s,
            },
        };
        self.bind()?;
        // SAFETY: a pure size computation over the arguments.
        let bytes = unsafe { ffi::pagoda_fp8_linear_scratch_bytes(&args) };
        let scratch = self.optional_scratch(bytes)?;
        (args.scratch, args.scratch_bytes) = scratch_args(&scratch);
        let blas = self.blas.lock().map_err(|_| BackendError::Device("cuBLAS handle poisoned".into()))?;
        // SAFETY: shapes, dtypes and aliasing were checked (Fp8LinearArgs::check);
        // the handle is held under the mutex; the scratch is freed on the
        // stream after the work.
        let rc = unsafe { ffi::pagoda_fp8_linear(blas.0, &args, self.launch_policy(), self.stream()) };
        Ok(check("pagoda_fp8_linear", rc)?)
    }
}
