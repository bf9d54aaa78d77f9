//! The `nodes` and `removed_machines` tables.

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddr};

use sqlx::{AnyConnection, FromRow};
use wire::{MachineKey, NodeId, NodeKey};

use super::DbError;
use crate::model::{Attrs, NodeRecord};

#[derive(FromRow)]
struct NodeRow {
    id: i64,
    machine_key: String,
    node_key: String,
    name: String,
    ipv4: i64,
    ipv6: String,
    user_name: Option<String>,
    tags: String,
    ephemeral: i64,
    os: String,
    client_version: String,
    endpoints: String,
    created_at: i64,
    last_seen: Option<i64>,
    expires_at: Option<i64>,
    posture: String,
    posture_at: Option<i64>,
    custom_attrs: String,
    home_relay: Option<i64>,
    nat: Option<String>,
    connected_to: Option<String>,
    idp_groups: String,
    user_mfa: Option<i64>,
    advertised_routes: String,
    approved_routes: String,
    paths: String,
    paths_at: Option<i64>,
}

macro_rules! select_nodes {
    ($($rest:literal)?) => {
        concat!(
            "SELECT id, machine_key, node_key, name, ipv4, ipv6, user_name, tags, ephemeral, ",
            "os, client_version, endpoints, created_at, last_seen, expires_at, posture, posture_at, ",
            "custom_attrs, home_relay, nat, connected_to, idp_groups, user_mfa, advertised_routes, ",
            "approved_routes, paths, paths_at FROM nodes"
            $(, " ", $rest)?
        )
    };
}

impl TryFrom<NodeRow> for NodeRecord {
    type Error = DbError;

    fn try_from(r: NodeRow) -> Result<Self, DbError> {
        let corrupt = |what: &str| DbError::Corrupt {
            table: "nodes",
            detail: format!("node {}: bad {what}", r.id),
        };
        Ok(Self {
            id: NodeId(u64::try_from(r.id).map_err(|_| corrupt("id"))?),
            machine_key: r.machine_key.parse().map_err(|_| corrupt("machine_key"))?,
            node_key: r.node_key.parse().map_err(|_| corrupt("node_key"))?,
            ipv4: Ipv4Addr::from(u32::try_from(r.ipv4).map_err(|_| corrupt("ipv4"))?),
            ipv6: r.ipv6.parse().map_err(|_| corrupt("ipv6"))?,
            tags: serde_json::from_str(&r.tags).map_err(|_| corrupt("tags"))?,
            endpoints: serde_json::from_str(&r.endpoints).map_err(|_| corrupt("endpoints"))?,
            posture: serde_json::from_str(&r.posture).map_err(|_| corrupt("posture"))?,
            custom_attrs: serde_json::from_str(&r.custom_attrs)
                .map_err(|_| corrupt("custom_attrs"))?,
            posture_at: r.posture_at,
            home_relay: r
                .home_relay
                .map(|h| u32::try_from(h).map(wire::RelayId))
                .transpose()
                .map_err(|_| corrupt("home_relay"))?,
            nat: r
                .nat
                .map(|n| serde_json::from_str(&n))
                .transpose()
                .map_err(|_| corrupt("nat"))?,
            name: r.name,
            user: r.user_name,
            ephemeral: r.ephemeral != 0,
            os: r.os,
            client_version: r.client_version,
            created_at: r.created_at,
            last_seen: r.last_seen,
            expires_at: r.expires_at,
            connected_to: r.connected_to,
            idp_groups: serde_json::from_str(&r.idp_groups).map_err(|_| corrupt("idp_groups"))?,
            user_mfa: r.user_mfa.map(|m| m != 0),
            advertised_routes: serde_json::from_str(&r.advertised_routes)
                .map_err(|_| corrupt("advertised_routes"))?,
            approved_routes: serde_json::from_str(&r.approved_routes)
                .map_err(|_| corrupt("approved_routes"))?,
            paths: serde_json::from_str(&r.paths).map_err(|_| corrupt("paths"))?,
            paths_at: r.paths_at,
        })
    }
}

/// Every node.
pub async fn all(conn: &mut AnyConnection) -> Result<Vec<NodeRecord>, DbError> {
    let rows: Vec<NodeRow> = sqlx::query_as(select_nodes!("ORDER BY id"))
        .fetch_all(&mut *conn)
        .await?;
    rows.into_iter().map(NodeRecord::try_from).collect()
}

/// The node holding `machine_key`.
pub async fn by_machine_key(
    conn: &mut AnyConnection,
    machine_key: &MachineKey,
) -> Result<Option<NodeRecord>, DbError> {
    let row: Option<NodeRow> = sqlx::query_as(select_nodes!("WHERE machine_key = $1"))
        .bind(machine_key.to_text())
        .fetch_optional(&mut *conn)
        .await?;
    row.map(NodeRecord::try_from).transpose()
}

/// The node called `name`.
pub async fn by_name(conn: &mut AnyConnection, name: &str) -> Result<Option<NodeRecord>, DbError> {
    let row: Option<NodeRow> = sqlx::query_as(select_nodes!("WHERE name = $1"))
        .bind(name)
        .fetch_optional(&mut *conn)
        .await?;
    row.map(NodeRecord::try_from).transpose()
}

/// All names in use.
pub async fn names(conn: &mut AnyConnection) -> Result<HashSet<String>, DbError> {
    let rows: Vec<(String,)> = sqlx::query_as("SELECT name FROM nodes")
        .fetch_all(&mut *conn)
        .await?;
    Ok(rows.into_iter().map(|(n,)| n).collect())
}

/// Number of nodes.
pub async fn count(conn: &mut AnyConnection) -> Result<u64, DbError> {
    let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM nodes")
        .fetch_one(&mut *conn)
        .await?;
    Ok(u64::try_from(n).unwrap_or(0))
}

/// Whether an IPv4 address (host-order) is in use.
pub async fn ipv4_in_use(conn: &mut AnyConnection, ip: Ipv4Addr) -> Result<bool, DbError> {
    let row: Option<(i64,)> = sqlx::query_as("SELECT id FROM nodes WHERE ipv4 = $1")
        .bind(i64::from(u32::from(ip)))
        .fetch_optional(&mut *conn)
        .await?;
    Ok(row.is_some())
}

/// A node to insert.
pub struct NewNode<'a> {
    /// Machine key.
    pub machine_key: &'a MachineKey,
    /// WireGuard key.
    pub node_key: &'a NodeKey,
    /// Unique name.
    pub name: &'a str,
    /// Overlay IPv4.
    pub ipv4: Ipv4Addr,
    /// Overlay IPv6.
    pub ipv6: std::net::Ipv6Addr,
    /// Owner.
    pub user: Option<&'a str>,
    /// Tags.
    pub tags: &'a [String],
    /// Ephemeral.
    pub ephemeral: bool,
    /// The auth key used.
    pub auth_key_id: &'a str,
    /// OS.
    pub os: &'a str,
    /// Client version.
    pub client_version: &'a str,
    /// Endpoints.
    pub endpoints: &'a [SocketAddr],
    /// The replica holding its session.
    pub connected_to: &'a str,
    /// Now, unix seconds.
    pub now: i64,
}

/// Inserts a node and returns it.
pub async fn insert(conn: &mut AnyConnection, n: NewNode<'_>) -> Result<NodeRecord, DbError> {
    let (id,): (i64,) = sqlx::query_as(
        "INSERT INTO nodes (machine_key, node_key, name, ipv4, ipv6, user_name, tags, ephemeral,
                            auth_key_id, os, client_version, endpoints, created_at, last_seen,
                            connected_to)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15) RETURNING id",
    )
    .bind(n.machine_key.to_text())
    .bind(n.node_key.to_text())
    .bind(n.name)
    .bind(i64::from(u32::from(n.ipv4)))
    .bind(n.ipv6.to_string())
    .bind(n.user)
    .bind(json(n.tags))
    .bind(i64::from(n.ephemeral))
    .bind(n.auth_key_id)
    .bind(n.os)
    .bind(n.client_version)
    .bind(json(n.endpoints))
    .bind(n.now)
    .bind(n.now)
    .bind(n.connected_to)
    .fetch_one(&mut *conn)
    .await?;
    let id = NodeId(u64::try_from(id).map_err(|_| DbError::Corrupt {
        table: "nodes",
        detail: "negative id".into(),
    })?);
    by_id(conn, id).await?.ok_or(DbError::Corrupt {
        table: "nodes",
        detail: "inserted row vanished".into(),
    })
}

/// The node with `id`.
pub async fn by_id(conn: &mut AnyConnection, id: NodeId) -> Result<Option<NodeRecord>, DbError> {
    let row: Option<NodeRow> = sqlx::query_as(select_nodes!("WHERE id = $1"))
        .bind(id_i64(id))
        .fetch_optional(&mut *conn)
        .await?;
    row.map(NodeRecord::try_from).transpose()
}

/// The node using `node_key`, if any.
pub async fn by_node_key(
    conn: &mut AnyConnection,
    node_key: &NodeKey,
) -> Result<Option<NodeId>, DbError> {
    let row: Option<(i64,)> = sqlx::query_as("SELECT id FROM nodes WHERE node_key = $1")
        .bind(node_key.to_text())
        .fetch_optional(&mut *conn)
        .await?;
    row.map(|(id,)| {
        u64::try_from(id).map(NodeId).map_err(|_| DbError::Corrupt {
            table: "nodes",
            detail: "negative id".into(),
        })
    })
    .transpose()
}

/// What a node reports when it reconnects.
pub struct Resume<'a> {
    /// Its (possibly rotated) node key.
    pub node_key: &'a NodeKey,
    /// Its endpoints.
    pub endpoints: &'a [SocketAddr],
    /// OS.
    pub os: &'a str,
    /// Client version.
    pub client_version: &'a str,
    /// The replica holding its session now.
    pub connected_to: &'a str,
    /// Now, unix seconds.
    pub now: i64,
}

/// Updates what a node reports when it reconnects. Returns the updated record.
pub async fn update_on_resume(
    conn: &mut AnyConnection,
    id: NodeId,
    r: Resume<'_>,
) -> Result<Option<NodeRecord>, DbError> {
    sqlx::query(
        "UPDATE nodes SET node_key = $1, endpoints = $2, os = $3, client_version = $4, last_seen = $5,
                          connected_to = $6
         WHERE id = $7",
    )
    .bind(r.node_key.to_text())
    .bind(json(r.endpoints))
    .bind(r.os)
    .bind(r.client_version)
    .bind(r.now)
    .bind(r.connected_to)
    .bind(id_i64(id))
    .execute(&mut *conn)
    .await?;
    by_id(conn, id).await
}

/// Records new endpoints.
pub async fn set_endpoints(
    conn: &mut AnyConnection,
    id: NodeId,
    endpoints: &[SocketAddr],
    now: i64,
) -> Result<(), DbError> {
    sqlx::query("UPDATE nodes SET endpoints = $1, last_seen = $2 WHERE id = $3")
        .bind(json(endpoints))
        .bind(now)
        .bind(id_i64(id))
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Records a node's reported posture.
pub async fn set_posture(
    conn: &mut AnyConnection,
    id: NodeId,
    posture: &Attrs,
    now: i64,
) -> Result<(), DbError> {
    sqlx::query("UPDATE nodes SET posture = $1, posture_at = $2 WHERE id = $3")
        .bind(json(posture))
        .bind(now)
        .bind(id_i64(id))
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Records what a node reports about its network.
pub async fn set_netinfo(
    conn: &mut AnyConnection,
    id: NodeId,
    home_relay: Option<wire::RelayId>,
    nat: &wire::NatInfo,
) -> Result<(), DbError> {
    sqlx::query("UPDATE nodes SET home_relay = $1, nat = $2 WHERE id = $3")
        .bind(home_relay.map(|r| i64::from(r.0)))
        .bind(json(nat))
        .bind(id_i64(id))
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Records the paths a node reports to its peers, at `now` (Unix seconds).
pub async fn set_paths(
    conn: &mut AnyConnection,
    id: NodeId,
    paths: &[wire::PeerPath],
    now: i64,
) -> Result<(), DbError> {
    sqlx::query("UPDATE nodes SET paths = $1, paths_at = $2 WHERE id = $3")
        .bind(json(paths))
        .bind(now)
        .bind(id_i64(id))
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Replaces a node's admin-set attributes.
pub async fn set_custom_attrs(
    conn: &mut AnyConnection,
    id: NodeId,
    attrs: &Attrs,
) -> Result<(), DbError> {
    sqlx::query("UPDATE nodes SET custom_attrs = $1 WHERE id = $2")
        .bind(json(attrs))
        .bind(id_i64(id))
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Sets or clears the key expiry.
pub async fn set_expiry(
    conn: &mut AnyConnection,
    id: NodeId,
    expires_at: Option<i64>,
) -> Result<(), DbError> {
    sqlx::query("UPDATE nodes SET expires_at = $1 WHERE id = $2")
        .bind(expires_at)
        .bind(id_i64(id))
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Records the routes a node advertises (from its hello).
pub async fn set_advertised_routes(
    conn: &mut AnyConnection,
    id: NodeId,
    routes: &[ipnet::IpNet],
) -> Result<(), DbError> {
    sqlx::query("UPDATE nodes SET advertised_routes = $1 WHERE id = $2")
        .bind(json(routes))
        .bind(id_i64(id))
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Sets the routes an admin approved for a node.
pub async fn set_approved_routes(
    conn: &mut AnyConnection,
    id: NodeId,
    routes: &[ipnet::IpNet],
) -> Result<(), DbError> {
    sqlx::query("UPDATE nodes SET approved_routes = $1 WHERE id = $2")
        .bind(json(routes))
        .bind(id_i64(id))
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Records what a sign-in said about the node's user: their groups and whether this
/// node's sign-in used a second factor.
pub async fn set_sign_in(
    conn: &mut AnyConnection,
    id: NodeId,
    groups: &[String],
    mfa: bool,
) -> Result<(), DbError> {
    sqlx::query("UPDATE nodes SET idp_groups = $1, user_mfa = $2 WHERE id = $3")
        .bind(json(groups))
        .bind(i64::from(mfa))
        .bind(id_i64(id))
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// A user signed in (on any device) with these groups, maybe under a new login name: their
/// nodes follow. Returns the ids of the nodes whose record changed.
pub async fn follow_user(
    conn: &mut AnyConnection,
    old_name: &str,
    new_name: &str,
    groups: &[String],
) -> Result<Vec<NodeId>, DbError> {
    let groups = json(groups);
    let ids: Vec<(i64,)> = sqlx::query_as(
        "SELECT id FROM nodes WHERE user_name = $1 AND (user_name <> $2 OR idp_groups <> $3)",
    )
    .bind(old_name)
    .bind(new_name)
    .bind(&groups)
    .fetch_all(&mut *conn)
    .await?;
    sqlx::query("UPDATE nodes SET user_name = $1, idp_groups = $2 WHERE user_name = $3")
        .bind(new_name)
        .bind(&groups)
        .bind(old_name)
        .execute(&mut *conn)
        .await?;
    Ok(ids
        .into_iter()
        .filter_map(|(i,)| u64::try_from(i).ok().map(NodeId))
        .collect())
}

/// Deletes a node and remembers its machine key as removed.
pub async fn remove(
    conn: &mut AnyConnection,
    node: &NodeRecord,
    reason: &str,
    now: i64,
) -> Result<(), DbError> {
    sqlx::query("DELETE FROM nodes WHERE id = $1")
        .bind(id_i64(node.id))
        .execute(&mut *conn)
        .await?;
    sqlx::query(
        "INSERT INTO removed_machines (machine_key, node_name, removed_at, reason)
         VALUES ($1, $2, $3, $4)
         ON CONFLICT (machine_key) DO UPDATE SET node_name = excluded.node_name,
             removed_at = excluded.removed_at, reason = excluded.reason",
    )
    .bind(node.machine_key.to_text())
    .bind(&node.name)
    .bind(now)
    .bind(reason)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Why a machine was removed, if it was.
pub async fn removal(
    conn: &mut AnyConnection,
    machine_key: &MachineKey,
) -> Result<Option<(String, i64, String)>, DbError> {
    Ok(sqlx::query_as(
        "SELECT node_name, removed_at, reason FROM removed_machines WHERE machine_key = $1",
    )
    .bind(machine_key.to_text())
    .fetch_optional(&mut *conn)
    .await?)
}

/// Forgets a removal (the machine re-joined with a fresh auth key).
pub async fn clear_removal(
    conn: &mut AnyConnection,
    machine_key: &MachineKey,
) -> Result<(), DbError> {
    sqlx::query("DELETE FROM removed_machines WHERE machine_key = $1")
        .bind(machine_key.to_text())
        .execute(&mut *conn)
        .await?;
    Ok(())
}

fn json<T: serde::Serialize + ?Sized>(v: &T) -> String {
    serde_json::to_string(v).expect("plain data serializes")
}

fn id_i64(id: NodeId) -> i64 {
    i64::try_from(id.0).unwrap_or(i64::MAX)
}

/// Nodes with these ids (those that exist).
pub async fn by_ids(conn: &mut AnyConnection, ids: &[NodeId]) -> Result<Vec<NodeRecord>, DbError> {
    let mut out = Vec::with_capacity(ids.len());
    for chunk in ids.chunks(500) {
        let placeholders: Vec<String> = (1..=chunk.len()).map(|i| format!("${i}")).collect();
        let sql = format!(
            "{} WHERE id IN ({})",
            select_nodes!(),
            placeholders.join(", ")
        );
        let mut q = sqlx::query_as::<_, NodeRow>(sqlx::AssertSqlSafe(sql));
        for id in chunk {
            q = q.bind(id_i64(*id));
        }
        for row in q.fetch_all(&mut *conn).await? {
            out.push(NodeRecord::try_from(row)?);
        }
    }
    Ok(out)
}

/// Records which replica holds the node's control session (`None`: none). Clearing only
/// clears the given replica's claim (`only_if`), so a session that moved to another replica is
/// not marked offline by the old one. Returns whether the row changed.
pub async fn set_connected(
    conn: &mut AnyConnection,
    id: NodeId,
    replica: Option<&str>,
    only_if: Option<&str>,
    now: i64,
) -> Result<bool, DbError> {
    let done = match only_if {
        Some(owner) => {
            sqlx::query(
                "UPDATE nodes SET connected_to = $1, last_seen = $2 WHERE id = $3 AND connected_to = $4",
            )
            .bind(replica)
            .bind(now)
            .bind(id_i64(id))
            .bind(owner)
            .execute(&mut *conn)
            .await?
        }
        None => {
            sqlx::query("UPDATE nodes SET connected_to = $1, last_seen = $2 WHERE id = $3")
                .bind(replica)
                .bind(now)
                .bind(id_i64(id))
                .execute(&mut *conn)
                .await?
        }
    };
    Ok(done.rows_affected() > 0)
}

/// Nodes whose session is held by `replica`.
pub async fn connected_to(conn: &mut AnyConnection, replica: &str) -> Result<Vec<NodeId>, DbError> {
    let rows: Vec<(i64,)> = sqlx::query_as("SELECT id FROM nodes WHERE connected_to = $1")
        .bind(replica)
        .fetch_all(&mut *conn)
        .await?;
    Ok(rows
        .into_iter()
        .filter_map(|(id,)| u64::try_from(id).ok().map(NodeId))
        .collect())
}
