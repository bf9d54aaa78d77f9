//! The `access_requests` table: just-in-time access asked for, decided, in force, ended.

use serde::{Deserialize, Serialize};
use sqlx::{AnyConnection, FromRow};

use super::DbError;

/// An access request as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, FromRow)]
pub struct AccessRequest {
    /// Id.
    pub id: i64,
    /// The node that asked (its addresses get the grant).
    pub node_id: i64,
    /// Its name when it asked.
    pub node_name: String,
    /// Its user, if a person's node.
    pub user_name: Option<String>,
    /// The destination (`tag:prod`).
    pub dst: String,
    /// The ports (`22,5432`).
    pub ports: String,
    /// How long the grant lasts once approved, seconds.
    pub duration_s: i64,
    /// Why (the requester's words).
    pub reason: String,
    /// `pending`, `approved`, `denied` or `expired`.
    pub status: String,
    /// When it was filed (Unix seconds).
    pub created_at: i64,
    /// Who approved or denied it.
    pub decided_by: Option<String>,
    /// When.
    pub decided_at: Option<i64>,
    /// For an approved request, when the grant ends.
    pub expires_at: Option<i64>,
}

macro_rules! select_requests {
    ($rest:literal) => {
        concat!(
            "SELECT id, node_id, node_name, user_name, dst, ports, duration_s, reason, status, ",
            "created_at, decided_by, decided_at, expires_at FROM access_requests ",
            $rest
        )
    };
}

/// A request to file.
pub struct NewRequest<'a> {
    /// The node.
    pub node_id: i64,
    /// Its name.
    pub node_name: &'a str,
    /// Its user.
    pub user_name: Option<&'a str>,
    /// Destination.
    pub dst: &'a str,
    /// Ports.
    pub ports: &'a str,
    /// Duration, seconds.
    pub duration_s: i64,
    /// Reason.
    pub reason: &'a str,
    /// Now.
    pub now: i64,
}

/// Files a request; returns its id.
pub async fn insert(conn: &mut AnyConnection, r: NewRequest<'_>) -> Result<i64, DbError> {
    let (id,): (i64,) = sqlx::query_as(
        "INSERT INTO access_requests (node_id, node_name, user_name, dst, ports, duration_s, \
         reason, status, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, 'pending', $8) \
         RETURNING id",
    )
    .bind(r.node_id)
    .bind(r.node_name)
    .bind(r.user_name)
    .bind(r.dst)
    .bind(r.ports)
    .bind(r.duration_s)
    .bind(r.reason)
    .bind(r.now)
    .fetch_one(&mut *conn)
    .await?;
    Ok(id)
}

/// How many requests of `node_id` are pending.
pub async fn pending_of(conn: &mut AnyConnection, node_id: i64) -> Result<i64, DbError> {
    let (n,): (i64,) = sqlx::query_as(
        "SELECT COUNT(*) FROM access_requests WHERE node_id = $1 AND status = 'pending'",
    )
    .bind(node_id)
    .fetch_one(&mut *conn)
    .await?;
    Ok(n)
}

/// Request `id`.
pub async fn get(conn: &mut AnyConnection, id: i64) -> Result<Option<AccessRequest>, DbError> {
    Ok(sqlx::query_as(select_requests!("WHERE id = $1"))
        .bind(id)
        .fetch_optional(&mut *conn)
        .await?)
}

/// Requests, newest first: all of them, or only those pending or in force at `now`.
pub async fn list(
    conn: &mut AnyConnection,
    all: bool,
    now: i64,
) -> Result<Vec<AccessRequest>, DbError> {
    let rows = if all {
        sqlx::query_as(select_requests!("ORDER BY id DESC"))
            .fetch_all(&mut *conn)
            .await?
    } else {
        sqlx::query_as(select_requests!(
            "WHERE status = 'pending' OR (status = 'approved' AND expires_at > $1) ORDER BY id DESC"
        ))
        .bind(now)
        .fetch_all(&mut *conn)
        .await?
    };
    Ok(rows)
}

/// Approved requests whose grant is in force at `now`.
pub async fn in_force(conn: &mut AnyConnection, now: i64) -> Result<Vec<AccessRequest>, DbError> {
    Ok(sqlx::query_as(select_requests!(
        "WHERE status = 'approved' AND expires_at > $1 ORDER BY id"
    ))
    .bind(now)
    .fetch_all(&mut *conn)
    .await?)
}

/// Decides a pending request: `approved` (until `expires_at`) or `denied`. False if it was
/// not pending (decided already, by someone else in the meantime).
pub async fn decide(
    conn: &mut AnyConnection,
    id: i64,
    status: &str,
    by: &str,
    now: i64,
    expires_at: Option<i64>,
) -> Result<bool, DbError> {
    let n = sqlx::query(
        "UPDATE access_requests SET status = $1, decided_by = $2, decided_at = $3, \
         expires_at = $4 WHERE id = $5 AND status = 'pending'",
    )
    .bind(status)
    .bind(by)
    .bind(now)
    .bind(expires_at)
    .bind(id)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    Ok(n == 1)
}

/// Marks grants that ended by `now` as expired, and pending requests older than
/// `pending_ttl` as expired too; returns the ids.
pub async fn expire_due(
    conn: &mut AnyConnection,
    now: i64,
    pending_ttl: i64,
) -> Result<Vec<i64>, DbError> {
    let ids: Vec<(i64,)> = sqlx::query_as(
        "SELECT id FROM access_requests WHERE (status = 'approved' AND expires_at <= $1) \
         OR (status = 'pending' AND created_at <= $2) ORDER BY id",
    )
    .bind(now)
    .bind(now - pending_ttl)
    .fetch_all(&mut *conn)
    .await?;
    for (id,) in &ids {
        sqlx::query("UPDATE access_requests SET status = 'expired' WHERE id = $1")
            .bind(id)
            .execute(&mut *conn)
            .await?;
    }
    Ok(ids.into_iter().map(|(i,)| i).collect())
}
