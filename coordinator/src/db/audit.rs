//! The `audit` and `audit_head` tables.

use sqlx::{AnyConnection, FromRow};

use super::DbError;
use hybrid::sign::Signer;

use crate::audit::{self, Entry, GENESIS, Head, NewEntry};

#[derive(FromRow)]
struct Row {
    seq: i64,
    at_ms: i64,
    actor: String,
    action: String,
    target: String,
    detail: String,
    prev_hash: String,
    hash: String,
    sig: String,
}

impl From<Row> for Entry {
    fn from(r: Row) -> Self {
        Self {
            seq: r.seq,
            at_ms: r.at_ms,
            actor: r.actor,
            action: r.action,
            target: r.target,
            detail: r.detail,
            prev_hash: r.prev_hash,
            hash: r.hash,
            sig: r.sig,
        }
    }
}

/// Appends an entry, signed with `key`. Must run inside a write transaction so the chain
/// cannot fork.
pub async fn append(
    conn: &mut AnyConnection,
    key: &Signer,
    entry: NewEntry,
    at_ms: i64,
) -> Result<Entry, DbError> {
    let (seq, hash) = head(conn)
        .await?
        .map_or_else(|| (0, GENESIS.to_owned()), |h| (h.seq, h.hash));
    let e = entry.chain(seq, &hash, at_ms, key);
    sqlx::query(
        "INSERT INTO audit (seq, at_ms, actor, action, target, detail, prev_hash, hash, sig)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(e.seq)
    .bind(e.at_ms)
    .bind(&e.actor)
    .bind(&e.action)
    .bind(&e.target)
    .bind(&e.detail)
    .bind(&e.prev_hash)
    .bind(&e.hash)
    .bind(&e.sig)
    .execute(&mut *conn)
    .await?;
    sqlx::query(
        "INSERT INTO audit_head (id, seq, hash, sig) VALUES (1, $1, $2, $3)
         ON CONFLICT (id) DO UPDATE SET seq = excluded.seq, hash = excluded.hash,
                                        sig = excluded.sig",
    )
    .bind(e.seq)
    .bind(&e.hash)
    .bind(audit::sign_head(key, e.seq, &e.hash))
    .execute(&mut *conn)
    .await?;
    Ok(e)
}

/// The recorded end of the chain.
pub async fn head(conn: &mut AnyConnection) -> Result<Option<Head>, DbError> {
    let row: Option<(i64, String, String)> =
        sqlx::query_as("SELECT seq, hash, sig FROM audit_head WHERE id = 1")
            .fetch_optional(&mut *conn)
            .await?;
    Ok(row.map(|(seq, hash, sig)| Head { seq, hash, sig }))
}

/// The hash of entry `seq`, if it exists.
pub async fn hash_of(conn: &mut AnyConnection, seq: i64) -> Result<Option<String>, DbError> {
    let row: Option<(String,)> = sqlx::query_as("SELECT hash FROM audit WHERE seq = $1")
        .bind(seq)
        .fetch_optional(&mut *conn)
        .await?;
    Ok(row.map(|(h,)| h))
}

/// Entries with `seq > after`, oldest first, at most `limit`.
pub async fn list(conn: &mut AnyConnection, after: i64, limit: i64) -> Result<Vec<Entry>, DbError> {
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT seq, at_ms, actor, action, target, detail, prev_hash, hash, sig FROM audit
         WHERE seq > $1 ORDER BY seq LIMIT $2",
    )
    .bind(after)
    .bind(limit)
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows.into_iter().map(Entry::from).collect())
}
