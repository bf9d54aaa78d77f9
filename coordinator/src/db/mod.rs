//! Database access: the only place SQL lives.
//!
//! Two backends behind sqlx's `Any` driver, with the same schema and constraints:
//!
//! - SQLite, embedded in the state dir (the default), in WAL mode;
//! - PostgreSQL (`--db postgres://...`), which several coordinator replicas can share.
//!
//! Queries are written once, in the SQL both understand (numbered `$N` parameters, integers for
//! flags), and the migrations once per backend (`migrations/sqlite`, `migrations/postgres`).
//! Every change that must be atomic with its audit entry runs in a write transaction from
//! [`begin_write`], which serializes writers from the first statement: SQLite's
//! `BEGIN IMMEDIATE` write lock, or a transaction-scoped advisory lock on PostgreSQL (so the
//! audit chain stays one linear chain and address allocation never races, whichever replica
//! writes).

pub mod access;
pub mod audit;
pub mod changes;
pub mod federation;
pub mod keys;
pub mod mesh;
pub mod nodes;
pub mod people;
pub mod policy;
pub mod relays;

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{Any, AnyPool, ConnectOptions, Executor, Transaction};

/// The connection pool.
pub type Pool = AnyPool;
/// A write transaction.
pub type Tx = Transaction<'static, Any>;

/// Which database a pool talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// SQLite.
    Sqlite,
    /// PostgreSQL.
    Postgres,
}

/// The backend of `pool`.
pub fn backend(pool: &Pool) -> Backend {
    match pool.connect_options().database_url.scheme() {
        "postgres" | "postgresql" => Backend::Postgres,
        _ => Backend::Sqlite,
    }
}

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
    /// The SQLite file could not be created or restricted to its owner.
    #[error("database file {path}: {source}")]
    File {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The `--db` URL is not supported.
    #[error("unsupported database URL {0:?}: use postgres://..., sqlite://PATH or a file path")]
    UnsupportedUrl(String),
}

/// Opens (creating if needed) the database at `url` and runs the migrations.
///
/// `url` is `postgres://...`, `sqlite://PATH`, `sqlite::memory:` or a plain file path.
pub async fn open(url: &str) -> Result<Pool, DbError> {
    sqlx::any::install_default_drivers();
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let pool = AnyPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(15))
            .connect_with(AnyConnectOptions::from_str(url)?)
            .await?;
        sqlx::migrate!("../migrations/postgres").run(&pool).await?;
        return Ok(pool);
    }
    let opts = if url == "sqlite::memory:" {
        SqliteConnectOptions::from_str(url)?
    } else if url.contains("://") && !url.starts_with("sqlite://") {
        return Err(DbError::UnsupportedUrl(redacted(url)));
    } else {
        let path = Path::new(url.strip_prefix("sqlite://").unwrap_or(url));
        owner_only(path)?;
        SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
    };
    let max = if url == "sqlite::memory:" { 1 } else { 8 };
    let pool = AnyPoolOptions::new()
        .max_connections(max)
        .after_connect(|conn, _| {
            Box::pin(async move {
                // What SqliteConnectOptions would set, for connections made through `Any`: WAL,
                // durable commits, waiting (not failing) on the write lock, foreign keys.
                conn.execute(
                    "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; \
                     PRAGMA busy_timeout = 15000; PRAGMA foreign_keys = ON;",
                )
                .await?;
                Ok(())
            })
        })
        .connect_with(AnyConnectOptions::from_url(&opts.to_url_lossy())?)
        .await?;
    sqlx::migrate!("../migrations/sqlite").run(&pool).await?;
    Ok(pool)
}

/// Creates the SQLite file (and its WAL and shared-memory files, which SQLite gives the
/// database file's mode) readable by its owner only, or restricts an existing one: it holds
/// the mesh's nodes, hashed secrets and audit log.
fn owner_only(path: &Path) -> Result<(), DbError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let err = |source| DbError::File {
        path: path.display().to_string(),
        source,
    };
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(err)?;
    for suffix in ["", "-wal", "-shm"] {
        let p = std::path::PathBuf::from(format!("{}{suffix}", path.display()));
        match std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(err(e)),
        }
    }
    Ok(())
}

/// Starts a write transaction that holds the write lock from its first statement.
pub async fn begin_write(pool: &Pool) -> Result<Tx, DbError> {
    match backend(pool) {
        Backend::Sqlite => Ok(pool.begin_with("BEGIN IMMEDIATE").await?),
        Backend::Postgres => {
            let mut tx = pool.begin().await?;
            // One lock for every writer of this mesh's database, held until commit.
            tx.execute("SELECT pg_advisory_xact_lock(7361201)").await?;
            Ok(tx)
        }
    }
}

/// A connection's backend (`SQLite` or `PostgreSQL`), for the few statements that differ.
pub fn backend_of(conn: &sqlx::AnyConnection) -> Backend {
    if conn.backend_name() == "PostgreSQL" {
        Backend::Postgres
    } else {
        Backend::Sqlite
    }
}

/// Whether `e` is a unique-key violation.
pub fn is_unique_violation(e: &DbError) -> bool {
    matches!(e, DbError::Sqlx(sqlx::Error::Database(d)) if d.is_unique_violation())
}

/// Creates database `name` on the PostgreSQL server `server_url` points at (any database on
/// it, typically `postgres`) and returns the URL of the new one. For test suites and load runs
/// that need a fresh, empty mesh; `name` must be a plain identifier.
pub async fn create_postgres_database(server_url: &str, name: &str) -> Result<String, DbError> {
    use sqlx::Connection;
    use sqlx::postgres::{PgConnectOptions, PgConnection};
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    {
        return Err(DbError::UnsupportedUrl(format!("database name {name:?}")));
    }
    let opts = PgConnectOptions::from_str(server_url)?;
    let mut conn = PgConnection::connect_with(&opts).await?;
    conn.execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .await?;
    conn.close().await?;
    Ok(opts.database(name).to_url_lossy().to_string())
}

/// Drops database `name` (see [`create_postgres_database`]), closing its connections.
pub async fn drop_postgres_database(server_url: &str, name: &str) -> Result<(), DbError> {
    use sqlx::Connection;
    use sqlx::postgres::{PgConnectOptions, PgConnection};
    let opts = PgConnectOptions::from_str(server_url)?;
    let mut conn = PgConnection::connect_with(&opts).await?;
    conn.execute(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
    )))
    .await?;
    conn.close().await?;
    Ok(())
}

/// `url` with its password (if any) replaced by `***`, for messages and logs.
pub fn redacted(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_owned();
    };
    let rest = &url[scheme_end..];
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return url.to_owned();
    };
    match rest[..at].find(':') {
        Some(colon) => format!(
            "{}{}:***{}",
            &url[..scheme_end],
            &rest[..colon],
            &rest[at..]
        ),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::redacted;

    #[test]
    fn passwords_in_database_urls_are_redacted() {
        assert_eq!(
            redacted("postgres://lattice:s3cr%40t@db.example:5432/mesh?sslmode=require"),
            "postgres://lattice:***@db.example:5432/mesh?sslmode=require"
        );
        assert_eq!(
            redacted("postgres://lattice@/mesh?host=/run/pg"),
            "postgres://lattice@/mesh?host=/run/pg"
        );
        assert_eq!(redacted("/var/lib/c.db"), "/var/lib/c.db");
        assert_eq!(redacted("sqlite://x.db"), "sqlite://x.db");
    }
}

#[cfg(test)]
mod file_tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[tokio::test]
    async fn the_sqlite_files_are_readable_by_their_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("coordinator.db");
        let pool = open(db.to_str().unwrap()).await.unwrap();
        sqlx::query("SELECT 1").execute(&pool).await.unwrap();
        assert_eq!(mode(&db), 0o600);
        let wal = dir.path().join("coordinator.db-wal");
        assert!(wal.exists(), "WAL mode");
        assert_eq!(mode(&wal), 0o600);
        pool.close().await;
        // A file left readable by an older build is restricted at the next start.
        std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o644)).unwrap();
        let pool = open(&format!("sqlite://{}", db.display())).await.unwrap();
        assert_eq!(mode(&db), 0o600);
        pool.close().await;
        // A file that cannot be created is a clear error.
        let e = open("/nonexistent-dir/x.db").await.unwrap_err();
        assert!(e.to_string().contains("/nonexistent-dir/x.db"), "{e}");
    }
}
