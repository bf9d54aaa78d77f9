//! The admin API (`/admin/v1`). The caller's [`Actor`] is set by the listener's middleware:
//! peer credentials on the Unix socket, a verified token on TCP.

use axum::extract::{Extension, Path, Query, State};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};

use super::Actor;
use crate::audit::{Entry, Verification};
use crate::db::policy::{PolicyVersion, StoredPolicy};
use crate::error::ApiError;
use crate::model::Attrs;
use crate::model::AuthKeyInfo;
use crate::ops::policy::{AttrChange, DiffView, PolicyText, PolicyView, SetOutcome};
use crate::ops::{
    self, CreateAuthKey, CreateToken, CreatedAuthKey, CreatedToken, NodeView, Settings,
};
use crate::state::AppState;

/// Admin routes.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/authkeys", post(create_key).get(list_keys))
        .route("/authkeys/{id}/revoke", post(revoke_key))
        .route("/nodes", get(list_nodes))
        .route("/nodes/{name}", delete(remove_node))
        .route("/nodes/{name}/expire", post(expire_node))
        .route("/nodes/{name}/attrs", put(set_attrs))
        .route("/nodes/{name}/routes", post(set_routes))
        .route("/policy", get(get_policy).put(set_policy))
        .route("/policy/diff", post(diff_policy))
        .route("/policy/versions", get(policy_versions))
        .route("/policy/versions/{version}", get(policy_version))
        .route("/audit", get(audit_list))
        .route("/audit/verify", get(audit_verify))
        .route("/settings", get(get_settings).put(put_settings))
        .route("/relays", get(list_relays).post(add_relay))
        .route("/relays/{name}", delete(remove_relay))
        .route("/relay/stats", get(relay_stats))
        .route("/federation", get(list_federation).post(add_federation))
        .route("/federation/{id}", delete(remove_federation))
        .route("/access", get(list_access))
        .route("/access/{id}/approve", post(approve_access))
        .route("/access/{id}/deny", post(deny_access))
        .route("/users", get(list_users))
        .route("/users/{name}/key-expiry", put(set_user_key_expiry))
        .route("/tokens", post(create_token).get(list_tokens))
        .route("/tokens/{id}", delete(revoke_token))
}

async fn create_key(
    State(st): State<AppState>,
    Extension(Actor(actor)): Extension<Actor>,
    Json(req): Json<CreateAuthKey>,
) -> Result<Json<CreatedAuthKey>, ApiError> {
    Ok(Json(ops::create_auth_key(&st, req, &actor).await?))
}

async fn list_keys(State(st): State<AppState>) -> Result<Json<Vec<AuthKeyInfo>>, ApiError> {
    Ok(Json(ops::list_auth_keys(&st).await?))
}

async fn revoke_key(
    State(st): State<AppState>,
    Extension(Actor(actor)): Extension<Actor>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    ops::revoke_auth_key(&st, &id, &actor).await?;
    Ok(Json(json!({"revoked": id})))
}

async fn list_nodes(State(st): State<AppState>) -> Result<Json<Vec<NodeView>>, ApiError> {
    Ok(Json(ops::list_nodes(&st).await?))
}

async fn remove_node(
    State(st): State<AppState>,
    Extension(Actor(actor)): Extension<Actor>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let node = ops::remove_node(&st, &name, &actor, "removed by an admin").await?;
    Ok(Json(json!({"removed": node.name, "id": node.id})))
}

async fn expire_node(
    State(st): State<AppState>,
    Extension(Actor(actor)): Extension<Actor>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    ops::expire_node(&st, &name, &actor).await?;
    Ok(Json(json!({"expired": name})))
}

#[derive(Deserialize)]
struct AuditQuery {
    #[serde(default)]
    after: i64,
    #[serde(default = "default_limit")]
    limit: i64,
}

fn default_limit() -> i64 {
    1000
}

async fn audit_list(
    State(st): State<AppState>,
    Query(q): Query<AuditQuery>,
) -> Result<Json<Vec<Entry>>, ApiError> {
    Ok(Json(ops::audit_list(&st, q.after, q.limit).await?))
}

async fn audit_verify(State(st): State<AppState>) -> Result<Json<Verification>, ApiError> {
    Ok(Json(ops::audit_verify(&st).await?))
}

/// Token management only on the local socket: a token cannot mint or revoke tokens.
fn local_only(actor: &str) -> Result<(), ApiError> {
    if actor.starts_with("token:") {
        return Err(ApiError::Forbidden(
            "admin tokens are managed only on the coordinator's Unix socket".into(),
        ));
    }
    Ok(())
}

async fn create_token(
    State(st): State<AppState>,
    Extension(Actor(actor)): Extension<Actor>,
    body: axum::body::Bytes,
) -> Result<Json<CreatedToken>, ApiError> {
    // Who may ask comes before what is asked.
    local_only(&actor)?;
    let req: CreateToken = if body.is_empty() {
        CreateToken::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::BadRequest(format!("a token request: {e}")))?
    };
    Ok(Json(ops::create_token(&st, req, &actor).await?))
}

async fn list_tokens(
    State(st): State<AppState>,
) -> Result<Json<Vec<crate::db::keys::TokenInfo>>, ApiError> {
    Ok(Json(ops::list_tokens(&st).await?))
}

async fn revoke_token(
    State(st): State<AppState>,
    Extension(Actor(actor)): Extension<Actor>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    local_only(&actor)?;
    ops::revoke_token(&st, &id, &actor).await?;
    Ok(Json(json!({"revoked": id})))
}

#[derive(serde::Deserialize)]
struct AccessQuery {
    #[serde(default)]
    all: bool,
}

async fn list_access(
    State(st): State<AppState>,
    Query(q): Query<AccessQuery>,
) -> Result<Json<Vec<crate::db::access::AccessRequest>>, ApiError> {
    Ok(Json(
        ops::access::list(&st, q.all, crate::state::unix_now()).await?,
    ))
}

async fn approve_access(
    State(st): State<AppState>,
    Extension(Actor(actor)): Extension<Actor>,
    Path(id): Path<i64>,
) -> Result<Json<crate::db::access::AccessRequest>, ApiError> {
    Ok(Json(
        ops::access::decide(&st, id, true, &actor, crate::state::unix_now()).await?,
    ))
}

async fn deny_access(
    State(st): State<AppState>,
    Extension(Actor(actor)): Extension<Actor>,
    Path(id): Path<i64>,
) -> Result<Json<crate::db::access::AccessRequest>, ApiError> {
    Ok(Json(
        ops::access::decide(&st, id, false, &actor, crate::state::unix_now()).await?,
    ))
}

async fn list_users(
    State(st): State<AppState>,
) -> Result<Json<Vec<ops::people::UserView>>, ApiError> {
    Ok(Json(ops::people::list_users(&st).await?))
}

#[derive(serde::Deserialize)]
struct KeyExpiry {
    key_expiry_secs: Option<i64>,
}

async fn set_user_key_expiry(
    State(st): State<AppState>,
    Extension(Actor(actor)): Extension<Actor>,
    Path(name): Path<String>,
    Json(req): Json<KeyExpiry>,
) -> Result<Json<Value>, ApiError> {
    ops::people::set_user_key_expiry(&st, &name, req.key_expiry_secs, &actor).await?;
    Ok(Json(
        json!({"user": name, "key_expiry_secs": req.key_expiry_secs}),
    ))
}

#[derive(serde::Deserialize)]
struct RoutesChange {
    #[serde(default)]
    approve: Vec<ipnet::IpNet>,
    #[serde(default)]
    unapprove: Vec<ipnet::IpNet>,
}

async fn set_routes(
    State(st): State<AppState>,
    Extension(Actor(actor)): Extension<Actor>,
    Path(name): Path<String>,
    Json(req): Json<RoutesChange>,
) -> Result<Json<ops::RoutesView>, ApiError> {
    Ok(Json(
        ops::set_routes(&st, &name, &req.approve, &req.unapprove, &actor).await?,
    ))
}

async fn get_settings(State(st): State<AppState>) -> Result<Json<Settings>, ApiError> {
    Ok(Json(ops::settings(&st).await?))
}

async fn put_settings(
    State(st): State<AppState>,
    Extension(Actor(actor)): Extension<Actor>,
    Json(req): Json<ops::SettingsChange>,
) -> Result<Json<Settings>, ApiError> {
    Ok(Json(ops::change_settings(&st, req, &actor).await?))
}

async fn set_attrs(
    State(st): State<AppState>,
    Extension(Actor(actor)): Extension<Actor>,
    Path(name): Path<String>,
    Json(req): Json<AttrChange>,
) -> Result<Json<Attrs>, ApiError> {
    Ok(Json(
        ops::policy::set_attrs(&st, &name, &req, &actor).await?,
    ))
}

async fn get_policy(State(st): State<AppState>) -> Result<Json<PolicyView>, ApiError> {
    Ok(Json(ops::policy::get(&st).await?))
}

async fn set_policy(
    State(st): State<AppState>,
    Extension(Actor(actor)): Extension<Actor>,
    Json(req): Json<PolicyText>,
) -> Result<Json<SetOutcome>, ApiError> {
    Ok(Json(ops::policy::set(&st, &req, &actor).await?))
}

async fn diff_policy(
    State(st): State<AppState>,
    Json(req): Json<PolicyText>,
) -> Result<Json<DiffView>, ApiError> {
    Ok(Json(ops::policy::diff(&st, &req).await?))
}

async fn policy_versions(State(st): State<AppState>) -> Result<Json<Vec<PolicyVersion>>, ApiError> {
    Ok(Json(ops::policy::versions(&st).await?))
}

async fn policy_version(
    State(st): State<AppState>,
    Path(version): Path<i64>,
) -> Result<Json<StoredPolicy>, ApiError> {
    Ok(Json(ops::policy::version(&st, version).await?))
}

async fn list_relays(State(st): State<AppState>) -> Json<Vec<wire::RelayInfo>> {
    Json(crate::relays::list(&st))
}

async fn add_relay(
    State(st): State<AppState>,
    Extension(Actor(actor)): Extension<Actor>,
    Json(req): Json<crate::relays::AddRelay>,
) -> Result<Json<wire::RelayInfo>, ApiError> {
    Ok(Json(crate::relays::add(&st, req, &actor).await?))
}

async fn remove_relay(
    State(st): State<AppState>,
    Extension(Actor(actor)): Extension<Actor>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    crate::relays::remove(&st, &name, &actor).await?;
    Ok(Json(json!({"removed": name})))
}

async fn list_federation(
    State(st): State<AppState>,
) -> Result<Json<Vec<crate::federation::TrustRule>>, ApiError> {
    Ok(Json(ops::federation::list(&st).await?))
}

async fn add_federation(
    State(st): State<AppState>,
    Extension(Actor(actor)): Extension<Actor>,
    Json(req): Json<ops::federation::AddRule>,
) -> Result<Json<crate::federation::TrustRule>, ApiError> {
    Ok(Json(ops::federation::add(&st, req, &actor).await?))
}

async fn remove_federation(
    State(st): State<AppState>,
    Extension(Actor(actor)): Extension<Actor>,
    Path(id): Path<i64>,
) -> Result<Json<crate::federation::TrustRule>, ApiError> {
    Ok(Json(ops::federation::remove(&st, id, &actor).await?))
}

async fn relay_stats(
    State(st): State<AppState>,
) -> Result<Json<crate::relays::RelayStats>, ApiError> {
    Ok(Json(crate::relays::stats(&st)?))
}
