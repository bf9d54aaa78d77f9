//! The facts about nodes that a policy is evaluated against.

use std::collections::BTreeMap;
use std::net::IpAddr;

use wire::NodeId;

use crate::ast::Attrs;

/// One node as the policy sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct InventoryNode {
    /// The node's id.
    pub id: NodeId,
    /// Short name.
    pub name: String,
    /// Overlay addresses.
    pub addresses: Vec<IpAddr>,
    /// Owning user (None for tagged nodes).
    pub user: Option<String>,
    /// ACL tags.
    pub tags: Vec<String>,
    /// Posture facts and admin-set attributes (`node:os`, `custom:team`, `fact:ok`).
    pub attrs: Attrs,
    /// Subnet routes the node serves (advertised and approved; exit routes are not here).
    /// A destination `*` or a prefix overlapping one reaches through the node.
    pub routes: Vec<ipnet::IpNet>,
}

/// All nodes in the mesh, by id.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Inventory {
    nodes: BTreeMap<NodeId, InventoryNode>,
}

impl Inventory {
    /// An empty inventory.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds or replaces a node.
    pub fn upsert(&mut self, node: InventoryNode) {
        self.nodes.insert(node.id, node);
    }

    /// Removes a node.
    pub fn remove(&mut self, id: NodeId) -> Option<InventoryNode> {
        self.nodes.remove(&id)
    }

    /// Looks a node up.
    pub fn get(&self, id: NodeId) -> Option<&InventoryNode> {
        self.nodes.get(&id)
    }

    /// All nodes in id order.
    pub fn iter(&self) -> impl Iterator<Item = &InventoryNode> {
        self.nodes.values()
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether there are no nodes.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }
}

impl FromIterator<InventoryNode> for Inventory {
    fn from_iter<T: IntoIterator<Item = InventoryNode>>(iter: T) -> Self {
        Self {
            nodes: iter.into_iter().map(|n| (n.id, n)).collect(),
        }
    }
}
