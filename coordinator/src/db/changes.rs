//! The `changes` table: the feed every replica follows, and the `replicas` table.
//!
//! A change row is written in the same write transaction as the change itself, numbered
//! `MAX(seq) + 1` while [`super::begin_write`]'s lock is held, so row numbers follow commit
//! order with no gaps: a replica that has applied row `n` has seen every change up to `n`.

use sqlx::{AnyConnection, FromRow};
use wire::NodeId;

use super::{Backend, DbError, backend_of};

/// The PostgreSQL notification channel that announces new rows.
pub const CHANNEL: &str = "lattice_changes";

/// What changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A node was added, changed, removed or expired (its row says which).
    Node,
    /// A policy version was set.
    Policy,
    /// The relay list changed.
    Relays,
    /// A mesh-wide setting changed.
    Settings,
    /// A replica joined or left.
    Replicas,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Self::Node => "node",
            Self::Policy => "policy",
            Self::Relays => "relays",
            Self::Settings => "settings",
            Self::Replicas => "replicas",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "node" => Self::Node,
            "policy" => Self::Policy,
            "relays" => Self::Relays,
            "settings" => Self::Settings,
            "replicas" => Self::Replicas,
            _ => return None,
        })
    }
}

/// One committed change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// Its number in commit order.
    pub seq: i64,
    /// What changed.
    pub kind: Kind,
    /// The node, for [`Kind::Node`].
    pub node: Option<NodeId>,
    /// JSON detail (what a removed or expired node is told), or empty.
    pub detail: String,
}

#[derive(FromRow)]
struct Row {
    seq: i64,
    kind: String,
    node_id: Option<i64>,
    detail: String,
}

/// Records a change inside the current write transaction and returns its number. Call it only
/// on a connection from [`super::begin_write`].
pub async fn record(
    conn: &mut AnyConnection,
    kind: Kind,
    node: Option<NodeId>,
    detail: &str,
    at_ms: i64,
) -> Result<i64, DbError> {
    let (seq,): (i64,) = sqlx::query_as(
        "INSERT INTO changes (seq, at_ms, kind, node_id, detail)
         SELECT COALESCE(MAX(seq), 0) + 1, $1, $2, $3, $4 FROM changes RETURNING seq",
    )
    .bind(at_ms)
    .bind(kind.as_str())
    .bind(node.map(|n| i64::try_from(n.0).unwrap_or(i64::MAX)))
    .bind(detail)
    .fetch_one(&mut *conn)
    .await?;
    if backend_of(conn) == Backend::Postgres {
        // Delivered to every listening replica when (and only if) the transaction commits.
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(CHANNEL)
            .bind(seq.to_string())
            .execute(&mut *conn)
            .await?;
    }
    Ok(seq)
}

/// Changes after `after`, oldest first, at most `limit`.
pub async fn since(
    conn: &mut AnyConnection,
    after: i64,
    limit: i64,
) -> Result<Vec<Change>, DbError> {
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT seq, kind, node_id, detail FROM changes WHERE seq > $1 ORDER BY seq LIMIT $2",
    )
    .bind(after)
    .bind(limit)
    .fetch_all(&mut *conn)
    .await?;
    rows.into_iter()
        .map(|r| {
            let kind = Kind::parse(&r.kind).ok_or_else(|| DbError::Corrupt {
                table: "changes",
                detail: format!("change {}: unknown kind {:?}", r.seq, r.kind),
            })?;
            Ok(Change {
                seq: r.seq,
                kind,
                node: r.node_id.and_then(|n| u64::try_from(n).ok()).map(NodeId),
                detail: r.detail,
            })
        })
        .collect()
}

/// The newest change number (0 before the first change).
pub async fn last(conn: &mut AnyConnection) -> Result<i64, DbError> {
    let (seq,): (i64,) = sqlx::query_as("SELECT COALESCE(MAX(seq), 0) FROM changes")
        .fetch_one(&mut *conn)
        .await?;
    Ok(seq)
}

/// The oldest change number still kept (0 when there are none).
pub async fn first(conn: &mut AnyConnection) -> Result<i64, DbError> {
    let (seq,): (i64,) = sqlx::query_as("SELECT COALESCE(MIN(seq), 0) FROM changes")
        .fetch_one(&mut *conn)
        .await?;
    Ok(seq)
}

/// Forgets changes older than `before_ms`, always keeping the newest. A replica that was
/// behind by more than that reloads everything.
pub async fn prune(conn: &mut AnyConnection, before_ms: i64) -> Result<u64, DbError> {
    let done = sqlx::query(
        "DELETE FROM changes WHERE at_ms < $1 AND seq < (SELECT MAX(seq) FROM changes)",
    )
    .bind(before_ms)
    .execute(&mut *conn)
    .await?;
    Ok(done.rows_affected())
}

/// A replica as the `replicas` table holds it.
#[derive(Debug, Clone, PartialEq, Eq, FromRow)]
pub struct Replica {
    /// Random id, new on every start.
    pub id: String,
    /// The URL nodes use to reach it, if it has one.
    pub public_url: Option<String>,
    /// Its embedded relay (JSON), if it runs one.
    pub relay: Option<String>,
    /// When it started, unix ms.
    pub started_ms: i64,
    /// Its last heartbeat, unix ms.
    pub heartbeat_ms: i64,
}

/// Adds (or renews) a replica.
pub async fn add_replica(
    conn: &mut AnyConnection,
    id: &str,
    public_url: Option<&str>,
    relay: Option<&str>,
    now_ms: i64,
) -> Result<(), DbError> {
    sqlx::query(
        "INSERT INTO replicas (id, public_url, relay, started_ms, heartbeat_ms)
         VALUES ($1, $2, $3, $4, $4)
         ON CONFLICT (id) DO UPDATE SET public_url = excluded.public_url, relay = excluded.relay,
                                        heartbeat_ms = excluded.heartbeat_ms",
    )
    .bind(id)
    .bind(public_url)
    .bind(relay)
    .bind(now_ms)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Renews a replica's heartbeat; false if its row is gone (the others dropped it).
pub async fn heartbeat(conn: &mut AnyConnection, id: &str, now_ms: i64) -> Result<bool, DbError> {
    let done = sqlx::query("UPDATE replicas SET heartbeat_ms = $1 WHERE id = $2")
        .bind(now_ms)
        .bind(id)
        .execute(&mut *conn)
        .await?;
    Ok(done.rows_affected() > 0)
}

/// Every replica, oldest first.
pub async fn replicas(conn: &mut AnyConnection) -> Result<Vec<Replica>, DbError> {
    Ok(sqlx::query_as(
        "SELECT id, public_url, relay, started_ms, heartbeat_ms FROM replicas ORDER BY started_ms, id",
    )
    .fetch_all(&mut *conn)
    .await?)
}

/// Removes a replica's row; true if it was there.
pub async fn remove_replica(conn: &mut AnyConnection, id: &str) -> Result<bool, DbError> {
    let done = sqlx::query("DELETE FROM replicas WHERE id = $1")
        .bind(id)
        .execute(&mut *conn)
        .await?;
    Ok(done.rows_affected() > 0)
}
