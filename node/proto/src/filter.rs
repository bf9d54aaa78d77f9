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

use ipnet::IpNet;
use wire::IpProto;
use wire::filter::{Action, DstPorts, FilterRule};

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

/// A set of compiled rules and which of them are in force.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    rules: Vec<FilterRule>,
    /// Indices of the rules in force at the last refresh.
    active: Vec<usize>,
    /// The earliest second after the last refresh at which `active` may change.
    next_change: Option<i64>,
}

impl Filter {
    /// The rules, with those in force at Unix second `now` active.
    pub fn new(rules: Vec<FilterRule>, now: i64) -> Self {
        let mut f = Self {
            rules,
            active: Vec::new(),
            next_change: None,
        };
        f.refresh(now);
        f
    }

    /// Recomputes which rules are in force at `now`; returns whether that changed.
    pub fn refresh(&mut self, now: i64) -> bool {
        let active: Vec<usize> = (0..self.rules.len())
            .filter(|&i| self.rules[i].active_at(now))
            .collect();
        self.next_change = self.rules.iter().filter_map(|r| r.next_change(now)).min();
        let changed = active != self.active;
        self.active = active;
        changed
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

    /// Decides for an inbound packet of flow `t`, by the rules in force.
    pub fn evaluate(&self, t: &FiveTuple) -> Verdict {
        let mut accept = None;
        for &i in &self.active {
            let rule = &self.rules[i];
            if !matches(rule, t) {
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

    /// The origin of rule `i`, for logs and status.
    pub fn origin(&self, i: usize) -> &str {
        self.rules.get(i).map_or("", |r| r.origin.as_str())
    }
}

fn matches(rule: &FilterRule, t: &FiveTuple) -> bool {
    rule.matches_protocol(t.proto)
        && contains_any(&rule.src, t.src)
        && rule.dst.iter().any(|d| dst_matches(d, t))
}

fn dst_matches(d: &DstPorts, t: &FiveTuple) -> bool {
    d.net.contains(&t.dst) && (!t.proto.has_ports() || d.ports.contains(t.dst_port))
}

fn contains_any(nets: &[IpNet], ip: IpAddr) -> bool {
    nets.iter().any(|n| n.contains(&ip))
}

/// Protocols whose packets carry a destination port the filter matches.
pub fn has_ports(p: IpProto) -> bool {
    p.has_ports()
}

#[cfg(test)]
mod tests {
    use super::*;
    use wire::filter::PortRange;

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
}
