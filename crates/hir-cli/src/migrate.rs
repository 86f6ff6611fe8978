//! `hir migrate`: bring a database's schema up to date.

use anyhow::{Context, Result};
use clap::Args;

#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// Postgres connection URL.
    #[arg(long, env = "DATABASE_URL", value_name = "URL")]
    database_url: String,
}

pub fn run(args: MigrateArgs) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let store = hir_store::Store::connect(&args.database_url).await?;
        store.migrate().await.context("applying migrations")?;
        let latest = hir_store::MIGRATOR
            .iter()
            .next_back()
            .map(|m| format!("{} {}", m.version, m.description));
        println!(
            "schema up to date ({} migrations; latest: {})",
            hir_store::MIGRATOR.iter().count(),
            latest.unwrap_or_default()
        );
        Ok(())
    })
}
