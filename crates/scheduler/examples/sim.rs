//! Replays a request trace through the scheduler over several KV allocators
//! and prints their memory use side by side:
//!
//! ```text
//! cargo run --release -p pagoda-scheduler --example sim -- --help
//! cargo run --release -p pagoda-scheduler --example sim -- --requests 1000 --rate 4 --csv sim.csv
//! ```

use clap::Parser;
use pagoda_scheduler::sim::{run_cli, SimArgs};

#[derive(Parser)]
#[command(about = "Simulate paged vs. contiguous KV allocation on a request trace")]
struct Cli {
    #[command(flatten)]
    sim: SimArgs,
}

fn main() {
    let cli = Cli::parse();
    match run_cli(&cli.sim) {
        Ok(text) => print!("{text}"),
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
}
