//! Compiling a policy for the current inventory: per-node inbound rules and peer visibility.
//!
//! [`Policy::compile`] resolves every rule once against the inventory (which nodes match its
//! sources, including their postures; which nodes match each destination); extracting one
//! node's rules and peers is then a walk over the rules that name it.
//!
//! Time: a rule with a validity period is sent with that exact period; a rule with a recurring
//! window is sent as the absolute ranges the window covers over the next [`HORIZON`], and the
//! coordinator recompiles daily, so nodes enforce windows without a time-zone database and keep
//! enforcing them (failing closed after the horizon) while the coordinator is away.

use std::collections::BTreeSet;
use std::time::Duration;

use ipnet::IpNet;
use jiff::Timestamp;
use wire::NodeId;
use wire::filter::{Action as WireAction, DstPorts, FilterRule, IpProto, PortRange, ValidRange};

use crate::Policy;
use crate::ast::{Action, PolicyFile, Ports, Proto, Rule, Selector};
use crate::eval::Subject;
use crate::inventory::{Inventory, InventoryNode};

/// How far ahead recurring windows are resolved.
pub const HORIZON: Duration = Duration::from_secs(14 * 24 * 3600);

/// What one node receives from the policy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Compiled {
    /// Inbound rules the node enforces.
    pub rules: Vec<FilterRule>,
    /// Peers the node may talk to or be reached by; all others are invisible to it.
    pub visible_peers: BTreeSet<NodeId>,
}

struct RuleSets {
    /// Index into the policy's rules.
    rule: usize,
    /// Nodes (indices into `nodes`) whose traffic the rule's sources cover, postures applied.
    src: Vec<bool>,
    /// Address prefixes in `src` that are not nodes (`*`, CIDRs, hosts).
    src_prefixes: Vec<IpNet>,
    /// For each destination entry: which nodes it covers (empty for `autogroup:self`).
    dst: Vec<Vec<bool>>,
    /// `None`: always; otherwise only inside these ranges (never empty).
    valid: Option<Vec<ValidRange>>,
}

/// A policy resolved against one inventory at one time.
pub struct CompiledPolicy {
    file: PolicyFile,
    nodes: Vec<InventoryNode>,
    sets: Vec<RuleSets>,
}

impl Policy {
    /// Resolves the policy against `inventory` at `now`.
    pub fn compile(&self, inventory: &Inventory, now: Timestamp) -> CompiledPolicy {
        let file = self.file().clone();
        let nodes: Vec<InventoryNode> = inventory.iter().cloned().collect();
        let horizon_end = now
            .checked_add(jiff::SignedDuration::try_from(HORIZON).unwrap_or_default())
            .unwrap_or(now);
        let mut sets = Vec::new();
        for (i, rule) in file.rules.iter().enumerate() {
            let valid = validity(rule, now, horizon_end);
            if valid.as_ref().is_some_and(Vec::is_empty) {
                continue; // expired, or no window in the horizon
            }
            let src: Vec<bool> = nodes
                .iter()
                .map(|n| file.src_matches(rule, &subject(n)))
                .collect();
            // A posture can only be proven by a node: with a posture required, raw prefixes
            // contribute only the nodes inside them that pass it (already in `src`).
            let postured = !rule.src_posture.is_empty() || !file.default_src_posture.is_empty();
            let src_prefixes = if postured {
                Vec::new()
            } else {
                rule.src
                    .iter()
                    .flat_map(|s| match s {
                        Selector::Any => vec![any_v4(), any_v6()],
                        Selector::Prefix(p) => vec![*p],
                        _ => vec![],
                    })
                    .collect()
            };
            let dst = rule
                .dst
                .iter()
                .map(|d| match &d.sel {
                    Selector::SelfNodes => vec![false; nodes.len()],
                    sel => nodes
                        .iter()
                        .map(|n| file.selector_matches(sel, &subject(n)))
                        .collect(),
                })
                .collect();
            sets.push(RuleSets {
                rule: i,
                src,
                src_prefixes,
                dst,
                valid,
            });
        }
        CompiledPolicy { file, nodes, sets }
    }
}

fn subject(n: &InventoryNode) -> Subject<'_> {
    Subject {
        user: n.user.as_deref(),
        tags: &n.tags,
        ips: &n.addresses,
        attrs: &n.attrs,
    }
}

impl CompiledPolicy {
    /// The rules and peers of node `me`. A node unknown to the inventory gets nothing.
    pub fn for_node(&self, me: NodeId) -> Compiled {
        let Some(mi) = self.nodes.iter().position(|n| n.id == me) else {
            return Compiled::default();
        };
        let node = &self.nodes[mi];
        let mut rules = Vec::new();
        let mut visible = vec![false; self.nodes.len()];
        for set in &self.sets {
            let rule = &self.file.rules[set.rule];
            let accept = rule.action == Action::Accept;
            // Inbound: the destination entries that name this node.
            let mut ports: Vec<&Ports> = Vec::new();
            let mut self_ports: Vec<&Ports> = Vec::new();
            for (d, covered) in rule.dst.iter().zip(&set.dst) {
                if matches!(d.sel, Selector::SelfNodes) {
                    if node.user.is_some() && node.tags.is_empty() {
                        self_ports.push(&d.ports);
                    }
                } else if covered[mi] {
                    ports.push(&d.ports);
                }
            }
            let src_nodes: Vec<usize> = if ports.is_empty() {
                Vec::new()
            } else {
                // Its own traffic never arrives through a tunnel.
                (0..self.nodes.len())
                    .filter(|&i| set.src[i] && i != mi)
                    .collect()
            };
            // A rule nobody can use (no source node passes its posture, no source prefix) is
            // not sent.
            if !ports.is_empty() && (!src_nodes.is_empty() || !set.src_prefixes.is_empty()) {
                rules.push(self.filter_rule(
                    rule,
                    set,
                    &src_nodes,
                    &set.src_prefixes,
                    node,
                    &ports,
                ));
                if accept {
                    for i in src_nodes
                        .iter()
                        .copied()
                        .chain(self.nodes_in(&set.src_prefixes))
                    {
                        visible[i] = true;
                    }
                }
            }
            if !self_ports.is_empty() {
                let own: Vec<usize> = (0..self.nodes.len())
                    .filter(|&i| {
                        set.src[i]
                            && self.nodes[i].user == node.user
                            && self.nodes[i].tags.is_empty()
                    })
                    .collect();
                if !own.is_empty() {
                    rules.push(self.filter_rule(rule, set, &own, &[], node, &self_ports));
                    if accept {
                        for i in own {
                            visible[i] = true;
                        }
                    }
                }
            }
            // Outbound: the nodes this one may reach under accept rules.
            let me_as_src = set.src[mi]
                || self.nodes[mi]
                    .addresses
                    .iter()
                    .any(|a| set.src_prefixes.iter().any(|p| p.contains(a)));
            if accept && me_as_src {
                for (d, covered) in rule.dst.iter().zip(&set.dst) {
                    match d.sel {
                        Selector::SelfNodes if node.user.is_some() && node.tags.is_empty() => {
                            for (i, n) in self.nodes.iter().enumerate() {
                                if n.user == node.user && n.tags.is_empty() {
                                    visible[i] = true;
                                }
                            }
                        }
                        Selector::SelfNodes => {}
                        _ => {
                            for (i, c) in covered.iter().enumerate() {
                                visible[i] |= c;
                            }
                        }
                    }
                }
            }
        }
        visible[mi] = false;
        Compiled {
            rules,
            visible_peers: visible
                .iter()
                .enumerate()
                .filter(|(_, v)| **v)
                .map(|(i, _)| self.nodes[i].id)
                .collect(),
        }
    }

    /// Indices of nodes with an address inside any of `prefixes`.
    fn nodes_in<'a>(&'a self, prefixes: &'a [IpNet]) -> impl Iterator<Item = usize> + 'a {
        self.nodes
            .iter()
            .enumerate()
            .filter(move |(_, n)| {
                n.addresses
                    .iter()
                    .any(|a| prefixes.iter().any(|p| p.contains(a)))
            })
            .map(|(i, _)| i)
    }

    fn filter_rule(
        &self,
        rule: &Rule,
        set: &RuleSets,
        src_nodes: &[usize],
        prefixes: &[IpNet],
        node: &InventoryNode,
        ports: &[&Ports],
    ) -> FilterRule {
        let mut src: Vec<IpNet> = prefixes.to_vec();
        for &i in src_nodes {
            src.extend(self.nodes[i].addresses.iter().map(|a| IpNet::from(*a)));
        }
        let src = IpNet::aggregate(&src);
        let mut dst = Vec::new();
        for a in &node.addresses {
            for p in ports {
                for (first, last) in p.ranges() {
                    let d = DstPorts {
                        net: IpNet::from(*a),
                        ports: PortRange { first, last },
                    };
                    if !dst.contains(&d) {
                        dst.push(d);
                    }
                }
            }
        }
        let (protocols, all_protocols) = match &rule.proto {
            Proto::Default => (Vec::new(), false),
            Proto::All => (Vec::new(), true),
            Proto::List(l) => (l.iter().map(|p| IpProto(*p)).collect(), false),
        };
        FilterRule {
            origin: rule.origin.clone(),
            action: match rule.action {
                Action::Accept => WireAction::Accept,
                Action::Deny => WireAction::Deny,
            },
            src,
            dst,
            protocols,
            all_protocols,
            valid: set.valid.clone(),
        }
    }

    /// Number of nodes resolved.
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    pub(crate) fn file(&self) -> &PolicyFile {
        &self.file
    }

    pub(crate) fn nodes(&self) -> &[InventoryNode] {
        &self.nodes
    }
}

/// The rule's validity as absolute ranges, or `None` when it always applies.
fn validity(rule: &Rule, now: Timestamp, horizon_end: Timestamp) -> Option<Vec<ValidRange>> {
    if rule.when.is_none() && rule.not_before.is_none() && rule.expires.is_none() {
        return None;
    }
    let from = rule.not_before.map_or(i64::MIN, |t| t.as_second());
    let until = rule.expires.map_or(i64::MAX, |t| t.as_second());
    if until <= now.as_second() {
        return Some(Vec::new());
    }
    let Some(when) = &rule.when else {
        return Some(vec![ValidRange { from, until }]);
    };
    let start = now.as_second().max(from);
    let end = horizon_end.as_second().min(until);
    if start >= end {
        return Some(Vec::new());
    }
    let (Ok(s), Ok(e)) = (Timestamp::from_second(start), Timestamp::from_second(end)) else {
        return Some(Vec::new());
    };
    Some(
        when.ranges(s, e)
            .into_iter()
            .map(|(from, until)| ValidRange { from, until })
            .collect(),
    )
}

fn any_v4() -> IpNet {
    "0.0.0.0/0".parse().expect("valid CIDR")
}

fn any_v6() -> IpNet {
    "::/0".parse().expect("valid CIDR")
}
