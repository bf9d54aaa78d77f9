//! Just-in-time access requests on both database backends: filing is checked against the
//! policy's `accessRequests`, only an approver the policy names (and never the requester)
//! decides, an approval is a grant compiled into the destination's filter, and it ends on
//! time. Every step is audited.
#![allow(clippy::unwrap_used)]

#[macro_use]
mod support;

use coordinator::error::ApiError;
use coordinator::model::NodeRecord;
use coordinator::ops::policy::PolicyText;
use coordinator::ops::{self, CreateAuthKey};
use coordinator::register::register_or_resume;
use coordinator::state::{AppState, unix_now};
use support::{hello, machine, state};

const POLICY: &str = r#"{
  "tagOwners": {"tag:prod": [], "tag:dev": []},
  "groups": {"group:sre": ["sam@example.com"]},
  "acls": [{"action": "accept", "src": ["tag:prod"], "dst": ["tag:prod:*"]}],
  "accessRequests": [
    {"dst": ["tag:prod"], "approvers": ["group:sre", "idp:group:oncall"], "maxDuration": "1h"},
  ],
}"#;

async fn join(st: &AppState, i: u8, name: &str, tags: &[&str], user: Option<&str>) -> NodeRecord {
    let key = ops::create_auth_key(
        st,
        CreateAuthKey {
            reusable: false,
            ephemeral: false,
            tags: tags.iter().map(|t| (*t).to_owned()).collect(),
            user: user.map(str::to_owned),
            expiry_secs: 600,
        },
        "test",
    )
    .await
    .unwrap()
    .key;
    register_or_resume(
        st,
        &machine(i),
        &hello(i, name, Some(&key)),
        None,
        unix_now(),
    )
    .await
    .unwrap()
    .0
}

fn forbidden(r: Result<impl std::fmt::Debug, ApiError>) -> String {
    match r {
        Err(ApiError::Forbidden(m)) => m,
        other => panic!("expected forbidden, got {other:?}"),
    }
}

db_test!(async fn a_named_approver_grants_time_limited_access_that_ends_on_time(tdb) {
    let st = state(&tdb).await;
    ops::policy::set(
        &st,
        &PolicyText { file_name: "jit.hujson".into(), text: POLICY.into() },
        "test",
    )
    .await
    .unwrap();
    let laptop = join(&st, 1, "laptop", &[], Some("eve@example.com")).await;
    let prod = join(&st, 2, "prod", &["tag:prod"], None).await;
    let now = unix_now();

    // Filing: checked against the policy, with a reason.
    let file = |dst: &'static str, ports: &'static str, secs: u64, reason: &'static str| {
        let (st, laptop) = (st.clone(), laptop.clone());
        async move {
            ops::access::file(&st, &laptop, dst, ports, secs, reason, now).await.unwrap()
        }
    };
    assert!(file("tag:dev", "22", 600, "debug").await.unwrap_err().contains("no one may approve"));
    assert!(file("tag:prod", "22", 7200, "debug").await.unwrap_err().contains("at most 1h"));
    assert!(file("tag:prod", "22", 600, "  ").await.unwrap_err().contains("give a reason"));
    let id = file("tag:prod", "22,5432", 1800, "incident 42").await.unwrap();
    let other = file("tag:prod", "22", 600, "look at logs").await.unwrap();

    // Deciding: not the requester, not someone the policy does not name.
    let as_eve = "user:eve@example.com (session 0a0a0a0a0a0a)";
    let m = forbidden(ops::access::decide(&st, id, true, as_eve, now).await);
    assert!(m.contains("your own"), "{m}");
    let as_mallory = "user:mallory@example.com (session 0b0b0b0b0b0b)";
    let m = forbidden(ops::access::decide(&st, id, true, as_mallory, now).await);
    assert!(m.contains("may not decide access to tag:prod"), "{m}");
    assert!(st.hub.read().grants().is_empty());

    // Sam (group:sre) approves: the grant starts now and is compiled into prod's filter.
    let as_sam = "user:sam@example.com (session 0c0c0c0c0c0c)";
    let r = ops::access::decide(&st, id, true, as_sam, now).await.unwrap();
    assert_eq!(r.status, "approved");
    assert_eq!(r.expires_at, Some(now + 1800));
    assert!(matches!(
        ops::access::decide(&st, id, false, as_sam, now).await,
        Err(ApiError::Conflict(_))
    ));
    let compiled = st.hub.read().compiled(now);
    let rules = &compiled.for_node(prod.id).rules;
    let grant = rules.iter().find(|r| r.origin == format!("access-request:{id}")).unwrap();
    let src: Vec<_> = grant.src.iter().map(|n| n.addr()).collect();
    assert_eq!(src, laptop.addresses());
    assert_eq!(grant.valid.as_ref().unwrap().last().unwrap().until, now + 1800);
    // An admin token denies the other one.
    let r = ops::access::decide(&st, other, false, "token:0d0d0d0d0d0d", now).await.unwrap();
    assert_eq!(r.status, "denied");
    let listed = ops::access::list(&st, false, now).await.unwrap();
    assert_eq!(listed.iter().map(|r| r.id).collect::<Vec<_>>(), [id]);

    // Its time up, the grant ends and leaves the compiled policy.
    ops::access::sweep(&st, now + 1799, false).await.unwrap();
    assert_eq!(st.hub.read().grants().len(), 1, "not before its end");
    ops::access::sweep(&st, now + 1800, false).await.unwrap();
    assert!(st.hub.read().grants().is_empty());
    let compiled = st.hub.read().compiled(now + 1800);
    assert!(compiled.for_node(prod.id).rules.iter().all(|r| !r.origin.starts_with("access-request:")));
    let all = ops::access::list(&st, true, now + 1800).await.unwrap();
    assert!(all.iter().all(|r| r.status != "approved" && r.status != "pending"), "{all:?}");

    let actions: Vec<String> = ops::audit_list(&st, 0, 1000)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.action)
        .filter(|a| a.starts_with("access."))
        .collect();
    assert_eq!(
        actions,
        ["access.request", "access.request", "access.approve", "access.deny", "access.expire"]
    );
});
