//! `pagoda serve`: the OpenAI-compatible HTTP server.

use std::sync::Arc;
use std::time::Instant;

use clap::Args;
use pagoda_backend::Backend;
use pagoda_engine::{load_engine, AsyncEngine, EngineError};
use pagoda_server::{init_tracing, serve, shutdown_signal, ServerArgs};

use crate::backends::{dispatch, BackendJob};
use crate::engine_args::EngineArgs;

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// The model, as `vllm serve MODEL` takes it (or give --model).
    #[arg(value_name = "MODEL", conflicts_with = "model")]
    pub model_tag: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub engine: EngineArgs,
    #[command(flatten)]
    pub server: ServerArgs,
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    init_tracing(args.server.log_format);
    dispatch(args.engine.device, Serve(args))
}

struct Serve(ServeArgs);

impl BackendJob for Serve {
    type Output = ();

    fn run<B: Backend, F>(self, make_backend: F) -> anyhow::Result<()>
    where
        F: FnOnce() -> anyhow::Result<B> + Send + 'static,
    {
        let args = self.0;
        let config = args.engine.engine_config()?;
        let model = match &args.model_tag {
            Some(model) => model.clone(),
            None => args.engine.model_path()?.to_path_buf(),
        };
        let model_name = model.display().to_string();
        tracing::info!(model = %model_name, "loading the model");
        let started = Instant::now();
        // The engine (and its device context) lives on the engine thread.
        let engine = AsyncEngine::start(
            move || {
                let backend = make_backend().map_err(|e| EngineError::Config(format!("{e:#}")))?;
                load_engine(backend, &model, config, |_, _| {})
            },
            args.server.engine_options(),
        )?;
        tracing::info!(secs = started.elapsed().as_secs_f64(), "model loaded");
        let server_config =
            args.server.to_config(&model_name, env!("CARGO_PKG_VERSION"), env!("PAGODA_GIT_REV"));
        let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
        runtime.block_on(serve(server_config, Arc::new(engine), shutdown_signal()))?;
        Ok(())
    }
}
