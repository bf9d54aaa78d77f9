//! `policy diff`: which source node can newly reach, or no longer reach, which destination
//! node on which protocols and ports, comparing two compiled policies over the same inventory
//! at the same time.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use jiff::Timestamp;

use crate::Policy;
use crate::ast::{Action, PolicyFile, Ports, Proto, Selector};
use crate::compile::CompiledPolicy;
use crate::eval::rule_time_ok;
use crate::inventory::{Inventory, InventoryNode};

/// Access from one node to another, by protocol.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Access {
    /// Port intervals per port-carrying protocol (6, 17, 132).
    pub ports: BTreeMap<u8, Vec<(u16, u16)>>,
    /// Protocols without ports that are allowed (ICMP and others).
    pub other: Vec<u8>,
}

impl Access {
    fn is_empty(&self) -> bool {
        self.ports.values().all(Vec::is_empty) && self.other.is_empty()
    }

    fn minus(&self, other: &Self) -> Self {
        let mut out = Self::default();
        for (p, ranges) in &self.ports {
            let empty = Vec::new();
            let rest = subtract(ranges, other.ports.get(p).unwrap_or(&empty));
            if !rest.is_empty() {
                out.ports.insert(*p, rest);
            }
        }
        out.other = self
            .other
            .iter()
            .filter(|p| !other.other.contains(p))
            .copied()
            .collect();
        out
    }
}

impl fmt::Display for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        for (p, ranges) in &self.ports {
            let r: Vec<String> = ranges
                .iter()
                .map(|(a, b)| {
                    if a == b {
                        a.to_string()
                    } else if *a == 0 && *b == u16::MAX {
                        "*".into()
                    } else {
                        format!("{a}-{b}")
                    }
                })
                .collect();
            parts.push(format!("{} {}", proto_name(*p), r.join(",")));
        }
        if self.other.len() > 128 {
            // Most protocols: name the ones left out instead.
            let missing: Vec<String> = (0..=255u8)
                .filter(|p| !PORT_PROTOS.contains(p) && !self.other.contains(p))
                .map(proto_name)
                .collect();
            if missing.is_empty() {
                parts.push("every other protocol".into());
            } else {
                parts.push(format!(
                    "every other protocol except {}",
                    missing.join(", ")
                ));
            }
        } else {
            for p in &self.other {
                parts.push(proto_name(*p));
            }
        }
        f.write_str(&parts.join("; "))
    }
}

/// One line of a diff.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// Source node name.
    pub src: String,
    /// Destination node name.
    pub dst: String,
    /// What changed.
    pub access: Access,
}

/// The result of `policy diff`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicyDiff {
    /// Access the new policy grants that the old one did not.
    pub gained: Vec<Change>,
    /// Access the old policy granted that the new one does not.
    pub lost: Vec<Change>,
}

/// Compares `old` and `new` (compiled over the same inventory) at `at`.
pub fn diff(old: &CompiledPolicy, new: &CompiledPolicy, at: Timestamp) -> PolicyDiff {
    let nodes: Vec<&InventoryNode> = new.nodes().iter().collect();
    diff_files(old.file(), new.file(), &nodes, at)
}

/// Compares two policies over `inventory` at `at`, without compiling either.
pub fn diff_policies(
    old: &Policy,
    new: &Policy,
    inventory: &Inventory,
    at: Timestamp,
) -> PolicyDiff {
    let nodes: Vec<&InventoryNode> = inventory.iter().collect();
    diff_files(old.file(), new.file(), &nodes, at)
}

/// What the rules of one file see of a node: per rule in force, whether the node matches its
/// source (with posture), then per destination entry whether the node matches it. Nodes
/// that look the same to both files (one class) have the same access to and from everyone,
/// up to `autogroup:self`, which also depends on whether the two share a user.
fn view(file: &PolicyFile, n: &InventoryNode, at: Timestamp, out: &mut Vec<bool>) {
    let me = n.subject();
    for rule in &file.rules {
        let live = rule_time_ok(rule, at);
        out.push(live && file.src_matches(rule, &me));
        out.extend(
            rule.dst
                .iter()
                .map(|d| live && file.selector_matches(&d.sel, &me)),
        );
    }
}

/// `autogroup:self` applies between two different nodes of one user, neither tagged.
fn same_owner(s: &InventoryNode, d: &InventoryNode) -> bool {
    s.user.is_some() && s.tags.is_empty() && d.tags.is_empty() && s.user == d.user
}

/// The work is proportional to the number of node classes squared plus the size of the
/// result, not to the number of node pairs: pairs of classes are compared once, and only
/// the pairs whose access changed are listed.
fn diff_files(
    old: &PolicyFile,
    new: &PolicyFile,
    nodes: &[&InventoryNode],
    at: Timestamp,
) -> PolicyDiff {
    let old_len: usize = old.rules.iter().map(|r| 1 + r.dst.len()).sum();
    let mut classes: HashMap<Vec<bool>, usize> = HashMap::new();
    let mut members: Vec<Vec<usize>> = Vec::new();
    let mut sigs: Vec<Vec<bool>> = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        let mut sig = Vec::with_capacity(old_len * 2);
        view(old, n, at, &mut sig);
        view(new, n, at, &mut sig);
        let next = classes.len();
        let c = *classes.entry(sig.clone()).or_insert(next);
        if c == next {
            members.push(Vec::new());
            sigs.push(sig);
        }
        members[c].push(i);
    }
    let change = |cs: usize, cd: usize, same: bool| {
        let (s_old, s_new) = sigs[cs].split_at(old_len);
        let (d_old, d_new) = sigs[cd].split_at(old_len);
        let a = class_access(old, s_old, d_old, same);
        let b = class_access(new, s_new, d_new, same);
        (b.minus(&a), a.minus(&b))
    };
    let has_self = [old, new].iter().any(|f| {
        f.rules
            .iter()
            .any(|r| r.dst.iter().any(|d| d.sel == Selector::SelfNodes))
    });
    // Per source class, every destination (with the index of its class pair's change in
    // `changed`) whose access from that class changed, for pairs with different owners and
    // for pairs sharing one.
    let mut changed = Vec::new();
    let mut listed_for = Vec::with_capacity(members.len());
    for cs in 0..members.len() {
        let mut dsts: Vec<(usize, usize)> = Vec::new();
        for (cd, dst_members) in members.iter().enumerate() {
            let other = change(cs, cd, false);
            let same = if has_self {
                change(cs, cd, true)
            } else {
                other.clone()
            };
            let pair = [other, same];
            if pair.iter().any(|(g, l)| !g.is_empty() || !l.is_empty()) {
                dsts.extend(dst_members.iter().map(|&d| (d, changed.len())));
                changed.push(pair);
            }
        }
        listed_for.push(dsts);
    }
    let mut gained = Vec::new();
    let mut lost = Vec::new();
    for (src_members, dsts) in members.iter().zip(&listed_for) {
        for &s in src_members {
            for &(d, k) in dsts {
                if s == d {
                    continue;
                }
                let (g, l) = &changed[k][usize::from(same_owner(nodes[s], nodes[d]))];
                for (list, access) in [(&mut gained, g), (&mut lost, l)] {
                    if !access.is_empty() {
                        list.push((s, d, access));
                    }
                }
            }
        }
    }
    // Source by source, each source's destinations in node order.
    let listed = |mut v: Vec<(usize, usize, &Access)>| {
        v.sort_unstable_by_key(|&(s, d, _)| (s, d));
        v.into_iter()
            .map(|(s, d, a)| Change {
                src: nodes[s].name.clone(),
                dst: nodes[d].name.clone(),
                access: a.clone(),
            })
            .collect()
    };
    PolicyDiff {
        gained: listed(gained),
        lost: listed(lost),
    }
}

const PORT_PROTOS: [u8; 3] = [6, 17, 132];
const OTHER_PROTOS: [u8; 2] = [1, 58];

/// Access from a node of the source class to one of the destination class, given what
/// `file`'s rules see of each (`view`), and whether the two share an owner.
fn class_access(file: &PolicyFile, src: &[bool], dst: &[bool], same_owner: bool) -> Access {
    let mut allow: BTreeMap<u8, Vec<(u16, u16)>> = BTreeMap::new();
    let mut deny: BTreeMap<u8, Vec<(u16, u16)>> = BTreeMap::new();
    let mut other_allow = Vec::new();
    let mut other_deny = Vec::new();
    let mut at = 0;
    for rule in &file.rules {
        let (src_ok, entries) = (src[at], at + 1);
        at += 1 + rule.dst.len();
        // App grants change no network access.
        if !src_ok || rule.caps.is_some() {
            continue;
        }
        let ports: Vec<&Ports> = rule
            .dst
            .iter()
            .enumerate()
            .filter(|(k, d)| match d.sel {
                Selector::SelfNodes => same_owner,
                _ => dst[entries + k],
            })
            .map(|(_, d)| &d.ports)
            .collect();
        if ports.is_empty() {
            continue;
        }
        let (map, other) = match rule.action {
            Action::Accept => (&mut allow, &mut other_allow),
            Action::Deny => (&mut deny, &mut other_deny),
        };
        for p in PORT_PROTOS {
            if rule.proto.covers(p) {
                let entry = map.entry(p).or_default();
                for ps in &ports {
                    entry.extend(ps.ranges());
                }
            }
        }
        let others: Vec<u8> = match &rule.proto {
            Proto::List(l) => l
                .iter()
                .copied()
                .filter(|p| !PORT_PROTOS.contains(p))
                .collect(),
            Proto::Default => OTHER_PROTOS.to_vec(),
            Proto::All => (0..=255u8).filter(|p| !PORT_PROTOS.contains(p)).collect(),
        };
        other.extend(others);
    }
    let mut a = Access::default();
    for (p, ranges) in allow {
        let empty = Vec::new();
        let rest = subtract(
            &merge(ranges),
            &merge(deny.get(&p).unwrap_or(&empty).clone()),
        );
        if !rest.is_empty() {
            a.ports.insert(p, rest);
        }
    }
    other_allow.sort_unstable();
    other_allow.dedup();
    a.other = other_allow
        .into_iter()
        .filter(|p| !other_deny.contains(p))
        .collect();
    a
}

fn merge(mut r: Vec<(u16, u16)>) -> Vec<(u16, u16)> {
    r.sort_unstable();
    let mut out: Vec<(u16, u16)> = Vec::new();
    for (a, b) in r {
        match out.last_mut() {
            Some(last) if u32::from(a) <= u32::from(last.1) + 1 => last.1 = last.1.max(b),
            _ => out.push((a, b)),
        }
    }
    out
}

fn subtract(a: &[(u16, u16)], b: &[(u16, u16)]) -> Vec<(u16, u16)> {
    let mut out = Vec::new();
    for &(mut lo, hi) in &merge(a.to_vec()) {
        let mut done = false;
        for &(blo, bhi) in &merge(b.to_vec()) {
            if bhi < lo || blo > hi {
                continue;
            }
            if blo > lo {
                out.push((lo, blo - 1));
            }
            if bhi >= hi {
                done = true;
                break;
            }
            lo = bhi + 1;
        }
        if !done {
            out.push((lo, hi));
        }
    }
    out
}

fn proto_name(p: u8) -> String {
    match p {
        1 => "icmp".into(),
        2 => "igmp".into(),
        4 => "ipip".into(),
        6 => "tcp".into(),
        17 => "udp".into(),
        47 => "gre".into(),
        50 => "esp".into(),
        51 => "ah".into(),
        58 => "icmpv6".into(),
        132 => "sctp".into(),
        n => format!("proto-{n}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn most_protocols_are_named_by_what_is_left_out() {
        let mut a = Access {
            other: (0..=255u8).filter(|p| !PORT_PROTOS.contains(p)).collect(),
            ..Access::default()
        };
        assert_eq!(a.to_string(), "every other protocol");
        a.other.retain(|p| *p != 1 && *p != 58);
        assert_eq!(a.to_string(), "every other protocol except icmp, icmpv6");
        a.other = vec![1, 47];
        assert_eq!(a.to_string(), "icmp; gre");
    }

    #[test]
    fn interval_subtraction() {
        assert_eq!(
            subtract(&[(0, 100)], &[(10, 20), (50, 100)]),
            vec![(0, 9), (21, 49)]
        );
        assert_eq!(subtract(&[(22, 22)], &[(0, 65535)]), vec![]);
        assert_eq!(subtract(&[(0, 65535)], &[]), vec![(0, 65535)]);
        assert_eq!(
            merge(vec![(5, 9), (0, 4), (20, 30)]),
            vec![(0, 9), (20, 30)]
        );
    }
}
