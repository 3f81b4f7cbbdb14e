//! `flora`: train and serve many low-rank adapters over one foundation model.

mod bench;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "flora", version, about = "Batched fLoRA / LoRA / IA3 adapters over one foundation model", long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Benchmarks that reproduce the paper's cost analysis on this machine.
    Bench {
        #[command(subcommand)]
        what: bench::BenchCommand,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Bench { what } => bench::run(what),
    }
}
