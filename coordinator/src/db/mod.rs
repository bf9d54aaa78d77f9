//! Database access: the only place SQL lives.
//!
//! SQLite, embedded in the state dir, in WAL mode. Every change that must be atomic with its
//! audit entry runs in one `BEGIN IMMEDIATE` transaction, which takes SQLite's write lock at
//! the start; concurrent writers wait (busy timeout) instead of failing on lock upgrade.

pub mod audit;
pub mod keys;
pub mod mesh;
pub mod nodes;
pub mod policy;
pub mod relays;

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Sqlite, SqlitePool, Transaction};

/// The connection pool.
pub type Pool = SqlitePool;
/// A write transaction.
pub type Tx = Transaction<'static, Sqlite>;

/// Errors from the database layer.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The database failed.
    #[error("database error: {0}")]
    Sqlx(#[from] sqlx::Error),
    /// Migrations failed.
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A stored value could not be parsed (a corrupted or hand-edited row).
    #[error("corrupt row in {table}: {detail}")]
    Corrupt {
        /// The table.
        table: &'static str,
        /// What was wrong.
        detail: String,
    },
    /// The `--db` URL is not supported.
    #[error("unsupported database URL {0:?}: use sqlite://PATH or a file path")]
    UnsupportedUrl(String),
}

/// Opens (creating if needed) the database at `url` and runs the migrations.
///
/// `url` is `sqlite://PATH`, `sqlite::memory:` or a plain file path.
pub async fn open(url: &str) -> Result<Pool, DbError> {
    let opts = if url == "sqlite::memory:" {
        SqliteConnectOptions::from_str(url)?
    } else if let Some(path) = url.strip_prefix("sqlite://") {
        file_options(Path::new(path))
    } else if url.contains("://") {
        return Err(DbError::UnsupportedUrl(url.to_owned()));
    } else {
        file_options(Path::new(url))
    };
    let max = if url == "sqlite::memory:" { 1 } else { 8 };
    let pool = SqlitePoolOptions::new()
        .max_connections(max)
        .connect_with(opts)
        .await?;
    sqlx::migrate!("../migrations/sqlite").run(&pool).await?;
    Ok(pool)
}

fn file_options(path: &Path) -> SqliteConnectOptions {
    SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .busy_timeout(Duration::from_secs(15))
        .foreign_keys(true)
}

/// Starts a write transaction that holds the write lock from its first statement.
pub async fn begin_write(pool: &Pool) -> Result<Tx, DbError> {
    Ok(pool.begin_with("BEGIN IMMEDIATE").await?)
}
