//! Compiled packet-filter rules, as the coordinator sends them to a node.
//!
//! A node receives only the rules that concern traffic *arriving* at it, already resolved to
//! addresses: nodes never see the policy language (like Tailscale's `tailcfg.FilterRule`).
//! The node's stateful filter admits an inbound packet when some `accept` rule matches it and no
//! `deny` rule does; replies to flows the node itself opened always pass.

use std::fmt;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// One compiled rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FilterRule {
    /// Where the rule came from, for logs and `lattice status` (a policy `file:line:col`, or
    /// the name of a built-in default).
    #[serde(default)]
    pub origin: String,
    /// What the rule does to a matching packet.
    #[serde(default)]
    pub action: Action,
    /// Source addresses the rule applies to.
    pub src: Vec<IpNet>,
    /// Destination addresses (this node's) and port ranges.
    pub dst: Vec<DstPorts>,
    /// IP protocols; empty means TCP, UDP and ICMP (v4 and v6). Ignored when
    /// `all_protocols` is set.
    #[serde(default)]
    pub protocols: Vec<IpProto>,
    /// Matches every IP protocol.
    #[serde(default)]
    pub all_protocols: bool,
    /// When the rule applies: `None` means always; otherwise only inside one of these ranges
    /// (time windows and just-in-time expiry, resolved by the coordinator to absolute times so
    /// the node needs no time-zone database). Needs capability 2.
    #[serde(default)]
    pub valid: Option<Vec<ValidRange>>,
    /// Application capabilities the rule grants its sources at these destinations
    /// (Tailscale's `CapGrant`, from a policy grant's `app`). Such a rule admits no packet:
    /// the destination node learns what the peer may do (`lattice whois`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cap_grants: Vec<CapGrant>,
}

/// Capabilities granted at some of a node's addresses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CapGrant {
    /// The destination addresses (the node's own, or routes it serves).
    pub dsts: Vec<IpNet>,
    /// Capability name (`example.com/cap/admin`) -> its values, as the policy wrote them.
    pub caps: std::collections::BTreeMap<String, Vec<serde_json::Value>>,
}

/// A half-open range of Unix times `[from, until)` in seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ValidRange {
    /// First second the rule applies.
    pub from: i64,
    /// First second it no longer applies.
    pub until: i64,
}

impl FilterRule {
    /// Whether the rule applies at Unix time `now` (seconds).
    pub fn active_at(&self, now: i64) -> bool {
        self.valid
            .as_ref()
            .is_none_or(|ranges| ranges.iter().any(|r| r.from <= now && now < r.until))
    }

    /// The first time after `now` at which [`Self::active_at`] may change.
    pub fn next_change(&self, now: i64) -> Option<i64> {
        self.valid
            .as_ref()?
            .iter()
            .flat_map(|r| [r.from, r.until])
            .filter(|t| *t > now)
            .min()
    }

    /// Whether the rule covers IP protocol `proto`.
    pub fn matches_protocol(&self, proto: IpProto) -> bool {
        if self.all_protocols {
            return true;
        }
        if self.protocols.is_empty() {
            return IpProto::DEFAULT_SET.contains(&proto);
        }
        self.protocols.contains(&proto)
    }
}

/// What a rule does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Admit matching packets.
    #[default]
    Accept,
    /// Drop matching packets, even when an accept rule also matches.
    Deny,
}

/// A destination network with a port range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DstPorts {
    /// The destination network.
    pub net: IpNet,
    /// The destination ports (ignored for protocols without ports).
    pub ports: PortRange,
}

/// An inclusive port range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortRange {
    /// First port in the range.
    pub first: u16,
    /// Last port in the range (inclusive).
    pub last: u16,
}

impl PortRange {
    /// Every port.
    pub const ANY: Self = Self {
        first: 0,
        last: u16::MAX,
    };

    /// Whether `port` lies in the range.
    pub fn contains(&self, port: u16) -> bool {
        self.first <= port && port <= self.last
    }
}

/// An IP protocol number (IANA).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct IpProto(pub u8);

impl IpProto {
    /// ICMP for IPv4.
    pub const ICMP: Self = Self(1);
    /// TCP.
    pub const TCP: Self = Self(6);
    /// UDP.
    pub const UDP: Self = Self(17);
    /// ICMP for IPv6.
    pub const ICMPV6: Self = Self(58);
    /// SCTP.
    pub const SCTP: Self = Self(132);

    /// The protocols an empty `protocols` list stands for.
    pub const DEFAULT_SET: [Self; 4] = [Self::TCP, Self::UDP, Self::ICMP, Self::ICMPV6];

    /// Whether the protocol carries 16-bit ports that rules can match.
    pub fn has_ports(self) -> bool {
        matches!(self, Self::TCP | Self::UDP | Self::SCTP)
    }
}

impl fmt::Debug for IpProto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::ICMP => f.write_str("icmp"),
            Self::TCP => f.write_str("tcp"),
            Self::UDP => f.write_str("udp"),
            Self::ICMPV6 => f.write_str("icmpv6"),
            Self::SCTP => f.write_str("sctp"),
            Self(n) => write!(f, "proto-{n}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn can_deserialize_filter_rule() {
        let json = r#"{
            "origin": "policy.hujson:4:7",
            "src": ["100.64.0.0/10", "fd00:1:2::/48"],
            "dst": [{"net": "100.64.0.5/32", "ports": {"first": 22, "last": 22}}],
            "protocols": [6]
        }"#;
        let rule: FilterRule = serde_json::from_str(json).unwrap();
        assert_eq!(rule.action, Action::Accept);
        assert_eq!(rule.src.len(), 2);
        assert!(rule.dst[0].ports.contains(22));
        assert!(!rule.dst[0].ports.contains(23));
        assert_eq!(rule.protocols, vec![IpProto::TCP]);
        assert!(rule.matches_protocol(IpProto::TCP));
        assert!(!rule.matches_protocol(IpProto::UDP));
    }

    #[test]
    fn empty_protocol_list_means_tcp_udp_icmp() {
        let mut rule: FilterRule = serde_json::from_str(r#"{"src": [], "dst": []}"#).unwrap();
        for p in [IpProto::TCP, IpProto::UDP, IpProto::ICMP, IpProto::ICMPV6] {
            assert!(rule.matches_protocol(p));
        }
        assert!(!rule.matches_protocol(IpProto::SCTP));
        rule.all_protocols = true;
        assert!(rule.matches_protocol(IpProto(47)));
    }

    #[test]
    fn filter_rule_round_trips() {
        let rule = FilterRule {
            origin: "default:allow-all".into(),
            action: Action::Deny,
            src: vec!["0.0.0.0/0".parse().unwrap()],
            dst: vec![DstPorts {
                net: "::/0".parse().unwrap(),
                ports: PortRange::ANY,
            }],
            protocols: vec![],
            all_protocols: true,
            valid: Some(vec![ValidRange {
                from: 10,
                until: 20,
            }]),
            cap_grants: Vec::new(),
        };
        assert!(!rule.active_at(9) && rule.active_at(10) && !rule.active_at(20));
        assert_eq!(rule.next_change(12), Some(20));
        assert_eq!(rule.next_change(25), None);
        let json = serde_json::to_string(&rule).unwrap();
        assert_eq!(serde_json::from_str::<FilterRule>(&json).unwrap(), rule);
    }

    #[test]
    fn unknown_action_is_an_error_not_a_silent_accept() {
        let json = r#"{"action": "log", "src": [], "dst": []}"#;
        assert!(serde_json::from_str::<FilterRule>(json).is_err());
    }
}
