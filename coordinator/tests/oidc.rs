//! Signing a person in against a real OpenID Connect provider (`oidc-provider-mock` from PyPI,
//! which `scripts/setup` installs and `scripts/test` requires): the authorization code flow
//! with PKCE, state and nonce, the code exchange, and the ID token's checks.
#![allow(clippy::unwrap_used)]

#[macro_use]
mod support;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use coordinator::jwks::KeyCache;
use coordinator::oidc::{self, Login, OidcConfig};
use coordinator::ops;
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
            r#"{"sub": "bob", "email": "bob@example.com", "groups": ["sre"], "amr": ["pwd"]}"#,
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

/// Changes what the provider says about `sub` (its `PUT /users/SUB`).
async fn set_user(p: &Provider, sub: &str, claims: &str) {
    let authority = p.issuer.strip_prefix("http://").unwrap();
    let mut s = tokio::net::TcpStream::connect(authority).await.unwrap();
    let req = format!(
        "PUT /users/{sub} HTTP/1.1\r\nHost: {authority}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{claims}",
        claims.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).await.unwrap();
    assert!(resp.starts_with("HTTP/1.1 204"), "{resp}");
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
async fn a_person_signs_in_with_pkce_and_nonce_and_a_code_from_another_login_is_refused() {
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
    let now = coordinator::state::unix_now();

    // Alice signs in: her identity, groups and second factor come from the ID token.
    let login = Login::new(now, &mut rng);
    let back = sign_in_at(
        &oidc::authorize_url(&cfg, &authorize, redirect, &login),
        "alice",
    )
    .await;
    assert!(back.starts_with(redirect), "{back}");
    assert_eq!(query(&back, "state"), login.state);
    let code = query(&back, "code");
    let id = oidc::exchange_code(&keys, &cfg, "secret", redirect, &code, &login, now)
        .await
        .unwrap();
    assert_eq!(id.issuer, cfg.issuer);
    assert_eq!(id.subject, "alice");
    assert_eq!(id.email.as_deref(), Some("alice@example.com"));
    assert_eq!(id.groups, ["sre", "eng"]);
    assert!(id.mfa);

    // A code obtained for one login and exchanged for another is refused: a provider that
    // checks PKCE refuses the other login's verifier, and in any case the ID token carries the
    // first login's nonce (this mock provider does not check PKCE; the nonce check catches
    // it).
    let a = Login::new(now, &mut rng);
    let b = Login::new(now, &mut rng);
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
    let m = Login::new(now, &mut rng);
    let back = sign_in_at(
        &oidc::authorize_url(&cfg, &authorize, redirect, &m),
        "mallory",
    )
    .await;
    let e = oidc::exchange_code(
        &keys,
        &cfg,
        "secret",
        redirect,
        &query(&back, "code"),
        &m,
        now,
    )
    .await
    .unwrap_err();
    assert!(format!("{e:#}").contains("may not sign in"), "{e:#}");
}

/// A coordinator whose people sign in through provider `p` (people of example.com only).
async fn signing_in(tdb: &support::TestDb, p: &Provider) -> coordinator::state::AppState {
    let sign_in = ops::people::SignIn {
        cfg: OidcConfig {
            issuer: p.issuer.clone(),
            client_id: "lattice".into(),
            groups_claim: "groups".into(),
            allowed_domains: vec!["example.com".into()],
            mfa_acr_values: vec![],
        },
        client_secret: coordinator::secret::Secret::new("secret".into()),
        public_url: "http://coord.test".into(),
        admins: vec!["alice@example.com".into()],
        admin_groups: vec![],
    };
    support::state_with(tdb, [7; 32], Some(std::sync::Arc::new(sign_in))).await
}

/// A person signs device `machine` in as `sub` through the sign-in page's link; returns the
/// login's state and the provider's redirect back to us.
async fn sign_device_in(
    st: &coordinator::state::AppState,
    machine: u8,
    sub: &str,
) -> (String, String) {
    use coordinator::ops::people;
    let now = coordinator::state::unix_now();
    let (login, url) = people::start(st, &support::machine(machine), "laptop", "192.0.2.1", now)
        .await
        .unwrap();
    assert_eq!(
        url,
        format!("http://coord.test/login?code={}", login.login.user_code)
    );
    // The same device asking again (it reconnected) gets the same link.
    let (again, _) = people::start(st, &support::machine(machine), "laptop", "192.0.2.1", now)
        .await
        .unwrap();
    assert_eq!(again.login, login.login);
    let (shown, authorize) =
        people::pending_by_code(st, &login.login.user_code.to_lowercase(), now)
            .await
            .unwrap()
            .expect("the code is pending");
    assert_eq!(shown.hostname, "laptop");
    let back = sign_in_at(&authorize, sub).await;
    assert!(
        back.starts_with("http://coord.test/oidc/callback?"),
        "{back}"
    );
    (login.login.state, back)
}

db_test!(async fn people_sign_devices_in_and_their_groups_follow_each_sign_in(tdb) {
    use coordinator::ops::people::{self, Outcome};
    use coordinator::register::{RegisterError, register_or_resume};
    use support::{hello, machine};
    use wire::ErrorCode;

    let Some(p) = provider().await else { return };
    let st = signing_in(&tdb, &p).await;
    let now = coordinator::state::unix_now();

    // Without a key or a sign-in, a new machine is asked to sign in.
    assert!(matches!(
        register_or_resume(&st, &machine(1), &hello(1, "laptop", None), None, now).await,
        Err(RegisterError::LoginRequired)
    ));

    // Alice signs it in: the node is hers, with her groups and second factor, and a key
    // that lasts the default 180 days.
    let (state, back) = sign_device_in(&st, 1, "alice").await;
    assert_eq!(people::outcome(&st, &state, now).await.unwrap(), Outcome::Pending);
    let who = people::callback(&st, &query(&back, "state"), Some(&query(&back, "code")), None, now)
        .await
        .unwrap();
    assert_eq!(who, Ok("alice@example.com".to_owned()));
    // A replayed callback is refused (the state was used), and so is a forged one.
    let replay = people::callback(&st, &state, Some(&query(&back, "code")), None, now)
        .await
        .unwrap();
    assert!(replay.unwrap_err().contains("already used"), "replay");
    let forged = people::callback(&st, "forged-state", Some("x"), None, now).await.unwrap();
    assert!(forged.unwrap_err().contains("unknown or already used"));
    let Outcome::Done(signed) = people::outcome(&st, &state, now).await.unwrap() else {
        panic!("the sign-in is done")
    };
    assert_eq!(signed.user.groups, ["sre", "eng"]);
    assert!(signed.mfa);
    let (node, new) =
        register_or_resume(&st, &machine(1), &hello(1, "laptop", None), Some(&signed), now)
            .await
            .unwrap();
    assert!(new);
    assert_eq!(node.user.as_deref(), Some("alice@example.com"));
    assert!(node.tags.is_empty());
    assert_eq!(node.idp_groups, ["sre", "eng"]);
    assert_eq!(node.user_mfa, Some(true));
    let expiry = node.expires_at.unwrap();
    assert!((expiry - (now + 180 * 86_400)).abs() <= 5, "{expiry}");
    let attrs = node.policy_attrs();
    assert_eq!(attrs.get("idp:group:sre"), Some(&wire::AttrValue::Bool(true)));
    assert_eq!(attrs.get("user:mfa"), Some(&wire::AttrValue::Bool(true)));

    // Alice leaves the sre group at the provider: her node loses it when she signs in
    // again (on any device), and a mesh that demands re-authentication every 12 hours gives
    // the renewed key 12 hours.
    set_user(
        &p,
        "alice",
        r#"{"email": "alice@example.com", "groups": ["eng"], "amr": ["pwd"]}"#,
    )
    .await;
    ops::change_settings(
        &st,
        ops::SettingsChange { reauth_every_secs: Some(12 * 3600), ..Default::default() },
        "test",
    )
    .await
    .unwrap();
    let (state, back) = sign_device_in(&st, 1, "alice").await;
    people::callback(&st, &state, Some(&query(&back, "code")), None, now)
        .await
        .unwrap()
        .unwrap();
    let mut conn = st.db.acquire().await.unwrap();
    let followed = coordinator::db::nodes::by_id(&mut conn, node.id).await.unwrap().unwrap();
    drop(conn);
    assert_eq!(followed.idp_groups, ["eng"], "groups follow the sign-in");
    let Outcome::Done(again) = people::outcome(&st, &state, now).await.unwrap() else {
        panic!()
    };
    assert!(!again.mfa);
    let (renewed, new) =
        register_or_resume(&st, &machine(1), &hello(1, "laptop", None), Some(&again), now)
            .await
            .unwrap();
    assert!(!new);
    assert_eq!((renewed.ipv4, renewed.ipv6), (node.ipv4, node.ipv6));
    assert_eq!(renewed.user_mfa, Some(false));
    let e = renewed.expires_at.unwrap();
    assert!((e - (now + 12 * 3600)).abs() <= 5, "{e}");

    // Her node's key expires: without a sign-in it is asked for one, and bob cannot take it.
    let later = e + 1;
    assert!(matches!(
        register_or_resume(&st, &machine(1), &hello(1, "laptop", None), None, later).await,
        Err(RegisterError::LoginRequired)
    ));
    let (state, back) = sign_device_in(&st, 1, "bob").await;
    people::callback(&st, &state, Some(&query(&back, "code")), None, now)
        .await
        .unwrap()
        .unwrap();
    let Outcome::Done(bob) = people::outcome(&st, &state, now).await.unwrap() else { panic!() };
    match register_or_resume(&st, &machine(1), &hello(1, "laptop", None), Some(&bob), later).await {
        Err(RegisterError::Refused(ErrorCode::LoginFailed, m)) => {
            assert!(m.contains("belongs to alice@example.com"), "{m}")
        }
        other => panic!("bob took alice's node: {other:?}"),
    }

    // Someone from another domain is refused, and the device is told why.
    let (state, back) = sign_device_in(&st, 2, "mallory").await;
    let refused = people::callback(&st, &state, Some(&query(&back, "code")), None, now)
        .await
        .unwrap();
    assert!(refused.unwrap_err().contains("may not sign in"));
    match people::outcome(&st, &state, now).await.unwrap() {
        Outcome::Failed(why) => assert!(why.contains("may not sign in"), "{why}"),
        other => panic!("{other:?}"),
    }
    // The provider saying no is a failed sign-in too.
    let (state, _) = sign_device_in(&st, 3, "alice").await;
    let denied = people::callback(&st, &state, None, Some("access_denied"), now).await.unwrap();
    assert!(denied.unwrap_err().contains("access_denied"));

    // Users are listed with what their last sign-in said, and every sign-in is audited.
    let users = people::list_users(&st).await.unwrap();
    let names: Vec<&str> = users.iter().map(|u| u.login_name.as_str()).collect();
    assert_eq!(names, ["alice@example.com", "bob@example.com"]);
    assert_eq!(users[0].groups, ["eng"]);
    let log = ops::audit_list(&st, 0, 1000).await.unwrap();
    let logins = log.iter().filter(|e| e.action == "user.login").count();
    assert_eq!(logins, 3, "alice twice, bob once");
    assert!(log.iter().any(|e| e.action == "node.reauth"));
});

db_test!(async fn an_admin_signs_in_for_a_session_token_and_others_are_refused(tdb) {
    use coordinator::ops::people::{self, AdminPoll};

    let Some(p) = provider().await else { return };
    let st = signing_in(&tdb, &p).await;
    let now = coordinator::state::unix_now();
    let session = |sub: &'static str| {
        let st = st.clone();
        async move {
            let start = people::start_admin(&st, "admin sign-in (test)", "192.0.2.9", now).await.unwrap();
            assert!(matches!(
                people::poll_admin(&st, &start.poll_token, now).await.unwrap(),
                AdminPoll::Pending
            ));
            let code = start.url.split("code=").nth(1).unwrap().to_owned();
            let (_, authorize) = people::pending_by_code(&st, &code, now).await.unwrap().unwrap();
            let back = sign_in_at(&authorize, sub).await;
            people::callback(&st, &query(&back, "state"), Some(&query(&back, "code")), None, now)
                .await
                .unwrap()
                .unwrap();
            // A wrong poll secret learns nothing.
            assert!(people::poll_admin(&st, "guess", now).await.is_err());
            people::poll_admin(&st, &start.poll_token, now).await
        }
    };
    // Alice is listed as an admin: her session token works and acts as her.
    let AdminPoll::Done { token, user, expires_at } = session("alice").await.unwrap() else {
        panic!("alice got no token")
    };
    assert_eq!(user, "alice@example.com");
    assert!((expires_at - (now + 12 * 3600)).abs() <= 5);
    let (actor, scope) = ops::authenticate_token(&st, &token, now).await.unwrap();
    assert!(actor.starts_with("user:alice@example.com (session "), "{actor}");
    assert_eq!(scope, coordinator::db::keys::TokenScope::Write);
    // Bob signs in fine but is no admin.
    match session("bob").await {
        Err(coordinator::error::ApiError::Forbidden(m)) => {
            assert!(m.contains("bob@example.com is not an admin"), "{m}")
        }
        other => panic!("bob: {other:?}"),
    }
});
