//! Several coordinator replicas sharing one PostgreSQL database: every change reaches every
//! replica's view in commit order, whichever replica made it.
#![allow(clippy::unwrap_used)]

#[macro_use]
mod support;

use std::time::{Duration, Instant};

use coordinator::db;
use coordinator::ops;
use coordinator::register::{RegisterError, register_or_resume};
use coordinator::state::{AppState, unix_now};
use support::{TestDb, hello, key, machine, state};
use wire::{ErrorCode, NodeId};

/// Waits until `f` holds, for at most 10 s.
async fn eventually(what: &str, mut f: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !f() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{what}: not within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    eprintln!("{what}: {:?}", start.elapsed());
    start.elapsed()
}

/// Two replicas on one fresh PostgreSQL database (they share the state dir's keys).
async fn two() -> Option<(TestDb, AppState, AppState)> {
    let tdb = TestDb::postgres().await?;
    let a = state(&tdb).await;
    let b = state(&tdb).await;
    Some((tdb, a, b))
}

async fn join(st: &AppState, i: u8, k: &str) -> NodeId {
    register_or_resume(
        st,
        &machine(i),
        &hello(i, &format!("n{i}"), Some(k)),
        None,
        unix_now(),
    )
    .await
    .unwrap()
    .0
    .id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_registered_through_one_replica_and_removed_through_the_other_is_cut_off() {
    let Some((_tdb, a, b)) = two().await else {
        return;
    };
    let k = key(&a, true, 3600).await;
    let id = join(&a, 1, &k).await;
    let peer = join(&b, 2, &k).await;
    eventually("B sees the node A registered", || {
        b.hub.read().node(id).is_some()
    })
    .await;
    eventually("A sees the node B registered", || {
        a.hub.read().node(peer).is_some()
    })
    .await;

    // The node holds its session on A: B learns it is online through the database.
    let mut session = a.hub.attach(id);
    eventually("B sees it online", || {
        b.hub.read().node(id).is_some_and(|n| n.online)
    })
    .await;

    // An admin removes it through B: A kicks the session and drops it from every netmap.
    let removed = Instant::now();
    ops::remove_node(&b, "n1", "test", "compromised")
        .await
        .unwrap();
    assert!(
        b.hub.read().node(id).is_none(),
        "the writer's own view is current on return"
    );
    let kick = tokio::time::timeout(Duration::from_secs(5), session.kicks.recv())
        .await
        .expect("A kicks the session within 5 s")
        .unwrap();
    assert_eq!(kick.code, ErrorCode::NodeRemoved);
    assert!(kick.message.contains("compromised"), "{}", kick.message);
    assert!(a.hub.read().node(id).is_none());
    assert!(
        a.hub
            .read()
            .node_by_key(&wire::NodeKey::from_bytes([1; 32]))
            .is_none(),
        "A's relay no longer vouches for its key"
    );
    eprintln!(
        "removal through B reached A's session in {:?}",
        removed.elapsed()
    );
    drop(session);

    // Both replicas wrote audit entries: one chain, verified by either.
    assert!(ops::audit_verify(&a).await.unwrap().ok());
    assert!(ops::audit_verify(&b).await.unwrap().ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_single_use_key_raced_through_two_replicas_registers_exactly_one_node() {
    let Some((_tdb, a, b)) = two().await else {
        return;
    };
    let k = key(&a, false, 3600).await;
    let mut tasks = Vec::new();
    for i in 1..=24u8 {
        let st = if i % 2 == 0 { a.clone() } else { b.clone() };
        let k = k.clone();
        tasks.push(tokio::spawn(async move {
            register_or_resume(
                &st,
                &machine(i),
                &hello(i, "racer", Some(&k)),
                None,
                unix_now(),
            )
            .await
        }));
    }
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(RegisterError::Refused(ErrorCode::AuthKeyUsed, _)) => {}
            Err(e) => panic!("unexpected: {e:?}"),
        }
    }
    assert_eq!(ok, 1);
    let mut c = a.db.acquire().await.unwrap();
    assert_eq!(db::nodes::count(&mut c).await.unwrap(), 1);
    drop(c);
    eventually("both replicas hold the one node", || {
        a.hub.read().nodes().count() == 1 && b.hub.read().nodes().count() == 1
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn policy_settings_and_attributes_set_through_one_replica_reach_the_other() {
    let Some((_tdb, a, b)) = two().await else {
        return;
    };
    let policy = r#"{"tagOwners": {"tag:db": []},
        "acls": [{"action": "accept", "src": ["tag:db"], "dst": ["tag:db:5432"]}]}"#;
    ops::policy::set(
        &a,
        &ops::policy::PolicyText {
            file_name: "p.hujson".into(),
            text: policy.into(),
        },
        "test",
    )
    .await
    .unwrap();
    eventually("B has the new policy", || b.hub.read().policy().0 == 1).await;
    ops::change_settings(
        &b,
        ops::SettingsChange {
            tunnel_security: Some(wire::TunnelSecurity::ClassicalOnly),
            ..Default::default()
        },
        "test",
    )
    .await
    .unwrap();
    eventually("A has the new setting", || {
        a.hub.read().tunnel_security() == wire::TunnelSecurity::ClassicalOnly
    })
    .await;
    let k = key(&a, true, 3600).await;
    let id = join(&a, 3, &k).await;
    let change = ops::policy::AttrChange {
        set: [(
            "custom:team".to_string(),
            wire::AttrValue::String("sre".into()),
        )]
        .into(),
        unset: vec![],
    };
    ops::policy::set_attrs(&b, "n3", &change, "test")
        .await
        .unwrap();
    eventually("A sees the attribute", || {
        a.hub
            .read()
            .node(id)
            .is_some_and(|n| n.record.custom_attrs.contains_key("custom:team"))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_that_stops_beating_is_dropped_and_its_nodes_go_offline() {
    let Some((_tdb, a, b)) = two().await else {
        return;
    };
    let k = key(&a, true, 3600).await;
    let id = join(&a, 4, &k).await;
    // A replica holding the node's session, alive at first (so that no sweep drops it before
    // B has seen the node online).
    let mut c = a.db.acquire().await.unwrap();
    let now_ms = i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap();
    db::changes::add_replica(
        &mut c,
        "deadbeef",
        Some("http://192.0.2.9:8080"),
        None,
        now_ms,
    )
    .await
    .unwrap();
    db::nodes::set_connected(&mut c, id, Some("deadbeef"), None, unix_now())
        .await
        .unwrap();
    drop(c);
    let mut tx = db::begin_write(&a.db).await.unwrap();
    let seq = coordinator::feed::note(&mut tx, db::changes::Kind::Node, Some(id), None)
        .await
        .unwrap();
    coordinator::feed::commit(&a, tx, seq).await.unwrap();
    eventually("B sees the node online", || {
        b.hub.read().node(id).is_some_and(|n| n.online)
    })
    .await;
    // Then it dies without leaving: its heartbeat stops (is old).
    let mut c = a.db.acquire().await.unwrap();
    assert!(db::changes::heartbeat(&mut c, "deadbeef", 0).await.unwrap());
    drop(c);
    // Within a heartbeat or two, a live replica drops the dead one.
    let took = eventually("the dead replica's node goes offline", || {
        a.hub.read().node(id).is_some_and(|n| !n.online)
            && b.hub.read().node(id).is_some_and(|n| !n.online)
    })
    .await;
    eprintln!(
        "dead replica dropped after {took:?} (heartbeat {:?})",
        coordinator::feed::HEARTBEAT
    );
    let mut c = a.db.acquire().await.unwrap();
    let left: Vec<_> = db::changes::replicas(&mut c)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.id)
        .collect();
    assert!(!left.contains(&"deadbeef".to_string()), "{left:?}");
    assert!(left.contains(&a.replica.id) && left.contains(&b.replica.id));
}
