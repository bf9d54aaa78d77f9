//! Registration, auth keys and the audit log against a real SQLite database file.
#![allow(clippy::unwrap_used)]

#[macro_use]
mod support;

use coordinator::db;
use std::time::Duration;

use coordinator::ops;
use coordinator::register::{RegisterError, register_or_resume};
use coordinator::state::unix_now;
use support::{hello, key, machine, state};
use wire::{AuthKey, ErrorCode, NodeKey};

fn refused(r: Result<impl std::fmt::Debug, RegisterError>) -> ErrorCode {
    match r {
        Err(RegisterError::Refused(code, _)) => code,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

db_test!(async fn a_single_use_key_registers_exactly_one_of_many_concurrent_nodes(tdb) {
    let st = state(&tdb).await;
    let k = key(&st, false, 3600).await;
    let mut tasks = Vec::new();
    for i in 1..=24u8 {
        let st = st.clone();
        let k = k.clone();
        tasks.push(tokio::spawn(async move {
            register_or_resume(&st, &machine(i), &hello(i, "racer", Some(&k)), None, unix_now()).await
        }));
    }
    let mut ok = 0;
    let mut used = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(RegisterError::Refused(ErrorCode::AuthKeyUsed, _)) => used += 1,
            Err(e) => panic!("unexpected: {e:?}"),
        }
    }
    assert_eq!((ok, used), (1, 23));
    let mut c = st.db.acquire().await.unwrap();
    assert_eq!(db::nodes::count(&mut c).await.unwrap(), 1);
});

db_test!(async fn a_reusable_key_gives_unique_names_and_addresses(tdb) {
    let st = state(&tdb).await;
    let k = key(&st, true, 3600).await;
    let mut names = Vec::new();
    let mut v4 = Vec::new();
    for i in 1..=4u8 {
        let (rec, new) = register_or_resume(
            &st,
            &machine(i),
            &hello(i, "DB Server", Some(&k)),
            None,
            unix_now(),
        )
        .await
        .unwrap();
        assert!(new);
        assert_eq!(rec.tags, vec!["tag:db".to_string()]);
        assert!(rec.user.is_none(), "tagged nodes have no user owner");
        names.push(rec.name);
        v4.push(rec.ipv4.to_string());
        assert!(rec.ipv6.to_string().starts_with("fd11:2233:4455::"));
    }
    assert_eq!(
        names,
        ["db-server", "db-server-1", "db-server-2", "db-server-3"]
    );
    assert_eq!(v4, ["100.64.0.1", "100.64.0.2", "100.64.0.3", "100.64.0.4"]);
});

db_test!(async fn expired_revoked_forged_and_foreign_keys_are_refused_with_clear_codes(tdb) {
    let st = state(&tdb).await;
    let short = key(&st, true, 1).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        refused(
            register_or_resume(
                &st,
                &machine(1),
                &hello(1, "a", Some(&short)), None,
                unix_now() + 1
            )
            .await
        ),
        ErrorCode::AuthKeyExpired
    );
    let revoked = key(&st, true, 3600).await;
    let id = revoked.parse::<AuthKey>().unwrap().id_hex();
    ops::revoke_auth_key(&st, &id, "test").await.unwrap();
    assert_eq!(
        refused(
            register_or_resume(&st, &machine(1), &hello(1, "a", Some(&revoked)), None, unix_now()).await
        ),
        ErrorCode::AuthKeyRevoked
    );
    let good: AuthKey = key(&st, true, 3600).await.parse().unwrap();
    let forged = AuthKey::new(*good.fingerprint(), *good.id(), [0x42; 20]).expose_secret();
    assert_eq!(
        refused(
            register_or_resume(&st, &machine(1), &hello(1, "a", Some(&forged)), None, unix_now()).await
        ),
        ErrorCode::AuthKeyInvalid
    );
    let foreign = AuthKey::new([9; 16], *good.id(), *good.secret()).expose_secret();
    assert_eq!(
        refused(
            register_or_resume(&st, &machine(1), &hello(1, "a", Some(&foreign)), None, unix_now()).await
        ),
        ErrorCode::AuthKeyInvalid
    );
    assert_eq!(
        refused(register_or_resume(&st, &machine(1), &hello(1, "a", None), None, unix_now()).await),
        ErrorCode::AuthKeyRequired
    );
});

db_test!(async fn a_known_machine_resumes_without_a_key_and_a_removed_one_is_told_why(tdb) {
    let st = state(&tdb).await;
    let k = key(&st, false, 3600).await;
    let (first, _) = register_or_resume(&st, &machine(1), &hello(1, "a", Some(&k)), None, unix_now())
        .await
        .unwrap();
    // The same machine resumes, even though the single-use key is spent, and keeps its
    // addresses; a new WireGuard key is recorded and audited.
    let (again, new) = register_or_resume(&st, &machine(1), &hello(7, "a", Some(&k)), None, unix_now())
        .await
        .unwrap();
    assert!(!new);
    assert_eq!(
        (again.id, again.ipv4, again.ipv6),
        (first.id, first.ipv4, first.ipv6)
    );
    assert_eq!(again.node_key, NodeKey::from_bytes([7; 32]));
    // Identity comes from the machine key only: another machine presenting the same hello is
    // a new registration (and the spent key refuses it).
    assert_eq!(
        refused(register_or_resume(&st, &machine(2), &hello(8, "a", Some(&k)), None, unix_now()).await),
        ErrorCode::AuthKeyUsed
    );
    ops::remove_node(&st, "a", "test", "removed by an admin")
        .await
        .unwrap();
    assert_eq!(
        refused(register_or_resume(&st, &machine(1), &hello(1, "a", None), None, unix_now()).await),
        ErrorCode::NodeRemoved
    );
    let entries = ops::audit_list(&st, 0, 100).await.unwrap();
    let actions: Vec<&str> = entries.iter().map(|e| e.action.as_str()).collect();
    assert_eq!(
        actions,
        [
            "authkey.create",
            "node.register",
            "node.rotate_key",
            "node.remove"
        ]
    );
});

db_test!(async fn secrets_are_stored_only_as_hashes(tdb) {
    let st = state(&tdb).await;
    let k: AuthKey = key(&st, false, 3600).await.parse().unwrap();
    let token = ops::create_token(&st, ops::CreateToken::default(), "test")
        .await
        .unwrap()
        .token;
    st.db.close().await;
    let secret_hex = &k.expose_secret()[50..];
    let token_secret = token.split('-').nth(2).unwrap().to_owned();
    assert_eq!(token_secret.len(), 40);
    for entry in std::fs::read_dir(tdb.path()).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        let text = String::from_utf8_lossy(&bytes);
        assert!(
            !text.contains(secret_hex),
            "auth key secret found in the database files"
        );
        assert!(
            !text.contains(&token_secret),
            "admin token secret found in the database files"
        );
        assert!(
            !bytes.windows(20).any(|w| w == k.secret()),
            "raw secret bytes in the database"
        );
    }
});

db_test!(async fn audit_verify_finds_modified_and_deleted_rows_in_the_real_database(tdb) {
    let st = state(&tdb).await;
    for _ in 0..5 {
        key(&st, true, 3600).await;
    }
    assert!(ops::audit_verify(&st).await.unwrap().ok());

    // The table refuses updates and deletes...
    let mut c = st.db.acquire().await.unwrap();
    let err = sqlx::query("UPDATE audit SET actor = 'mallory' WHERE seq = 2")
        .execute(&mut *c)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("append-only"));
    // ...so an attacker with file access drops the trigger first; verify still notices.
    tdb.drop_trigger(&mut c, "audit_no_update", "audit").await;
    tdb.drop_trigger(&mut c, "audit_no_delete", "audit").await;
    sqlx::query("UPDATE audit SET actor = 'mallory' WHERE seq = 2")
        .execute(&mut *c)
        .await
        .unwrap();
    drop(c);
    let v = ops::audit_verify(&st).await.unwrap();
    assert_eq!(
        v.problems,
        ["entry 2: content does not match its hash (modified)"]
    );

    let mut c = st.db.acquire().await.unwrap();
    sqlx::query("UPDATE audit SET actor = 'test' WHERE seq = 2")
        .execute(&mut *c)
        .await
        .unwrap();
    sqlx::query("DELETE FROM audit WHERE seq = 3")
        .execute(&mut *c)
        .await
        .unwrap();
    drop(c);
    let v = ops::audit_verify(&st).await.unwrap();
    assert!(
        v.problems
            .iter()
            .any(|p| p.contains("entries 3..3 are missing")),
        "{:?}",
        v.problems
    );

    let mut c = st.db.acquire().await.unwrap();
    sqlx::query("DELETE FROM audit WHERE seq >= 3")
        .execute(&mut *c)
        .await
        .unwrap();
    drop(c);
    let v = ops::audit_verify(&st).await.unwrap();
    assert_eq!(v.problems.len(), 1, "{:?}", v.problems);
    assert!(v.problems[0].contains("chain ends at entry 2 but the head records entry 5"));
});

db_test!(async fn the_admin_router_needs_a_valid_token(tdb) {
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    let st = state(&tdb).await;
    let app = coordinator::api::admin_router(st.clone());
    let req = |auth: Option<&str>| {
        let mut b = Request::builder().uri("/admin/v1/nodes");
        if let Some(a) = auth {
            b = b.header("authorization", a);
        }
        b.body(Body::empty()).unwrap()
    };
    assert_eq!(app.clone().oneshot(req(None)).await.unwrap().status(), 401);
    assert_eq!(
        app.clone()
            .oneshot(req(Some("Bearer lt1-000000000000-00")))
            .await
            .unwrap()
            .status(),
        401
    );
    let token = ops::create_token(&st, ops::CreateToken::default(), "test")
        .await
        .unwrap()
        .token;
    let ok = app
        .clone()
        .oneshot(req(Some(&format!("Bearer {token}"))))
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let id = token.split('-').nth(1).unwrap().to_owned();
    ops::revoke_token(&st, &id, "test").await.unwrap();
    assert_eq!(
        app.oneshot(req(Some(&format!("Bearer {token}"))))
            .await
            .unwrap()
            .status(),
        401
    );
});

db_test!(async fn a_node_key_belongs_to_one_node(tdb) {
    let st = state(&tdb).await;
    let k = key(&st, true, 3600).await;
    register_or_resume(&st, &machine(1), &hello(1, "a", Some(&k)), None, unix_now())
        .await
        .unwrap();
    // Another machine, even with a good auth key, cannot register with node 1's key...
    let err = register_or_resume(&st, &machine(2), &hello(1, "b", Some(&k)), None, unix_now()).await;
    let Err(RegisterError::Refused(code, msg)) = err else {
        panic!("a second node took node 1's key");
    };
    assert_eq!(code, ErrorCode::BadRequest);
    assert!(msg.contains("belongs to another node"), "{msg}");
    // ...nor take it over when it resumes with its own key first.
    register_or_resume(&st, &machine(2), &hello(2, "b", Some(&k)), None, unix_now())
        .await
        .unwrap();
    assert_eq!(
        refused(register_or_resume(&st, &machine(2), &hello(1, "b", None), None, unix_now()).await),
        ErrorCode::BadRequest
    );
    // The owner keeps resuming with it.
    let (again, new) = register_or_resume(&st, &machine(1), &hello(1, "a", None), None, unix_now())
        .await
        .unwrap();
    assert!(!new);
    assert_eq!(again.node_key, NodeKey::from_bytes([1; 32]));
    // And the database itself refuses a duplicate, whatever the code path.
    let mut c = st.db.acquire().await.unwrap();
    let dup = sqlx::query("UPDATE nodes SET node_key = $1 WHERE name = 'b'")
        .bind(NodeKey::from_bytes([1; 32]).to_text())
        .execute(&mut *c)
        .await;
    assert!(dup.is_err(), "two nodes share a node key in the database");
});

db_test!(async fn removed_and_rotated_away_node_keys_are_published_for_relays(tdb) {
    let st = state(&tdb).await;
    let k = key(&st, true, 3600).await;
    for (m, n) in [(1, "a"), (2, "b")] {
        let (rec, _) = register_or_resume(&st, &machine(m), &hello(m, n, Some(&k)), None, unix_now())
            .await
            .unwrap();
        st.hub.upsert_node(rec);
    }
    let revoked = |st: &coordinator::state::AppState| -> Vec<NodeKey> {
        st.hub
            .read()
            .revocations(unix_now())
            .into_iter()
            .map(|(k, _)| k)
            .collect()
    };
    assert!(revoked(&st).is_empty());
    // b rotates its key: the old one is revoked; a is removed: its key is revoked.
    let (rec, _) = register_or_resume(&st, &machine(2), &hello(9, "b", None), None, unix_now())
        .await
        .unwrap();
    st.hub.upsert_node(rec);
    ops::remove_node(&st, "a", "test", "removed by an admin")
        .await
        .unwrap();
    let mut r = revoked(&st);
    r.sort();
    assert_eq!(
        r,
        [NodeKey::from_bytes([1; 32]), NodeKey::from_bytes([2; 32])]
    );
    // Each until the last second a ticket issued before could be valid.
    let until = st.hub.read().revocations(unix_now())[0].1;
    assert!(until >= unix_now() + 110 && until <= unix_now() + 121);
});

db_test!(async fn the_embedded_relay_serves_a_member_past_its_ticket_only_while_the_database_is_away(tdb) {
    use hybrid::ticket::Ticket;
    use relay::Authorizer;
    let st = state(&tdb).await;
    let k = key(&st, true, 3600).await;
    let now = unix_now();
    let (rec, _) = register_or_resume(&st, &machine(1), &hello(1, "member", Some(&k)), None, now)
        .await
        .unwrap();
    let member = *rec.node_key.as_bytes();
    let feed = std::sync::Arc::new(coordinator::feed::Feed::default());
    let auth = coordinator::relays::HubAuthorizer::new(
        st.hub.clone(),
        wire::TicketKey::from_bytes(st.tickets.public()),
        std::sync::Arc::clone(&feed),
    );
    let ticket = |node_key: [u8; 32], not_after: i64| {
        st.tickets.issue(Ticket { node_key, not_after }).to_vec()
    };
    assert!(auth.still_vouched(&member));
    // The database answers (for minutes: the first answer starts two minutes to bring
    // tickets): a valid ticket is good, one that ran out is not.
    for t in (now - 200..=now).step_by(10) {
        feed.database_answered(t);
    }
    assert_eq!(auth.authorize(&member, &ticket(member, now + 60), now), Ok(now + 60));
    assert!(auth.authorize(&member, &ticket(member, now - 1), now).is_err());
    assert!(!auth.serves_expired(&member, now - 1, now));
    // No answer for more than 30 s: a member is served past its ticket, no one else is.
    let away = now + 31;
    assert_eq!(auth.authorize(&member, &ticket(member, now - 1), away), Ok(now - 1));
    assert!(auth.serves_expired(&member, now - 1, away));
    let stranger = [9u8; 32];
    assert!(auth.authorize(&stranger, &ticket(stranger, now - 1), away).is_err());
    assert!(auth.authorize(&member, &ticket(stranger, now + 60), away).is_err());
    // Up to the grace past the ticket's end.
    let grace = i64::try_from(coordinator::relays::DATABASE_OUTAGE_GRACE.as_secs()).unwrap();
    assert!(auth.serves_expired(&member, now - 1, now - 1 + grace));
    assert!(!auth.serves_expired(&member, now - 1, now + grace));
    // It answers again: two minutes to bring fresh tickets, the database answering throughout.
    let back = away + 10;
    for t in (back..=back + 140).step_by(10) {
        feed.database_answered(t);
        assert_eq!(auth.serves_expired(&member, now - 1, t), t <= back + 120, "at {}", t - back);
    }
});
