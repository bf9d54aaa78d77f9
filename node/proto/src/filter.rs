//! Matching inbound packets against compiled [`wire::FilterRule`]s (the stateless half of the
//! packet filter; [`crate::conntrack`] is the stateful half).
//!
//! Semantics, documented for admins in the policy docs:
//! - a packet is admitted when at least one `accept` rule matches and no `deny` rule does
//!   (deny wins), and dropped when no rule matches (default deny);
//! - TCP, UDP and SCTP match on destination port; ICMP and protocols without ports match on
//!   addresses only (as in Tailscale: if you may reach any port of a host, you may ping it);
//! - a rule with validity ranges (time windows, `notBefore`, `expires`) counts only inside
//!   them. The filter keeps the set of rules in force at one wall-clock second; the caller
//!   [refreshes](Filter::refresh) it at [`Filter::next_change`] and re-checks flows when the
//!   set changed.

use std::net::IpAddr;

use wire::IpProto;
use wire::filter::{Action, FilterRule};

use crate::packet::FiveTuple;

/// The outcome for one packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Admitted by the rule at this index.
    Accept(usize),
    /// Refused by the deny rule at this index.
    Deny(usize),
    /// No rule matched.
    NoMatch,
}

impl Verdict {
    /// Whether the packet may pass.
    pub fn is_accept(self) -> bool {
        matches!(self, Self::Accept(_))
    }
}

/// Most (rule, port segment) entries the port index may hold; beyond it (thousands of rules
/// with wide, overlapping port ranges) rules are scanned instead.
const MAX_INDEX_ENTRIES: usize = 4 << 20;

/// A set of compiled rules and which of them are in force.
///
/// Rules are turned into a matching form once (sorted source ranges per address family, a
/// protocol bitmap), and the rules in force are indexed by destination port, so a decision
/// looks only at rules that can match the packet's port.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    rules: Vec<FilterRule>,
    matchers: Vec<Matcher>,
    /// Indices of the rules in force at the last refresh, ascending.
    active: Vec<u32>,
    index: PortIndex,
    /// The earliest second after the last refresh at which `active` may change.
    next_change: Option<i64>,
}

/// A rule in matching form.
#[derive(Debug, Clone)]
struct Matcher {
    deny: bool,
    /// Bit `p` set: the rule covers IP protocol `p`.
    protos: [u64; 4],
    /// Source ranges, sorted and merged.
    src4: Vec<(u32, u32)>,
    src6: Vec<(u128, u128)>,
    /// (destination range, first port, last port).
    dst: Vec<(Range, u16, u16)>,
}

#[derive(Debug, Clone, Copy)]
enum Range {
    V4(u32, u32),
    V6(u128, u128),
}

impl Range {
    fn contains(&self, ip: IpAddr) -> bool {
        match (self, ip) {
            (Self::V4(lo, hi), IpAddr::V4(a)) => (*lo..=*hi).contains(&u32::from(a)),
            (Self::V6(lo, hi), IpAddr::V6(a)) => (*lo..=*hi).contains(&u128::from(a)),
            _ => false,
        }
    }
}

/// Candidate rules by destination port, for port-carrying protocols.
#[derive(Debug, Clone, Default)]
struct PortIndex {
    /// Disabled (too large): scan every rule in force.
    scan: bool,
    /// Rules with a destination covering every port.
    any: Vec<u32>,
    /// Segment `i` covers ports `starts[i]..starts[i + 1]` (the last one up to 65535).
    starts: Vec<u16>,
    /// Rules (other than `any`) with a destination range covering segment `i`, ascending.
    lists: Vec<Vec<u32>>,
}

impl Matcher {
    fn new(r: &FilterRule) -> Self {
        let mut protos = [0u64; 4];
        for p in 0..=255u8 {
            if r.matches_protocol(IpProto(p)) {
                protos[usize::from(p >> 6)] |= 1 << (p & 63);
            }
        }
        let mut src4 = Vec::new();
        let mut src6 = Vec::new();
        for n in &r.src {
            match n {
                ipnet::IpNet::V4(n) => {
                    src4.push((u32::from(n.network()), u32::from(n.broadcast())))
                }
                ipnet::IpNet::V6(n) => {
                    src6.push((u128::from(n.network()), u128::from(n.broadcast())));
                }
            }
        }
        let dst = r
            .dst
            .iter()
            .map(|d| {
                let range = match d.net {
                    ipnet::IpNet::V4(n) => Range::V4(n.network().into(), n.broadcast().into()),
                    ipnet::IpNet::V6(n) => Range::V6(n.network().into(), n.broadcast().into()),
                };
                (range, d.ports.first, d.ports.last)
            })
            .collect();
        Self {
            deny: r.action == Action::Deny,
            protos,
            src4: merge(src4),
            src6: merge(src6),
            dst,
        }
    }

    fn matches(&self, t: &FiveTuple) -> bool {
        let p = t.proto.0;
        if self.protos[usize::from(p >> 6)] & (1 << (p & 63)) == 0 {
            return false;
        }
        let src_ok = match t.src {
            IpAddr::V4(a) => in_ranges(&self.src4, u32::from(a)),
            IpAddr::V6(a) => in_ranges(&self.src6, u128::from(a)),
        };
        let ports = t.proto.has_ports();
        src_ok
            && self.dst.iter().any(|(range, first, last)| {
                range.contains(t.dst) && (!ports || (*first..=*last).contains(&t.dst_port))
            })
    }
}

/// Sorts and merges overlapping or adjacent ranges.
fn merge<T: Ord + Copy + num_like::Succ>(mut v: Vec<(T, T)>) -> Vec<(T, T)> {
    v.sort_unstable();
    let mut out: Vec<(T, T)> = Vec::with_capacity(v.len());
    for (lo, hi) in v {
        match out.last_mut() {
            Some(last) if lo <= last.1.succ() => last.1 = last.1.max(hi),
            _ => out.push((lo, hi)),
        }
    }
    out
}

fn in_ranges<T: Ord + Copy>(ranges: &[(T, T)], a: T) -> bool {
    // The last range starting at or before `a`.
    let i = ranges.partition_point(|(lo, _)| *lo <= a);
    i > 0 && a <= ranges[i - 1].1
}

mod num_like {
    /// The next value, saturating.
    pub(super) trait Succ {
        fn succ(self) -> Self;
    }

    impl Succ for u32 {
        fn succ(self) -> Self {
            self.saturating_add(1)
        }
    }

    impl Succ for u128 {
        fn succ(self) -> Self {
            self.saturating_add(1)
        }
    }
}

impl PortIndex {
    fn build(rules: &[FilterRule], active: &[u32]) -> Self {
        let mut any = Vec::new();
        let mut bounds = vec![0u16];
        let mut ranged = Vec::new();
        for &i in active {
            let r = &rules[i as usize];
            if r.dst
                .iter()
                .any(|d| d.ports.first == 0 && d.ports.last == u16::MAX)
            {
                any.push(i);
                continue;
            }
            ranged.push(i);
            for d in &r.dst {
                bounds.push(d.ports.first);
                if let Some(next) = d.ports.last.checked_add(1) {
                    bounds.push(next);
                }
            }
        }
        bounds.sort_unstable();
        bounds.dedup();
        let mut lists = vec![Vec::new(); bounds.len()];
        let mut entries = 0usize;
        for &i in &ranged {
            let mut segs: Vec<usize> = Vec::new();
            for d in &rules[i as usize].dst {
                if d.ports.first > d.ports.last {
                    continue;
                }
                let from = bounds.partition_point(|b| *b < d.ports.first);
                let to = bounds.partition_point(|b| *b <= d.ports.last);
                segs.extend(from..to);
            }
            segs.sort_unstable();
            segs.dedup();
            entries += segs.len();
            if entries > MAX_INDEX_ENTRIES {
                return Self {
                    scan: true,
                    ..Self::default()
                };
            }
            for s in segs {
                lists[s].push(i);
            }
        }
        Self {
            scan: false,
            any,
            starts: bounds,
            lists,
        }
    }

    /// The candidate lists for destination port `port`.
    fn candidates(&self, port: u16) -> (&[u32], &[u32]) {
        let seg = self.starts.partition_point(|s| *s <= port);
        let list = seg
            .checked_sub(1)
            .and_then(|s| self.lists.get(s))
            .map_or(&[][..], Vec::as_slice);
        (&self.any, list)
    }
}

impl Filter {
    /// The rules, with those in force at Unix second `now` active.
    pub fn new(rules: Vec<FilterRule>, now: i64) -> Self {
        let matchers = rules.iter().map(Matcher::new).collect();
        let mut f = Self {
            rules,
            matchers,
            active: Vec::new(),
            index: PortIndex::default(),
            next_change: None,
        };
        f.refresh(now);
        if f.active.is_empty() {
            // `refresh` reports no change from the empty start; build the index anyway.
            f.index = PortIndex::build(&f.rules, &f.active);
        }
        f
    }

    /// Recomputes which rules are in force at `now`; returns whether that changed.
    pub fn refresh(&mut self, now: i64) -> bool {
        let active: Vec<u32> = (0..self.rules.len())
            .filter(|&i| self.rules[i].active_at(now))
            .filter_map(|i| u32::try_from(i).ok())
            .collect();
        self.next_change = self.rules.iter().filter_map(|r| r.next_change(now)).min();
        if active == self.active {
            return false;
        }
        self.index = PortIndex::build(&self.rules, &active);
        self.active = active;
        true
    }

    /// When the set of rules in force may change next (Unix seconds), if ever.
    pub fn next_change(&self) -> Option<i64> {
        self.next_change
    }

    /// All rules, in force or not.
    pub fn rules(&self) -> &[FilterRule] {
        &self.rules
    }

    /// Number of rules in force.
    pub fn active_count(&self) -> usize {
        self.active.len()
    }

    /// Decides for an inbound packet of flow `t`, by the rules in force: the lowest-numbered
    /// matching deny rule if any, else the lowest-numbered matching accept rule.
    pub fn evaluate(&self, t: &FiveTuple) -> Verdict {
        let mut deny: Option<u32> = None;
        let mut accept: Option<u32> = None;
        let mut consider = |i: u32| {
            let m = &self.matchers[i as usize];
            if m.matches(t) {
                let slot = if m.deny { &mut deny } else { &mut accept };
                if slot.is_none_or(|j| i < j) {
                    *slot = Some(i);
                }
            }
        };
        if t.proto.has_ports() && !self.index.scan {
            let (any, list) = self.index.candidates(t.dst_port);
            any.iter().chain(list).for_each(|&i| consider(i));
        } else {
            self.active.iter().for_each(|&i| consider(i));
        }
        match (deny, accept) {
            (Some(i), _) => Verdict::Deny(i as usize),
            (None, Some(i)) => Verdict::Accept(i as usize),
            (None, None) => Verdict::NoMatch,
        }
    }

    /// The application capabilities the rules in force grant `peer` at any of `own` (app
    /// grants in the policy), merged by name.
    pub fn capabilities(
        &self,
        peer: &[IpAddr],
        own: &[IpAddr],
    ) -> std::collections::BTreeMap<String, Vec<serde_json::Value>> {
        let mut out: std::collections::BTreeMap<String, Vec<serde_json::Value>> =
            std::collections::BTreeMap::new();
        for &i in &self.active {
            let Some(rule) = self.rules.get(i as usize) else {
                continue;
            };
            if !rule.src.iter().any(|n| peer.iter().any(|p| n.contains(p))) {
                continue;
            }
            for g in &rule.cap_grants {
                if g.dsts.iter().any(|d| own.iter().any(|o| d.contains(o))) {
                    for (name, values) in &g.caps {
                        let e = out.entry(name.clone()).or_default();
                        for v in values {
                            if !e.contains(v) {
                                e.push(v.clone());
                            }
                        }
                    }
                }
            }
        }
        out
    }

    /// The origin of rule `i`, for logs and status.
    pub fn origin(&self, i: usize) -> &str {
        self.rules.get(i).map_or("", |r| r.origin.as_str())
    }
}

/// Protocols whose packets carry a destination port the filter matches.
pub fn has_ports(p: IpProto) -> bool {
    p.has_ports()
}

/// The plain definition the indexed filter must agree with: every rule in force, checked
/// one by one.
#[cfg(test)]
fn evaluate_naive(rules: &[FilterRule], now: i64, t: &FiveTuple) -> Verdict {
    let mut accept = None;
    for (i, rule) in rules.iter().enumerate() {
        let hit = rule.active_at(now)
            && rule.matches_protocol(t.proto)
            && rule.src.iter().any(|n| n.contains(&t.src))
            && rule.dst.iter().any(|d| {
                d.net.contains(&t.dst) && (!t.proto.has_ports() || d.ports.contains(t.dst_port))
            });
        if !hit {
            continue;
        }
        match rule.action {
            Action::Deny => return Verdict::Deny(i),
            Action::Accept => {
                accept.get_or_insert(i);
            }
        }
    }
    accept.map_or(Verdict::NoMatch, Verdict::Accept)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ipnet::IpNet;
    use proptest::prelude::*;
    use wire::filter::{DstPorts, PortRange};

    fn rule(
        action: Action,
        src: &str,
        dst: &str,
        ports: (u16, u16),
        protos: Vec<IpProto>,
    ) -> FilterRule {
        FilterRule {
            origin: format!("test:{src}->{dst}"),
            action,
            src: vec![src.parse().unwrap()],
            dst: vec![DstPorts {
                net: dst.parse().unwrap(),
                ports: PortRange {
                    first: ports.0,
                    last: ports.1,
                },
            }],
            protocols: protos,
            all_protocols: false,
            valid: None,
            cap_grants: Vec::new(),
        }
    }

    fn tuple(proto: IpProto, src: &str, dst: &str, dport: u16) -> FiveTuple {
        FiveTuple {
            proto,
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            src_port: 40000,
            dst_port: dport,
        }
    }

    #[test]
    fn accept_matches_port_range_and_source() {
        let f = Filter::new(
            vec![rule(
                Action::Accept,
                "100.64.0.0/24",
                "100.64.1.1/32",
                (20, 30),
                vec![],
            )],
            0,
        );
        assert!(
            f.evaluate(&tuple(IpProto::TCP, "100.64.0.9", "100.64.1.1", 22))
                .is_accept()
        );
        assert_eq!(
            f.evaluate(&tuple(IpProto::TCP, "100.64.0.9", "100.64.1.1", 80)),
            Verdict::NoMatch
        );
        assert_eq!(
            f.evaluate(&tuple(IpProto::TCP, "100.64.9.9", "100.64.1.1", 22)),
            Verdict::NoMatch
        );
        // empty protocol list = tcp, udp, icmp
        assert!(
            f.evaluate(&tuple(IpProto::UDP, "100.64.0.9", "100.64.1.1", 25))
                .is_accept()
        );
        assert_eq!(
            f.evaluate(&tuple(IpProto(47), "100.64.0.9", "100.64.1.1", 0)),
            Verdict::NoMatch
        );
    }

    #[test]
    fn icmp_matches_on_addresses_only() {
        let f = Filter::new(
            vec![rule(
                Action::Accept,
                "100.64.0.0/24",
                "100.64.1.1/32",
                (22, 22),
                vec![],
            )],
            0,
        );
        assert!(
            f.evaluate(&tuple(IpProto::ICMP, "100.64.0.9", "100.64.1.1", 0))
                .is_accept()
        );
        let tcp_only = Filter::new(
            vec![rule(
                Action::Accept,
                "100.64.0.0/24",
                "100.64.1.1/32",
                (22, 22),
                vec![IpProto::TCP],
            )],
            0,
        );
        assert_eq!(
            tcp_only.evaluate(&tuple(IpProto::ICMP, "100.64.0.9", "100.64.1.1", 0)),
            Verdict::NoMatch
        );
    }

    #[test]
    fn deny_wins_over_accept_in_any_order() {
        let accept = rule(
            Action::Accept,
            "0.0.0.0/0",
            "100.64.1.1/32",
            (0, 65535),
            vec![],
        );
        let deny = rule(
            Action::Deny,
            "100.64.0.9/32",
            "100.64.1.1/32",
            (22, 22),
            vec![],
        );
        for rules in [vec![accept.clone(), deny.clone()], vec![deny, accept]] {
            let f = Filter::new(rules, 0);
            assert!(matches!(
                f.evaluate(&tuple(IpProto::TCP, "100.64.0.9", "100.64.1.1", 22)),
                Verdict::Deny(_)
            ));
            assert!(
                f.evaluate(&tuple(IpProto::TCP, "100.64.0.9", "100.64.1.1", 23))
                    .is_accept()
            );
            assert!(
                f.evaluate(&tuple(IpProto::TCP, "100.64.0.8", "100.64.1.1", 22))
                    .is_accept()
            );
        }
    }

    #[test]
    fn no_rules_means_default_deny() {
        let f = Filter::default();
        assert_eq!(
            f.evaluate(&tuple(IpProto::TCP, "100.64.0.9", "100.64.1.1", 22)),
            Verdict::NoMatch
        );
    }

    #[test]
    fn rules_count_only_inside_their_validity() {
        let mut r = rule(
            Action::Accept,
            "100.64.0.0/24",
            "100.64.1.1/32",
            (22, 22),
            vec![],
        );
        r.valid = Some(vec![
            wire::filter::ValidRange {
                from: 100,
                until: 200,
            },
            wire::filter::ValidRange {
                from: 300,
                until: 400,
            },
        ]);
        let ssh = tuple(IpProto::TCP, "100.64.0.9", "100.64.1.1", 22);
        let mut f = Filter::new(vec![r], 50);
        assert_eq!(f.evaluate(&ssh), Verdict::NoMatch);
        assert_eq!(f.next_change(), Some(100));
        assert!(f.refresh(100));
        assert!(f.evaluate(&ssh).is_accept());
        assert_eq!(f.next_change(), Some(200));
        assert!(!f.refresh(150), "nothing changed inside the range");
        assert!(f.refresh(200));
        assert_eq!(f.evaluate(&ssh), Verdict::NoMatch);
        assert_eq!(f.next_change(), Some(300));
        assert!(f.refresh(399));
        assert!(f.evaluate(&ssh).is_accept());
        assert!(f.refresh(400));
        assert_eq!(
            f.next_change(),
            None,
            "no more changes: the rule has expired"
        );
        assert_eq!(f.evaluate(&ssh), Verdict::NoMatch);
    }

    fn arb_rule() -> impl Strategy<Value = FilterRule> {
        let net = prop_oneof![
            (0u8..4, 0u8..=32).prop_map(|(b, len)| {
                IpNet::V4(
                    ipnet::Ipv4Net::new(std::net::Ipv4Addr::new(100, 64, 0, b * 4), len).unwrap(),
                )
            }),
            (0u8..4, 96u8..=128).prop_map(|(b, len)| {
                IpNet::V6(
                    ipnet::Ipv6Net::new(
                        std::net::Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, u16::from(b) * 4),
                        len,
                    )
                    .unwrap(),
                )
            }),
        ];
        (
            any::<bool>(),
            proptest::collection::vec(net.clone(), 1..4),
            proptest::collection::vec((net, 0u16..70, 0u16..70, any::<bool>()), 1..3),
            proptest::collection::vec(
                prop_oneof![
                    Just(IpProto::TCP),
                    Just(IpProto::UDP),
                    Just(IpProto::ICMP),
                    Just(IpProto(47))
                ],
                0..3,
            ),
            any::<bool>(),
            proptest::option::of((0i64..20, 0i64..20)),
        )
            .prop_map(|(deny, src, dst, protocols, all, valid)| FilterRule {
                origin: String::new(),
                action: if deny { Action::Deny } else { Action::Accept },
                src,
                dst: dst
                    .into_iter()
                    .map(|(net, a, b, wide)| DstPorts {
                        net,
                        ports: if wide {
                            PortRange::ANY
                        } else {
                            PortRange {
                                first: a.min(b),
                                last: a.max(b),
                            }
                        },
                    })
                    .collect(),
                protocols,
                all_protocols: all,
                valid: valid.map(|(a, b)| {
                    vec![wire::filter::ValidRange {
                        from: a.min(b),
                        until: a.max(b),
                    }]
                }),
                cap_grants: Vec::new(),
            })
    }

    fn arb_tuple() -> impl Strategy<Value = FiveTuple> {
        let v4 = (0u8..20).prop_map(|b| IpAddr::V4(std::net::Ipv4Addr::new(100, 64, 0, b)));
        let v6 = (0u16..20)
            .prop_map(|b| IpAddr::V6(std::net::Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, b)));
        (
            prop_oneof![
                Just(IpProto::TCP),
                Just(IpProto::UDP),
                Just(IpProto::ICMP),
                Just(IpProto(47)),
                Just(IpProto::SCTP)
            ],
            any::<bool>(),
            (0u8..20, 0u8..20),
            0u16..80,
        )
            .prop_flat_map(move |(proto, six, _, port)| {
                let (s, d) = if six {
                    (v6.clone().boxed(), v6.clone().boxed())
                } else {
                    (v4.clone().boxed(), v4.clone().boxed())
                };
                (s, d).prop_map(move |(src, dst)| FiveTuple {
                    proto,
                    src,
                    dst,
                    src_port: 1,
                    dst_port: port,
                })
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        #[test]
        fn the_indexed_filter_agrees_with_the_plain_definition(
            rules in proptest::collection::vec(arb_rule(), 0..12),
            tuples in proptest::collection::vec(arb_tuple(), 1..24),
            now in 0i64..22,
        ) {
            let f = Filter::new(rules.clone(), now);
            for t in &tuples {
                prop_assert_eq!(f.evaluate(t), evaluate_naive(&rules, now, t), "{:?}", t);
            }
        }
    }
}
