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
