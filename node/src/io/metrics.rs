//! The node's Prometheus metrics (`lattice_node_*`), rendered from a fresh status snapshot on
//! every scrape (`lattice up --metrics-listen ADDR`).

use relay::metrics::{Exposition, Kind};
use tokio::sync::{mpsc, oneshot};

use crate::io::api::{ApiRequest, StatusJson};

/// Asks the event loop for its status and renders it; an empty page when the loop is gone.
pub async fn scrape(api: &mpsc::Sender<ApiRequest>) -> String {
    let (tx, rx) = oneshot::channel();
    if api.send(ApiRequest::Status(tx)).await.is_err() {
        return String::new();
    }
    rx.await.map(|st| render(&st)).unwrap_or_default()
}

/// The page for `st`.
pub fn render(st: &StatusJson) -> String {
    let mut e = Exposition::new();
    e.gauge(
        "lattice_node_coordinator_connected",
        "Whether a control session with the coordinator is up.",
        if st.coordinator.connected { 1.0 } else { 0.0 },
    );
    e.counter(
        "lattice_node_control_sessions_total",
        "Control sessions established with the coordinator since the node started.",
        st.coordinator.sessions,
    );
    e.by_label(
        "lattice_node_dns_queries_total",
        Kind::Counter,
        "Queries to the mesh DNS resolver, by outcome: answered from the netmap, no such mesh name, forwarded upstream, or no upstream answered.",
        "result",
        &[("answered", st.dns.answered),
        ("nxdomain", st.dns.nxdomain),
        ("forwarded", st.dns.forwarded),
        ("failed", st.dns.failed)],
    );
    if let Some(x) = &st.exit_node {
        e.gauge(
            "lattice_node_exit_node_active",
            "Whether internet traffic goes through the chosen exit node (0: it is dropped).",
            if x.active { 1.0 } else { 0.0 },
        );
    }
    // Every packet counter of the data plane, by its name in `lattice status --json`.
    if let Some(counters) = st.counters.as_object() {
        for (name, v) in counters {
            if let Some(v) = v.as_u64() {
                e.sample(
                    "lattice_node_packets_total",
                    Kind::Counter,
                    "Packets and datagrams the data plane handled or dropped, by counter (see lattice status --json counters).",
                    &[("counter", name)],
                    v as f64,
                );
            }
        }
    }
    for p in &st.peers {
        let peer = p.name.as_str();
        for (name, help, v) in [
            (
                "lattice_node_peer_receive_bytes_total",
                "Bytes received from the peer (WireGuard messages).",
                p.rx_bytes,
            ),
            (
                "lattice_node_peer_transmit_bytes_total",
                "Bytes sent to the peer (WireGuard messages).",
                p.tx_bytes,
            ),
            (
                "lattice_node_peer_receive_packets_total",
                "Authenticated WireGuard data messages received from the peer.",
                p.rx_packets,
            ),
            (
                "lattice_node_peer_transmit_packets_total",
                "WireGuard data messages sent to the peer.",
                p.tx_packets,
            ),
            (
                "lattice_node_peer_path_changes_total",
                "Times the path to the peer changed (direct, relayed, none, or another address).",
                p.path_changes,
            ),
            (
                "lattice_node_peer_handshakes_total",
                "WireGuard handshakes completed with the peer.",
                p.handshakes,
            ),
            (
                "lattice_node_peer_pq_handshakes_total",
                "Post-quantum key exchanges (the first key and every rotation) completed with the peer.",
                p.pq_handshakes,
            ),
            (
                "lattice_node_peer_pq_chain_resets_total",
                "Times the peer's post-quantum key chain restarted from zero.",
                p.pq_chain_resets,
            ),
        ] {
            e.sample(name, Kind::Counter, help, &[("peer", peer)], v as f64);
        }
        for kind in ["direct", "relay", "none"] {
            e.sample(
                "lattice_node_peer_path",
                Kind::Gauge,
                "How the peer is reached (1 for the current kind).",
                &[("peer", peer), ("kind", kind)],
                if p.path.kind == kind { 1.0 } else { 0.0 },
            );
        }
        if let Some(age) = p.pq_psk_age_secs {
            e.sample(
                "lattice_node_peer_pq_key_age_seconds",
                Kind::Gauge,
                "Age of the post-quantum preshared key in use with the peer (it rotates before it grows old).",
                &[("peer", peer)],
                age as f64,
            );
        }
        e.sample(
            "lattice_node_peer_online",
            Kind::Gauge,
            "Whether the peer is connected to the coordinator.",
            &[("peer", peer)],
            if p.online { 1.0 } else { 0.0 },
        );
    }
    for r in &st.relays {
        e.sample(
            "lattice_node_relay_connected",
            Kind::Gauge,
            "Whether a connection to the relay is up.",
            &[("relay", &r.name)],
            if r.connected { 1.0 } else { 0.0 },
        );
        if let Some(ms) = r.rtt_ms {
            e.sample(
                "lattice_node_relay_round_trip_seconds",
                Kind::Gauge,
                "Round-trip time over the relay connection.",
                &[("relay", &r.name)],
                ms / 1000.0,
            );
        }
    }
    e.finish()
}
