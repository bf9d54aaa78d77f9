//! The pages people see when they sign a device in, on the public listener:
//!
//! - `GET /login` asks for the code the device shows; `GET /login?code=ABCD-EFGH` shows which
//!   device asks (its hostname and code, so a link someone else sent cannot sign you into
//!   their device unnoticed) and a button that goes on to the identity provider. Wrong codes
//!   are limited per address and in all (`oidc::Guesses`), so the few pending codes cannot be
//!   guessed.
//! - `GET /oidc/callback` is where the provider sends the browser back: the code exchange and
//!   the ID token's checks happen there (see `ops::people::callback`).
//!
//! The pages are plain HTML with no script, under a Content-Security-Policy that allows none,
//! and every value shown is escaped.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Router};
use serde::Deserialize;

use crate::error::ApiError;
use crate::ops;
use crate::state::{AppState, unix_now};

/// Sign-in routes.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/login", get(login))
        .route("/oidc/callback", get(callback))
}

/// Escapes text for HTML.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn page(status: StatusCode, title: &str, body: &str) -> Response {
    let html = format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width\">\
         <title>{t} - Lattice</title></head>\n<body>\n<h1>{t}</h1>\n{body}\n</body></html>\n",
        t = escape(title)
    );
    let mut resp = (status, html).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    resp
}

#[derive(Deserialize)]
struct LoginQuery {
    code: Option<String>,
}

const CODE_FORM: &str = "<form method=\"get\" action=\"/login\">\
     <label>Code shown by the device: <input name=\"code\" autocomplete=\"off\" \
     autocapitalize=\"characters\" maxlength=\"16\" required></label> \
     <button type=\"submit\">Continue</button></form>";

async fn login(
    State(st): State<AppState>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    Query(q): Query<LoginQuery>,
) -> Response {
    let Some(code) = q.code.filter(|c| !c.trim().is_empty()) else {
        return page(StatusCode::OK, "Sign a device in", CODE_FORM);
    };
    let ip = relay::http::peer_ip(peer.as_ref().map(|e| &e.0));
    let now = unix_now();
    let allowed = st
        .code_guesses
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .allowed(ip, now);
    if !allowed {
        return page(
            StatusCode::TOO_MANY_REQUESTS,
            "Too many wrong codes",
            "<p>Too many wrong codes were tried; wait a few minutes and try again.</p>",
        );
    }
    if code.len() > 16 {
        st.code_guesses
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .failed(ip, now);
        return page(
            StatusCode::BAD_REQUEST,
            "Unknown code",
            &format!("<p>That is not a sign-in code.</p>{CODE_FORM}"),
        );
    }
    let found = ops::people::pending_by_code(&st, &code, now).await;
    if matches!(found, Ok(None)) {
        st.code_guesses
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .failed(ip, now);
    }
    match found {
        Ok(Some((l, url))) => page(
            StatusCode::OK,
            "Sign a device in",
            &format!(
                "<p>The device <strong>{host}</strong> asks to join the mesh as you.</p>\
                 <p>Check that it shows the code <strong>{code}</strong>. If you did not \
                 start this yourself, close this page.</p>\
                 <p><a href=\"{url}\" rel=\"noreferrer\">Sign in with your identity \
                 provider</a></p>",
                host = escape(&l.hostname),
                code = escape(&l.login.user_code),
                url = escape(&url),
            ),
        ),
        Ok(None) => page(
            StatusCode::NOT_FOUND,
            "Unknown code",
            &format!(
                "<p>No device is waiting with that code (it may have expired; start again \
                 on the device).</p>{CODE_FORM}"
            ),
        ),
        Err(e) => error_page(&e),
    }
}

fn error_page(e: &ApiError) -> Response {
    let status = match e {
        ApiError::NotFound(_) => StatusCode::NOT_FOUND,
        ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    if let ApiError::Internal(detail) = e {
        tracing::error!(error = %detail, "sign-in page failed");
    }
    page(
        status,
        "Sign-in unavailable",
        &format!("<p>{}</p>", escape(&e.to_string())),
    )
}

#[derive(Deserialize)]
struct CallbackQuery {
    state: Option<String>,
    code: Option<String>,
    error: Option<String>,
    error_description: Option<String>,
}

async fn callback(State(st): State<AppState>, Query(q): Query<CallbackQuery>) -> Response {
    let Some(state) = q.state.filter(|s| !s.is_empty() && s.len() <= 128) else {
        return page(
            StatusCode::BAD_REQUEST,
            "Sign-in failed",
            "<p>The identity provider's answer has no state.</p>",
        );
    };
    let provider_error = q.error.map(|e| match q.error_description {
        Some(d) => format!("{e}: {d}"),
        None => e,
    });
    match ops::people::callback(
        &st,
        &state,
        q.code.as_deref(),
        provider_error.as_deref(),
        unix_now(),
    )
    .await
    {
        Ok(Ok(user)) => page(
            StatusCode::OK,
            "Signed in",
            &format!(
                "<p>Signed in as <strong>{}</strong>. The device joins now; you can close \
                 this page.</p>",
                escape(&user)
            ),
        ),
        Ok(Err(why)) => page(
            StatusCode::FORBIDDEN,
            "Sign-in failed",
            &format!("<p>{}</p>", escape(&why)),
        ),
        Err(e) => error_page(&ApiError::from(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_leaves_no_markup() {
        assert_eq!(
            escape(r#"<script>alert("x")</script>&'"#),
            "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;&#39;"
        );
    }
}
