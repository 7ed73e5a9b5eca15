use pagoda_backend::BackendError;
use thiserror::Error;

/// What can go wrong on the CUDA side.
#[derive(Debug, Error)]
pub enum CudaError {
    /// A driver call (through cust) failed.
    #[error("CUDA driver call {call} failed: {source}")]
    Driver { call: &'static str, source: cust::error::CudaError },
    /// A raw driver call failed with this `CUresult`.
    #[error("CUDA driver call {call} failed with CUresult {code}")]
    DriverCode { call: &'static str, code: i32 },
    /// A kernel launcher refused its arguments or CUDA refused the launch.
    #[error("{launcher} failed with code {code}: {message}")]
    Kernel { launcher: &'static str, code: i32, message: String },
    /// The device has no memory left for this allocation.
    #[error("out of device memory allocating {bytes} bytes")]
    OutOfMemory { bytes: u64 },
    /// A thread panicked while holding this lock; what it guards may be half updated.
    #[error("the {0} lock was poisoned by a panic")]
    Poisoned(&'static str),
    /// A `PAGODA_*` kernel switch in the environment has a value the backend does not understand.
    #[error(transparent)]
    KernelEnv(#[from] crate::policy::KernelEnvError),
}

impl From<CudaError> for BackendError {
    fn from(e: CudaError) -> Self {
        match e {
            CudaError::OutOfMemory { bytes } => BackendError::OutOfMemory { bytes },
            other => BackendError::Device(other.to_string()),
        }
    }
}

/// Adds the name of the driver call to a cust result.
pub(crate) trait DriverContext<T> {
    fn during(self, call: &'static str) -> Result<T, CudaError>;
}

impl<T> DriverContext<T> for cust::error::CudaResult<T> {
    fn during(self, call: &'static str) -> Result<T, CudaError> {
        self.map_err(|source| CudaError::Driver { call, source })
    }
}

/// Checks a raw driver result.
pub(crate) fn driver(call: &'static str, r: cust::sys::CUresult) -> Result<(), CudaError> {
    match r {
        cust::sys::cudaError_enum::CUDA_SUCCESS => Ok(()),
        cust::sys::cudaError_enum::CUDA_ERROR_OUT_OF_MEMORY => Err(CudaError::OutOfMemory { bytes: 0 }),
        other => Err(CudaError::DriverCode { call, code: other as i32 }),
    }
}
