//! `lattice-coordinator backup` and `restore`: the state dir's keys and a consistent copy of
//! the SQLite database, taken while the coordinator runs, and put back while it is stopped.
//!
//! A backup is a directory (mode 0700, files 0600): the control key (without it every node
//! would have to join again), the ticket, audit and admin-certificate keys, the embedded
//! relay's identity, the audit checkpoint (copied before the database, so it never runs
//! ahead of it), and `coordinator.db`, written by SQLite's `VACUUM INTO` from a read
//! transaction. A PostgreSQL database is not copied: `pg_dump` is the tool for it.

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

/// Backs up `state_dir` (with the database at `db`, default its SQLite file) into `out`,
/// which must not exist yet.
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
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(out)
        .with_context(|| format!("creating {} (it must not exist yet)", out.display()))?;
    let mut files = Vec::new();
    for name in KEY_FILES {
        let from = state_dir.join(name);
        if from.exists() {
            copy_private(&from, &out.join(name))?;
            files.push((*name).to_owned());
        }
    }
    let relay = state_dir.join(RELAY_DIR);
    if relay.is_dir() {
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(out.join(RELAY_DIR))?;
        for entry in std::fs::read_dir(&relay)? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                let name = format!("{RELAY_DIR}/{}", entry.file_name().to_string_lossy());
                copy_private(&entry.path(), &out.join(&name))?;
                files.push(name);
            }
        }
    }
    let database = match db_path {
        Some(path) => {
            let target = out.join(DB_FILE);
            // VACUUM INTO creates the file; make it owner-only before it holds anything.
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&target)?;
            std::fs::remove_file(&target)?;
            let mut conn = SqliteConnection::connect_with(
                &SqliteConnectOptions::new().filename(&path).read_only(true),
            )
            .await
            .with_context(|| format!("opening {}", path.display()))?;
            sqlx::query("VACUUM INTO ?")
                .bind(target.display().to_string())
                .execute(&mut conn)
                .await
                .with_context(|| format!("copying {} into {}", path.display(), target.display()))?;
            conn.close().await?;
            std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o600))?;
            check_database(&target).await?;
            files.push(DB_FILE.to_owned());
            true
        }
        None => false,
    };
    Ok(Summary {
        files,
        database,
        previous: None,
    })
}

/// Restores backup `from` into `state_dir`; the coordinator must be stopped. What the state
/// dir held is moved into `state_dir/before-restore-UNIXTIME` first.
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
    if !from.join(CONTROL_KEY_FILE).exists() {
        bail!(
            "{} is not a coordinator backup ({CONTROL_KEY_FILE} is missing)",
            from.display()
        );
    }
    let database = from.join(DB_FILE).exists();
    if database {
        check_database(&from.join(DB_FILE)).await?;
    }
    std::fs::DirBuilder::new()
        .mode(0o700)
        .recursive(true)
        .create(state_dir)?;
    let previous = state_dir.join(format!("before-restore-{}", crate::state::unix_now()));
    let mut moved = false;
    let replaced: Vec<String> = KEY_FILES
        .iter()
        .map(|f| (*f).to_owned())
        .chain(
            [
                DB_FILE,
                "coordinator.db-wal",
                "coordinator.db-shm",
                RELAY_DIR,
            ]
            .map(String::from),
        )
        .chain(std::iter::once(ADMIN_SOCKET.to_owned()))
        .collect();
    for name in &replaced {
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
    for entry in walk(from)? {
        let rel = entry.strip_prefix(from)?.to_path_buf();
        let to = state_dir.join(&rel);
        if let Some(parent) = to.parent() {
            std::fs::DirBuilder::new()
                .mode(0o700)
                .recursive(true)
                .create(parent)?;
        }
        copy_private(&entry, &to)?;
        files.push(rel.display().to_string());
    }
    files.sort();
    Ok(Summary {
        files,
        database,
        previous: moved.then_some(previous),
    })
}

/// The files under `dir` (one level of subdirectories, as a backup has).
fn walk(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let t = entry.file_type()?;
        if t.is_file() {
            out.push(entry.path());
        } else if t.is_dir() {
            for inner in std::fs::read_dir(entry.path())? {
                let inner = inner?;
                if inner.file_type()?.is_file() {
                    out.push(inner.path());
                }
            }
        }
    }
    Ok(out)
}

/// Checks a database file: SQLite's integrity check passes, and it was written by this
/// version of the coordinator or an older one (newer migrations mean a newer coordinator).
async fn check_database(path: &Path) -> anyhow::Result<()> {
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

/// Copies a file, readable by its owner only.
fn copy_private(from: &Path, to: &Path) -> anyhow::Result<()> {
    let bytes = std::fs::read(from).with_context(|| format!("reading {}", from.display()))?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(to)
        .with_context(|| format!("writing {}", to.display()))?;
    std::io::Write::write_all(&mut f, &bytes)?;
    f.sync_all()?;
    Ok(())
}
