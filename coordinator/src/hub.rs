//! The coordinator's in-memory view of the mesh, shared by all control sessions.
//!
//! The database is the source of truth (see [`crate::feed`]); the hub mirrors the nodes that
//! are not expired and the sessions this process holds. Work is proportional to a change, not
//! to the mesh: the policy stays compiled and follows membership changes incrementally, and a
//! change to one node wakes only the sessions of the nodes it can concern
//! ([`CompiledPolicy::related`]), telling each which peers to look at ([`Pending`]). Only a
//! new policy, a new day (recurring time windows) or a mesh-wide setting wakes every session.
//! Sessions then compute their own deltas with [`crate::netmap::next_map`].

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use jiff::Timestamp;
use policy::{CompiledPolicy, Inventory, InventoryNode, Policy};
use tokio::sync::{Notify, mpsc};
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

/// What a session has to look at when it wakes.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Pending {
    /// Recompute the node's rules and compare every peer (its rules may have changed).
    pub everything: bool,
    /// Mesh-wide items (relays, tunnel security, replica list) may have changed.
    pub settings: bool,
    /// These peers (or the node itself) changed.
    pub peers: BTreeSet<NodeId>,
}

impl Pending {
    /// Everything, as for a new session.
    pub fn all() -> Self {
        Self {
            everything: true,
            settings: true,
            peers: BTreeSet::new(),
        }
    }

    fn is_empty(&self) -> bool {
        !self.everything && !self.settings && self.peers.is_empty()
    }
}

/// A session's wake-up call: what changed, and a notification.
#[derive(Debug, Default)]
pub struct Inbox {
    pending: Mutex<Pending>,
    notify: Notify,
}

impl Inbox {
    fn post(&self, f: impl FnOnce(&mut Pending)) {
        f(&mut self.pending.lock().unwrap_or_else(|e| e.into_inner()));
        self.notify.notify_one();
    }

    /// Takes what accumulated since the last call.
    pub fn take(&self) -> Pending {
        std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Waits until something is posted (returns at once if something was posted since the
    /// last wait).
    pub async fn changed(&self) {
        loop {
            if !self
                .pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_empty()
            {
                return;
            }
            self.notify.notified().await;
        }
    }
}

/// Shared mesh state.
pub struct Hub {
    state: RwLock<HubState>,
    presence: Mutex<Option<mpsc::UnboundedSender<crate::presence::Event>>>,
}

struct Session {
    conn: u64,
    kicks: mpsc::UnboundedSender<Kick>,
    inbox: Arc<Inbox>,
}

/// The state behind the hub's lock.
pub struct HubState {
    nodes: BTreeMap<NodeId, LiveNode>,
    inventory: Inventory,
    /// The policy file in force.
    file_policy: Arc<Policy>,
    /// Approved access requests in force.
    grants: Vec<policy::Grant>,
    /// What is compiled: the file's rules and the grants.
    policy: Arc<Policy>,
    policy_version: i64,
    policy_rev: u64,
    next_rev: u64,
    sessions: HashMap<NodeId, Session>,
    next_conn: u64,
    /// The mesh's admins and owner (for `autogroup:admin`, `autogroup:owner`).
    roles: Roles,
    domain: String,
    tunnel_security: TunnelSecurity,
    /// The policy compiled for the current inventory, for (policy revision, day).
    compiled: Mutex<Option<Compilation>>,
    relays: Arc<Vec<RelayInfo>>,
    relay_rev: u64,
    coordinators: Arc<Vec<String>>,
    coordinators_rev: u64,
    by_key: HashMap<NodeKey, NodeId>,
    /// Node keys that left the mesh (removed, expired, rotated away), until the last second a
    /// ticket issued for them can be valid: what standalone relays must stop serving.
    revoked: BTreeMap<NodeKey, i64>,
    /// Sessions woken, in total (how much work changes cost, for tests and load runs).
    wakes: u64,
}

/// A compiled policy and what it was compiled for: (policy revision, day).
type Compilation = ((u64, i64), Arc<CompiledPolicy>);

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
    /// What changed for this session.
    pub inbox: Arc<Inbox>,
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
        let hub = Arc::new(Self {
            state: RwLock::new(HubState {
                nodes: BTreeMap::new(),
                inventory: Inventory::new(),
                file_policy: Arc::new(policy.clone()),
                grants: Vec::new(),
                policy: Arc::new(policy),
                policy_version: version,
                policy_rev: 1,
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
                wakes: 0,
                roles: Roles::default(),
            }),
            presence: Mutex::new(None),
        });
        {
            let mut st = hub.write();
            for n in nodes {
                if !n.is_expired(now) {
                    st.insert(n, now);
                }
            }
        }
        hub
    }

    /// Sets who the mesh's admins and owner are (before the nodes are loaded, at start).
    pub fn set_roles(&self, roles: Roles) {
        let mut st = self.write();
        if st.roles == roles {
            return;
        }
        st.roles = roles;
        let records: Vec<NodeRecord> = st.nodes.values().map(|n| n.record.clone()).collect();
        for r in records {
            let mut inv = inventory_node(&r, &st.roles);
            if let Some(n) = st.nodes.get(&r.id) {
                inv.routes.clone_from(&n.routes);
            }
            st.inventory.upsert(inv);
        }
        st.policy_rev += 1;
        st.refresh_routes();
        st.wake_all(true);
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

    /// Adds or updates a node (after a registration, resume, endpoint change, ...).
    pub fn upsert_node(&self, record: NodeRecord) {
        self.write().insert(record, crate::state::unix_now());
    }

    /// Applies a run of committed node changes at once: `present` are added or updated,
    /// `gone` are dropped and their sessions kicked.
    pub fn apply_nodes(&self, present: Vec<NodeRecord>, gone: Vec<(NodeId, Kick)>) {
        let now = crate::state::unix_now();
        let mut st = self.write();
        for r in present {
            st.insert(r, now);
        }
        for (id, kick) in gone {
            st.drop_node(id, Some(kick), now);
        }
    }

    /// Drops a node (removed, expired). Its session, if any, is kicked with `kick`.
    pub fn remove_node(&self, id: NodeId, kick: Option<Kick>) {
        self.write().drop_node(id, kick, crate::state::unix_now());
    }

    /// Puts stored policy `version` in force, unless a newer version already is (two admins
    /// setting policies at once end with the one the database holds last).
    pub fn set_policy(&self, version: i64, policy: Policy) {
        let mut st = self.write();
        if version <= st.policy_version {
            return;
        }
        st.policy = Arc::new(policy.with_grants(&st.grants));
        st.file_policy = Arc::new(policy);
        st.policy_version = version;
        st.policy_rev += 1;
        st.refresh_routes();
        st.wake_all(true);
    }

    /// Puts these approved access requests in force (with the policy file's rules), if they
    /// differ from those in force.
    pub fn set_grants(&self, grants: Vec<policy::Grant>) {
        let mut st = self.write();
        if st.grants == grants {
            return;
        }
        st.policy = Arc::new(st.file_policy.with_grants(&grants));
        st.grants = grants;
        st.policy_rev += 1;
        st.wake_all(true);
    }

    /// Wakes every session when the compilation day rolls over, so rules for recurring time
    /// windows are extended before nodes run out of them. Call it periodically.
    pub fn tick(&self, now_unix: i64) {
        let day = now_unix.div_euclid(DAY_SECS);
        let stale = {
            let st = self.read();
            let guard = st.compiled.lock().unwrap_or_else(|e| e.into_inner());
            guard.as_ref().is_some_and(|((_, d), _)| *d != day)
        };
        if stale {
            self.write().wake_all(true);
        }
    }

    /// Replaces the relay list nodes receive.
    pub fn set_relays(&self, relays: Vec<RelayInfo>) {
        let mut st = self.write();
        if *st.relays == relays {
            return;
        }
        st.relays = Arc::new(relays);
        st.relay_rev += 1;
        st.wake_all(false);
    }

    /// Replaces the list of coordinator replicas nodes are told about.
    pub fn set_coordinators(&self, urls: Vec<String>) {
        let mut st = self.write();
        if *st.coordinators == urls {
            return;
        }
        st.coordinators = Arc::new(urls);
        st.coordinators_rev += 1;
        st.wake_all(false);
    }

    /// Replaces the mesh's tunnel security.
    pub fn set_tunnel_security(&self, security: TunnelSecurity) {
        let mut st = self.write();
        if st.tunnel_security == security {
            return;
        }
        st.tunnel_security = security;
        st.wake_all(false);
    }

    /// Nodes whose control session this process holds.
    pub fn connected_here(&self) -> Vec<NodeId> {
        self.read().sessions.keys().copied().collect()
    }

    /// Registers a control session for `node`, kicking an older one for the same node
    /// (registration already recorded the node as online here).
    pub fn attach(self: &Arc<Self>, node: NodeId) -> SessionGuard {
        let (tx, kicks) = mpsc::unbounded_channel();
        let inbox = Arc::new(Inbox::default());
        inbox.post(|p| *p = Pending::all());
        let conn = {
            let mut st = self.write();
            let conn = st.next_conn;
            st.next_conn += 1;
            let session = Session {
                conn,
                kicks: tx,
                inbox: Arc::clone(&inbox),
            };
            if let Some(old) = st.sessions.insert(node, session) {
                let _ = old.kicks.send(Kick {
                    code: ErrorCode::Internal,
                    message: "replaced by a newer connection from the same node".into(),
                });
            }
            conn
        };
        SessionGuard {
            hub: Arc::clone(self),
            node,
            conn,
            kicks,
            inbox,
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
                .is_some_and(|s| s.conn == self.conn);
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

    /// Wakes every session; `everything`: their rules must be recomputed.
    fn wake_all(&mut self, everything: bool) {
        for s in self.sessions.values() {
            s.inbox.post(|p| {
                p.everything |= everything;
                p.settings = true;
            });
        }
        self.wakes += self.sessions.len() as u64;
    }

    /// Wakes the sessions of `nodes` (those held here) about `changed`: to recompute their
    /// rules (`everything`) or to look at that one peer.
    fn wake(&mut self, nodes: &BTreeSet<NodeId>, changed: NodeId, everything: bool) {
        for id in nodes {
            if let Some(s) = self.sessions.get(id) {
                s.inbox.post(|p| {
                    if everything {
                        p.everything = true;
                    } else {
                        p.peers.insert(changed);
                    }
                });
                self.wakes += 1;
            }
        }
    }

    /// The compilation in force if it is current (policy revision and `day`), for updating.
    fn current_compiled(&self, day: i64) -> Option<Arc<CompiledPolicy>> {
        let guard = self.compiled.lock().unwrap_or_else(|e| e.into_inner());
        guard
            .as_ref()
            .filter(|((rev, d), _)| *rev == self.policy_rev && *d == day)
            .map(|(_, c)| Arc::clone(c))
    }

    /// Applies a membership change to the current compilation in place (no copy: sessions
    /// only borrow it under the read lock) and returns the nodes it concerns.
    fn recompile_for(
        &mut self,
        id: NodeId,
        now: i64,
        node: Option<InventoryNode>,
    ) -> BTreeSet<NodeId> {
        let day = now.div_euclid(DAY_SECS);
        let mut concerned = BTreeSet::new();
        concerned.insert(id);
        let mut guard = self.compiled.lock().unwrap_or_else(|e| e.into_inner());
        let Some(((rev, d), c)) = guard.as_mut() else {
            // Nothing compiled yet: the next snapshot compiles the whole inventory.
            drop(guard);
            self.wake_everyone_later();
            return concerned;
        };
        if *rev != self.policy_rev || *d != day {
            *guard = None;
            drop(guard);
            self.wake_everyone_later();
            return concerned;
        }
        let c = Arc::make_mut(c);
        concerned.extend(c.related(id));
        match node {
            Some(n) => c.upsert(n),
            None => c.remove(id),
        }
        concerned.extend(c.related(id));
        concerned
    }

    /// After a full recompilation every session must look at everything.
    fn wake_everyone_later(&mut self) {
        self.wake_all(true);
    }

    fn drop_node(&mut self, id: NodeId, kick: Option<Kick>, now: i64) {
        if let Some(old) = self.nodes.remove(&id) {
            self.inventory.remove(id);
            // Only a router's coming or going can move a primary route.
            if !old.routes.is_empty() {
                self.elect_primaries();
            }
            self.by_key.remove(&old.record.node_key);
            self.revoke(old.record.node_key);
            let concerned = self.recompile_for(id, now, None);
            self.wake(&concerned, id, true);
        }
        if let Some(k) = kick
            && let Some(s) = self.sessions.get(&id)
        {
            let _ = s.kicks.send(k);
        }
    }

    fn insert(&mut self, record: NodeRecord, now: i64) {
        if let Some(old) = self.nodes.get(&record.id)
            && old.record == record
        {
            return;
        }
        let online = record.connected_to.is_some();
        let rev = self.bump();
        let mut inv = inventory_node(&record, &self.roles);
        let routes = routes_in_force(&self.file_policy, &record, &inv);
        let membership_changed = self.nodes.get(&record.id).is_none_or(|old| {
            old.record.addresses() != record.addresses()
                || old.record.tags != record.tags
                || old.record.user != record.user
                || old.record.name != record.name
                || old.record.policy_attrs() != record.policy_attrs()
                || old.routes != routes
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
        let id = record.id;
        inv.routes.clone_from(&routes);
        let old = self.nodes.get(&id);
        let primary_routes = old.map(|o| o.primary_routes.clone()).unwrap_or_default();
        // Endpoint and posture updates are frequent: the election (a pass over every node)
        // runs only when a router's routes or presence changed.
        let elect = old.map_or(!routes.is_empty(), |o| {
            o.routes != routes || (!routes.is_empty() && o.online != online)
        });
        self.nodes.insert(
            id,
            LiveNode {
                record,
                online,
                rev,
                routes,
                primary_routes,
            },
        );
        if elect {
            self.elect_primaries();
        }
        if membership_changed {
            self.inventory.upsert(inv.clone());
            let concerned = self.recompile_for(id, now, Some(inv));
            self.wake(&concerned, id, true);
        } else {
            // Only what peers see of it changed: the nodes that can see it look at it.
            let day = now.div_euclid(DAY_SECS);
            let concerned = match self.current_compiled(day) {
                Some(c) => {
                    let mut r = c.related(id);
                    r.insert(id);
                    r
                }
                None => self.sessions.keys().copied().collect(),
            };
            self.wake(&concerned, id, false);
        }
    }

    /// Recomputes every node's routes in force (the policy's autoApprovers may have changed).
    fn refresh_routes(&mut self) {
        let policy = Arc::clone(&self.file_policy);
        let updates: Vec<(NodeId, Vec<ipnet::IpNet>)> = self
            .nodes
            .iter()
            .filter(|(_, n)| !n.record.advertised_routes.is_empty() || !n.routes.is_empty())
            .map(|(id, n)| {
                let inv = inventory_node(&n.record, &self.roles);
                (*id, routes_in_force(&policy, &n.record, &inv))
            })
            .collect();
        for (id, routes) in updates {
            let changed = self.nodes.get(&id).is_some_and(|n| n.routes != routes);
            if changed {
                let rev = self.bump();
                if let Some(n) = self.nodes.get_mut(&id) {
                    n.routes.clone_from(&routes);
                    n.rev = rev;
                    let mut inv = inventory_node(&n.record, &self.roles);
                    inv.routes = routes;
                    self.inventory.upsert(inv);
                }
            }
        }
        self.elect_primaries();
    }

    /// Picks the primary router of every subnet route several nodes serve: an online node
    /// before an offline one, then the lowest id (so the choice is the same on every
    /// replica); a node is the primary of its own exit routes. Nodes whose primary routes
    /// change are shown to their peers again.
    fn elect_primaries(&mut self) {
        let mut best: BTreeMap<ipnet::IpNet, (bool, NodeId)> = BTreeMap::new();
        for (id, n) in &self.nodes {
            for r in n.routes.iter().filter(|r| r.prefix_len() > 0) {
                let cand = (!n.online, *id);
                best.entry(*r)
                    .and_modify(|b| {
                        if cand < *b {
                            *b = cand;
                        }
                    })
                    .or_insert(cand);
            }
        }
        let changed: Vec<(NodeId, Vec<ipnet::IpNet>)> = self
            .nodes
            .iter()
            .filter_map(|(id, n)| {
                let mine: Vec<ipnet::IpNet> = n
                    .routes
                    .iter()
                    .filter(|r| r.prefix_len() == 0 || best.get(r).is_some_and(|b| b.1 == *id))
                    .copied()
                    .collect();
                (mine != n.primary_routes).then_some((*id, mine))
            })
            .collect();
        if changed.is_empty() {
            return;
        }
        let routers: Vec<NodeId> = changed.iter().map(|(id, _)| *id).collect();
        for (id, mine) in changed {
            let rev = self.bump();
            if let Some(n) = self.nodes.get_mut(&id) {
                n.primary_routes = mine;
                n.rev = rev;
            }
        }
        // Every session looks at the routers again (those it cannot see are skipped when its
        // map is built): a session woken only about the node whose change caused the election
        // would never send the new primary router's routes.
        for s in self.sessions.values() {
            s.inbox.post(|p| p.peers.extend(routers.iter().copied()));
        }
        self.wakes += self.sessions.len() as u64;
    }

    fn bump(&mut self) -> u64 {
        self.next_rev += 1;
        self.next_rev
    }

    /// The snapshot sessions compute netmaps from, at `now_unix`. The policy is compiled at
    /// most once per policy and day; membership changes update it in place.
    pub fn snapshot(&self, now_unix: i64) -> Snapshot<'_> {
        Snapshot {
            nodes: &self.nodes,
            compiled: self.compiled(now_unix),
            domain: &self.domain,
            tunnel_security: self.tunnel_security,
            relays: Arc::clone(&self.relays),
            relay_rev: self.relay_rev,
            coordinators: Arc::clone(&self.coordinators),
            coordinators_rev: self.coordinators_rev,
        }
    }

    /// The policy compiled for the current inventory and day.
    pub fn compiled(&self, now_unix: i64) -> Arc<CompiledPolicy> {
        let day = now_unix.div_euclid(DAY_SECS);
        let key = (self.policy_rev, day);
        let mut guard = self.compiled.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((k, c)) = guard.as_ref()
            && *k == key
        {
            return Arc::clone(c);
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
        c
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

    /// The policy file in force and its stored version (0: the built-in default); the
    /// grants of approved access requests are not in it (see [`HubState::grants`]).
    pub fn policy(&self) -> (i64, Arc<Policy>) {
        (self.policy_version, Arc::clone(&self.file_policy))
    }

    /// The approved access requests in force.
    pub fn grants(&self) -> &[policy::Grant] {
        &self.grants
    }

    /// How many session wake-ups changes have caused so far.
    pub fn wakes(&self) -> u64 {
        self.wakes
    }
}

/// Who administers the mesh, for `autogroup:admin` and `autogroup:owner`: the people
/// `serve --oidc-admin` names (the first of them is the owner) and the members of the
/// `--oidc-admin-group` groups (as of their last sign-in).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Roles {
    /// Login names, the owner first.
    pub admins: Vec<String>,
    /// Identity provider groups.
    pub admin_groups: Vec<String>,
}

impl Roles {
    /// Sets `user:admin` and `user:owner` on a user-owned node's attributes.
    fn apply(&self, r: &NodeRecord, attrs: &mut policy::Attrs) {
        let Some(user) = r.user.as_deref().filter(|_| r.tags.is_empty()) else {
            return;
        };
        let named = |a: &String| a.eq_ignore_ascii_case(user);
        if self.admins.iter().any(named)
            || r.idp_groups.iter().any(|g| self.admin_groups.contains(g))
        {
            attrs.insert(policy::ROLE_ADMIN.into(), wire::AttrValue::Bool(true));
        }
        if self.admins.first().is_some_and(named) {
            attrs.insert(policy::ROLE_OWNER.into(), wire::AttrValue::Bool(true));
        }
    }
}

/// A node as the policy sees it (its routes are filled in by [`routes_in_force`]).
fn inventory_node(r: &NodeRecord, roles: &Roles) -> InventoryNode {
    let mut attrs = r.policy_attrs();
    roles.apply(r, &mut attrs);
    InventoryNode {
        id: r.id,
        name: r.name.clone(),
        addresses: r.addresses(),
        user: r.user.clone(),
        tags: r.tags.clone(),
        attrs,
        routes: Vec::new(),
    }
}

/// The routes of a node in force: those it advertises that an admin approved or the policy's
/// autoApprovers approve.
fn routes_in_force(policy: &Policy, r: &NodeRecord, inv: &InventoryNode) -> Vec<ipnet::IpNet> {
    let mut routes: Vec<ipnet::IpNet> = r
        .advertised_routes
        .iter()
        .filter(|a| r.approved_routes.contains(a))
        .copied()
        .collect();
    for a in policy.auto_approved(inv, &r.advertised_routes) {
        if !routes.contains(&a) {
            routes.push(a);
        }
    }
    routes.sort_unstable();
    routes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(i: u8, tag: &str) -> NodeRecord {
        NodeRecord::for_test(i, &[tag])
    }

    /// Two teams that only see themselves, three nodes each, every session attached and
    /// idle.
    fn teams() -> (Arc<Hub>, Vec<SessionGuard>) {
        let policy = Policy::parse(
            "teams.hujson",
            r#"{"tagOwners": {"tag:a": [], "tag:b": []},
                "acls": [{"action": "accept", "src": ["tag:a"], "dst": ["tag:a:*"]},
                         {"action": "accept", "src": ["tag:b"], "dst": ["tag:b:*"]}]}"#,
        )
        .unwrap();
        let nodes = (1..=6)
            .map(|i| record(i, if i <= 3 { "tag:a" } else { "tag:b" }))
            .collect();
        let hub = Hub::new("mesh.internal".into(), policy, 1, nodes, 0);
        let guards: Vec<_> = (1..=6).map(|i| hub.attach(NodeId(i))).collect();
        let _ = hub.read().compiled(crate::state::unix_now());
        for g in &guards {
            g.inbox.take();
        }
        (hub, guards)
    }

    fn woken(guards: &[SessionGuard]) -> Vec<(u64, Pending)> {
        guards
            .iter()
            .map(|g| (g.node.0, g.inbox.take()))
            .filter(|(_, p)| !p.is_empty())
            .collect()
    }

    #[test]
    fn a_change_to_one_node_wakes_only_the_sessions_it_concerns() {
        let (hub, guards) = teams();
        // New endpoints for n2: its team looks at n2, the other team hears nothing.
        let mut n2 = hub.read().node(NodeId(2)).unwrap().record.clone();
        n2.endpoints = vec!["198.51.100.2:41641".parse().unwrap()];
        hub.apply_nodes(vec![n2], vec![]);
        let w = woken(&guards);
        assert_eq!(w.iter().map(|(i, _)| *i).collect::<Vec<_>>(), [1, 2, 3]);
        assert!(
            w.iter()
                .all(|(_, p)| !p.everything && p.peers == [NodeId(2)].into())
        );

        // n5 moves to team a: both teams' rules change for it, every session recomputes
        // (each team shares a rule with n5 before or after).
        let mut n5 = hub.read().node(NodeId(5)).unwrap().record.clone();
        n5.tags = vec!["tag:a".into()];
        hub.apply_nodes(vec![n5], vec![]);
        let w = woken(&guards);
        assert_eq!(w.len(), 6);
        assert!(w.iter().all(|(_, p)| p.everything));

        // Removing n6 concerns team b only (n4 and n6 itself).
        hub.remove_node(
            NodeId(6),
            Some(Kick {
                code: ErrorCode::NodeRemoved,
                message: "gone".into(),
            }),
        );
        let w = woken(&guards);
        assert_eq!(w.iter().map(|(i, _)| *i).collect::<Vec<_>>(), [4, 6]);
        // The compilation followed in place: the same as compiling afresh.
        let st = hub.read();
        let now = crate::state::unix_now();
        let day_start = Timestamp::from_second(now - now.rem_euclid(DAY_SECS)).unwrap();
        let fresh = st.policy.compile(&st.inventory, day_start);
        for i in 1..=6 {
            assert_eq!(
                st.compiled(now).for_node(NodeId(i)),
                fresh.for_node(NodeId(i)),
                "n{i}"
            );
        }
    }

    /// The primary router of a subnet goes offline: every session is told to look at the
    /// other router, which is now the primary (before, sessions were woken only about the
    /// router that went away, and a client kept no route to the subnet until something else
    /// about the new primary changed).
    #[test]
    fn a_new_primary_router_is_named_to_every_session() {
        let policy = Policy::parse(
            "routes.hujson",
            r#"{"tagOwners": {"tag:router": [], "tag:client": []},
                "autoApprovers": {"routes": {"10.33.0.0/24": ["tag:router"]}},
                "acls": [{"action": "accept", "src": ["tag:client"], "dst": ["10.33.0.0/24:*"]},
                         {"action": "accept", "src": ["*"], "dst": ["tag:client:*", "tag:router:*"]}]}"#,
        )
        .unwrap();
        let route: ipnet::IpNet = "10.33.0.0/24".parse().unwrap();
        let router = |i: u8| {
            let mut r = record(i, "tag:router");
            r.advertised_routes = vec![route];
            r.connected_to = Some("here".into());
            r
        };
        let mut client = record(3, "tag:client");
        client.connected_to = Some("here".into());
        let hub = Hub::new(
            "mesh.internal".into(),
            policy,
            1,
            vec![router(1), router(2), client],
            0,
        );
        let guards: Vec<_> = (1..=3).map(|i| hub.attach(NodeId(i))).collect();
        for g in &guards {
            g.inbox.take();
        }
        let primary = |i: u64| hub.read().node(NodeId(i)).unwrap().primary_routes.clone();
        assert_eq!(primary(1), vec![route], "the lowest id is primary");
        assert!(primary(2).is_empty());

        let mut gone = hub.read().node(NodeId(1)).unwrap().record.clone();
        gone.connected_to = None;
        hub.apply_nodes(vec![gone], vec![]);
        assert_eq!(primary(2), vec![route], "the online router took over");
        assert!(primary(1).is_empty());
        let client_wake = woken(&guards)
            .into_iter()
            .find(|(i, _)| *i == 3)
            .map(|(_, p)| p)
            .expect("the client's session was woken");
        assert!(
            client_wake.everything || client_wake.peers.contains(&NodeId(2)),
            "the client's session looks at the new primary: {client_wake:?}"
        );
    }

    #[test]
    fn settings_wake_every_session_without_recomputing_rules() {
        let (hub, guards) = teams();
        hub.set_tunnel_security(TunnelSecurity::ClassicalOnly);
        let w = woken(&guards);
        assert_eq!(w.len(), 6);
        assert!(w.iter().all(|(_, p)| p.settings && !p.everything));
        hub.set_tunnel_security(TunnelSecurity::ClassicalOnly);
        assert!(woken(&guards).is_empty(), "no change, no wake-up");
    }
}
