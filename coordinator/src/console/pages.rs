//! The console's pages and the fragments htmx swaps into them. Handlers turn what the
//! operations return into small view rows; the templates (`templates/console/`) only lay them
//! out, escaped by askama.

use std::collections::HashMap;
use std::time::Duration;

use askama::Template;
use axum::Form;
use axum::extract::{Extension, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use serde::Deserialize;

use super::{COOKIE, ConsoleUser, SSO_COOKIE, cookie, set_cookie};
use crate::db::keys::TokenScope;
use crate::error::ApiError;
use crate::ops::policy::{DiffView, PolicyText};
use crate::ops::{self, CreateAuthKey, NodeView, SettingsChange};
use crate::state::{AppState, unix_now};

/// Audit entries one page shows at most.
const AUDIT_ROWS: usize = 500;

// ------------------------------------------------------------------ rendering

fn render(t: &impl Template) -> Response {
    match t.render() {
        Ok(html) => Html(html).into_response(),
        Err(e) => ApiError::Internal(format!("rendering a console page: {e}")).into_response(),
    }
}

/// A one-line notice (success or problem), as a fragment.
pub(super) fn notice_html(ok: bool, text: &str) -> Html<String> {
    let t = Notice {
        ok,
        text: text.to_owned(),
        details: Vec::new(),
    };
    Html(t.render().unwrap_or_default())
}

/// An operation's error as a fragment with the status the admin API would give.
fn problem(e: ApiError) -> Response {
    let (status, _) = e.status();
    let details = match &e {
        ApiError::Rejected { details, .. } => details.clone(),
        _ => Vec::new(),
    };
    if let ApiError::Internal(detail) = &e {
        tracing::error!(error = %detail, "console request failed");
    }
    let t = Notice {
        ok: false,
        text: e.to_string(),
        details,
    };
    (status, render(&t)).into_response()
}

fn done(text: impl Into<String>) -> Response {
    render(&Notice {
        ok: true,
        text: text.into(),
        details: Vec::new(),
    })
}

/// Unix seconds as `2026-11-27 10:00:00 UTC`.
fn when(unix: i64) -> String {
    jiff::Timestamp::from_second(unix)
        .map(|t| t.strftime("%Y-%m-%d %H:%M:%S UTC").to_string())
        .unwrap_or_else(|_| unix.to_string())
}

/// Seconds ago, briefly: `12s ago`, `5m ago`.
fn ago(unix: i64, now: i64) -> String {
    let d = Duration::from_secs(u64::try_from(now.saturating_sub(unix)).unwrap_or(0));
    let secs = d.as_secs();
    if secs < 60 {
        format!("{secs}s ago")
    } else if secs < 3600 {
        format!("{}m ago", secs / 60)
    } else if secs < 86_400 {
        format!("{}h ago", secs / 3600)
    } else {
        format!("{}d ago", secs / 86_400)
    }
}

/// What every signed-in page shows around its content.
pub(crate) struct Chrome {
    pub(crate) actor: String,
    pub(crate) csrf: String,
    pub(crate) read_only: bool,
    pub(crate) section: &'static str,
}

impl Chrome {
    fn new(u: &ConsoleUser, section: &'static str) -> Self {
        Self {
            actor: u.actor.clone(),
            csrf: u.csrf.clone(),
            read_only: u.scope < TokenScope::Write,
            section,
        }
    }
}

#[derive(Template)]
#[template(path = "console/notice.html")]
struct Notice {
    ok: bool,
    text: String,
    details: Vec<String>,
}

// ------------------------------------------------------------------ sign-in

#[derive(Template)]
#[template(path = "console/login.html")]
struct LoginPage {
    error: Option<String>,
    sso: bool,
}

pub(super) async fn login_page(State(st): State<AppState>) -> Response {
    render(&LoginPage {
        error: None,
        sso: st.sign_in.is_some(),
    })
}

#[derive(Deserialize)]
pub(super) struct LoginForm {
    token: String,
}

fn signed_in_response(st: &AppState, token: String, now: i64) -> HeaderValue {
    let cookie = st.console.create(token, now);
    set_cookie(COOKIE, &cookie, 8 * 3600)
}

pub(super) async fn login(State(st): State<AppState>, Form(f): Form<LoginForm>) -> Response {
    let now = unix_now();
    let token = f.token.trim().to_owned();
    match ops::authenticate_token(&st, &token, now).await {
        Ok((actor, _)) => {
            tracing::info!(%actor, "console sign-in");
            let mut r = Redirect::to("/console/nodes").into_response();
            r.headers_mut()
                .insert(header::SET_COOKIE, signed_in_response(&st, token, now));
            r
        }
        Err(_) => (
            StatusCode::UNAUTHORIZED,
            render(&LoginPage {
                error: Some(
                    "that is not a valid admin token (or it was revoked or expired)".into(),
                ),
                sso: st.sign_in.is_some(),
            }),
        )
            .into_response(),
    }
}

#[derive(Template)]
#[template(path = "console/sso.html")]
struct SsoPage {
    url: String,
    code: String,
}

pub(super) async fn sso_start(
    State(st): State<AppState>,
    peer: Option<Extension<axum::extract::ConnectInfo<std::net::SocketAddr>>>,
) -> Response {
    let ip = relay::http::peer_ip(peer.as_ref().map(|e| &e.0));
    match ops::people::start_admin(
        &st,
        "admin sign-in (web console)",
        &ip.to_string(),
        unix_now(),
    )
    .await
    {
        Ok(s) => {
            let mut r = render(&SsoPage {
                url: s.url.clone(),
                code: s.user_code.clone(),
            });
            let ttl = (s.expires_unix - unix_now()).max(1);
            r.headers_mut().insert(
                header::SET_COOKIE,
                set_cookie(SSO_COOKIE, &s.poll_token, ttl),
            );
            r
        }
        Err(e) => problem(e),
    }
}

pub(super) async fn sso_poll(State(st): State<AppState>, headers: HeaderMap) -> Response {
    let Some(poll) = cookie(&headers, SSO_COOKIE) else {
        return problem(ApiError::BadRequest(
            "no sign-in is under way in this browser".into(),
        ));
    };
    let now = unix_now();
    match ops::people::poll_admin(&st, poll, now).await {
        Ok(ops::people::AdminPoll::Pending) => StatusCode::NO_CONTENT.into_response(),
        Ok(ops::people::AdminPoll::Done { token, user, .. }) => {
            tracing::info!(%user, "console sign-in through the identity provider");
            let mut r = StatusCode::NO_CONTENT.into_response();
            let h = r.headers_mut();
            h.append(header::SET_COOKIE, signed_in_response(&st, token, now));
            h.append(header::SET_COOKIE, set_cookie(SSO_COOKIE, "", 0));
            h.insert("hx-redirect", HeaderValue::from_static("/console/nodes"));
            r
        }
        Err(e) => problem(e),
    }
}

pub(super) async fn logout(State(st): State<AppState>, headers: HeaderMap) -> Response {
    if let Some(c) = cookie(&headers, COOKIE) {
        st.console.remove(c);
    }
    let mut r = StatusCode::NO_CONTENT.into_response();
    let h = r.headers_mut();
    h.insert(header::SET_COOKIE, set_cookie(COOKIE, "", 0));
    h.insert("hx-redirect", HeaderValue::from_static("/console/login"));
    r
}

// ------------------------------------------------------------------ assets

const HTMX: &[u8] = include_bytes!("../../console/static/htmx.min.js");
const CSS: &[u8] = include_bytes!("../../console/static/console.css");

pub(super) async fn asset(Path(file): Path<String>) -> Response {
    let (body, kind) = match file.as_str() {
        "htmx.min.js" => (HTMX, "text/javascript; charset=utf-8"),
        "console.css" => (CSS, "text/css; charset=utf-8"),
        _ => return StatusCode::NOT_FOUND.into_response(),
    };
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::CACHE_CONTROL, "max-age=3600"),
        ],
        body,
    )
        .into_response()
}

// ------------------------------------------------------------------ nodes

pub(crate) struct NodeRow {
    pub(crate) name: String,
    pub(crate) owner: String,
    pub(crate) addresses: String,
    pub(crate) online: bool,
    pub(crate) last_seen: String,
    pub(crate) os: String,
    pub(crate) posture: String,
    pub(crate) key_expiry: String,
    pub(crate) relay: String,
    pub(crate) paths: String,
    pub(crate) expired: bool,
}

pub(crate) struct PathRow {
    pub(crate) peer: String,
    pub(crate) kind: &'static str,
    pub(crate) via: String,
    pub(crate) reason: String,
}

fn owner(n: &NodeView) -> String {
    if n.tags.is_empty() {
        n.user.clone().unwrap_or_else(|| "-".into())
    } else {
        n.tags.join(", ")
    }
}

fn node_row(relays: &[wire::RelayInfo], n: &NodeView, now: i64) -> NodeRow {
    let relay = n
        .home_relay
        .and_then(|id| relays.iter().find(|r| r.id == id).map(|r| r.name.clone()))
        .unwrap_or_else(|| "-".into());
    let count = |k: wire::PathKind| n.paths.iter().filter(|p| p.kind == k).count();
    let paths = if n.paths.is_empty() {
        "-".into()
    } else {
        let (direct, relayed, none) = (
            count(wire::PathKind::Direct),
            count(wire::PathKind::Relay),
            count(wire::PathKind::None),
        );
        let mut parts = vec![format!("{direct} direct")];
        if relayed > 0 {
            parts.push(format!("{relayed} relayed"));
        }
        if none > 0 {
            parts.push(format!("{none} not connected"));
        }
        parts.join(", ")
    };
    NodeRow {
        name: n.name.clone(),
        owner: owner(n),
        addresses: n
            .addresses
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(" "),
        online: n.online,
        last_seen: if n.online {
            "now".into()
        } else {
            n.last_seen_unix
                .map_or_else(|| "never".into(), |t| ago(t, now))
        },
        os: if n.os.is_empty() {
            "-".into()
        } else {
            n.os.clone()
        },
        posture: n
            .posture
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" "),
        key_expiry: match n.key_expiry_unix {
            None => "never".into(),
            Some(_) if n.expired => "expired".into(),
            Some(t) => when(t),
        },
        relay,
        paths,
        expired: n.expired,
    }
}

#[derive(Template)]
#[template(path = "console/nodes.html")]
struct NodesPage {
    chrome: Chrome,
    rows: Vec<NodeRow>,
}

#[derive(Template)]
#[template(path = "console/nodes_table.html")]
struct NodesTable {
    rows: Vec<NodeRow>,
}

async fn node_rows(st: &AppState) -> Result<Vec<NodeRow>, ApiError> {
    let now = unix_now();
    let relays = crate::relays::list(st);
    Ok(ops::list_nodes(st)
        .await?
        .iter()
        .map(|n| node_row(&relays, n, now))
        .collect())
}

pub(super) async fn nodes(
    State(st): State<AppState>,
    Extension(u): Extension<ConsoleUser>,
) -> Response {
    match node_rows(&st).await {
        Ok(rows) => render(&NodesPage {
            chrome: Chrome::new(&u, "nodes"),
            rows,
        }),
        Err(e) => problem(e),
    }
}

pub(super) async fn nodes_live(State(st): State<AppState>) -> Response {
    match node_rows(&st).await {
        Ok(rows) => render(&NodesTable { rows }),
        Err(e) => problem(e),
    }
}

#[derive(Template)]
#[template(path = "console/node.html")]
struct NodePage {
    chrome: Chrome,
    node: NodeRow,
    detail: NodeDetail,
}

#[derive(Template)]
#[template(path = "console/node_detail.html")]
struct NodeDetailFragment {
    node: NodeRow,
    detail: NodeDetail,
}

pub(crate) struct NodeDetail {
    pub(crate) fqdn: String,
    pub(crate) endpoints: String,
    pub(crate) nat: String,
    pub(crate) routes: String,
    pub(crate) version: String,
    pub(crate) registered: String,
    pub(crate) custom_attrs: Vec<(String, String)>,
    pub(crate) paths: Vec<PathRow>,
    pub(crate) paths_reported: String,
}

async fn node_view(st: &AppState, name: &str) -> Result<(NodeRow, NodeDetail), ApiError> {
    let nodes = ops::list_nodes(st).await?;
    let n = nodes
        .iter()
        .find(|n| n.name == name)
        .ok_or_else(|| ApiError::NotFound(format!("no node named {name:?}")))?;
    let now = unix_now();
    let names: HashMap<wire::NodeId, &str> =
        nodes.iter().map(|n| (n.id, n.name.as_str())).collect();
    let nat = n.nat.as_ref().map_or_else(
        || "not measured".into(),
        |nat| {
            let mut s = if !nat.udp {
                "UDP blocked".to_owned()
            } else if nat.is_hard() {
                "hard (endpoint-dependent) NAT".to_owned()
            } else {
                "easy NAT or none".to_owned()
            };
            if let Some(ip) = nat.public_ip {
                s.push_str(&format!(", public address {ip}"));
            }
            if let Some(m) = nat.port_mapped {
                s.push_str(&format!(", gateway port mapping {m}"));
            }
            s
        },
    );
    let routes = if n.routes.advertised.is_empty() {
        "-".into()
    } else {
        n.routes
            .advertised
            .iter()
            .map(|r| {
                let state = if n.routes.primary.contains(r) {
                    "primary"
                } else if n.routes.approved.contains(r) {
                    "approved"
                } else {
                    "awaiting approval"
                };
                format!("{r} ({state})")
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    let detail = NodeDetail {
        fqdn: n.fqdn.clone(),
        endpoints: n
            .endpoints
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(" "),
        nat,
        routes,
        version: n.client_version.clone(),
        registered: when(n.created_unix),
        custom_attrs: n
            .custom_attrs
            .iter()
            .map(|(k, v)| (k.clone(), v.to_string()))
            .collect(),
        paths: n
            .paths
            .iter()
            .map(|p| PathRow {
                peer: names
                    .get(&p.peer)
                    .map_or_else(|| format!("node {}", p.peer.0), |s| (*s).to_owned()),
                kind: p.kind.as_str(),
                via: match (&p.addr, &p.relay) {
                    (Some(a), _) => a.to_string(),
                    (None, Some(r)) => format!("relay {r}"),
                    (None, None) => "-".into(),
                },
                reason: p.reason.clone().unwrap_or_default(),
            })
            .collect(),
        paths_reported: n.paths_unix.map_or_else(|| "never".into(), |t| ago(t, now)),
    };
    Ok((node_row(&crate::relays::list(st), n, now), detail))
}

pub(super) async fn node(
    State(st): State<AppState>,
    Extension(u): Extension<ConsoleUser>,
    Path(name): Path<String>,
) -> Response {
    match node_view(&st, &name).await {
        Ok((node, detail)) => render(&NodePage {
            chrome: Chrome::new(&u, "nodes"),
            node,
            detail,
        }),
        Err(e) => problem(e),
    }
}

pub(super) async fn node_live(State(st): State<AppState>, Path(name): Path<String>) -> Response {
    match node_view(&st, &name).await {
        Ok((node, detail)) => render(&NodeDetailFragment { node, detail }),
        Err(e) => problem(e),
    }
}

pub(super) async fn remove_node(
    State(st): State<AppState>,
    Extension(u): Extension<ConsoleUser>,
    Path(name): Path<String>,
) -> Response {
    match ops::remove_node(&st, &name, &u.actor, "removed by an admin").await {
        Ok(_) => {
            let mut r = StatusCode::NO_CONTENT.into_response();
            r.headers_mut()
                .insert("hx-redirect", HeaderValue::from_static("/console/nodes"));
            r
        }
        Err(e) => problem(e),
    }
}

pub(super) async fn expire_node(
    State(st): State<AppState>,
    Extension(u): Extension<ConsoleUser>,
    Path(name): Path<String>,
) -> Response {
    match ops::expire_node(&st, &name, &u.actor).await {
        Ok(()) => done(format!(
            "{name}'s key expired: it is cut off until it signs in again"
        )),
        Err(e) => problem(e),
    }
}

#[derive(Deserialize)]
pub(super) struct AttrForm {
    name: String,
    #[serde(default)]
    value: String,
    /// `set` or `unset`.
    op: String,
}

pub(super) async fn set_attr(
    State(st): State<AppState>,
    Extension(u): Extension<ConsoleUser>,
    Path(node): Path<String>,
    Form(f): Form<AttrForm>,
) -> Response {
    let name = f.name.trim().to_owned();
    let mut change = ops::policy::AttrChange::default();
    match f.op.as_str() {
        "set" => {
            change
                .set
                .insert(name.clone(), wire::AttrValue::from_text(f.value.trim()));
        }
        "unset" => change.unset.push(name.clone()),
        other => return problem(ApiError::BadRequest(format!("unknown action {other:?}"))),
    }
    match ops::policy::set_attrs(&st, &node, &change, &u.actor).await {
        Ok(_) => {
            let mut r = done(format!(
                "{node}: {name} {}",
                if f.op == "set" { "set" } else { "removed" }
            ));
            r.headers_mut()
                .insert("hx-trigger", HeaderValue::from_static("node-changed"));
            r
        }
        Err(e) => problem(e),
    }
}

// ------------------------------------------------------------------ auth keys

pub(crate) struct KeyRow {
    pub(crate) id: String,
    pub(crate) kind: String,
    pub(crate) owner: String,
    pub(crate) created: String,
    pub(crate) created_by: String,
    pub(crate) expires: String,
    pub(crate) used: i64,
    pub(crate) live: bool,
    pub(crate) state: String,
}

#[derive(Template)]
#[template(path = "console/keys.html")]
struct KeysPage {
    chrome: Chrome,
    keys: Vec<KeyRow>,
}

#[derive(Template)]
#[template(path = "console/keys_table.html")]
struct KeysTable {
    keys: Vec<KeyRow>,
    chrome: Chrome,
}

#[derive(Template)]
#[template(path = "console/key_created.html")]
struct KeyCreated {
    key: String,
    id: String,
}

async fn key_rows(st: &AppState) -> Result<Vec<KeyRow>, ApiError> {
    let now = unix_now();
    let mut keys = ops::list_auth_keys(st).await?;
    keys.sort_by_key(|k| std::cmp::Reverse(k.created_at));
    Ok(keys
        .into_iter()
        .map(|k| {
            let state = if k.revoked_at.is_some() {
                "revoked"
            } else if k.expires_at <= now {
                "expired"
            } else if !k.reusable && k.used_count > 0 {
                "used"
            } else {
                "valid"
            };
            let mut kind = vec![if k.reusable { "reusable" } else { "one-off" }];
            if k.ephemeral {
                kind.push("ephemeral");
            }
            KeyRow {
                owner: if k.tags.is_empty() {
                    k.user.clone().unwrap_or_else(|| "-".into())
                } else {
                    k.tags.join(", ")
                },
                kind: kind.join(", "),
                created: when(k.created_at),
                created_by: k.created_by,
                expires: when(k.expires_at),
                used: k.used_count,
                live: state == "valid",
                state: state.into(),
                id: k.id,
            }
        })
        .collect())
}

pub(super) async fn keys(
    State(st): State<AppState>,
    Extension(u): Extension<ConsoleUser>,
) -> Response {
    match key_rows(&st).await {
        Ok(keys) => render(&KeysPage {
            chrome: Chrome::new(&u, "keys"),
            keys,
        }),
        Err(e) => problem(e),
    }
}

pub(super) async fn keys_list(
    State(st): State<AppState>,
    Extension(u): Extension<ConsoleUser>,
) -> Response {
    match key_rows(&st).await {
        Ok(keys) => render(&KeysTable {
            keys,
            chrome: Chrome::new(&u, "keys"),
        }),
        Err(e) => problem(e),
    }
}

#[derive(Deserialize)]
pub(super) struct KeyForm {
    #[serde(default)]
    reusable: Option<String>,
    #[serde(default)]
    ephemeral: Option<String>,
    #[serde(default)]
    tags: String,
    #[serde(default)]
    user: String,
    expiry: String,
}

pub(super) async fn create_key(
    State(st): State<AppState>,
    Extension(u): Extension<ConsoleUser>,
    Form(f): Form<KeyForm>,
) -> Response {
    let expiry = match humantime::parse_duration(f.expiry.trim()) {
        Ok(d) => d,
        Err(e) => {
            return problem(ApiError::BadRequest(format!(
                "expiry {:?}: {e} (write it like 1h, 7d or 90d)",
                f.expiry
            )));
        }
    };
    let req = CreateAuthKey {
        reusable: f.reusable.is_some(),
        ephemeral: f.ephemeral.is_some(),
        tags: f
            .tags
            .split([',', ' '])
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(str::to_owned)
            .collect(),
        user: Some(f.user.trim().to_owned()).filter(|u| !u.is_empty()),
        expiry_secs: expiry.as_secs(),
    };
    match ops::create_auth_key(&st, req, &u.actor).await {
        Ok(created) => {
            let mut r = render(&KeyCreated {
                id: created.info.id.clone(),
                key: created.key,
            });
            r.headers_mut()
                .insert("hx-trigger", HeaderValue::from_static("keys-changed"));
            r
        }
        Err(e) => problem(e),
    }
}

pub(super) async fn revoke_key(
    State(st): State<AppState>,
    Extension(u): Extension<ConsoleUser>,
    Path(id): Path<String>,
) -> Response {
    match ops::revoke_auth_key(&st, &id, &u.actor).await {
        Ok(()) => {
            let mut r = done(format!("auth key {id} revoked"));
            r.headers_mut()
                .insert("hx-trigger", HeaderValue::from_static("keys-changed"));
            r
        }
        Err(e) => problem(e),
    }
}

// ------------------------------------------------------------------ policy

pub(crate) struct VersionRow {
    pub(crate) version: i64,
    pub(crate) file_name: String,
    pub(crate) set_at: String,
    pub(crate) set_by: String,
    pub(crate) current: bool,
}

#[derive(Template)]
#[template(path = "console/policy.html")]
struct PolicyPage {
    chrome: Chrome,
    version: Option<i64>,
    file_name: String,
    set_by: String,
    text: String,
    lines: Vec<(usize, String)>,
    rules: usize,
    tests: usize,
    versions: Vec<VersionRow>,
}

#[derive(Template)]
#[template(path = "console/policy_version.html")]
struct PolicyVersionPage {
    chrome: Chrome,
    version: i64,
    file_name: String,
    set_by: String,
    set_at: String,
    lines: Vec<(usize, String)>,
}

#[derive(Template)]
#[template(path = "console/policy_result.html")]
struct PolicyResult {
    saved: Option<i64>,
    unchanged: bool,
    diff: DiffView,
}

fn numbered(text: &str) -> Vec<(usize, String)> {
    text.lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.to_owned()))
        .collect()
}

fn ms_when(ms: i64) -> String {
    when(ms / 1000)
}

pub(super) async fn policy(
    State(st): State<AppState>,
    Extension(u): Extension<ConsoleUser>,
) -> Response {
    let view = match ops::policy::get(&st).await {
        Ok(v) => v,
        Err(e) => return problem(e),
    };
    let versions = match ops::policy::versions(&st).await {
        Ok(v) => v,
        Err(e) => return problem(e),
    };
    let current = view.stored.as_ref().map(|s| s.version);
    let (file_name, text, set_by) = view.stored.as_ref().map_or_else(
        || {
            (
                "policy.hujson".to_owned(),
                String::new(),
                "built-in default: everyone reaches everyone".to_owned(),
            )
        },
        |s| {
            (
                s.file_name.clone(),
                s.text.clone(),
                format!("{} at {}", s.set_by, ms_when(s.set_at_ms)),
            )
        },
    );
    let mut versions: Vec<VersionRow> = versions
        .into_iter()
        .map(|v| VersionRow {
            current: Some(v.version) == current,
            version: v.version,
            file_name: v.file_name,
            set_at: ms_when(v.set_at_ms),
            set_by: v.set_by,
        })
        .collect();
    versions.sort_by_key(|v| std::cmp::Reverse(v.version));
    render(&PolicyPage {
        chrome: Chrome::new(&u, "policy"),
        version: current,
        lines: numbered(&text),
        file_name,
        set_by,
        text,
        rules: view.rules,
        tests: view.tests,
        versions,
    })
}

pub(super) async fn policy_version(
    State(st): State<AppState>,
    Extension(u): Extension<ConsoleUser>,
    Path(version): Path<i64>,
) -> Response {
    match ops::policy::version(&st, version).await {
        Ok(s) => render(&PolicyVersionPage {
            chrome: Chrome::new(&u, "policy"),
            version: s.version,
            lines: numbered(&s.text),
            file_name: s.file_name,
            set_by: s.set_by,
            set_at: ms_when(s.set_at_ms),
        }),
        Err(e) => problem(e),
    }
}

#[derive(Deserialize)]
pub(super) struct PolicyForm {
    file_name: String,
    text: String,
}

impl PolicyForm {
    fn into_text(self) -> PolicyText {
        let name = self.file_name.trim();
        PolicyText {
            file_name: if name.is_empty() {
                "policy.hujson".into()
            } else {
                name.to_owned()
            },
            // Browsers send textarea lines with CRLF; positions in messages count LF lines.
            text: self.text.replace("\r\n", "\n"),
        }
    }
}

pub(super) async fn check_policy(
    State(st): State<AppState>,
    Form(f): Form<PolicyForm>,
) -> Response {
    match ops::policy::diff(&st, &f.into_text()).await {
        Ok(diff) => render(&PolicyResult {
            saved: None,
            unchanged: false,
            diff: diff.truncated(ops::policy::SET_DIFF_LINES),
        }),
        Err(e) => problem(e),
    }
}

pub(super) async fn save_policy(
    State(st): State<AppState>,
    Extension(u): Extension<ConsoleUser>,
    Form(f): Form<PolicyForm>,
) -> Response {
    match ops::policy::set(&st, &f.into_text(), &u.actor).await {
        Ok(out) => render(&PolicyResult {
            saved: Some(out.version),
            unchanged: out.unchanged,
            diff: out.diff,
        }),
        Err(e) => problem(e),
    }
}

// ------------------------------------------------------------------ audit log

pub(crate) struct AuditRow {
    pub(crate) seq: i64,
    pub(crate) at: String,
    pub(crate) actor: String,
    pub(crate) action: String,
    pub(crate) target: String,
    pub(crate) detail: String,
}

#[derive(Template)]
#[template(path = "console/audit.html")]
struct AuditPage {
    chrome: Chrome,
    q: String,
    rows: Vec<AuditRow>,
    total: usize,
}

#[derive(Deserialize)]
pub(super) struct AuditQuery {
    #[serde(default)]
    q: String,
}

pub(super) async fn audit(
    State(st): State<AppState>,
    Extension(u): Extension<ConsoleUser>,
    Query(q): Query<AuditQuery>,
) -> Response {
    let mut entries = Vec::new();
    let mut after = 0;
    loop {
        let page = match ops::audit_list(&st, after, 10_000).await {
            Ok(p) => p,
            Err(e) => return problem(e),
        };
        let Some(last) = page.last() else { break };
        after = last.seq;
        entries.extend(page);
    }
    let needle = q.q.trim().to_lowercase();
    let matching: Vec<_> = entries
        .into_iter()
        .rev()
        .filter(|e| {
            needle.is_empty()
                || [&e.actor, &e.action, &e.target, &e.detail]
                    .iter()
                    .any(|f| f.to_lowercase().contains(&needle))
        })
        .collect();
    let total = matching.len();
    let rows = matching
        .into_iter()
        .take(AUDIT_ROWS)
        .map(|e| AuditRow {
            seq: e.seq,
            at: ms_when(e.at_ms),
            actor: e.actor,
            action: e.action,
            target: e.target,
            detail: e.detail,
        })
        .collect();
    render(&AuditPage {
        chrome: Chrome::new(&u, "audit"),
        q: q.q,
        rows,
        total,
    })
}

pub(super) async fn verify_audit(State(st): State<AppState>) -> Response {
    match ops::audit_verify(&st).await {
        Ok(v) if v.ok() => done(format!(
            "the audit log verifies: {} entries, {} signed, the chain and the checkpoint agree",
            v.entries, v.signed
        )),
        Ok(v) => render(&Notice {
            ok: false,
            text: format!("the audit log does NOT verify ({} entries)", v.entries),
            details: v.problems,
        }),
        Err(e) => problem(e),
    }
}

// ------------------------------------------------------------------ relays and settings

pub(crate) struct RelayRow {
    pub(crate) name: String,
    pub(crate) id: u32,
    pub(crate) quic: String,
    pub(crate) websocket: String,
    pub(crate) stun: String,
}

#[derive(Template)]
#[template(path = "console/relays.html")]
struct RelaysPage {
    chrome: Chrome,
    relays: Vec<RelayRow>,
    embedded: Option<EmbeddedRelay>,
}

pub(crate) struct EmbeddedRelay {
    pub(crate) sessions: Vec<String>,
    pub(crate) counters: Vec<(String, String)>,
}

pub(super) async fn relays(
    State(st): State<AppState>,
    Extension(u): Extension<ConsoleUser>,
) -> Response {
    let relays = crate::relays::list(&st)
        .into_iter()
        .map(|r| RelayRow {
            name: r.name,
            id: r.id.0,
            quic: r.quic.map_or_else(|| "-".into(), |a| a.to_string()),
            websocket: r.websocket.unwrap_or_else(|| "-".into()),
            stun: r
                .stun
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(" "),
        })
        .collect();
    let embedded = crate::relays::stats(&st).ok().map(|s| {
        let counters = match s.counters {
            serde_json::Value::Object(m) => {
                m.into_iter().map(|(k, v)| (k, v.to_string())).collect()
            }
            other => vec![("counters".into(), other.to_string())],
        };
        EmbeddedRelay {
            sessions: s.sessions,
            counters,
        }
    });
    render(&RelaysPage {
        chrome: Chrome::new(&u, "relays"),
        relays,
        embedded,
    })
}

#[derive(Template)]
#[template(path = "console/settings.html")]
struct SettingsPage {
    chrome: Chrome,
    post_quantum: bool,
    key_expiry: String,
    reauth: String,
}

fn secs_text(s: Option<i64>) -> String {
    s.and_then(|s| u64::try_from(s).ok())
        .map_or_else(String::new, |s| {
            humantime::format_duration(Duration::from_secs(s)).to_string()
        })
}

pub(super) async fn settings(
    State(st): State<AppState>,
    Extension(u): Extension<ConsoleUser>,
) -> Response {
    match ops::settings(&st).await {
        Ok(s) => render(&SettingsPage {
            chrome: Chrome::new(&u, "settings"),
            post_quantum: s.tunnel_security == wire::TunnelSecurity::PostQuantum,
            key_expiry: secs_text(s.key_expiry_secs),
            reauth: secs_text(s.reauth_every_secs),
        }),
        Err(e) => problem(e),
    }
}

#[derive(Deserialize)]
pub(super) struct SettingsForm {
    tunnel_security: String,
    key_expiry: String,
    #[serde(default)]
    reauth: String,
}

fn parse_secs(text: &str, what: &str) -> Result<i64, ApiError> {
    humantime::parse_duration(text.trim())
        .map_err(|e| {
            ApiError::BadRequest(format!("{what} {text:?}: {e} (write it like 12h or 90d)"))
        })
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

pub(super) async fn save_settings(
    State(st): State<AppState>,
    Extension(u): Extension<ConsoleUser>,
    Form(f): Form<SettingsForm>,
) -> Response {
    let current = match ops::settings(&st).await {
        Ok(s) => s,
        Err(e) => return problem(e),
    };
    let security = match f.tunnel_security.as_str() {
        "post-quantum" => wire::TunnelSecurity::PostQuantum,
        "classical-only" => wire::TunnelSecurity::ClassicalOnly,
        other => {
            return problem(ApiError::BadRequest(format!(
                "unknown tunnel security {other:?}"
            )));
        }
    };
    let key_expiry = match parse_secs(&f.key_expiry, "key expiry") {
        Ok(s) => s,
        Err(e) => return problem(e),
    };
    let reauth = if f.reauth.trim().is_empty() || f.reauth.trim() == "none" {
        0
    } else {
        match parse_secs(&f.reauth, "sign in again every") {
            Ok(s) => s,
            Err(e) => return problem(e),
        }
    };
    // Only what changed is sent, so the audit log shows only real changes.
    let change = SettingsChange {
        tunnel_security: (security != current.tunnel_security).then_some(security),
        key_expiry_secs: (Some(key_expiry) != current.key_expiry_secs).then_some(key_expiry),
        reauth_every_secs: (reauth != current.reauth_every_secs.unwrap_or(0)).then_some(reauth),
    };
    if change.tunnel_security.is_none()
        && change.key_expiry_secs.is_none()
        && change.reauth_every_secs.is_none()
    {
        return done("nothing changed");
    }
    match ops::change_settings(&st, change, &u.actor).await {
        Ok(_) => done("settings saved"),
        Err(e) => problem(e),
    }
}
