//! The E4M3 codec now lives in [`pagoda_backend::fp8`] (every backend and
//! the model code use it); re-exported here so the reference's paths keep
//! working.

pub use pagoda_backend::fp8::*;
