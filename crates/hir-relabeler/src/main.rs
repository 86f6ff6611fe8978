//! `hir-relabeler`: samples iterations through the generators and stores relabeled data.
#![forbid(unsafe_code)]

use clap::Parser;

/// The hindsight relabeler: score in hindsight, relabel, store.
#[derive(Debug, Parser)]
#[command(name = "hir-relabeler", version, about)]
struct Cli {
    #[command(flatten)]
    serve: hir_relabeler::ServeArgs,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match hir_relabeler::serve(Cli::parse().serve).await {
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
