//! The Postgres store: connection (an external server or the embedded cluster), migrations,
//! queries grouped by entity, and the content-addressed artifact store on disk.

pub mod artifacts;
pub mod audit;
pub mod embedded;
pub mod models;
pub mod runs;
pub mod studies;
pub mod users;

use std::str::FromStr;
use std::time::Duration;

use sqlx::ConnectOptions;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

use crate::config::Settings;

/// The schema, from `migrations/`.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Why the store is unavailable.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Embedded(#[from] embedded::EmbeddedError),
    #[error("DATABASE_URL: {0}")]
    Url(sqlx::Error),
    #[error("cannot connect to the database: {0}")]
    Connect(sqlx::Error),
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("database: {0}")]
    Query(#[from] sqlx::Error),
}

impl StoreError {
    /// Whether waiting may help: the server is starting, shutting down or not reachable
    /// (yet), as opposed to a wrong URL, password, database name or schema.
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Connect(e) | StoreError::Query(e) => transient(e),
            StoreError::Migrate(sqlx::migrate::MigrateError::Execute(e)) => transient(e),
            _ => false,
        }
    }
}

/// Connection failures and the SQLSTATE classes of a server that is going or coming:
/// 08 (connection exception), 57P (admin/crash shutdown, cannot connect now) and 53300
/// (too many connections).
fn transient(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut => true,
        sqlx::Error::Database(d) => d
            .code()
            .is_some_and(|c| c.starts_with("08") || c.starts_with("57P") || c == "53300"),
        _ => false,
    }
}

/// An open store: the pool, and the embedded cluster when there is one (kept alive as long
/// as the store is).
pub struct Db {
    pub pool: PgPool,
    url: String,
    cluster: Option<embedded::Cluster>,
}

impl Db {
    /// Connects to `DATABASE_URL`, or starts the embedded cluster under `<data>/pg`; applies
    /// the migrations.
    pub async fn open(settings: &Settings, max_connections: u32) -> Result<Db, StoreError> {
        Self::open_within(settings, max_connections, Duration::ZERO).await
    }

    /// As [`Db::open`], for the long-running services (`worker`, `scheduler`, `serve`): while
    /// the server is starting, restarting or not reachable yet, retries for up to
    /// `HEPAFLOW_DB_WAIT_MS`, logging why. A wrong address, password or database name fails at
    /// once.
    pub async fn open_waiting(settings: &Settings, max_connections: u32) -> Result<Db, StoreError> {
        Self::open_within(settings, max_connections, settings.database_wait).await
    }

    async fn open_within(
        settings: &Settings,
        max_connections: u32,
        wait: Duration,
    ) -> Result<Db, StoreError> {
        let (url, cluster) = match &settings.database_url {
            Some(url) => (url.clone(), None),
            None => {
                let dir = settings.data_dir.join("pg");
                let cluster = tokio::task::spawn_blocking(move || {
                    embedded::Cluster::start(&dir, &embedded::ClusterOptions::default())
                })
                .await
                .map_err(|e| {
                    StoreError::Embedded(embedded::EmbeddedError::Failed {
                        dir: "pg".into(),
                        reason: e.to_string(),
                    })
                })??;
                ensure_database(&cluster, embedded::DATABASE).await?;
                (cluster.url(embedded::DATABASE), Some(cluster))
            }
        };
        let deadline = tokio::time::Instant::now() + wait;
        let mut pause = Duration::from_millis(250);
        loop {
            let opened = async {
                let pool = pool(&url, max_connections).await?;
                if let Err(e) = MIGRATOR.run(&pool).await {
                    pool.close().await;
                    return Err(StoreError::from(e));
                }
                Ok(pool)
            }
            .await;
            match opened {
                Ok(pool) => return Ok(Db { pool, url, cluster }),
                Err(e) if e.is_transient() && tokio::time::Instant::now() + pause <= deadline => {
                    tracing::warn!(error = %e, retry_in_ms = pause.as_millis() as u64, "database not available yet; retrying");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The connection URL (for child processes and listeners).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Whether this store runs its own cluster.
    pub fn embedded(&self) -> bool {
        self.cluster.is_some()
    }

    /// Closes the pool, then stops the embedded cluster if this process started it.
    pub async fn close(mut self) {
        self.pool.close().await;
        if let Some(mut c) = self.cluster.take() {
            let _ = tokio::task::spawn_blocking(move || c.stop()).await;
        }
    }
}

/// A pool on `url`, quiet about statements, that gives up on an unreachable server after
/// a few seconds instead of hanging.
pub async fn pool(url: &str, max_connections: u32) -> Result<PgPool, StoreError> {
    let opts = PgConnectOptions::from_str(url)
        .map_err(StoreError::Url)?
        .log_statements(log::LevelFilter::Trace)
        .log_slow_statements(log::LevelFilter::Debug, Duration::from_secs(2));
    // One direct connection first, so an unreachable server says why (refused, unknown
    // host, bad password) instead of a pool timeout.
    use sqlx::Connection;
    match tokio::time::timeout(
        Duration::from_secs(10),
        sqlx::PgConnection::connect_with(&opts),
    )
    .await
    {
        Ok(Ok(c)) => {
            let _ = c.close().await;
        }
        Ok(Err(e)) => return Err(StoreError::Connect(e)),
        Err(_) => {
            return Err(StoreError::Connect(sqlx::Error::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no answer within 10 s",
            ))));
        }
    }
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(opts)
        .await
        .map_err(StoreError::Connect)
}

/// Creates `name` in the cluster when it does not exist yet.
pub async fn ensure_database(cluster: &embedded::Cluster, name: &str) -> Result<(), StoreError> {
    let admin = pool(&cluster.url("postgres"), 1).await?;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(name)
            .fetch_one(&admin)
            .await?;
    if !exists {
        // The name is ours (a constant or a test's generated name), never user input.
        let q = format!("CREATE DATABASE \"{}\"", name.replace('"', ""));
        if let Err(e) = sqlx::query(&q).execute(&admin).await {
            // Two processes may race to create it.
            let raced = e
                .as_database_error()
                .and_then(|d| d.code())
                .is_some_and(|c| c == "42P04" || c == "23505");
            if !raced {
                return Err(e.into());
            }
        }
    }
    admin.close().await;
    Ok(())
}
