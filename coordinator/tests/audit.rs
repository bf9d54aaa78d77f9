//! The audit log against someone who can write the database but not the state dir.
#![allow(clippy::unwrap_used)]

#[macro_use]
mod support;

use coordinator::audit::{GENESIS, entry_hash};
use coordinator::{db, ops};
use support::{key, state};

async fn rows(st: &coordinator::state::AppState) -> Vec<coordinator::audit::Entry> {
    let mut c = st.db.acquire().await.unwrap();
    db::audit::list(&mut c, 0, 1000).await.unwrap()
}

db_test!(async fn a_history_rewritten_in_the_database_is_found_without_trusting_it(tdb) {
    let st = state(&tdb).await;
    for _ in 0..4 {
        key(&st, true, 3600).await;
    }
    let v = ops::audit_verify(&st).await.unwrap();
    assert!(v.ok(), "{:?}", v.problems);
    assert_eq!((v.entries, v.signed), (4, 4));

    // The attacker drops the append-only triggers, changes who created key 2, re-hashes and
    // re-links every later entry and moves the head: the hash chain is consistent again.
    let entries = rows(&st).await;
    let mut forged = entries.clone();
    forged[1].actor = "local:uid=1000".into();
    let mut prev = GENESIS.to_owned();
    for e in &mut forged {
        e.prev_hash = prev.clone();
        e.hash = entry_hash(e);
        prev = e.hash.clone();
    }
    let mut c = st.db.acquire().await.unwrap();
    tdb.drop_trigger(&mut c, "audit_no_update", "audit").await;
    tdb.drop_trigger(&mut c, "audit_no_delete", "audit").await;
    for e in &forged {
        sqlx::query("UPDATE audit SET actor = $1, prev_hash = $2, hash = $3 WHERE seq = $4")
            .bind(&e.actor)
            .bind(&e.prev_hash)
            .bind(&e.hash)
            .bind(e.seq)
            .execute(&mut *c)
            .await
            .unwrap();
    }
    sqlx::query("UPDATE audit_head SET hash = $1, sig = '' WHERE id = 1")
        .bind(&prev)
        .execute(&mut *c)
        .await
        .unwrap();
    drop(c);
    let v = ops::audit_verify(&st).await.unwrap();
    assert!(!v.ok());
    assert!(
        v.problems
            .iter()
            .any(|p| p.starts_with("entry 2: signature")),
        "{:?}",
        v.problems
    );
    assert!(v.problems.iter().any(|p| p.contains("head's signature")));
});

db_test!(async fn entries_cut_from_the_end_with_the_head_rolled_back_are_found_through_the_checkpoint(tdb) {
    let st = state(&tdb).await;
    for _ in 0..5 {
        key(&st, true, 3600).await;
    }
    st.audit.advance(&st.db).await.unwrap();
    assert_eq!(st.audit.checkpoint().seq, 5);
    // The attacker saves the head as it was at entry 3 (a backup, say), later deletes entries
    // 4 and 5 and puts that head back: chain, head and signatures all agree.
    let entries = rows(&st).await;
    let mut c = st.db.acquire().await.unwrap();
    tdb.drop_trigger(&mut c, "audit_no_delete", "audit").await;
    sqlx::query("DELETE FROM audit WHERE seq > 3")
        .execute(&mut *c)
        .await
        .unwrap();
    let sig = coordinator::audit::sign_head(st.audit.key(), 3, &entries[2].hash);
    sqlx::query("UPDATE audit_head SET seq = 3, hash = $1, sig = $2 WHERE id = 1")
        .bind(&entries[2].hash)
        .bind(&sig)
        .execute(&mut *c)
        .await
        .unwrap();
    drop(c);
    let v = ops::audit_verify(&st).await.unwrap();
    assert_eq!(v.problems.len(), 1, "{:?}", v.problems);
    assert!(
        v.problems[0].contains("records entry 5"),
        "{:?}",
        v.problems
    );
    // And the checkpoint refuses to follow the database back.
    assert!(st.audit.advance(&st.db).await.is_err());
    assert_eq!(st.audit.checkpoint().seq, 5);
});
