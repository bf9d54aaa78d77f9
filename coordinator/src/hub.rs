//! The coordinator's in-memory view of the mesh, shared by all control sessions.
//!
//! The database is the source of truth; the hub mirrors the nodes that are not expired, tracks
//! which ones hold a control session, and wakes every session when something changed
//! (a `watch` channel, so bursts of changes coalesce). Sessions then compute their own deltas
//! with [`crate::netmap::next_map`].

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use jiff::Timestamp;
use policy::{CompiledPolicy, Inventory, InventoryNode, Policy};
use tokio::sync::{mpsc, watch};
use wire::{ErrorCode, NodeId, NodeKey, RelayInfo, TunnelSecurity};

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
    presence: Mutex<Option<mpsc::UnboundedSender<crate::presence::Event>>>,
}

/// The state behind the hub's lock.
pub struct HubState {
    nodes: BTreeMap<NodeId, LiveNode>,
    inventory: Inventory,
    policy: Arc<Policy>,
    policy_version: i64,
    policy_rev: u64,
    membership_rev: u64,
    next_rev: u64,
    sessions: HashMap<NodeId, (u64, mpsc::UnboundedSender<Kick>)>,
    next_conn: u64,
    domain: String,
    tunnel_security: TunnelSecurity,
    compiled: Mutex<Option<(CompileKey, Arc<CompiledPolicy>)>>,
    relays: Arc<Vec<RelayInfo>>,
    relay_rev: u64,
    coordinators: Arc<Vec<String>>,
    coordinators_rev: u64,
    by_key: HashMap<NodeKey, NodeId>,
    /// Node keys that left the mesh (removed, expired, rotated away), until the last second a
    /// ticket issued for them can be valid: what standalone relays must stop serving.
    revoked: BTreeMap<NodeKey, i64>,
}

/// What a compiled policy depends on: the policy, the facts about nodes, and the day it was
/// compiled for (recurring windows are resolved [`policy::HORIZON`] ahead of that day).
pub type CompileKey = (u64, u64, i64);

/// Compilations are anchored to the start of a UTC day, so every compilation on one day gives
/// the same validity ranges and nodes are not re-sent unchanged rules.
const DAY_SECS: i64 = 24 * 3600;

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
    /// A hub holding `nodes` under `policy` (stored `version`, 0 for the default).
    pub fn new(
        domain: String,
        policy: Policy,
        version: i64,
        nodes: Vec<NodeRecord>,
        now: i64,
    ) -> Arc<Self> {
        let (changed, _) = watch::channel(0);
        let hub = Arc::new(Self {
            state: RwLock::new(HubState {
                nodes: BTreeMap::new(),
                inventory: Inventory::new(),
                policy: Arc::new(policy),
                policy_version: version,
                policy_rev: 1,
                membership_rev: 1,
                next_rev: 1,
                sessions: HashMap::new(),
                next_conn: 1,
                domain,
                tunnel_security: TunnelSecurity::PostQuantum,
                compiled: Mutex::new(None),
                relays: Arc::new(Vec::new()),
                relay_rev: 0,
                coordinators: Arc::new(Vec::new()),
                coordinators_rev: 0,
                by_key: HashMap::new(),
                revoked: BTreeMap::new(),
            }),
            changed,
            presence: Mutex::new(None),
        });
        for n in nodes {
            if !n.is_expired(now) {
                hub.write().insert(n);
            }
        }
        hub
    }

    /// Where sessions coming and going are reported (see [`crate::presence`]).
    pub fn report_presence_to(&self, tx: mpsc::UnboundedSender<crate::presence::Event>) {
        *self.presence.lock().unwrap_or_else(|e| e.into_inner()) = Some(tx);
    }

    fn report(&self, node: NodeId, up: bool) {
        if let Some(tx) = self
            .presence
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            let _ = tx.send((node, up));
        }
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
        self.write().insert(record);
        self.notify();
    }

    /// Applies a run of committed node changes at once: `present` are added or updated,
    /// `gone` are dropped and their sessions kicked.
    pub fn apply_nodes(&self, present: Vec<NodeRecord>, gone: Vec<(NodeId, Kick)>) {
        if present.is_empty() && gone.is_empty() {
            return;
        }
        {
            let mut st = self.write();
            for r in present {
                st.insert(r);
            }
            for (id, kick) in gone {
                st.drop_node(id, Some(kick));
            }
        }
        self.notify();
    }

    /// Drops a node (removed, expired). Its session, if any, is kicked with `kick`.
    pub fn remove_node(&self, id: NodeId, kick: Option<Kick>) {
        self.write().drop_node(id, kick);
        self.notify();
    }

    /// Puts stored policy `version` in force, unless a newer version already is (two admins
    /// setting policies at once end with the one the database holds last).
    pub fn set_policy(&self, version: i64, policy: Policy) {
        {
            let mut st = self.write();
            if version <= st.policy_version {
                return;
            }
            st.policy = Arc::new(policy);
            st.policy_version = version;
            st.policy_rev += 1;
        }
        self.notify();
    }

    /// Wakes every session when the compilation day rolls over, so rules for recurring time
    /// windows are extended before nodes run out of them. Call it periodically.
    pub fn tick(&self, now_unix: i64) {
        let day = now_unix.div_euclid(DAY_SECS);
        let stale = {
            let st = self.read();
            let guard = st.compiled.lock().unwrap_or_else(|e| e.into_inner());
            guard.as_ref().is_some_and(|((_, _, d), _)| *d != day)
        };
        if stale {
            self.notify();
        }
    }

    /// Replaces the relay list nodes receive.
    pub fn set_relays(&self, relays: Vec<RelayInfo>) {
        {
            let mut st = self.write();
            st.relays = Arc::new(relays);
            st.relay_rev += 1;
        }
        self.notify();
    }

    /// Replaces the list of coordinator replicas nodes are told about.
    pub fn set_coordinators(&self, urls: Vec<String>) {
        {
            let mut st = self.write();
            if *st.coordinators == urls {
                return;
            }
            st.coordinators = Arc::new(urls);
            st.coordinators_rev += 1;
        }
        self.notify();
    }

    /// Replaces the mesh's tunnel security.
    pub fn set_tunnel_security(&self, security: TunnelSecurity) {
        {
            let mut st = self.write();
            if st.tunnel_security == security {
                return;
            }
            st.tunnel_security = security;
        }
        self.notify();
    }

    /// Nodes whose control session this process holds.
    pub fn connected_here(&self) -> Vec<NodeId> {
        self.read().sessions.keys().copied().collect()
    }

    /// Registers a control session for `node`, kicking an older one for the same node, and
    /// reports the node online.
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
            conn
        };
        self.report(node, true);
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
        let last = {
            let mut st = self.hub.write();
            let last = st
                .sessions
                .get(&self.node)
                .is_some_and(|(c, _)| *c == self.conn);
            if last {
                st.sessions.remove(&self.node);
            }
            last
        };
        if last {
            self.hub.report(self.node, false);
        }
    }
}

impl HubState {
    fn revoke(&mut self, key: NodeKey) {
        let now = crate::state::unix_now();
        let until = now + i64::try_from(crate::relays::TICKET_TTL.as_secs()).unwrap_or(120);
        self.revoked.retain(|_, u| *u >= now);
        self.revoked.insert(key, until);
    }

    /// The node keys relays must refuse now, with until when.
    pub fn revocations(&self, now: i64) -> Vec<(NodeKey, i64)> {
        self.revoked
            .iter()
            .filter(|(_, until)| **until >= now)
            .map(|(k, u)| (*k, *u))
            .collect()
    }

    fn drop_node(&mut self, id: NodeId, kick: Option<Kick>) {
        if let Some(old) = self.nodes.remove(&id) {
            self.inventory.remove(id);
            self.membership_rev += 1;
            self.by_key.remove(&old.record.node_key);
            self.revoke(old.record.node_key);
        }
        if let Some(k) = kick
            && let Some((_, tx)) = self.sessions.get(&id)
        {
            let _ = tx.send(k);
        }
    }

    fn insert(&mut self, record: NodeRecord) {
        let online = record.connected_to.is_some();
        if let Some(old) = self.nodes.get(&record.id)
            && old.record == record
        {
            return;
        }
        let rev = self.bump();
        let membership_changed = self.nodes.get(&record.id).is_none_or(|old| {
            old.record.addresses() != record.addresses()
                || old.record.tags != record.tags
                || old.record.user != record.user
                || old.record.name != record.name
                || old.record.policy_attrs() != record.policy_attrs()
        });
        if let Some(old) = self.nodes.get(&record.id)
            && old.record.node_key != record.node_key
        {
            let old_key = old.record.node_key;
            self.by_key.remove(&old_key);
            self.revoke(old_key);
        }
        // A key that comes back (a removed node re-joining) is no longer revoked.
        self.revoked.remove(&record.node_key);
        self.by_key.insert(record.node_key, record.id);
        if membership_changed {
            self.inventory.upsert(InventoryNode {
                id: record.id,
                name: record.name.clone(),
                addresses: record.addresses(),
                user: record.user.clone(),
                tags: record.tags.clone(),
                attrs: record.policy_attrs(),
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

    fn bump(&mut self) -> u64 {
        self.next_rev += 1;
        self.next_rev
    }

    /// The snapshot sessions compute netmaps from, at `now_unix`. The policy is compiled at
    /// most once per change (sessions share the result).
    pub fn snapshot(&self, now_unix: i64) -> Snapshot<'_> {
        let (key, compiled) = self.compiled(now_unix);
        Snapshot {
            nodes: &self.nodes,
            compiled,
            compile_key: key,
            domain: &self.domain,
            tunnel_security: self.tunnel_security,
            relays: Arc::clone(&self.relays),
            relay_rev: self.relay_rev,
            coordinators: Arc::clone(&self.coordinators),
            coordinators_rev: self.coordinators_rev,
        }
    }

    /// The policy compiled for the current inventory and day.
    pub fn compiled(&self, now_unix: i64) -> (CompileKey, Arc<CompiledPolicy>) {
        let day = now_unix.div_euclid(DAY_SECS);
        let key = (self.policy_rev, self.membership_rev, day);
        let mut guard = self.compiled.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((k, c)) = guard.as_ref()
            && *k == key
        {
            return (key, Arc::clone(c));
        }
        let at =
            Timestamp::from_second(day.saturating_mul(DAY_SECS)).unwrap_or(Timestamp::UNIX_EPOCH);
        let started = std::time::Instant::now();
        let c = Arc::new(self.policy.compile(&self.inventory, at));
        tracing::debug!(
            nodes = self.inventory.len(),
            rules = self.policy.rule_count(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "compiled the policy"
        );
        *guard = Some((key, Arc::clone(&c)));
        (key, c)
    }

    /// The node holding `key`, if it is a current (not removed, not expired) member.
    pub fn node_by_key(&self, key: &NodeKey) -> Option<NodeId> {
        self.by_key.get(key).copied()
    }

    /// The relays nodes are told about.
    pub fn relays(&self) -> Arc<Vec<RelayInfo>> {
        Arc::clone(&self.relays)
    }

    /// The inventory the policy is compiled against.
    pub fn inventory(&self) -> &Inventory {
        &self.inventory
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

    /// The policy in force and its stored version (0: the built-in default).
    pub fn policy(&self) -> (i64, Arc<Policy>) {
        (self.policy_version, Arc::clone(&self.policy))
    }
}
