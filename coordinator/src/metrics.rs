//! The coordinator's Prometheus metrics (`lattice_coordinator_*`, and `lattice_relay_*` for
//! its embedded relay), rendered fresh on every scrape.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use relay::metrics::{Exposition, Kind};

use crate::state::AppState;

/// What the coordinator counts as it works (kept in [`crate::state::Inner::counters`]).
#[derive(Debug, Default)]
pub struct Counters {
    /// Nodes registered for the first time.
    pub registered: AtomicU64,
    /// Nodes that resumed with their existing registration.
    pub resumed: AtomicU64,
    /// Registrations refused (bad key, expired, unknown, over a limit, ...).
    pub refused: AtomicU64,
    /// Control sessions open at this replica.
    pub sessions: AtomicI64,
    /// Netmaps sent whole (a session's first, or after the rules changed).
    pub netmaps_full: AtomicU64,
    /// Netmap deltas sent.
    pub netmaps_delta: AtomicU64,
    /// Time spent building netmaps, nanoseconds, and how many were built.
    pub netmap_build_ns: AtomicU64,
    /// Netmaps built (sent or found unchanged).
    pub netmap_builds: AtomicU64,
    /// Nodes' reports about themselves acted on (at once or after waiting).
    pub reports_applied: AtomicU64,
    /// Reports that came sooner than their session's pace and waited.
    pub reports_held: AtomicU64,
    /// Waiting reports replaced by a newer one of their kind (never acted on).
    pub reports_superseded: AtomicU64,
    /// Reports the database could not store (each waits to be tried again).
    pub reports_failed: AtomicU64,
    /// Access requests refused because a session sent them too fast.
    pub access_requests_throttled: AtomicU64,
}

impl Counters {
    /// Records one netmap build that took `took`, and what it sent.
    pub fn netmap(&self, took: Duration, sent: Option<bool>) {
        self.netmap_build_ns
            .fetch_add(u64::try_from(took.as_nanos()).unwrap_or(u64::MAX), Relaxed);
        self.netmap_builds.fetch_add(1, Relaxed);
        match sent {
            Some(true) => self.netmaps_full.fetch_add(1, Relaxed),
            Some(false) => self.netmaps_delta.fetch_add(1, Relaxed),
            None => 0,
        };
    }
}

/// Counts a control session open while it lives.
#[derive(Debug)]
pub struct SessionGauge<'a>(&'a Counters);

impl<'a> SessionGauge<'a> {
    /// A session opened.
    pub fn open(c: &'a Counters) -> Self {
        c.sessions.fetch_add(1, Relaxed);
        Self(c)
    }
}

impl Drop for SessionGauge<'_> {
    fn drop(&mut self) {
        self.0.sessions.fetch_sub(1, Relaxed);
    }
}

/// The page for one scrape: the hub's view of the mesh, the database's latency (one
/// round trip now), and the embedded relay's numbers.
pub async fn render(st: &AppState, stun: Option<&relay::stun::StunStats>) -> String {
    let mut e = Exposition::new();
    let (online, offline, routers, policy_version, wakes) = {
        let hub = st.hub.read();
        let (mut online, mut offline, mut routers) = (0u64, 0u64, 0u64);
        for n in hub.nodes() {
            if n.online {
                online += 1;
            } else {
                offline += 1;
            }
            if !n.primary_routes.is_empty() {
                routers += 1;
            }
        }
        (online, offline, routers, hub.policy().0, hub.wakes())
    };
    e.by_label(
        "lattice_coordinator_nodes",
        Kind::Gauge,
        "Nodes in the mesh (not expired), by whether they hold a control session here or at another replica.",
        "state",
        &[("online", online), ("offline", offline)],
    );
    e.gauge(
        "lattice_coordinator_primary_routers",
        "Nodes that are the primary router of at least one route.",
        routers as f64,
    );
    e.gauge(
        "lattice_coordinator_policy_version",
        "Stored version of the policy in force (0: the built-in default).",
        policy_version as f64,
    );
    e.counter(
        "lattice_coordinator_session_wakes_total",
        "Control sessions woken to send a netmap change.",
        wakes,
    );
    let c = &st.counters;
    e.by_label(
        "lattice_coordinator_registrations_total",
        Kind::Counter,
        "Nodes that connected, by outcome: registered anew, resumed, or refused.",
        "result",
        &[
            ("registered", c.registered.load(Relaxed)),
            ("resumed", c.resumed.load(Relaxed)),
            ("refused", c.refused.load(Relaxed)),
        ],
    );
    e.gauge(
        "lattice_coordinator_control_sessions",
        "Control sessions open at this replica.",
        c.sessions.load(Relaxed) as f64,
    );
    e.by_label(
        "lattice_coordinator_netmaps_sent_total",
        Kind::Counter,
        "Netmap messages sent to nodes, whole or as deltas.",
        "kind",
        &[
            ("full", c.netmaps_full.load(Relaxed)),
            ("delta", c.netmaps_delta.load(Relaxed)),
        ],
    );
    e.by_label(
        "lattice_coordinator_node_reports_total",
        Kind::Counter,
        "Reports nodes sent about themselves (endpoints, netinfo, paths, posture, id tokens): acted on, held because they came faster than a session's pace, replaced while held by a newer one of their kind, or not stored because the database failed (tried again at the pace).",
        "outcome",
        &[
            ("applied", c.reports_applied.load(Relaxed)),
            ("held", c.reports_held.load(Relaxed)),
            ("superseded", c.reports_superseded.load(Relaxed)),
            ("failed", c.reports_failed.load(Relaxed)),
        ],
    );
    e.counter(
        "lattice_coordinator_access_requests_throttled_total",
        "Access requests refused because their node sent them faster than a session's pace.",
        c.access_requests_throttled.load(Relaxed),
    );
    e.summary(
        "lattice_coordinator_netmap_build_seconds",
        "Time to work out what a node's next netmap holds.",
        c.netmap_build_ns.load(Relaxed) as f64 / 1e9,
        c.netmap_builds.load(Relaxed),
    );
    let start = Instant::now();
    let db_ok = sqlx::query("SELECT 1").execute(&st.db).await.is_ok();
    e.gauge(
        "lattice_coordinator_database_up",
        "Whether the database answered the scrape's round trip.",
        if db_ok { 1.0 } else { 0.0 },
    );
    e.gauge(
        "lattice_coordinator_database_round_trip_seconds",
        "How long one database round trip took at the scrape.",
        start.elapsed().as_secs_f64(),
    );
    if let (Some(r), Some(stun)) = (&st.relay, stun) {
        relay::metrics::relay(&mut e, &r.stats(), stun);
    }
    e.finish()
}
