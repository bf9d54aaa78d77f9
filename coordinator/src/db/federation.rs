//! The `federation_rules` table: which outside issuers' tokens may join, and as what.

use sqlx::{AnyConnection, FromRow};

use super::DbError;
use crate::federation::TrustRule;

#[derive(FromRow)]
struct Row {
    id: i64,
    issuer: String,
    audience: String,
    matches: String,
    tags: String,
    ephemeral: i64,
    max_lifetime_s: Option<i64>,
}

impl TryFrom<Row> for TrustRule {
    type Error = DbError;

    fn try_from(r: Row) -> Result<Self, DbError> {
        let corrupt = |what: &str| DbError::Corrupt {
            table: "federation_rules",
            detail: format!("rule {}: bad {what}", r.id),
        };
        Ok(Self {
            id: r.id,
            matches: serde_json::from_str(&r.matches).map_err(|_| corrupt("matches"))?,
            tags: serde_json::from_str(&r.tags).map_err(|_| corrupt("tags"))?,
            ephemeral: r.ephemeral != 0,
            max_lifetime_s: r
                .max_lifetime_s
                .map(u64::try_from)
                .transpose()
                .map_err(|_| corrupt("max_lifetime_s"))?,
            issuer: r.issuer,
            audience: r.audience,
        })
    }
}

/// Every rule, by id.
pub async fn all(conn: &mut AnyConnection) -> Result<Vec<TrustRule>, DbError> {
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT id, issuer, audience, matches, tags, ephemeral, max_lifetime_s FROM federation_rules ORDER BY id",
    )
    .fetch_all(&mut *conn)
    .await?;
    rows.into_iter().map(TrustRule::try_from).collect()
}

/// The rules for one issuer, by id.
pub async fn for_issuer(conn: &mut AnyConnection, issuer: &str) -> Result<Vec<TrustRule>, DbError> {
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT id, issuer, audience, matches, tags, ephemeral, max_lifetime_s FROM federation_rules WHERE issuer = $1 ORDER BY id",
    )
    .bind(issuer)
    .fetch_all(&mut *conn)
    .await?;
    rows.into_iter().map(TrustRule::try_from).collect()
}

/// Stores a rule (its `id` is assigned) and returns it.
pub async fn insert(
    conn: &mut AnyConnection,
    r: &TrustRule,
    actor: &str,
    now: i64,
) -> Result<TrustRule, DbError> {
    let (id,): (i64,) = sqlx::query_as(
        "INSERT INTO federation_rules
             (issuer, audience, matches, tags, ephemeral, max_lifetime_s, created_at, created_by)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING id",
    )
    .bind(&r.issuer)
    .bind(&r.audience)
    .bind(serde_json::to_string(&r.matches).expect("strings serialize"))
    .bind(serde_json::to_string(&r.tags).expect("strings serialize"))
    .bind(i64::from(r.ephemeral))
    .bind(
        r.max_lifetime_s
            .map(|s| i64::try_from(s).unwrap_or(i64::MAX)),
    )
    .bind(now)
    .bind(actor)
    .fetch_one(&mut *conn)
    .await?;
    Ok(TrustRule { id, ..r.clone() })
}

/// Removes a rule; returns it if it existed.
pub async fn remove(conn: &mut AnyConnection, id: i64) -> Result<Option<TrustRule>, DbError> {
    let row: Option<Row> = sqlx::query_as(
        "DELETE FROM federation_rules WHERE id = $1 RETURNING id, issuer, audience, matches, tags, ephemeral, max_lifetime_s",
    )
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?;
    row.map(TrustRule::try_from).transpose()
}

/// Binds the token with `hash` to `machine` until `expires_at`. Returns the machine it was
/// already bound to when that is another one (and binds nothing). Drops bindings of tokens
/// that ended.
pub async fn bind_token(
    conn: &mut AnyConnection,
    hash: &str,
    machine: &wire::MachineKey,
    expires_at: i64,
    now: i64,
) -> Result<Option<String>, DbError> {
    sqlx::query("DELETE FROM federation_tokens WHERE expires_at < $1")
        .bind(now)
        .execute(&mut *conn)
        .await?;
    let mine = machine.to_text();
    let bound: Option<(String,)> =
        sqlx::query_as("SELECT machine_key FROM federation_tokens WHERE token_hash = $1")
            .bind(hash)
            .fetch_optional(&mut *conn)
            .await?;
    match bound {
        Some((other,)) if other != mine => Ok(Some(other)),
        Some(_) => Ok(None),
        None => {
            sqlx::query(
                "INSERT INTO federation_tokens (token_hash, machine_key, expires_at) VALUES ($1, $2, $3)",
            )
            .bind(hash)
            .bind(&mine)
            .bind(expires_at)
            .execute(&mut *conn)
            .await?;
            Ok(None)
        }
    }
}
