//! Workload identity federation rules: added with checks, listed, removed, audited, on both
//! database backends.
#![allow(clippy::unwrap_used)]

#[macro_use]
mod support;

use coordinator::error::ApiError;
use coordinator::ops;
use coordinator::ops::federation::AddRule;
use coordinator::ops::policy::{self as pops, PolicyText};
use support::state;

const POLICY: &str = r#"{"tagOwners": {"tag:ci": [], "tag:k8s": []},
  "acls": [{"action": "accept", "src": ["tag:ci"], "dst": ["tag:k8s:443"]}]}"#;

fn rule() -> AddRule {
    AddRule {
        issuer: "https://token.actions.githubusercontent.com".into(),
        audience: "lattice".into(),
        matches: vec!["sub=repo:org/app:*".into(), "repository_owner=org".into()],
        tags: vec!["tag:ci".into(), "tag:ci".into()],
        ephemeral: true,
        max_lifetime_s: Some(3600),
    }
}

fn bad_request(r: Result<impl std::fmt::Debug, ApiError>) -> String {
    match r {
        Err(ApiError::BadRequest(m)) => m,
        other => panic!("expected a bad request, got {other:?}"),
    }
}

db_test!(async fn rules_are_checked_stored_listed_removed_and_audited(tdb) {
    let st = state(&tdb).await;
    let set = |text: &str| PolicyText {
        file_name: "p.hujson".into(),
        text: text.into(),
    };
    // Tags must be declared in the policy in force, as for auth keys.
    pops::set(&st, &set(r#"{"tagOwners": {"tag:k8s": []}, "acls": []}"#), "test")
        .await
        .unwrap();
    let m = bad_request(ops::federation::add(&st, rule(), "test").await);
    assert!(m.contains("tagOwners"), "{m}");
    pops::set(&st, &set(POLICY), "test").await.unwrap();

    let refusals = [
        (
            AddRule {
                issuer: "http://issuer.example.com".into(),
                ..rule()
            },
            "https",
        ),
        (
            AddRule {
                audience: String::new(),
                ..rule()
            },
            "audience",
        ),
        (
            AddRule {
                matches: vec!["sub".into()],
                ..rule()
            },
            "CLAIM=PATTERN",
        ),
        (
            AddRule {
                tags: vec![],
                ..rule()
            },
            "--tag",
        ),
        (
            AddRule {
                tags: vec!["tag:nope".into()],
                ..rule()
            },
            "tagOwners",
        ),
        (
            AddRule {
                max_lifetime_s: Some(5),
                ..rule()
            },
            "--max-lifetime",
        ),
    ];
    for (req, says) in refusals {
        let m = bad_request(ops::federation::add(&st, req.clone(), "test").await);
        assert!(m.contains(says), "{req:?}: {m}");
    }
    assert!(ops::federation::list(&st).await.unwrap().is_empty());

    let a = ops::federation::add(&st, rule(), "token:abc").await.unwrap();
    assert_eq!(a.tags, ["tag:ci"], "deduplicated");
    assert_eq!(a.matches[0].to_string(), "sub=repo:org/app:*");
    let b = ops::federation::add(
        &st,
        AddRule {
            issuer: "https://kubernetes.default.svc".into(),
            matches: vec![],
            tags: vec!["tag:k8s".into()],
            ephemeral: false,
            max_lifetime_s: None,
            ..rule()
        },
        "test",
    )
    .await
    .unwrap();
    assert!(b.id > a.id);
    assert_eq!(ops::federation::list(&st).await.unwrap(), [a.clone(), b.clone()]);

    // Another replica (or a restart) reads the same rules.
    let again = state(&tdb).await;
    assert_eq!(ops::federation::list(&again).await.unwrap(), [a.clone(), b.clone()]);

    assert_eq!(ops::federation::remove(&st, a.id, "test").await.unwrap(), a);
    assert!(matches!(
        ops::federation::remove(&st, a.id, "test").await,
        Err(ApiError::NotFound(_))
    ));
    assert_eq!(ops::federation::list(&st).await.unwrap(), [b]);

    let actions: Vec<(String, String)> = ops::audit_list(&st, 0, 1000)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.action.starts_with("federation."))
        .map(|e| (e.action, e.actor))
        .collect();
    assert_eq!(
        actions,
        [
            ("federation.add".to_owned(), "token:abc".to_owned()),
            ("federation.add".to_owned(), "test".to_owned()),
            ("federation.remove".to_owned(), "test".to_owned()),
        ]
    );
    assert!(ops::audit_verify(&st).await.unwrap().ok());
});

/// A token issuer on loopback: OpenID discovery and a JWK set over HTTP, ES256 keys that can
/// rotate, and a counter of key-set fetches.
mod issuer {
    use std::sync::{Arc, Mutex};

    use aws_lc_rs::rand::SystemRandom;
    use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
    use axum::Router;
    use axum::routing::get;
    use base64::Engine as _;
    use jsonwebtoken::{Algorithm, EncodingKey, Header};
    use serde_json::{Value, json};

    pub(crate) struct Key {
        kid: String,
        enc: EncodingKey,
        pub(crate) jwk: Value,
    }

    impl Key {
        pub(crate) fn new(kid: &str) -> Self {
            let rng = SystemRandom::new();
            let pkcs8 =
                EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
            let pair =
                EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref()).unwrap();
            let p = pair.public_key().as_ref();
            let b = |x: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(x);
            Self {
                kid: kid.into(),
                enc: EncodingKey::from_ec_der(pkcs8.as_ref()),
                jwk: json!({"kty": "EC", "crv": "P-256", "kid": kid, "alg": "ES256",
                    "x": b(&p[1..33]), "y": b(&p[33..])}),
            }
        }

        pub(crate) fn sign(&self, claims: &Value) -> String {
            let mut h = Header::new(Algorithm::ES256);
            h.kid = Some(self.kid.clone());
            jsonwebtoken::encode(&h, claims, &self.enc).unwrap()
        }
    }

    pub(crate) struct Issuer {
        pub(crate) url: String,
        pub(crate) published: Arc<Mutex<Vec<Value>>>,
        pub(crate) served: Arc<Mutex<u32>>,
    }

    pub(crate) async fn start() -> Issuer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let published: Arc<Mutex<Vec<Value>>> = Arc::default();
        let served: Arc<Mutex<u32>> = Arc::default();
        let (p, n, u) = (Arc::clone(&published), Arc::clone(&served), url.clone());
        let app = Router::new()
            .route(
                "/.well-known/openid-configuration",
                get(move || {
                    let u = u.clone();
                    async move {
                        axum::Json(json!({"issuer": u, "jwks_uri": format!("{u}/jwks"),
                            "authorization_endpoint": format!("{u}/authorize"),
                            "token_endpoint": format!("{u}/token")}))
                    }
                }),
            )
            .route(
                "/jwks",
                get(move || {
                    let (p, n) = (Arc::clone(&p), Arc::clone(&n));
                    async move {
                        *n.lock().unwrap() += 1;
                        axum::Json(json!({"keys": *p.lock().unwrap()}))
                    }
                }),
            );
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Issuer {
            url,
            published,
            served,
        }
    }
}

/// A coordinator with `POLICY` in force and a running issuer publishing one key, `k1`.
async fn with_issuer(
    tdb: &support::TestDb,
) -> (coordinator::state::AppState, issuer::Issuer, issuer::Key) {
    let st = state(tdb).await;
    pops::set(
        &st,
        &PolicyText {
            file_name: "p.hujson".into(),
            text: POLICY.into(),
        },
        "test",
    )
    .await
    .unwrap();
    let iss = issuer::start().await;
    let key = issuer::Key::new("k1");
    iss.published.lock().unwrap().push(key.jwk.clone());
    (st, iss, key)
}

db_test!(async fn workloads_join_with_a_token_get_the_rule_s_tags_and_access_until_it_ends(tdb) {
    use coordinator::register::{RegisterError, register_or_resume};
    use coordinator::state::unix_now;
    use serde_json::json;
    use support::{hello, machine};
    use wire::{ErrorCode, IdToken};

    let (st, iss, k1) = with_issuer(&tdb).await;
    let rule = ops::federation::add(
        &st,
        AddRule {
            issuer: iss.url.clone(),
            audience: "lattice".into(),
            matches: vec!["sub=system:serviceaccount:ci:*".into()],
            tags: vec!["tag:ci".into()],
            ephemeral: true,
            max_lifetime_s: None,
        },
        "test",
    )
    .await
    .unwrap();
    let now = unix_now();
    let claims = |sub: &str, aud: &str, exp: i64| {
        json!({"iss": iss.url, "aud": aud, "sub": sub, "iat": now, "exp": exp})
    };
    let with_token = |i: u8, t: String| {
        let mut h = hello(i, &format!("job-{i}"), None);
        h.id_token = Some(IdToken(t));
        h
    };
    let refused = |r: Result<_, RegisterError>| match r {
        Err(RegisterError::Refused(code, m)) => (code, m),
        Ok(_) => panic!("admitted"),
        Err(e) => panic!("{e}"),
    };

    // A good token joins as the rule says.
    let good = k1.sign(&claims("system:serviceaccount:ci:builder", "lattice", now + 600));
    let (node, new) = register_or_resume(&st, &machine(1), &with_token(1, good.clone()), None, now)
        .await
        .unwrap();
    assert!(new);
    assert_eq!(node.tags, ["tag:ci"]);
    assert!(node.ephemeral);
    assert_eq!(node.user, None);
    assert_eq!(node.expires_at, Some(now + 600));

    // The same token cannot register a second machine (a copy taken off the workload).
    let (code, m) = refused(register_or_resume(&st, &machine(2), &with_token(2, good.clone()), None, now).await);
    assert_eq!(code, ErrorCode::IdTokenRefused);
    assert!(m.contains("another machine"), "{m}");
    // It still serves the machine it admitted (a reconnect with the same token).
    let (same, new) = register_or_resume(&st, &machine(1), &with_token(1, good.clone()), None, now)
        .await
        .unwrap();
    assert_eq!((same.id, new), (node.id, false));

    // Refusals name their check, and register nothing.
    let cases = [
        (k1.sign(&claims("system:serviceaccount:ci:builder", "other", now + 600)), "audience"),
        (k1.sign(&claims("system:serviceaccount:prod:x", "lattice", now + 600)), "does not match"),
        (k1.sign(&claims("system:serviceaccount:ci:builder", "lattice", now - 3600)), "expired"),
        (issuer::Key::new("k1").sign(&claims("system:serviceaccount:ci:b", "lattice", now + 600)), "signature"),
        ("not.a.token".to_owned(), "not a JWT"),
    ];
    for (i, (t, says)) in cases.into_iter().enumerate() {
        let (code, m) = refused(
            register_or_resume(&st, &machine(10 + i as u8), &with_token(10 + i as u8, t), None, now).await,
        );
        assert_eq!(code, ErrorCode::IdTokenRefused, "{m}");
        assert!(m.contains(says), "{says}: {m}");
    }
    let stranger = issuer::Key::new("k1");
    let mut c = claims("system:serviceaccount:ci:b", "lattice", now + 600);
    c["iss"] = json!("https://unknown.example.com");
    let (_, m) = refused(register_or_resume(&st, &machine(20), &with_token(20, stranger.sign(&c)), None, now).await);
    assert!(m.contains("no federation rule trusts"), "{m}");
    assert_eq!(ops::list_nodes(&st).await.unwrap().len(), 1);

    // The issuer rotates its key: a token naming the new key fetches the set again, once
    // (here without waiting out the least time between fetches).
    st.keys.set_refetch_every(std::time::Duration::ZERO);
    let fetched = *iss.served.lock().unwrap();
    let k2 = issuer::Key::new("k2");
    iss.published.lock().unwrap().push(k2.jwk.clone());
    let renewal = k2.sign(&claims("system:serviceaccount:ci:builder", "lattice", now + 1200));
    let (again, new) = register_or_resume(&st, &machine(1), &with_token(1, renewal), None, now)
        .await
        .unwrap();
    assert!(!new);
    assert_eq!((again.id, again.expires_at), (node.id, Some(now + 1200)), "renewed");
    assert_eq!(*iss.served.lock().unwrap(), fetched + 1);
    // Made-up key ids do not make it fetch again within the refetch interval.
    st.keys
        .set_refetch_every(coordinator::jwks::REFETCH_EVERY);
    for i in 0..5 {
        let t = issuer::Key::new(&format!("bogus{i}"))
            .sign(&claims("system:serviceaccount:ci:b", "lattice", now + 600));
        let (code, m) =
            refused(register_or_resume(&st, &machine(30 + i), &with_token(30 + i, t), None, now).await);
        assert_eq!(code, ErrorCode::IdTokenRefused);
        assert!(m.contains("no key"), "{m}");
    }
    assert_eq!(*iss.served.lock().unwrap(), fetched + 1);

    // A token for other tags cannot take over this node.
    let other_rule = ops::federation::add(
        &st,
        AddRule {
            issuer: iss.url.clone(),
            audience: "k8s".into(),
            matches: vec![],
            tags: vec!["tag:k8s".into()],
            ephemeral: false,
            max_lifetime_s: None,
        },
        "test",
    )
    .await
    .unwrap();
    assert!(other_rule.id > rule.id);
    let t = k2.sign(&claims("system:serviceaccount:ci:builder", "k8s", now + 600));
    let (code, m) = refused(register_or_resume(&st, &machine(1), &with_token(1, t), None, now).await);
    assert_eq!(code, ErrorCode::IdTokenRefused);
    assert!(m.contains("tag:k8s") && m.contains("tag:ci"), "{m}");

    // Once the token's time is up the node is expired, and a fresh token brings it back
    // with the same identity and addresses.
    let later = now + 1300;
    let (code, _) = refused(register_or_resume(&st, &machine(1), &hello(1, "job-1", None), None, later).await);
    assert_eq!(code, ErrorCode::NodeExpired);
    let fresh = k2.sign(&json!({"iss": iss.url, "aud": "lattice",
        "sub": "system:serviceaccount:ci:builder", "iat": later, "exp": later + 600}));
    let (back, new) = register_or_resume(&st, &machine(1), &with_token(1, fresh), None, later)
        .await
        .unwrap();
    assert!(!new);
    assert_eq!((back.id, back.addresses()), (node.id, node.addresses()));
    assert_eq!(back.expires_at, Some(later + 600));

    let actions: Vec<String> = ops::audit_list(&st, 0, 1000)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.actor.starts_with("federation:"))
        .map(|e| e.action)
        .collect();
    assert_eq!(
        actions,
        ["node.register", "node.renew", "node.renew", "node.renew"]
    );
    assert!(ops::audit_verify(&st).await.unwrap().ok());
});

db_test!(async fn workloads_starting_together_all_join_and_the_issuer_is_asked_once(tdb) {
    use coordinator::register::register_or_resume;
    use coordinator::state::unix_now;
    use serde_json::json;
    use support::{hello, machine};
    use wire::IdToken;

    let (st, iss, key) = with_issuer(&tdb).await;
    ops::federation::add(
        &st,
        AddRule {
            issuer: iss.url.clone(),
            audience: "lattice".into(),
            matches: vec![],
            tags: vec!["tag:ci".into()],
            ephemeral: true,
            max_lifetime_s: None,
        },
        "test",
    )
    .await
    .unwrap();
    let now = unix_now();
    // Sixteen workloads present tokens before the coordinator has the issuer's keys: the
    // first fetch serves them all.
    let joins: Vec<_> = (1..=16u8)
        .map(|i| {
            let st = st.clone();
            let t = key.sign(&json!({"iss": iss.url, "aud": "lattice",
                "sub": format!("system:serviceaccount:ci:job-{i}"), "iat": now, "exp": now + 600}));
            tokio::spawn(async move {
                let mut h = hello(i, &format!("job-{i}"), None);
                h.id_token = Some(IdToken(t));
                register_or_resume(&st, &machine(i), &h, None, now).await
            })
        })
        .collect();
    for j in joins {
        let (node, new) = j.await.unwrap().unwrap();
        assert!(new);
        assert_eq!(node.tags, ["tag:ci"]);
    }
    assert_eq!(*iss.served.lock().unwrap(), 1);
    assert_eq!(st.keys.fetches(), 1);
    // The same fetch gave the provider's endpoints (for signing people in).
    let p = st.keys.provider(&iss.url).await.unwrap();
    assert_eq!(
        p.authorization_endpoint.as_deref(),
        Some(format!("{}/authorize", iss.url).as_str())
    );
    assert_eq!(
        p.token_endpoint.as_deref(),
        Some(format!("{}/token", iss.url).as_str())
    );
    assert_eq!(st.keys.fetches(), 1);
});
