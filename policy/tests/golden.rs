//! Golden tests: `golden/<case>/policy.hujson` + `inventory.json` -> `expected.json` (per-node
//! compiled rules and peers), or -> `expected-errors.txt` for files that must be refused.
//! `UPDATE_GOLDEN=1 cargo test -p policy --test golden` rewrites the expectations.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::collections::BTreeMap;
use std::path::Path;

use jiff::Timestamp;
use policy::{Inventory, InventoryNode, Policy};
use serde_json::{Value, json};
use wire::{AttrValue, NodeId};

#[test]
fn golden_cases() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    let mut cases: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    cases.sort();
    assert!(!cases.is_empty());
    for dir in cases {
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(dir.join("policy.hujson")).unwrap();
        let inv_json: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("inventory.json")).unwrap())
                .unwrap();
        let now: Timestamp = inv_json["now"].as_str().unwrap().parse().unwrap();
        let inventory = inventory(&inv_json);
        let file = format!("{name}/policy.hujson");
        let (path, actual) = match Policy::check(&file, &text, now, Some(&inventory)) {
            Err(e) => (dir.join("expected-errors.txt"), e.lines().join("\n") + "\n"),
            Ok(p) => {
                let compiled = p.compile(&inventory, now);
                let mut out = BTreeMap::new();
                for n in inventory.iter() {
                    let c = compiled.for_node(n.id);
                    let peers: Vec<String> = c
                        .visible_peers
                        .iter()
                        .map(|id| inventory.get(*id).unwrap().name.clone())
                        .collect();
                    out.insert(n.name.clone(), json!({"peers": peers, "rules": c.rules}));
                }
                (
                    dir.join("expected.json"),
                    serde_json::to_string_pretty(&out).unwrap() + "\n",
                )
            }
        };
        if update {
            std::fs::write(&path, &actual).unwrap();
            println!("updated {}", path.display());
            continue;
        }
        let expected = std::fs::read_to_string(&path)
            .unwrap_or_else(|_| panic!("{} is missing (run with UPDATE_GOLDEN=1)", path.display()));
        assert_eq!(
            actual,
            expected,
            "golden case {name} differs from {}",
            path.display()
        );
    }
}

fn inventory(v: &Value) -> Inventory {
    v["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| InventoryNode {
            routes: Vec::new(),
            id: NodeId(n["id"].as_u64().unwrap()),
            name: n["name"].as_str().unwrap().to_owned(),
            addresses: n["addresses"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| a.as_str().unwrap().parse().unwrap())
                .collect(),
            user: n["user"].as_str().map(str::to_owned),
            tags: n["tags"]
                .as_array()
                .map(|t| t.iter().map(|x| x.as_str().unwrap().to_owned()).collect())
                .unwrap_or_default(),
            attrs: n["attrs"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| {
                            (
                                k.clone(),
                                serde_json::from_value::<AttrValue>(v.clone()).unwrap(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default(),
        })
        .collect()
}
