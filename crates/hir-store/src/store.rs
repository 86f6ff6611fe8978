//! The [`Store`] handle: a connection pool plus the schema migrations.

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use std::str::FromStr;
use std::time::Duration;

use crate::error::{Result, StoreError};
use crate::MIGRATOR;

/// Handle to the relabel store. Cheap to clone: clones share one pool.
///
/// The operations live in the per-aggregate modules ([`crate::runs`],
/// [`crate::samples`], ...) as methods on this type.
#[derive(Debug, Clone)]
pub struct Store {
    pool: PgPool,
}

impl Store {
    /// Connects to the database at `url`, e.g. `postgres://user@host:5432/db`.
    ///
    /// Fails with [`StoreError::Connect`] naming the host, port and database
    /// (never the password) when the server cannot be reached: at once when it refuses
    /// the connection, within 10 s otherwise.
    #[tracing::instrument(name = "Connecting to the relabel store", skip_all)]
    pub async fn connect(url: &str) -> Result<Self> {
        let options = PgConnectOptions::from_str(url).map_err(|_| {
            StoreError::Invalid(
                "database URL is not a valid postgres:// URL (expected postgres://user[:password]@host[:port]/database)"
                    .to_owned(),
            )
        })?;
        let connect_error = |source| StoreError::Connect {
            host: options.get_host().to_owned(),
            port: options.get_port(),
            database: options.get_database().unwrap_or("").to_owned(),
            source,
        };
        // One direct connection first: a refused or misnamed server fails at once instead
        // of after the pool's acquire timeout.
        let probe = sqlx::ConnectOptions::connect(&options)
            .await
            .map_err(connect_error)?;
        drop(sqlx::Connection::close(probe).await);
        let pool = PgPoolOptions::new()
            .max_connections(10)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options.clone())
            .await
            .map_err(connect_error)?;
        Ok(Self { pool })
    }

    /// Wraps an existing pool, e.g. the one `#[sqlx::test]` hands to a test.
    pub fn from_pool(pool: PgPool) -> Self {
        Self { pool }
    }

    /// Connects and applies any pending migrations: what a service does when it starts.
    pub async fn open(url: &str) -> Result<Self> {
        let store = Self::connect(url).await?;
        store.migrate().await?;
        Ok(store)
    }

    /// Applies any pending schema migrations. Safe to call on every start.
    #[tracing::instrument(name = "Migrating the relabel store", skip_all)]
    pub async fn migrate(&self) -> Result<()> {
        MIGRATOR.run(&self.pool).await?;
        Ok(())
    }

    /// The underlying pool, for callers that run their own queries or
    /// transactions (e.g. [`Store::complete_batch`](crate::Store::complete_batch)).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}
