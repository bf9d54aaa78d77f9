//! Matching inbound packets against compiled [`wire::FilterRule`]s (the stateless half of the
//! packet filter; [`crate::conntrack`] is the stateful half).
//!
//! Semantics, documented for admins in the policy docs:
//! - a packet is admitted when at least one `accept` rule matches and no `deny` rule does
//!   (deny wins), and dropped when no rule matches (default deny);
//! - TCP, UDP and SCTP match on destination port; ICMP and protocols without ports match on
//!   addresses only (as in Tailscale: if you may reach any port of a host, you may ping it).

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

/// A set of compiled rules.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    rules: Vec<FilterRule>,
}

impl Filter {
    /// Compiles wire rules.
    pub fn new(rules: Vec<FilterRule>) -> Self {
        Self { rules }
    }

    /// The rules.
    pub fn rules(&self) -> &[FilterRule] {
        &self.rules
    }

    /// Decides for an inbound packet of flow `t`.
    pub fn evaluate(&self, t: &FiveTuple) -> Verdict {
        let mut accept = None;
        for (i, rule) in self.rules.iter().enumerate() {
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
        let f = Filter::new(vec![rule(
            Action::Accept,
            "100.64.0.0/24",
            "100.64.1.1/32",
            (20, 30),
            vec![],
        )]);
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
        let f = Filter::new(vec![rule(
            Action::Accept,
            "100.64.0.0/24",
            "100.64.1.1/32",
            (22, 22),
            vec![],
        )]);
        assert!(
            f.evaluate(&tuple(IpProto::ICMP, "100.64.0.9", "100.64.1.1", 0))
                .is_accept()
        );
        let tcp_only = Filter::new(vec![rule(
            Action::Accept,
            "100.64.0.0/24",
            "100.64.1.1/32",
            (22, 22),
            vec![IpProto::TCP],
        )]);
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
            let f = Filter::new(rules);
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
}
