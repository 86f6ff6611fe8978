//! `hir`: the hindsight command line.
#![forbid(unsafe_code)]

mod migrate;
mod tasks;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

/// Hindsight Instruction Relabeling: align language models with their own mistakes.
#[derive(Debug, Parser)]
#[command(name = "hir", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Inspect BIG-bench tasks: list them, show splits and prompts.
    #[command(subcommand)]
    Tasks(tasks::TasksCommand),
    /// Score an output for a task example under the paper's exact match and answer extraction.
    Score(tasks::ScoreArgs),
    /// Apply the relabel store's migrations to DATABASE_URL.
    Migrate(migrate::MigrateArgs),
}

/// Where the BIG-bench tasks are.
#[derive(Debug, Clone, Args)]
pub struct BigBench {
    /// A `benchmark_tasks/`-style folder (or a BIG-bench checkout).
    #[arg(
        long = "bigbench",
        env = "HIR_BIGBENCH",
        default_value = "data/bigbench",
        value_name = "DIR"
    )]
    pub dir: PathBuf,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Tasks(cmd) => tasks::run(cmd),
        Command::Score(args) => tasks::score(args),
        Command::Migrate(args) => migrate::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            for cause in err.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}
