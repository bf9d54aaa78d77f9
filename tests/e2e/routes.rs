//! Issue 12, subnet routers with the real binaries: a node advertises its LAN, an admin
//! approves the route, and another node reaches a host on that LAN by its LAN address (the
//! host has no route back to the mesh: the router masquerades), as long as the policy allows
//! it.

use std::time::Duration;

use e2e::lab::wait_for;

use crate::support::{Flat, text};

const POLICY: &str = r#"{
  "tagOwners": {"tag:router": [], "tag:client": []},
  "acls": [
    {"action": "accept", "src": ["tag:client"], "dst": ["10.33.0.0/24:*"]},
    {"action": "accept", "src": ["tag:client", "tag:router"], "dst": ["tag:client:*", "tag:router:*"]},
  ],
}"#;

const CLOSED: &str = r#"{
  "tagOwners": {"tag:router": [], "tag:client": []},
  "acls": [
    {"action": "accept", "src": ["tag:client", "tag:router"], "dst": ["tag:client:*", "tag:router:*"]},
  ],
}"#;

#[test]
fn a_host_behind_a_subnet_router_is_reached_by_its_lan_address_when_the_policy_allows() {
    let Some(lab) = crate::support::lab("routes") else {
        return;
    };
    let mut f = Flat::new(lab, 2, &[]);
    // The router's LAN: 10.33.0.0/24, with a server that knows nothing of the mesh.
    let site = f.lab.lan("site", "10.33.0.254/24").unwrap();
    let router_ns = f.node_ns[0].clone();
    f.lab
        .attach(&site, &router_ns, "site0", "10.33.0.1/24", None)
        .unwrap();
    let srv = f.lab.ns("srv").unwrap();
    f.lab
        .attach(&site, &srv, "eth0", "10.33.0.5/24", None)
        .unwrap();

    let policy = f.lab.dir().join("policy.hujson");
    let closed = f.lab.dir().join("closed.hujson");
    std::fs::write(&policy, POLICY).unwrap();
    std::fs::write(&closed, CLOSED).unwrap();
    let out = f
        .coord
        .admin(&f.lab, &["policy", "set", policy.to_str().unwrap()])
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let rkey = f.coord.authkey(&f.lab, &["--tag", "tag:router"]).unwrap();
    let ckey = f.coord.authkey(&f.lab, &["--tag", "tag:client"]).unwrap();
    let router = f.join(0, "router", &rkey, &["--advertise-routes", "10.33.0.0/24"]);
    let client = f.join(1, "client", &ckey, &[]);
    for n in [router, client] {
        f.nodes[n]
            .wait_ready(&f.lab, 1, Duration::from_secs(30))
            .unwrap();
    }

    // Advertised, not approved: no route, no way in.
    let status = f.nodes[router].status(&f.lab).unwrap();
    assert_eq!(
        status["self"]["routes"]["advertised"],
        serde_json::json!(["10.33.0.0/24"])
    );
    assert_eq!(status["self"]["routes"]["approved"], serde_json::json!([]));
    assert!(!f.nodes[client].ping(&f.lab, "10.33.0.5", "-4", 1));

    // The admin approves it: the client reaches the server by its LAN address.
    let out = f
        .coord
        .admin(
            &f.lab,
            &["nodes", "routes", "router", "--approve", "10.33.0.0/24"],
        )
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("primary:    10.33.0.0/24"),
        "{}",
        text(&out)
    );
    assert!(
        wait_for(Duration::from_secs(20), || f.nodes[client].ping(
            &f.lab,
            "10.33.0.5",
            "-4",
            1
        )),
        "the client cannot reach the LAN host through the router:\n{}",
        f.lab.log(f.nodes[router].proc)
    );
    let status = f.nodes[router].status(&f.lab).unwrap();
    assert_eq!(
        status["self"]["routes"]["primary"],
        serde_json::json!(["10.33.0.0/24"])
    );
    // The client's status and whois show the subnet behind the router.
    let status = f.nodes[client].status(&f.lab).unwrap();
    let peer = status["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "router")
        .unwrap()
        .clone();
    assert_eq!(
        peer["routes"],
        serde_json::json!(["10.33.0.0/24"]),
        "{peer}"
    );
    let router_ip = crate::support::ipv4_of(&f.nodes[router].status(&f.lab).unwrap());
    let whois = f.nodes[client]
        .cli(&f.lab, &["whois", &router_ip, "--json"])
        .unwrap();
    let whois: serde_json::Value = serde_json::from_slice(&whois.stdout).unwrap();
    assert_eq!(
        whois["routes"],
        serde_json::json!(["10.33.0.0/24"]),
        "{whois}"
    );
    // A checksummed TCP transfer from the server's side of the router.
    let tool = f.lab.bin("lattice-testtool");
    let recv = f
        .lab
        .spawn(
            "srv-recv",
            &srv,
            &[
                tool.to_str().unwrap(),
                "tcp-recv",
                "--listen",
                "10.33.0.5:7000",
            ],
            &[],
        )
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let sent = f
        .lab
        .output(
            &f.node_ns[1],
            &[
                tool.to_str().unwrap(),
                "tcp-send",
                "--to",
                "10.33.0.5:7000",
                "--bytes",
                "2000000",
            ],
        )
        .unwrap();
    assert!(sent.status.success(), "{}", text(&sent));
    assert!(f.lab.wait_exit(recv, Duration::from_secs(20)).is_some());
    assert_eq!(
        f.lab.stdout(recv).trim(),
        String::from_utf8_lossy(&sent.stdout).trim(),
        "the transfer through the router arrived intact"
    );

    // The policy closes the subnet: the client is cut off from it (the router's filter).
    let out = f
        .coord
        .admin(&f.lab, &["policy", "set", closed.to_str().unwrap()])
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        wait_for(Duration::from_secs(10), || !f.nodes[client].ping(
            &f.lab,
            "10.33.0.5",
            "-4",
            1
        )),
        "the client still reaches the LAN host after the policy closed it"
    );
    // The mesh itself still works.
    assert!(f.nodes[client].ping(&f.lab, "router", "-4", 2));
}

#[test]
fn when_the_primary_router_goes_away_the_other_one_carries_the_subnet() {
    let Some(lab) = crate::support::lab("failover") else {
        return;
    };
    let mut f = Flat::new(lab, 3, &[]);
    let site = f.lab.lan("site", "10.33.0.254/24").unwrap();
    for (i, ip) in [(0, "10.33.0.1/24"), (1, "10.33.0.2/24")] {
        let ns = f.node_ns[i].clone();
        f.lab.attach(&site, &ns, "site0", ip, None).unwrap();
    }
    let srv = f.lab.ns("srv").unwrap();
    f.lab
        .attach(&site, &srv, "eth0", "10.33.0.5/24", None)
        .unwrap();
    // Both routers' routes are approved by the policy.
    let policy = f.lab.dir().join("policy.hujson");
    std::fs::write(
        &policy,
        r#"{"tagOwners": {"tag:router": [], "tag:client": []},
            "autoApprovers": {"routes": {"10.33.0.0/16": ["tag:router"]}},
            "acls": [{"action": "accept", "src": ["tag:client"], "dst": ["10.33.0.0/24:*"]},
                     {"action": "accept", "src": ["tag:client", "tag:router"], "dst": ["tag:client:*", "tag:router:*"]}]}"#,
    )
    .unwrap();
    let out = f
        .coord
        .admin(&f.lab, &["policy", "set", policy.to_str().unwrap()])
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let rkey = f
        .coord
        .authkey(&f.lab, &["--tag", "tag:router", "--reusable"])
        .unwrap();
    let ckey = f.coord.authkey(&f.lab, &["--tag", "tag:client"]).unwrap();
    let r1 = f.join(0, "r1", &rkey, &["--advertise-routes", "10.33.0.0/24"]);
    f.nodes[r1]
        .wait_ready(&f.lab, 0, Duration::from_secs(30))
        .unwrap();
    let r2 = f.join(1, "r2", &rkey, &["--advertise-routes", "10.33.0.0/24"]);
    let client = f.join(2, "client", &ckey, &[]);
    f.nodes[client]
        .wait_ready(&f.lab, 2, Duration::from_secs(30))
        .unwrap();
    assert!(
        wait_for(Duration::from_secs(20), || f.nodes[client].ping(
            &f.lab,
            "10.33.0.5",
            "-4",
            1
        )),
        "no way to the LAN host"
    );
    let primary = |f: &Flat, i: usize| {
        f.nodes[i]
            .status(&f.lab)
            .is_some_and(|s| s["self"]["routes"]["primary"] == serde_json::json!(["10.33.0.0/24"]))
    };
    assert!(primary(&f, r1), "the first router is primary");
    assert!(!primary(&f, r2));

    // The primary goes away: the other router carries the subnet within 10 s.
    f.lab.kill(f.nodes[r1].proc);
    let t0 = std::time::Instant::now();
    assert!(
        wait_for(Duration::from_secs(10), || f.nodes[client].ping(
            &f.lab,
            "10.33.0.5",
            "-4",
            1
        )),
        "the LAN host is not reachable through the second router:\n{}",
        f.lab.log(f.nodes[r2].proc)
    );
    eprintln!("routes: failover took {:?}", t0.elapsed());
    assert!(primary(&f, r2), "the second router is primary now");
}
