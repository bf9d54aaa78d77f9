//! Compiling a policy for the current inventory: per-node inbound rules and peer visibility.
//!
//! [`Policy::compile`] resolves every rule once against the inventory (which nodes match its
//! sources, including their postures; which nodes match each destination); extracting one
//! node's rules and peers is then a walk over the rules that name it.
//!
//! A compiled policy follows membership changes incrementally ([`CompiledPolicy::upsert`],
//! [`CompiledPolicy::remove`]: work per rule, not per node), and says which nodes a change to
//! one node can concern ([`CompiledPolicy::related`]), so a coordinator recomputes only those
//! nodes' rules.
//!
//! Time: a rule with a validity period is sent with that exact period; a rule with a recurring
//! window is sent as the absolute ranges the window covers over the next [`HORIZON`], and the
//! coordinator recompiles daily, so nodes enforce windows without a time-zone database and keep
//! enforcing them (failing closed after the horizon) while the coordinator is away.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use ipnet::IpNet;
use jiff::Timestamp;
use wire::NodeId;
use wire::filter::{Action as WireAction, DstPorts, FilterRule, IpProto, PortRange, ValidRange};

use crate::Policy;
use crate::ast::{Action, PolicyFile, Ports, Proto, Rule, Selector};

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
    /// What `nodeAttrs` give the node: attribute names (with no values) and app
    /// capabilities (with theirs), merged over every entry that targets it.
    pub node_caps: BTreeMap<String, Vec<serde_json::Value>>,
    /// Subnets a grant's `via` steers this node's traffic for: each router route, with the
    /// routers (tagged as `via` names) that carry it for this node, lowest id first. They
    /// take precedence over the mesh-wide primary router of the route, unless a rule without
    /// `via` lets this node use the route too (then its primary router carries it, as in
    /// Tailscale).
    pub via_routes: BTreeMap<IpNet, Vec<NodeId>>,
    /// The routes of peers (subnets and exit routes) this node may send to under the rules:
    /// a subnet it may reach nothing in is of no use to it.
    pub peer_routes: BTreeMap<NodeId, Vec<IpNet>>,
}

#[derive(Clone)]
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
    /// Whether a destination entry is `autogroup:self`.
    has_self: bool,
    /// Source nodes with an address outside `src_prefixes`: while none, the prefixes alone
    /// describe the rule's sources.
    uncovered: usize,
}

/// A policy resolved against one inventory at one time.
#[derive(Clone)]
pub struct CompiledPolicy {
    file: PolicyFile,
    nodes: Vec<InventoryNode>,
    index: HashMap<NodeId, usize>,
    sets: Vec<RuleSets>,
}

impl Policy {
    /// Resolves the policy against `inventory` at `now`.
    pub fn compile(&self, inventory: &Inventory, now: Timestamp) -> CompiledPolicy {
        let file = self.file().clone();
        let horizon_end = now
            .checked_add(jiff::SignedDuration::try_from(HORIZON).unwrap_or_default())
            .unwrap_or(now);
        let mut sets = Vec::new();
        for (i, rule) in file.rules.iter().enumerate() {
            let valid = validity(rule, now, horizon_end);
            if valid.as_ref().is_some_and(Vec::is_empty) {
                continue; // expired, or no window in the horizon
            }
            // A posture can only be proven by a node: with a posture required, raw prefixes
            // contribute only the nodes inside them that pass it (in `src`).
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
            sets.push(RuleSets {
                rule: i,
                src: Vec::new(),
                src_prefixes,
                dst: vec![Vec::new(); rule.dst.len()],
                valid,
                has_self: rule
                    .dst
                    .iter()
                    .any(|d| matches!(d.sel, Selector::SelfNodes)),
                uncovered: 0,
            });
        }
        let mut c = CompiledPolicy {
            file,
            nodes: Vec::with_capacity(inventory.len()),
            index: HashMap::with_capacity(inventory.len()),
            sets,
        };
        for n in inventory.iter() {
            c.upsert(n.clone());
        }
        c
    }
}

impl CompiledPolicy {
    /// Adds a node, or replaces what is known about it (addresses, tags, user, attributes):
    /// the same result as compiling again with the changed inventory.
    pub fn upsert(&mut self, node: InventoryNode) {
        let i = match self.index.get(&node.id) {
            Some(&i) => {
                self.forget_bits(i);
                i
            }
            None => {
                let i = self.nodes.len();
                self.index.insert(node.id, i);
                self.nodes.push(node.clone());
                for set in &mut self.sets {
                    set.src.push(false);
                    for d in &mut set.dst {
                        d.push(false);
                    }
                }
                i
            }
        };
        self.nodes[i] = node;
        let n = &self.nodes[i];
        let subj = n.subject();
        for set in &mut self.sets {
            let rule = &self.file.rules[set.rule];
            let src = self.file.src_matches(rule, &subj);
            set.src[i] = src;
            if src && !covered(&n.addresses, &set.src_prefixes) {
                set.uncovered += 1;
            }
            for (d, bits) in rule.dst.iter().zip(&mut set.dst) {
                bits[i] = dst_covers(&self.file, &d.sel, &rule.via, n);
            }
        }
    }

    /// Drops a node: the same result as compiling again without it.
    pub fn remove(&mut self, id: NodeId) {
        let Some(i) = self.index.remove(&id) else {
            return;
        };
        self.forget_bits(i);
        self.nodes.swap_remove(i);
        for set in &mut self.sets {
            set.src.swap_remove(i);
            for d in &mut set.dst {
                d.swap_remove(i);
            }
        }
        if let Some(moved) = self.nodes.get(i) {
            self.index.insert(moved.id, i);
        }
    }

    fn forget_bits(&mut self, i: usize) {
        let n = &self.nodes[i];
        for set in &mut self.sets {
            if set.src[i] && !covered(&n.addresses, &set.src_prefixes) {
                set.uncovered -= 1;
            }
        }
    }

    /// Every node whose rules or peers a change to node `id` (as this compilation knows it)
    /// could alter: those that share a rule with it, in either direction, and with an
    /// `autogroup:self` rule, its user's other nodes. A change to a node concerns at most
    /// `related` before the change plus `related` after it (a superset: some of them may end
    /// up with the same rules). Empty for an unknown node.
    pub fn related(&self, id: NodeId) -> BTreeSet<NodeId> {
        let Some(&xi) = self.index.get(&id) else {
            return BTreeSet::new();
        };
        let x = &self.nodes[xi];
        let mut mark = vec![false; self.nodes.len()];
        for set in &self.sets {
            let x_src = set.src[xi]
                || x.addresses
                    .iter()
                    .any(|a| set.src_prefixes.iter().any(|p| p.contains(a)));
            let x_dst = set.dst.iter().any(|bits| bits[xi]);
            if x_src {
                for bits in &set.dst {
                    for (m, b) in mark.iter_mut().zip(bits) {
                        *m |= b;
                    }
                }
            }
            if x_dst {
                for (m, b) in mark.iter_mut().zip(&set.src) {
                    *m |= b;
                }
                for i in self.nodes_in(&set.src_prefixes) {
                    mark[i] = true;
                }
            }
            if set.has_self && x.user.is_some() {
                for (i, n) in self.nodes.iter().enumerate() {
                    if n.user == x.user {
                        mark[i] = true;
                    }
                }
            }
        }
        mark[xi] = true;
        mark.iter()
            .enumerate()
            .filter(|(_, m)| **m)
            .map(|(i, _)| self.nodes[i].id)
            .collect()
    }

    /// The rules and peers of node `me`. A node unknown to the inventory gets nothing.
    pub fn for_node(&self, me: NodeId) -> Compiled {
        let Some(&mi) = self.index.get(&me) else {
            return Compiled::default();
        };
        let node = &self.nodes[mi];
        let mut rules = Vec::new();
        let mut visible = vec![false; self.nodes.len()];
        let mut via_routes: BTreeMap<IpNet, Vec<NodeId>> = BTreeMap::new();
        let mut peer_routes: BTreeMap<NodeId, Vec<IpNet>> = BTreeMap::new();
        // Routes a rule without `via` lets this node use: their primary router carries them.
        let mut unsteered: BTreeSet<IpNet> = BTreeSet::new();
        for set in &self.sets {
            let rule = &self.file.rules[set.rule];
            let accept = rule.action == Action::Accept;
            // Inbound: the destination entries that name this node (or the routes it serves),
            // with the addresses each one reaches here.
            let mut ports: Vec<(&Ports, Vec<IpNet>)> = Vec::new();
            let mut self_ports: Vec<(&Ports, Vec<IpNet>)> = Vec::new();
            for (d, covered) in rule.dst.iter().zip(&set.dst) {
                if matches!(d.sel, Selector::SelfNodes) {
                    if node.user.is_some() && node.tags.is_empty() {
                        self_ports.push((&d.ports, own_nets(node)));
                    }
                } else if covered[mi] {
                    let mut nets = dst_nets(&d.sel, node);
                    if !rule.via.is_empty() && d.sel == Selector::Any {
                        // Through the router only: its subnets, not its own addresses.
                        nets.retain(|n| node.routes.contains(n));
                    }
                    ports.push((&d.ports, nets));
                }
            }
            let src_nodes: Vec<usize> =
                if ports.is_empty() || (set.uncovered == 0 && !set.src_prefixes.is_empty()) {
                    // No inbound rule here, or every source node lies inside the source prefixes:
                    // the prefixes alone give the same rule, and `nodes_in` the same peers.
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
                let fr = self.filter_rule(rule, set, &src_nodes, &set.src_prefixes, &ports);
                rules.push(as_cap_grant(rule, fr, node));
                if accept {
                    for i in src_nodes
                        .iter()
                        .copied()
                        .chain(self.nodes_in(&set.src_prefixes))
                    {
                        visible[i] = true;
                    }
                    // Traffic from a subnet the sources name arrives through its router.
                    for peer in self.nodes.iter().filter(|n| n.id != node.id) {
                        for r in peer.routes.iter().filter(|r| {
                            !is_exit(r) && set.src_prefixes.iter().any(|p| overlaps(p, r))
                        }) {
                            let v = peer_routes.entry(peer.id).or_default();
                            if !v.contains(r) {
                                v.push(*r);
                            }
                        }
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
                    let fr = self.filter_rule(rule, set, &own, &[], &self_ports);
                    rules.push(as_cap_grant(rule, fr, node));
                    if accept {
                        for i in own {
                            visible[i] = true;
                        }
                    }
                }
            }
            // Outbound: the nodes this one may reach under accept rules.
            // (A router also sends for the subnets behind it.)
            let me_as_src = set.src[mi]
                || self.nodes[mi]
                    .addresses
                    .iter()
                    .any(|a| set.src_prefixes.iter().any(|p| p.contains(a)))
                || self.nodes[mi]
                    .routes
                    .iter()
                    .any(|r| !is_exit(r) && set.src_prefixes.iter().any(|p| overlaps(p, r)));
            if accept && me_as_src && !rule.via.is_empty() {
                for (d, covered) in rule.dst.iter().zip(&set.dst) {
                    let within = match &d.sel {
                        Selector::Prefix(p) => Some(*p),
                        Selector::Any => None,
                        _ => continue,
                    };
                    for (i, _) in covered.iter().enumerate().filter(|(i, c)| **c && *i != mi) {
                        let router = &self.nodes[i];
                        for r in router.routes.iter().filter(|r| {
                            !is_exit(r)
                                && within.is_none_or(|p| overlaps(&p, r))
                                && !node.routes.contains(r)
                        }) {
                            let ids = via_routes.entry(*r).or_default();
                            if !ids.contains(&router.id) {
                                ids.push(router.id);
                            }
                        }
                    }
                }
            }
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
                                if !c || i == mi {
                                    continue;
                                }
                                let peer = &self.nodes[i];
                                let nets = dst_nets(&d.sel, peer);
                                for r in &peer.routes {
                                    if nets.iter().any(|n| overlaps(n, r)) {
                                        let v = peer_routes.entry(peer.id).or_default();
                                        if !v.contains(r) {
                                            v.push(*r);
                                        }
                                        if rule.via.is_empty() {
                                            unsteered.insert(*r);
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        visible[mi] = false;
        // A router sees the other routers of a subnet it serves itself (one of them may be
        // the primary).
        for (i, peer) in self.nodes.iter().enumerate().filter(|(i, _)| visible[*i]) {
            for r in peer
                .routes
                .iter()
                .filter(|r| !is_exit(r) && node.routes.contains(r))
            {
                let v = peer_routes.entry(self.nodes[i].id).or_default();
                if !v.contains(r) {
                    v.push(*r);
                }
            }
        }
        Compiled {
            rules,
            visible_peers: visible
                .iter()
                .enumerate()
                .filter(|(_, v)| **v)
                .map(|(i, _)| self.nodes[i].id)
                .collect(),
            node_caps: self.file.node_caps(node),
            peer_routes: peer_routes
                .into_iter()
                .map(|(id, mut v)| {
                    v.sort_unstable();
                    (id, v)
                })
                .collect(),
            via_routes: via_routes
                .into_iter()
                .filter(|(r, _)| !unsteered.contains(r))
                .map(|(r, mut ids)| {
                    ids.sort_unstable();
                    (r, ids)
                })
                .collect(),
        }
    }

    /// Indices of nodes with an address inside any of `prefixes`, or serving a subnet route
    /// that overlaps one (traffic from behind a router arrives through the router).
    fn nodes_in<'a>(&'a self, prefixes: &'a [IpNet]) -> impl Iterator<Item = usize> + 'a {
        self.nodes
            .iter()
            .enumerate()
            .filter(move |(_, n)| {
                n.addresses
                    .iter()
                    .any(|a| prefixes.iter().any(|p| p.contains(a)))
                    || n.routes
                        .iter()
                        .any(|r| !is_exit(r) && prefixes.iter().any(|p| overlaps(p, r)))
            })
            .map(|(i, _)| i)
    }

    fn filter_rule(
        &self,
        rule: &Rule,
        set: &RuleSets,
        src_nodes: &[usize],
        prefixes: &[IpNet],
        ports: &[(&Ports, Vec<IpNet>)],
    ) -> FilterRule {
        let mut src: Vec<IpNet> = prefixes.to_vec();
        for &i in src_nodes {
            src.extend(
                src_addresses(&self.file, rule, &self.nodes[i])
                    .into_iter()
                    .map(IpNet::from),
            );
        }
        let src = IpNet::aggregate(&src);
        let mut dst = Vec::new();
        for (p, nets) in ports {
            for net in nets {
                for (first, last) in p.ranges() {
                    let d = DstPorts {
                        net: *net,
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
            cap_grants: Vec::new(),
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

/// Whether every address is inside one of `prefixes`.
fn covered(addresses: &[std::net::IpAddr], prefixes: &[IpNet]) -> bool {
    !prefixes.is_empty()
        && addresses
            .iter()
            .all(|a| prefixes.iter().any(|p| p.contains(a)))
}

fn any_v4() -> IpNet {
    "0.0.0.0/0".parse().expect("valid CIDR")
}

fn any_v6() -> IpNet {
    "::/0".parse().expect("valid CIDR")
}

/// An exit route (`0.0.0.0/0` or `::/0`): only `*` and `autogroup:internet` reach through it.
pub(crate) fn is_exit(r: &IpNet) -> bool {
    r.prefix_len() == 0
}

/// Whether two prefixes share an address (for prefixes: one contains the other).
pub(crate) fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

/// `net` without `holes`, as prefixes.
fn without(net: IpNet, holes: &[IpNet]) -> Vec<IpNet> {
    if holes.iter().any(|h| h.contains(&net)) {
        return Vec::new();
    }
    if !holes.iter().any(|h| overlaps(h, &net)) {
        return vec![net];
    }
    net.subnets(net.prefix_len() + 1)
        .map(|halves| halves.flat_map(|h| without(h, holes)).collect())
        .unwrap_or_default()
}

/// The public address ranges `autogroup:internet` stands for: IPv4 without the private,
/// shared (CGNAT) and link-local ranges, and IPv6 global unicast (`2000::/3`).
pub(crate) fn internet() -> Vec<IpNet> {
    let holes: Vec<IpNet> = [
        "10.0.0.0/8",
        "100.64.0.0/10",
        "169.254.0.0/16",
        "172.16.0.0/12",
        "192.168.0.0/16",
    ]
    .iter()
    .filter_map(|s| s.parse().ok())
    .collect();
    let mut out = without("0.0.0.0/0".parse().unwrap_or_default(), &holes);
    out.extend("2000::/3".parse::<IpNet>());
    out
}

/// A node's own addresses as prefixes.
fn own_nets(node: &InventoryNode) -> Vec<IpNet> {
    node.addresses.iter().map(|a| IpNet::from(*a)).collect()
}

/// Whether destination `sel` reaches `node`: its addresses, or for `*` and prefixes also
/// the subnet routes it serves, or for `autogroup:internet` its exit routes. With `via`
/// tags, a routed destination (`*`, a prefix, the internet) reaches only the routes of nodes
/// with one of them.
fn dst_covers(file: &PolicyFile, sel: &Selector, via: &[String], node: &InventoryNode) -> bool {
    if !via.is_empty()
        && matches!(
            sel,
            Selector::Any | Selector::Prefix(_) | Selector::Internet
        )
    {
        let routed = match sel {
            Selector::Internet => node.routes.iter().any(is_exit),
            Selector::Prefix(p) => node.routes.iter().any(|r| !is_exit(r) && overlaps(p, r)),
            _ => node.routes.iter().any(|r| !is_exit(r)),
        };
        return routed && node.tags.iter().any(|t| via.contains(t));
    }
    match sel {
        Selector::SelfNodes => false,
        Selector::Internet => node.routes.iter().any(is_exit),
        Selector::Prefix(p) => {
            node.addresses.iter().any(|a| p.contains(a))
                || node.routes.iter().any(|r| !is_exit(r) && overlaps(p, r))
        }
        sel => file.selector_matches(sel, &node.subject()),
    }
}

/// The addresses of `node` that destination `sel` reaches.
fn dst_nets(sel: &Selector, node: &InventoryNode) -> Vec<IpNet> {
    match sel {
        Selector::Any => {
            let mut v = own_nets(node);
            v.extend(node.routes.iter().copied());
            v
        }
        Selector::Prefix(p) => {
            let mut v: Vec<IpNet> = node
                .addresses
                .iter()
                .filter(|a| p.contains(*a))
                .map(|a| IpNet::from(*a))
                .collect();
            for r in node.routes.iter().filter(|r| !is_exit(r) && overlaps(p, r)) {
                v.push(if p.contains(r) { *r } else { *p });
            }
            v
        }
        Selector::Internet => {
            let v4 = node
                .routes
                .iter()
                .any(|r| is_exit(r) && r.network().is_ipv4());
            let v6 = node
                .routes
                .iter()
                .any(|r| is_exit(r) && r.network().is_ipv6());
            internet()
                .into_iter()
                .filter(|n| (n.network().is_ipv4() && v4) || (n.network().is_ipv6() && v6))
                .collect()
        }
        _ => own_nets(node),
    }
}

/// The addresses of source node `node` a rule admits: all of them when a selector names the
/// node itself (user, group, tag, `*`, ...), only those inside the prefixes when it matches
/// through addresses alone (`100.64.0.0/16` admits a node's IPv4, not its IPv6).
fn src_addresses(file: &PolicyFile, rule: &Rule, node: &InventoryNode) -> Vec<std::net::IpAddr> {
    let subject = node.subject();
    let whole = rule
        .src
        .iter()
        .any(|s| !matches!(s, Selector::Prefix(_)) && file.selector_matches(s, &subject));
    if whole {
        return node.addresses.clone();
    }
    node.addresses
        .iter()
        .filter(|a| {
            rule.src
                .iter()
                .any(|s| matches!(s, Selector::Prefix(p) if p.contains(*a)))
        })
        .copied()
        .collect()
}

/// An app grant's compiled rule: no packet match, the capabilities at the node's own
/// addresses among its destinations (not at the subnets it routes).
fn as_cap_grant(rule: &Rule, mut fr: FilterRule, node: &InventoryNode) -> FilterRule {
    let Some(caps) = &rule.caps else { return fr };
    let own = own_nets(node);
    let mut dsts: Vec<IpNet> = fr
        .dst
        .iter()
        .map(|d| d.net)
        .filter(|n| own.contains(n))
        .collect();
    dsts.sort_unstable();
    dsts.dedup();
    fr.dst.clear();
    fr.protocols.clear();
    fr.all_protocols = false;
    fr.cap_grants = vec![wire::filter::CapGrant {
        dsts,
        caps: caps.clone(),
    }];
    fr
}
