//! Signing a person in against a real OpenID Connect provider (`oidc-provider-mock` from PyPI,
//! which `scripts/setup` installs and `scripts/test` requires): the authorization code flow
//! with PKCE, state and nonce, the code exchange, and the ID token's checks.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use coordinator::jwks::KeyCache;
use coordinator::oidc::{self, LoginError, Logins, OidcConfig};
use rand::SeedableRng;
use rand::rngs::StdRng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

struct Provider {
    child: Child,
    issuer: String,
}

impl Drop for Provider {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The provider, or `None` (skipped) where it is not installed and not required.
async fn provider() -> Option<Provider> {
    let bin = std::env::var_os("LATTICE_OIDC_MOCK").map_or_else(
        || PathBuf::from("/opt/lattice-test/oidc/bin/oidc-provider-mock"),
        PathBuf::from,
    );
    if !bin.exists() {
        assert!(
            std::env::var("LATTICE_OIDC_REQUIRED").as_deref() != Ok("1"),
            "LATTICE_OIDC_REQUIRED=1 but {} is missing (scripts/setup installs it)",
            bin.display()
        );
        eprintln!("SKIPPED: no OpenID provider at {}", bin.display());
        return None;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(&bin)
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["--require-nonce", "true"])
        .args([
            "--user-claims",
            r#"{"sub": "alice", "email": "alice@example.com", "name": "Alice",
                "groups": ["sre", "eng"], "amr": ["pwd", "otp"]}"#,
        ])
        .args([
            "--user-claims",
            r#"{"sub": "mallory", "email": "mallory@evil.example", "amr": ["pwd"]}"#,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let issuer = format!("http://127.0.0.1:{port}");
    let p = Provider { child, issuer };
    let start = Instant::now();
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the provider did not start"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Some(p)
}

/// What a browser does at the provider's login page: submits the subject and follows the
/// redirect no further; returns the `Location` it was sent to.
async fn sign_in_at(url: &str, sub: &str) -> String {
    let rest = url.strip_prefix("http://").unwrap();
    let (authority, path) = rest.split_at(rest.find('/').unwrap());
    let mut s = tokio::net::TcpStream::connect(authority).await.unwrap();
    let body = format!("sub={sub}");
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: {authority}\r\nContent-Type: application/x-www-form-urlencoded\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).await.unwrap();
    resp.lines()
        .find_map(|l| {
            l.strip_prefix("Location: ")
                .or_else(|| l.strip_prefix("location: "))
        })
        .unwrap_or_else(|| panic!("no redirect from the provider:\n{resp}"))
        .trim()
        .to_owned()
}

fn query(url: &str, name: &str) -> String {
    url.split_once('?')
        .unwrap()
        .1
        .split('&')
        .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
        .unwrap()
        .to_owned()
}

#[tokio::test]
async fn a_person_signs_in_with_pkce_state_and_nonce_and_a_replayed_callback_is_refused() {
    let Some(p) = provider().await else { return };
    let cfg = OidcConfig {
        issuer: p.issuer.clone(),
        client_id: "lattice".into(),
        groups_claim: "groups".into(),
        allowed_domains: vec!["example.com".into()],
        mfa_acr_values: vec![],
    };
    let keys = KeyCache::new(None).unwrap();
    let provider = keys.provider(&cfg.issuer).await.unwrap();
    let authorize = provider.authorization_endpoint.clone().unwrap();
    let redirect = "http://127.0.0.1:1/oidc/callback";
    let mut rng = StdRng::seed_from_u64(7);
    let mut logins = Logins::default();
    let now = coordinator::state::unix_now();

    // Alice signs in: her identity, groups and second factor come from the ID token.
    let login = logins.start(now, &mut rng).unwrap();
    let back = sign_in_at(
        &oidc::authorize_url(&cfg, &authorize, redirect, &login),
        "alice",
    )
    .await;
    assert!(back.starts_with(redirect), "{back}");
    let state = query(&back, "state");
    let code = query(&back, "code");
    let pending = logins.callback(&state, now).unwrap();
    let id = oidc::exchange_code(&keys, &cfg, "secret", redirect, &code, &pending, now)
        .await
        .unwrap();
    assert_eq!(id.issuer, cfg.issuer);
    assert_eq!(id.subject, "alice");
    assert_eq!(id.email.as_deref(), Some("alice@example.com"));
    assert_eq!(id.groups, ["sre", "eng"]);
    assert!(id.mfa);
    // The same callback again: refused before any exchange.
    assert_eq!(logins.callback(&state, now), Err(LoginError::UnknownState));

    // A code obtained for one login and exchanged for another is refused: a provider that
    // checks PKCE refuses the other login's verifier, and in any case the ID token carries the
    // first login's nonce (this mock provider does not check PKCE; the nonce check catches
    // it).
    let a = logins.start(now, &mut rng).unwrap();
    let b = logins.start(now, &mut rng).unwrap();
    let back = sign_in_at(
        &oidc::authorize_url(&cfg, &authorize, redirect, &a),
        "alice",
    )
    .await;
    let code = query(&back, "code");
    let e = oidc::exchange_code(&keys, &cfg, "secret", redirect, &code, &b, now)
        .await
        .unwrap_err();
    let e = format!("{e:#}");
    assert!(
        e.contains("exchanging the authorization code") || e.contains("nonce"),
        "{e}"
    );

    // Someone from a domain that may not sign in.
    let m = logins.start(now, &mut rng).unwrap();
    let back = sign_in_at(
        &oidc::authorize_url(&cfg, &authorize, redirect, &m),
        "mallory",
    )
    .await;
    let pending = logins.callback(&query(&back, "state"), now).unwrap();
    let e = oidc::exchange_code(
        &keys,
        &cfg,
        "secret",
        redirect,
        &query(&back, "code"),
        &pending,
        now,
    )
    .await
    .unwrap_err();
    assert!(format!("{e:#}").contains("may not sign in"), "{e:#}");
}
