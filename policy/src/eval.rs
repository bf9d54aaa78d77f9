//! Deciding single connections: selector and posture matching, deny-wins precedence, time, and
//! the `tests` section. The compiler uses the same matching, so tests describe what nodes
//! enforce.
//!
//! Precedence (documented for admins): a connection is allowed when at least one `accept` rule
//! matches it and no `deny` rule does. Rule order does not matter. A rule matches when the
//! source matches one of `src`, satisfies one of the rule's postures (or the default
//! postures), the destination and port match one of `dst`, the protocol is covered, and the
//! time is inside the rule's window and validity period.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::net::IpAddr;

use jiff::Timestamp;
use wire::AttrValue;

use crate::ast::{Action, Attrs, Condition, Op, PolicyFile, Ports, Rule, Selector, SshUser};
use crate::error::Diagnostic;
use crate::inventory::Inventory;

/// A node, real or hypothetical, as rules see it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Subject<'a> {
    pub(crate) user: Option<&'a str>,
    pub(crate) tags: &'a [String],
    pub(crate) ips: &'a [IpAddr],
    pub(crate) attrs: &'a Attrs,
}

impl crate::inventory::InventoryNode {
    /// The node as rules see it.
    pub(crate) fn subject(&self) -> Subject<'_> {
        Subject {
            user: self.user.as_deref(),
            tags: &self.tags,
            ips: &self.addresses,
            attrs: &self.attrs,
        }
    }
}

/// The attribute the coordinator sets on the nodes of the mesh's admins (`autogroup:admin`).
pub const ROLE_ADMIN: &str = "user:admin";
/// The attribute the coordinator sets on the nodes of the mesh's owner (`autogroup:owner`).
pub const ROLE_OWNER: &str = "user:owner";

/// Whether subject `s` is a user-owned node whose user has role attribute `attr`.
fn role(s: &Subject<'_>, attr: &str) -> bool {
    s.user.is_some() && s.tags.is_empty() && s.attrs.get(attr) == Some(&AttrValue::Bool(true))
}

/// The attribute the coordinator sets on a user-owned node for each of its user's identity
/// provider groups.
pub fn idp_group_attr(group: &str) -> String {
    format!("idp:group:{group}")
}

/// The outcome for one connection.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Decision<'a> {
    Accept(&'a Rule),
    Deny(&'a Rule),
    NoRule,
}

impl PolicyFile {
    pub(crate) fn selector_matches(&self, sel: &Selector, s: &Subject<'_>) -> bool {
        match sel {
            Selector::Any => true,
            Selector::User(u) => s.user == Some(u.as_str()),
            Selector::UserDomain(d) => s.user.is_some_and(|u| {
                u.rsplit_once('@')
                    .is_some_and(|(_, ud)| ud.eq_ignore_ascii_case(d))
            }),
            Selector::Group(g) => s
                .user
                .is_some_and(|u| self.groups.get(g).is_some_and(|m| m.iter().any(|x| x == u))),
            Selector::IdpGroup(g) => {
                s.user.is_some()
                    && s.tags.is_empty()
                    && s.attrs.get(&idp_group_attr(g)) == Some(&AttrValue::Bool(true))
            }
            Selector::Tag(t) => s.tags.iter().any(|x| x == t),
            Selector::Prefix(net) => s.ips.iter().any(|ip| net.contains(ip)),
            Selector::Member => s.user.is_some() && s.tags.is_empty(),
            Selector::Tagged => !s.tags.is_empty(),
            Selector::Admin => role(s, ROLE_ADMIN),
            Selector::Owner => role(s, ROLE_OWNER),
            // Needs the source; see `dst_ports`.
            Selector::SelfNodes => false,
            // Not a node: the internet behind exit nodes (see `compile`).
            Selector::Internet => false,
        }
    }

    /// What the `nodeAttrs` entries targeting `node` give it: attributes (no values) and app
    /// capabilities (values merged in order, without repeats).
    pub(crate) fn node_caps(
        &self,
        node: &crate::InventoryNode,
    ) -> BTreeMap<String, Vec<serde_json::Value>> {
        let subject = node.subject();
        let mut caps: BTreeMap<String, Vec<serde_json::Value>> = BTreeMap::new();
        for entry in &self.node_attrs {
            if !entry
                .targets
                .iter()
                .any(|t| self.selector_matches(t, &subject))
            {
                continue;
            }
            for a in &entry.attrs {
                caps.entry(a.clone()).or_default();
            }
            for (name, values) in &entry.app {
                let have = caps.entry(name.clone()).or_default();
                for v in values {
                    if !have.contains(v) {
                        have.push(v.clone());
                    }
                }
            }
        }
        caps
    }

    pub(crate) fn posture_ok(&self, rule: &Rule, attrs: &Attrs) -> bool {
        let names = if rule.src_posture.is_empty() {
            &self.default_src_posture
        } else {
            &rule.src_posture
        };
        names.is_empty()
            || names.iter().any(|n| {
                self.postures
                    .get(n)
                    .is_some_and(|conds| conds.iter().all(|c| condition_holds(c, attrs)))
            })
    }

    pub(crate) fn src_matches(&self, rule: &Rule, src: &Subject<'_>) -> bool {
        rule.src.iter().any(|s| self.selector_matches(s, src)) && self.posture_ok(rule, src.attrs)
    }

    /// The port sets of `rule`'s destinations that `dst` matches (for a connection from `src`).
    pub(crate) fn dst_ports<'r>(
        &self,
        rule: &'r Rule,
        src: &Subject<'_>,
        dst: &Subject<'_>,
    ) -> Vec<&'r Ports> {
        rule.dst
            .iter()
            .filter(|d| match &d.sel {
                Selector::SelfNodes => {
                    src.user.is_some()
                        && src.tags.is_empty()
                        && dst.tags.is_empty()
                        && dst.user == src.user
                }
                other => self.selector_matches(other, dst),
            })
            .map(|d| &d.ports)
            .collect()
    }

    pub(crate) fn decide(
        &self,
        src: &Subject<'_>,
        dst: &Subject<'_>,
        proto: u8,
        port: u16,
        at: Timestamp,
    ) -> Decision<'_> {
        let port_protocol = matches!(proto, 6 | 17 | 132);
        let matches = |r: &Rule| {
            // App grants admit no packet.
            r.caps.is_none()
                && r.proto.covers(proto)
                && rule_time_ok(r, at)
                && self.src_matches(r, src)
                && self
                    .dst_ports(r, src, dst)
                    .iter()
                    .any(|p| !port_protocol || p.contains(port))
        };
        if let Some(r) = self
            .rules
            .iter()
            .find(|r| r.action == Action::Deny && matches(r))
        {
            return Decision::Deny(r);
        }
        self.rules
            .iter()
            .find(|r| r.action == Action::Accept && matches(r))
            .map_or(Decision::NoRule, Decision::Accept)
    }

    /// Runs the `tests` section at `now` (unless a test sets its own time). With an inventory,
    /// users and tags in tests also carry the addresses of their nodes, so address-based rules
    /// apply to them.
    pub(crate) fn run_tests(
        &self,
        now: Timestamp,
        inventory: Option<&Inventory>,
    ) -> Vec<Diagnostic> {
        let mut out = Vec::new();
        for t in &self.tests {
            let at = t.at.unwrap_or(now);
            let protos = t.proto.clone().unwrap_or_else(|| vec![6]);
            for (src_user, src_tags, src_ips) in self.identities(&t.src.1, inventory) {
                let src = Subject {
                    user: src_user.as_deref(),
                    tags: &src_tags,
                    ips: &src_ips,
                    attrs: &t.src_attrs,
                };
                for (expect_accept, entries) in [(true, &t.accept), (false, &t.deny)] {
                    for (pos, text, dst) in entries {
                        for (dst_user, dst_tags, dst_ips) in self.identities(&dst.sel, inventory) {
                            let no_attrs = Attrs::new();
                            let d = Subject {
                                user: dst_user.as_deref(),
                                tags: &dst_tags,
                                ips: &dst_ips,
                                attrs: &no_attrs,
                            };
                            for &proto in &protos {
                                for port in sample_ports(&dst.ports) {
                                    let decision = self.decide(&src, &d, proto, port, at);
                                    if let Some(msg) =
                                        failure(expect_accept, decision, &t.src_text, text, proto)
                                    {
                                        out.push(Diagnostic::new(*pos, msg));
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        out.extend(self.run_ssh_tests(inventory));
        out.sort();
        out.dedup();
        out
    }

    /// Runs the `sshTests` against the `ssh` rules (never against the acls: SSH access is
    /// its own grant).
    fn run_ssh_tests(&self, inventory: Option<&Inventory>) -> Vec<Diagnostic> {
        let mut out = Vec::new();
        let no_attrs = Attrs::new();
        for t in &self.ssh_tests {
            for (src_user, src_tags, src_ips) in self.identities(&t.src, inventory) {
                let src = Subject {
                    user: src_user.as_deref(),
                    tags: &src_tags,
                    ips: &src_ips,
                    attrs: &no_attrs,
                };
                for (dst_text, dst_sel) in &t.dst {
                    for (dst_user, dst_tags, dst_ips) in self.ssh_targets(dst_sel, inventory) {
                        let dst = Subject {
                            user: dst_user.as_deref(),
                            tags: &dst_tags,
                            ips: &dst_ips,
                            attrs: &no_attrs,
                        };
                        for (expect, users) in [(true, &t.accept), (false, &t.deny)] {
                            for login in users {
                                if self.ssh_allows(&src, &dst, login) != expect {
                                    out.push(Diagnostic::new(
                                        t.pos,
                                        format!(
                                            "ssh test failed: {} -> {dst_text} as {login:?} should be {}",
                                            t.src_text,
                                            if expect { "allowed" } else { "refused" }
                                        ),
                                    ));
                                }
                            }
                        }
                    }
                }
            }
        }
        out
    }

    /// The nodes an ssh test's destination names; an address names the node holding it.
    #[allow(clippy::type_complexity)]
    fn ssh_targets(
        &self,
        sel: &Selector,
        inventory: Option<&Inventory>,
    ) -> Vec<(Option<String>, Vec<String>, Vec<IpAddr>)> {
        if let (Selector::Prefix(net), Some(inv)) = (sel, inventory)
            && let Some(n) = inv
                .iter()
                .find(|n| n.addresses.iter().any(|a| net.contains(a)))
        {
            let user = n.user.clone().filter(|_| n.tags.is_empty());
            return vec![(user, n.tags.clone(), n.addresses.clone())];
        }
        self.identities(sel, inventory)
    }

    /// Whether an `ssh` rule lets `src` log in to `dst` as `login` (`accept` or `check`).
    fn ssh_allows(&self, src: &Subject<'_>, dst: &Subject<'_>, login: &str) -> bool {
        self.ssh_rules.iter().any(|r| {
            r.src.iter().any(|s| self.selector_matches(s, src))
                && r.dst.iter().any(|d| match d {
                    Selector::SelfNodes => {
                        src.user.is_some()
                            && src.tags.is_empty()
                            && dst.tags.is_empty()
                            && dst.user == src.user
                    }
                    d => self.selector_matches(d, dst),
                })
                && r.users.iter().any(|u| match u {
                    SshUser::Name(n) => n == login,
                    SshUser::NonRoot => login != "root",
                    SshUser::LocalPart(domain) => src
                        .user
                        .and_then(|e| e.rsplit_once('@'))
                        .is_some_and(|(local, d)| d.eq_ignore_ascii_case(domain) && local == login),
                })
        })
    }

    /// The concrete identities a test names: one per member for a group.
    #[allow(clippy::type_complexity)]
    fn identities(
        &self,
        sel: &Selector,
        inventory: Option<&Inventory>,
    ) -> Vec<(Option<String>, Vec<String>, Vec<IpAddr>)> {
        let ips_of = |f: &dyn Fn(&crate::InventoryNode) -> bool| -> Vec<IpAddr> {
            inventory
                .map(|inv| {
                    inv.iter()
                        .filter(|n| f(n))
                        .flat_map(|n| n.addresses.clone())
                        .collect()
                })
                .unwrap_or_default()
        };
        match sel {
            Selector::User(u) => vec![(
                Some(u.clone()),
                vec![],
                ips_of(&|n| n.user.as_deref() == Some(u.as_str()) && n.tags.is_empty()),
            )],
            Selector::Group(g) => self
                .groups
                .get(g)
                .map(|members| {
                    members
                        .iter()
                        .map(|u| {
                            (
                                Some(u.clone()),
                                vec![],
                                ips_of(&|n| {
                                    n.user.as_deref() == Some(u.as_str()) && n.tags.is_empty()
                                }),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default(),
            Selector::Tag(t) => vec![(None, vec![t.clone()], ips_of(&|n| n.tags.contains(t)))],
            Selector::Prefix(net) => vec![(None, vec![], vec![net.network()])],
            _ => Vec::new(),
        }
    }
}

fn sample_ports(p: &Ports) -> Vec<u16> {
    match p {
        Ports::Any => vec![0],
        Ports::Ranges(r) => {
            let mut v: Vec<u16> = r.iter().flat_map(|(a, b)| [*a, *b]).collect();
            v.dedup();
            v
        }
    }
}

fn failure(
    expect_accept: bool,
    decision: Decision<'_>,
    src: &str,
    dst: &str,
    proto: u8,
) -> Option<String> {
    let what = format!("test failed: {src} -> {dst} ({})", proto_name(proto));
    match (expect_accept, decision) {
        (true, Decision::Accept(_)) | (false, Decision::Deny(_) | Decision::NoRule) => None,
        (true, Decision::Deny(r)) => Some(format!(
            "{what} should be accepted, but the deny rule at {} denies it",
            r.origin
        )),
        (true, Decision::NoRule) => {
            Some(format!("{what} should be accepted, but no rule accepts it"))
        }
        (false, Decision::Accept(r)) => Some(format!(
            "{what} should be denied, but the rule at {} accepts it",
            r.origin
        )),
    }
}

fn proto_name(p: u8) -> String {
    match p {
        1 => "icmp".into(),
        6 => "tcp".into(),
        17 => "udp".into(),
        58 => "icmpv6".into(),
        132 => "sctp".into(),
        n => format!("proto {n}"),
    }
}

/// Whether the rule applies at `at` (validity period and window).
pub(crate) fn rule_time_ok(rule: &Rule, at: Timestamp) -> bool {
    rule.not_before.is_none_or(|t| at >= t)
        && rule.expires.is_none_or(|t| at < t)
        && rule.when.as_ref().is_none_or(|w| w.contains(at))
}

/// Evaluates one posture condition; a missing attribute satisfies only `NOT SET`.
pub(crate) fn condition_holds(c: &Condition, attrs: &Attrs) -> bool {
    let key = if c.attr == "node:tsVersion" {
        "node:clientVersion"
    } else {
        c.attr.as_str()
    };
    let value = attrs.get(key).or_else(|| attrs.get(&c.attr));
    match (c.op, value) {
        (Op::IsSet, v) => v.is_some(),
        (Op::NotSet, v) => v.is_none(),
        (_, None) => false,
        (Op::Eq, Some(v)) => c
            .values
            .first()
            .is_some_and(|w| compare(v, w) == Some(Ordering::Equal)),
        (Op::Ne, Some(v)) => c
            .values
            .first()
            .is_some_and(|w| compare(v, w) != Some(Ordering::Equal)),
        (Op::In, Some(v)) => c
            .values
            .iter()
            .any(|w| compare(v, w) == Some(Ordering::Equal)),
        (Op::NotIn, Some(v)) => c
            .values
            .iter()
            .all(|w| compare(v, w) != Some(Ordering::Equal)),
        (op, Some(v)) => {
            let Some(ord) = c.values.first().and_then(|w| compare(v, w)) else {
                return false;
            };
            match op {
                Op::Lt => ord == Ordering::Less,
                Op::Le => ord != Ordering::Greater,
                Op::Gt => ord == Ordering::Greater,
                Op::Ge => ord != Ordering::Less,
                _ => false,
            }
        }
    }
}

/// Compares an attribute with a condition value: numbers numerically, booleans as booleans,
/// strings that look like versions component by component, other strings exactly.
fn compare(a: &AttrValue, b: &AttrValue) -> Option<Ordering> {
    match (a, b) {
        (AttrValue::Number(x), AttrValue::Number(y)) => x.partial_cmp(y),
        (AttrValue::Bool(x), AttrValue::Bool(y)) => Some(x.cmp(y)),
        (AttrValue::String(x), AttrValue::String(y)) => Some(version_cmp(x, y)),
        // A string against a number or boolean: compare if the string reads as one.
        (AttrValue::String(s), other) => match AttrValue::from_text(s) {
            AttrValue::String(_) => None,
            typed => compare(&typed, other),
        },
        (other, AttrValue::String(s)) => match AttrValue::from_text(s) {
            AttrValue::String(_) => None,
            typed => compare(other, &typed),
        },
        _ => None,
    }
}

/// `1.10.2` > `1.9`; non-numeric parts compare as text; equal strings are equal.
fn version_cmp(a: &str, b: &str) -> Ordering {
    if a == b {
        return Ordering::Equal;
    }
    let split = |s: &str| {
        s.split(['.', '-', '+', '_'])
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    let (pa, pb) = (split(a), split(b));
    for i in 0..pa.len().max(pb.len()) {
        let (x, y) = (pa.get(i), pb.get(i));
        let ord = match (x, y) {
            (None, _) => Ordering::Less,
            (_, None) => Ordering::Greater,
            (Some(x), Some(y)) => match (x.parse::<u64>(), y.parse::<u64>()) {
                (Ok(m), Ok(n)) => m.cmp(&n),
                _ => x.cmp(y),
            },
        };
        if ord != Ordering::Equal {
            return ord;
        }
    }
    a.cmp(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_compare_by_component() {
        assert_eq!(version_cmp("1.10.2", "1.9"), Ordering::Greater);
        assert_eq!(version_cmp("6.18.44", "6.18.44"), Ordering::Equal);
        assert_eq!(version_cmp("13.4", "13.4.0"), Ordering::Less);
        assert_eq!(version_cmp("1.40-rc1", "1.40"), Ordering::Greater);
    }

    #[test]
    fn conditions_coerce_sensibly() {
        let mut attrs = Attrs::new();
        attrs.insert("fact:ok".into(), AttrValue::String("true".into()));
        attrs.insert(
            "node:clientVersion".into(),
            AttrValue::String("0.1.0".into()),
        );
        attrs.insert("fact:n".into(), AttrValue::Number(7.0));
        let c = |s: &str| crate::parse::parse_condition(s).unwrap();
        assert!(condition_holds(&c("fact:ok == true"), &attrs));
        assert!(!condition_holds(&c("fact:ok == false"), &attrs));
        assert!(condition_holds(&c("node:tsVersion >= '0.1'"), &attrs));
        assert!(condition_holds(&c("fact:n > 5"), &attrs));
        assert!(condition_holds(&c("fact:n IN [6, 7]"), &attrs));
        assert!(condition_holds(&c("fact:missing NOT SET"), &attrs));
        assert!(
            !condition_holds(&c("fact:missing != 'x'"), &attrs),
            "a missing attribute fails comparisons"
        );
        assert!(!condition_holds(&c("fact:n == 'seven'"), &attrs));
    }
}
