//! The C launchers of `csrc/pagoda_kernels.h`, as bindgen declares them, and the
//! check that turns their return codes into errors.
#![allow(non_upper_case_globals, non_camel_case_types, non_snake_case, dead_code, clippy::all)]

include!(concat!(env!("OUT_DIR"), "/pagoda_kernels.rs"));

use crate::CudaError;

/// Maps a launcher's return code (0, a `cudaError_t`, or a `PAGODA_ERR_*`) to a result.
pub(crate) fn check(launcher: &'static str, code: i32) -> Result<(), CudaError> {
    if code == 0 {
        return Ok(());
    }
    // SAFETY: pagoda_error_string returns a pointer to a static NUL-terminated string.
    let message =
        unsafe { std::ffi::CStr::from_ptr(pagoda_error_string(code)) }.to_string_lossy().into_owned();
    Err(CudaError::Kernel { launcher, code, message })
}
