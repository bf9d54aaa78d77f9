//! The audit log's state outside the database, in the state dir (mode 0600, written
//! atomically): the signing key (`audit.key`) and the checkpoint (`audit.checkpoint`), and
//! the task that moves the checkpoint forward as entries are committed. Someone who can write
//! the database but not the state dir can neither sign entries nor move the checkpoint back
//! (see [`crate::audit`] for what that detects).

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::Context;
use hybrid::sign::Signer;
use tracing::{error, info};

use crate::audit::{Checkpoint, GENESIS};
use crate::db::{self, Pool};

/// The audit key file.
pub const KEY_FILE: &str = "audit.key";
/// The checkpoint file.
pub const CHECKPOINT_FILE: &str = "audit.checkpoint";
/// How often the checkpoint catches up with the database.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);

/// Why the checkpoint could not move.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The database no longer holds the entry the checkpoint records (or holds another one).
    #[error(
        "the audit log no longer contains entry {0} as checkpointed: it was rewritten or truncated"
    )]
    Tampered(i64),
    /// The database failed.
    #[error(transparent)]
    Db(#[from] db::DbError),
    /// Writing the file failed.
    #[error("writing the audit checkpoint: {0}")]
    Io(String),
}

/// See the module docs.
pub struct AuditStore {
    key: Signer,
    path: PathBuf,
    checkpoint: Mutex<Checkpoint>,
}

impl AuditStore {
    /// Loads the key and the checkpoint from `dir`, creating them on first use. A new
    /// checkpoint starts at the database's current head, and requires signatures from the
    /// next entry on.
    pub async fn open(dir: &Path, pool: &Pool) -> anyhow::Result<Self> {
        let key = load_or_create_key(&dir.join(KEY_FILE))?;
        let path = dir.join(CHECKPOINT_FILE);
        let checkpoint = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .with_context(|| format!("{} is not an audit checkpoint", path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut conn = pool.acquire().await?;
                let head = db::audit::head(&mut conn).await?;
                let (seq, hash) = head.map_or((0, GENESIS.to_owned()), |h| (h.seq, h.hash));
                let cp = Checkpoint {
                    signed_from: seq + 1,
                    seq,
                    hash: wire::keys::parse_hex(&hash).context("the audit head's hash")?,
                };
                write_checkpoint(&path, &cp)?;
                info!(signed_from = cp.signed_from, "audit signing started");
                cp
            }
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        Ok(Self {
            key,
            path,
            checkpoint: Mutex::new(checkpoint),
        })
    }

    /// The key entries are signed with.
    pub fn key(&self) -> &Signer {
        &self.key
    }

    /// The current checkpoint.
    pub fn checkpoint(&self) -> Checkpoint {
        *self.lock()
    }

    /// Moves the checkpoint to the database's head, if that head extends the checkpointed
    /// chain (the entry the checkpoint records is still there, unchanged). Never moves it
    /// back.
    pub async fn advance(&self, pool: &Pool) -> Result<(), CheckpointError> {
        let mut conn = pool.acquire().await.map_err(db::DbError::from)?;
        let Some(head) = db::audit::head(&mut conn).await? else {
            return Ok(());
        };
        let cp = self.checkpoint();
        if head.seq <= cp.seq {
            if head.seq < cp.seq {
                return Err(CheckpointError::Tampered(cp.seq));
            }
            return Ok(());
        }
        if cp.seq > 0 {
            let stored = db::audit::hash_of(&mut conn, cp.seq).await?;
            if stored.and_then(|h| wire::keys::parse_hex::<32>(&h)) != Some(cp.hash) {
                return Err(CheckpointError::Tampered(cp.seq));
            }
        }
        let next = Checkpoint {
            seq: head.seq,
            hash: wire::keys::parse_hex(&head.hash).ok_or(CheckpointError::Tampered(head.seq))?,
            ..cp
        };
        write_checkpoint(&self.path, &next).map_err(|e| CheckpointError::Io(format!("{e:#}")))?;
        *self.lock() = next;
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Checkpoint> {
        self.checkpoint
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Keeps the checkpoint up with the database until the process ends.
pub fn spawn_checkpointer(store: std::sync::Arc<AuditStore>, pool: Pool) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(CHECKPOINT_EVERY);
        let mut reported = false;
        loop {
            tick.tick().await;
            match store.advance(&pool).await {
                Ok(()) => reported = false,
                Err(e) if !reported => {
                    error!(error = %e, "the audit checkpoint cannot advance");
                    reported = true;
                }
                Err(_) => {}
            }
        }
    });
}

fn load_or_create_key(path: &Path) -> anyhow::Result<Signer> {
    let (seed, created) =
        statefs::load_or_create_secret(path, || *Signer::generate(&mut rand::rng()).seed())?;
    if created {
        info!(path = %path.display(), "generated a new audit signing key");
    }
    Ok(Signer::from_seed(*seed))
}

fn write_checkpoint(path: &Path, cp: &Checkpoint) -> anyhow::Result<()> {
    let mut text = serde_json::to_vec(cp).context("encoding the audit checkpoint")?;
    text.push(b'\n');
    crate::server::write_private_file(path, &text)
}
