//! NCCL's C API as bindgen declares it from nccl.h (see build.rs), loaded from libnccl.so.2 at
//! run time rather than linked, and the C shim that fills in a communicator's options.
#![allow(non_upper_case_globals, non_camel_case_types, non_snake_case, dead_code, clippy::all)]

include!(concat!(env!("OUT_DIR"), "/nccl.rs"));

extern "C" {
    /// `NCCL_CONFIG_INITIALIZER` with `blocking = 0` (src/nccl/config.c).
    pub fn pagoda_nccl_config_nonblocking(config: *mut ncclConfig_t);
}
