//! Issue 12, subnet routers and exit nodes with the real binaries: a node advertises its LAN,
//! an admin approves the route, and another node reaches a host on that LAN by its LAN address
//! (the host has no route back to the mesh: the router masquerades), as long as the policy
//! allows it; an exit node carries a client's internet traffic.

use std::time::Duration;

use e2e::lab::wait_for;
use e2e::{MeshNode, Nat};

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
    // A checksummed TCP transfer to the server on the router's LAN.
    let client_ns = f.node_ns[1].clone();
    transfer_intact(&mut f.lab, &client_ns, &srv, "10.33.0.5:7000");

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

const EXIT_POLICY: &str = r#"{
  "tagOwners": {"tag:exit": [], "tag:client": [], "tag:guest": []},
  "autoApprovers": {"exitNode": ["tag:exit"]},
  "acls": [
    {"action": "accept", "src": ["tag:client"], "dst": ["autogroup:internet:*"]},
    // Every source, so nothing but the exit node's own guards keeps the internet out.
    {"action": "accept", "src": ["*"], "dst": ["tag:client:*", "tag:exit:*", "tag:guest:*"]},
  ],
}"#;

#[test]
fn an_exit_node_carries_a_clients_internet_traffic_when_the_policy_allows_and_lets_nothing_in() {
    let Some(lab) = crate::support::lab("exit") else {
        return;
    };
    // h0 is the exit node, h1 a guest the policy keeps off the internet.
    let mut f = Flat::new(lab, 2, &[]);
    // The "internet": 203.0.113.0/24 behind the exit node's second interface, with a server.
    let inet = f.lab.lan("inet", "203.0.113.254/24").unwrap();
    let exit_ns = f.node_ns[0].clone();
    f.lab
        .attach(
            &inet,
            &exit_ns,
            "wan0",
            "203.0.113.2/24",
            Some("203.0.113.254"),
        )
        .unwrap();
    let web = f.lab.ns("web").unwrap();
    f.lab
        .attach(
            &inet,
            &web,
            "eth0",
            "203.0.113.80/24",
            Some("203.0.113.254"),
        )
        .unwrap();
    // The client is behind a home router: it reaches the coordinator, the relay and the exit
    // node's direct address through its default route, the one the exit node takes over.
    let lan = f.lan.clone();
    let (_home, client_ns) = f
        .lab
        .natted_host(&lan, "home", "198.51.100.21/24", 7, Nat::Easy)
        .unwrap();
    assert!(
        !f.lab
            .output(&client_ns, &["ping", "-c1", "-W1", "203.0.113.80"])
            .unwrap()
            .status
            .success(),
        "the lab's internet is out of the client's reach on its own"
    );

    f.set_policy(EXIT_POLICY);
    let ekey = f.coord.authkey(&f.lab, &["--tag", "tag:exit"]).unwrap();
    let gkey = f.coord.authkey(&f.lab, &["--tag", "tag:guest"]).unwrap();
    let ckey = f.coord.authkey(&f.lab, &["--tag", "tag:client"]).unwrap();
    let exit = f.join(0, "exit", &ekey, &["--advertise-exit-node"]);
    let guest = f.join(1, "guest", &gkey, &["--exit-node", "exit"]);
    let url = f.coord.url.clone();
    let laptop = MeshNode::start(
        &mut f.lab,
        &client_ns,
        "laptop",
        &url,
        &ckey,
        &["--exit-node", "exit"],
    )
    .unwrap();
    f.nodes.push(laptop);
    let client = f.nodes.len() - 1;
    for n in [exit, guest, client] {
        f.nodes[n]
            .wait_ready(&f.lab, 2, Duration::from_secs(30))
            .unwrap();
    }

    // autoApprovers approved the exit routes; the client sees the offer and uses it.
    let status = f.nodes[exit].status(&f.lab).unwrap();
    assert_eq!(
        status["self"]["routes"]["approved"],
        serde_json::json!(["0.0.0.0/0", "::/0"])
    );
    let mut last = None;
    assert!(
        wait_for(Duration::from_secs(10), || {
            last = f.nodes[client].status(&f.lab);
            last.as_ref()
                .is_some_and(|s| s["exit_node"]["active"] == true)
        }),
        "the client does not use the exit node: {last:?}"
    );
    let status = last.unwrap();
    assert_eq!(status["exit_node"]["name"], "exit");
    let offer = status["peers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "exit")
        .unwrap()["exit_node_option"]
        .clone();
    assert_eq!(offer, true);

    // The client reaches the internet through the exit node, which the server sees as the
    // source: a checksummed transfer.
    assert!(
        wait_for(Duration::from_secs(20), || f.nodes[client].ping(
            &f.lab,
            "203.0.113.80",
            "-4",
            1
        )),
        "the client cannot reach the internet through the exit node:\n{}",
        f.lab.log(f.nodes[client].proc)
    );
    let recv_log = transfer_intact(&mut f.lab, &client_ns, &web, "203.0.113.80:7000");
    assert!(
        recv_log.contains("peer 203.0.113.2:"),
        "the server saw the exit node's address: {recv_log}"
    );

    // The LAN, the coordinator and the mesh stay reachable as before; after the coordinator
    // restarts, the client's new connections to it still bypass the exit node.
    assert!(
        f.lab
            .output(&client_ns, &["ping", "-c1", "-W2", "10.7.0.1"])
            .unwrap()
            .status
            .success(),
        "the client's LAN is out of reach with an exit node"
    );
    assert!(f.nodes[client].ping(&f.lab, "exit", "-4", 2));
    assert!(f.nodes[client].ping(&f.lab, "guest", "-4", 2));
    f.coord.kill(&mut f.lab);
    assert!(wait_for(Duration::from_secs(15), || f.nodes[client]
        .status(&f.lab)
        .is_some_and(|s| s["coordinator"]["connected"] == false)));
    f.coord.restart(&mut f.lab).unwrap();
    f.nodes[client]
        .wait_ready(&f.lab, 2, Duration::from_secs(30))
        .unwrap();
    assert!(
        wait_for(Duration::from_secs(10), || f.nodes[client].ping(
            &f.lab,
            "203.0.113.80",
            "-4",
            1
        )),
        "the internet through the exit node after the coordinator restarted"
    );

    // The guest chose the exit node too, but the policy does not let it out.
    let gstatus = f.nodes[guest].status(&f.lab).unwrap();
    assert_eq!(gstatus["exit_node"]["active"], true, "{gstatus}");
    assert!(!f.nodes[guest].ping(&f.lab, "203.0.113.80", "-4", 2));
    assert!(f.nodes[guest].ping(&f.lab, "laptop", "-4", 2));

    // The internet behind the exit node cannot open connections to the client, though the
    // policy admits every source there: the exit node drops them (and counts).
    let client_ip = crate::support::ipv4_of(&f.nodes[client].status(&f.lab).unwrap());
    f.lab
        .run(
            &web,
            &["ip", "route", "add", "100.64.0.0/10", "via", "203.0.113.2"],
        )
        .unwrap();
    assert!(
        !f.lab
            .output(&web, &["ping", "-c2", "-i", "0.2", "-W1", &client_ip])
            .unwrap()
            .status
            .success(),
        "the internet reached the client through the exit node"
    );
    let table = f
        .lab
        .run(
            &exit_ns,
            &["nft", "list", "table", "inet", "lattice-lattice0"],
        )
        .unwrap();
    let table = String::from_utf8_lossy(&table.stdout).into_owned();
    let dropped: u64 = table
        .lines()
        .find(|l| l.contains("counter") && l.contains("drop"))
        .and_then(|l| l.split("packets ").nth(1))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(dropped >= 2, "the exit node's guard dropped them:\n{table}");

    // The client stops: its policy routing goes with it.
    let rules = |f: &Flat| -> String {
        String::from_utf8_lossy(
            &f.lab
                .run(&client_ns, &["ip", "rule", "show"])
                .unwrap()
                .stdout,
        )
        .into_owned()
    };
    assert!(rules(&f).contains("5272:"), "{}", rules(&f));
    let out = f.nodes[client].cli(&f.lab, &["down"]).unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let proc = f.nodes[client].proc;
    assert!(f.lab.wait_exit(proc, Duration::from_secs(10)).is_some());
    assert!(!rules(&f).contains("527"), "{}", rules(&f));
}

/// Sends 2 MB over TCP from `client_ns` to a receiver in `server_ns` listening on `addr`,
/// checks that what arrived has the checksum of what was sent, and returns the receiver's log
/// (its `peer ADDR` line says whom it saw).
fn transfer_intact(lab: &mut e2e::Lab, client_ns: &str, server_ns: &str, addr: &str) -> String {
    let tool = lab.bin("lattice-testtool");
    let tool = tool.to_str().unwrap();
    let recv = lab
        .spawn(
            "tcp-recv",
            server_ns,
            &[tool, "tcp-recv", "--listen", addr],
            &[],
        )
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let sent = lab
        .output(
            client_ns,
            &[tool, "tcp-send", "--to", addr, "--bytes", "2000000"],
        )
        .unwrap();
    assert!(sent.status.success(), "{}", text(&sent));
    assert!(lab.wait_exit(recv, Duration::from_secs(20)).is_some());
    assert_eq!(
        lab.stdout(recv).trim(),
        String::from_utf8_lossy(&sent.stdout).trim(),
        "the transfer to {addr} arrived intact"
    );
    lab.log(recv)
}
