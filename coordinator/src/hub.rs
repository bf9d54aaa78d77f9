//! The coordinator's in-memory view of the mesh, shared by all control sessions.
//!
//! The database is the source of truth; the hub mirrors the nodes that are not expired, tracks
//! which ones hold a control session, and wakes every session when something changed
//! (a `watch` channel, so bursts of changes coalesce). Sessions then compute their own deltas
//! with [`crate::netmap::next_map`].

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use policy::{Inventory, InventoryNode, Policy};
use tokio::sync::{mpsc, watch};
use wire::{ErrorCode, NodeId, TunnelSecurity};

use crate::model::NodeRecord;
use crate::netmap::{LiveNode, Snapshot};

/// Why a session is being closed by the coordinator.
#[derive(Debug, Clone)]
pub struct Kick {
    /// Error code sent to the node.
    pub code: ErrorCode,
    /// Human-readable reason.
    pub message: String,
}

/// Shared mesh state.
pub struct Hub {
    state: RwLock<HubState>,
    changed: watch::Sender<u64>,
}

/// The state behind the hub's lock.
pub struct HubState {
    nodes: BTreeMap<NodeId, LiveNode>,
    inventory: Inventory,
    policy: Arc<Policy>,
    policy_rev: u64,
    membership_rev: u64,
    next_rev: u64,
    sessions: HashMap<NodeId, (u64, mpsc::UnboundedSender<Kick>)>,
    next_conn: u64,
    domain: String,
    tunnel_security: TunnelSecurity,
}

/// A registered control session. Dropping it marks the node offline (if no newer session for
/// the same node replaced it).
pub struct SessionGuard {
    hub: Arc<Hub>,
    node: NodeId,
    conn: u64,
    /// Receives a [`Kick`] when the coordinator wants this session closed.
    pub kicks: mpsc::UnboundedReceiver<Kick>,
}

impl Hub {
    /// A hub holding `nodes` under `policy`.
    pub fn new(domain: String, policy: Policy, nodes: Vec<NodeRecord>, now: i64) -> Arc<Self> {
        let (changed, _) = watch::channel(0);
        let hub = Arc::new(Self {
            state: RwLock::new(HubState {
                nodes: BTreeMap::new(),
                inventory: Inventory::new(),
                policy: Arc::new(policy),
                policy_rev: 1,
                membership_rev: 1,
                next_rev: 1,
                sessions: HashMap::new(),
                next_conn: 1,
                domain,
                tunnel_security: TunnelSecurity::PostQuantum,
            }),
            changed,
        });
        for n in nodes {
            if !n.is_expired(now) {
                hub.write().insert(n, false);
            }
        }
        hub
    }

    /// Read access to the state.
    pub fn read(&self) -> RwLockReadGuard<'_, HubState> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, HubState> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    /// A receiver that changes whenever the mesh does.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn notify(&self) {
        self.changed.send_modify(|v| *v += 1);
    }

    /// Adds or updates a node (after a registration, resume, endpoint change, ...).
    pub fn upsert_node(&self, record: NodeRecord) {
        {
            let mut st = self.write();
            let online = st.nodes.get(&record.id).is_some_and(|n| n.online);
            st.insert(record, online);
        }
        self.notify();
    }

    /// Drops a node (removed, expired). Its session, if any, is kicked with `kick`.
    pub fn remove_node(&self, id: NodeId, kick: Option<Kick>) {
        {
            let mut st = self.write();
            if st.nodes.remove(&id).is_some() {
                st.inventory.remove(id);
                st.membership_rev += 1;
            }
            if let Some(k) = kick
                && let Some((_, tx)) = st.sessions.get(&id)
            {
                let _ = tx.send(k);
            }
        }
        self.notify();
    }

    /// Replaces the policy in force.
    pub fn set_policy(&self, policy: Policy) {
        {
            let mut st = self.write();
            st.policy = Arc::new(policy);
            st.policy_rev += 1;
        }
        self.notify();
    }

    /// Replaces the mesh's tunnel security.
    pub fn set_tunnel_security(&self, security: TunnelSecurity) {
        self.write().tunnel_security = security;
        self.notify();
    }

    /// Registers a control session for `node`, kicking an older one for the same node, and
    /// marks the node online.
    pub fn attach(self: &Arc<Self>, node: NodeId) -> SessionGuard {
        let (tx, kicks) = mpsc::unbounded_channel();
        let conn = {
            let mut st = self.write();
            let conn = st.next_conn;
            st.next_conn += 1;
            if let Some((_, old)) = st.sessions.insert(node, (conn, tx)) {
                let _ = old.send(Kick {
                    code: ErrorCode::Internal,
                    message: "replaced by a newer connection from the same node".into(),
                });
            }
            st.set_online(node, true);
            conn
        };
        self.notify();
        SessionGuard {
            hub: Arc::clone(self),
            node,
            conn,
            kicks,
        }
    }

    /// Whether `node` currently holds a control session.
    pub fn is_connected(&self, node: NodeId) -> bool {
        self.read().sessions.contains_key(&node)
    }
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        {
            let mut st = self.hub.write();
            if st
                .sessions
                .get(&self.node)
                .is_some_and(|(c, _)| *c == self.conn)
            {
                st.sessions.remove(&self.node);
                st.set_online(self.node, false);
            }
        }
        self.hub.notify();
    }
}

impl HubState {
    fn insert(&mut self, record: NodeRecord, online: bool) {
        let rev = self.bump();
        let membership_changed = self.nodes.get(&record.id).is_none_or(|old| {
            old.record.addresses() != record.addresses()
                || old.record.tags != record.tags
                || old.record.user != record.user
                || old.record.name != record.name
        });
        if membership_changed {
            self.inventory.upsert(InventoryNode {
                id: record.id,
                name: record.name.clone(),
                addresses: record.addresses(),
                user: record.user.clone(),
                tags: record.tags.clone(),
            });
            self.membership_rev += 1;
        }
        self.nodes.insert(
            record.id,
            LiveNode {
                record,
                online,
                rev,
            },
        );
    }

    fn set_online(&mut self, id: NodeId, online: bool) {
        let rev = self.bump();
        if let Some(n) = self.nodes.get_mut(&id)
            && n.online != online
        {
            n.online = online;
            n.rev = rev;
        }
    }

    fn bump(&mut self) -> u64 {
        self.next_rev += 1;
        self.next_rev
    }

    /// The snapshot sessions compute netmaps from.
    pub fn snapshot(&self) -> Snapshot<'_> {
        Snapshot {
            nodes: &self.nodes,
            inventory: &self.inventory,
            policy: &self.policy,
            policy_rev: self.policy_rev,
            membership_rev: self.membership_rev,
            domain: &self.domain,
            tunnel_security: self.tunnel_security,
        }
    }

    /// The mesh's tunnel security.
    pub fn tunnel_security(&self) -> TunnelSecurity {
        self.tunnel_security
    }

    /// A node, if present and not expired.
    pub fn node(&self, id: NodeId) -> Option<&LiveNode> {
        self.nodes.get(&id)
    }

    /// All present nodes.
    pub fn nodes(&self) -> impl Iterator<Item = &LiveNode> {
        self.nodes.values()
    }

    /// The policy in force.
    pub fn policy(&self) -> Arc<Policy> {
        Arc::clone(&self.policy)
    }
}
