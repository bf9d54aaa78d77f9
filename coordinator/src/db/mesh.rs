//! The mesh settings row.

use ipnet::Ipv6Net;
use sqlx::AnyConnection;
use wire::TunnelSecurity;

use super::DbError;

/// Mesh-wide settings fixed at creation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshSettings {
    /// DNS domain (`mesh.internal`).
    pub domain: String,
    /// The mesh's ULA /48.
    pub ula_prefix: Ipv6Net,
}

/// Reads the settings, creating them with `domain` and `ula` on first start.
pub async fn get_or_create(
    conn: &mut AnyConnection,
    domain: &str,
    ula: Ipv6Net,
    now: i64,
) -> Result<MeshSettings, DbError> {
    sqlx::query(
        "INSERT INTO mesh (id, domain, ula_prefix, next_ipv4, created_at)
         VALUES (1, $1, $2, 1, $3) ON CONFLICT (id) DO NOTHING",
    )
    .bind(domain)
    .bind(ula.to_string())
    .bind(now)
    .execute(&mut *conn)
    .await?;
    let (domain, ula): (String, String) =
        sqlx::query_as("SELECT domain, ula_prefix FROM mesh WHERE id = 1")
            .fetch_one(&mut *conn)
            .await?;
    let ula_prefix = ula.parse().map_err(|_| DbError::Corrupt {
        table: "mesh",
        detail: format!("bad ula_prefix {ula:?}"),
    })?;
    Ok(MeshSettings { domain, ula_prefix })
}

/// The mesh's tunnel security.
pub async fn tunnel_security(conn: &mut AnyConnection) -> Result<TunnelSecurity, DbError> {
    let (v,): (String,) = sqlx::query_as("SELECT tunnel_security FROM mesh WHERE id = 1")
        .fetch_one(&mut *conn)
        .await?;
    serde_json::from_value(serde_json::Value::String(v.clone())).map_err(|_| DbError::Corrupt {
        table: "mesh",
        detail: format!("bad tunnel_security {v:?}"),
    })
}

/// Sets the mesh's tunnel security.
pub async fn set_tunnel_security(
    conn: &mut AnyConnection,
    security: TunnelSecurity,
) -> Result<(), DbError> {
    let v = serde_json::to_value(security).expect("plain enum");
    sqlx::query("UPDATE mesh SET tunnel_security = $1 WHERE id = 1")
        .bind(v.as_str().unwrap_or("post_quantum"))
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Default lifetime of a user-owned node's key: 180 days.
pub const DEFAULT_KEY_EXPIRY_S: i64 = 180 * 86_400;

/// How long user-owned node keys last and how often users must sign in again, in seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyLifetimes {
    /// Key lifetime (default [`DEFAULT_KEY_EXPIRY_S`]).
    pub key_expiry_s: i64,
    /// Re-authentication interval, if the mesh demands one.
    pub reauth_every_s: Option<i64>,
}

impl KeyLifetimes {
    /// When a key issued at `now` to a user (with their own lifetime, if an admin set one)
    /// expires: the shorter of the key lifetime and the re-authentication interval.
    pub fn expiry(&self, user_key_expiry_s: Option<i64>, now: i64) -> i64 {
        let life = user_key_expiry_s.unwrap_or(self.key_expiry_s);
        let life = self.reauth_every_s.map_or(life, |r| r.min(life));
        now.saturating_add(life.max(1))
    }
}

/// The mesh's key lifetimes.
pub async fn key_lifetimes(conn: &mut AnyConnection) -> Result<KeyLifetimes, DbError> {
    let (k, r): (Option<i64>, Option<i64>) =
        sqlx::query_as("SELECT key_expiry_s, reauth_every_s FROM mesh WHERE id = 1")
            .fetch_one(&mut *conn)
            .await?;
    Ok(KeyLifetimes {
        key_expiry_s: k.unwrap_or(DEFAULT_KEY_EXPIRY_S),
        reauth_every_s: r,
    })
}

/// Sets the mesh's key lifetimes.
pub async fn set_key_lifetimes(conn: &mut AnyConnection, l: KeyLifetimes) -> Result<(), DbError> {
    sqlx::query("UPDATE mesh SET key_expiry_s = $1, reauth_every_s = $2 WHERE id = 1")
        .bind(l.key_expiry_s)
        .bind(l.reauth_every_s)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// The next IPv4 offset to try.
pub async fn next_ipv4(conn: &mut AnyConnection) -> Result<u32, DbError> {
    let (n,): (i64,) = sqlx::query_as("SELECT next_ipv4 FROM mesh WHERE id = 1")
        .fetch_one(&mut *conn)
        .await?;
    Ok(u32::try_from(n).unwrap_or(1))
}

/// Records the offset after the one just allocated.
pub async fn set_next_ipv4(conn: &mut AnyConnection, next: u32) -> Result<(), DbError> {
    sqlx::query("UPDATE mesh SET next_ipv4 = $1 WHERE id = 1")
        .bind(i64::from(next))
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// The mesh's public keys (hex), as the `mesh` row records them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshKeys {
    /// The control key nodes pin.
    pub control: String,
    /// The key relays check tickets with.
    pub ticket: String,
    /// The key audit entries are signed with.
    pub audit: String,
}

/// Records `keys` as the mesh's if none are recorded yet, and returns the recorded ones.
pub async fn claim_keys(conn: &mut AnyConnection, keys: &MeshKeys) -> Result<MeshKeys, DbError> {
    sqlx::query(
        "UPDATE mesh SET control_key = $1, ticket_key = $2, audit_key = $3
         WHERE id = 1 AND control_key IS NULL",
    )
    .bind(&keys.control)
    .bind(&keys.ticket)
    .bind(&keys.audit)
    .execute(&mut *conn)
    .await?;
    let (control, ticket, audit): (Option<String>, Option<String>, Option<String>) =
        sqlx::query_as("SELECT control_key, ticket_key, audit_key FROM mesh WHERE id = 1")
            .fetch_one(&mut *conn)
            .await?;
    let missing = || DbError::Corrupt {
        table: "mesh",
        detail: "the mesh's public keys are partly missing".into(),
    };
    Ok(MeshKeys {
        control: control.ok_or_else(missing)?,
        ticket: ticket.ok_or_else(missing)?,
        audit: audit.ok_or_else(missing)?,
    })
}
