//! Issue 10: the coordinator under many nodes. `lattice-lab load` (e2e::load) drives simulated
//! nodes that speak the real control protocol to the real coordinator binaries over loopback
//! and checks after every step that each node holds exactly the peers and rules the policy
//! gives it (an oracle compiles the policy independently). Here at a size the suite can
//! afford; the timings are printed, never asserted (scripts/bench-coordinator runs the big
//! sizes).

use std::time::Duration;

use e2e::load::{LoadConfig, LoadReport, run};

fn config(nodes: usize, replicas: usize, db: String) -> LoadConfig {
    LoadConfig {
        nodes,
        replicas,
        db,
        coordinators: Vec::new(),
        state_dir: None,
        server: None,
        team_size: 25,
        concurrency: 32,
        step_timeout: Duration::from_secs(60),
    }
}

fn go(cfg: LoadConfig) -> LoadReport {
    let nodes = cfg.nodes;
    let report = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(run(cfg))
        .unwrap();
    eprintln!("{}", e2e::load::table(&report));
    // Every node's rules change when the ring of teams is added.
    assert_eq!(report.policy_change_ms.n, nodes);
    // The removed node's team saw it, and so did the team whose ring rule reaches it.
    assert!(report.removal_ms.n >= 25, "{:?}", report.removal_ms);
    assert!(report.arrival_ms.n >= 25, "{:?}", report.arrival_ms);
    assert!(report.reconnect_s.is_some());
    assert_eq!(report.dropped_sessions, 0, "sessions ended under load");
    report
}

#[test]
fn two_hundred_nodes_on_two_replicas_stay_exact_through_changes_and_a_lost_replica() {
    let Some(server) = crate::replicas::pg_server() else {
        return;
    };
    let r = go(config(200, 2, server));
    assert_eq!((r.replicas, r.db.as_str()), (2, "postgres"));
}

#[test]
fn two_hundred_nodes_on_sqlite_stay_exact_through_changes_and_a_restart() {
    let r = go(config(200, 1, "sqlite".into()));
    assert_eq!((r.replicas, r.db.as_str()), (1, "sqlite"));
}
