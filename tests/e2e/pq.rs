//! Issue 5: post-quantum peer tunnels by default, with no silent downgrade.

use std::time::Duration;

use e2e::lab::wait_for;
use e2e::{Coordinator, MeshNode};
use serde_json::Value;

use crate::support::{Flat, lab};

fn peer(status: &Value) -> &Value {
    &status["peers"][0]
}

#[test]
fn two_nodes_come_up_post_quantum_and_status_says_so() {
    let Some(f) = Flat::mesh("pq-up", &["a", "b"], &[]) else {
        return;
    };
    assert!(f.node("a").ping(&f.lab, "b", "-4", 3));
    for n in &f.nodes {
        let st = n.status(&f.lab).expect("status");
        assert_eq!(st["tunnel_security"], "post_quantum");
        let p = peer(&st);
        assert_eq!(p["pq"], true, "{p}");
        assert!(p["pq_handshakes"].as_u64().unwrap() >= 1, "{p}");
        assert!(p["pq_psk_age_secs"].as_u64().is_some(), "{p}");
        assert_eq!(p["pq_error"], Value::Null, "{p}");
        assert!(
            p["handshakes"].as_u64().unwrap() >= 1,
            "a WireGuard session exists: {p}"
        );
    }
}

#[test]
fn a_continuous_ping_loses_nothing_across_three_rotations() {
    let Some(f) = Flat::mesh_with("pq-rotate", &["a", "b"], &[], &["--pq-rotation", "3s"]) else {
        return;
    };
    assert!(f.node("a").ping(&f.lab, "b", "-4", 2));
    let before: Vec<u64> = f
        .nodes
        .iter()
        .map(|n| {
            peer(&n.status(&f.lab).unwrap())["pq_handshakes"]
                .as_u64()
                .unwrap()
        })
        .collect();
    // 300 pings, 50 ms apart: 15 s, i.e. about five rotations.
    let out = f
        .lab
        .output(
            &f.node_ns[0],
            &["ping", "-4", "-c", "300", "-i", "0.05", "-W", "1", "b"],
        )
        .expect("ping");
    let text = String::from_utf8_lossy(&out.stdout);
    let summary = text
        .lines()
        .find(|l| l.contains("packet loss"))
        .unwrap_or_default()
        .to_owned();
    eprintln!("{summary}");
    assert!(
        summary.contains("300 received") && summary.contains(" 0% packet loss"),
        "{text}"
    );
    let after: Vec<u64> = f
        .nodes
        .iter()
        .map(|n| {
            peer(&n.status(&f.lab).unwrap())["pq_handshakes"]
                .as_u64()
                .unwrap()
        })
        .collect();
    for (b, a) in before.iter().zip(&after) {
        assert!(
            a - b >= 3,
            "at least three rotations during the ping: {before:?} -> {after:?}"
        );
    }
    for n in &f.nodes {
        let p = peer(&n.status(&f.lab).unwrap()).clone();
        assert_eq!(p["pq"], true);
        assert!(p["pq_psk_age_secs"].as_u64().unwrap() <= 4, "{p}");
        assert_eq!(p["pq_chain_resets"], 0, "{p}");
    }
}

/// A router between the two hosts redirects what either sends to the other's tunnel port into
/// a UDP proxy (one per direction), which either forwards faithfully or flips a byte in every
/// post-quantum handshake frame.
struct Tampered {
    f_lab: e2e::Lab,
    a: MeshNode,
    b: MeshNode,
    ns_r: String,
    proxies: Vec<e2e::Proc>,
}

fn tampered_lab() -> Option<Tampered> {
    let mut lab = lab("pq-tamper")?;
    let r = lab.ns("r").unwrap();
    let a = lab.ns("a").unwrap();
    let b = lab.ns("b").unwrap();
    lab.run(
        &r,
        &[
            "ip", "link", "add", "ra", "type", "veth", "peer", "name", "eth0", "netns", &a,
        ],
    )
    .unwrap();
    lab.run(
        &r,
        &[
            "ip", "link", "add", "rb", "type", "veth", "peer", "name", "eth0", "netns", &b,
        ],
    )
    .unwrap();
    lab.sh(&r, "ip addr add 10.1.0.1/24 dev ra && ip addr add 10.2.0.1/24 dev rb && ip link set ra up && ip link set rb up && sysctl -qw net.ipv4.ip_forward=1").unwrap();
    lab.sh(&a, "ip addr add 10.1.0.2/24 dev eth0 && ip link set eth0 up && ip route add default via 10.1.0.1").unwrap();
    lab.sh(&b, "ip addr add 10.2.0.2/24 dev eth0 && ip link set eth0 up && ip route add default via 10.2.0.1").unwrap();
    lab.sh(
        &r,
        "nft -f - <<'EOF'
table ip lab {
  chain pre { type nat hook prerouting priority dstnat; policy accept;
    ip saddr 10.1.0.2 ip daddr 10.2.0.2 udp dport 41641 dnat to 10.1.0.1:41000;
    ip saddr 10.2.0.2 ip daddr 10.1.0.2 udp dport 41641 dnat to 10.2.0.1:41001; }
  chain post { type nat hook postrouting priority srcnat; policy accept; }
}
EOF",
    )
    .unwrap();
    // No relay: the tampering forwarder is the only path between the two nodes (a relay
    // would carry the handshake past it, which is what relays are for).
    let coord = Coordinator::start(&mut lab, &r, "10.1.0.1", &["--no-embedded-relay"]).unwrap();
    let key = coord.authkey(&lab, &["--reusable"]).unwrap();
    let proxies = start_proxies(&mut lab, &r, false);
    let na = MeshNode::start(&mut lab, &a, "a", &coord.url, &key, &[]).unwrap();
    let nb = MeshNode::start(&mut lab, &b, "b", &coord.url, &key, &[]).unwrap();
    // keep the coordinator alive for the lab's lifetime
    std::mem::forget(coord);
    Some(Tampered {
        f_lab: lab,
        a: na,
        b: nb,
        ns_r: r,
        proxies,
    })
}

fn start_proxies(lab: &mut e2e::Lab, r: &str, tamper: bool) -> Vec<e2e::Proc> {
    let tool = lab.bin("lattice-testtool").display().to_string();
    let directions = [
        ("a-to-b", "10.1.0.1:41000", "10.2.0.2:41641", "10.2.0.1:0"),
        ("b-to-a", "10.2.0.1:41001", "10.1.0.2:41641", "10.1.0.1:0"),
    ];
    directions
        .iter()
        .map(|(name, listen, upstream, bind)| {
            let mut args = vec![
                tool.as_str(),
                "udp-proxy",
                "--listen",
                listen,
                "--upstream",
                upstream,
                "--upstream-bind",
                bind,
            ];
            if tamper {
                args.push("--tamper-frames");
            }
            let label = format!("proxy-{name}{}", if tamper { "-tamper" } else { "" });
            lab.spawn(&label, r, &args, &[]).unwrap()
        })
        .collect()
}

#[test]
fn a_node_whose_post_quantum_handshake_is_tampered_with_passes_no_user_traffic() {
    let Some(mut t) = tampered_lab() else { return };
    // Control: through the faithful proxy the two nodes connect, post-quantum.
    t.a.wait_ready(&t.f_lab, 1, Duration::from_secs(30))
        .unwrap();
    t.b.wait_ready(&t.f_lab, 1, Duration::from_secs(30))
        .unwrap();
    assert!(
        t.a.ping(&t.f_lab, "b", "-4", 3),
        "the topology passes traffic when nobody tampers"
    );
    assert_eq!(peer(&t.b.status(&t.f_lab).unwrap())["pq"], true);

    // Now the proxy tampers with every post-quantum frame, and b restarts (losing its key).
    for p in std::mem::take(&mut t.proxies) {
        t.f_lab.kill(p);
    }
    t.proxies = start_proxies(&mut t.f_lab, &t.ns_r.clone(), true);
    let out = t.b.cli(&t.f_lab, &["down"]).unwrap();
    assert!(out.status.success());
    t.f_lab.wait_exit(t.b.proc, Duration::from_secs(10));
    t.b.restart(&mut t.f_lab).unwrap();
    t.b.wait_ready(&t.f_lab, 1, Duration::from_secs(30))
        .unwrap();

    // Neither direction gets a single user packet through.
    assert!(
        !t.b.ping(&t.f_lab, "a", "-4", 5),
        "b -> a must fail without a post-quantum key"
    );
    assert!(
        !t.a.ping(&t.f_lab, "b", "-4", 5),
        "a -> b must fail without a post-quantum key"
    );
    let ok = wait_for(Duration::from_secs(20), || {
        t.b.status(&t.f_lab).is_some_and(|s| {
            let p = peer(&s);
            p["pq"] == false
                && p["path"]["kind"] == "none"
                && p["path"]["reason"]
                    .as_str()
                    .is_some_and(|r| r.contains("post-quantum"))
                && p["pq_error"].as_str().is_some()
        })
    });
    let st = t.b.status(&t.f_lab).unwrap();
    assert!(ok, "b explains why it has no tunnel: {}", peer(&st));
    eprintln!("b's status explains: {}", peer(&st)["path"]["reason"]);
    // b never completed a WireGuard handshake after the restart.
    assert_eq!(peer(&st)["handshakes"], 0, "{}", peer(&st));
    assert_eq!(peer(&st)["rx_bytes"], 0);
}
