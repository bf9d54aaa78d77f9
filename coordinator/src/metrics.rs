//! The coordinator's Prometheus metrics (`lattice_coordinator_*`, and `lattice_relay_*` for
//! its embedded relay), rendered fresh on every scrape.

use std::time::Instant;

use relay::metrics::{Exposition, Kind};

use crate::state::AppState;

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
    for (state, v) in [("online", online), ("offline", offline)] {
        e.sample(
            "lattice_coordinator_nodes",
            Kind::Gauge,
            "Nodes in the mesh (not expired), by whether they hold a control session here or at another replica.",
            &[("state", state)],
            v as f64,
        );
    }
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
