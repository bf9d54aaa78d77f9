//! `lattice-coordinator backup FILE` and `restore FILE`: the state dir's keys and a consistent
//! copy of the SQLite database in one file, taken while the coordinator runs, and put back
//! while it is stopped.
//!
//! A backup is one SQLite file (mode 0600): the database as SQLite's `VACUUM INTO` writes it
//! from a read transaction, plus a table `lattice_backup_files` holding the state dir's
//! keys: the control key (without it every node would have to join again), the ticket, audit
//! and admin-certificate keys, the embedded relay's identity, and the audit checkpoint (read
//! before the database is copied, so it never runs ahead of it). For a PostgreSQL database the
//! file holds the keys only: `pg_dump` is the tool for the database.

use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use sqlx::Connection;
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};

use crate::server::{ADMIN_CERT_FILE, ADMIN_CERT_KEY_FILE, ADMIN_SOCKET, CONTROL_KEY_FILE};

/// The SQLite database's file name in the state dir.
pub const DB_FILE: &str = "coordinator.db";

/// Key files, in the order they are copied (the checkpoint before the database).
const KEY_FILES: &[&str] = &[
    CONTROL_KEY_FILE,
    crate::relays::TICKET_KEY_FILE,
    crate::audit_store::KEY_FILE,
    ADMIN_CERT_FILE,
    ADMIN_CERT_KEY_FILE,
    crate::audit_store::CHECKPOINT_FILE,
];
/// The embedded relay's identity (a directory).
const RELAY_DIR: &str = "relay";

/// What a backup or restore did.
#[derive(Debug, serde::Serialize)]
pub struct Summary {
    /// Files written.
    pub files: Vec<String>,
    /// Whether the database was copied (false for PostgreSQL).
    pub database: bool,
    /// For a restore: where the replaced files went.
    pub previous: Option<PathBuf>,
}

/// Backs up `state_dir` (with the database at `db`, default its SQLite file) into the file
/// `out`, which must not exist yet.
pub async fn backup(state_dir: &Path, db: Option<&str>, out: &Path) -> anyhow::Result<Summary> {
    if !state_dir.join(CONTROL_KEY_FILE).exists() {
        bail!(
            "{} holds no coordinator ({CONTROL_KEY_FILE} is missing): name it with --state-dir",
            state_dir.display()
        );
    }
    let db_path = match db {
        Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => None,
        Some(url) => Some(PathBuf::from(url.strip_prefix("sqlite://").unwrap_or(url))),
        None => Some(state_dir.join(DB_FILE)),
    };
    // The keys first: the checkpoint must not be newer than the database copy.
    let mut keys: Vec<(String, Vec<u8>)> = Vec::new();
    for name in KEY_FILES {
        let from = state_dir.join(name);
        if from.exists() {
            keys.push(((*name).to_owned(), read(&from)?));
        }
    }
    let relay = state_dir.join(RELAY_DIR);
    if relay.is_dir() {
        for entry in std::fs::read_dir(&relay)? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                let name = format!("{RELAY_DIR}/{}", entry.file_name().to_string_lossy());
                keys.push((name, read(&entry.path())?));
            }
        }
    }
    // An empty owner-only file: VACUUM INTO writes into it, and nobody else may read it.
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .with_context(|| format!("creating {} (it must not exist yet)", out.display()))?;
    let database = match &db_path {
        Some(path) => {
            let mut conn = SqliteConnection::connect_with(
                &SqliteConnectOptions::new().filename(path).read_only(true),
            )
            .await
            .with_context(|| format!("opening {}", path.display()))?;
            sqlx::query("VACUUM INTO ?")
                .bind(out.display().to_string())
                .execute(&mut conn)
                .await
                .with_context(|| format!("copying {} into {}", path.display(), out.display()))?;
            conn.close().await?;
            true
        }
        None => false,
    };
    let mut conn = SqliteConnection::connect_with(&SqliteConnectOptions::new().filename(out))
        .await
        .with_context(|| format!("opening {}", out.display()))?;
    sqlx::query("CREATE TABLE lattice_backup_files (name TEXT PRIMARY KEY, content BLOB NOT NULL)")
        .execute(&mut conn)
        .await?;
    let mut files = Vec::new();
    for (name, content) in keys {
        sqlx::query("INSERT INTO lattice_backup_files (name, content) VALUES (?, ?)")
            .bind(&name)
            .bind(content)
            .execute(&mut conn)
            .await?;
        files.push(name);
    }
    conn.close().await?;
    std::fs::set_permissions(out, std::fs::Permissions::from_mode(0o600))?;
    check_database(out, database).await?;
    if database {
        files.push(DB_FILE.to_owned());
    }
    Ok(Summary {
        files,
        database,
        previous: None,
    })
}

/// Restores the backup file `from` into `state_dir`; the coordinator must be stopped. What
/// the state dir held is moved into `state_dir/before-restore-UNIXTIME` first.
pub async fn restore(from: &Path, state_dir: &Path) -> anyhow::Result<Summary> {
    if tokio::net::UnixStream::connect(state_dir.join(ADMIN_SOCKET))
        .await
        .is_ok()
    {
        bail!(
            "a coordinator is running on {}: stop it first",
            state_dir.display()
        );
    }
    let mut conn =
        SqliteConnection::connect_with(&SqliteConnectOptions::new().filename(from).read_only(true))
            .await
            .with_context(|| format!("opening {}", from.display()))?;
    let keys: Vec<(String, Vec<u8>)> =
        sqlx::query_as("SELECT name, content FROM lattice_backup_files ORDER BY name")
            .fetch_all(&mut conn)
            .await
            .with_context(|| format!("{} is not a coordinator backup", from.display()))?;
    let (tables,): (i64,) = sqlx::query_as(
        "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = '_sqlx_migrations'",
    )
    .fetch_one(&mut conn)
    .await?;
    conn.close().await?;
    let database = tables > 0;
    if !keys.iter().any(|(n, _)| n == CONTROL_KEY_FILE) {
        bail!(
            "{} is not a coordinator backup ({CONTROL_KEY_FILE} is missing)",
            from.display()
        );
    }
    if keys
        .iter()
        .any(|(n, _)| n.starts_with('/') || n.split('/').any(|c| c == ".." || c.is_empty()))
    {
        bail!("{} names files outside the state dir", from.display());
    }
    check_database(from, database).await?;
    std::fs::DirBuilder::new()
        .mode(0o700)
        .recursive(true)
        .create(state_dir)?;
    let previous = state_dir.join(format!("before-restore-{}", crate::state::unix_now()));
    let mut moved = false;
    for name in KEY_FILES.iter().copied().chain([
        DB_FILE,
        "coordinator.db-wal",
        "coordinator.db-shm",
        RELAY_DIR,
        ADMIN_SOCKET,
    ]) {
        let p = state_dir.join(name);
        if p.symlink_metadata().is_ok() {
            if name == ADMIN_SOCKET {
                std::fs::remove_file(&p)?;
                continue;
            }
            if !moved {
                std::fs::DirBuilder::new().mode(0o700).create(&previous)?;
                moved = true;
            }
            std::fs::rename(&p, previous.join(name))?;
        }
    }
    let mut files = Vec::new();
    for (name, content) in keys {
        let to = state_dir.join(&name);
        if let Some(parent) = to.parent() {
            std::fs::DirBuilder::new()
                .mode(0o700)
                .recursive(true)
                .create(parent)?;
        }
        write_private(&to, &content)?;
        files.push(name);
    }
    if database {
        // The database without the backup's own table, moved into place whole.
        let tmp = state_dir.join(format!("{DB_FILE}.restoring"));
        write_private(&tmp, &read(from)?)?;
        let mut conn =
            SqliteConnection::connect_with(&SqliteConnectOptions::new().filename(&tmp)).await?;
        sqlx::query("DROP TABLE lattice_backup_files")
            .execute(&mut conn)
            .await?;
        conn.close().await?;
        std::fs::rename(&tmp, state_dir.join(DB_FILE))?;
        files.push(DB_FILE.to_owned());
    }
    Ok(Summary {
        files,
        database,
        previous: moved.then_some(previous),
    })
}

fn read(path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}

/// Checks a backup file: SQLite's integrity check passes, and (if it holds the database) it
/// was written by this version of the coordinator or an older one (newer migrations mean a
/// newer coordinator).
async fn check_database(path: &Path, database: bool) -> anyhow::Result<()> {
    let mut conn =
        SqliteConnection::connect_with(&SqliteConnectOptions::new().filename(path).read_only(true))
            .await
            .with_context(|| format!("opening {}", path.display()))?;
    let (verdict,): (String,) = sqlx::query_as("PRAGMA integrity_check")
        .fetch_one(&mut conn)
        .await
        .with_context(|| format!("{} is not a SQLite database", path.display()))?;
    if verdict != "ok" {
        bail!(
            "{} fails SQLite's integrity check: {verdict}",
            path.display()
        );
    }
    if !database {
        conn.close().await?;
        return Ok(());
    }
    let (newest,): (Option<i64>,) = sqlx::query_as("SELECT MAX(version) FROM _sqlx_migrations")
        .fetch_one(&mut conn)
        .await
        .with_context(|| format!("{} is not a Lattice coordinator database", path.display()))?;
    let ours = sqlx::migrate!("../migrations/sqlite")
        .iter()
        .map(|m| m.version)
        .max()
        .unwrap_or(0);
    if newest.unwrap_or(0) > ours {
        bail!(
            "{} comes from a newer coordinator (schema {}, this one knows up to {ours})",
            path.display(),
            newest.unwrap_or(0)
        );
    }
    conn.close().await?;
    Ok(())
}

/// Writes a file readable by its owner only (it must not exist).
fn write_private(to: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(to)
        .with_context(|| format!("writing {}", to.display()))?;
    std::io::Write::write_all(&mut f, bytes)?;
    f.sync_all()?;
    Ok(())
}
