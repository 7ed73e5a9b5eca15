//! `pagoda serve`: the OpenAI-compatible HTTP server.

use std::sync::Arc;
use std::time::Instant;

use clap::Args;
use pagoda_backend::Backend;
use pagoda_engine::AsyncEngine;
use pagoda_server::{init_tracing, serve, shutdown_signal, ServerArgs};

use crate::backends::{dispatch, BackendJob, EngineDevices};
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
    check_lora_flags(&args)?;
    dispatch(args.engine.device, Serve(args))
}

/// The LoRA flags that only make sense together, checked before the model loads.
fn check_lora_flags(args: &ServeArgs) -> anyhow::Result<()> {
    if !args.server.lora_modules.is_empty() && !args.engine.enable_lora {
        anyhow::bail!("--lora-modules needs --enable-lora (the engine serves adapters only with it)");
    }
    if args.server.allow_runtime_lora_updating && !args.engine.enable_lora {
        tracing::warn!("runtime LoRA updating is allowed, but without --enable-lora every load is refused");
    }
    Ok(())
}

struct Serve(ServeArgs);

impl BackendJob for Serve {
    type Output = ();

    fn run<B: Backend>(self, devices: EngineDevices<B>) -> anyhow::Result<()> {
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
            move || devices.load_engine(&model, config, |_, _| {}),
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

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }

    fn check(args: &[&str]) -> anyhow::Result<()> {
        let argv = ["pagoda", "--model", "m"].into_iter().chain(args.iter().copied());
        check_lora_flags(&Cli::try_parse_from(argv)?.serve)
    }

    #[test]
    fn lora_modules_need_enable_lora() {
        let e = check(&["--lora-modules", "sql=/adapters/sql"]).expect_err("refused");
        assert!(e.to_string().contains("--lora-modules needs --enable-lora"), "{e}");
        check(&["--enable-lora", "--lora-modules", "sql=/adapters/sql"]).unwrap();
        check(&["--enable-lora"]).unwrap();
        check(&[]).unwrap();
    }
}
