//! The change feed: how every replica's in-memory view follows the database.
//!
//! Writers record a [`Change`] in the transaction that makes the change (see
//! [`db::changes`]); rows are numbered in commit order. Every replica applies the rows in
//! order: it reloads what a row names from the database and puts that in its hub, so the hub
//! is a cache of committed state that can only move forward, whoever wrote and in whatever
//! order the writers' own code ran afterwards. A replica learns of new rows from PostgreSQL's
//! `LISTEN/NOTIFY` (and a one-second poll, should a notification be missed), and from its own
//! writers, which wait until their change is applied before they answer.
//!
//! The same code serves one coordinator on SQLite: there the feed is only ever fed by the
//! process itself.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, Notify, watch};
use tracing::{debug, info, warn};
use wire::{ErrorCode, NodeId, RelayId, RelayInfo};

use crate::db::changes::{self, Change, Kind, Replica};
use crate::db::{self, DbError};
use crate::hub::Kick;
use crate::state::{AppState, unix_now, unix_now_ms};

/// How many rows one pass reads at most.
const BATCH: i64 = 2000;
/// How long a writer waits for its own change to be applied before answering anyway.
pub const WAIT_LIMIT: Duration = Duration::from_secs(10);
/// How often a replica renews its heartbeat.
pub const HEARTBEAT: Duration = Duration::from_secs(3);
/// A replica whose heartbeat is older than this is dropped: its nodes are marked offline.
pub const REPLICA_TIMEOUT: Duration = Duration::from_secs(12);
/// Changes are kept this long, so a briefly disconnected replica can catch up row by row.
const KEEP_CHANGES: Duration = Duration::from_secs(3600);

/// What a node is told when a change removes it from the mesh.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KickDetail {
    /// The error code.
    pub code: ErrorCode,
    /// The message.
    pub message: String,
}

impl KickDetail {
    /// The JSON stored in a change row.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// A replica's position in the feed.
pub struct Feed {
    applied: watch::Sender<i64>,
    applying: Mutex<()>,
    wake: Notify,
    /// Whether the database answers (each catch-up that worked is news): while it does not,
    /// nodes whose sessions ended cannot get new ones, so no fresh relay tickets.
    database: std::sync::Mutex<relay::revocation::Outage>,
}

impl Default for Feed {
    fn default() -> Self {
        Self {
            applied: watch::channel(0).0,
            applying: Mutex::new(()),
            wake: Notify::new(),
            database: std::sync::Mutex::default(),
        }
    }
}

impl Feed {
    /// The database answered at `now` (Unix seconds).
    pub fn database_answered(&self, now: i64) {
        self.database().heard(now, now);
    }

    /// Whether a relay ticket that ran out is excused at `now`: the database has not answered
    /// for a while, or answers again only since lately (see [`relay::revocation::Outage`]).
    pub fn database_excuses_expiry(&self, now: i64) -> bool {
        self.database().excuses_expiry(now)
    }

    fn database(&self) -> std::sync::MutexGuard<'_, relay::revocation::Outage> {
        self.database
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Feed {
    /// The last change applied.
    pub fn applied(&self) -> i64 {
        *self.applied.borrow()
    }

    /// Asks the background follower to look for new rows now.
    pub fn poke(&self) {
        self.wake.notify_one();
    }
}

/// Applies every committed change up to at least `seq` to this replica's hub (a writer calls
/// it after its commit, so its caller sees its own change). Gives up waiting after
/// [`WAIT_LIMIT`]; the change is committed either way and applied as soon as the database
/// answers.
pub async fn sync(st: &AppState, seq: i64) {
    if st.feed.applied() >= seq {
        return;
    }
    let r = tokio::time::timeout(WAIT_LIMIT, async {
        loop {
            if let Err(e) = catch_up(st).await {
                warn!(error = %e, "could not apply committed changes; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            if st.feed.applied() >= seq {
                return;
            }
        }
    })
    .await;
    if r.is_err() {
        warn!(
            seq,
            "a committed change is not applied yet; nodes will get it later"
        );
    }
}

/// Applies every row after the current position.
pub async fn catch_up(st: &AppState) -> Result<(), DbError> {
    let _one = st.feed.applying.lock().await;
    loop {
        let from = st.feed.applied();
        let rows = {
            let mut c = st.db.acquire().await?;
            let rows = changes::since(&mut c, from, BATCH).await?;
            if rows.first().is_some_and(|r| r.seq != from + 1) {
                // Rows we never saw were pruned: start over from the database.
                drop(c);
                warn!(
                    from,
                    first = rows[0].seq,
                    "fell behind the change feed; reloading everything"
                );
                reload(st).await?;
                continue;
            }
            rows
        };
        let Some(last) = rows.last().map(|r| r.seq) else {
            return Ok(());
        };
        apply(st, &rows).await?;
        st.feed.applied.send_replace(last);
        debug!(from, to = last, "applied changes");
        if i64::try_from(rows.len()).unwrap_or(i64::MAX) < BATCH {
            return Ok(());
        }
    }
}

/// Applies a run of rows: each node named is reloaded once, then the rest.
async fn apply(st: &AppState, rows: &[Change]) -> Result<(), DbError> {
    let mut nodes: BTreeMap<NodeId, String> = BTreeMap::new();
    let (mut policy, mut relays, mut settings, mut replicas) = (false, false, false, false);
    for r in rows {
        match r.kind {
            Kind::Node => {
                if let Some(id) = r.node {
                    // The latest detail wins: a node removed and re-added in one run is back.
                    nodes.insert(id, r.detail.clone());
                }
            }
            Kind::Policy => policy = true,
            Kind::Relays => relays = true,
            Kind::Settings => settings = true,
            Kind::Replicas => replicas = true,
        }
    }
    let mut c = st.db.acquire().await?;
    if settings {
        st.hub
            .set_tunnel_security(db::mesh::tunnel_security(&mut c).await?);
    }
    if policy {
        load_policy(st, &mut c).await?;
    }
    if relays || replicas {
        load_relays_and_replicas(st, &mut c).await?;
    }
    if !nodes.is_empty() {
        let ids: Vec<NodeId> = nodes.keys().copied().collect();
        let found: BTreeMap<NodeId, _> = db::nodes::by_ids(&mut c, &ids)
            .await?
            .into_iter()
            .map(|r| (r.id, r))
            .collect();
        let now = unix_now();
        let mut gone = Vec::new();
        let mut present = Vec::new();
        for (id, detail) in nodes {
            match found.get(&id) {
                Some(rec) if !rec.is_expired(now) => present.push(rec.clone()),
                Some(rec) => gone.push((
                    id,
                    kick_from(&detail).unwrap_or_else(|| Kick {
                        code: ErrorCode::NodeExpired,
                        message: format!("the key of node {} has expired", rec.name),
                    }),
                )),
                None => gone.push((
                    id,
                    kick_from(&detail).unwrap_or_else(|| Kick {
                        code: ErrorCode::NodeRemoved,
                        message: "this node was removed from the mesh".into(),
                    }),
                )),
            }
        }
        st.hub.apply_nodes(present, gone);
    }
    Ok(())
}

fn kick_from(detail: &str) -> Option<Kick> {
    let d: KickDetail = serde_json::from_str(detail).ok()?;
    Some(Kick {
        code: d.code,
        message: d.message,
    })
}

async fn load_policy(st: &AppState, c: &mut sqlx::AnyConnection) -> Result<(), DbError> {
    if let Some(cur) = db::policy::current(c).await? {
        match policy::Policy::parse(&cur.file_name, &cur.text) {
            Ok(p) => st.hub.set_policy(cur.version, p),
            Err(e) => warn!(version = cur.version, error = %e, "a stored policy does not parse"),
        }
    }
    // Approved access requests are compiled with the policy.
    st.hub
        .set_grants(crate::ops::access::grants(c, unix_now()).await?);
    Ok(())
}

/// The relay list (relay 0 is the embedded relay of the longest-running replica that has one,
/// so every node of the mesh agrees on it) and the replica URLs nodes fail over to.
async fn load_relays_and_replicas(
    st: &AppState,
    c: &mut sqlx::AnyConnection,
) -> Result<(), DbError> {
    let live = live_replicas(&changes::replicas(c).await?, unix_now_ms());
    let mut relays: Vec<RelayInfo> = Vec::new();
    if let Some(r) = live.iter().find_map(|r| {
        r.relay
            .as_deref()
            .and_then(|j| serde_json::from_str::<RelayInfo>(j).ok())
    }) {
        relays.push(RelayInfo {
            id: RelayId(0),
            ..r
        });
    }
    relays.extend(db::relays::all(c).await?);
    st.hub.set_relays(relays);
    st.hub
        .set_coordinators(live.iter().filter_map(|r| r.public_url.clone()).collect());
    Ok(())
}

/// Replicas whose heartbeat is recent, oldest first.
pub fn live_replicas(all: &[Replica], now_ms: i64) -> Vec<Replica> {
    let timeout = i64::try_from(REPLICA_TIMEOUT.as_millis()).unwrap_or(i64::MAX);
    all.iter()
        .filter(|r| now_ms - r.heartbeat_ms <= timeout)
        .cloned()
        .collect()
}

/// Replaces the hub's view with what the database holds now.
pub async fn reload(st: &AppState) -> Result<(), DbError> {
    let mut c = st.db.acquire().await?;
    // Rows after `last` may or may not be in what is loaded next; applying them again later
    // is harmless (every application reloads from the database).
    let last = changes::last(&mut c).await?;
    st.hub
        .set_tunnel_security(db::mesh::tunnel_security(&mut c).await?);
    load_policy(st, &mut c).await?;
    load_relays_and_replicas(st, &mut c).await?;
    let now = unix_now();
    let all: Vec<_> = db::nodes::all(&mut c)
        .await?
        .into_iter()
        .filter(|n| !n.is_expired(now))
        .collect();
    let keep: std::collections::HashSet<NodeId> = all.iter().map(|n| n.id).collect();
    let gone: Vec<(NodeId, Kick)> = st
        .hub
        .read()
        .nodes()
        .filter(|n| !keep.contains(&n.record.id))
        .map(|n| {
            (
                n.record.id,
                Kick {
                    code: ErrorCode::NodeRemoved,
                    message: format!("node {} is no longer in the mesh", n.record.name),
                },
            )
        })
        .collect();
    st.hub.apply_nodes(all, gone);
    st.feed.applied.send_replace(last);
    Ok(())
}

/// Follows the feed until the process ends: PostgreSQL notifications, local pokes, and a poll
/// every second.
pub fn spawn_follower(st: AppState) {
    tokio::spawn(async move {
        let mut listener = None;
        loop {
            if db::backend(&st.db) == db::Backend::Postgres && listener.is_none() {
                listener = listen(&st).await;
            }
            let notified = async {
                match listener.as_mut() {
                    Some(l) => l.recv().await.is_ok(),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                ok = notified => {
                    if !ok {
                        warn!("lost the change notifications; reconnecting");
                        listener = None;
                    }
                }
                () = st.feed.wake.notified() => {}
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            match catch_up(&st).await {
                Ok(()) => st.feed.database_answered(unix_now()),
                Err(e) => {
                    warn!(error = %e, "could not follow the change feed");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    });
}

async fn listen(st: &AppState) -> Option<sqlx::postgres::PgListener> {
    let url = st.db.connect_options().database_url.to_string();
    let r = async {
        let mut l = sqlx::postgres::PgListener::connect(&url).await?;
        l.listen(changes::CHANNEL).await?;
        Ok::<_, sqlx::Error>(l)
    }
    .await;
    match r {
        Ok(l) => Some(l),
        Err(e) => {
            warn!(error = %e, "could not listen for change notifications; polling");
            None
        }
    }
}

/// This process as a replica of the mesh.
#[derive(Debug, Clone)]
pub struct ReplicaInfo {
    /// Random, new on every start.
    pub id: String,
    /// The URL nodes use to reach it.
    pub public_url: Option<String>,
    /// Its embedded relay, if it runs one.
    pub relay: Option<RelayInfo>,
}

impl ReplicaInfo {
    /// A replica with a fresh id.
    pub fn new(public_url: Option<String>, relay: Option<RelayInfo>) -> Self {
        let id: [u8; 8] = rand::random();
        let mut hex = String::new();
        wire::keys::push_hex(&mut hex, &id);
        Self {
            id: hex,
            public_url,
            relay,
        }
    }
}

/// Adds this replica to the mesh (on SQLite, where only one process may serve, after
/// dropping whatever an earlier process left).
pub async fn join(st: &AppState) -> Result<(), DbError> {
    let mut tx = db::begin_write(&st.db).await?;
    if db::backend(&st.db) == db::Backend::Sqlite {
        for r in changes::replicas(&mut tx).await? {
            drop_replica(&mut tx, &r.id).await?;
        }
    }
    changes::add_replica(
        &mut tx,
        &st.replica.id,
        st.replica.public_url.as_deref(),
        st.replica
            .relay
            .as_ref()
            .map(|r| serde_json::to_string(r).unwrap_or_default())
            .as_deref(),
        unix_now_ms(),
    )
    .await?;
    let seq = changes::record(&mut tx, Kind::Replicas, None, "", unix_now_ms()).await?;
    tx.commit().await?;
    info!(replica = %st.replica.id, "joined the mesh's replicas");
    sync(st, seq).await;
    Ok(())
}

/// Removes a replica and marks its nodes offline (inside a write transaction).
async fn drop_replica(tx: &mut sqlx::AnyConnection, id: &str) -> Result<Vec<NodeId>, DbError> {
    changes::remove_replica(tx, id).await?;
    let nodes = db::nodes::connected_to(tx, id).await?;
    let now = unix_now();
    let now_ms = unix_now_ms();
    for n in &nodes {
        db::nodes::set_connected(tx, *n, None, Some(id), now).await?;
        changes::record(tx, Kind::Node, Some(*n), "", now_ms).await?;
    }
    changes::record(tx, Kind::Replicas, None, "", now_ms).await?;
    Ok(nodes)
}

/// Leaves the mesh cleanly (at shutdown): the replica's row goes and its nodes are offline.
pub async fn leave(st: &AppState) -> Result<(), DbError> {
    let mut tx = db::begin_write(&st.db).await?;
    drop_replica(&mut tx, &st.replica.id).await?;
    tx.commit().await?;
    Ok(())
}

/// Renews this replica's heartbeat, drops replicas that stopped beating (their nodes go
/// offline; ephemeral ones among them are collected later) and prunes old changes, every
/// [`HEARTBEAT`].
pub fn spawn_heartbeat(st: AppState) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(HEARTBEAT);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(e) = beat(&st).await {
                warn!(error = %e, "replica heartbeat failed");
            }
        }
    });
}

async fn beat(st: &AppState) -> Result<(), DbError> {
    let now_ms = unix_now_ms();
    let alive = {
        let mut c = st.db.acquire().await?;
        changes::heartbeat(&mut c, &st.replica.id, now_ms).await?
    };
    if !alive {
        // The others took us for dead (a long stall): join again and claim our sessions.
        warn!(replica = %st.replica.id, "this replica was dropped by the others; rejoining");
        join(st).await?;
        let mine: Vec<NodeId> = st.hub.connected_here();
        st.presence.claim(mine);
    }
    let all = {
        let mut c = st.db.acquire().await?;
        changes::replicas(&mut c).await?
    };
    let live = live_replicas(&all, now_ms);
    let dead: Vec<_> = all
        .iter()
        .filter(|r| r.id != st.replica.id && !live.contains(r))
        .collect();
    if !dead.is_empty() {
        let mut tx = db::begin_write(&st.db).await?;
        let mut orphans = Vec::new();
        for r in &dead {
            // Checked again under the lock: another replica may have dropped it already.
            if changes::replicas(&mut tx).await?.iter().any(|x| {
                x.id == r.id && now_ms - x.heartbeat_ms > REPLICA_TIMEOUT.as_millis() as i64
            }) {
                orphans.extend(drop_replica(&mut tx, &r.id).await?);
                warn!(replica = %r.id, url = ?r.public_url, "dropped a replica that stopped beating");
            }
        }
        let last = changes::last(&mut tx).await?;
        tx.commit().await?;
        sync(st, last).await;
        for id in orphans {
            if st.hub.read().node(id).is_some_and(|n| n.record.ephemeral) {
                crate::api::control::schedule_ephemeral_collection(st.clone(), id);
            }
        }
    }
    let prune_before = now_ms - i64::try_from(KEEP_CHANGES.as_millis()).unwrap_or(i64::MAX);
    let mut c = st.db.acquire().await?;
    changes::prune(&mut c, prune_before).await?;
    Ok(())
}

/// Brings this replica up to date with the database and starts following it: loads the
/// committed state, joins the replicas, and starts the feed follower, the heartbeat and the
/// presence writer.
pub async fn start(st: &AppState) -> Result<(), DbError> {
    st.hub.report_presence_to(st.presence.sender());
    reload(st).await?;
    join(st).await?;
    spawn_follower(st.clone());
    spawn_heartbeat(st.clone());
    crate::presence::spawn_writer(st.clone());
    Ok(())
}

/// Records a change in write transaction `tx` (see [`changes::record`]); returns its number.
pub async fn note(
    tx: &mut sqlx::AnyConnection,
    kind: Kind,
    node: Option<NodeId>,
    kick: Option<KickDetail>,
) -> Result<i64, DbError> {
    let detail = kick.map(|k| k.to_json()).unwrap_or_default();
    changes::record(tx, kind, node, &detail, unix_now_ms()).await
}

/// Commits `tx`, whose last recorded change is `seq`, and waits until this replica applied it.
pub async fn commit(st: &AppState, tx: db::Tx, seq: i64) -> Result<(), DbError> {
    tx.commit().await?;
    sync(st, seq).await;
    Ok(())
}
