//! The policy fuzz target's body, shared by the coverage-guided fuzzer (`policy/fuzz`, run by
//! `scripts/fuzz`) and the workspace test that replays the committed corpus
//! (`policy/tests/fuzz_corpus.rs`): any bytes as a policy file must be refused with positions
//! or accepted and compiled, never panic.
#![allow(dead_code, unreachable_pub, missing_docs, clippy::unwrap_used)]

use policy::{Inventory, InventoryNode, Policy};
use wire::{AttrValue, NodeId};

/// The target names, as directories under `corpus/`.
pub const TARGETS: &[&str] = &["policy"];

/// Runs target `name` on `data`.
pub fn run(name: &str, data: &[u8]) {
    match name {
        "policy" => policy(data),
        other => panic!("no fuzz target {other}"),
    }
}

fn inventory() -> Inventory {
    let mut inv = Inventory::new();
    let nodes = [
        ("db-1", None, vec!["tag:db"]),
        ("web", Some("alice@example.com"), vec![]),
        ("laptop", Some("bob@example.com"), vec![]),
    ];
    for (i, (name, user, tags)) in nodes.into_iter().enumerate() {
        let mut attrs = policy::Attrs::new();
        attrs.insert("node:os".into(), AttrValue::from_text("linux"));
        attrs.insert("fact:ok".into(), AttrValue::from_text("true"));
        inv.upsert(InventoryNode {
            routes: Vec::new(),
            id: NodeId(i as u64 + 1),
            name: name.into(),
            addresses: vec![format!("100.64.0.{}", i + 1).parse().unwrap()],
            user: user.map(str::to_owned),
            tags: tags.into_iter().map(str::to_owned).collect(),
            attrs,
        });
    }
    inv
}

/// Any bytes as a policy file.
pub fn policy(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let now: jiff::Timestamp = "2026-11-26T12:00:00Z".parse().unwrap();
    let inv = inventory();
    match Policy::check("fuzz.hujson", text, now, Some(&inv)) {
        Ok(p) => {
            let compiled = p.compile(&inv, now);
            for n in inv.iter() {
                let _ = compiled.for_node(n.id);
            }
            let base = Policy::allow_all().compile(&inv, now);
            let _ = policy::diff(&base, &compiled, now);
        }
        Err(e) => {
            // Every problem names its place in the file.
            for line in e.lines() {
                assert!(line.starts_with("fuzz.hujson:"), "{line}");
            }
        }
    }
}
