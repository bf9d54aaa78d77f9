//! The admin API over the network: HTTPS only, pinned by the token, scoped and expiring
//! tokens; never on the plain-HTTP public listener.
#![allow(clippy::unwrap_used)]

#[macro_use]
mod support;

use std::net::SocketAddr;
use std::sync::Arc;

use coordinator::admin_client::Target;
use coordinator::db::keys::TokenScope;
use coordinator::ops::{self, CreateToken};
use hyper::Method;
use support::state_with_pin;

/// The admin router over TLS with `cert`, as `serve --admin-listen` runs it.
async fn admin_listener(
    st: coordinator::state::AppState,
    cert: &relay::tls::RelayCert,
) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let tls = relay::tls::server_tls(cert, &[b"http/1.1"]).unwrap();
    tokio::spawn(relay::http::serve_tls(
        listener,
        coordinator::api::admin_router(st),
        relay::http::HttpLimits::default(),
        Arc::new(tls),
        std::future::pending(),
    ));
    addr
}

async fn token(st: &coordinator::state::AppState, scope: TokenScope, secs: u64) -> String {
    ops::create_token(
        st,
        CreateToken {
            scope: Some(scope),
            expiry_secs: Some(secs),
        },
        "local:uid=0",
    )
    .await
    .unwrap()
    .token
}

fn target(addr: SocketAddr, token: &str) -> Target {
    Target::new(
        "/nonexistent".into(),
        Some(format!("https://{addr}")),
        Some(token.into()),
    )
    .unwrap()
}

db_test!(async fn tokens_reach_the_admin_api_only_over_pinned_tls_and_within_their_scope_and_lifetime(tdb) {
    let cert = relay::tls::RelayCert::generate().unwrap();
    let st = state_with_pin(&tdb, cert.pin()).await;
    let addr = admin_listener(st.clone(), &cert).await;

    let reader = token(&st, TokenScope::Read, 3600).await;
    let writer = token(&st, TokenScope::Write, 3600).await;
    assert!(writer.starts_with("lt2-"));

    // Read: lists work, changes are refused.
    let nodes: serde_json::Value = target(addr, &reader)
        .call(Method::GET, "/nodes", None)
        .await
        .unwrap();
    assert!(nodes.as_array().unwrap().is_empty());
    let err = target(addr, &reader)
        .call::<serde_json::Value>(
            Method::POST,
            "/authkeys",
            Some(serde_json::json!({"expiry_secs": 60})),
        )
        .await
        .unwrap_err();
    assert!(format!("{err:#}").contains("may only read"), "{err:#}");

    // Write: changes work, but tokens cannot mint or revoke tokens.
    let created: serde_json::Value = target(addr, &writer)
        .call(
            Method::POST,
            "/authkeys",
            Some(serde_json::json!({"expiry_secs": 60})),
        )
        .await
        .unwrap();
    assert!(created["key"].as_str().unwrap().starts_with("lk1-"));
    let err = target(addr, &writer)
        .call::<serde_json::Value>(Method::POST, "/tokens", None)
        .await
        .unwrap_err();
    assert!(format!("{err:#}").contains("Unix socket"), "{err:#}");

    // Expired and revoked tokens are refused.
    let short = token(&st, TokenScope::Write, 1).await;
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    let err = target(addr, &short)
        .call::<serde_json::Value>(Method::GET, "/nodes", None)
        .await
        .unwrap_err();
    assert!(format!("{err:#}").contains("expired"), "{err:#}");
    let id = writer.split('-').nth(1).unwrap().to_owned();
    ops::revoke_token(&st, &id, "local:uid=0").await.unwrap();
    assert!(
        target(addr, &writer)
            .call::<serde_json::Value>(Method::GET, "/nodes", None)
            .await
            .is_err()
    );

    // The token's pin must match the listener: another certificate is refused before the
    // token is sent.
    let impostor_cert = relay::tls::RelayCert::generate().unwrap();
    let impostor = admin_listener(st.clone(), &impostor_cert).await;
    let err = target(impostor, &reader)
        .call::<serde_json::Value>(Method::GET, "/nodes", None)
        .await
        .unwrap_err();
    assert!(
        format!("{err:#}").contains("not the admin listener"),
        "{err:#}"
    );

    // No plain HTTP: the CLI refuses http://, the TLS port does not speak it, and the public
    // listener does not serve the admin API at all.
    let err = Target::new(
        "/x".into(),
        Some(format!("http://{addr}")),
        Some(reader.clone()),
    )
    .unwrap_err();
    assert!(format!("{err:#}").contains("https://"), "{err:#}");
    let plain = raw_http(addr, "/admin/v1/nodes", &reader).await;
    assert!(!plain.contains("200 OK"), "{plain}");
    let public = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let public_addr = public.local_addr().unwrap();
    tokio::spawn(relay::http::serve(
        public,
        coordinator::api::router(st.clone()),
        relay::http::HttpLimits::default(),
        std::future::pending(),
    ));
    let answer = raw_http(public_addr, "/admin/v1/nodes", &reader).await;
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
});

async fn raw_http(addr: SocketAddr, path: &str, token: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "GET {path} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {token}\r\nconnection: close\r\n\r\n"
    );
    let _ = s.write_all(req.as_bytes()).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}
