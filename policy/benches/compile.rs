//! Compile time for a large mesh: 5,000 nodes and a 1,000-rule policy
//! (`cargo bench -p policy --bench compile`). Times what the coordinator does when the policy
//! or a node's facts change: parse and check the file, resolve it against the inventory, and
//! extract every node's rules and peers. Prints numbers; asserts nothing.
#![allow(
    clippy::print_stdout,
    clippy::unwrap_used,
    clippy::disallowed_methods,
    missing_docs
)]

use std::fmt::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Instant;

use jiff::Timestamp;
use policy::{Inventory, InventoryNode, Policy};
use wire::{AttrValue, NodeId};

const NODES: usize = 5000;
const USER_NODES: usize = 3000;
const USERS: usize = 1000;
const GROUPS: usize = 50;
const TAGS: usize = 200;
const RULES: usize = 1000;

struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

fn user(i: usize) -> String {
    format!("user{i}@example.com")
}

fn policy_text(rng: &mut Rng) -> String {
    let mut t = String::from("{\n  \"groups\": {\n");
    for g in 0..GROUPS {
        let members: Vec<String> = (0..USERS / GROUPS)
            .map(|k| format!("\"{}\"", user(g * (USERS / GROUPS) + k)))
            .collect();
        let comma = if g + 1 < GROUPS { "," } else { "" };
        writeln!(t, "    \"group:g{g}\": [{}]{comma}", members.join(", ")).unwrap();
    }
    t.push_str("  },\n  \"tagOwners\": {\n");
    for k in 0..TAGS {
        let comma = if k + 1 < TAGS { "," } else { "" };
        writeln!(t, "    \"tag:t{k}\": [\"group:g{}\"]{comma}", k % GROUPS).unwrap();
    }
    t.push_str(
        "  },\n  \"postures\": {\n    \"posture:managed\": [\"node:os == 'linux'\", \"node:diskEncrypted == true\"],\n    \"posture:edr\": [\"fact:edr IN ['running', 'healthy']\"]\n  },\n  \"acls\": [\n",
    );
    for r in 0..RULES {
        let src = match rng.below(4) {
            0 => format!("\"group:g{}\"", rng.below(GROUPS)),
            1 => format!("\"tag:t{}\"", rng.below(TAGS)),
            2 => format!("\"{}\"", user(rng.below(USERS))),
            _ => format!(
                "\"group:g{}\", \"tag:t{}\"",
                rng.below(GROUPS),
                rng.below(TAGS)
            ),
        };
        let port = 1 + rng.below(60_000);
        let dst = match rng.below(3) {
            0 => format!("\"tag:t{}:{port}\"", rng.below(TAGS)),
            1 => format!(
                "\"tag:t{}:{port},443\", \"tag:t{}:22\"",
                rng.below(TAGS),
                rng.below(TAGS)
            ),
            _ => format!("\"tag:t{}:{port}-{}\"", rng.below(TAGS), port + 10),
        };
        let action = if r % 20 == 19 { "deny" } else { "accept" };
        let mut extra = String::new();
        match rng.below(10) {
            0 => extra.push_str(", \"srcPosture\": [\"posture:managed\"]"),
            1 => extra.push_str(", \"srcPosture\": [\"posture:edr\", \"posture:managed\"]"),
            2 => extra.push_str(
                ", \"when\": {\"days\": [\"mon-fri\"], \"hours\": \"08:00-18:00\", \"timezone\": \"Europe/Berlin\"}",
            ),
            3 => extra.push_str(", \"expires\": \"2026-12-31T00:00:00Z\""),
            _ => {}
        }
        writeln!(
            t,
            "    {{\"action\": \"{action}\", \"src\": [{src}], \"dst\": [{dst}]{extra}}},"
        )
        .unwrap();
    }
    t.push_str("    {\"action\": \"accept\", \"src\": [\"autogroup:member\"], \"dst\": [\"autogroup:self:*\"]},\n  ],\n}\n");
    t
}

fn inventory(rng: &mut Rng) -> Inventory {
    (0..NODES)
        .map(|i| {
            let v4 = Ipv4Addr::from(u32::from(Ipv4Addr::new(100, 64, 0, 0)) + 1 + i as u32);
            let v6 = Ipv6Addr::from(0xfd00_0000_0000_0000_0000_0000_0000_0000u128 + 1 + i as u128);
            let mut attrs = policy::Attrs::new();
            attrs.insert(
                "node:os".into(),
                AttrValue::String(if rng.below(4) == 0 { "macos" } else { "linux" }.into()),
            );
            attrs.insert(
                "node:diskEncrypted".into(),
                AttrValue::Bool(rng.below(3) != 0),
            );
            if rng.below(2) == 0 {
                attrs.insert("fact:edr".into(), AttrValue::String("running".into()));
            }
            let (user_name, tags) = if i < USER_NODES {
                (Some(user(rng.below(USERS))), vec![])
            } else {
                (None, vec![format!("tag:t{}", rng.below(TAGS))])
            };
            InventoryNode {
                routes: Vec::new(),
                id: NodeId(i as u64 + 1),
                name: format!("n{i}"),
                addresses: vec![IpAddr::V4(v4), IpAddr::V6(v6)],
                user: user_name,
                tags,
                attrs,
            }
        })
        .collect()
}

fn main() {
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let text = policy_text(&mut rng);
    let inv = inventory(&mut rng);
    let now: Timestamp = "2026-11-23T00:00:00Z".parse().unwrap();
    println!(
        "policy compile: {NODES} nodes ({USER_NODES} user-owned, {} tagged), {RULES} rules, {} KiB of HuJSON",
        NODES - USER_NODES,
        text.len() / 1024
    );

    let t = Instant::now();
    let p = Policy::check("bench.hujson", &text, now, Some(&inv)).unwrap();
    let check = t.elapsed();

    let t = Instant::now();
    let compiled = p.compile(&inv, now);
    let compile = t.elapsed();

    let t = Instant::now();
    let mut rules = 0usize;
    let mut peers = 0usize;
    let mut max_rules = 0usize;
    for n in inv.iter() {
        let c = compiled.for_node(n.id);
        rules += c.rules.len();
        max_rules = max_rules.max(c.rules.len());
        peers += c.visible_peers.len();
    }
    let extract = t.elapsed();

    let t = Instant::now();
    let one = compiled.for_node(NodeId(1));
    let single = t.elapsed();

    println!(
        "{:<52} {:>10.1} ms",
        "parse + check",
        check.as_secs_f64() * 1e3
    );
    println!(
        "{:<52} {:>10.1} ms",
        "resolve against the inventory (compile)",
        compile.as_secs_f64() * 1e3
    );
    println!(
        "{:<52} {:>10.1} ms",
        "rules + peers for all 5,000 nodes (for_node)",
        extract.as_secs_f64() * 1e3
    );
    println!(
        "{:<52} {:>10.3} ms",
        "rules + peers for one node",
        single.as_secs_f64() * 1e3
    );
    println!(
        "{:<52} {:>10.1} ms",
        "total: a policy change reaching every node",
        (check + compile + extract).as_secs_f64() * 1e3
    );
    println!(
        "per node: {:.1} rules (max {max_rules}), {:.1} visible peers; node n0 has {} rules",
        rules as f64 / NODES as f64,
        peers as f64 / NODES as f64,
        one.rules.len()
    );
}
