//! `hir-generator`: serves a model over gRPC (`hir.v1.GeneratorService`).
#![forbid(unsafe_code)]

use clap::Parser;

/// The hindsight generator: streaming sampling with continuous batching and weight hot-swap.
#[derive(Debug, Parser)]
#[command(name = "hir-generator", version, about)]
struct Cli {
    #[command(flatten)]
    serve: hir_generator::ServeArgs,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match hir_generator::serve(cli.serve).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
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
