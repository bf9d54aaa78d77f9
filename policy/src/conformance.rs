//! Replaying policy cases recorded against the real Tailscale service (the format of
//! `shared/conformance/tailscale-acl`): each case is a policy and a small tailnet, and either
//! the error the service gave or, per node, the packet filter it pushed and the peers the node
//! could see. [`run_case`] builds the inventory from the case's topology, compiles the policy
//! and compares.
//!
//! Filters are compared by meaning, not spelling: for each destination the node serves (its
//! own addresses and approved routes), each protocol and each port, the set of sources the
//! rules admit must be the same. Sources are compared within the addresses that can reach a
//! node at all (the tailnet's ranges and the approved routes), so a policy `*` matches however
//! each side spells "everyone". Port-less protocols (ICMP and the rest) are admitted on
//! addresses alone, as nodes enforce them.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;
use jiff::Timestamp;
use serde::Deserialize;
use wire::NodeId;

use crate::{Inventory, InventoryNode, Policy};

/// How one case went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Same result as the service.
    Pass,
    /// Different: what differs, one line each.
    Fail(Vec<String>),
    /// The case uses something Lattice does not support (named).
    Unsupported(String),
}

/// One case's outcome.
#[derive(Debug, Clone)]
pub struct CaseResult {
    /// The case id.
    pub id: String,
    /// Its category (`acl`, `grant`, `routes`, ...).
    pub category: String,
    /// The outcome.
    pub verdict: Verdict,
}

#[derive(Deserialize)]
struct Case {
    id: String,
    category: String,
    policy: String,
    expect_error: Option<ExpectError>,
    topology: Topology,
    nodes: Option<BTreeMap<String, Captured>>,
}

#[derive(Deserialize)]
struct ExpectError {
    message: String,
}

#[derive(Deserialize)]
struct Topology {
    users: Vec<TopoUser>,
    nodes: BTreeMap<String, TopoNode>,
}

#[derive(Deserialize)]
struct TopoUser {
    #[serde(default)]
    id: u64,
    name: String,
    #[serde(default)]
    email: String,
}

#[derive(Deserialize)]
struct TopoNode {
    #[serde(default)]
    tags: Vec<String>,
    ipv4: String,
    ipv6: String,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    approved_routes: Option<Vec<String>>,
    #[serde(default)]
    routable_ips: Option<Vec<String>>,
}

#[derive(Deserialize)]
struct Captured {
    #[serde(default)]
    filter: Option<Vec<TsRule>>,
    #[serde(default)]
    peers: Option<Vec<String>>,
    /// The node's own capability map (with `nodeAttrs`).
    #[serde(default)]
    cap_map: Option<BTreeMap<String, serde_json::Value>>,
    /// Peers reached for more than their own addresses: their extra allowed addresses and
    /// the routes they are the primary router of, for this node.
    #[serde(default)]
    peer_routes: Option<BTreeMap<String, PeerRoutes>>,
}

#[derive(Deserialize, Debug, PartialEq, Eq, Default)]
struct PeerRoutes {
    #[serde(default)]
    allowed_ips: BTreeSet<String>,
    #[serde(default)]
    primary_routes: BTreeSet<String>,
}

/// Capabilities the service puts in a node's own map whatever the policy says (tailnet
/// state: roles, settings, features), and those it derives from its own features (Funnel's
/// ports and warnings): left out on both sides, as Headscale does.
fn service_cap(name: &str) -> bool {
    const STATE: &[&str] = &[
        "default-auto-update",
        "https://tailscale.com/cap/file-sharing",
        "https://tailscale.com/cap/is-admin",
        "https://tailscale.com/cap/is-owner",
        "https://tailscale.com/cap/ssh",
        "https://tailscale.com/cap/tailnet-lock",
        "https://tailscale.com/cap/warn-funnel-no-https",
        "probe-udp-lifetime",
        "ssh-behavior-v1",
        "ssh-env-vars",
        "store-appc-routes",
        "tailnet-display-name",
    ];
    STATE.contains(&name) || name.starts_with("https://tailscale.com/cap/funnel-ports")
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct TsRule {
    #[serde(default, rename = "SrcIPs")]
    src_ips: Vec<String>,
    #[serde(default)]
    dst_ports: Vec<TsDst>,
    #[serde(default, rename = "IPProto")]
    ip_proto: Vec<u8>,
    #[serde(default)]
    cap_grant: Vec<TsCapGrant>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct TsCapGrant {
    #[serde(default)]
    dsts: Vec<String>,
    #[serde(default)]
    cap_map: BTreeMap<String, serde_json::Value>,
}

/// App capabilities as compared: (capability, its values as JSON text, destination range) ->
/// the sources granted.
type Caps = BTreeMap<(String, String, (u128, u128)), Set>;

/// One capability granted: (name, values as JSON text, destination range, sources).
type CapAtom = (String, String, (u128, u128), Set);

fn ts_caps(rules: &[TsRule]) -> Result<Vec<CapAtom>, String> {
    let mut out = Vec::new();
    for r in rules {
        let mut src = Vec::new();
        for s in &r.src_ips {
            src.extend(ts_addr(s)?);
        }
        let src = Set::from_ranges(src);
        for g in &r.cap_grant {
            for d in &g.dsts {
                for range in ts_addr(d)? {
                    for (name, values) in &g.cap_map {
                        // A capability without values is written null.
                        let values = match values {
                            serde_json::Value::Null => serde_json::Value::Array(Vec::new()),
                            v => v.clone(),
                        };
                        out.push((name.clone(), values.to_string(), range, src.clone()));
                    }
                }
            }
        }
    }
    Ok(out)
}

fn lattice_caps(rules: &[wire::FilterRule]) -> Vec<CapAtom> {
    let mut out = Vec::new();
    for r in rules {
        let src = Set::from_ranges(r.src.iter().map(net_range).collect());
        for g in &r.cap_grants {
            for d in &g.dsts {
                for (name, values) in &g.caps {
                    let values = serde_json::Value::Array(values.clone());
                    out.push((name.clone(), values.to_string(), net_range(d), src.clone()));
                }
            }
        }
    }
    out
}

fn caps_view(list: Vec<CapAtom>, reachable: &Set) -> Caps {
    let mut out = Caps::new();
    for (name, values, dst, src) in list {
        let e = out.entry((name, values, dst)).or_default();
        *e = e.union(&src);
    }
    out.into_iter()
        .map(|(k, v)| (k, v.intersect(reachable)))
        .filter(|(_, v)| !v.0.is_empty())
        .collect()
}

fn show_caps(c: &Caps) -> String {
    if c.is_empty() {
        return "none".into();
    }
    c.iter()
        .map(|((name, values, dst), src)| {
            format!(
                "{name}={values} at {} from {}",
                Set(vec![*dst]).show(),
                src.show()
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct TsDst {
    #[serde(rename = "IP")]
    ip: String,
    ports: TsPorts,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct TsPorts {
    first: u16,
    last: u16,
}

/// Policy sections Lattice does not compile (yet); a case using one is "not supported".
const UNSUPPORTED_SECTIONS: &[&str] = &[
    "derpMap",
    "disableIPv4",
    "OneCGNATRoute",
    "ipsets",
    "postures",
    "attrs",
];

/// Runs one case (its JSON text).
pub fn run_case(json: &str) -> Result<CaseResult, String> {
    let case: Case = serde_json::from_str(json).map_err(|e| format!("not a case: {e}"))?;
    let verdict = judge(&case);
    Ok(CaseResult {
        id: case.id,
        category: case.category,
        verdict,
    })
}

fn judge(case: &Case) -> Verdict {
    let doc: Result<serde_json::Value, _> = serde_json::from_str(&case.policy);
    if let Ok(serde_json::Value::Object(sections)) = &doc {
        let mut unsupported: Vec<&str> = sections
            .keys()
            .filter(|k| UNSUPPORTED_SECTIONS.contains(&k.as_str()))
            .map(String::as_str)
            .collect();
        unsupported.sort_unstable();
        if !unsupported.is_empty() {
            return Verdict::Unsupported(format!("section {}", unsupported.join(", ")));
        }
    }
    let parsed = Policy::parse(&case.id, &case.policy).and_then(|p| {
        // The policy's tests run against the case's tailnet (a failing test refuses it).
        let (inv, _) = inventory(case, &p).map_err(|e| crate::PolicyError {
            file: case.id.clone(),
            diagnostics: vec![crate::Diagnostic::new(
                crate::hujson::Pos { line: 1, col: 1 },
                e,
            )],
        })?;
        Policy::check(&case.id, &case.policy, Timestamp::now(), Some(&inv)).map(|_| p)
    });
    let (policy, expected) = match (parsed, &case.expect_error, &case.nodes) {
        (Err(e), Some(_), _) => {
            let _ = e;
            return Verdict::Pass;
        }
        (Ok(_), Some(want), _) if want.message.contains("action=\"deny\" is not supported") => {
            return Verdict::Unsupported(
                "deny rules: a Lattice addition the service refuses".into(),
            );
        }
        (Ok(_), Some(want), _) => {
            return Verdict::Fail(vec![format!(
                "the service refused the policy ({:?}); Lattice accepts it",
                want.message
            )]);
        }
        (Err(e), None, _) => {
            return Verdict::Fail(vec![format!(
                "the service accepted the policy; Lattice refuses it: {e}"
            )]);
        }
        (Ok(p), None, Some(nodes)) => (p, nodes),
        (Ok(_), None, None) => return Verdict::Fail(vec!["the case has no captures".into()]),
    };
    let (inventory, ids) = match inventory(case, &policy) {
        Ok(i) => i,
        Err(e) => return Verdict::Fail(vec![e]),
    };

    let primaries = primaries(case, &ids);
    let reachable = reachable_sources(&inventory);
    let compiled = policy.compile(&inventory, Timestamp::UNIX_EPOCH);
    let names: BTreeMap<NodeId, &str> = ids.iter().map(|(n, id)| (*id, n.as_str())).collect();
    let mut diffs = Vec::new();
    for (host, cap) in expected {
        let Some(&id) = ids.get(host) else {
            diffs.push(format!("{host}: not in the topology"));
            continue;
        };
        let Some(me) = inventory.get(id) else {
            continue;
        };
        let mine = compiled.for_node(id);
        let served = served(me);
        // A node's packets to itself never pass its filter: whether a rule lists the node
        // among its own sources means nothing.
        let me_set = Set::from_ranges(
            me.addresses
                .iter()
                .map(|a| (to_u128(*a), to_u128(*a)))
                .collect(),
        );
        let reachable = reachable.minus(&me_set);
        if let Some(filter) = &cap.filter {
            let want_caps = match ts_caps(filter) {
                Ok(c) => caps_view(c, &reachable),
                Err(e) => return Verdict::Fail(vec![format!("{host}: {e}")]),
            };
            let got_caps = caps_view(lattice_caps(&mine.rules), &reachable);
            if want_caps != got_caps {
                diffs.push(format!(
                    "{host}: app capabilities: the service grants {}; Lattice {}",
                    show_caps(&want_caps),
                    show_caps(&got_caps)
                ));
            }
            let want = match ts_atoms(filter) {
                Ok(v) => v,
                Err(e) => return Verdict::Fail(vec![format!("{host}: {e}")]),
            };
            let got = lattice_atoms(&mine.rules);
            let cells = cells(&served, want.iter().chain(&got));
            let want = view(&want, &cells, &reachable);
            let got = view(&got, &cells, &reachable);
            if want != got {
                diffs.extend(describe(host, &want, &got));
            }
        }
        if let Some(cap_map) = &cap.cap_map {
            let want: BTreeMap<&str, Vec<serde_json::Value>> = cap_map
                .iter()
                .filter(|(k, _)| !service_cap(k))
                .map(|(k, v)| {
                    let values = match v {
                        serde_json::Value::Array(a) => a.clone(),
                        _ => Vec::new(),
                    };
                    (k.as_str(), values)
                })
                .collect();
            let got: BTreeMap<&str, Vec<serde_json::Value>> = mine
                .node_caps
                .iter()
                .filter(|(k, _)| !service_cap(k))
                .map(|(k, v)| (k.as_str(), v.clone()))
                .collect();
            if want != got {
                diffs.push(format!(
                    "{host}: node attributes: the service gives {:?}, Lattice {:?}",
                    want.keys().collect::<Vec<_>>(),
                    got.keys().collect::<Vec<_>>()
                ));
            }
        }
        if cap.peers.is_some() {
            // The routes each visible peer carries for this node: the primary routers
            // (elected as the coordinator does: the lowest id, all being online), where a
            // `via` grant does not steer the route to a router of its own; exit routes are
            // allowed but never primary.
            let want = cap.peer_routes.as_ref();
            let mut got: BTreeMap<&str, PeerRoutes> = BTreeMap::new();
            let mut carriers: BTreeMap<IpNet, NodeId> = BTreeMap::new();
            for n in inventory.iter() {
                for r in n.routes.iter().filter(|r| r.prefix_len() > 0) {
                    carriers.entry(*r).or_insert(n.id);
                }
            }
            carriers.extend(&primaries);
            for (r, routers) in &mine.via_routes {
                if let Some(first) = routers.first() {
                    carriers.insert(*r, *first);
                }
            }
            for p in &mine.visible_peers {
                let (Some(name), Some(node)) = (names.get(p), inventory.get(*p)) else {
                    continue;
                };
                let mut pr = PeerRoutes::default();
                let usable = mine.peer_routes.get(p).map_or(&[][..], Vec::as_slice);
                for r in node.routes.iter().filter(|r| usable.contains(r)) {
                    if r.prefix_len() == 0 {
                        pr.allowed_ips.insert(r.to_string());
                    } else if carriers.get(r) == Some(p) {
                        pr.allowed_ips.insert(r.to_string());
                        pr.primary_routes.insert(r.to_string());
                    }
                }
                if pr != PeerRoutes::default() {
                    got.insert(name, pr);
                }
            }
            let want_view: BTreeMap<&str, &PeerRoutes> = want
                .iter()
                .flat_map(|m| m.iter())
                .filter(|(_, v)| **v != PeerRoutes::default())
                .map(|(k, v)| (k.as_str(), v))
                .collect();
            let got_view: BTreeMap<&str, &PeerRoutes> = got.iter().map(|(k, v)| (*k, v)).collect();
            if want_view != got_view {
                diffs.push(format!(
                    "{host}: peer routes: the service shows {want_view:?}, Lattice {got_view:?}"
                ));
            }
        }
        if let Some(peers) = &cap.peers {
            let got: BTreeSet<&str> = mine
                .visible_peers
                .iter()
                .filter_map(|p| names.get(p).copied())
                .collect();
            let want: BTreeSet<&str> = peers.iter().map(String::as_str).collect();
            if want != got {
                diffs.push(format!(
                    "{host}: peers: the service shows {:?}, Lattice {:?}",
                    want.difference(&got).collect::<Vec<_>>(),
                    got.difference(&want).collect::<Vec<_>>()
                ));
            }
        }
    }
    if diffs.is_empty() {
        Verdict::Pass
    } else {
        Verdict::Fail(diffs)
    }
}

/// The primary router of each subnet several routers serve. The coordinator elects the one
/// that joined first among those online; the topology does not record who joined first,
/// but the captures show it: the router most nodes see as the primary (a few views may
/// differ where a `via` grant steers the route elsewhere for them).
fn primaries(case: &Case, ids: &BTreeMap<String, NodeId>) -> BTreeMap<IpNet, NodeId> {
    let mut votes: BTreeMap<IpNet, BTreeMap<&str, usize>> = BTreeMap::new();
    for cap in case.nodes.iter().flat_map(BTreeMap::values) {
        for (peer, pr) in cap.peer_routes.iter().flatten() {
            for r in &pr.primary_routes {
                if let Ok(r) = r.parse::<IpNet>() {
                    *votes
                        .entry(r)
                        .or_default()
                        .entry(peer.as_str())
                        .or_default() += 1;
                }
            }
        }
    }
    votes
        .into_iter()
        .filter_map(|(r, v)| {
            let (host, _) = v.into_iter().max_by_key(|(_, n)| *n)?;
            Some((r, *ids.get(host)?))
        })
        .collect()
}

/// The users' roles (admins, owners) by user name. The topology has none; the service's own
/// capability maps show them where captured (`is-admin`, `is-owner` on a user's node).
/// Without captures, the tailnet is as the corpus was recorded: every user an admin, the
/// first one (who made the tailnet) its owner.
fn roles(case: &Case) -> (BTreeSet<String>, BTreeSet<String>) {
    let (mut admins, mut owners) = (BTreeSet::new(), BTreeSet::new());
    let mut seen = false;
    for (host, cap) in case.nodes.iter().flatten() {
        let (Some(map), Some(node)) = (&cap.cap_map, case.topology.nodes.get(host)) else {
            continue;
        };
        seen = true;
        let Some(user) = node.user.clone().filter(|_| node.tags.is_empty()) else {
            continue;
        };
        if map.contains_key("https://tailscale.com/cap/is-admin") {
            admins.insert(user.clone());
        }
        if map.contains_key("https://tailscale.com/cap/is-owner") {
            owners.insert(user);
        }
    }
    if !seen {
        admins = case.topology.users.iter().map(|u| u.name.clone()).collect();
        owners.extend(
            case.topology
                .users
                .iter()
                .min_by_key(|u| u.id)
                .map(|u| u.name.clone()),
        );
    }
    (admins, owners)
}

/// The tailnet as an inventory: users by e-mail (the policy's names), nodes by hostname.
fn inventory(
    case: &Case,
    policy: &Policy,
) -> Result<(Inventory, BTreeMap<String, NodeId>), String> {
    let email: BTreeMap<&str, &str> = case
        .topology
        .users
        .iter()
        .map(|u| (u.name.as_str(), u.email.as_str()))
        .collect();
    let (admins, owners) = roles(case);
    let mut inv = Inventory::new();
    let mut ids = BTreeMap::new();
    for (i, (host, n)) in case.topology.nodes.iter().enumerate() {
        let id = NodeId(i as u64 + 1);
        let v4: IpAddr = n.ipv4.parse().map_err(|_| format!("{host}: bad ipv4"))?;
        let v6: IpAddr = n.ipv6.parse().map_err(|_| format!("{host}: bad ipv6"))?;
        let user = match &n.user {
            Some(u) if n.tags.is_empty() => Some(
                email
                    .get(u.as_str())
                    .filter(|e| !e.is_empty())
                    .map_or_else(|| u.clone(), |e| (*e).to_owned()),
            ),
            _ => None,
        };
        let parse = |v: &Option<Vec<String>>| {
            v.iter()
                .flatten()
                .map(|r| r.parse::<IpNet>().map(|n| n.trunc()))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|_| format!("{host}: bad route"))
        };
        let mut routes = parse(&n.approved_routes)?;
        let mut node = InventoryNode {
            routes: Vec::new(),
            id,
            name: host.clone(),
            addresses: vec![v4, v6],
            user,
            tags: n.tags.clone(),
            attrs: Default::default(),
        };
        if let Some(u) = n.user.as_deref().filter(|_| n.tags.is_empty()) {
            for (set, attr) in [(&admins, crate::ROLE_ADMIN), (&owners, crate::ROLE_OWNER)] {
                if set.contains(u) {
                    node.attrs
                        .insert(attr.to_owned(), wire::AttrValue::Bool(true));
                }
            }
        }
        // What the node advertised and the policy's autoApprovers approve is approved too.
        for r in policy.auto_approved(&node, &parse(&n.routable_ips)?) {
            if !routes.contains(&r) {
                routes.push(r);
            }
        }
        node.routes = routes;
        inv.upsert(node);
        ids.insert(host.clone(), id);
    }
    Ok((inv, ids))
}

/// A set of addresses: sorted, disjoint, inclusive ranges of 128-bit values (IPv4 mapped
/// into `::ffff:0:0/96`, so one line holds both families).
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord)]
struct Set(Vec<(u128, u128)>);

fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(v4.to_ipv6_mapped()),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

fn net_range(n: &IpNet) -> (u128, u128) {
    (to_u128(n.network()), to_u128(n.broadcast()))
}

impl Set {
    fn from_ranges(mut v: Vec<(u128, u128)>) -> Self {
        v.sort_unstable();
        let mut out: Vec<(u128, u128)> = Vec::with_capacity(v.len());
        for (a, b) in v {
            match out.last_mut() {
                Some(last) if a <= last.1.saturating_add(1) => last.1 = last.1.max(b),
                _ => out.push((a, b)),
            }
        }
        Self(out)
    }

    fn union(&self, other: &Self) -> Self {
        Self::from_ranges(self.0.iter().chain(&other.0).copied().collect())
    }

    fn intersect(&self, other: &Self) -> Self {
        let mut out = Vec::new();
        for &(a, b) in &self.0 {
            for &(c, d) in &other.0 {
                let (lo, hi) = (a.max(c), b.min(d));
                if lo <= hi {
                    out.push((lo, hi));
                }
            }
        }
        Self::from_ranges(out)
    }

    fn minus(&self, other: &Self) -> Self {
        let mut out = Vec::new();
        for &(a, b) in &self.0 {
            let mut pieces = vec![(a, b)];
            for &(c, d) in &other.0 {
                pieces = pieces
                    .into_iter()
                    .flat_map(|(x, y)| {
                        let mut v = Vec::new();
                        if d < x || c > y {
                            v.push((x, y));
                        } else {
                            if c > x {
                                v.push((x, c - 1));
                            }
                            if d < y {
                                v.push((d + 1, y));
                            }
                        }
                        v
                    })
                    .collect();
            }
            out.extend(pieces);
        }
        Self::from_ranges(out)
    }

    fn show(&self) -> String {
        let one = |v: u128| -> String {
            let v6 = std::net::Ipv6Addr::from(v);
            v6.to_ipv4_mapped()
                .map_or_else(|| v6.to_string(), |v4| v4.to_string())
        };
        self.0
            .iter()
            .map(|&(a, b)| {
                if a == b {
                    one(a)
                } else {
                    format!("{}-{}", one(a), one(b))
                }
            })
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// A Tailscale address string (`*`, IP, CIDR, `a-b`) as ranges.
fn ts_addr(s: &str) -> Result<Vec<(u128, u128)>, String> {
    if s == "*" {
        return Ok(vec![(0, u128::MAX)]);
    }
    if let Some((a, b)) = s.split_once('-')
        && !s.contains('/')
    {
        let a: IpAddr = a.parse().map_err(|_| format!("bad range {s:?}"))?;
        let b: IpAddr = b.parse().map_err(|_| format!("bad range {s:?}"))?;
        return Ok(vec![(to_u128(a), to_u128(b))]);
    }
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(vec![(to_u128(ip), to_u128(ip))]);
    }
    let net: IpNet = s.parse().map_err(|_| format!("bad address {s:?}"))?;
    Ok(vec![net_range(&net.trunc())])
}

/// Every address that can reach a node: the tailnet's ranges (as the service writes `*`)
/// and the approved subnet routes.
fn reachable_sources(inv: &Inventory) -> Set {
    let mut v: Vec<(u128, u128)> = [
        "100.64.0.0-100.115.91.255",
        "100.115.94.0-100.127.255.255",
        "fd7a:115c:a1e0::/48",
    ]
    .iter()
    .flat_map(|s| ts_addr(s).unwrap_or_default())
    .collect();
    // Subnet routes, not exit routes: the service's `*` is the tailnet and its subnets.
    for n in inv.iter() {
        for r in n.routes.iter().filter(|r| r.prefix_len() > 0) {
            v.push(net_range(r));
        }
    }
    Set::from_ranges(v)
}

/// What a node serves: its own addresses and its approved routes.
fn served(me: &InventoryNode) -> Vec<(u128, u128)> {
    me.addresses
        .iter()
        .map(|a| (to_u128(*a), to_u128(*a)))
        .chain(me.routes.iter().map(net_range))
        .collect()
}

const DEFAULT_PROTOS: [u8; 4] = [6, 17, 1, 58];

fn has_ports(proto: u8) -> bool {
    matches!(proto, 6 | 17 | 132)
}

/// Per (destination, protocol): for each run of ports, the sources admitted.
type View = BTreeMap<(String, u8), Vec<((u16, u16), Set)>>;

/// One rule, as atoms: (sources, destination ranges with ports, protocols).
struct Atom {
    src: Set,
    dst: Vec<((u128, u128), (u16, u16))>,
    protos: Vec<u8>,
}

/// The destination space the node serves, cut wherever a rule's destination starts or
/// ends, so both sides are compared on the same pieces.
fn cells<'a>(served: &[(u128, u128)], atoms: impl Iterator<Item = &'a Atom>) -> Vec<(u128, u128)> {
    let dsts: Vec<(u128, u128)> = atoms.flat_map(|a| a.dst.iter().map(|(d, _)| *d)).collect();
    let mut out = Vec::new();
    for &(lo, hi) in served {
        let mut starts: BTreeSet<u128> = BTreeSet::from([lo]);
        for &(a, b) in &dsts {
            if a > lo && a <= hi {
                starts.insert(a);
            }
            if b >= lo && b < hi {
                starts.insert(b + 1);
            }
        }
        let starts: Vec<u128> = starts.into_iter().collect();
        for (i, &st) in starts.iter().enumerate() {
            let end = starts.get(i + 1).map_or(hi, |n| n - 1);
            // Only pieces some rule reaches.
            if dsts.iter().any(|&(a, b)| a <= st && end <= b) {
                out.push((st, end));
            }
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

fn view(atoms: &[Atom], cells: &[(u128, u128)], reachable: &Set) -> View {
    let mut out = View::new();
    let protos: BTreeSet<u8> = atoms
        .iter()
        .flat_map(|a| a.protos.iter().copied())
        .collect();
    for &range in cells {
        let key = Set(vec![range]).show();
        for &proto in &protos {
            // The ports of each rule that covers this destination, and its sources.
            let mut spans: Vec<((u16, u16), &Set)> = Vec::new();
            for a in atoms.iter().filter(|a| a.protos.contains(&proto)) {
                for &(d, ports) in &a.dst {
                    if d.0 <= range.0 && range.1 <= d.1 {
                        let ports = if has_ports(proto) {
                            ports
                        } else {
                            (0, u16::MAX)
                        };
                        spans.push((ports, &a.src));
                    }
                }
            }
            if spans.is_empty() {
                continue;
            }
            let mut cuts: BTreeSet<u32> = BTreeSet::new();
            for ((lo, hi), _) in &spans {
                cuts.insert(u32::from(*lo));
                cuts.insert(u32::from(*hi) + 1);
            }
            let cuts: Vec<u32> = cuts.into_iter().collect();
            let mut runs: Vec<((u16, u16), Set)> = Vec::new();
            for w in cuts.windows(2) {
                let (lo, hi) = (w[0], w[1] - 1);
                let mut src = Set::default();
                for ((a, b), s) in &spans {
                    if u32::from(*a) <= lo && hi <= u32::from(*b) {
                        src = src.union(s);
                    }
                }
                let src = src.intersect(reachable);
                if src.0.is_empty() {
                    continue;
                }
                let (lo, hi) = (lo as u16, hi as u16);
                match runs.last_mut() {
                    Some(((_, h), s)) if u32::from(*h) + 1 == u32::from(lo) && *s == src => {
                        *h = hi;
                    }
                    _ => runs.push(((lo, hi), src)),
                }
            }
            if !runs.is_empty() {
                out.insert((key.clone(), proto), runs);
            }
        }
    }
    out
}

fn ts_atoms(rules: &[TsRule]) -> Result<Vec<Atom>, String> {
    let mut atoms = Vec::new();
    for r in rules {
        let mut src = Vec::new();
        for s in &r.src_ips {
            src.extend(ts_addr(s)?);
        }
        let mut dst = Vec::new();
        for d in &r.dst_ports {
            for x in ts_addr(&d.ip)? {
                dst.push((x, (d.ports.first, d.ports.last)));
            }
        }
        atoms.push(Atom {
            src: Set::from_ranges(src),
            dst,
            protos: if r.ip_proto.is_empty() {
                DEFAULT_PROTOS.to_vec()
            } else {
                r.ip_proto.clone()
            },
        });
    }
    Ok(atoms)
}

fn lattice_atoms(rules: &[wire::FilterRule]) -> Vec<Atom> {
    rules
        .iter()
        .filter(|r| r.action == wire::filter::Action::Accept)
        .map(|r| Atom {
            src: Set::from_ranges(r.src.iter().map(net_range).collect()),
            dst: r
                .dst
                .iter()
                .map(|d| (net_range(&d.net), (d.ports.first, d.ports.last)))
                .collect(),
            protos: if r.all_protocols {
                (0..=255).collect()
            } else if r.protocols.is_empty() {
                DEFAULT_PROTOS.to_vec()
            } else {
                r.protocols.iter().map(|p| p.0).collect()
            },
        })
        .collect()
}

fn describe(host: &str, want: &View, got: &View) -> Vec<String> {
    // What differs, per destination and port run; protocols with the same difference are
    // reported together.
    let keys: BTreeSet<&(String, u8)> = want.keys().chain(got.keys()).collect();
    let mut lines: BTreeMap<(String, String), Vec<u8>> = BTreeMap::new();
    let empty = Vec::new();
    for k in keys {
        let (w, g) = (want.get(k).unwrap_or(&empty), got.get(k).unwrap_or(&empty));
        if w == g {
            continue;
        }
        let mut cuts: BTreeSet<u32> = BTreeSet::new();
        for ((lo, hi), _) in w.iter().chain(g) {
            cuts.insert(u32::from(*lo));
            cuts.insert(u32::from(*hi) + 1);
        }
        let cuts: Vec<u32> = cuts.into_iter().collect();
        let at = |runs: &Vec<((u16, u16), Set)>, p: u32| {
            runs.iter()
                .find(|((lo, hi), _)| u32::from(*lo) <= p && p <= u32::from(*hi))
                .map(|(_, s)| s.clone())
                .unwrap_or_default()
        };
        for c in cuts.windows(2) {
            let (ws, gs) = (at(w, c[0]), at(g, c[0]));
            if ws == gs {
                continue;
            }
            let missing = ws.minus(&gs);
            let extra = gs.minus(&ws);
            let mut what = Vec::new();
            if !missing.0.is_empty() {
                what.push(format!("Lattice lacks {}", missing.show()));
            }
            if !extra.0.is_empty() {
                what.push(format!("Lattice adds {}", extra.show()));
            }
            let ports = if c[0] == 0 && c[1] == 65536 {
                String::new()
            } else {
                format!(" ports {}-{}", c[0], c[1] - 1)
            };
            lines
                .entry((format!("{host}: to {}{ports}", k.0), what.join("; ")))
                .or_default()
                .push(k.1);
        }
    }
    lines
        .into_iter()
        .map(|((place, what), protos)| {
            let protos: Vec<String> = protos.iter().map(ToString::to_string).collect();
            format!("{place} proto {}: {what}", protos.join(","))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A two-node case: `policy`, and the filter the service gave node b.
    fn case(policy: &str, b_filter: &str, expect_error: Option<&str>) -> String {
        let nodes = if expect_error.is_some() {
            "null".to_owned()
        } else {
            format!(
                r#"{{"a": {{"filter": [], "peers": ["b"]}}, "b": {{"filter": {b_filter}, "peers": ["a"]}}}}"#
            )
        };
        format!(
            r#"{{"id": "t", "category": "acl", "policy": {policy},
                "expect_error": {err},
                "topology": {{"users": [{{"name": "odin", "email": "odin@example.com"}}],
                  "nodes": {{
                    "a": {{"tags": [], "user": "odin", "ipv4": "100.64.0.1", "ipv6": "fd7a:115c:a1e0::1"}},
                    "b": {{"tags": ["tag:db"], "ipv4": "100.64.0.2", "ipv6": "fd7a:115c:a1e0::2"}}}}}},
                "nodes": {nodes}}}"#,
            policy = serde_json::to_string(policy).unwrap(),
            err = expect_error.map_or_else(
                || "null".to_owned(),
                |m| format!(r#"{{"code": 400, "message": "{m}"}}"#)
            ),
        )
    }

    const POLICY: &str = r#"{"tagOwners": {"tag:db": ["odin@example.com"]},
        "acls": [{"action": "accept", "src": ["odin@example.com"], "dst": ["tag:db:22,80-90"]}]}"#;

    fn verdict(json: &str) -> Verdict {
        run_case(json).unwrap().verdict
    }

    #[test]
    fn filters_are_compared_by_meaning_not_spelling() {
        // The service's spelling: one rule, bare IPs, the destination as "*".
        let same = r#"[{"SrcIPs": ["100.64.0.1", "fd7a:115c:a1e0::1"],
            "DstPorts": [{"IP": "*", "Ports": {"First": 22, "Last": 22}},
                         {"IP": "*", "Ports": {"First": 80, "Last": 90}}]}]"#;
        assert_eq!(verdict(&case(POLICY, same, None)), Verdict::Pass);
        // Split differently (two rules, ranges, CIDRs): still the same meaning.
        let respelled = r#"[{"SrcIPs": ["100.64.0.1/32", "fd7a:115c:a1e0::1"], "DstPorts": [{"IP": "100.64.0.2", "Ports": {"First": 22, "Last": 22}}, {"IP": "100.64.0.2", "Ports": {"First": 80, "Last": 85}}]},
            {"SrcIPs": ["100.64.0.1-100.64.0.1", "fd7a:115c:a1e0::1/128"], "DstPorts": [{"IP": "100.64.0.2", "Ports": {"First": 86, "Last": 90}}, {"IP": "fd7a:115c:a1e0::2", "Ports": {"First": 22, "Last": 22}}, {"IP": "fd7a:115c:a1e0::2", "Ports": {"First": 80, "Last": 90}}]},
            {"SrcIPs": ["100.64.0.1"], "DstPorts": [{"IP": "100.64.0.2", "Ports": {"First": 22, "Last": 22}}], "IPProto": [1]}]"#;
        assert_eq!(verdict(&case(POLICY, respelled, None)), Verdict::Pass);
        // A port the policy does not open, a missing protocol: different.
        let wider = same.replace("\"Last\": 90", "\"Last\": 91");
        let Verdict::Fail(d) = verdict(&case(POLICY, &wider, None)) else {
            panic!("a wider port range passed")
        };
        assert!(
            d.iter()
                .any(|l| l.contains("ports 91-91") && l.contains("Lattice lacks 100.64.0.1")),
            "{d:?}"
        );
        let tcp_only = same.replace(
            r#"{"IP": "*", "Ports": {"First": 80, "Last": 90}}]}]"#,
            r#"{"IP": "*", "Ports": {"First": 80, "Last": 90}}], "IPProto": [6]}]"#,
        );
        assert!(matches!(
            verdict(&case(POLICY, &tcp_only, None)),
            Verdict::Fail(_)
        ));
    }

    #[test]
    fn refusals_must_match_and_unsupported_sections_are_named() {
        assert_eq!(
            verdict(&case("{\"bogus\": 1}", "[]", Some("unknown"))),
            Verdict::Pass
        );
        let Verdict::Fail(d) = verdict(&case(POLICY, "[]", Some("nope"))) else {
            panic!("accepting a refused policy passed")
        };
        assert!(d[0].contains("Lattice accepts it"), "{d:?}");
        let derp = r#"{"acls": [], "derpMap": {"Regions": {}}}"#;
        assert_eq!(
            verdict(&case(derp, "[]", None)),
            Verdict::Unsupported("section derpMap".into())
        );
        // `via` is compiled now: a case with it is judged like any other.
        let via = r#"{"tagOwners": {"tag:r": []},
          "grants": [{"src": ["*"], "dst": ["10.0.0.0/8"], "ip": ["*"], "via": ["tag:r"]}]}"#;
        assert!(
            !matches!(verdict(&case(via, "[]", None)), Verdict::Unsupported(_)),
            "via is not unsupported any more"
        );
    }
}
