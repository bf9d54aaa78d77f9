//! HTTP routes. The public listener (plain HTTP: everything on it is either public or
//! protected end to end by the control channel's own encryption) serves `/key`, `/healthz`,
//! the `/control` WebSocket and the sign-in pages (`/login`, `/oidc/callback`; put the
//! listener behind TLS when people sign in from outside). The admin API, `/admin/v1`, is served only over TLS on the
//! admin listener (`serve --admin-listen`, with a token) and on the admin Unix socket (to the
//! coordinator's own user and root).

pub mod admin;
pub mod control;
pub mod login;

use axum::extract::{Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tower_http::trace::TraceLayer;

use crate::db::keys::TokenScope;
use crate::error::{ApiError, InternalDetail};
use crate::ops;
use crate::state::AppState;

/// Who is calling the admin API, for the audit log.
#[derive(Debug, Clone)]
pub struct Actor(pub String);

/// What `GET /key` returns: the coordinator's public control key and its fingerprint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyInfo {
    /// The control key.
    pub control_key: wire::ControlKey,
    /// Hex fingerprint, as embedded in auth keys.
    pub fingerprint: String,
    /// The key relays check tickets with (`lattice-relay serve --coordinator-key`).
    #[serde(default)]
    pub ticket_key: Option<wire::TicketKey>,
}

/// The public router.
pub fn router(st: AppState) -> Router {
    Router::new()
        .route("/key", get(key))
        .route("/healthz", get(|| async { "ok" }))
        .route("/relay/revocations", get(revocations))
        .merge(control::router())
        .merge(login::router())
        .layer(middleware::from_fn(log_internal_errors))
        .layer(trace_layer())
        .with_state(st)
}

/// The admin listener's router (served over TLS): `/admin/v1` for admin tokens,
/// `/admin/login/{start,poll}` where a person who is an admin signs in for a session token,
/// and the web console at `/console`.
pub fn admin_router(st: AppState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/admin/login/start", axum::routing::post(admin_login_start))
        .route("/admin/login/poll", axum::routing::post(admin_login_poll))
        .nest(
            "/admin/v1",
            admin::router().layer(middleware::from_fn_with_state(st.clone(), token_auth)),
        )
        .merge(crate::console::router(st.clone()))
        .layer(middleware::from_fn(log_internal_errors))
        .layer(trace_layer())
        .with_state(st)
}

/// Request tracing that names the path only: query strings carry secrets (the provider's
/// authorization code and state on `/oidc/callback`) and never reach the logs.
fn trace_layer() -> TraceLayer<
    tower_http::classify::SharedClassifier<tower_http::classify::ServerErrorsAsFailures>,
    fn(&Request) -> tracing::Span,
> {
    TraceLayer::new_for_http().make_span_with(request_span as fn(&Request) -> tracing::Span)
}

fn request_span(req: &Request) -> tracing::Span {
    tracing::debug_span!("request", method = %req.method(), path = %req.uri().path())
}

async fn key(State(st): State<AppState>) -> Json<KeyInfo> {
    let mut fingerprint = String::new();
    wire::keys::push_hex(&mut fingerprint, &st.fingerprint);
    Json(KeyInfo {
        control_key: st.control_public(),
        fingerprint,
        ticket_key: Some(wire::TicketKey::from_bytes(st.tickets.public())),
    })
}

/// The node keys relays must stop serving now, signed with the relay-ticket key. Standalone
/// relays poll it (`lattice-relay serve --coordinator-url`) and cut a removed node within
/// seconds instead of when its ticket runs out.
async fn revocations(State(st): State<AppState>) -> Json<wire::SignedRevocations> {
    let now = crate::state::unix_now();
    let list = wire::RevocationList {
        issued_at: now,
        revoked: st
            .hub
            .read()
            .revocations(now)
            .into_iter()
            .map(|(node_key, until)| wire::Revocation { node_key, until })
            .collect(),
    };
    Json(relay::revocation::sign(&st.tickets, &list))
}

async fn admin_login_start(
    State(st): State<AppState>,
    peer: Option<axum::Extension<axum::extract::ConnectInfo<std::net::SocketAddr>>>,
) -> Result<Json<ops::people::AdminLoginStart>, ApiError> {
    let ip = relay::http::peer_ip(peer.as_ref().map(|e| &e.0));
    Ok(Json(
        ops::people::start_admin(
            &st,
            "admin sign-in (lattice-coordinator login)",
            &ip.to_string(),
            crate::state::unix_now(),
        )
        .await?,
    ))
}

#[derive(Deserialize)]
struct Poll {
    poll_token: String,
}

async fn admin_login_poll(
    State(st): State<AppState>,
    Json(p): Json<Poll>,
) -> Result<Json<ops::people::AdminPoll>, ApiError> {
    Ok(Json(
        ops::people::poll_admin(&st, &p.poll_token, crate::state::unix_now()).await?,
    ))
}

async fn token_auth(State(st): State<AppState>, mut req: Request, next: Next) -> Response {
    let token = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned);
    let Some(token) = token else {
        return ApiError::Unauthorized.into_response();
    };
    match ops::authenticate_token(&st, &token, crate::state::unix_now()).await {
        Ok((actor, scope)) => {
            let reads = matches!(*req.method(), Method::GET | Method::HEAD);
            if !reads && scope < TokenScope::Write {
                return ApiError::Forbidden("this token may only read".into()).into_response();
            }
            req.extensions_mut().insert(Actor(actor));
            next.run(req).await
        }
        Err(e) => e.into_response(),
    }
}

/// Logs the detail of 500 responses (kept out of the response body).
pub async fn log_internal_errors(req: Request, next: Next) -> Response {
    let path = req.uri().path().to_owned();
    let resp = next.run(req).await;
    if resp.status() == StatusCode::INTERNAL_SERVER_ERROR
        && let Some(InternalDetail(detail)) = resp.extensions().get::<InternalDetail>()
    {
        tracing::error!(%path, error = %detail, "admin request failed");
    }
    resp
}
