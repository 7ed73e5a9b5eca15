use thiserror::Error;

use pagoda_backend::BackendError;
use pagoda_models::ModelError;
use pagoda_scheduler::{SchedulerError, UpdateError};

/// What the engine can fail with. `InvalidRequest` is the client's fault
/// (HTTP 400); the rest are the engine's.
#[derive(Debug, Error)]
pub enum EngineError {
    /// The request cannot be served as given; the message says why.
    #[error("{message}")]
    InvalidRequest { param: Option<&'static str>, message: String },
    /// A request with this id is already live.
    #[error("request id {0} is already in use")]
    DuplicateRequest(String),
    #[error("invalid engine configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error(transparent)]
    Scheduler(#[from] SchedulerError),
    #[error(transparent)]
    Update(#[from] UpdateError),
    /// A LoRA adapter could not be read or does not fit the model (the
    /// message names the adapter and why).
    #[error("LoRA: {0}")]
    Lora(String),
    /// A broken invariant between engine parts (a bug).
    #[error("internal engine error: {0}")]
    Internal(String),
}

impl EngineError {
    pub fn invalid(param: Option<&'static str>, message: impl Into<String>) -> Self {
        Self::InvalidRequest { param, message: message.into() }
    }
}
