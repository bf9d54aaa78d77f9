//! Registering a new node or resuming a known one, from a `Hello` on an authenticated control
//! session. The caller's identity is the machine key proven in the handshake.

use std::net::IpAddr;

use serde_json::json;
use wire::{AuthKey, ErrorCode, Hello, MachineKey};

use crate::addr;
use crate::audit::NewEntry;
use crate::db::changes::Kind;
use crate::db::{self, DbError};
use crate::feed;
use crate::model::NodeRecord;
use crate::ops::people::SignedIn;
use crate::secret;
use crate::state::{AppState, unix_now_ms};

/// Why a registration did not happen.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    /// Refused, with a code and message for the node.
    #[error("{1}")]
    Refused(ErrorCode, String),
    /// The node may join (or come back) once its user signs in at the mesh's identity
    /// provider.
    #[error("the user must sign in")]
    LoginRequired,
    /// The database failed.
    #[error(transparent)]
    Db(#[from] DbError),
}

fn refuse(code: ErrorCode, msg: impl Into<String>) -> RegisterError {
    RegisterError::Refused(code, msg.into())
}

/// Limits on what a node may report.
const MAX_ROUTES: usize = 64;
const MAX_HOSTNAME: usize = 255;
const MAX_ENDPOINTS: usize = 32;
const MAX_SHORT_FIELD: usize = 128;

/// Checks the sizes of a `Hello`'s fields.
pub fn validate_hello(h: &Hello) -> Result<(), RegisterError> {
    if h.hostname.len() > MAX_HOSTNAME
        || h.endpoints.len() > MAX_ENDPOINTS
        || h.os.len() > MAX_SHORT_FIELD
        || h.client_version.len() > MAX_SHORT_FIELD
    {
        return Err(refuse(
            ErrorCode::BadRequest,
            "hello fields exceed their limits",
        ));
    }
    Ok(())
}

/// Registers or resumes the node proving `machine`. Returns the record and whether it was
/// newly registered. The node is recorded as connected to this replica in the same
/// transaction (its session starts right after), so it is online for every replica when its
/// welcome goes out.
///
/// `signed_in` is the person who just signed in for this machine (see
/// [`crate::ops::people`]): a new node is theirs, and a node of theirs is renewed. Without an
/// auth key, a token or a sign-in, a new machine (or a user's node whose key expired) gets
/// [`RegisterError::LoginRequired`] when the mesh has an identity provider.
pub async fn register_or_resume(
    st: &AppState,
    machine: &MachineKey,
    hello: &Hello,
    signed_in: Option<&SignedIn>,
    now: i64,
) -> Result<(NodeRecord, bool), RegisterError> {
    validate_hello(hello)?;
    check_routes(st, &hello.advertised_routes)?;
    // A token from an outside issuer is checked before the write lock (it may fetch the
    // issuer's keys).
    let admitted = match (&hello.id_token, &hello.auth_key) {
        (Some(_), Some(_)) => {
            return Err(refuse(
                ErrorCode::BadRequest,
                "send an auth key or an id token, not both",
            ));
        }
        (Some(t), None) => Some(admit(st, t, now).await?),
        (None, _) => None,
    };
    let mut tx = db::begin_write(&st.db).await?;
    let existing = db::nodes::by_machine_key(&mut tx, machine).await?;
    if let Some(owner) = db::nodes::by_node_key(&mut tx, &hello.node_key).await?
        && existing.as_ref().is_none_or(|e| e.id != owner)
    {
        return Err(refuse(
            ErrorCode::BadRequest,
            "this node key belongs to another node",
        ));
    }
    if let Some(existing) = existing {
        if let Some(a) = &admitted {
            renew(st, &mut tx, &existing, a, now).await?;
        } else if let Some(s) = signed_in {
            renew_by_sign_in(st, &mut tx, &existing, s, now).await?;
        } else if existing.is_expired(now) {
            let Some(key) = &hello.auth_key else {
                if st.sign_in.is_some() && existing.user.is_some() && existing.tags.is_empty() {
                    return Err(RegisterError::LoginRequired);
                }
                return Err(refuse(
                    ErrorCode::NodeExpired,
                    format!(
                        "the key of node {} has expired; run `lattice up` with a new auth key \
                         (or a fresh --id-token-file)",
                        existing.name
                    ),
                ));
            };
            let info = consume_key(st, &mut tx, key, now).await?;
            db::nodes::set_expiry(&mut tx, existing.id, None).await?;
            db::audit::append(
                &mut tx,
                st.audit.key(),
                NewEntry::new(
                    format!("authkey:{}", info.id),
                    "node.reauth",
                    &existing.name,
                    json!({"node_id": existing.id}),
                ),
                unix_now_ms(),
            )
            .await?;
        }
        let updated = db::nodes::update_on_resume(
            &mut tx,
            existing.id,
            db::nodes::Resume {
                node_key: &hello.node_key,
                endpoints: &hello.endpoints,
                os: &hello.os,
                client_version: &hello.client_version,
                connected_to: &st.replica.id,
                now,
            },
        )
        .await?
        .ok_or(DbError::Corrupt {
            table: "nodes",
            detail: "node vanished during resume".into(),
        })?;
        if updated.advertised_routes != hello.advertised_routes {
            db::nodes::set_advertised_routes(&mut tx, updated.id, &hello.advertised_routes).await?;
        }
        let updated = NodeRecord {
            advertised_routes: hello.advertised_routes.clone(),
            ..updated
        };
        if updated.node_key != existing.node_key {
            db::audit::append(
                &mut tx,
                st.audit.key(),
                NewEntry::new(
                    format!("node:{}", existing.name),
                    "node.rotate_key",
                    &existing.name,
                    json!({"old": existing.node_key.to_text(), "new": updated.node_key.to_text()}),
                ),
                unix_now_ms(),
            )
            .await?;
        }
        let seq = feed::note(&mut tx, Kind::Node, Some(updated.id), None).await?;
        feed::commit(st, tx, seq).await?;
        return Ok((updated, false));
    }

    let grant = match (&hello.auth_key, &admitted) {
        (None, None) if signed_in.is_some() => {
            let s = signed_in.ok_or(RegisterError::LoginRequired)?;
            let lifetimes = db::mesh::key_lifetimes(&mut tx).await?;
            Grant {
                actor: format!("user:{}", s.user.login_name),
                source: "oidc".into(),
                user: Some(s.user.login_name.clone()),
                tags: Vec::new(),
                ephemeral: false,
                until: Some(lifetimes.expiry(s.user.key_expiry_s, now)),
                principal: Some(format!("{} {}", s.user.issuer, s.user.subject)),
            }
        }
        (Some(key), _) => {
            let info = consume_key(st, &mut tx, key, now).await?;
            Grant {
                actor: format!("authkey:{}", info.id),
                user: if info.tags.is_empty() {
                    info.user.clone()
                } else {
                    None
                },
                source: info.id,
                tags: info.tags,
                ephemeral: info.ephemeral,
                until: None,
                principal: None,
            }
        }
        (None, Some(a)) => {
            bind(&mut tx, a, machine, now).await?;
            Grant {
                actor: format!("federation:{}", a.rule),
                source: format!("federation:{}", a.rule),
                user: None,
                tags: a.tags.clone(),
                ephemeral: a.ephemeral,
                until: Some(a.until),
                principal: Some(a.principal.clone()),
            }
        }
        (None, None) => {
            if st.sign_in.is_some() {
                return Err(RegisterError::LoginRequired);
            }
            if let Some((name, _, reason)) = db::nodes::removal(&mut tx, machine).await? {
                return Err(refuse(
                    ErrorCode::NodeRemoved,
                    format!("node {name} was removed ({reason}); re-join with a new auth key"),
                ));
            }
            return Err(refuse(
                ErrorCode::AuthKeyRequired,
                "this machine is not registered; an auth key is required",
            ));
        }
    };

    let offset = allocate_ipv4(&mut tx).await?;
    db::mesh::set_next_ipv4(&mut tx, offset + 1).await?;
    let ipv4 = addr::ipv4_at(offset);
    let ipv6 = addr::ipv6_for(st.mesh.ula_prefix, ipv4);
    let taken = db::nodes::names(&mut tx).await?;
    let name = addr::unique_name(&addr::sanitize_hostname(&hello.hostname), |n| {
        taken.contains(n)
    });
    let record = db::nodes::insert(
        &mut tx,
        db::nodes::NewNode {
            machine_key: machine,
            node_key: &hello.node_key,
            name: &name,
            ipv4,
            ipv6,
            user: grant.user.as_deref(),
            tags: &grant.tags,
            ephemeral: grant.ephemeral,
            auth_key_id: &grant.source,
            os: &hello.os,
            client_version: &hello.client_version,
            endpoints: &hello.endpoints,
            connected_to: &st.replica.id,
            now,
        },
    )
    .await?;
    db::nodes::clear_removal(&mut tx, machine).await?;
    if !hello.advertised_routes.is_empty() {
        db::nodes::set_advertised_routes(&mut tx, record.id, &hello.advertised_routes).await?;
    }
    let record = NodeRecord {
        advertised_routes: hello.advertised_routes.clone(),
        ..record
    };
    let record = match grant.until {
        Some(until) => {
            db::nodes::set_expiry(&mut tx, record.id, Some(until)).await?;
            NodeRecord {
                expires_at: Some(until),
                ..record
            }
        }
        None => record,
    };
    let record = match signed_in {
        Some(s) => {
            db::nodes::set_sign_in(&mut tx, record.id, &s.user.groups, s.mfa).await?;
            NodeRecord {
                idp_groups: s.user.groups.clone(),
                user_mfa: Some(s.mfa),
                ..record
            }
        }
        None => record,
    };
    let addrs: Vec<IpAddr> = record.addresses();
    db::audit::append(
        &mut tx,
        st.audit.key(),
        NewEntry::new(
            grant.actor,
            "node.register",
            &name,
            json!({
                "node_id": record.id,
                "addresses": addrs,
                "tags": record.tags,
                "user": record.user,
                "ephemeral": record.ephemeral,
                "machine_key": machine.to_text(),
                "node_key": record.node_key.to_text(),
                "principal": grant.principal,
                "expires_at": record.expires_at,
            }),
        ),
        unix_now_ms(),
    )
    .await?;
    let seq = feed::note(&mut tx, Kind::Node, Some(record.id), None).await?;
    feed::commit(st, tx, seq).await?;
    Ok((record, true))
}

/// Checks the routes a node offers: prefixes without host bits, at most [`MAX_ROUTES`], none
/// inside the mesh's own addresses (100.64.0.0/10 and its IPv6 /48).
fn check_routes(st: &AppState, routes: &[ipnet::IpNet]) -> Result<(), RegisterError> {
    if routes.len() > MAX_ROUTES {
        return Err(refuse(
            ErrorCode::BadRequest,
            format!("at most {MAX_ROUTES} advertised routes"),
        ));
    }
    let overlay: [ipnet::IpNet; 2] = [
        ipnet::IpNet::V4(
            ipnet::Ipv4Net::new(std::net::Ipv4Addr::new(100, 64, 0, 0), 10).unwrap_or_default(),
        ),
        ipnet::IpNet::V6(st.mesh.ula_prefix),
    ];
    for r in routes {
        if r.trunc() != *r {
            return Err(refuse(
                ErrorCode::BadRequest,
                format!(
                    "advertised route {r} has host bits set (did you mean {}?)",
                    r.trunc()
                ),
            ));
        }
        if r.prefix_len() > 0
            && overlay
                .iter()
                .any(|o| o.contains(&r.network()) || r.contains(&o.network()))
        {
            return Err(refuse(
                ErrorCode::BadRequest,
                format!("advertised route {r} overlaps the mesh's own addresses"),
            ));
        }
    }
    Ok(())
}

/// Where a new node's identity comes from: an auth key or an outside token.
struct Grant {
    actor: String,
    /// `nodes.auth_key_id`: the key's id, or `federation:RULE`.
    source: String,
    user: Option<String>,
    tags: Vec<String>,
    ephemeral: bool,
    until: Option<i64>,
    principal: Option<String>,
}

/// Checks an outside token (see `ops::federation::admit_token`).
async fn admit(
    st: &AppState,
    token: &wire::IdToken,
    now: i64,
) -> Result<crate::federation::Admission, RegisterError> {
    use crate::ops::federation::{TokenRefusal, admit_token};
    admit_token(st, &token.0, now).await.map_err(|e| match e {
        TokenRefusal::Refused(m) => refuse(ErrorCode::IdTokenRefused, m),
        TokenRefusal::Unavailable(m) => refuse(ErrorCode::Internal, m),
    })
}

/// A known node presenting a token: the token must grant what the node already is (its
/// tags); its access then lasts until the token's does.
pub(crate) async fn renew(
    st: &AppState,
    tx: &mut db::Tx,
    node: &NodeRecord,
    a: &crate::federation::Admission,
    now: i64,
) -> Result<(), RegisterError> {
    let mut have = node.tags.clone();
    have.sort();
    if have != a.tags || node.user.is_some() {
        return Err(refuse(
            ErrorCode::IdTokenRefused,
            format!(
                "this token grants {} but node {} is {}",
                a.tags.join(","),
                node.name,
                node.user
                    .as_deref()
                    .map_or_else(|| have.join(","), |u| format!("owned by {u}"))
            ),
        ));
    }
    bind(tx, a, &node.machine_key, now).await?;
    db::nodes::set_expiry(tx, node.id, Some(a.until)).await?;
    db::audit::append(
        tx,
        st.audit.key(),
        NewEntry::new(
            format!("federation:{}", a.rule),
            "node.renew",
            &node.name,
            json!({"node_id": node.id, "principal": a.principal, "expires_at": a.until}),
        ),
        unix_now_ms(),
    )
    .await?;
    Ok(())
}

/// A node's user signed in again: the node must be theirs (not tagged, not someone
/// else's); its key then lasts a new lifetime, and it carries the sign-in's groups and
/// second factor.
pub(crate) async fn renew_by_sign_in(
    st: &AppState,
    tx: &mut db::Tx,
    node: &NodeRecord,
    s: &SignedIn,
    now: i64,
) -> Result<i64, RegisterError> {
    if node.user.as_deref() != Some(s.user.login_name.as_str()) || !node.tags.is_empty() {
        let owner = if node.tags.is_empty() {
            node.user.as_deref().unwrap_or("no one").to_owned()
        } else {
            node.tags.join(",")
        };
        return Err(refuse(
            ErrorCode::LoginFailed,
            format!(
                "node {} belongs to {owner}, not {}; sign in as its owner, or have an admin \
                 remove the node first",
                node.name, s.user.login_name
            ),
        ));
    }
    let lifetimes = db::mesh::key_lifetimes(tx).await?;
    let until = lifetimes.expiry(s.user.key_expiry_s, now);
    db::nodes::set_expiry(tx, node.id, Some(until)).await?;
    db::nodes::set_sign_in(tx, node.id, &s.user.groups, s.mfa).await?;
    db::audit::append(
        tx,
        st.audit.key(),
        NewEntry::new(
            format!("user:{}", s.user.login_name),
            "node.reauth",
            &node.name,
            json!({"node_id": node.id, "expires_at": until, "groups": s.user.groups,
                   "mfa": s.mfa}),
        ),
        unix_now_ms(),
    )
    .await?;
    Ok(until)
}

/// One token admits one machine: a copy of a workload's token cannot register another.
async fn bind(
    tx: &mut db::Tx,
    a: &crate::federation::Admission,
    machine: &MachineKey,
    now: i64,
) -> Result<(), RegisterError> {
    match db::federation::bind_token(tx, &a.token_hash, machine, a.until, now).await? {
        None => Ok(()),
        Some(_) => Err(refuse(
            ErrorCode::IdTokenRefused,
            "this token already admitted another machine (each machine needs its own token)",
        )),
    }
}

/// Picks the next free overlay IPv4 offset. Allocation is sequential and addresses are not
/// reused until the range wraps, so the first probe almost always succeeds; at most one probe
/// per existing node can fail.
async fn allocate_ipv4(tx: &mut db::Tx) -> Result<u32, RegisterError> {
    let in_use = db::nodes::count(tx).await?;
    let mut probe = db::mesh::next_ipv4(tx).await?;
    for _ in 0..=in_use {
        let Some(o) = addr::next_free(probe, |_| false) else {
            break;
        };
        if !db::nodes::ipv4_in_use(tx, addr::ipv4_at(o)).await? {
            return Ok(o);
        }
        probe = o + 1;
    }
    Err(refuse(
        ErrorCode::Internal,
        "the overlay address range is full",
    ))
}

/// Checks an auth key and records one use of it, inside the caller's write transaction.
async fn consume_key(
    st: &AppState,
    tx: &mut db::Tx,
    key: &AuthKey,
    now: i64,
) -> Result<crate::model::AuthKeyInfo, RegisterError> {
    if key.fingerprint() != &st.fingerprint {
        return Err(refuse(
            ErrorCode::AuthKeyInvalid,
            "the auth key was issued by a different coordinator",
        ));
    }
    let id = key.id_hex();
    let Some((info, stored)) = db::keys::auth_key(tx, &id).await? else {
        return Err(refuse(ErrorCode::AuthKeyInvalid, "unknown auth key"));
    };
    let computed = secret::auth_key_hash(key.id(), key.secret());
    if !secret::hash_matches(&computed, &stored) {
        return Err(refuse(ErrorCode::AuthKeyInvalid, "unknown auth key"));
    }
    if info.revoked_at.is_some() {
        return Err(refuse(
            ErrorCode::AuthKeyRevoked,
            format!("auth key {id} was revoked"),
        ));
    }
    if info.expires_at <= now {
        return Err(refuse(
            ErrorCode::AuthKeyExpired,
            format!("auth key {id} has expired"),
        ));
    }
    if !db::keys::consume_auth_key(tx, &id, now).await? {
        return Err(refuse(
            ErrorCode::AuthKeyUsed,
            format!("auth key {id} is single-use and was already used"),
        ));
    }
    Ok(info)
}
