//! The lab as a command.
//!
//! - `lattice-lab demo`: a coordinator and four nodes in network namespaces (public, behind
//!   a home NAT, a symmetric NAT, a UDP-blocking firewall); shows `lattice netcheck` and
//!   `lattice status` (direct and relayed paths), pings by name, puts an access policy in
//!   force, cleans up.
//! - `lattice-lab bench-throughput`: iperf3 through our tunnel, raw veth and other WireGuard
//!   implementations, interleaved in one run; prints medians and ratios.
//! - `lattice-lab bench-relay`: iperf3 over a direct path and through the relay (QUIC and
//!   WebSocket), side by side; prints medians and the relayed share of direct.
//! - `lattice-lab load`: thousands of simulated nodes speaking the control protocol to real
//!   coordinators; checks every node's peers and rules after each change and prints how long
//!   changes took to reach them.
#![allow(clippy::print_stdout)]

use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use e2e::{Coordinator, Lab, MeshNode, Nat};

/// The load generator's thousands of sessions allocate like the coordinator's.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "lattice-lab")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// A coordinator and four nodes (public, behind NATs, UDP blocked); netcheck, status, pings by name, a policy, cleanup.
    Demo,
    /// Throughput through the relay (QUIC and WebSocket) vs a direct path, side by side.
    BenchRelay {
        /// Rounds (each runs every path once, interleaved).
        #[arg(long, default_value_t = 5)]
        rounds: u32,
        /// Seconds per iperf3 run.
        #[arg(long, default_value_t = 5)]
        seconds: u32,
    },
    /// The resident memory of a node with PEERS peers in its netmap (simulated ones beyond
    /// the ACTIVE real ones), idle and while the ACTIVE pass traffic to it, and its CPU.
    BenchMemory {
        /// Peers in the node's netmap.
        #[arg(long, default_value_t = 1000)]
        peers: usize,
        /// Real peers that pass traffic to it (each in its own namespace).
        #[arg(long, default_value_t = 50)]
        active: usize,
        /// Seconds of each measurement.
        #[arg(long, default_value_t = 20)]
        seconds: u32,
    },
    /// COUNT simulated nodes join the coordinator with KEY and stay connected until killed
    /// (a large netmap for real nodes; used by bench-memory).
    HoldNodes {
        /// The coordinator's URL (http://IP:PORT).
        #[arg(long)]
        coordinator: String,
        /// A reusable auth key.
        #[arg(long)]
        key: String,
        /// How many.
        #[arg(long)]
        count: usize,
    },
    /// N simulated nodes speaking the real control protocol to real coordinators over loopback:
    /// how long registration, a policy change, a removal, an arrival and a restart take to
    /// reach every node; every node's peers and rules are checked after each step.
    Load {
        /// Simulated nodes.
        #[arg(long, default_value_t = 200)]
        nodes: usize,
        /// Coordinator replicas to start (more than one needs --db postgres://...).
        #[arg(long, default_value_t = 1)]
        replicas: usize,
        /// `sqlite`, or a PostgreSQL server URL (a fresh database is made there and dropped).
        #[arg(long, default_value = "sqlite")]
        db: String,
        /// Drive coordinators someone else started (repeatable) instead of starting them.
        #[arg(long = "coordinator")]
        coordinators: Vec<String>,
        /// Admin access to those coordinators: their state dir...
        #[arg(long)]
        state_dir: Option<std::path::PathBuf>,
        /// ...or their admin API (`https://...`) with --token.
        #[arg(long, requires = "token")]
        server: Option<String>,
        /// Admin token for --server.
        #[arg(long, requires = "server")]
        token: Option<String>,
        /// Nodes per team: each team reaches itself (0: everyone in one team).
        #[arg(long, default_value_t = 50)]
        team_size: usize,
        /// Registrations in flight at once.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// Seconds any one step may take before the run fails.
        #[arg(long, default_value_t = 120)]
        step_timeout: u64,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Throughput of our tunnel vs raw veth vs other WireGuard implementations.
    BenchThroughput {
        /// Rounds (each runs every target once, interleaved).
        #[arg(long, default_value_t = 5)]
        rounds: u32,
        /// Seconds per iperf3 run.
        #[arg(long, default_value_t = 5)]
        seconds: u32,
        /// Only Lattice and the raw veth (no other implementations, no 4-peer row): a quick
        /// check while working on the data plane.
        #[arg(long)]
        quick: bool,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Demo => demo(),
        Cmd::BenchThroughput {
            rounds,
            seconds,
            quick,
        } => e2e::bench::throughput(rounds, seconds, quick),
        Cmd::BenchRelay { rounds, seconds } => e2e::bench::relay_throughput(rounds, seconds),
        Cmd::BenchMemory {
            peers,
            active,
            seconds,
        } => e2e::bench::memory(peers, active, seconds),
        Cmd::HoldNodes {
            coordinator,
            key,
            count,
        } => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
            .block_on(e2e::load::hold(&coordinator, &key, count)),
        Cmd::Load {
            nodes,
            replicas,
            db,
            coordinators,
            state_dir,
            server,
            token,
            team_size,
            concurrency,
            step_timeout,
            json,
        } => {
            let cfg = e2e::load::LoadConfig {
                nodes,
                replicas,
                db,
                coordinators,
                state_dir,
                server: server.zip(token),
                team_size,
                concurrency,
                step_timeout: Duration::from_secs(step_timeout),
            };
            let report = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?
                .block_on(e2e::load::run(cfg))?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                print!("{}", e2e::load::table(&report));
            }
            Ok(())
        }
    }
}

fn show(title: &str, out: &std::process::Output) {
    println!("\n$ {title}");
    print!("{}", String::from_utf8_lossy(&out.stdout));
    let err = String::from_utf8_lossy(&out.stderr);
    if !err.trim().is_empty() {
        print!("{err}");
    }
}

fn demo() -> anyhow::Result<()> {
    Lab::available()
        .map_err(|e| anyhow::anyhow!("the demo needs root and network namespaces: {e}"))?;
    let mut lab = Lab::new("demo")?;
    println!(
        "== building an \"internet\" (198.51.100.0/24) with a coordinator (embedded relay + STUN)"
    );
    println!("   db-1 has a public address; db-2 sits behind a home-router NAT, web behind a");
    println!("   symmetric (hard) NAT, laptop behind a firewall that drops all UDP");
    let wan = lab.lan("inet", "198.51.100.1/24")?;
    let coord = Coordinator::start(&mut lab, &wan, "198.51.100.1", &[])?;
    print!("{}", lab.stdout(coord.proc));
    let key = coord.authkey(&lab, &["--reusable", "--expiry", "10m"])?;
    println!("\n$ lattice-coordinator authkey create --reusable\n{key}");
    let sites = [
        ("db-1", None),
        ("db-2", Some(Nat::Easy)),
        ("web", Some(Nat::Hard)),
        ("laptop", Some(Nat::UdpBlocked)),
    ];
    let names: Vec<&str> = sites.iter().map(|(n, _)| *n).collect();
    let mut nodes = Vec::new();
    for (i, (name, nat)) in sites.iter().enumerate() {
        let wan_cidr = format!("198.51.100.{}/24", 11 + i);
        let ns = match nat {
            None => {
                let ns = lab.ns(name)?;
                lab.attach(&wan, &ns, "eth0", &wan_cidr, None)?;
                ns
            }
            Some(nat) => {
                lab.natted_host(&wan, name, &wan_cidr, 10 + i as u8, *nat)?
                    .1
            }
        };
        println!(
            "$ [{name}] lattice up --coordinator {} --auth-key $KEY --hostname {name}",
            coord.url
        );
        nodes.push(MeshNode::start(&mut lab, &ns, name, &coord.url, &key, &[])?);
    }
    for n in &nodes {
        n.wait_ready(&lab, names.len() - 1, Duration::from_secs(30))?;
    }
    show(
        "[web] lattice netcheck",
        &nodes[2].cli(&lab, &["netcheck"])?,
    );
    println!("\n== waiting for direct paths (hole punching; port probing for the hard NAT)");
    let direct = |n: &MeshNode| -> usize {
        n.status(&lab)
            .and_then(|s| {
                s["peers"]
                    .as_array()
                    .map(|ps| ps.iter().filter(|p| p["path"]["kind"] == "direct").count())
            })
            .unwrap_or(0)
    };
    // Pings start traffic (and so probing) on every pair; web should reach db-1 and db-2
    // directly, laptop nobody.
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs(20) && direct(&nodes[2]) < 2 {
        for n in &nodes[..3] {
            for m in &names[..3] {
                if *m != n.hostname {
                    n.ping(&lab, m, "-4", 1);
                }
            }
        }
    }
    println!(
        "   web has {} direct paths after {:.1}s",
        direct(&nodes[2]),
        started.elapsed().as_secs_f64()
    );
    let web = &nodes[2];
    show("[web] lattice status", &web.cli(&lab, &["status"])?);
    show(
        "[web] ping -c 3 db-1",
        &lab.output(&web.ns, &["ping", "-c", "3", "-i", "0.3", "db-1"])?,
    );
    show(
        "[web] ping -4 -c 3 db-2.mesh.internal",
        &lab.output(
            &web.ns,
            &["ping", "-4", "-c", "3", "-i", "0.3", "db-2.mesh.internal"],
        )?,
    );
    let db1 = nodes[0].status(&lab).context("db-1 status")?;
    let ip = db1["self"]["ips"][0]
        .as_str()
        .context("db-1 address")?
        .to_owned();
    show(
        &format!("[web] lattice whois {ip}"),
        &web.cli(&lab, &["whois", &ip])?,
    );
    show(
        "lattice-coordinator nodes list",
        &coord.admin(&lab, &["nodes", "list"])?,
    );
    show(
        "lattice-coordinator audit verify",
        &coord.admin(&lab, &["audit", "verify"])?,
    );
    let ok = nodes.iter().all(|n| {
        names
            .iter()
            .filter(|m| **m != n.hostname)
            .all(|m| n.ping(&lab, m, "-4", 1))
    });
    println!(
        "\n== every node reaches every other by name: {}",
        if ok { "yes" } else { "NO" }
    );
    show(
        "[laptop] lattice status   # UDP is blocked here: every peer through the relay, over TCP",
        &nodes[3].cli(&lab, &["status"])?,
    );
    let policy_ok = demo_policy(&lab, &coord, &nodes)?;
    println!("== cleaning up (namespaces and processes are removed)");
    drop(lab);
    if !ok {
        bail!("some pings failed");
    }
    if !policy_ok {
        bail!("the policy was not enforced as expected");
    }
    Ok(())
}

/// Puts a policy in force: web may reach the databases on 5432 (and ping them); the
/// databases may not reach each other. Shows check, diff, set and the effect.
fn demo_policy(lab: &Lab, coord: &Coordinator, nodes: &[MeshNode]) -> anyhow::Result<bool> {
    let ip = |n: &MeshNode| -> anyhow::Result<String> {
        let st = n.status(lab).context("status")?;
        Ok(st["self"]["ips"][0].as_str().context("address")?.to_owned())
    };
    let (db1, db2, web) = (ip(&nodes[0])?, ip(&nodes[1])?, ip(&nodes[2])?);
    let policy = format!(
        r#"// web talks to the databases; nothing else is allowed.
{{
  "hosts": {{"web": "{web}", "db-1": "{db1}", "db-2": "{db2}"}},
  "acls": [
    {{"action": "accept", "src": ["web"], "dst": ["db-1:5432", "db-2:5432"]}},
  ],
  "tests": [
    {{"src": "web", "accept": ["db-1:5432"], "deny": ["db-1:22"]}},
    {{"src": "db-1", "deny": ["db-2:5432"]}},
  ],
}}
"#
    );
    let path = lab.dir().join("policy.hujson");
    std::fs::write(&path, &policy)?;
    let broken = lab.dir().join("broken.hujson");
    std::fs::write(
        &broken,
        policy
            .replace("\"web\"], \"dst\"", "\"group:web\"], \"dst\"")
            .replace("db-2:5432\"]},\n  ],", "db-2:80-70\"]},\n  ],"),
    )?;
    let path = path.display().to_string();
    let broken = broken.display().to_string();
    println!("\n== an access policy\n{policy}");
    let bin = lab.bin("lattice-coordinator").display().to_string();
    show(
        "lattice-coordinator policy check broken.hujson   # offline; every problem, with file:line:col",
        &lab.output(&coord.ns, &[&bin, "policy", "check", &broken])?,
    );
    show(
        "lattice-coordinator policy diff policy.hujson",
        &coord.admin(lab, &["policy", "diff", &path])?,
    );
    show(
        "lattice-coordinator policy set policy.hujson",
        &coord.admin(lab, &["policy", "set", &path])?,
    );
    std::thread::sleep(Duration::from_millis(500));
    let web_db = nodes[2].ping(lab, "db-1", "-4", 2);
    let db_db = nodes[0].ping(lab, "db-2", "-4", 1);
    println!(
        "\n== [web] ping db-1: {}",
        if web_db { "answers" } else { "NO ANSWER" }
    );
    println!(
        "== [db-1] ping db-2: {}",
        if db_db {
            "ANSWERS (should not)"
        } else {
            "dropped by db-2's filter"
        }
    );
    Ok(web_db && !db_db)
}
