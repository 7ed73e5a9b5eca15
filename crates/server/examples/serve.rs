//! A minimal `serve` on the CPU backend, for trying the API before (or
//! without) the `pagoda` CLI: `cargo run --release -p pagoda-server --example
//! serve -- --model models/smollm2-135m-instruct --port 8000`.

use std::sync::Arc;

use clap::Parser;
use pagoda_backend_cpu_ref::CpuBackend;
use pagoda_engine::{load_engine, AsyncEngine, EngineConfig, LoraConfig};
use pagoda_server::{init_tracing, serve, shutdown_signal, ServerArgs};

#[derive(Parser)]
struct Cli {
    /// Model folder or .gguf file.
    #[arg(long)]
    model: String,
    /// KV cache size on the CPU, in MiB.
    #[arg(long, default_value_t = 256)]
    kv_cache_mib: u64,
    #[arg(long)]
    max_model_len: Option<usize>,
    /// Serve LoRA adapters (--lora-modules), this many at once.
    #[arg(long)]
    max_loras: Option<usize>,
    #[command(flatten)]
    server: ServerArgs,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let cli = Cli::parse();
    init_tracing(cli.server.log_format);
    let engine_config = EngineConfig {
        kv_cache_memory_bytes: Some(cli.kv_cache_mib << 20),
        max_model_len: cli.max_model_len,
        lora: cli.max_loras.map(|max_loras| LoraConfig {
            max_loras,
            max_cpu_loras: max_loras,
            ..LoraConfig::default()
        }),
        ..EngineConfig::default()
    };
    let model = cli.model.clone();
    let engine = AsyncEngine::start(
        move || load_engine(CpuBackend::new(), &model, engine_config, |_, _| {}),
        cli.server.engine_options(),
    )?;
    let config = cli.server.to_config(&cli.model, env!("CARGO_PKG_VERSION"), "example");
    serve(config, Arc::new(engine), shutdown_signal()).await?;
    Ok(())
}
