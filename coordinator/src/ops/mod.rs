//! Admin operations. Each change, its audit entry and its row in the change feed commit in one
//! transaction; the hub (of every replica) follows the feed after the commit.

pub mod access;
pub mod federation;
pub mod people;
pub mod policy;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::json;
use wire::{AuthKey, ErrorCode, NodeId, TunnelSecurity};

use crate::audit::{self, Entry, NewEntry, Verification};
use crate::db;
use crate::db::changes::Kind;
use crate::db::keys::TokenScope;
use crate::error::ApiError;
use crate::feed::{self, KickDetail};
use crate::hub::Kick;
use crate::model::{Attrs, AuthKeyInfo, NodeRecord};
use crate::secret::{self, AdminToken};
use crate::state::{AppState, unix_now, unix_now_ms};

/// Longest allowed auth-key lifetime (one year).
const MAX_EXPIRY: Duration = Duration::from_secs(365 * 24 * 3600);

/// Request to create an auth key.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreateAuthKey {
    /// Can register many nodes.
    #[serde(default)]
    pub reusable: bool,
    /// Registered nodes are ephemeral.
    #[serde(default)]
    pub ephemeral: bool,
    /// Tags for registered nodes.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Owner of registered nodes.
    #[serde(default)]
    pub user: Option<String>,
    /// Lifetime in seconds.
    pub expiry_secs: u64,
}

/// A created auth key (the only time its secret is shown).
#[derive(Debug, Serialize, Deserialize)]
pub struct CreatedAuthKey {
    /// The full key, secret included.
    pub key: String,
    /// Its metadata.
    pub info: AuthKeyInfo,
}

/// A node as `nodes list` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeView {
    /// Id.
    pub id: NodeId,
    /// Short name.
    pub name: String,
    /// FQDN.
    pub fqdn: String,
    /// Overlay addresses.
    pub addresses: Vec<IpAddr>,
    /// WireGuard key.
    pub node_key: String,
    /// Owner.
    pub user: Option<String>,
    /// Tags.
    pub tags: Vec<String>,
    /// Holds a control session now.
    pub online: bool,
    /// Last control contact, unix seconds.
    pub last_seen_unix: Option<i64>,
    /// Ephemeral.
    pub ephemeral: bool,
    /// Key expired.
    pub expired: bool,
    /// Reported OS.
    pub os: String,
    /// Reported client version.
    pub client_version: String,
    /// Reported endpoints.
    pub endpoints: Vec<SocketAddr>,
    /// Registered at, unix seconds.
    pub created_unix: i64,
    /// Posture the node reports (`node:*`, `fact:*`).
    #[serde(default)]
    pub posture: Attrs,
    /// When the posture last changed, unix seconds.
    #[serde(default)]
    pub posture_unix: Option<i64>,
    /// Attributes admins set (`custom:*`).
    #[serde(default)]
    pub custom_attrs: Attrs,
    /// The node's home relay.
    #[serde(default)]
    pub home_relay: Option<wire::RelayId>,
    /// Its NAT, as it measured it.
    #[serde(default)]
    pub nat: Option<wire::NatInfo>,
    /// Its routes: advertised, approved (in force) and primary.
    #[serde(default)]
    pub routes: RoutesView,
    /// When its key expires, unix seconds (`None`: never).
    #[serde(default)]
    pub key_expiry_unix: Option<i64>,
    /// How it reaches its peers, as it last reported.
    #[serde(default)]
    pub paths: Vec<wire::PeerPath>,
    /// When it reported them, unix seconds.
    #[serde(default)]
    pub paths_unix: Option<i64>,
}

/// A node's routes, as `nodes list` and `nodes routes` show them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoutesView {
    /// What the node offers.
    pub advertised: Vec<ipnet::IpNet>,
    /// In force: approved by an admin (`nodes routes --approve`) or the policy's
    /// autoApprovers, and advertised.
    pub approved: Vec<ipnet::IpNet>,
    /// Those it is the primary router for.
    pub primary: Vec<ipnet::IpNet>,
    /// Approved by an admin (in force only while advertised).
    pub admin_approved: Vec<ipnet::IpNet>,
}

/// Validates a tag (`tag:[a-z0-9-]+`).
pub fn validate_tag(tag: &str) -> Result<(), ApiError> {
    let ok = tag.strip_prefix("tag:").is_some_and(|t| {
        !t.is_empty()
            && t.len() <= 63
            && t.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    });
    if ok {
        Ok(())
    } else {
        Err(ApiError::BadRequest(format!(
            "invalid tag {tag:?}: tags look like tag:name with lowercase letters, digits and dashes"
        )))
    }
}

fn validate_user(user: &str) -> Result<(), ApiError> {
    if user.is_empty()
        || user.len() > 128
        || user.chars().any(|c| c.is_control() || c.is_whitespace())
    {
        return Err(ApiError::BadRequest(format!("invalid user name {user:?}")));
    }
    Ok(())
}

/// Every tag is well formed and declared in the policy in force (auth keys and federation
/// rules may only hand out such tags).
pub fn check_tags(st: &AppState, tags: &[String]) -> Result<(), ApiError> {
    let (_, policy) = st.hub.read().policy();
    for t in tags {
        validate_tag(t)?;
        if !policy.declares_tag(t) {
            return Err(ApiError::BadRequest(format!(
                "tag {t:?} is not declared in the policy's tagOwners; add it there first"
            )));
        }
    }
    Ok(())
}

/// Creates an auth key.
pub async fn create_auth_key(
    st: &AppState,
    req: CreateAuthKey,
    actor: &str,
) -> Result<CreatedAuthKey, ApiError> {
    check_tags(st, &req.tags)?;
    if let Some(u) = &req.user {
        validate_user(u)?;
    }
    if req.expiry_secs == 0 || req.expiry_secs > MAX_EXPIRY.as_secs() {
        return Err(ApiError::BadRequest(
            "expiry must be between 1 second and 365 days".into(),
        ));
    }
    let (id, secret_bytes) = {
        let mut rng = rand::rng();
        (
            secret::random::<6>(&mut rng),
            secret::random::<20>(&mut rng),
        )
    };
    let key = AuthKey::new(st.fingerprint, id, secret_bytes);
    let now = unix_now();
    let mut tags = req.tags.clone();
    tags.sort();
    tags.dedup();
    let info = AuthKeyInfo {
        id: key.id_hex(),
        reusable: req.reusable,
        ephemeral: req.ephemeral,
        tags,
        user: req.user.clone(),
        created_at: now,
        created_by: actor.to_owned(),
        expires_at: now.saturating_add(i64::try_from(req.expiry_secs).unwrap_or(i64::MAX)),
        revoked_at: None,
        used_count: 0,
    };
    let mut tx = db::begin_write(&st.db).await?;
    db::keys::insert_auth_key(&mut tx, &info, &secret::auth_key_hash(&id, &secret_bytes)).await?;
    db::audit::append(
        &mut tx,
        st.audit.key(),
        NewEntry::new(
            actor,
            "authkey.create",
            &info.id,
            json!({
                "reusable": info.reusable,
                "ephemeral": info.ephemeral,
                "tags": info.tags,
                "user": info.user,
                "expires_at": info.expires_at,
            }),
        ),
        unix_now_ms(),
    )
    .await?;
    tx.commit().await.map_err(db::DbError::from)?;
    Ok(CreatedAuthKey {
        key: key.expose_secret(),
        info,
    })
}

/// Lists auth keys.
pub async fn list_auth_keys(st: &AppState) -> Result<Vec<AuthKeyInfo>, ApiError> {
    let mut conn = st.db.acquire().await.map_err(db::DbError::from)?;
    Ok(db::keys::list_auth_keys(&mut conn).await?)
}

/// Revokes an auth key.
pub async fn revoke_auth_key(st: &AppState, id: &str, actor: &str) -> Result<(), ApiError> {
    let mut tx = db::begin_write(&st.db).await?;
    if !db::keys::revoke_auth_key(&mut tx, id, unix_now()).await? {
        return Err(ApiError::NotFound(format!(
            "no unrevoked auth key with id {id:?}"
        )));
    }
    db::audit::append(
        &mut tx,
        st.audit.key(),
        NewEntry::new(actor, "authkey.revoke", id, json!({})),
        unix_now_ms(),
    )
    .await?;
    tx.commit().await.map_err(db::DbError::from)?;
    Ok(())
}

/// Lists all nodes, expired ones included.
pub async fn list_nodes(st: &AppState) -> Result<Vec<NodeView>, ApiError> {
    let mut conn = st.db.acquire().await.map_err(db::DbError::from)?;
    let records = db::nodes::all(&mut conn).await?;
    let now = unix_now();
    let hub = st.hub.read();
    Ok(records
        .into_iter()
        .map(|r| {
            let online = r.connected_to.is_some() && hub.node(r.id).is_some();
            let routes = RoutesView {
                advertised: r.advertised_routes.clone(),
                approved: hub.node(r.id).map(|n| n.routes.clone()).unwrap_or_default(),
                primary: hub
                    .node(r.id)
                    .map(|n| n.primary_routes.clone())
                    .unwrap_or_default(),
                admin_approved: r.approved_routes.clone(),
            };
            NodeView {
                routes,
                id: r.id,
                fqdn: format!("{}.{}", r.name, st.mesh.domain),
                addresses: r.addresses(),
                node_key: r.node_key.to_text(),
                online,
                expired: r.is_expired(now),
                name: r.name,
                user: r.user,
                tags: r.tags,
                last_seen_unix: r.last_seen,
                ephemeral: r.ephemeral,
                os: r.os,
                client_version: r.client_version,
                endpoints: r.endpoints,
                created_unix: r.created_at,
                posture: r.posture,
                posture_unix: r.posture_at,
                custom_attrs: r.custom_attrs,
                home_relay: r.home_relay,
                nat: r.nat,
                key_expiry_unix: r.expires_at,
                paths: r.paths,
                paths_unix: r.paths_at,
            }
        })
        .collect())
}

/// Removes the node called `name`. Its peers drop it as soon as their next netmap arrives.
pub async fn remove_node(
    st: &AppState,
    name: &str,
    actor: &str,
    reason: &str,
) -> Result<NodeRecord, ApiError> {
    let mut tx = db::begin_write(&st.db).await?;
    let Some(node) = db::nodes::by_name(&mut tx, name).await? else {
        return Err(ApiError::NotFound(format!("no node named {name:?}")));
    };
    db::nodes::remove(&mut tx, &node, reason, unix_now()).await?;
    db::audit::append(
        &mut tx,
        st.audit.key(),
        NewEntry::new(
            actor,
            "node.remove",
            &node.name,
            json!({"node_id": node.id, "reason": reason, "addresses": node.addresses()}),
        ),
        unix_now_ms(),
    )
    .await?;
    let seq = feed::note(
        &mut tx,
        Kind::Node,
        Some(node.id),
        Some(KickDetail {
            code: ErrorCode::NodeRemoved,
            message: format!("node {} was removed: {reason}", node.name),
        }),
    )
    .await?;
    feed::commit(st, tx, seq).await?;
    Ok(node)
}

/// Removes an ephemeral node that went away, if it is still gone.
pub async fn collect_ephemeral(st: &AppState, id: NodeId) -> Result<(), ApiError> {
    if st.hub.is_connected(id) {
        return Ok(());
    }
    let name = {
        let mut conn = st.db.acquire().await.map_err(db::DbError::from)?;
        match db::nodes::by_id(&mut conn, id).await? {
            // Back on this or another replica.
            Some(n) if n.ephemeral && n.connected_to.is_none() => n.name,
            _ => return Ok(()),
        }
    };
    remove_node(st, &name, "system", "ephemeral node went away").await?;
    Ok(())
}

/// Approves (`approve`) and withdraws approval of (`unapprove`) routes of node `name`
/// (audited). Only routes the node advertises may be approved.
pub async fn set_routes(
    st: &AppState,
    name: &str,
    approve: &[ipnet::IpNet],
    unapprove: &[ipnet::IpNet],
    actor: &str,
) -> Result<RoutesView, ApiError> {
    let mut tx = db::begin_write(&st.db).await?;
    let Some(node) = db::nodes::by_name(&mut tx, name).await? else {
        return Err(ApiError::NotFound(format!("no node named {name:?}")));
    };
    if let Some(r) = approve.iter().find(|r| !node.advertised_routes.contains(r)) {
        return Err(ApiError::BadRequest(format!(
            "{name} does not advertise {r} (it advertises {}); run its `lattice up` with \
             --advertise-routes first",
            if node.advertised_routes.is_empty() {
                "nothing".to_owned()
            } else {
                node.advertised_routes
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        )));
    }
    let mut approved: Vec<ipnet::IpNet> = node
        .approved_routes
        .iter()
        .chain(approve)
        .filter(|r| !unapprove.contains(r))
        .copied()
        .collect();
    approved.sort_unstable();
    approved.dedup();
    db::nodes::set_approved_routes(&mut tx, node.id, &approved).await?;
    db::audit::append(
        &mut tx,
        st.audit.key(),
        NewEntry::new(
            actor,
            "node.routes",
            &node.name,
            json!({"node_id": node.id, "approved": approved, "advertised": node.advertised_routes,
                   "old": node.approved_routes}),
        ),
        unix_now_ms(),
    )
    .await?;
    let seq = feed::note(&mut tx, Kind::Node, Some(node.id), None).await?;
    feed::commit(st, tx, seq).await?;
    let hub = st.hub.read();
    let live = hub.node(node.id);
    Ok(RoutesView {
        advertised: node.advertised_routes,
        approved: live.map(|n| n.routes.clone()).unwrap_or_default(),
        primary: live.map(|n| n.primary_routes.clone()).unwrap_or_default(),
        admin_approved: approved,
    })
}

/// Expires the key of node `name`: it is dropped from every netmap and must re-join with an
/// auth key.
pub async fn expire_node(st: &AppState, name: &str, actor: &str) -> Result<(), ApiError> {
    let now = unix_now();
    let mut tx = db::begin_write(&st.db).await?;
    let Some(node) = db::nodes::by_name(&mut tx, name).await? else {
        return Err(ApiError::NotFound(format!("no node named {name:?}")));
    };
    db::nodes::set_expiry(&mut tx, node.id, Some(now)).await?;
    db::audit::append(
        &mut tx,
        st.audit.key(),
        NewEntry::new(
            actor,
            "node.expire",
            &node.name,
            json!({"node_id": node.id}),
        ),
        unix_now_ms(),
    )
    .await?;
    let seq = feed::note(
        &mut tx,
        Kind::Node,
        Some(node.id),
        Some(KickDetail {
            code: ErrorCode::NodeExpired,
            message: format!("the key of node {} was expired by an admin", node.name),
        }),
    )
    .await?;
    feed::commit(st, tx, seq).await?;
    Ok(())
}

/// Drops nodes whose key expiry has passed from the hub (they stay in the database).
pub fn sweep_expired(st: &AppState) {
    let now = unix_now();
    let expired: Vec<(NodeId, String)> = st
        .hub
        .read()
        .nodes()
        .filter(|n| n.record.is_expired(now))
        .map(|n| (n.record.id, n.record.name.clone()))
        .collect();
    for (id, name) in expired {
        st.hub.remove_node(
            id,
            Some(Kick {
                code: ErrorCode::NodeExpired,
                message: format!("the key of node {name} has expired"),
            }),
        );
    }
}

/// What `token create` asks for.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CreateToken {
    /// What the token may do (default: write).
    #[serde(default)]
    pub scope: Option<TokenScope>,
    /// Lifetime in seconds (default 30 days, at most a year).
    #[serde(default)]
    pub expiry_secs: Option<u64>,
}

/// A created admin token (its secret is shown this once).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreatedToken {
    /// The token, secret and certificate pin included.
    pub token: String,
    /// Its public id.
    pub id: String,
    /// What it may do.
    pub scope: TokenScope,
    /// Unix seconds after which it is refused.
    pub expires_at: i64,
}

/// Default lifetime of an admin token.
pub const TOKEN_DEFAULT_LIFETIME: u64 = 30 * 86_400;
/// Longest lifetime of an admin token.
pub const TOKEN_MAX_LIFETIME: u64 = 365 * 86_400;

/// Creates an admin token for `--server https://... --token TOKEN` access.
pub async fn create_token(
    st: &AppState,
    req: CreateToken,
    actor: &str,
) -> Result<CreatedToken, ApiError> {
    let lifetime = req.expiry_secs.unwrap_or(TOKEN_DEFAULT_LIFETIME);
    if lifetime == 0 || lifetime > TOKEN_MAX_LIFETIME {
        return Err(ApiError::BadRequest(format!(
            "a token's expiry must be between 1 s and {} days",
            TOKEN_MAX_LIFETIME / 86_400
        )));
    }
    let scope = req.scope.unwrap_or(TokenScope::Write);
    let token = {
        let mut rng = rand::rng();
        AdminToken {
            id: secret::random(&mut rng),
            secret: secret::random(&mut rng),
            pin: Some(st.admin_pin),
        }
    };
    let now = unix_now();
    let expires_at = now.saturating_add(i64::try_from(lifetime).unwrap_or(i64::MAX));
    let mut tx = db::begin_write(&st.db).await?;
    db::keys::insert_admin_token(
        &mut tx,
        db::keys::NewAdminToken {
            id: &token.id_hex(),
            secret_hash: &secret::admin_token_hash(&token.id, &token.secret),
            created_by: actor,
            scope,
            expires_at,
            now,
        },
    )
    .await?;
    db::audit::append(
        &mut tx,
        st.audit.key(),
        NewEntry::new(
            actor,
            "token.create",
            token.id_hex(),
            json!({"scope": scope, "expires_at": expires_at}),
        ),
        unix_now_ms(),
    )
    .await?;
    tx.commit().await.map_err(db::DbError::from)?;
    Ok(CreatedToken {
        token: token.expose_secret(),
        id: token.id_hex(),
        scope,
        expires_at,
    })
}

/// Every admin token (never a secret).
pub async fn list_tokens(st: &AppState) -> Result<Vec<db::keys::TokenInfo>, ApiError> {
    let mut conn = st.db.acquire().await.map_err(db::DbError::from)?;
    Ok(db::keys::admin_tokens(&mut conn).await?)
}

/// Revokes an admin token.
pub async fn revoke_token(st: &AppState, id: &str, actor: &str) -> Result<(), ApiError> {
    let mut tx = db::begin_write(&st.db).await?;
    if !db::keys::revoke_admin_token(&mut tx, id, unix_now()).await? {
        return Err(ApiError::NotFound(format!(
            "no live admin token with id {id:?}"
        )));
    }
    db::audit::append(
        &mut tx,
        st.audit.key(),
        NewEntry::new(actor, "token.revoke", id, json!({})),
        unix_now_ms(),
    )
    .await?;
    tx.commit().await.map_err(db::DbError::from)?;
    Ok(())
}

/// `admin_tokens.created_by` of a token made by a person's admin sign-in, before `user:NAME`.
pub const SESSION_PREFIX: &str = "session:";

/// Checks an admin token at `now`; returns the actor name for the audit log and the token's
/// scope. Unknown, wrong, revoked and expired tokens are all refused alike.
pub async fn authenticate_token(
    st: &AppState,
    text: &str,
    now: i64,
) -> Result<(String, TokenScope), ApiError> {
    let token = AdminToken::parse(text).ok_or(ApiError::Unauthorized)?;
    let mut conn = st.db.acquire().await.map_err(db::DbError::from)?;
    let Some(stored) = db::keys::admin_token(&mut conn, &token.id_hex()).await? else {
        return Err(ApiError::Unauthorized);
    };
    if !secret::hash_matches(
        &secret::admin_token_hash(&token.id, &token.secret),
        &stored.secret_hash,
    ) || stored.expires_at <= now
    {
        return Err(ApiError::Unauthorized);
    }
    // A person's admin sign-in acts as that person.
    let actor = match stored.created_by.strip_prefix(SESSION_PREFIX) {
        Some(user) => format!("{user} (session {})", token.id_hex()),
        None => format!("token:{}", token.id_hex()),
    };
    Ok((actor, stored.scope))
}

/// Audit entries after `after`.
pub async fn audit_list(st: &AppState, after: i64, limit: i64) -> Result<Vec<Entry>, ApiError> {
    let mut conn = st.db.acquire().await.map_err(db::DbError::from)?;
    Ok(db::audit::list(&mut conn, after, limit.clamp(1, 100_000)).await?)
}

/// Verifies the whole audit chain.
pub async fn audit_verify(st: &AppState) -> Result<Verification, ApiError> {
    let mut conn = st.db.acquire().await.map_err(db::DbError::from)?;
    let head = db::audit::head(&mut conn).await?;
    let mut entries = Vec::new();
    let mut after = 0;
    loop {
        let page = db::audit::list(&mut conn, after, 10_000).await?;
        let Some(last) = page.last() else { break };
        after = last.seq;
        entries.extend(page);
    }
    Ok(audit::verify(
        &entries,
        head.as_ref(),
        &st.audit.key().public(),
        Some(&st.audit.checkpoint()),
    ))
}

/// Mesh-wide settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Settings {
    /// How tunnels between nodes are keyed.
    pub tunnel_security: TunnelSecurity,
    /// How long the key of a node that joined by signing in lasts (seconds).
    #[serde(default)]
    pub key_expiry_secs: Option<i64>,
    /// How often people must sign in again (seconds; none: only when keys expire).
    #[serde(default)]
    pub reauth_every_secs: Option<i64>,
}

/// A change to the settings (fields left out stay as they are).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SettingsChange {
    /// New tunnel security.
    #[serde(default)]
    pub tunnel_security: Option<TunnelSecurity>,
    /// New key lifetime in seconds.
    #[serde(default)]
    pub key_expiry_secs: Option<i64>,
    /// New re-authentication interval in seconds (0: none).
    #[serde(default)]
    pub reauth_every_secs: Option<i64>,
}

/// The current settings.
pub async fn settings(st: &AppState) -> Result<Settings, ApiError> {
    let mut conn = st.db.acquire().await.map_err(db::DbError::from)?;
    let l = db::mesh::key_lifetimes(&mut conn).await?;
    Ok(Settings {
        tunnel_security: db::mesh::tunnel_security(&mut conn).await?,
        key_expiry_secs: Some(l.key_expiry_s),
        reauth_every_secs: l.reauth_every_s,
    })
}

/// Changes mesh settings (audited; every node is told at once).
pub async fn change_settings(
    st: &AppState,
    change: SettingsChange,
    actor: &str,
) -> Result<Settings, ApiError> {
    let positive = |v: i64, what: &str| {
        if v > 0 {
            Ok(v)
        } else {
            Err(ApiError::BadRequest(format!("{what} must be positive")))
        }
    };
    let mut tx = db::begin_write(&st.db).await?;
    if let Some(security) = change.tunnel_security {
        let old = db::mesh::tunnel_security(&mut tx).await?;
        db::mesh::set_tunnel_security(&mut tx, security).await?;
        db::audit::append(
            &mut tx,
            st.audit.key(),
            NewEntry::new(
                actor,
                "settings.tunnel_security",
                "mesh",
                json!({"old": old, "new": security}),
            ),
            unix_now_ms(),
        )
        .await?;
        if security == TunnelSecurity::ClassicalOnly {
            tracing::warn!(%actor, "tunnels are now classical-only: no post-quantum protection");
        } else {
            tracing::info!(%actor, "tunnels require post-quantum keys");
        }
    }
    if change.key_expiry_secs.is_some() || change.reauth_every_secs.is_some() {
        let old = db::mesh::key_lifetimes(&mut tx).await?;
        let new = db::mesh::KeyLifetimes {
            key_expiry_s: match change.key_expiry_secs {
                Some(v) => positive(v, "the key expiry")?,
                None => old.key_expiry_s,
            },
            reauth_every_s: match change.reauth_every_secs {
                Some(0) => None,
                Some(v) => Some(positive(v, "the re-authentication interval")?),
                None => old.reauth_every_s,
            },
        };
        db::mesh::set_key_lifetimes(&mut tx, new).await?;
        db::audit::append(
            &mut tx,
            st.audit.key(),
            NewEntry::new(
                actor,
                "settings.key_lifetimes",
                "mesh",
                json!({"key_expiry_secs": new.key_expiry_s,
                       "reauth_every_secs": new.reauth_every_s,
                       "old": {"key_expiry_secs": old.key_expiry_s,
                               "reauth_every_secs": old.reauth_every_s}}),
            ),
            unix_now_ms(),
        )
        .await?;
    }
    let seq = feed::note(&mut tx, Kind::Settings, None, None).await?;
    feed::commit(st, tx, seq).await?;
    settings(st).await
}
