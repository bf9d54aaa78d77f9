//! Plain records the coordinator keeps about nodes and keys (database rows, no behaviour).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use wire::{AttrValue, MachineKey, NodeId, NodeKey};

/// Node attributes by name (`node:os`, `fact:edr`, `custom:team`).
pub type Attrs = BTreeMap<String, AttrValue>;

/// A registered node.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeRecord {
    /// Id, never reused.
    pub id: NodeId,
    /// Machine key proven on every control connection.
    pub machine_key: MachineKey,
    /// WireGuard public key.
    pub node_key: NodeKey,
    /// Unique short name.
    pub name: String,
    /// Overlay IPv4.
    pub ipv4: Ipv4Addr,
    /// Overlay IPv6.
    pub ipv6: Ipv6Addr,
    /// Owning user (None for tagged or unowned nodes).
    pub user: Option<String>,
    /// ACL tags.
    pub tags: Vec<String>,
    /// Removed automatically once it goes away.
    pub ephemeral: bool,
    /// Reported OS.
    pub os: String,
    /// Reported client version.
    pub client_version: String,
    /// Reported UDP endpoints.
    pub endpoints: Vec<SocketAddr>,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds of the last control contact.
    pub last_seen: Option<i64>,
    /// Node-key expiry, unix seconds.
    pub expires_at: Option<i64>,
    /// Posture the node reports (`node:*` and `fact:*`).
    pub posture: Attrs,
    /// When the posture last changed, unix seconds.
    pub posture_at: Option<i64>,
    /// Attributes admins set (`custom:*`).
    pub custom_attrs: Attrs,
    /// The relay the node reported as its home.
    pub home_relay: Option<wire::RelayId>,
    /// The NAT behaviour the node measured.
    pub nat: Option<wire::NatInfo>,
    /// The replica holding the node's control session, if any (the node is online).
    pub connected_to: Option<String>,
    /// The identity provider's groups of the node's user, from their last sign-in.
    pub idp_groups: Vec<String>,
    /// Whether the sign-in that admitted (or last renewed) the node used a second factor;
    /// `None` for nodes that did not join by signing in.
    pub user_mfa: Option<bool>,
    /// Routes the node advertises (its last hello).
    pub advertised_routes: Vec<ipnet::IpNet>,
    /// Routes an admin approved (only those also advertised are in force).
    pub approved_routes: Vec<ipnet::IpNet>,
    /// The paths it last reported to its peers.
    pub paths: Vec<wire::PeerPath>,
    /// When it reported them, Unix seconds.
    pub paths_at: Option<i64>,
}

impl NodeRecord {
    /// Both overlay addresses, IPv4 first.
    pub fn addresses(&self) -> Vec<IpAddr> {
        vec![IpAddr::V4(self.ipv4), IpAddr::V6(self.ipv6)]
    }

    /// Everything the policy may test about this node: the OS and client version from its
    /// hello, overridden by its reported posture, plus the admins' `custom:` attributes.
    pub fn policy_attrs(&self) -> Attrs {
        let mut a = Attrs::new();
        if !self.os.is_empty() {
            a.insert("node:os".into(), AttrValue::String(self.os.clone()));
        }
        if !self.client_version.is_empty() {
            a.insert(
                "node:clientVersion".into(),
                AttrValue::String(self.client_version.clone()),
            );
        }
        a.insert("node:hostname".into(), AttrValue::String(self.name.clone()));
        a.extend(
            self.posture
                .iter()
                .filter(|(k, _)| k.starts_with("node:") || k.starts_with("fact:"))
                .map(|(k, v)| (k.clone(), v.clone())),
        );
        // What the user's sign-in said: set by the coordinator only (a node's posture report
        // cannot name these namespaces).
        if self.user.is_some() && self.tags.is_empty() {
            for g in &self.idp_groups {
                a.insert(policy::idp_group_attr(g), AttrValue::Bool(true));
            }
        }
        if let Some(mfa) = self.user_mfa {
            a.insert("user:mfa".into(), AttrValue::Bool(mfa));
        }
        a.extend(
            self.custom_attrs
                .iter()
                .filter(|(k, _)| k.starts_with("custom:"))
                .map(|(k, v)| (k.clone(), v.clone())),
        );
        a
    }

    /// Whether the node's key has expired at `now` (unix seconds).
    pub fn is_expired(&self, now: i64) -> bool {
        self.expires_at.is_some_and(|t| t <= now)
    }
}

/// An auth key's stored metadata (never the secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthKeyInfo {
    /// Public id (12 hex).
    pub id: String,
    /// Can register more than one node.
    pub reusable: bool,
    /// Nodes it registers are ephemeral.
    pub ephemeral: bool,
    /// Tags given to nodes it registers.
    pub tags: Vec<String>,
    /// User owning nodes it registers.
    pub user: Option<String>,
    /// Unix seconds.
    pub created_at: i64,
    /// Who created it.
    pub created_by: String,
    /// Unix seconds.
    pub expires_at: i64,
    /// Unix seconds, if revoked.
    pub revoked_at: Option<i64>,
    /// Number of registrations done with it.
    pub used_count: i64,
}

#[cfg(test)]
impl NodeRecord {
    /// Node `i` (id, keys and addresses derived from it) with `tags`, for unit tests.
    pub(crate) fn for_test(i: u8, tags: &[&str]) -> Self {
        Self {
            id: NodeId(u64::from(i)),
            machine_key: MachineKey::from_bytes([i; 32]),
            node_key: NodeKey::from_bytes([i; 32]),
            name: format!("n{i}"),
            ipv4: Ipv4Addr::new(100, 64, 0, i),
            ipv6: format!("fd00::{i}").parse().expect("an IPv6 address"),
            user: None,
            tags: tags.iter().map(|t| (*t).to_owned()).collect(),
            ephemeral: false,
            os: "linux".into(),
            client_version: String::new(),
            endpoints: vec![],
            created_at: 0,
            last_seen: None,
            expires_at: None,
            posture: Default::default(),
            posture_at: None,
            custom_attrs: Default::default(),
            home_relay: None,
            nat: None,
            connected_to: None,
            idp_groups: Vec::new(),
            user_mfa: None,
            advertised_routes: Vec::new(),
            approved_routes: Vec::new(),
            paths: Vec::new(),
            paths_at: None,
        }
    }
}
