//! Policy storage, checks, audit and posture intake against a real SQLite database file.
#![allow(clippy::unwrap_used)]

#[macro_use]
mod support;

use std::collections::BTreeMap;

use coordinator::db;
use coordinator::error::ApiError;
use coordinator::netmap::{SentMap, next_map};
use coordinator::ops::policy::{self as pops, AttrChange, PolicyText};
use coordinator::ops::{self, CreateAuthKey};
use coordinator::register::register_or_resume;
use coordinator::state::{AppState, unix_now};
use support::{hello, key, machine, state};
use wire::{AttrValue, NodeId};

const GOOD: &str = r#"// db access for engineers
{
  "groups": {"group:eng": ["alice@example.com"]},
  "tagOwners": {"tag:db": ["group:eng"]},
  "postures": {"posture:edr": ["fact:edr == 'running'"]},
  "acls": [
    {"action": "accept", "src": ["tag:db"], "dst": ["tag:db:5432"], "srcPosture": ["posture:edr"]},
  ],
  "tests": [
    {"src": "tag:db", "srcAttrs": {"fact:edr": "running"}, "accept": ["tag:db:5432"], "deny": ["tag:db:22"]},
  ],
}
"#;

fn text(name: &str, t: &str) -> PolicyText {
    PolicyText {
        file_name: name.into(),
        text: t.into(),
    }
}

async fn audit_actions(st: &AppState) -> Vec<(String, String)> {
    ops::audit_list(st, 0, 10_000)
        .await
        .unwrap()
        .into_iter()
        .map(|e| (e.action, e.actor))
        .collect()
}

/// Registers two tagged nodes and returns their ids.
async fn two_nodes(st: &AppState) -> (NodeId, NodeId) {
    let k = key(st, true, 3600).await;
    let (a, _) = register_or_resume(
        st,
        &machine(1),
        &hello(1, "db-1", Some(&k)),
        None,
        unix_now(),
    )
    .await
    .unwrap();
    let (b, _) = register_or_resume(
        st,
        &machine(2),
        &hello(2, "db-2", Some(&k)),
        None,
        unix_now(),
    )
    .await
    .unwrap();
    st.hub.upsert_node(a.clone());
    st.hub.upsert_node(b.clone());
    (a.id, b.id)
}

fn peers_of(st: &AppState, me: NodeId) -> (usize, usize) {
    let mut sent = SentMap::default();
    let hub = st.hub.read();
    let m = next_map(
        &mut sent,
        &hub.snapshot(unix_now()),
        me,
        None,
        &coordinator::hub::Pending::all(),
    )
    .unwrap();
    (m.peers.unwrap().len(), m.packet_filter.unwrap().len())
}

db_test!(async fn a_failing_file_is_rejected_with_every_problem_and_nothing_changes(tdb) {
    let st = state(&tdb).await;
    let set = pops::set(&st, &text("good.hujson", GOOD), "local:uid=0")
        .await
        .unwrap();
    assert_eq!(set.version, 1);
    let before_audit = audit_actions(&st).await;

    let bad = GOOD
        .replace("\"deny\": [\"tag:db:22\"]", "\"deny\": [\"tag:db:5432\"]")
        .replace("group:eng\"]}", "group:nobody\"]}");
    let err = pops::set(&st, &text("bad.hujson", &bad), "local:uid=0")
        .await
        .unwrap_err();
    let ApiError::Rejected { message, details } = err else {
        panic!("expected a rejection, got {err:?}");
    };
    assert!(message.contains("unchanged"), "{message}");
    assert_eq!(details.len(), 1, "{details:?}");
    assert!(details[0].starts_with("bad.hujson:4:"), "{details:?}");
    assert!(
        details[0].contains("unknown group \"group:nobody\""),
        "{details:?}"
    );

    // Only a failing test this time: the test names the rule that decided.
    let failing = GOOD.replace("\"deny\": [\"tag:db:22\"]", "\"deny\": [\"tag:db:5432\"]");
    let ApiError::Rejected { details, .. } =
        pops::set(&st, &text("failing.hujson", &failing), "local:uid=0")
            .await
            .unwrap_err()
    else {
        panic!("expected a rejection");
    };
    assert_eq!(details.len(), 1);
    assert!(
        details[0].contains("should be denied, but the rule at failing.hujson:7:5 accepts it"),
        "{details:?}"
    );

    let view = pops::get(&st).await.unwrap();
    assert_eq!(view.stored.as_ref().unwrap().version, 1);
    assert_eq!(view.stored.unwrap().text, GOOD);
    assert_eq!(pops::versions(&st).await.unwrap().len(), 1);
    assert_eq!(
        audit_actions(&st).await,
        before_audit,
        "a rejected file leaves no audit entry"
    );
});

db_test!(async fn every_version_is_kept_and_audited_with_its_actor(tdb) {
    let st = state(&tdb).await;
    let v1 = pops::set(&st, &text("p.hujson", GOOD), "local:uid=0")
        .await
        .unwrap();
    let same = pops::set(&st, &text("p.hujson", GOOD), "token:abc")
        .await
        .unwrap();
    assert!(same.unchanged);
    assert_eq!(same.version, v1.version);
    let stricter = GOOD.replace("5432", "5433");
    let v2 = pops::set(&st, &text("p.hujson", &stricter), "token:0123456789ab")
        .await
        .unwrap();
    assert_eq!(v2.version, 2);

    let versions = pops::versions(&st).await.unwrap();
    assert_eq!(
        versions
            .iter()
            .map(|v| v.set_by.as_str())
            .collect::<Vec<_>>(),
        ["local:uid=0", "token:0123456789ab"]
    );
    assert_eq!(pops::version(&st, 1).await.unwrap().text, GOOD);
    let sets: Vec<_> = audit_actions(&st)
        .await
        .into_iter()
        .filter(|(a, _)| a == "policy.set")
        .collect();
    assert_eq!(
        sets,
        [
            ("policy.set".to_owned(), "local:uid=0".to_owned()),
            ("policy.set".to_owned(), "token:0123456789ab".to_owned())
        ]
    );
    // Stored versions cannot be rewritten behind the audit log's back.
    let mut c = st.db.acquire().await.unwrap();
    let r = sqlx::query("UPDATE policies SET text = '{}' WHERE version = 1")
        .execute(&mut *c)
        .await;
    assert!(r.is_err());
    let r = sqlx::query("DELETE FROM policies").execute(&mut *c).await;
    assert!(r.is_err());
    assert!(ops::audit_verify(&st).await.unwrap().ok());
});

db_test!(async fn posture_and_custom_attributes_decide_who_sees_whom(tdb) {
    let st = state(&tdb).await;
    let (a, b) = two_nodes(&st).await;
    pops::set(&st, &text("p.hujson", GOOD), "local:uid=0")
        .await
        .unwrap();
    // Neither node has reported `fact:edr`: nobody may reach anybody, nobody sees anybody.
    assert_eq!(peers_of(&st, a), (0, 0));

    let facts = |v: &str| -> BTreeMap<String, AttrValue> {
        [("fact:edr".to_owned(), AttrValue::String(v.into()))]
            .into_iter()
            .collect()
    };
    assert!(
        pops::record_posture(&st, b, facts("running"))
            .await
            .unwrap()
    );
    assert!(
        !pops::record_posture(&st, b, facts("running"))
            .await
            .unwrap(),
        "unchanged"
    );
    // b may now reach a: a gets one rule and sees b; b sees a (it may reach it).
    assert_eq!(peers_of(&st, a), (1, 1));
    assert_eq!(peers_of(&st, b), (1, 0));

    assert!(
        pops::record_posture(&st, b, facts("stopped"))
            .await
            .unwrap()
    );
    assert_eq!(peers_of(&st, a), (0, 0));

    // A custom attribute works the same way, and its change is audited.
    let custom = GOOD
        .replace("fact:edr == 'running'", "custom:trusted == true")
        .replace(
            "\"srcAttrs\": {\"fact:edr\": \"running\"}",
            "\"srcAttrs\": {\"custom:trusted\": true}",
        );
    pops::set(&st, &text("p.hujson", &custom), "local:uid=0")
        .await
        .unwrap();
    assert_eq!(peers_of(&st, a), (0, 0));
    let change = AttrChange {
        set: [("custom:trusted".to_owned(), AttrValue::Bool(true))]
            .into_iter()
            .collect(),
        unset: vec![],
    };
    pops::set_attrs(&st, "db-1", &change, "local:uid=0")
        .await
        .unwrap();
    assert_eq!(peers_of(&st, b), (1, 1));
    assert!(
        audit_actions(&st)
            .await
            .iter()
            .any(|(a, _)| a == "node.attrs")
    );
    // Nodes cannot set custom attributes through posture.
    let sneaky = [("custom:trusted".to_owned(), AttrValue::Bool(true))]
        .into_iter()
        .collect();
    pops::record_posture(&st, b, sneaky).await.unwrap();
    assert_eq!(peers_of(&st, a), (1, 0), "a may reach b, b may not reach a");
});

db_test!(async fn auth_keys_may_only_carry_tags_the_policy_declares(tdb) {
    let st = state(&tdb).await;
    pops::set(&st, &text("p.hujson", GOOD), "local:uid=0")
        .await
        .unwrap();
    let req = |tag: &str| CreateAuthKey {
        reusable: false,
        ephemeral: false,
        tags: vec![tag.into()],
        user: None,
        expiry_secs: 60,
    };
    assert!(ops::create_auth_key(&st, req("tag:db"), "t").await.is_ok());
    let err = ops::create_auth_key(&st, req("tag:web"), "t")
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("not declared in the policy's tagOwners"),
        "{err}"
    );
});

db_test!(async fn serve_policy_is_stored_once_and_a_bad_one_refuses_to_start(tdb) {
    let pool = db::open(&tdb.url)
        .await
        .unwrap();
    let key = hybrid::sign::Signer::from_seed([3; 32]);
    let (v, p) = pops::load_at_start(&pool, &key, None, "local:uid=0")
        .await
        .unwrap();
    assert_eq!(v, 0);
    assert!(p.is_default());
    let (v, p) = pops::load_at_start(&pool, &key, Some(("p.hujson", GOOD)), "local:uid=0")
        .await
        .unwrap();
    assert_eq!((v, p.rule_count()), (1, 1));
    let (v, _) = pops::load_at_start(&pool, &key, Some(("p.hujson", GOOD)), "local:uid=0")
        .await
        .unwrap();
    assert_eq!(v, 1, "the same file is not stored twice");
    let (v, p) = pops::load_at_start(&pool, &key, None, "local:uid=0")
        .await
        .unwrap();
    assert_eq!(
        (v, p.is_default()),
        (1, false),
        "the stored policy stays in force"
    );
    let err = pops::load_at_start(
        &pool,
        &key,
        Some(("bad.hujson", "{\"acls\": [}")),
        "local:uid=0",
    )
    .await
    .unwrap_err();
    assert!(format!("{err:#}").contains("bad.hujson:1:11"), "{err:#}");
    let mut c = pool.acquire().await.unwrap();
    assert_eq!(db::policy::versions(&mut c).await.unwrap().len(), 1);
});

db_test!(async fn policy_set_reports_every_pair_in_totals_and_lists_a_bounded_number(tdb) {
    let st = state(&tdb).await;
    let k = key(&st, true, 3600).await;
    for i in 1..=9u8 {
        let (n, _) = register_or_resume(
            &st,
            &machine(i),
            &hello(i, &format!("db-{i}"), Some(&k)),
            None,
            unix_now(),
        )
        .await
        .unwrap();
        st.hub.upsert_node(n);
    }
    // From everyone-reaches-everyone to one port: each of the 72 ordered pairs loses access.
    let narrow = r#"{"tagOwners": {"tag:db": []},
        "acls": [{"action": "accept", "src": ["tag:db"], "dst": ["tag:db:22"]}]}"#;
    let full = pops::diff(&st, &text("n.hujson", narrow)).await.unwrap();
    assert_eq!((full.lost.len(), full.lost_total), (72, 72));
    assert_eq!(full.gained_total, 0);
    assert_eq!(full.lost[0].src, "db-1");
    let out = pops::set(&st, &text("n.hujson", narrow), "test").await.unwrap();
    assert_eq!(out.diff.lost_total, 72);
    assert_eq!(out.diff.lost.len(), pops::SET_DIFF_LINES);
    assert_eq!(out.diff.lost[..], full.lost[..pops::SET_DIFF_LINES]);
    // The audit entry counts every pair.
    let entry = ops::audit_list(&st, 0, 10_000)
        .await
        .unwrap()
        .into_iter()
        .rfind(|e| e.action == "policy.set")
        .unwrap();
    let detail: serde_json::Value = serde_json::from_str(&entry.detail).unwrap();
    assert_eq!(detail["lost"], 72, "{detail}");
});
