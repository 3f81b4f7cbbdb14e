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
    /// Cache directory: the default model (DIR/models, fetched on first use) and `flora
    /// serve`'s default adapters directory (DIR/adapters). Default: $FLORA_CACHE_DIR, else
    /// ~/.cache/flora
    #[arg(long, global = true, value_name = "DIR")]
    cache_dir: Option<std::path::PathBuf>,
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

/// glibc serves allocations over 128 KiB with fresh mmap'd pages and trims the heap eagerly,
/// so every model step paid page faults and page zeroing for its row buffers (a few percent
/// of a decode step). Keep such buffers in the heap and the heap's memory mapped. One arena:
/// with a heap per thread, memory freed on one thread (the old adapter tables, a step's
/// buffers) was not reused by the next allocation on another and came back as fresh pages
/// (a repack of 32 LoRA r8 adapters took 300-600 ms, 100-130 ms with one arena).
fn keep_large_allocations_mapped() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called first thing, before other threads.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

fn main() -> anyhow::Result<()> {
    keep_large_allocations_mapped();
    let cli = Cli::parse();
    if let Some(dir) = &cli.cache_dir {
        // The library reads the cache from this variable; set before any thread starts.
        std::env::set_var("FLORA_CACHE_DIR", dir);
    }
    match cli.command {
        Command::Bench { what } => bench::run(what),
        Command::Generate(args) => generate::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Tokenize(args) => tokenize::run(args),
        Command::Train(args) => train::run(args),
    }
}
