//! Just-in-time access requests: a node files one (`lattice request-access`), a person the
//! policy's `accessRequests` section names approves or denies it (`lattice-coordinator access
//! approve|deny`), and an approved one is a time-limited grant compiled with the policy (see
//! `policy::Grant`) until it ends. Every step is audited.
//!
//! Who may decide: a person signed in to the admin API (`lattice-coordinator login`) whom the
//! policy names as an approver for the destination, and never for their own request; admin
//! tokens and the local admin socket, which can rewrite the policy anyway, may decide any
//! request (the audit log says which kind of actor did).

use serde_json::json;
use tracing::info;

use crate::audit::NewEntry;
use crate::db::access::{AccessRequest, NewRequest};
use crate::db::changes::Kind;
use crate::db::{self, DbError};
use crate::error::ApiError;
use crate::feed;
use crate::model::NodeRecord;
use crate::state::{AppState, unix_now_ms};

/// Longest reason accepted.
pub const MAX_REASON: usize = 500;
/// Most requests one node may have pending.
pub const MAX_PENDING_PER_NODE: i64 = 10;
/// A request nobody decided within this long expires.
pub const PENDING_TTL_S: i64 = 24 * 3600;

/// Files `node`'s request for `ports` on `dst` lasting `secs`. The error is for the node.
pub async fn file(
    st: &AppState,
    node: &NodeRecord,
    dst: &str,
    ports: &str,
    secs: u64,
    reason: &str,
    now: i64,
) -> Result<Result<i64, String>, DbError> {
    let reason = reason.trim();
    if reason.is_empty() || reason.len() > MAX_REASON || reason.chars().any(char::is_control) {
        return Ok(Err(format!(
            "give a reason (one line, at most {MAX_REASON} characters)"
        )));
    }
    let policy = st.hub.read().policy().1;
    if let Err(e) = policy.check_request(dst, ports, secs) {
        return Ok(Err(e));
    }
    let node_id = i64::try_from(node.id.0).unwrap_or(i64::MAX);
    let mut tx = db::begin_write(&st.db).await?;
    if db::access::pending_of(&mut tx, node_id).await? >= MAX_PENDING_PER_NODE {
        return Ok(Err(format!(
            "node {} already has {MAX_PENDING_PER_NODE} requests waiting",
            node.name
        )));
    }
    let duration_s = i64::try_from(secs).unwrap_or(i64::MAX);
    let id = db::access::insert(
        &mut tx,
        NewRequest {
            node_id,
            node_name: &node.name,
            user_name: node.user.as_deref(),
            dst,
            ports,
            duration_s,
            reason,
            now,
        },
    )
    .await?;
    db::audit::append(
        &mut tx,
        st.audit.key(),
        NewEntry::new(
            format!("node:{}", node.name),
            "access.request",
            format!("access-request:{id}"),
            json!({"dst": dst, "ports": ports, "duration_s": duration_s, "reason": reason,
                   "user": node.user}),
        ),
        unix_now_ms(),
    )
    .await?;
    tx.commit().await?;
    info!(node = %node.name, id, %dst, %ports, secs, "access requested");
    Ok(Ok(id))
}

/// Requests, newest first: pending and in force, or `all`.
pub async fn list(st: &AppState, all: bool, now: i64) -> Result<Vec<AccessRequest>, ApiError> {
    let mut conn = st.db.acquire().await.map_err(DbError::from)?;
    Ok(db::access::list(&mut conn, all, now).await?)
}

/// The person behind an admin actor (`user:NAME (session ID)`), if a person.
fn person(actor: &str) -> Option<&str> {
    actor
        .strip_prefix("user:")
        .map(|rest| rest.split(" (session ").next().unwrap_or(rest))
}

/// Approves (`approve`) or denies request `id` as `actor`. An approval starts the grant now.
pub async fn decide(
    st: &AppState,
    id: i64,
    approve: bool,
    actor: &str,
    now: i64,
) -> Result<AccessRequest, ApiError> {
    let mut tx = db::begin_write(&st.db).await?;
    let Some(req) = db::access::get(&mut tx, id).await? else {
        return Err(ApiError::NotFound(format!("no access request {id}")));
    };
    if req.status != "pending" {
        return Err(ApiError::Conflict(format!(
            "access request {id} is {} already",
            req.status
        )));
    }
    let policy = st.hub.read().policy().1;
    let rule = match person(actor) {
        Some(name) => {
            if req.user_name.as_deref() == Some(name) {
                return Err(ApiError::Forbidden(
                    "you cannot decide your own access request".into(),
                ));
            }
            let groups = db::people::user_by_name(&mut tx, name)
                .await?
                .map(|u| u.groups)
                .unwrap_or_default();
            let Some(rule) = policy.approver_rule(&req.dst, name, &groups) else {
                return Err(ApiError::Forbidden(format!(
                    "{name} may not decide access to {} (the policy's accessRequests names \
                     its approvers)",
                    req.dst
                )));
            };
            Some(rule)
        }
        None => None,
    };
    let secs = u64::try_from(req.duration_s).unwrap_or(0);
    if approve && let Err(e) = policy.check_request(&req.dst, &req.ports, secs) {
        return Err(ApiError::Conflict(format!(
            "the policy no longer allows this request: {e}"
        )));
    }
    let (status, until) = if approve {
        ("approved", Some(now.saturating_add(req.duration_s)))
    } else {
        ("denied", None)
    };
    if !db::access::decide(&mut tx, id, status, actor, now, until).await? {
        return Err(ApiError::Conflict(format!(
            "access request {id} was decided meanwhile"
        )));
    }
    db::audit::append(
        &mut tx,
        st.audit.key(),
        NewEntry::new(
            actor,
            if approve {
                "access.approve"
            } else {
                "access.deny"
            },
            format!("access-request:{id}"),
            json!({"node": req.node_name, "user": req.user_name, "dst": req.dst,
                   "ports": req.ports, "expires_at": until, "approver_rule": rule}),
        ),
        unix_now_ms(),
    )
    .await?;
    let seq = feed::note(&mut tx, Kind::Policy, None, None).await?;
    feed::commit(st, tx, seq).await?;
    info!(id, %actor, status, "access request decided");
    let mut conn = st.db.acquire().await.map_err(DbError::from)?;
    db::access::get(&mut conn, id)
        .await?
        .ok_or_else(|| ApiError::Internal(format!("access request {id} vanished")))
}

/// Ends grants whose time is up (their rules already stopped applying on the nodes, which
/// enforce the window themselves) and requests left undecided for a day: marked expired,
/// audited, and dropped from the compiled policy. Cheap when nothing is due.
pub async fn sweep(st: &AppState, now: i64, check_pending: bool) -> Result<(), DbError> {
    let due = st
        .hub
        .read()
        .grants()
        .iter()
        .any(|g| g.until.as_second() <= now);
    if !due && !check_pending {
        return Ok(());
    }
    let mut tx = db::begin_write(&st.db).await?;
    let ended = db::access::expire_due(&mut tx, now, PENDING_TTL_S).await?;
    if ended.is_empty() {
        tx.commit().await?;
        return Ok(());
    }
    for id in &ended {
        db::audit::append(
            &mut tx,
            st.audit.key(),
            NewEntry::new(
                "system",
                "access.expire",
                format!("access-request:{id}"),
                json!({}),
            ),
            unix_now_ms(),
        )
        .await?;
    }
    let seq = feed::note(&mut tx, Kind::Policy, None, None).await?;
    feed::commit(st, tx, seq).await?;
    info!(?ended, "access requests ended");
    Ok(())
}

/// The grants in force at `now`, for the hub: each approved request's node addresses to its
/// destination, from approval to end. Requests of nodes that are gone are left out.
pub async fn grants(
    conn: &mut sqlx::AnyConnection,
    now: i64,
) -> Result<Vec<policy::Grant>, DbError> {
    let reqs = db::access::in_force(conn, now).await?;
    let mut out = Vec::with_capacity(reqs.len());
    for r in reqs {
        let Some(node) =
            db::nodes::by_id(conn, wire::NodeId(u64::try_from(r.node_id).unwrap_or(0))).await?
        else {
            continue;
        };
        let (Some(from), Some(until)) = (r.decided_at, r.expires_at) else {
            continue;
        };
        let ts = |s: i64| jiff::Timestamp::from_second(s).unwrap_or(jiff::Timestamp::MAX);
        out.push(policy::Grant {
            id: r.id,
            src: node.addresses(),
            dst: r.dst,
            ports: r.ports,
            from: ts(from),
            until: ts(until),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::person;

    #[test]
    fn only_a_signed_in_person_is_a_person() {
        assert_eq!(
            person("user:alice@example.com (session 0a1b2c3d4e5f)"),
            Some("alice@example.com")
        );
        assert_eq!(person("token:0a1b2c3d4e5f"), None);
        assert_eq!(person("local:uid=0"), None);
    }
}
