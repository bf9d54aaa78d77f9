//! Issue 14, metrics: every binary serves Prometheus metrics that `promtool check metrics`
//! accepts, and the numbers say what happened (a ping moved bytes, two nodes are online).

use std::time::Duration;

use e2e::lab::wait_for;

use crate::support::{Flat, text};

/// `GET http://ADDR/metrics` from inside `ns`: the page.
fn scrape(f: &Flat, ns: &str, addr: &str) -> String {
    let tool = f.lab.bin("lattice-testtool").display().to_string();
    let out = f
        .lab
        .output(
            ns,
            &[&tool, "http", "--url", &format!("http://{addr}/metrics")],
        )
        .unwrap();
    let body = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(body.starts_with("status 200\n"), "{addr}: {}", text(&out));
    body["status 200\n".len()..].to_owned()
}

/// Runs `promtool check metrics` on a page; its complaints, if any.
fn promtool(page: &str) -> Result<(), String> {
    use std::io::Write as _;
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("running promtool: {e}"))?;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(page.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    if out.status.success() && out.stdout.is_empty() && out.stderr.is_empty() {
        Ok(())
    } else {
        Err(text(&out))
    }
}

/// The value of the first sample whose line starts with `series`.
fn value(page: &str, series: &str) -> Option<f64> {
    page.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[test]
fn every_binary_serves_metrics_that_promtool_accepts_and_that_count_what_happened() {
    if std::process::Command::new("promtool")
        .arg("--version")
        .output()
        .is_err()
    {
        if std::env::var_os("LATTICE_E2E_REQUIRED").is_some() {
            panic!("promtool is required (scripts/setup installs Debian's prometheus package)");
        }
        eprintln!("SKIPPED metrics: no promtool");
        return;
    }
    let Some(lab) = crate::support::lab("metrics") else {
        return;
    };
    let mut f = Flat::new(lab, 2, &[]);
    let key = f.coord.authkey(&f.lab, &["--reusable"]).unwrap();
    f.join(0, "a", &key, &["--metrics-listen", "127.0.0.1:9440"]);
    f.join(1, "b", &key, &[]);
    for n in &f.nodes {
        n.wait_ready(&f.lab, 1, Duration::from_secs(30)).unwrap();
    }
    assert!(f.nodes[0].ping(&f.lab, "b", "-4", 3));

    // A standalone relay next to the coordinator.
    let seed = std::fs::read_to_string(f.coord.state_dir.join("ticket.key")).unwrap();
    let ticket_key = wire::TicketKey::from_bytes(
        hybrid::ticket::TicketSigner::from_seed(wire::keys::parse_hex::<32>(seed.trim()).unwrap())
            .public(),
    )
    .to_text();
    let relay_bin = f.lab.bin("lattice-relay").display().to_string();
    let relay_dir = f.lab.dir().join("relay").display().to_string();
    let lan = f.lan.clone();
    let r = f
        .lab
        .spawn(
            "relay",
            &lan,
            &[
                &relay_bin,
                "serve",
                "--listen",
                "198.51.100.1:8444",
                "--stun-listen",
                "198.51.100.1:3488",
                "--coordinator-key",
                &ticket_key,
                "--state-dir",
                &relay_dir,
                "--metrics-listen",
                "127.0.0.1:9431",
            ],
            &[],
        )
        .unwrap();
    assert!(wait_for(Duration::from_secs(10), || f
        .lab
        .stdout(r)
        .contains("relays add")));

    let node_ns = f.node_ns[0].clone();
    let node = scrape(&f, &node_ns, "127.0.0.1:9440");
    let coordinator = scrape(&f, &lan, "127.0.0.1:9430");
    let relay = scrape(&f, &lan, "127.0.0.1:9431");
    for (who, page) in [
        ("node", &node),
        ("coordinator", &coordinator),
        ("relay", &relay),
    ] {
        if let Err(e) = promtool(page) {
            panic!("promtool on the {who}'s metrics: {e}\n{page}");
        }
    }
    // The ping moved bytes both ways and keyed a post-quantum tunnel.
    for series in [
        "lattice_node_peer_receive_bytes_total{peer=\"b\"}",
        "lattice_node_peer_transmit_bytes_total{peer=\"b\"}",
        "lattice_node_peer_pq_handshakes_total{peer=\"b\"}",
        "lattice_node_packets_total{counter=\"in_delivered\"}",
        "lattice_node_peer_path_changes_total{peer=\"b\"}",
    ] {
        assert!(
            value(&node, series).unwrap_or(0.0) > 0.0,
            "{series}:\n{node}"
        );
    }
    // Three echo requests out and three replies back, at least (handshake keepalives may add).
    for series in [
        "lattice_node_peer_receive_packets_total{peer=\"b\"}",
        "lattice_node_peer_transmit_packets_total{peer=\"b\"}",
    ] {
        assert!(
            value(&node, series).unwrap_or(0.0) >= 3.0,
            "{series}:\n{node}"
        );
    }
    assert!(
        value(&node, "lattice_node_peer_pq_key_age_seconds{peer=\"b\"}").is_some(),
        "{node}"
    );
    assert_eq!(
        value(&node, "lattice_node_coordinator_connected"),
        Some(1.0)
    );
    assert_eq!(
        value(&coordinator, "lattice_coordinator_nodes{state=\"online\"}"),
        Some(2.0),
        "{coordinator}"
    );
    assert_eq!(
        value(&coordinator, "lattice_coordinator_database_up"),
        Some(1.0)
    );
    assert_eq!(
        value(
            &coordinator,
            "lattice_coordinator_registrations_total{result=\"registered\"}"
        ),
        Some(2.0),
        "{coordinator}"
    );
    assert_eq!(
        value(&coordinator, "lattice_coordinator_control_sessions"),
        Some(2.0)
    );
    assert!(
        value(
            &coordinator,
            "lattice_coordinator_netmaps_sent_total{kind=\"full\"}"
        )
        .unwrap_or(0.0)
            >= 2.0,
        "{coordinator}"
    );
    assert!(
        value(
            &coordinator,
            "lattice_coordinator_netmap_build_seconds_count"
        )
        .unwrap_or(0.0)
            >= 2.0,
        "{coordinator}"
    );
    assert_eq!(
        value(&node, "lattice_node_control_sessions_total"),
        Some(1.0)
    );
    // `ping b` looked the name up in the mesh DNS.
    assert!(
        value(&node, "lattice_node_dns_queries_total{result=\"answered\"}").unwrap_or(0.0) >= 1.0,
        "{node}"
    );
    assert!(
        coordinator.contains("lattice_relay_sessions "),
        "the embedded relay: {coordinator}"
    );
    assert_eq!(
        value(&relay, "lattice_relay_sessions"),
        Some(0.0),
        "{relay}"
    );
    // A node without --metrics-listen serves none.
    let other_ns = f.node_ns[1].clone();
    let tool = f.lab.bin("lattice-testtool").display().to_string();
    let none = f
        .lab
        .output(
            &other_ns,
            &[&tool, "http", "--url", "http://127.0.0.1:9440/metrics"],
        )
        .unwrap();
    assert!(!text(&none).starts_with("status 200"));
}
