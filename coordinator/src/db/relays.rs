//! The `relays` table: standalone relays registered by admins.

use sqlx::{AnyConnection, FromRow};
use wire::{RelayId, RelayInfo};

use super::DbError;

#[derive(FromRow)]
struct Row {
    id: i64,
    name: String,
    relay_key: String,
    quic: Option<String>,
    cert_sha256: Option<String>,
    websocket: Option<String>,
    stun: String,
}

impl TryFrom<Row> for RelayInfo {
    type Error = DbError;

    fn try_from(r: Row) -> Result<Self, DbError> {
        let corrupt = |what: &str| DbError::Corrupt {
            table: "relays",
            detail: format!("relay {}: bad {what}", r.id),
        };
        Ok(Self {
            id: RelayId(u32::try_from(r.id).map_err(|_| corrupt("id"))?),
            key: r.relay_key.parse().map_err(|_| corrupt("relay_key"))?,
            quic: r
                .quic
                .map(|q| q.parse())
                .transpose()
                .map_err(|_| corrupt("quic"))?,
            cert_sha256: r
                .cert_sha256
                .map(|h| wire::keys::parse_hex::<32>(&h).map(wire::CertPin))
                .map(|o| o.ok_or(()))
                .transpose()
                .map_err(|()| corrupt("cert_sha256"))?,
            websocket: r.websocket,
            stun: serde_json::from_str(&r.stun).map_err(|_| corrupt("stun"))?,
            name: r.name,
        })
    }
}

/// Every registered relay, by id.
pub async fn all(conn: &mut AnyConnection) -> Result<Vec<RelayInfo>, DbError> {
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT id, name, relay_key, quic, cert_sha256, websocket, stun FROM relays ORDER BY id",
    )
    .fetch_all(&mut *conn)
    .await?;
    rows.into_iter().map(RelayInfo::try_from).collect()
}

/// Registers a relay (its `id` is assigned) and returns it.
pub async fn insert(
    conn: &mut AnyConnection,
    r: &RelayInfo,
    actor: &str,
    now: i64,
) -> Result<RelayInfo, DbError> {
    let pin = r.cert_sha256.map(|p| {
        let mut s = String::new();
        wire::keys::push_hex(&mut s, &p.0);
        s
    });
    let (id,): (i64,) = sqlx::query_as(
        "INSERT INTO relays (name, relay_key, quic, cert_sha256, websocket, stun, created_at, created_by)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING id",
    )
    .bind(&r.name)
    .bind(r.key.to_text())
    .bind(r.quic.map(|q| q.to_string()))
    .bind(pin)
    .bind(&r.websocket)
    .bind(serde_json::to_string(&r.stun).expect("addresses serialize"))
    .bind(now)
    .bind(actor)
    .fetch_one(&mut *conn)
    .await?;
    Ok(RelayInfo {
        id: RelayId(u32::try_from(id).map_err(|_| DbError::Corrupt {
            table: "relays",
            detail: "id out of range".into(),
        })?),
        ..r.clone()
    })
}

/// Removes the relay called `name`; returns whether it existed.
pub async fn remove(conn: &mut AnyConnection, name: &str) -> Result<Option<RelayId>, DbError> {
    let row: Option<(i64,)> = sqlx::query_as("DELETE FROM relays WHERE name = $1 RETURNING id")
        .bind(name)
        .fetch_optional(&mut *conn)
        .await?;
    Ok(row.and_then(|(id,)| u32::try_from(id).ok()).map(RelayId))
}
