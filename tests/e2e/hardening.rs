//! Issue 9: the hardening that needs real processes — the admin API's transports, and what the
//! coordinator and nodes refuse from the outside.

use std::os::unix::fs::PermissionsExt;

use crate::support::{Flat, text};

#[test]
fn the_admin_api_is_https_only_and_its_socket_serves_only_its_owner() {
    let Some(lab) = crate::support::lab("admin") else {
        return;
    };
    let f = Flat::new(lab, 1, &["--admin-listen", "198.51.100.1:8443"]);
    let coordinator = f.lab.bin("lattice-coordinator").display().to_string();
    // A read-only token made on the local socket, used from another host over HTTPS.
    let out = f
        .coord
        .admin(
            &f.lab,
            &["token", "create", "--scope", "read", "--expiry", "1h"],
        )
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(token.starts_with("lt2-"), "{token}");
    f.lab.secret("the admin token", &token);
    // `lt2-<id>-<secret>-<certificate pin>`: the secret part alone, too.
    f.lab.secret(
        "the admin token's secret part",
        token.split('-').nth(2).unwrap(),
    );
    let remote = |server: &str, args: &[&str]| {
        let mut full = vec![coordinator.as_str()];
        full.extend_from_slice(args);
        full.extend_from_slice(&["--server", server, "--token", &token]);
        f.lab.output(&f.node_ns[0], &full).unwrap()
    };
    let listed = remote("https://198.51.100.1:8443", &["nodes", "list", "--json"]);
    assert!(listed.status.success(), "{}", text(&listed));
    // Read-only: a change is refused, with a reason.
    let refused = remote("https://198.51.100.1:8443", &["authkey", "create"]);
    assert_eq!(refused.status.code(), Some(1), "{}", text(&refused));
    assert!(
        text(&refused).contains("may only read"),
        "{}",
        text(&refused)
    );
    // Plain HTTP is refused by the CLI, and the public port has no admin API to offer.
    let plain = remote("http://198.51.100.1:8080", &["nodes", "list"]);
    assert_ne!(plain.status.code(), Some(0));
    assert!(text(&plain).contains("https://"), "{}", text(&plain));
    let public = remote("https://198.51.100.1:8080", &["nodes", "list"]);
    assert_ne!(public.status.code(), Some(0), "{}", text(&public));

    // The admin socket, exposed by mistake to everyone, still serves only its owner and root.
    let state = f.coord.state_dir.clone();
    for dir in [f.lab.dir(), state.as_path()] {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711)).unwrap();
    }
    std::fs::set_permissions(
        state.join("admin.sock"),
        std::fs::Permissions::from_mode(0o666),
    )
    .unwrap();
    let state_s = state.display().to_string();
    let as_nobody = f
        .lab
        .output(
            &f.coord.ns,
            &[
                "setpriv",
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                &coordinator,
                "nodes",
                "list",
                "--state-dir",
                &state_s,
            ],
        )
        .unwrap();
    assert_eq!(as_nobody.status.code(), Some(1), "{}", text(&as_nobody));
    assert!(
        text(&as_nobody).contains("serves only the coordinator's user and root"),
        "{}",
        text(&as_nobody)
    );
    // Root still gets in.
    assert!(f.coord.nodes(&f.lab).is_ok());
}

#[test]
fn mesh_dns_answers_this_host_but_not_lan_hosts_that_route_to_it() {
    let Some(f) = Flat::mesh("dnslan", &["db-1", "web"], &[]) else {
        return;
    };
    let dig = |ns: &str| {
        f.lab
            .output(
                ns,
                &[
                    "dig",
                    "+time=2",
                    "+tries=1",
                    "+short",
                    "@100.100.100.100",
                    "web.mesh.internal",
                ],
            )
            .unwrap()
    };
    // The node's own host gets the answer.
    let local = dig(&f.node_ns[0]);
    assert!(
        String::from_utf8_lossy(&local.stdout).contains("100.64."),
        "{}",
        text(&local)
    );
    // Another machine on the LAN sends its queries for 100.100.100.100 to the node's host.
    f.lab
        .run(
            &f.coord.ns,
            &[
                "ip",
                "route",
                "add",
                "100.100.100.100/32",
                "via",
                "198.51.100.11",
            ],
        )
        .unwrap();
    let lan = dig(&f.coord.ns);
    assert!(
        !String::from_utf8_lossy(&lan.stdout).contains("100.64."),
        "a LAN host resolved mesh names through the node: {}",
        text(&lan)
    );
    assert!(
        text(&lan).contains("no servers could be reached"),
        "{}",
        text(&lan)
    );
}

#[test]
fn a_standalone_relay_refuses_a_removed_node_within_seconds() {
    use std::time::{Duration, Instant};

    use e2e::lab::wait_for;
    use e2e::{Coordinator, MeshNode};

    let Some(mut lab) = crate::support::lab("relay-revoke") else {
        return;
    };
    let wan = lab.lan("inet", "198.51.100.1/24").unwrap();
    let coord =
        Coordinator::start(&mut lab, &wan, "198.51.100.1", &["--no-embedded-relay"]).unwrap();
    let seed = std::fs::read_to_string(coord.state_dir.join("ticket.key")).unwrap();
    let ticket_key = wire::TicketKey::from_bytes(
        hybrid::ticket::TicketSigner::from_seed(wire::keys::parse_hex::<32>(seed.trim()).unwrap())
            .public(),
    )
    .to_text();
    let relay_bin = lab.bin("lattice-relay").display().to_string();
    let relay_dir = lab.dir().join("relay").display().to_string();
    let r = lab
        .spawn(
            "relay",
            &wan,
            &[
                &relay_bin,
                "serve",
                "--listen",
                "198.51.100.1:8443",
                "--stun-listen",
                "198.51.100.1:3478",
                "--coordinator-key",
                &ticket_key,
                "--coordinator-url",
                &coord.url,
                "--state-dir",
                &relay_dir,
            ],
            &[],
        )
        .unwrap();
    assert!(wait_for(Duration::from_secs(10), || lab
        .stdout(r)
        .contains("relays add")));
    let banner = lab.stdout(r);
    let cmd = banner
        .lines()
        .find_map(|l| l.trim().strip_prefix("lattice-coordinator "))
        .unwrap()
        .to_owned();
    let args: Vec<&str> = cmd.split_whitespace().collect();
    let out = coord.admin(&lab, &args).unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let relay = crate::support::first_relay(&lab, &coord);
    let ns = lab.ns("h0").unwrap();
    lab.attach(&wan, &ns, "eth0", "198.51.100.31/24", None)
        .unwrap();
    let key = coord.authkey(&lab, &[]).unwrap();
    let url = coord.url.clone();
    let node = MeshNode::start(&mut lab, &ns, "gone", &url, &key, &[]).unwrap();
    node.wait_ready(&lab, 0, Duration::from_secs(30)).unwrap();
    let keys: serde_json::Value =
        serde_json::from_slice(&std::fs::read(node.state_dir.join("keys.json")).unwrap()).unwrap();
    let secret = keys["node_private"].as_str().unwrap().to_owned();
    // The relay-probe mints a ticket with the coordinator's key, as a node would hold one.
    let probe = || crate::support::relay_probe(&lab, &ns, &relay, &secret, &seed);
    assert_eq!(probe(), "accepted");
    let out = coord.admin(&lab, &["nodes", "remove", "gone"]).unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let removed = Instant::now();
    // Its tickets are still valid for two minutes, but the relay refuses it within seconds.
    let refused = wait_for(Duration::from_secs(8), || probe().contains("revoked"));
    eprintln!(
        "the relay refused the removed node after {:?}",
        removed.elapsed()
    );
    assert!(
        refused,
        "the standalone relay still serves a removed node: {}",
        probe()
    );
}
