//! Issue 9: abuse end to end, each bounded in time and traffic — floods at a node's port and
//! at the coordinator's `/control` while a node joins, a peer filling the flow table,
//! replayed captures of every datagram two nodes exchanged, and a member that is not a node's
//! peer flooding it through the relay.

use std::time::{Duration, Instant};

use e2e::lab::wait_for;
use serde_json::Value;

use crate::support::{Flat, ipv4_of, lab};

fn tool(f: &Flat) -> String {
    f.lab.bin("lattice-testtool").display().to_string()
}

/// A flat LAN whose coordinator starts with `policy`, and a node per `(name, tag)`, each
/// joined with an auth key for its tag.
fn tagged(lab: e2e::Lab, policy: &str, nodes: &[(&str, &str)]) -> Flat {
    let path = lab.dir().join("policy-at-start.hujson");
    std::fs::write(&path, policy).unwrap();
    let path = path.display().to_string();
    let mut f = Flat::new(lab, nodes.len(), &["--policy", &path]);
    for (i, (name, tag)) in nodes.iter().enumerate() {
        let k = f.coord.authkey(&f.lab, &["--tag", tag]).unwrap();
        f.join(i, name, &k, &[]);
    }
    f
}

fn counters(st: &Value) -> Value {
    st["counters"].clone()
}

fn count(c: &Value, k: &str) -> u64 {
    c[k].as_u64().unwrap_or(0)
}

/// The coordinator's control key (`controlkey:...`), from its state dir.
fn control_key(f: &Flat) -> String {
    let hex = std::fs::read_to_string(f.coord.state_dir.join("control.key")).unwrap();
    let kp = hybrid::StaticKeypair::from_secret(wire::keys::parse_hex::<32>(hex.trim()).unwrap());
    wire::ControlKey::from_bytes(kp.public()).to_text()
}

#[test]
fn floods_at_a_nodes_port_and_at_control_do_not_stop_a_new_node_from_joining_and_connecting() {
    let Some(lab) = lab("abuse-flood") else {
        return;
    };
    let mut f = Flat::new(lab, 3, &[]);
    let key = f.coord.authkey(&f.lab, &["--reusable"]).unwrap();
    f.join(0, "db", &key, &[]);
    let db = f.nodes[0]
        .wait_ready(&f.lab, 0, Duration::from_secs(30))
        .unwrap();
    let db_key = db["self"]["node_key"].as_str().unwrap().to_owned();
    let t = tool(&f);
    let ck = control_key(&f);
    // From a third host: junk at db's port, and a handshake flood plus 40 half-open sockets
    // at the coordinator, for 15 s.
    let junk = f
        .lab
        .spawn(
            "junk-flood",
            &f.node_ns[1],
            &[
                &t,
                "junk-flood",
                "--to",
                "198.51.100.11:41641",
                "--target-key",
                &db_key,
                "--peer-key",
                &db_key,
                "--seconds",
                "15",
            ],
            &[],
        )
        .unwrap();
    let control = f
        .lab
        .spawn(
            "control-flood",
            &f.node_ns[1],
            &[
                &t,
                "control-flood",
                "--url",
                "http://198.51.100.1:8080",
                "--control-key",
                &ck,
                "--seconds",
                "15",
                "--half-open",
                "40",
            ],
            &[],
        )
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let before = counters(&f.nodes[0].status(&f.lab).unwrap());
    // A new node registers and reaches db while both floods run.
    let started = Instant::now();
    f.join(2, "web", &key, &[]);
    f.nodes[1]
        .wait_ready(&f.lab, 1, Duration::from_secs(20))
        .expect("web could not join during the floods");
    let joined = started.elapsed();
    assert!(
        f.nodes[1].ping(&f.lab, "db", "-4", 3),
        "web could not reach db during the floods"
    );
    let connected = started.elapsed();
    let during = counters(&f.nodes[0].status(&f.lab).unwrap());
    assert!(wait_for(Duration::from_secs(20), || {
        f.lab.stdout(junk).contains("sent") && f.lab.stdout(control).contains("answered")
    }));
    eprintln!(
        "joined in {joined:?}, reached db in {connected:?}; junk: {}; control: {}",
        f.lab.stdout(junk).trim(),
        f.lab.stdout(control).trim()
    );
    let dropped: u64 = [
        "udp_unknown",
        "frames_invalid",
        "pq_rejected",
        "pq_rate_limited",
        "pq_bad_mac",
        "pq_cookies_sent",
        "wg_invalid",
        "wg_unknown_peer",
        "disco_invalid",
    ]
    .iter()
    .map(|k| count(&during, k) - count(&before, k))
    .sum();
    eprintln!("db dropped or deflected {dropped} hostile datagrams while web joined: {during}");
    assert!(dropped > 1000, "the flood did not reach db: {during}");
    // Every half-open socket and flood session is gone afterwards: a further node joins at once.
    let late = f.coord.authkey(&f.lab, &[]).unwrap();
    let ns = f.node_ns[1].clone();
    f.join(1, "late", &late, &[]);
    let _ = ns;
    f.nodes[2]
        .wait_ready(&f.lab, 2, Duration::from_secs(20))
        .expect("a node could not join after the floods");
}

#[test]
fn a_peer_filling_the_flow_table_cannot_evict_another_peers_quiet_connection() {
    let Some(lab) = lab("abuse-flows") else {
        return;
    };
    let policy = r#"{
        "tagOwners": {"tag:server": [], "tag:flooder": [], "tag:client": []},
        "acls": [
            {"action": "accept", "src": ["tag:flooder"], "dst": ["tag:server:*"]},
            {"action": "accept", "src": ["tag:server"], "dst": ["tag:client:7777"]},
        ],
    }"#;
    let mut f = tagged(
        lab,
        policy,
        &[
            ("server", "tag:server"),
            ("flooder", "tag:flooder"),
            ("client", "tag:client"),
        ],
    );
    let server = f.nodes[0]
        .wait_ready(&f.lab, 2, Duration::from_secs(30))
        .unwrap();
    let client = f.nodes[2]
        .wait_ready(&f.lab, 1, Duration::from_secs(30))
        .unwrap();
    let server_ip = ipv4_of(&server);
    let client_ip = ipv4_of(&client);
    let t = tool(&f);
    // The server opens a connection to the client's service, which stays silent for 12 s and
    // then pushes data: the client's packets come in only as replies of that flow (the client
    // may open nothing towards the server).
    f.lab
        .spawn(
            "push",
            &f.node_ns[2],
            &[
                &t,
                "tcp-push",
                "--listen",
                "0.0.0.0:7777",
                "--after-ms",
                "12000",
            ],
            &[],
        )
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let to = format!("{client_ip}:7777");
    let wait = f
        .lab
        .spawn(
            "wait",
            &f.node_ns[0],
            &[&t, "tcp-wait", "--to", &to, "--timeout-ms", "25000"],
            &[],
        )
        .unwrap();
    assert!(wait_for(Duration::from_secs(10), || f
        .lab
        .stdout(wait)
        .contains("connected")));
    // Meanwhile the flooder opens 80,000 flows to the server, more than the whole table.
    let dst = format!("{server_ip}:9000");
    let spray = f
        .lab
        .output(
            &f.node_ns[1],
            &[
                &t,
                "udp-spray",
                "--to",
                &dst,
                "--flows",
                "80000",
                "--seconds",
                "7",
            ],
        )
        .unwrap();
    eprintln!("flooder: {}", String::from_utf8_lossy(&spray.stdout).trim());
    assert!(
        wait_for(Duration::from_secs(30), || f
            .lab
            .stdout(wait)
            .contains("received")
            || f.lab.stdout(wait).contains("timeout")),
        "{}",
        f.lab.stdout(wait)
    );
    let st = f.nodes[0].status(&f.lab).unwrap();
    eprintln!(
        "server: {} packets from the flooder delivered, {} flows evicted; {}",
        st["counters"]["in_delivered"],
        st["counters"]["flows_evicted"],
        f.lab.stdout(wait).trim().replace('\n', "; ")
    );
    assert!(
        f.lab.stdout(wait).contains("received"),
        "another peer's flood evicted the connection: {}",
        f.lab.stdout(wait)
    );
    assert!(count(&st["counters"], "flows_evicted") > 0, "{st}");
}

#[test]
fn replaying_every_captured_datagram_changes_no_key_and_breaks_no_tunnel() {
    let Some(mut f) = Flat::mesh("abuse-replay", &["a", "b"], &[]) else {
        return;
    };
    let t = tool(&f);
    // Capture everything b receives on its port while a starts talking to it (post-quantum
    // frames, confirmations, disco, WireGuard handshakes and data), then replay all of it at
    // b from a's host.
    let out = f.lab.dir().join("capture.bin").display().to_string();
    let ns_b = f.node_ns[1].clone();
    let capture = f
        .lab
        .spawn(
            "capture",
            &ns_b,
            &[
                &t,
                "udp-capture",
                "--iface",
                "eth0",
                "--dst",
                "198.51.100.12:41641",
                "--seconds",
                "6",
                "--out",
                &out,
            ],
            &[],
        )
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(f.nodes[0].ping(&f.lab, "b", "-4", 3));
    assert!(wait_for(Duration::from_secs(10), || f
        .lab
        .stdout(capture)
        .contains("captured")));
    eprintln!("{}", f.lab.stdout(capture).trim());
    // Replay once any retransmission window of the exchange has passed.
    std::thread::sleep(Duration::from_secs(5));
    let before = f.nodes[1].status(&f.lab).unwrap();
    let peer_before = before["peers"][0].clone();
    let replay = f
        .lab
        .output(
            &f.node_ns[0],
            &[
                &t,
                "udp-replay",
                "--file",
                &out,
                "--to",
                "198.51.100.12:41641",
            ],
        )
        .unwrap();
    let replayed = String::from_utf8_lossy(&replay.stdout).trim().to_owned();
    eprintln!("{replayed}");
    assert!(
        replayed.ends_with("answered 0"),
        "b answered replayed datagrams: {replayed}"
    );
    let after = f.nodes[1].status(&f.lab).unwrap();
    let peer_after = after["peers"][0].clone();
    assert_eq!(
        peer_after["pq_handshakes"], peer_before["pq_handshakes"],
        "a replay made a new post-quantum key"
    );
    assert!(f.nodes[0].ping(&f.lab, "b", "-4", 3), "the tunnel broke");
    assert!(f.nodes[1].ping(&f.lab, "a", "-4", 3), "the tunnel broke");
    let c = |k: &str| count(&after["counters"], k) - count(&before["counters"], k);
    eprintln!(
        "b refused: disco_stale {} pq_rejected {} wg_invalid {} frames_invalid {}",
        c("disco_stale"),
        c("pq_rejected"),
        c("wg_invalid"),
        c("frames_invalid")
    );
    assert!(c("disco_stale") + c("pq_rejected") + c("wg_invalid") > 0);
}

/// A node the policy hides from another floods it through the relay (with its own key and a
/// ticket, as a compromised member could): the target refuses it at the relay, which drops
/// what it sends and counts it, and the target's peer still reaches it.
#[test]
fn a_member_that_is_not_a_peer_flooding_through_the_relay_is_refused_there() {
    let Some(lab) = lab("abuse-stranger") else {
        return;
    };
    let policy = r#"{
        "tagOwners": {"tag:in": [], "tag:out": []},
        "acls": [{"action": "accept", "src": ["tag:in"], "dst": ["tag:in:*"]}],
    }"#;
    let mut f = tagged(
        lab,
        policy,
        &[
            ("target", "tag:in"),
            ("peer", "tag:in"),
            ("stranger", "tag:out"),
        ],
    );
    let target = f.nodes[0]
        .wait_ready(&f.lab, 1, Duration::from_secs(30))
        .unwrap();
    f.nodes[1]
        .wait_ready(&f.lab, 1, Duration::from_secs(30))
        .unwrap();
    f.nodes[2]
        .wait_ready(&f.lab, 0, Duration::from_secs(30))
        .unwrap();
    let target_key = target["self"]["node_key"].as_str().unwrap().to_owned();
    let keys: Value =
        serde_json::from_slice(&std::fs::read(f.nodes[2].state_dir.join("keys.json")).unwrap())
            .unwrap();
    let stranger_secret = keys["node_private"].as_str().unwrap().to_owned();
    let stranger_key = f.nodes[2].status(&f.lab).unwrap()["self"]["node_key"]
        .as_str()
        .unwrap()
        .to_owned();
    // Its daemon stops (it would take its relay session back), its registration stays.
    let p = f.nodes[2].proc;
    f.lab.kill(p);
    let seed = std::fs::read_to_string(f.coord.state_dir.join("ticket.key")).unwrap();
    let (ws, pin, relay_key) = crate::support::first_relay(&f.lab, &f.coord);
    // The stranger's own key and a ticket the coordinator's key signed: the relay admits it.
    let t = tool(&f);
    let out = f
        .lab
        .output(
            &f.node_ns[2],
            &[
                &t,
                "relay-flood",
                "--websocket",
                &ws,
                "--cert-sha256",
                &pin,
                "--relay-key",
                &relay_key,
                "--node-secret",
                &stranger_secret,
                "--ticket-seed",
                seed.trim(),
                "--to",
                &target_key,
                "--seconds",
                "4",
            ],
        )
        .unwrap();
    let sent = crate::support::text(&out).trim().to_owned();
    assert!(out.status.success(), "relay-flood: {sent}");
    let st = f.nodes[0].status(&f.lab).unwrap();
    assert_eq!(
        st["relay_refused"],
        serde_json::json!([stranger_key]),
        "the target did not refuse the stranger: {st}"
    );
    let page = f
        .lab
        .output(
            &f.coord.ns,
            &[&t, "http", "--url", "http://127.0.0.1:9430/metrics"],
        )
        .unwrap();
    let page = String::from_utf8_lossy(&page.stdout).into_owned();
    let refused: f64 = page
        .lines()
        .find_map(|l| l.strip_prefix("lattice_relay_dropped_frames_total{reason=\"refused\"} "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0);
    eprintln!("{sent}; the relay dropped {refused} of them as refused");
    assert!(
        refused > 0.0,
        "the relay dropped nothing as refused:\n{page}"
    );
    // What got through before the refusal was dropped by the target as from no peer.
    assert!(count(&counters(&st), "relay_unknown_peer") >= 64, "{st}");
    // The target's peer still reaches it.
    assert!(f.nodes[1].ping(&f.lab, "target", "-4", 2), "peer -> target");
}
