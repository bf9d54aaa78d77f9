//! `policy diff`: which source node can newly reach, or no longer reach, which destination
//! node on which protocols and ports, comparing two compiled policies over the same inventory
//! at the same time.

use std::collections::BTreeMap;
use std::fmt;

use jiff::Timestamp;

use crate::ast::{Action, Ports, Proto};
use crate::compile::CompiledPolicy;
use crate::eval::{Subject, rule_time_ok};

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
    let mut out = PolicyDiff::default();
    let nodes = new.nodes();
    for s in nodes {
        for d in nodes {
            if s.id == d.id {
                continue;
            }
            let a = access(old, s, d, at);
            let b = access(new, s, d, at);
            let gained = b.minus(&a);
            let lost = a.minus(&b);
            if !gained.is_empty() {
                out.gained.push(Change {
                    src: s.name.clone(),
                    dst: d.name.clone(),
                    access: gained,
                });
            }
            if !lost.is_empty() {
                out.lost.push(Change {
                    src: s.name.clone(),
                    dst: d.name.clone(),
                    access: lost,
                });
            }
        }
    }
    out
}

const PORT_PROTOS: [u8; 3] = [6, 17, 132];
const OTHER_PROTOS: [u8; 2] = [1, 58];

fn access(
    c: &CompiledPolicy,
    s: &crate::InventoryNode,
    d: &crate::InventoryNode,
    at: Timestamp,
) -> Access {
    let file = c.file();
    let src = Subject {
        user: s.user.as_deref(),
        tags: &s.tags,
        ips: &s.addresses,
        attrs: &s.attrs,
    };
    let dst = Subject {
        user: d.user.as_deref(),
        tags: &d.tags,
        ips: &d.addresses,
        attrs: &d.attrs,
    };
    let mut allow: BTreeMap<u8, Vec<(u16, u16)>> = BTreeMap::new();
    let mut deny: BTreeMap<u8, Vec<(u16, u16)>> = BTreeMap::new();
    let mut other_allow = Vec::new();
    let mut other_deny = Vec::new();
    for rule in &file.rules {
        if !rule_time_ok(rule, at) || !file.src_matches(rule, &src) {
            continue;
        }
        let ports: Vec<&Ports> = file.dst_ports(rule, &src, &dst);
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
