//! The `policies` table: every version ever set; the newest is in force.

use serde::{Deserialize, Serialize};
use sqlx::{AnyConnection, FromRow};

use super::DbError;

/// One stored policy version.
#[derive(Debug, Clone, PartialEq, Eq, FromRow, Serialize, Deserialize)]
pub struct StoredPolicy {
    /// Version number, starting at 1.
    pub version: i64,
    /// The file name it was set from.
    pub file_name: String,
    /// The text exactly as submitted.
    pub text: String,
    /// Hex SHA-256 of `text`.
    pub sha256: String,
    /// When it was set, unix milliseconds.
    pub set_at_ms: i64,
    /// Who set it.
    pub set_by: String,
}

/// A version without its text, for listings.
#[derive(Debug, Clone, PartialEq, Eq, FromRow, Serialize, Deserialize)]
pub struct PolicyVersion {
    /// Version number.
    pub version: i64,
    /// The file name it was set from.
    pub file_name: String,
    /// Hex SHA-256 of the text.
    pub sha256: String,
    /// When it was set, unix milliseconds.
    pub set_at_ms: i64,
    /// Who set it.
    pub set_by: String,
}

/// Stores a new version and returns its number.
pub async fn insert(
    conn: &mut AnyConnection,
    file_name: &str,
    text: &str,
    sha256: &str,
    actor: &str,
    at_ms: i64,
) -> Result<i64, DbError> {
    let (v,): (i64,) = sqlx::query_as(
        "INSERT INTO policies (file_name, text, sha256, set_at_ms, set_by)
         VALUES ($1, $2, $3, $4, $5) RETURNING version",
    )
    .bind(file_name)
    .bind(text)
    .bind(sha256)
    .bind(at_ms)
    .bind(actor)
    .fetch_one(&mut *conn)
    .await?;
    Ok(v)
}

/// The version in force, if any was ever set.
pub async fn current(conn: &mut AnyConnection) -> Result<Option<StoredPolicy>, DbError> {
    Ok(sqlx::query_as(
        "SELECT version, file_name, text, sha256, set_at_ms, set_by FROM policies
         ORDER BY version DESC LIMIT 1",
    )
    .fetch_optional(&mut *conn)
    .await?)
}

/// One version.
pub async fn get(conn: &mut AnyConnection, version: i64) -> Result<Option<StoredPolicy>, DbError> {
    Ok(sqlx::query_as(
        "SELECT version, file_name, text, sha256, set_at_ms, set_by FROM policies WHERE version = $1",
    )
    .bind(version)
    .fetch_optional(&mut *conn)
    .await?)
}

/// Every version, oldest first, without texts.
pub async fn versions(conn: &mut AnyConnection) -> Result<Vec<PolicyVersion>, DbError> {
    Ok(sqlx::query_as(
        "SELECT version, file_name, sha256, set_at_ms, set_by FROM policies ORDER BY version",
    )
    .fetch_all(&mut *conn)
    .await?)
}
