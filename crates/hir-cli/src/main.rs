//! `hir`: the hindsight command line.
#![forbid(unsafe_code)]

mod bigbench;
mod client;
mod demo;
mod experiment;
mod health;
mod knobs;
mod local;
mod migrate;
mod model;
mod report;
mod runs;
mod watch;

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
    Tasks(bigbench::TasksCommand),
    /// Score an output for a task example under the paper's exact match and answer extraction.
    Score(bigbench::ScoreArgs),
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
    /// The whole loop on this machine: model, database, services, a short run, a report.
    Demo(demo::DemoArgs),
    /// Base model, FARL and HIR side by side on tasks and seeds: a table, a report, a chart.
    Experiment(Box<experiment::ExperimentArgs>),
    /// Start a run on the trainer.
    Run(Box<runs::RunArgs>),
    /// A run's status and per-iteration results.
    Status(runs::RunIdArgs),
    /// Follow a run's progress live until it ends.
    Watch(runs::RunIdArgs),
    /// Stop a run after its current training step commits.
    Stop(runs::RunIdArgs),
    /// Resume a stopped or failed run from its last committed state.
    Resume(runs::RunIdArgs),
    /// Registered model versions.
    Checkpoints(runs::CheckpointArgs),
    /// Greedy accuracy of what a generator serves on a task's test split.
    Eval(health::EvalArgs),
    /// A run's report: a table, `report.md` and an accuracy chart (`accuracy.svg`).
    Report(runs::ReportArgs),
    /// Check a service's gRPC health; exits 0 when it is serving.
    Health(health::HealthArgs),
}

#[derive(Debug, Subcommand)]
enum Serve {
    /// The generator: streaming sampling with continuous batching and weight hot-swap.
    Generator(hir_generator::ServeArgs),
    /// The relabeler: samples iterations through the generators, scores, relabels, stores.
    Relabeler(hir_relabeler::ServeArgs),
    /// The trainer: drives runs, trains, checkpoints, swaps the generators, evaluates.
    Trainer(hir_trainer::ServeArgs),
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

fn block_on<F: std::future::Future<Output = anyhow::Result<()>>>(f: F) -> anyhow::Result<()> {
    tokio::runtime::Runtime::new()
        .map_err(anyhow::Error::from)
        .and_then(|rt| rt.block_on(f))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Tasks(cmd) => bigbench::run(cmd),
        Command::Score(args) => bigbench::score(args),
        Command::Migrate(args) => migrate::run(args),
        Command::Generate(args) => model::generate(args),
        Command::Model(cmd) => model::run(cmd),
        Command::Serve(service) => block_on(async {
            match service {
                Serve::Generator(args) => hir_generator::serve(args).await,
                Serve::Relabeler(args) => hir_relabeler::serve(args).await,
                Serve::Trainer(args) => hir_trainer::serve(args).await,
            }
        }),
        Command::Demo(args) => block_on(demo::run(args)),
        Command::Experiment(args) => block_on(experiment::run(*args)),
        Command::Run(args) => block_on(runs::run(*args)),
        Command::Status(args) => block_on(runs::status(args)),
        Command::Watch(args) => block_on(runs::watch_cmd(args)),
        Command::Stop(args) => block_on(runs::stop(args)),
        Command::Resume(args) => block_on(runs::resume(args)),
        Command::Checkpoints(args) => block_on(runs::checkpoints(args)),
        Command::Eval(args) => block_on(health::eval(args)),
        Command::Report(args) => block_on(runs::report(args)),
        Command::Health(args) => block_on(health::health(args)),
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

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// clap checks a command's definition only in debug builds, when it is first parsed:
    /// a flag clashing with another (or with `--version`) panics there and nowhere else.
    #[test]
    fn the_command_line_is_well_formed() {
        super::Cli::command().debug_assert();
    }
}
