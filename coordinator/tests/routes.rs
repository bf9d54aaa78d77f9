//! Subnet routes and exit nodes on the coordinator, on both database backends: a node
//! advertises routes in its hello, an admin approves them (only advertised ones) or the
//! policy's autoApprovers do, the policy compiles them into the router's filter, and when two
//! routers serve one route the online one with the lowest id is primary (the other takes over
//! when it goes offline).
#![allow(clippy::unwrap_used)]

#[macro_use]
mod support;

use coordinator::error::ApiError;
use coordinator::model::NodeRecord;
use coordinator::ops::policy::PolicyText;
use coordinator::ops::{self, CreateAuthKey};
use coordinator::register::register_or_resume;
use coordinator::state::{AppState, unix_now};
use ipnet::IpNet;
use support::{hello, machine, state};

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

async fn join(st: &AppState, i: u8, name: &str, tags: &[&str], routes: &[&str]) -> NodeRecord {
    let key = ops::create_auth_key(
        st,
        CreateAuthKey {
            reusable: false,
            ephemeral: false,
            tags: tags.iter().map(|t| (*t).to_owned()).collect(),
            user: None,
            expiry_secs: 600,
        },
        "test",
    )
    .await
    .unwrap()
    .key;
    let mut h = hello(i, name, Some(&key));
    h.advertised_routes = routes.iter().map(|r| net(r)).collect();
    let (rec, _) = register_or_resume(st, &machine(i), &h, None, unix_now())
        .await
        .unwrap();
    st.hub.upsert_node(rec.clone());
    rec
}

db_test!(async fn routes_are_approved_by_admins_or_auto_approvers_and_fail_over(tdb) {
    let st = state(&tdb).await;
    ops::policy::set(
        &st,
        &PolicyText {
            file_name: "r.hujson".into(),
            text: r#"{"tagOwners": {"tag:router": [], "tag:exit": [], "tag:client": []},
                "autoApprovers": {"routes": {"10.20.0.0/16": ["tag:router"]}, "exitNode": ["tag:exit"]},
                "acls": [{"action": "accept", "src": ["tag:client"], "dst": ["10.0.0.0/8:22", "autogroup:internet:443"]}]}"#
                .into(),
        },
        "test",
    )
    .await
    .unwrap();
    let r1 = join(&st, 1, "r1", &["tag:router"], &["10.20.0.0/24", "192.168.1.0/24"]).await;
    let r2 = join(&st, 2, "r2", &["tag:router"], &["10.20.0.0/24"]).await;
    let exit = join(&st, 3, "exit", &["tag:exit"], &["0.0.0.0/0", "::/0"]).await;
    let client = join(&st, 4, "client", &["tag:client"], &[]).await;

    // autoApprovers: 10.20.0.0/24 (inside 10.20.0.0/16) for both routers, the exit routes for
    // the exit node; 192.168.1.0/24 waits for an admin.
    let routes = |id| {
        let hub = st.hub.read();
        let n = hub.node(id).unwrap();
        (n.routes.clone(), n.primary_routes.clone())
    };
    assert_eq!(routes(r1.id), (vec![net("10.20.0.0/24")], vec![net("10.20.0.0/24")]));
    assert_eq!(routes(r2.id).0, vec![net("10.20.0.0/24")]);
    assert!(routes(r2.id).1.is_empty(), "r1 is primary (lower id)");
    assert_eq!(routes(exit.id).0, vec![net("0.0.0.0/0"), net("::/0")]);

    // An admin approves only what a node advertises.
    match ops::set_routes(&st, "r2", &[net("172.16.0.0/12")], &[], "test").await {
        Err(ApiError::BadRequest(m)) => assert!(m.contains("does not advertise 172.16.0.0/12"), "{m}"),
        other => panic!("{other:?}"),
    }
    let v = ops::set_routes(&st, "r1", &[net("192.168.1.0/24")], &[], "test").await.unwrap();
    assert_eq!(v.approved, vec![net("10.20.0.0/24"), net("192.168.1.0/24")]);
    assert_eq!(v.primary, vec![net("10.20.0.0/24"), net("192.168.1.0/24")]);

    // The routers' filters carry the client's rule for their subnets; the exit node's for the
    // internet.
    let now = unix_now();
    let compiled = st.hub.read().compiled(now);
    let dsts = |id| -> Vec<IpNet> {
        compiled.for_node(id).rules.iter().flat_map(|r| r.dst.iter().map(|d| d.net)).collect()
    };
    assert!(dsts(r1.id).contains(&net("10.20.0.0/24")));
    assert!(
        !dsts(r1.id).contains(&net("192.168.1.0/24")),
        "the policy opens 10.0.0.0/8 only"
    );
    assert!(dsts(r2.id).contains(&net("10.20.0.0/24")));
    assert!(dsts(exit.id).iter().any(|d| d.contains(&"8.8.8.8".parse::<std::net::IpAddr>().unwrap())));
    assert!(compiled.for_node(client.id).visible_peers.contains(&r1.id));
    assert!(compiled.for_node(client.id).visible_peers.contains(&exit.id));

    // r1 goes offline: r2 becomes primary for the shared route.
    let mut offline = st.hub.read().node(r1.id).unwrap().record.clone();
    offline.connected_to = None;
    st.hub.upsert_node(offline);
    assert_eq!(routes(r2.id).1, vec![net("10.20.0.0/24")]);
    assert_eq!(routes(r1.id).1, vec![net("192.168.1.0/24")], "its own route stays its own");

    // Withdrawn approval, audited.
    let v = ops::set_routes(&st, "r1", &[], &[net("192.168.1.0/24")], "test").await.unwrap();
    assert_eq!(v.admin_approved, Vec::<IpNet>::new());
    let actions: Vec<String> =
        ops::audit_list(&st, 0, 100).await.unwrap().into_iter().map(|e| e.action).collect();
    assert_eq!(actions.iter().filter(|a| *a == "node.routes").count(), 2);

    // A node may not advertise the mesh's own addresses, or a prefix with host bits.
    for bad in ["100.64.0.0/12", "10.1.2.3/16"] {
        let key = ops::create_auth_key(
            &st,
            CreateAuthKey { reusable: false, ephemeral: false, tags: vec!["tag:router".into()], user: None, expiry_secs: 60 },
            "test",
        )
        .await
        .unwrap()
        .key;
        let mut h = hello(9, "bad", Some(&key));
        h.advertised_routes = vec![net(bad)];
        assert!(register_or_resume(&st, &machine(9), &h, None, unix_now()).await.is_err(), "{bad}");
    }
});
