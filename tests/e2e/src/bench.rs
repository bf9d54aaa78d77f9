//! `lattice-lab bench-throughput`: iperf3 TCP between two namespaces over a raw veth, over
//! Lattice, and over other userspace WireGuard implementations, interleaved round by round in
//! one run so machine noise hits all of them alike. Each round measures, per target: one
//! stream, four parallel streams, UDP datagrams per second at the tunnel MTU (1,280-byte
//! packets), the CPU seconds the tunnel processes of both ends spent per GB moved (from
//! /proc), and the ping round trip through the tunnel during a one-stream transfer. Then one
//! node sends one stream to each of 4 peers at once (Lattice, the raw veths, and each other
//! implementation as a hub with 4 peers). Prints medians and ratios, the number of
//! data-plane workers Lattice ran (`LATTICE_WORKERS` sets it), and, for each round's one
//! stream, how busy each thread of our two nodes was (the one near 100% bounds the stream).
//! `--quick` measures Lattice and the raw veth only (the 4 peers too);
//! `LATTICE_BENCH_UDP_RATE` sets iperf3's `-b` for the UDP row (default 0: as fast as iperf3
//! sends) and `LATTICE_BENCH_DEBUG` prints iperf3's UDP summaries and ping's round-trip
//! spread. A benchmark, not a test: it asserts nothing about speed.
#![allow(clippy::print_stdout)]

use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};

use crate::lab::{Lab, wait_for};
use crate::mesh::{Coordinator, MeshNode};

struct Target {
    name: String,
    dst: String,
    /// The tunnel's processes at both ends (none for the raw veth).
    pids: Vec<u32>,
    runs: Vec<f64>,
    /// Four parallel streams, bits per second.
    parallel: Vec<f64>,
    /// 1,280-byte UDP packets received per second, sent as fast as iperf3 can.
    udp_pps: Vec<f64>,
    /// CPU seconds of `pids` per GB received in the one-stream run.
    cpu_per_gb: Vec<f64>,
    /// Mean ping round trip (ms) during a one-stream transfer.
    ping_loaded: Vec<f64>,
}

impl Target {
    fn new(name: String, dst: String, pids: Vec<u32>) -> Self {
        Self {
            name,
            dst,
            pids,
            runs: Vec::new(),
            parallel: Vec::new(),
            udp_pps: Vec::new(),
            cpu_per_gb: Vec::new(),
            ping_loaded: Vec::new(),
        }
    }
}

/// User plus system CPU seconds `pids` have used so far (from /proc/PID/stat).
fn cpu_seconds(pids: &[u32]) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    pids.iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
        .filter_map(|stat| {
            // Fields after the command name (which may hold spaces) start at `) `.
            let rest = stat.rsplit_once(") ")?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            // utime and stime are fields 14 and 15 of the whole line: 12 and 13 here.
            Some(f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?)
        })
        .sum::<f64>()
        / ticks
}

/// Busy and total time of all the machine's CPUs so far (from /proc/stat, in ticks): busy is
/// all but idle and waiting for I/O.
fn machine_cpu() -> Option<(f64, f64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let f: Vec<f64> = line
        .split_whitespace()
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let total: f64 = f.iter().take(8).sum();
    Some((total - f.get(3)? - f.get(4)?, total))
}

/// How many of the machine's CPUs were busy on average between two [`machine_cpu`] readings:
/// "9.7 of 16 CPUs busy".
fn machine_busy(before: Option<(f64, f64)>, after: Option<(f64, f64)>) -> String {
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    match (before, after) {
        (Some((b0, t0)), Some((b1, t1))) if t1 > t0 => {
            format!(
                "{:.1} of {cpus} CPUs busy",
                cpus as f64 * (b1 - b0) / (t1 - t0)
            )
        }
        _ => "CPUs busy: unknown".into(),
    }
}

/// CPU seconds each thread of `pid` has used so far, with the thread's name, by thread id
/// (from /proc/PID/task/TID/stat).
fn thread_cpu(pid: u32) -> std::collections::BTreeMap<u32, (String, f64)> {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Default::default();
    };
    tasks
        .filter_map(|t| {
            let tid: u32 = t.ok()?.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).ok()?;
            let (head, rest) = stat.rsplit_once(") ")?;
            let name = head.split_once(" (")?.1.to_owned();
            let f: Vec<&str> = rest.split_whitespace().collect();
            let cpu = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
            Some((tid, (name, cpu / ticks)))
        })
        .collect()
}

/// The threads of one process that used at least 5% of a core between `before` and `after`
/// (`seconds` apart), busiest first: "name 97%, name 40%", and the rest summed.
fn busy_threads(
    before: &std::collections::BTreeMap<u32, (String, f64)>,
    after: &std::collections::BTreeMap<u32, (String, f64)>,
    seconds: f64,
) -> String {
    let mut used: Vec<(f64, &str)> = after
        .iter()
        .map(|(tid, (name, cpu))| {
            let start = before.get(tid).map_or(0.0, |(_, c)| *c);
            (100.0 * (cpu - start) / seconds, name.as_str())
        })
        .collect();
    used.sort_by(|a, b| b.0.total_cmp(&a.0));
    let (busy, rest): (Vec<_>, Vec<_>) = used.iter().partition(|(pct, _)| *pct >= 5.0);
    let mut out: Vec<String> = busy
        .iter()
        .map(|(pct, name)| format!("{name} {pct:.0}%"))
        .collect();
    out.push(format!(
        "{} others {:.0}%",
        rest.len(),
        rest.iter().map(|(pct, _)| pct).sum::<f64>()
    ));
    out.join(", ")
}

/// Runs the benchmark.
pub fn throughput(rounds: u32, seconds: u32, quick: bool) -> anyhow::Result<()> {
    Lab::available()
        .map_err(|e| anyhow::anyhow!("the benchmark needs root and namespaces: {e}"))?;
    let mut lab = Lab::new("bench")?;
    let a = lab.ns("a")?;
    let b = lab.ns("b")?;
    lab.run(
        &a,
        &[
            "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", &b,
        ],
    )?;
    lab.sh(
        &a,
        "ip addr add 10.200.0.1/24 dev eth0 && ip link set eth0 up",
    )?;
    lab.sh(
        &b,
        "ip addr add 10.200.0.2/24 dev eth0 && ip link set eth0 up",
    )?;

    let mut targets = vec![Target::new("raw veth".into(), "10.200.0.2".into(), vec![])];

    // Lattice: coordinator next to node a, nodes in a and b.
    let coord = Coordinator::start(&mut lab, &a, "10.200.0.1", &[])?;
    let key = coord.authkey(&lab, &["--reusable"])?;
    let na = MeshNode::start(&mut lab, &a, "bench-a", &coord.url, &key, &[])?;
    let nb = MeshNode::start(&mut lab, &b, "bench-b", &coord.url, &key, &[])?;
    na.wait_ready(&lab, 1, Duration::from_secs(30))?;
    let sb = nb.wait_ready(&lab, 1, Duration::from_secs(30))?;
    let lattice_dst = sb["self"]["ips"][0]
        .as_str()
        .context("b's address")?
        .to_owned();
    let workers = sb["workers"].as_u64().unwrap_or(1);
    let helpers = if sb["io_helpers"] == true {
        "run each batch's crypto on a second thread and the core's last step on a third \
         while they read the next, and send and write the TUN device through helper tasks"
    } else {
        "finish each batch and send and write the TUN device themselves"
    };
    let aead = match sb["aead_helpers"].as_u64().unwrap_or(0) {
        0 => String::new(),
        n => format!(", each batch's crypto shared with {n} helper threads (LATTICE_AEAD_HELPERS)"),
    };
    // Warm up: the first packets go through the relay until the direct path answers.
    lab.output(&a, &["ping", "-c", "5", "-i", "0.2", &lattice_dst])?;
    let mtu = "1280";
    let lattice_pids = [na.proc, nb.proc]
        .iter()
        .filter_map(|p| lab.pid(*p))
        .collect();
    targets.push(Target::new(
        format!("lattice ({workers} wkr)"),
        lattice_dst.clone(),
        lattice_pids,
    ));

    // Other implementations speaking the WireGuard UAPI, each on its own port and subnet.
    let impls: [Impl<'_>; 3] = [
        ("wireguard-go", &["wireguard-go", "-f"], 51820, 201),
        (
            "boringtun-cli",
            &["boringtun-cli", "--foreground", "--disable-drop-privileges"],
            51821,
            202,
        ),
        (
            "gotatun-cli",
            &["gotatun", "--foreground", "--disable-drop-privileges"],
            51822,
            203,
        ),
    ];
    let mut installed = Vec::new();
    for (name, cmd, port, net) in impls {
        if quick {
            break;
        }
        if Command::new(cmd[0]).arg("--help").output().is_err() {
            println!("({name} not installed: `{}` not found; skipped)", cmd[0]);
            continue;
        }
        match wireguard_pair(&mut lab, &a, &b, name, cmd, port, net) {
            Ok((dst, pids)) => targets.push(Target::new(name.into(), dst, pids)),
            Err(e) => println!("({name} could not be set up: {e:#}; skipped)"),
        }
        // Their 4-peer setups use the next port and a subnet of their own.
        installed.push((name, cmd, port + 10, net + 10));
    }

    let iperf_srv = lab.spawn("iperf3-server", &b, &["iperf3", "-s"], &[])?;
    std::thread::sleep(Duration::from_millis(500));
    println!(
        "TCP, {rounds} interleaved rounds of {seconds}s per measurement; both ends and the tunnels share this machine's {} CPUs",
        std::thread::available_parallelism().map_or(1, usize::from)
    );
    for round in 1..=rounds {
        for t in &mut targets {
            // One stream, with a ping through the same tunnel meanwhile and the tunnel
            // processes' CPU time around it.
            let cpu_before = cpu_seconds(&t.pids);
            // Our nodes' threads (only theirs are shown) before the run.
            let ours = t.dst == lattice_dst;
            let threads_before: Vec<_> = if ours {
                t.pids.iter().map(|p| thread_cpu(*p)).collect()
            } else {
                Vec::new()
            };
            let started = std::time::Instant::now();
            let (bps, ping) = std::thread::scope(|s| {
                let pinger = s.spawn(|| ping_mean_ms(&lab, &a, &t.dst, seconds));
                let bps = iperf(&lab, &a, &t.dst, seconds);
                (bps, pinger.join().ok().flatten())
            });
            let bps = bps.with_context(|| format!("iperf3 to {} ({})", t.name, t.dst))?;
            let cpu = cpu_seconds(&t.pids) - cpu_before;
            // Our nodes' threads: which of them bounds the stream.
            let threads = if ours {
                let secs = started.elapsed().as_secs_f64();
                let ends = ["sender", "receiver"];
                t.pids
                    .iter()
                    .zip(&threads_before)
                    .zip(ends)
                    .map(|((pid, before), end)| {
                        format!(
                            "\n    {end}'s threads, % of a core: {}",
                            busy_threads(before, &thread_cpu(*pid), secs)
                        )
                    })
                    .collect::<String>()
            } else {
                String::new()
            };
            let gb = bps * f64::from(seconds) / 8.0 / 1e9;
            if !t.pids.is_empty() && gb > 0.0 {
                t.cpu_per_gb.push(cpu / gb);
            }
            if let Some(ms) = ping {
                t.ping_loaded.push(ms);
            }
            t.runs.push(bps);
            let par = iperf_parallel(&lab, &a, &t.dst, seconds, 4)
                .with_context(|| format!("iperf3 -P 4 to {} ({})", t.name, t.dst))?;
            t.parallel.push(par);
            let pps = udp_pps(&lab, &a, &t.dst, seconds)
                .with_context(|| format!("iperf3 -u to {} ({})", t.name, t.dst))?;
            t.udp_pps.push(pps);
            // For our tunnel, which path the run took (it must be the direct one).
            let path = if ours {
                na.status(&lab)
                    .map(|s| {
                        let p = &s["peers"][0]["path"];
                        let at = p["addr"].as_str().or(p["relay"].as_str()).unwrap_or("");
                        format!(" (path: {} {at})", p["kind"].as_str().unwrap_or("?"))
                    })
                    .unwrap_or_default()
            } else {
                String::new()
            };
            println!(
                "  round {round}: {:<22} {:>8.3} Gbit/s, 4 streams {:>7.3} Gbit/s, UDP {:>8.0} pkt/s, ping under load {}{path}{threads}",
                t.name,
                bps / 1e9,
                par / 1e9,
                pps,
                ping.map_or_else(|| "-".into(), |ms| format!("{ms:.2} ms")),
            );
        }
    }
    lab.kill(iperf_srv);

    let med: Vec<(String, f64)> = targets
        .iter()
        .map(|t| (t.name.clone(), median(&t.runs)))
        .collect();
    let raw = med[0].1;
    let ours = med[1].1;
    println!(
        "\n{:<22} {:>12} {:>12} {:>12}   runs (Gbit/s)",
        "target", "median", "vs raw veth", "lattice vs"
    );
    for (t, (name, m)) in targets.iter().zip(&med) {
        let runs: Vec<String> = t.runs.iter().map(|r| format!("{:.2}", r / 1e9)).collect();
        println!(
            "{name:<22} {:>9.3} Gb {:>11.1}% {:>11.2}x   {}",
            m / 1e9,
            100.0 * m / raw,
            ours / m,
            runs.join(" ")
        );
    }
    let opt = |v: &[f64], f: &dyn Fn(f64) -> String| {
        if v.is_empty() {
            "-".to_owned()
        } else {
            f(median(v))
        }
    };
    let par_raw = median(&targets[0].parallel);
    let par_ours = median(&targets[1].parallel);
    let pps_ours = median(&targets[1].udp_pps);
    println!(
        "\n{:<22} {:>16} {:>12} {:>12} {:>14} {:>12} {:>14}",
        "target",
        "4 streams",
        "vs raw veth",
        "lattice vs",
        "UDP pkt/s",
        "lattice vs",
        "CPU s per GB"
    );
    for t in &targets {
        let par = median(&t.parallel);
        let pps = median(&t.udp_pps);
        println!(
            "{:<22} {:>11.3} Gb/s {:>11.1}% {:>11.2}x {:>14.0} {:>11.2}x {:>14}",
            t.name,
            par / 1e9,
            100.0 * par / par_raw,
            par_ours / par,
            pps,
            pps_ours / pps,
            opt(&t.cpu_per_gb, &|v| format!("{v:.2}")),
        );
    }
    println!(
        "\nping through each target during a one-stream transfer (mean round trip, median of rounds):"
    );
    for t in &targets {
        println!(
            "{:<22} {:>10}",
            t.name,
            opt(&t.ping_loaded, &|v| format!("{v:.2} ms"))
        );
    }
    drop(targets);
    // With `quick`, nothing else is installed: Lattice and the raw veths only.
    four_peers(
        &mut lab,
        (&a, &na),
        &coord.url,
        &key,
        &installed,
        (rounds, seconds),
    )?;
    println!(
        "\nlattice: {workers} data-plane workers per node (TUN queues and UDP sockets), which \
         {helpers}{aead}; tunnel MTU {mtu}"
    );
    // How often a read buffer handed on as packets was read into again (else allocated);
    // builds from before they were counted say nothing.
    let buffers = |n: &MeshNode| {
        n.status(&lab).and_then(|s| {
            let b = &s["buffers"];
            Some(format!(
                "{} handed on, {} used again",
                b["handed_on"].as_u64()?,
                b["reused"].as_u64()?
            ))
        })
    };
    if let (Some(a), Some(b)) = (buffers(&na), buffers(&nb)) {
        println!("lattice read buffers handed on as packets: sender {a}; receiver {b}");
    }
    Ok(())
}

/// Peers in the "4 peers at once" row.
const PEERS: u8 = 4;

/// A UAPI WireGuard implementation: name, command (the device name is appended), UDP port,
/// tunnel subnet (10.NET.0.0/24).
type Impl<'a> = (&'a str, &'a [&'a str], u16, u8);

/// "4 peers at once": four more namespaces, each on its own veth to `hub` and running a
/// Lattice node in the same mesh and a peer of each other WireGuard implementation; one TCP
/// stream from the hub to each at the same time, over the raw veths, through Lattice and
/// through each implementation, interleaved round by round. Prints the summed rates.
fn four_peers(
    lab: &mut Lab,
    (hub, hub_node): (&str, &MeshNode),
    coordinator: &str,
    key: &str,
    impls: &[Impl<'_>],
    (rounds, seconds): (u32, u32),
) -> anyhow::Result<()> {
    let mut raw_dsts = Vec::new();
    let mut nodes = Vec::new();
    let mut servers = Vec::new();
    let mut peer_ns = Vec::new();
    for k in 1..=PEERS {
        let ns = lab.ns(&format!("p{k}"))?;
        let (hub_if, peer_if) = (format!("pk{k}"), format!("eth{k}"));
        lab.run(
            hub,
            &[
                "ip", "link", "add", &hub_if, "type", "veth", "peer", "name", &peer_if, "netns",
                &ns,
            ],
        )?;
        lab.sh(
            hub,
            &format!("ip addr add 10.210.{k}.1/24 dev {hub_if} && ip link set {hub_if} up"),
        )?;
        lab.sh(
            &ns,
            &format!(
                "ip addr add 10.210.{k}.2/24 dev {peer_if} && ip link set {peer_if} up && \
                 ip route add default via 10.210.{k}.1"
            ),
        )?;
        raw_dsts.push(format!("10.210.{k}.2"));
        let node = MeshNode::start(lab, &ns, &format!("bench-p{k}"), coordinator, key, &[])?;
        servers.push(lab.spawn(&format!("iperf3-p{k}"), &ns, &["iperf3", "-s"], &[])?);
        nodes.push((ns.clone(), node));
        peer_ns.push(ns);
    }
    let mut lattice_dsts = Vec::new();
    for (ns, node) in &nodes {
        // Each peer sees the hub, the far end of the main pair and the other peers.
        let st = node.wait_ready(lab, usize::from(PEERS) + 1, Duration::from_secs(30))?;
        let ip = st["self"]["ips"][0]
            .as_str()
            .with_context(|| format!("the address of the node in {ns}"))?
            .to_owned();
        lab.output(hub, &["ping", "-c", "5", "-i", "0.2", &ip])?;
        lattice_dsts.push(ip);
    }
    let mut targets: Vec<(String, Vec<String>, Vec<f64>)> = vec![
        ("raw veth".into(), raw_dsts, Vec::new()),
        ("lattice".into(), lattice_dsts, Vec::new()),
    ];
    for (name, cmd, port, net) in impls {
        match wireguard_star(lab, hub, &peer_ns, name, cmd, *port, *net) {
            Ok(dsts) => targets.push(((*name).to_owned(), dsts, Vec::new())),
            Err(e) => println!("({name} with {PEERS} peers could not be set up: {e:#}; skipped)"),
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    println!(
        "\n{PEERS} peers at once: one TCP stream from one node to each of {PEERS} peers, summed"
    );
    // Lattice's hub and its peers' nodes: whose threads bound the streams, and whether the
    // machine had CPUs to spare.
    let hub_pid = lab.pid(hub_node.proc);
    let peer_pids: Vec<u32> = nodes.iter().filter_map(|(_, n)| lab.pid(n.proc)).collect();
    for round in 1..=rounds {
        for (i, (name, dsts, out)) in targets.iter_mut().enumerate() {
            let lab: &Lab = lab;
            let ours = i == 1;
            let hub_before = hub_pid.filter(|_| ours).map(thread_cpu);
            let peers_before = cpu_seconds(&peer_pids);
            let machine_before = machine_cpu();
            let started = std::time::Instant::now();
            let sum = std::thread::scope(|s| {
                let runs: Vec<_> = dsts
                    .iter()
                    .map(|d| s.spawn(|| iperf(lab, hub, d, seconds)))
                    .collect();
                runs.into_iter()
                    .map(|r| {
                        r.join()
                            .map_err(|_| anyhow::anyhow!("iperf3 thread panicked"))?
                    })
                    .sum::<anyhow::Result<f64>>()
            })
            .with_context(|| format!("{PEERS} streams through {name}"));
            // The raw veths and Lattice must measure; another implementation whose run fails
            // (gotatun-cli's iperf3 once printed nothing) is left out of this round.
            let sum = match sum {
                Ok(sum) => sum,
                Err(e) if i >= 2 => {
                    println!("  round {round}: {name:<22} failed ({e:#}); left out");
                    continue;
                }
                Err(e) => return Err(e),
            };
            let secs = started.elapsed().as_secs_f64();
            println!(
                "  round {round}: {name:<22} {:>8.3} Gbit/s in total, {}",
                sum / 1e9,
                machine_busy(machine_before, machine_cpu())
            );
            if let (Some(pid), Some(before)) = (hub_pid, &hub_before) {
                println!(
                    "    hub's threads, % of a core: {}\n    the {PEERS} peers' nodes: {:.0}% of a \
                     core in all",
                    busy_threads(before, &thread_cpu(pid), secs),
                    100.0 * (cpu_seconds(&peer_pids) - peers_before) / secs
                );
            }
            out.push(sum);
        }
    }
    for s in servers {
        lab.kill(s);
    }
    // Which of the hub's workers took its peers (each peer's acknowledgements, and with
    // them, through the TUN driver's flow steering, the stream to it).
    if let Some(st) = hub_node.status(lab) {
        let s = &st["steering"];
        println!(
            "lattice hub: peers steered to workers {}, senders per worker {}, datagrams handed \
             over {}, dropped {}",
            if s["on"] == true { "on" } else { "off" },
            s["senders"],
            s["handed_over"],
            s["dropped"]
        );
    }
    let raw = median(&targets[0].2);
    let ours = median(&targets[1].2);
    println!(
        "\n{:<22} {:>12} {:>12} {:>12}   runs (Gbit/s)",
        "4 peers at once", "total", "vs raw veth", "lattice vs"
    );
    for (name, _, runs) in targets.iter().filter(|t| !t.2.is_empty()) {
        let m = median(runs);
        let all: Vec<String> = runs.iter().map(|r| format!("{:.2}", r / 1e9)).collect();
        println!(
            "{name:<22} {:>9.3} Gb {:>11.1}% {:>11.2}x   {}",
            m / 1e9,
            100.0 * m / raw,
            ours / m,
            all.join(" ")
        );
    }
    Ok(())
}

/// One UAPI WireGuard implementation as a hub in `hub` with a peer in each of `peers` (the
/// peer in `peers[k]` reachable at 10.210.{k+1}.2); returns the peers' tunnel addresses.
fn wireguard_star(
    lab: &mut Lab,
    hub: &str,
    peers: &[String],
    name: &str,
    cmd: &[&str],
    port: u16,
    net: u8,
) -> anyhow::Result<Vec<String>> {
    let pid = std::process::id() % 10_000;
    let keys: Vec<(String, String)> = (0..=peers.len())
        .map(|_| wg_keypair())
        .collect::<anyhow::Result<_>>()?;
    let up = |lab: &mut Lab, ns: &str, i: usize| -> anyhow::Result<String> {
        // Device names are global: UAPI sockets live in /var/run/wireguard.
        let dev = format!("ws{net}{i}x{pid}");
        let mut full: Vec<&str> = cmd.to_vec();
        full.push(&dev);
        lab.spawn(
            &format!("{name}-star-{i}"),
            ns,
            &full,
            &[("LOG_LEVEL", "error")],
        )?;
        if !wait_for(Duration::from_secs(5), || {
            lab.output(ns, &["ip", "link", "show", &dev])
                .is_ok_and(|o| o.status.success())
        }) {
            bail!("{name} did not create {dev}");
        }
        let keyfile = lab.dir().join(format!("{dev}.key"));
        std::fs::write(&keyfile, format!("{}\n", keys[i].0))?;
        lab.sh(
            ns,
            &format!(
                "wg set {dev} private-key {} listen-port {port} && \
                 ip addr add 10.{net}.0.{}/24 dev {dev} && ip link set {dev} mtu 1280 up",
                keyfile.display(),
                i + 1
            ),
        )?;
        Ok(dev)
    };
    let hub_dev = up(lab, hub, 0)?;
    let mut dsts = Vec::new();
    for (k, ns) in peers.iter().enumerate() {
        let i = k + 1;
        let dev = up(lab, ns, i)?;
        lab.sh(
            ns,
            &format!(
                "wg set {dev} peer {} endpoint 10.210.{i}.1:{port} allowed-ips 10.{net}.0.0/24",
                keys[0].1
            ),
        )?;
        lab.sh(
            hub,
            &format!(
                "wg set {hub_dev} peer {} endpoint 10.210.{i}.2:{port} allowed-ips 10.{net}.0.{}/32",
                keys[i].1,
                i + 1
            ),
        )?;
        let dst = format!("10.{net}.0.{}", i + 1);
        if !lab
            .output(hub, &["ping", "-c", "2", "-W", "2", &dst])?
            .status
            .success()
        {
            bail!("no connectivity through {name} to {dst}");
        }
        dsts.push(dst);
    }
    Ok(dsts)
}

/// A WireGuard key pair from `wg`: (private, public), base64.
fn wg_keypair() -> anyhow::Result<(String, String)> {
    let sk = Command::new("wg").arg("genkey").output()?;
    let sk = String::from_utf8(sk.stdout)?.trim().to_owned();
    let pk = Command::new("sh")
        .args(["-c", &format!("echo {sk} | wg pubkey")])
        .output()?;
    Ok((sk, String::from_utf8(pk.stdout)?.trim().to_owned()))
}

/// The mean round trip (ms) of pings to `dst` every 0.2 s for `seconds`.
fn ping_mean_ms(lab: &Lab, ns: &str, dst: &str, seconds: u32) -> Option<f64> {
    let count = (seconds * 5).saturating_sub(2).max(1).to_string();
    let out = lab
        .output(
            ns,
            &[
                "ping", "-q", "-n", "-i", "0.2", "-c", &count, "-W", "1", dst,
            ],
        )
        .ok()?;
    // rtt min/avg/max/mdev = 0.041/0.052/0.093/0.011 ms
    let text = String::from_utf8_lossy(&out.stdout);
    let stats = text.lines().find(|l| l.contains("min/avg/max"))?;
    if std::env::var_os("LATTICE_BENCH_DEBUG").is_some() {
        println!("    ping {dst}: {stats}");
    }
    stats
        .split('=')
        .nth(1)?
        .trim()
        .split('/')
        .nth(1)?
        .parse()
        .ok()
}

/// UDP to `dst` as fast as iperf3 sends, in datagrams that make 1,280-byte IP packets (the
/// tunnels' MTU): datagrams received per second.
fn udp_pps(lab: &Lab, ns: &str, dst: &str, seconds: u32) -> anyhow::Result<f64> {
    let t = seconds.to_string();
    let rate = std::env::var("LATTICE_BENCH_UDP_RATE").unwrap_or_else(|_| "0".into());
    let out = lab.run(
        ns,
        &[
            "iperf3", "-c", dst, "-t", &t, "-u", "-b", &rate, "-l", "1252", "-J",
        ],
    )?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let sum = &v["end"]["sum"];
    let sent = sum["packets"]
        .as_f64()
        .context("iperf3 printed no packet count")?;
    let lost = sum["lost_packets"].as_f64().unwrap_or(0.0);
    if std::env::var_os("LATTICE_BENCH_DEBUG").is_some() {
        println!("    udp {dst}: {sum}");
    }
    let secs = sum["seconds"]
        .as_f64()
        .filter(|s| *s > 0.0)
        .unwrap_or(f64::from(seconds));
    Ok((sent - lost).max(0.0) / secs)
}

/// `parallel` TCP streams to `dst`: their summed rate, bits per second.
fn iperf_parallel(
    lab: &Lab,
    ns: &str,
    dst: &str,
    seconds: u32,
    parallel: u32,
) -> anyhow::Result<f64> {
    let t = seconds.to_string();
    let p = parallel.to_string();
    let out = lab.run(ns, &["iperf3", "-c", dst, "-t", &t, "-P", &p, "-J"])?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3 printed no result")
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[s.len() / 2]
}

fn iperf(lab: &Lab, ns: &str, dst: &str, seconds: u32) -> anyhow::Result<f64> {
    iperf_run(lab, ns, dst, seconds).map(|(bps, _)| bps)
}

/// One single-stream iperf3 run: bits per second received, and the sender's TCP
/// retransmissions (segments the path lost or reordered past TCP's patience), where iperf3
/// reports them.
fn iperf_run(lab: &Lab, ns: &str, dst: &str, seconds: u32) -> anyhow::Result<(f64, Option<u64>)> {
    let t = seconds.to_string();
    let out = lab.run(ns, &["iperf3", "-c", dst, "-t", &t, "-J"])?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let bps = v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3 printed no result")?;
    Ok((bps, v["end"]["sum_sent"]["retransmits"].as_u64()))
}

/// Starts one UAPI WireGuard implementation in both namespaces and connects them; returns the
/// address of b's end and the two processes' PIDs.
fn wireguard_pair(
    lab: &mut Lab,
    a: &str,
    b: &str,
    name: &str,
    cmd: &[&str],
    port: u16,
    net: u8,
) -> anyhow::Result<(String, Vec<u32>)> {
    // Per-side device names: UAPI sockets live in /var/run/wireguard, shared by namespaces.
    let pid = std::process::id() % 10_000;
    let (ska, pka) = wg_keypair()?;
    let (skb, pkb) = wg_keypair()?;
    let sides = [
        (a, &ska, &pkb, 1u8, "10.200.0.2"),
        (b, &skb, &pka, 2u8, "10.200.0.1"),
    ];
    let mut pids = Vec::new();
    for (ns, sk, peer, host, peer_ip) in sides {
        let dev = format!("wb{net}{host}x{pid}");
        let mut full: Vec<&str> = cmd.to_vec();
        full.push(&dev);
        let p = lab.spawn(
            &format!("{name}-{host}"),
            ns,
            &full,
            &[("LOG_LEVEL", "error")],
        )?;
        pids.extend(lab.pid(p));
        if !wait_for(Duration::from_secs(5), || {
            lab.output(ns, &["ip", "link", "show", &dev])
                .is_ok_and(|o| o.status.success())
        }) {
            bail!("{name} did not create {dev}");
        }
        let keyfile = lab.dir().join(format!("{dev}-{host}.key"));
        std::fs::write(&keyfile, format!("{sk}\n"))?;
        lab.sh(
            ns,
            &format!(
                "wg set {dev} private-key {key} listen-port {port} peer {peer} endpoint {peer_ip}:{port} \
                 allowed-ips 10.{net}.0.0/24 && ip addr add 10.{net}.0.{host}/24 dev {dev} && \
                 ip link set {dev} mtu 1280 up",
                key = keyfile.display()
            ),
        )?;
    }
    let dst = format!("10.{net}.0.2");
    if !lab
        .output(a, &["ping", "-c", "2", "-W", "2", &dst])?
        .status
        .success()
    {
        bail!("no connectivity through {name}");
    }
    Ok((dst, pids))
}

/// `lattice-lab bench-relay`: single-stream TCP between two nodes behind NAT routers, side by
/// side for three pairs in one mesh: direct, relayed over QUIC (UDP between the two routers is
/// dropped), and relayed over the WebSocket (one side's network drops all UDP). Rounds are
/// interleaved; prints medians and each relayed path as a share of the direct one, and for
/// each run how busy each thread of the two nodes (and of the coordinator, whose relay
/// carries the relayed pairs) was.
pub fn relay_throughput(rounds: u32, seconds: u32) -> anyhow::Result<()> {
    use crate::lab::Nat;
    Lab::available()
        .map_err(|e| anyhow::anyhow!("the benchmark needs root and namespaces: {e}"))?;
    let mut lab = Lab::new("bench-relay")?;
    let wan = lab.lan("inet", "198.51.100.1/24")?;
    let coord = Coordinator::start(&mut lab, &wan, "198.51.100.1", &[])?;
    let key = coord.authkey(&lab, &["--reusable"])?;
    // (name, nat of a, nat of b)
    let pairs = [
        ("direct", Nat::Easy, Nat::Easy),
        ("relay over QUIC", Nat::Easy, Nat::Easy),
        ("relay over WebSocket", Nat::UdpBlocked, Nat::Easy),
    ];
    let mut nodes = Vec::new();
    let mut routers = Vec::new();
    for (p, (_, na, nb)) in pairs.iter().enumerate() {
        for (side, nat) in [("a", *na), ("b", *nb)] {
            let i = p * 2 + usize::from(side == "b");
            let (r, ns) = lab.natted_host(
                &wan,
                &format!("{side}{p}"),
                &format!("198.51.100.{}/24", 40 + i),
                40 + i as u8,
                nat,
            )?;
            routers.push(r);
            let name = format!("{side}{p}");
            nodes.push((
                ns.clone(),
                MeshNode::start(&mut lab, &ns, &name, &coord.url, &key, &[])?,
            ));
        }
    }
    // Pair 1: the two routers drop UDP between each other (the relay stays reachable).
    for (router, peer) in [
        (&routers[2], "198.51.100.43"),
        (&routers[3], "198.51.100.42"),
    ] {
        let rule = format!("nft add rule ip lab forward ip daddr {peer} meta l4proto udp drop");
        let args: Vec<&str> = rule.split(' ').collect();
        lab.run(router, &args)?;
    }
    for (_, n) in &nodes {
        n.wait_ready(&lab, nodes.len() - 1, Duration::from_secs(30))?;
    }
    let mut targets = Vec::new();
    for (p, (name, _, _)) in pairs.iter().enumerate() {
        let (a_ns, a) = &nodes[p * 2];
        let (b_ns, b) = &nodes[p * 2 + 1];
        let dst = b.status(&lab).context("status")?["self"]["ips"][0]
            .as_str()
            .context("address")?
            .to_owned();
        lab.spawn(&format!("iperf3-{p}"), b_ns, &["iperf3", "-s"], &[])?;
        // Warm up the path and let it settle.
        lab.output(a_ns, &["ping", "-c", "20", "-i", "0.2", &dst])?;
        let path = a
            .status(&lab)
            .and_then(|s| {
                s["peers"]
                    .as_array()?
                    .iter()
                    .find(|x| x["name"] == b.hostname.as_str())
                    .map(|x| x["path"].clone())
            })
            .unwrap_or_default();
        println!("{name:<22} path {path}");
        // Whose threads to show: both nodes, and the coordinator (its relay) when relayed.
        let mut procs = vec![("sender", a.proc), ("receiver", b.proc)];
        if p > 0 {
            procs.push(("relay (coordinator)", coord.proc));
        }
        let pids: Vec<(&str, u32)> = procs
            .into_iter()
            .filter_map(|(who, proc)| Some((who, lab.pid(proc)?)))
            .collect();
        targets.push(RelayTarget {
            name: name.to_string(),
            ns: a_ns.clone(),
            dst,
            pids,
            runs: Vec::new(),
            pings: Vec::new(),
            cpu: Vec::new(),
        });
    }
    println!("single-stream TCP, {rounds} interleaved rounds of {seconds}s");
    for round in 1..=rounds {
        for RelayTarget {
            name,
            ns,
            dst,
            pids,
            runs,
            pings,
            cpu,
        } in &mut targets
        {
            let before: Vec<_> = pids.iter().map(|(_, pid)| thread_cpu(*pid)).collect();
            let cpu_before: Vec<f64> = pids.iter().map(|(_, pid)| cpu_seconds(&[*pid])).collect();
            let started = std::time::Instant::now();
            // A ping through the same path meanwhile: what the transfer's queues cost.
            let (run, ping) = std::thread::scope(|s| {
                let pinger = s.spawn(|| ping_mean_ms(&lab, ns, dst, seconds));
                let run = iperf_run(&lab, ns, dst, seconds);
                (run, pinger.join().ok().flatten())
            });
            let (bps, retransmits) = run.with_context(|| format!("iperf3 over {name}"))?;
            runs.push(bps);
            pings.extend(ping);
            println!(
                "  round {round}: {name:<22} {:>8.3} Gbit/s   {} TCP retransmissions, ping {}",
                bps / 1e9,
                retransmits.map_or("?".into(), |n| n.to_string()),
                ping.map_or("-".into(), |ms| format!("{ms:.2} ms"))
            );
            let secs = started.elapsed().as_secs_f64();
            // CPU seconds each process spent per GB that went through (the relay's own
            // cost per byte, apart from how fast the stream went).
            let gb = bps * f64::from(seconds) / 8e9;
            let mut per_gb = Vec::new();
            for (((who, pid), before), cpu0) in pids.iter().zip(&before).zip(&cpu_before) {
                let s_per_gb = (cpu_seconds(&[*pid]) - cpu0) / gb.max(1e-9);
                per_gb.push((who.starts_with("relay"), s_per_gb));
                println!(
                    "    {who}'s threads, % of a core: {}; {s_per_gb:.2} CPU s per GB",
                    busy_threads(before, &thread_cpu(*pid), secs)
                );
            }
            // The two nodes together, and the relay (none on the direct path).
            cpu.push((
                per_gb
                    .iter()
                    .filter(|(relay, _)| !relay)
                    .map(|(_, c)| c)
                    .sum::<f64>(),
                per_gb.iter().find(|(relay, _)| *relay).map(|(_, c)| *c),
            ));
        }
    }
    let direct = median(&targets[0].runs);
    println!(
        "\n{:<22} {:>12} {:>12} {:>16} {:>22}   runs (Gbit/s)",
        "path", "median", "vs direct", "ping under load", "CPU s/GB nodes, relay"
    );
    for RelayTarget {
        name,
        runs,
        pings,
        cpu,
        ..
    } in &targets
    {
        let m = median(runs);
        let r: Vec<String> = runs.iter().map(|x| format!("{:.3}", x / 1e9)).collect();
        let ping = if pings.is_empty() {
            "-".to_string()
        } else {
            format!("{:.2} ms", median(pings))
        };
        let nodes: Vec<f64> = cpu.iter().map(|c| c.0).collect();
        let relay: Vec<f64> = cpu.iter().filter_map(|c| c.1).collect();
        let cpu = if relay.is_empty() {
            format!("{:.2}, -", median(&nodes))
        } else {
            format!("{:.2}, {:.2}", median(&nodes), median(&relay))
        };
        println!(
            "{name:<22} {:>9.3} Gb {:>11.1}% {ping:>16} {cpu:>22}   {}",
            m / 1e9,
            100.0 * m / direct,
            r.join(" ")
        );
    }
    Ok(())
}

/// One path of the relay bench, and what its runs measured.
struct RelayTarget {
    name: String,
    /// The sender's namespace, and the receiver's overlay address.
    ns: String,
    dst: String,
    /// Whose threads and CPU to show: the two nodes, and the relay when relayed.
    pids: Vec<(&'static str, u32)>,
    /// Bits per second of each run, and the pings' mean round trips (ms) during them.
    runs: Vec<f64>,
    pings: Vec<f64>,
    /// CPU seconds per GB of each run: the two nodes together, and the relay.
    cpu: Vec<(f64, Option<f64>)>,
}

/// Resident and peak memory (kB) of process `pid`, from /proc.
fn rss_kb(pid: u32) -> Option<(u64, u64)> {
    let (rss, hwm, _, _) = memory_kb(pid)?;
    Some((rss, hwm))
}

/// Resident, peak, anonymous (heap and stacks) and file-backed (the binary's pages) memory
/// (kB) of process `pid`, from /proc.
fn memory_kb(pid: u32) -> Option<(u64, u64, u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    };
    Some((
        field("VmRSS:")?,
        field("VmHWM:")?,
        field("RssAnon:")?,
        field("RssFile:")?,
    ))
}

/// Where process `pid`'s resident memory lies, from /proc/pid/smaps: (what, mappings, kB),
/// largest first. Anonymous mappings are told apart by size: the allocator reserves its heap
/// in large mappings (mimalloc's arena and segments, glibc's 64 MiB per-thread arenas), and
/// thread stacks are a few MiB each.
fn memory_map(pid: u32) -> Option<Vec<(String, usize, u64)>> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    Some(group_smaps(&smaps))
}

/// [`memory_map`]'s grouping of the text of an smaps file.
fn group_smaps(smaps: &str) -> Vec<(String, usize, u64)> {
    let mut groups: std::collections::BTreeMap<String, (usize, u64)> = Default::default();
    let mut current: Option<String> = None;
    let mut add = |what: String, rss: u64| {
        let g = groups.entry(what).or_default();
        g.0 += 1;
        g.1 += rss;
    };
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or_default();
        if let Some((lo, hi)) = first.split_once('-').filter(|_| !first.ends_with(':')) {
            let size_kb = match (u64::from_str_radix(lo, 16), u64::from_str_radix(hi, 16)) {
                (Ok(lo), Ok(hi)) => (hi - lo) / 1024,
                _ => continue,
            };
            let path = words.nth(4).unwrap_or_default();
            let what = match path {
                "" if size_kb >= 32 * 1024 => "anonymous, 32 MiB or more (malloc arenas)".into(),
                "" if size_kb >= 1024 => {
                    "anonymous, 1-32 MiB (thread stacks, large buffers)".into()
                }
                "" => "anonymous, under 1 MiB".into(),
                p if p.starts_with('[') => p.to_string(),
                p => format!("file {}", p.rsplit('/').next().unwrap_or(p)),
            };
            current = Some(what);
        } else if first == "AnonHugePages:" {
            let kb = words.next().and_then(|v| v.parse().ok()).unwrap_or(0);
            if kb > 0 {
                add("(of the above: transparent huge pages)".into(), kb);
            }
        } else if first == "Rss:" {
            let rss = words.next().and_then(|v| v.parse().ok()).unwrap_or(0);
            if let Some(what) = current.take() {
                add(what, rss);
            }
        }
    }
    let mut v: Vec<_> = groups.into_iter().map(|(w, (n, kb))| (w, n, kb)).collect();
    v.sort_by_key(|x| std::cmp::Reverse(x.2));
    v
}

fn print_memory_map(when: &str, map: Option<Vec<(String, usize, u64)>>) {
    let Some(map) = map else { return };
    println!("resident memory {when}, by mapping:");
    for (what, n, kb) in map.iter().filter(|x| x.2 >= 256) {
        println!("  {:>8.1} MB  {n:>4} x {what}", *kb as f64 / 1024.0);
    }
}

/// Watches process `pid` for `seconds`: its largest resident memory (kB, sampled twice a
/// second) and the share of one core it used.
fn watch_process(pid: u32, seconds: u32) -> (u64, f64) {
    let cpu0 = cpu_seconds(&[pid]);
    let mut max = 0;
    for _ in 0..seconds * 2 {
        if let Some((rss, _)) = rss_kb(pid) {
            max = max.max(rss);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    (max, (cpu_seconds(&[pid]) - cpu0) / f64::from(seconds))
}

/// `lattice-lab bench-memory`: a node (the hub) whose netmap holds `peers` peers: `active`
/// real nodes, each in its own namespace, and simulated ones (`hold-nodes`) for the rest. Its
/// resident memory and CPU while idle, then while every active peer pings it (5 a second) and
/// the first also sends a bulk TCP stream. Prints figures; asserts nothing.
pub fn memory(peers: usize, active: usize, seconds: u32) -> anyhow::Result<()> {
    Lab::available()
        .map_err(|e| anyhow::anyhow!("the benchmark needs root and namespaces: {e}"))?;
    anyhow::ensure!(
        (1..=250).contains(&active) && active <= peers,
        "--active must be 1..=250 and at most --peers"
    );
    let mut lab = Lab::new("bench-mem")?;
    let lan = lab.lan("lan", "10.77.0.1/16")?;
    let coord_ns = lab.ns("coord")?;
    lab.attach(&lan, &coord_ns, "eth0", "10.77.0.2/16", None)?;
    let coord = Coordinator::start(&mut lab, &coord_ns, "10.77.0.2", &[])?;
    let key = coord.authkey(&lab, &["--reusable"])?;
    let hub_ns = lab.ns("hub")?;
    lab.attach(&lan, &hub_ns, "eth0", "10.77.0.3/16", None)?;
    let hub = MeshNode::start(&mut lab, &hub_ns, "hub", &coord.url, &key, &[])?;
    let simulated = peers - active;
    let t0 = std::time::Instant::now();
    let lab_bin = lab.bin("lattice-lab");
    let count = simulated.to_string();
    let holder = lab.spawn(
        "hold-nodes",
        &coord_ns,
        &[
            lab_bin.to_str().context("utf-8 path")?,
            "hold-nodes",
            "--coordinator",
            &coord.url,
            "--key",
            &key,
            "--count",
            &count,
        ],
        &[],
    )?;
    let mut nodes = Vec::new();
    for i in 0..active {
        let ns = lab.ns(&format!("p{i}"))?;
        lab.attach(&lan, &ns, "eth0", &format!("10.77.1.{}/16", i + 1), None)?;
        nodes.push(MeshNode::start(
            &mut lab,
            &ns,
            &format!("p{i}"),
            &coord.url,
            &key,
            &[],
        )?);
    }
    if !wait_for(Duration::from_secs(300), || {
        lab.stdout(holder).contains("joined")
    }) {
        bail!("the simulated nodes did not all join:\n{}", lab.log(holder));
    }
    let st = hub.wait_ready(&lab, peers, Duration::from_secs(180))?;
    println!(
        "{peers} peers in the hub's netmap ({active} real, {simulated} simulated) after {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    let hub_ip = st["self"]["ips"][0]
        .as_str()
        .context("the hub's address")?
        .to_owned();
    let pid = lab.pid(hub.proc).context("the hub's pid")?;

    // Idle: settle, then watch.
    std::thread::sleep(Duration::from_secs(5));
    let (idle_max, idle_cpu) = watch_process(pid, seconds);
    let (idle_rss, _, idle_anon, idle_file) = memory_kb(pid).context("the hub's memory")?;
    let idle_map = memory_map(pid);

    // Traffic: every active peer pings the hub; the first also sends a bulk stream.
    let iperf_srv = lab.spawn("iperf3-server", &hub_ns, &["iperf3", "-s"], &[])?;
    std::thread::sleep(Duration::from_millis(500));
    let deadline = seconds.to_string();
    let mut pingers = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        pingers.push(lab.spawn(
            &format!("ping-{i}"),
            &n.ns,
            &["ping", "-q", "-i", "0.2", "-w", &deadline, &hub_ip],
            &[],
        )?);
    }
    let bulk = lab.spawn(
        "iperf3-bulk",
        &nodes[0].ns,
        &["iperf3", "-c", &hub_ip, "-t", &deadline],
        &[],
    )?;
    let (busy_max, busy_cpu) = watch_process(pid, seconds);
    let busy_map = memory_map(pid);
    let mut answered = 0;
    for p in pingers {
        lab.wait_exit(p, Duration::from_secs(10));
        // ping's summary: "N packets transmitted, M received, ..."; any answer counts.
        if lab
            .stdout(p)
            .lines()
            .any(|l| l.contains("received") && !l.contains(" 0 received"))
        {
            answered += 1;
        }
    }
    lab.wait_exit(bulk, Duration::from_secs(10));
    lab.kill(iperf_srv);
    let (_, peak) = rss_kb(pid).context("the hub's memory")?;
    let pq = hub
        .status(&lab)
        .and_then(|s| {
            s["peers"]
                .as_array()
                .map(|p| p.iter().filter(|x| x["pq"] == true).count())
        })
        .unwrap_or(0);
    println!("\nhub with {peers} peers            resident memory      CPU (share of one core)");
    println!(
        "idle ({seconds} s)                    {:>8.1} MB (max {:.1})      {:>6.2}%",
        idle_rss as f64 / 1024.0,
        idle_max as f64 / 1024.0,
        idle_cpu * 100.0
    );
    println!(
        "{active} peers passing traffic ({seconds} s)  {:>8.1} MB max          {:>6.2}%   ({answered} of {active} peers' pings answered, {pq} post-quantum tunnels, one bulk stream)",
        busy_max as f64 / 1024.0,
        busy_cpu * 100.0
    );
    println!(
        "peak resident memory (VmHWM)     {:>8.1} MB",
        peak as f64 / 1024.0
    );
    println!(
        "idle resident memory by kind:    {:>8.1} MB anonymous (heap, stacks), {:.1} MB file-backed (the binary's pages)",
        idle_anon as f64 / 1024.0,
        idle_file as f64 / 1024.0
    );
    print_memory_map("idle", idle_map);
    print_memory_map("while passing traffic (at the end)", busy_map);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smaps_are_grouped_by_kind_of_mapping_largest_first() {
        let smaps = "\
55d0c0000000-55d0c0800000 r-xp 00000000 08:01 1234    /usr/bin/lattice
Size:               8192 kB
Rss:                3000 kB
VmFlags: rd ex mr mw me
7f0000000000-7f0004000000 rw-p 00000000 00:00 0 
Size:              65536 kB
Rss:               20000 kB
AnonHugePages:     16384 kB
7f1000000000-7f1000200000 rw-p 00000000 00:00 0 
Size:               2048 kB
Rss:                  40 kB
AnonHugePages:         0 kB
7f2000000000-7f2000021000 rw-p 00000000 00:00 0                          [heap]
Size:                132 kB
Rss:                 100 kB
7f3000000000-7f3000001000 r--p 00000000 08:01 99 /usr/lib/libc.so.6
Rss:                   4 kB
7f3000001000-7f3000002000 r-xp 00001000 08:01 99 /usr/lib/libc.so.6
Rss:                   8 kB
";
        let got = group_smaps(smaps);
        let want: Vec<(String, usize, u64)> = vec![
            ("anonymous, 32 MiB or more (malloc arenas)".into(), 1, 20000),
            ("(of the above: transparent huge pages)".into(), 1, 16384),
            ("file lattice".into(), 1, 3000),
            ("[heap]".into(), 1, 100),
            (
                "anonymous, 1-32 MiB (thread stacks, large buffers)".into(),
                1,
                40,
            ),
            ("file libc.so.6".into(), 2, 12),
        ];
        assert_eq!(got, want);
    }
}
