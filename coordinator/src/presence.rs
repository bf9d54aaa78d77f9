//! Which replica holds each node's control session, in the database, so every replica can
//! tell its nodes which peers are online.
//!
//! Sessions report coming and going to the hub, which hands the events here; a writer task
//! batches them (a reconnect storm becomes a few transactions, not thousands) and records each
//! real change in the change feed like any other.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::mpsc;
use tracing::warn;
use wire::NodeId;

use crate::db::{self, DbError, changes};
use crate::feed;
use crate::state::{AppState, unix_now, unix_now_ms};

/// How long the writer waits for more events before writing a batch.
const DEBOUNCE: Duration = Duration::from_millis(50);
/// Most events written in one transaction.
const MAX_BATCH: usize = 4096;

/// A session came (`true`) or went (`false`).
pub type Event = (NodeId, bool);

/// The queue of presence events.
pub struct Presence {
    tx: mpsc::UnboundedSender<Event>,
    rx: Mutex<Option<mpsc::UnboundedReceiver<Event>>>,
}

impl Default for Presence {
    fn default() -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        Self {
            tx,
            rx: Mutex::new(Some(rx)),
        }
    }
}

impl Presence {
    /// Where the hub sends session events.
    pub fn sender(&self) -> mpsc::UnboundedSender<Event> {
        self.tx.clone()
    }

    /// Claims these nodes for this replica again (after it was taken for dead).
    pub fn claim(&self, nodes: Vec<NodeId>) {
        for n in nodes {
            let _ = self.tx.send((n, true));
        }
    }
}

/// Starts the writer. Call once.
pub fn spawn_writer(st: AppState) {
    let Some(mut rx) = st
        .presence
        .rx
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
    else {
        return;
    };
    tokio::spawn(async move {
        let mut pending: BTreeMap<NodeId, bool> = BTreeMap::new();
        loop {
            if pending.is_empty() {
                let Some((id, up)) = rx.recv().await else {
                    return;
                };
                pending.insert(id, up);
            }
            tokio::time::sleep(DEBOUNCE).await;
            while pending.len() < MAX_BATCH {
                match rx.try_recv() {
                    // The last event of a node wins.
                    Ok((id, up)) => {
                        pending.insert(id, up);
                    }
                    Err(_) => break,
                }
            }
            match write(&st, &pending).await {
                Ok(()) => pending.clear(),
                Err(e) => {
                    warn!(error = %e, nodes = pending.len(), "could not record presence; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    });
}

async fn write(st: &AppState, batch: &BTreeMap<NodeId, bool>) -> Result<(), DbError> {
    let me = st.replica.id.as_str();
    let now = unix_now();
    let now_ms = unix_now_ms();
    let mut tx = db::begin_write(&st.db).await?;
    let mut last = None;
    for (&id, &up) in batch {
        let changed = if up {
            db::nodes::set_connected(&mut tx, id, Some(me), None, now).await?
        } else {
            db::nodes::set_connected(&mut tx, id, None, Some(me), now).await?
        };
        if changed {
            last = Some(changes::record(&mut tx, changes::Kind::Node, Some(id), "", now_ms).await?);
        }
    }
    tx.commit().await?;
    if let Some(seq) = last {
        feed::sync(st, seq).await;
    }
    Ok(())
}
