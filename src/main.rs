//! `pagoda`: the command line of the Pagoda inference engine.
//!
//! - `pagoda generate --model PATH [--chat] PROMPT...` runs prompts offline
//!   as one continuous batch and prints the completions.
//! - `pagoda serve --model PATH` serves the OpenAI-compatible HTTP API.
//! - `pagoda bench {throughput,latency,serve}` measures the engine.
//! - `pagoda sim` compares KV allocators on a request trace (`--html FILE`
//!   also writes their KV page maps as an animation).

mod backends;
mod bench;
mod engine_args;
mod generate;
mod serve;
mod sim_html;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    env!("PAGODA_GIT_REV"),
    "; backends: ",
    env!("PAGODA_BACKENDS"),
    ")"
);

#[derive(Parser, Debug)]
#[command(name = "pagoda", version = VERSION, about = "A PagedAttention LLM inference and serving engine")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Generate completions for prompts, offline, as one continuous batch.
    Generate(generate::GenerateArgs),
    /// Serve the OpenAI-compatible HTTP API.
    Serve(serve::ServeArgs),
    /// Benchmarks: offline throughput, single-stream latency, or a running server.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Compare KV-cache allocators (paged vs max-length reservation) on a request trace.
    Sim(sim_html::SimCommandArgs),
}

/// The command line: `Cli`'s, where `pagoda serve` takes the model either
/// as its first argument or as --model (one of them).
fn cli_command() -> clap::Command {
    Cli::command().mut_subcommand("serve", |serve| {
        serve
            .mut_arg("model", |a| a.required(false))
            .mut_arg("model_tag", |a| a.required_unless_present("model"))
    })
}

/// When the process started (cold-start figures are measured from here).
pub static PROCESS_START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();

fn main() -> std::process::ExitCode {
    PROCESS_START.get_or_init(std::time::Instant::now);
    let argv = engine_args::expand_vllm_short_flags(std::env::args_os());
    let cli = Cli::from_arg_matches(&cli_command().get_matches_from(argv)).unwrap_or_else(|e| e.exit());
    let result = match cli.command {
        Command::Generate(args) => generate::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Bench(cmd) => bench::run(cmd),
        Command::Sim(args) => sim_html::run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn every_command_is_well_formed() {
        // Clap's own checks: among them, no two arguments of a command share a flag.
        cli_command().debug_assert();
    }

    fn parse(argv: &[&str]) -> Result<Cli, clap::Error> {
        cli_command().try_get_matches_from(argv).and_then(|m| Cli::from_arg_matches(&m))
    }

    #[test]
    fn serve_takes_the_model_as_its_argument_or_as_an_option() {
        for argv in [&["pagoda", "serve", "models/m"][..], &["pagoda", "serve", "--model", "models/m"]] {
            let Command::Serve(args) = parse(argv).unwrap().command else { panic!("not serve") };
            let model = args.model_tag.or(args.engine.model).unwrap();
            assert_eq!(model, std::path::PathBuf::from("models/m"), "{argv:?}");
        }
        if std::env::var_os("PAGODA_MODEL").is_none() {
            assert!(parse(&["pagoda", "serve"]).is_err());
            assert!(parse(&["pagoda", "generate", "hi"]).is_err(), "generate still requires --model");
        }
        assert!(parse(&["pagoda", "serve", "a", "--model", "b"]).is_err());
    }

    #[test]
    fn generate_help_lists_one_documented_seed() {
        let mut cli = Cli::command();
        let help = cli.find_subcommand_mut("generate").expect("generate").render_long_help().to_string();
        let seed_lines: Vec<&str> = help.lines().filter(|l| l.trim_start().starts_with("--seed")).collect();
        assert_eq!(seed_lines.len(), 1, "{help}");
        let documented = help.split("--seed").nth(1).expect("a --seed entry");
        assert!(documented.contains("Seed"), "--seed has no description: {help}");
    }
}
