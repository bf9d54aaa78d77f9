//! Compiling a policy for one node.

use std::collections::BTreeSet;

use ipnet::IpNet;
use wire::NodeId;
use wire::filter::{Action, DstPorts, FilterRule, PortRange};

use crate::inventory::Inventory;
use crate::{Policy, PolicyKind};

/// Origin string of the built-in allow-all default.
pub(crate) const ALLOW_ALL_ORIGIN: &str = "default:allow-all";

/// What one node receives from the policy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Compiled {
    /// Inbound rules the node enforces.
    pub rules: Vec<FilterRule>,
    /// Peers the node may talk to or be reached by; all others are invisible to it.
    pub visible_peers: BTreeSet<NodeId>,
}

impl Policy {
    /// Compiles the policy for node `me`. A node unknown to the inventory gets nothing.
    pub fn compile_for(&self, inventory: &Inventory, me: NodeId) -> Compiled {
        let Some(node) = inventory.get(me) else {
            return Compiled::default();
        };
        match self.kind {
            PolicyKind::AllowAll => Compiled {
                rules: vec![FilterRule {
                    origin: ALLOW_ALL_ORIGIN.to_owned(),
                    action: Action::Accept,
                    src: vec![any_v4(), any_v6()],
                    dst: node
                        .addresses
                        .iter()
                        .map(|a| DstPorts {
                            net: IpNet::from(*a),
                            ports: PortRange::ANY,
                        })
                        .collect(),
                    protocols: Vec::new(),
                    all_protocols: true,
                }],
                visible_peers: inventory
                    .iter()
                    .map(|n| n.id)
                    .filter(|id| *id != me)
                    .collect(),
            },
        }
    }
}

fn any_v4() -> IpNet {
    "0.0.0.0/0".parse().expect("valid CIDR")
}

fn any_v6() -> IpNet {
    "::/0".parse().expect("valid CIDR")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::InventoryNode;

    fn inv() -> Inventory {
        (1..=3)
            .map(|i| InventoryNode {
                id: NodeId(i),
                name: format!("n{i}"),
                addresses: vec![
                    format!("100.64.0.{i}").parse().unwrap(),
                    format!("fd00::{i}").parse().unwrap(),
                ],
                user: None,
                tags: vec![],
            })
            .collect()
    }

    #[test]
    fn allow_all_lets_every_peer_reach_every_port_of_the_node() {
        let c = Policy::allow_all().compile_for(&inv(), NodeId(2));
        assert_eq!(
            c.visible_peers,
            [NodeId(1), NodeId(3)].into_iter().collect()
        );
        assert_eq!(c.rules.len(), 1);
        let r = &c.rules[0];
        assert_eq!(r.origin, "default:allow-all");
        assert_eq!(r.action, Action::Accept);
        assert_eq!(
            r.dst.iter().map(|d| d.net.to_string()).collect::<Vec<_>>(),
            ["100.64.0.2/32", "fd00::2/128"]
        );
        assert!(r.dst.iter().all(|d| d.ports == PortRange::ANY));
        assert!(r.all_protocols);
    }

    #[test]
    fn unknown_node_gets_nothing() {
        let c = Policy::allow_all().compile_for(&inv(), NodeId(99));
        assert!(c.rules.is_empty());
        assert!(c.visible_peers.is_empty());
    }
}
