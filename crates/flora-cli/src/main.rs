//! `flora`: train and serve many low-rank adapters over one foundation model.

mod bench;
mod generate;
mod load;
mod serve;
mod tokenize;
mod train;

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
    /// Stream a completion of a prompt (optionally with an adapter) to stdout.
    Generate(generate::GenerateArgs),
    /// Serve the base model and its adapters over an OpenAI-compatible HTTP API.
    Serve(serve::ServeArgs),
    /// Print the token ids of a text as a JSON array.
    Tokenize(tokenize::TokenizeArgs),
    /// Train many fLoRA / LoRA / IA3 adapters at once, one per adapter name in the data.
    Train(train::TrainArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Bench { what } => bench::run(what),
        Command::Generate(args) => generate::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Tokenize(args) => tokenize::run(args),
        Command::Train(args) => train::run(args),
    }
}
