//! `hir`: the hindsight command line.
#![forbid(unsafe_code)]

mod migrate;
mod model;
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
    /// Sample from a model locally (a HF folder or a GGUF file), without services.
    Generate(model::GenerateArgs),
    /// Inspect a model.
    #[command(subcommand)]
    Model(model::ModelCommand),
    /// Run a hindsight service.
    #[command(subcommand)]
    Serve(Serve),
}

#[derive(Debug, Subcommand)]
enum Serve {
    /// The generator: streaming sampling with continuous batching and weight hot-swap.
    Generator(hir_generator::ServeArgs),
    /// The relabeler: samples iterations through the generators, scores, relabels, stores.
    Relabeler(hir_relabeler::ServeArgs),
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
        Command::Generate(args) => model::generate(args),
        Command::Model(cmd) => model::run(cmd),
        Command::Serve(service) => tokio::runtime::Runtime::new()
            .map_err(anyhow::Error::from)
            .and_then(|rt| {
                rt.block_on(async {
                    match service {
                        Serve::Generator(args) => hir_generator::serve(args).await,
                        Serve::Relabeler(args) => hir_relabeler::serve(args).await,
                    }
                })
            }),
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
