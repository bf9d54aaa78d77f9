//! Issue 10: two coordinator replicas on one PostgreSQL database, three nodes, the real
//! binaries. The nodes use replica A; an admin works through B; then A dies.

use std::time::{Duration, Instant};

use e2e::lab::wait_for;
use e2e::{Coordinator, MeshNode};

use crate::support::{ipv4_of, text};

/// The PostgreSQL server the suite runs against, or `None` (skipped) without one.
pub(crate) fn pg_server() -> Option<String> {
    match std::env::var("LATTICE_TEST_PG") {
        Ok(url) => Some(url),
        Err(_) => {
            assert!(
                std::env::var("LATTICE_PG_REQUIRED").as_deref() != Ok("1"),
                "LATTICE_PG_REQUIRED=1 but LATTICE_TEST_PG names no PostgreSQL server"
            );
            eprintln!("SKIPPED: no PostgreSQL server (LATTICE_TEST_PG; scripts/test starts one)");
            None
        }
    }
}

#[test]
fn two_replicas_share_one_mesh_and_nodes_fail_over_without_losing_traffic() {
    let Some(server) = pg_server() else { return };
    let Some(mut lab) = crate::support::lab("replicas") else {
        return;
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let db_name = format!("lattice_e2e_{:016x}", rand::random::<u64>());
    let db = rt
        .block_on(coordinator::db::create_postgres_database(&server, &db_name))
        .unwrap();

    let lan = lab.lan("lan", "198.51.100.1/24").unwrap();
    let host = |lab: &mut e2e::Lab, role: &str, ip: &str| {
        let ns = lab.ns(role).unwrap();
        lab.attach(&lan, &ns, "eth0", &format!("{ip}/24"), None)
            .unwrap();
        ns
    };
    let ns_a = host(&mut lab, "ra", "198.51.100.2");
    let ns_b = host(&mut lab, "rb", "198.51.100.3");
    let node_ns: Vec<String> = (0..5)
        .map(|i| {
            host(
                &mut lab,
                &format!("h{i}"),
                &format!("198.51.100.{}", 11 + i),
            )
        })
        .collect();
    let (url_a, url_b) = ("http://198.51.100.2:8080", "http://198.51.100.3:8080");

    let a = Coordinator::start_named(
        &mut lab,
        "replica-a",
        &ns_a,
        "198.51.100.2",
        &["--db", &db, "--public-url", url_a],
    )
    .unwrap();
    // B starts from a copy of A's keys: nodes pin the control key, relays trust the ticket
    // key and the audit chain is signed with the audit key.
    let dir_b = lab.dir().join("replica-b");
    std::fs::create_dir_all(&dir_b).unwrap();
    std::fs::set_permissions(&dir_b, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    for f in ["control.key", "ticket.key", "audit.key"] {
        std::fs::copy(a.state_dir.join(f), dir_b.join(f)).unwrap();
    }
    let b = Coordinator::start_named(
        &mut lab,
        "replica-b",
        &ns_b,
        "198.51.100.3",
        &["--db", &db, "--public-url", url_b],
    )
    .unwrap();
    // A replica with other keys is refused, with the reason.
    let out = lab
        .output(
            &ns_b,
            &[
                lab.bin("lattice-coordinator").to_str().unwrap(),
                "serve",
                "--listen",
                "198.51.100.3:9090",
                "--no-embedded-relay",
                "--state-dir",
                lab.dir().join("stranger").to_str().unwrap(),
                "--db",
                &db,
            ],
        )
        .unwrap();
    assert!(!out.status.success());
    assert!(text(&out).contains("is not the mesh's"), "{}", text(&out));

    // Three nodes join through A, knowing B too.
    let key = a.authkey(&lab, &["--reusable"]).unwrap();
    let mut nodes: Vec<MeshNode> = ["n1", "n2", "n3"]
        .iter()
        .enumerate()
        .map(|(i, name)| {
            MeshNode::start(
                &mut lab,
                &node_ns[i],
                name,
                url_a,
                &key,
                &["--coordinator", url_b],
            )
            .unwrap()
        })
        .collect();
    for n in &nodes {
        let st = n.wait_ready(&lab, 2, Duration::from_secs(30)).unwrap();
        assert_eq!(st["coordinator"]["url"], url_a, "{st}");
        assert_eq!(
            st["coordinator"]["replicas"],
            serde_json::json!([url_a, url_b]),
            "{st}"
        );
    }

    // `nodes remove` through B cuts off n3, whose session is on A, within 5 s.
    let removed = Instant::now();
    let out = b.admin(&lab, &["nodes", "remove", "n3"]).unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let n3 = nodes.pop().unwrap();
    assert!(
        lab.wait_exit(n3.proc, Duration::from_secs(5)).is_some(),
        "n3 still runs 5 s after its removal through the other replica:\n{}",
        lab.log(n3.proc)
    );
    assert!(lab.log(n3.proc).contains("removed"), "{}", lab.log(n3.proc));
    assert!(wait_for(Duration::from_secs(5), || {
        nodes.iter().all(|n| {
            n.status(&lab)
                .is_some_and(|s| s["peers"].as_array().is_some_and(|p| p.len() == 1))
        })
    }));
    eprintln!(
        "removal through B: n3 cut off and gone from its peers' maps in {:?}",
        removed.elapsed()
    );

    // Two nodes race one single-use key, one through each replica: exactly one joins.
    let single = b.authkey(&lab, &[]).unwrap();
    let mut racers = vec![
        MeshNode::start(
            &mut lab,
            &node_ns[3],
            "r1",
            url_a,
            &single,
            &["--coordinator", url_b],
        )
        .unwrap(),
        MeshNode::start(
            &mut lab,
            &node_ns[4],
            "r2",
            url_b,
            &single,
            &["--coordinator", url_a],
        )
        .unwrap(),
    ];
    let mut joined = Vec::new();
    assert!(wait_for(Duration::from_secs(30), || {
        joined = racers
            .iter()
            .filter(|r| {
                r.status(&lab)
                    .is_some_and(|s| s["coordinator"]["connected"] == true)
            })
            .map(|r| r.hostname.clone())
            .collect();
        let lost = racers
            .iter_mut()
            .filter(|r| lab.exited(r.proc).is_some())
            .count();
        joined.len() == 1 && lost == 1
    }));
    let names: Vec<String> = a
        .nodes(&lab)
        .unwrap()
        .iter()
        .filter_map(|n| n["name"].as_str().map(str::to_owned))
        .filter(|n| n.starts_with('r'))
        .collect();
    assert_eq!(names, joined);
    eprintln!("single-use key raced through both replicas: only {joined:?} joined");

    // A dies. n1 keeps pinging n2 all along; both are on B within 10 s.
    let n2_ip = ipv4_of(&nodes[1].status(&lab).unwrap());
    let ping_ns = nodes[0].ns.clone();
    let pinger = lab
        .spawn(
            "pinger",
            &ping_ns,
            &["ping", "-4", "-c", "120", "-i", "0.1", "-W", "1", &n2_ip],
            &[],
        )
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let killed = Instant::now();
    a.kill(&mut lab);
    let mut moved = Vec::new();
    for n in &nodes {
        let ok = wait_for(
            Duration::from_secs(10).saturating_sub(killed.elapsed()),
            || {
                n.status(&lab).is_some_and(|s| {
                    s["coordinator"]["connected"] == true && s["coordinator"]["url"] == url_b
                })
            },
        );
        assert!(
            ok,
            "{} is not on replica B within 10 s of A's death:\n{}",
            n.hostname,
            lab.log(n.proc)
        );
        moved.push((n.hostname.clone(), killed.elapsed()));
    }
    eprintln!("after A was killed, on B: {moved:?}");
    assert!(lab.wait_exit(pinger, Duration::from_secs(30)).is_some());
    let summary = lab.stdout(pinger);
    let received: u32 = summary
        .split(", ")
        .find_map(|p| p.strip_suffix(" received"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no ping summary:\n{summary}"));
    eprintln!("n1 -> n2 across the failover: {received}/120 replies");
    assert!(
        received >= 118,
        "traffic between the nodes stopped while their replica died:\n{summary}"
    );

    // B still serves the whole mesh, and the audit chain written by both replicas verifies.
    for n in &nodes {
        n.wait_ready(&lab, 2, Duration::from_secs(10)).unwrap();
    }
    let out = b.admin(&lab, &["audit", "verify"]).unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let actions =
        String::from_utf8_lossy(&b.admin(&lab, &["audit", "list", "--json"]).unwrap().stdout)
            .into_owned();
    for action in ["authkey.create", "node.register", "node.remove"] {
        assert!(actions.contains(action), "{action} missing:\n{actions}");
    }
    drop(racers);
    drop(lab);
    rt.block_on(coordinator::db::drop_postgres_database(&server, &db_name))
        .unwrap();
}
