//! The `auth_keys` and `admin_tokens` tables. Secrets are stored as hashes only.

use sqlx::{AnyConnection, FromRow};

use super::DbError;
use crate::model::AuthKeyInfo;

#[derive(FromRow)]
struct AuthKeyRow {
    id: String,
    secret_hash: Vec<u8>,
    // Flags are integers in both databases (the Any driver decodes SQLite's as integers).
    reusable: i64,
    ephemeral: i64,
    tags: String,
    user_name: Option<String>,
    created_at: i64,
    created_by: String,
    expires_at: i64,
    revoked_at: Option<i64>,
    used_count: i64,
}

macro_rules! select_keys {
    ($rest:literal) => {
        concat!(
            "SELECT id, secret_hash, reusable, ephemeral, tags, user_name, created_at, ",
            "created_by, expires_at, revoked_at, used_count FROM auth_keys ",
            $rest
        )
    };
}

impl AuthKeyRow {
    fn split(self) -> Result<(AuthKeyInfo, Vec<u8>), DbError> {
        let tags = serde_json::from_str(&self.tags).map_err(|_| DbError::Corrupt {
            table: "auth_keys",
            detail: format!("key {}: bad tags", self.id),
        })?;
        Ok((
            AuthKeyInfo {
                id: self.id,
                reusable: self.reusable != 0,
                ephemeral: self.ephemeral != 0,
                tags,
                user: self.user_name,
                created_at: self.created_at,
                created_by: self.created_by,
                expires_at: self.expires_at,
                revoked_at: self.revoked_at,
                used_count: self.used_count,
            },
            self.secret_hash,
        ))
    }
}

/// Stores a new auth key.
pub async fn insert_auth_key(
    conn: &mut AnyConnection,
    info: &AuthKeyInfo,
    secret_hash: &[u8; 32],
) -> Result<(), DbError> {
    sqlx::query(
        "INSERT INTO auth_keys (id, secret_hash, reusable, ephemeral, tags, user_name, created_at,
                                created_by, expires_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(&info.id)
    .bind(secret_hash.as_slice())
    .bind(i64::from(info.reusable))
    .bind(i64::from(info.ephemeral))
    .bind(serde_json::to_string(&info.tags).expect("strings serialize"))
    .bind(&info.user)
    .bind(info.created_at)
    .bind(&info.created_by)
    .bind(info.expires_at)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// An auth key and its stored secret hash.
pub async fn auth_key(
    conn: &mut AnyConnection,
    id: &str,
) -> Result<Option<(AuthKeyInfo, Vec<u8>)>, DbError> {
    let row: Option<AuthKeyRow> = sqlx::query_as(select_keys!("WHERE id = $1"))
        .bind(id)
        .fetch_optional(&mut *conn)
        .await?;
    row.map(AuthKeyRow::split).transpose()
}

/// Atomically records one use of the key, if it is still usable at `now`. Returns whether it
/// was. This single conditional UPDATE is what makes a single-use key register exactly one node
/// when several registrations race for it.
pub async fn consume_auth_key(
    conn: &mut AnyConnection,
    id: &str,
    now: i64,
) -> Result<bool, DbError> {
    let done = sqlx::query(
        "UPDATE auth_keys SET used_count = used_count + 1, last_used_at = $1
         WHERE id = $2 AND revoked_at IS NULL AND expires_at > $3
           AND (reusable = 1 OR used_count = 0)",
    )
    .bind(now)
    .bind(id)
    .bind(now)
    .execute(&mut *conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// All auth keys, newest first.
pub async fn list_auth_keys(conn: &mut AnyConnection) -> Result<Vec<AuthKeyInfo>, DbError> {
    let rows: Vec<AuthKeyRow> = sqlx::query_as(select_keys!("ORDER BY created_at DESC, id"))
        .fetch_all(&mut *conn)
        .await?;
    rows.into_iter()
        .map(|r| r.split().map(|(i, _)| i))
        .collect()
}

/// Revokes a key. Returns false if there is no such key or it was already revoked.
pub async fn revoke_auth_key(
    conn: &mut AnyConnection,
    id: &str,
    now: i64,
) -> Result<bool, DbError> {
    let done =
        sqlx::query("UPDATE auth_keys SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL")
            .bind(now)
            .bind(id)
            .execute(&mut *conn)
            .await?;
    Ok(done.rows_affected() == 1)
}

/// Stores a new admin token.
pub async fn insert_admin_token(
    conn: &mut AnyConnection,
    t: NewAdminToken<'_>,
) -> Result<(), DbError> {
    sqlx::query(
        "INSERT INTO admin_tokens (id, secret_hash, created_at, created_by, scope, expires_at)
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(t.id)
    .bind(t.secret_hash.as_slice())
    .bind(t.now)
    .bind(t.created_by)
    .bind(t.scope.as_str())
    .bind(t.expires_at)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// An admin token to store.
pub struct NewAdminToken<'a> {
    /// Public id (hex).
    pub id: &'a str,
    /// Hash of the secret.
    pub secret_hash: &'a [u8; 32],
    /// Who created it.
    pub created_by: &'a str,
    /// What it may do.
    pub scope: TokenScope,
    /// Unix seconds after which it is refused.
    pub expires_at: i64,
    /// Unix seconds.
    pub now: i64,
}

/// What an admin token may do.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum TokenScope {
    /// Read (GET) only.
    Read,
    /// Read and change (everything but token management).
    Write,
}

impl TokenScope {
    /// The stored form.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Write => "write",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "read" => Some(Self::Read),
            "write" => Some(Self::Write),
            _ => None,
        }
    }
}

/// A live admin token's stored hash, scope and expiry.
pub struct StoredToken {
    /// Hash of the secret.
    pub secret_hash: Vec<u8>,
    /// What it may do.
    pub scope: TokenScope,
    /// Unix seconds after which it is refused.
    pub expires_at: i64,
    /// Who created it (`session:user:NAME` for a person's admin sign-in).
    pub created_by: String,
}

/// The live (not revoked) admin token with `id`.
pub async fn admin_token(
    conn: &mut AnyConnection,
    id: &str,
) -> Result<Option<StoredToken>, DbError> {
    let row: Option<(Vec<u8>, String, Option<i64>, String)> = sqlx::query_as(
        "SELECT secret_hash, scope, expires_at, created_by FROM admin_tokens
         WHERE id = $1 AND revoked_at IS NULL",
    )
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?;
    row.map(|(secret_hash, scope, expires_at, created_by)| {
        Ok(StoredToken {
            secret_hash,
            created_by,
            scope: TokenScope::parse(&scope).ok_or_else(|| DbError::Corrupt {
                table: "admin_tokens",
                detail: format!("unknown scope {scope:?}"),
            })?,
            // A token without an expiry is refused (none is ever stored without one).
            expires_at: expires_at.unwrap_or(0),
        })
    })
    .transpose()
}

/// A token as `token list` shows it (never its secret).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TokenInfo {
    /// Public id.
    pub id: String,
    /// What it may do.
    pub scope: String,
    /// Who created it.
    pub created_by: String,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds.
    pub expires_at: Option<i64>,
    /// Unix seconds, if revoked.
    pub revoked_at: Option<i64>,
}

/// Every admin token, newest first.
pub async fn admin_tokens(conn: &mut AnyConnection) -> Result<Vec<TokenInfo>, DbError> {
    type Row = (String, String, String, i64, Option<i64>, Option<i64>);
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT id, scope, created_by, created_at, expires_at, revoked_at FROM admin_tokens
         ORDER BY created_at DESC, id",
    )
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(
            |(id, scope, created_by, created_at, expires_at, revoked_at)| TokenInfo {
                id,
                scope,
                created_by,
                created_at,
                expires_at,
                revoked_at,
            },
        )
        .collect())
}

/// Revokes an admin token. Returns whether one was revoked.
pub async fn revoke_admin_token(
    conn: &mut AnyConnection,
    id: &str,
    now: i64,
) -> Result<bool, DbError> {
    let done =
        sqlx::query("UPDATE admin_tokens SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL")
            .bind(now)
            .bind(id)
            .execute(&mut *conn)
            .await?;
    Ok(done.rows_affected() == 1)
}
