//! The web console, `/console` on the admin listener (HTTPS only): server-rendered pages
//! (askama templates compiled into the binary) made live with htmx, which is served from the
//! binary too. Nothing runs in the browser but htmx: no inline script, no eval.
//!
//! - **Sign-in.** An admin token (the ones `token create` makes), or, where the mesh has an
//!   identity provider, signing in as a person who is an admin. Either way the console keeps
//!   the token on the server in a [`Sessions`] entry and gives the browser a random session
//!   cookie (`__Host-`, `Secure`, `HttpOnly`, `SameSite=Strict`). The token is checked again at
//!   every request, so revoking it ends the session at once.
//! - **Changes** are POSTs that carry the session's CSRF token in a header (htmx sends it from
//!   the page) and come from the console's own origin. They go through the same operations as
//!   the admin API, audited as the token's actor; a read-only token may look but not change.
//! - **Headers.** A strict Content-Security-Policy (`script-src 'self'`, nothing inline), no
//!   framing, no referrer to other sites (`no-referrer` would make browsers send `Origin: null`),
//!   no caching of pages.

mod pages;
mod sessions;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};

pub use sessions::Sessions;

use crate::db::keys::TokenScope;
use crate::state::AppState;

/// The session cookie. `__Host-` makes browsers insist on `Secure`, `Path=/` and no domain.
const COOKIE: &str = "__Host-lattice_console";
/// The pending identity-provider sign-in (its poll token), for a few minutes.
const SSO_COOKIE: &str = "__Host-lattice_console_sso";
/// The header htmx sends the CSRF token in.
const CSRF_HEADER: &str = "x-csrf-token";

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// Who is signed in, for the handlers.
#[derive(Clone)]
pub(crate) struct ConsoleUser {
    /// As the audit log names them.
    pub(crate) actor: String,
    /// The session's CSRF token (rendered into each page for htmx).
    pub(crate) csrf: String,
    /// What the token may do.
    pub(crate) scope: TokenScope,
}

/// The console's routes, for the admin listener.
pub fn router(st: AppState) -> Router<AppState> {
    let signed_in = Router::new()
        .route("/console/nodes", get(pages::nodes))
        .route("/console/nodes/live", get(pages::nodes_live))
        .route("/console/nodes/{name}", get(pages::node))
        .route("/console/nodes/{name}/live", get(pages::node_live))
        .route("/console/nodes/{name}/remove", post(pages::remove_node))
        .route("/console/nodes/{name}/expire", post(pages::expire_node))
        .route("/console/nodes/{name}/attrs", post(pages::set_attr))
        .route("/console/keys", get(pages::keys).post(pages::create_key))
        .route("/console/keys/list", get(pages::keys_list))
        .route("/console/keys/{id}/revoke", post(pages::revoke_key))
        .route("/console/policy", get(pages::policy))
        .route("/console/policy/check", post(pages::check_policy))
        .route("/console/policy/save", post(pages::save_policy))
        .route(
            "/console/policy/versions/{version}",
            get(pages::policy_version),
        )
        .route("/console/audit", get(pages::audit))
        .route("/console/audit/verify", post(pages::verify_audit))
        .route("/console/relays", get(pages::relays))
        .route(
            "/console/settings",
            get(pages::settings).post(pages::save_settings),
        )
        .route("/console/logout", post(pages::logout))
        .layer(middleware::from_fn_with_state(st, signed_in));
    Router::new()
        .route("/console", get(|| async { Redirect::to("/console/nodes") }))
        .route("/console/login", get(pages::login_page).post(pages::login))
        .route("/console/login/sso", post(pages::sso_start))
        .route("/console/login/sso/poll", post(pages::sso_poll))
        .route("/console/static/{file}", get(pages::asset))
        .merge(signed_in)
        .layer(middleware::from_fn(same_origin))
        .layer(middleware::from_fn(security_headers))
}

/// A cookie's value from the request.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// `Set-Cookie` for a console cookie (`max_age` 0 deletes it).
fn set_cookie(name: &str, value: &str, max_age: i64) -> HeaderValue {
    HeaderValue::from_str(&format!(
        "{name}={value}; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age={max_age}"
    ))
    .unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// Sends the browser to the sign-in page: a redirect, or for htmx an `HX-Redirect`.
fn to_login(headers: &HeaderMap) -> Response {
    if headers.contains_key("hx-request") {
        let mut r = StatusCode::UNAUTHORIZED.into_response();
        r.headers_mut()
            .insert("hx-redirect", HeaderValue::from_static("/console/login"));
        r
    } else {
        Redirect::to("/console/login").into_response()
    }
}

fn refuse(status: StatusCode, why: &str) -> Response {
    (status, pages::notice_html(false, why)).into_response()
}

/// Changes come only from the console's own pages: a browser's `Sec-Fetch-Site` and `Origin`
/// must say so (a form on another site cannot post here, signed in or not).
async fn same_origin(req: Request, next: Next) -> Response {
    if !matches!(*req.method(), Method::GET | Method::HEAD) {
        let h = req.headers();
        let site = h.get("sec-fetch-site").and_then(|v| v.to_str().ok());
        if site.is_some_and(|s| s != "same-origin") {
            return refuse(StatusCode::FORBIDDEN, "cross-site request refused");
        }
        // HTTP/2 carries the host as the URI's authority, HTTP/1.1 in `Host`.
        let host = req
            .uri()
            .authority()
            .map(|a| a.as_str())
            .or_else(|| h.get(header::HOST).and_then(|v| v.to_str().ok()));
        let origin = h.get(header::ORIGIN).and_then(|v| v.to_str().ok());
        if let Some(origin) = origin
            && host.is_none_or(|host| origin != format!("https://{host}"))
        {
            return refuse(StatusCode::FORBIDDEN, "cross-origin request refused");
        }
    }
    next.run(req).await
}

/// Checks the session cookie and re-checks its token; changes also need the CSRF header and a
/// token that may write.
async fn signed_in(State(st): State<AppState>, mut req: Request, next: Next) -> Response {
    let now = crate::state::unix_now();
    let Some(cookie) = cookie(req.headers(), COOKIE).map(str::to_owned) else {
        return to_login(req.headers());
    };
    let Some(session) = st.console.get(&cookie, now) else {
        return to_login(req.headers());
    };
    let Ok((actor, scope)) = crate::ops::authenticate_token(&st, &session.token, now).await else {
        // Revoked or expired: the session ends with it.
        st.console.remove(&cookie);
        return to_login(req.headers());
    };
    if !matches!(*req.method(), Method::GET | Method::HEAD) {
        let sent = req
            .headers()
            .get(CSRF_HEADER)
            .map(HeaderValue::as_bytes)
            .unwrap_or_default();
        if !bool::from(subtle::ConstantTimeEq::ct_eq(sent, session.csrf.as_bytes())) {
            return refuse(
                StatusCode::FORBIDDEN,
                "the request did not carry this page's CSRF token: reload the page",
            );
        }
        if scope < TokenScope::Write && req.uri().path() != "/console/logout" {
            return refuse(
                StatusCode::FORBIDDEN,
                "this token may only read: sign in with a write token to change anything",
            );
        }
    }
    req.extensions_mut().insert(ConsoleUser {
        actor,
        csrf: session.csrf.clone(),
        scope,
    });
    next.run(req).await
}

/// The headers every console answer carries.
async fn security_headers(req: Request, next: Next) -> Response {
    let asset = req.uri().path().starts_with("/console/static/");
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    h.insert(
        header::STRICT_TRANSPORT_SECURITY,
        HeaderValue::from_static("max-age=31536000"),
    );
    if !asset {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    resp
}
