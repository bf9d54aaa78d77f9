//! CPU cost of post-quantum key rotation for one node with 1,000 peers
//! (`cargo bench -p node-proto --bench pq_rotation`). Real handshakes between real
//! `NodeState`s in memory; only the hub's own work is timed. Also the heap the hub's core
//! keeps for its 1,000-peer netmap (a counting allocator: bytes allocated and not yet freed
//! while the hub alone builds and takes the map). Prints numbers; asserts nothing.
#![allow(
    clippy::print_stdout,
    clippy::unwrap_used,
    clippy::disallowed_methods,
    missing_docs
)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use node_proto::pq::PqConfig;
use node_proto::{NodeConfig, NodeState, Packet, SockId};
use wire::filter::{Action, DstPorts, FilterRule, PortRange};
use wire::netmap::{MapResponse, Node};
use wire::{NodeId, NodeKey};

const PEERS: usize = 1000;

/// The system allocator, counting the bytes currently allocated.
struct Counting;

static LIVE: std::sync::atomic::AtomicIsize = std::sync::atomic::AtomicIsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts sizes.
unsafe impl std::alloc::GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: std::alloc::Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, std::sync::atomic::Ordering::Relaxed);
        // SAFETY: the caller's contract, passed on.
        unsafe { std::alloc::System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: std::alloc::Layout) {
        LIVE.fetch_sub(l.size() as isize, std::sync::atomic::Ordering::Relaxed);
        // SAFETY: the caller's contract, passed on.
        unsafe { std::alloc::System.dealloc(p, l) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn live() -> isize {
    LIVE.load(std::sync::atomic::Ordering::Relaxed)
}
const ROTATION: Duration = Duration::from_secs(120);

fn key(i: usize) -> [u8; 32] {
    let mut k = [0u8; 32];
    k[1..9].copy_from_slice(&(i as u64 + 1).to_le_bytes());
    k[31] = 0x40;
    k
}

fn overlay(i: usize) -> Ipv4Addr {
    let n = u32::from(Ipv4Addr::new(100, 64, 0, 0)) + 1 + i as u32;
    Ipv4Addr::from(n)
}

fn addr(i: usize) -> SocketAddr {
    SocketAddr::new(
        IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i as u32 + 1)),
        41641,
    )
}

fn node(i: usize, public: NodeKey) -> Node {
    Node {
        id: NodeId(i as u64 + 1),
        name: format!("n{i}"),
        fqdn: format!("n{i}.mesh.internal"),
        node_key: public,
        addresses: vec![overlay(i).into()],
        endpoints: vec![addr(i)],
        user: None,
        tags: vec![],
        online: true,
        last_seen_unix: None,
        key_expiry_unix: None,
        os: String::new(),
        ephemeral: false,
        home_relay: None,
        nat: None,
        advertised_routes: Vec::new(),
        approved_routes: Vec::new(),
        primary_routes: Vec::new(),
    }
}

fn main() {
    let start = Instant::now();
    let config = |i: usize| NodeConfig {
        private_key: zeroize::Zeroizing::new(key(i)),
        tun_mtu: 1280,
        pq: PqConfig { rotation: ROTATION },
        wall_clock_ms: 1_790_000_000_000,
    };
    // Node 0 is the hub; nodes 1..=PEERS each know only the hub.
    let mut nodes: Vec<NodeState> = (0..=PEERS)
        .map(|i| NodeState::new(config(i), [i as u8; 32], start))
        .collect();
    let keys: Vec<NodeKey> = nodes.iter().map(NodeState::node_key).collect();
    let rule = |i: usize| FilterRule {
        origin: "bench".into(),
        action: Action::Accept,
        src: vec!["0.0.0.0/0".parse().unwrap()],
        dst: vec![DstPorts {
            net: IpAddr::V4(overlay(i)).into(),
            ports: PortRange::ANY,
        }],
        protocols: vec![],
        all_protocols: true,
        valid: None,
        cap_grants: Vec::new(),
    };
    let heap0 = live();
    nodes[0].handle_netmap(
        start,
        MapResponse {
            seq: 1,
            node: Some(node(0, keys[0])),
            peers: Some((1..=PEERS).map(|i| node(i, keys[i])).collect()),
            packet_filter: Some(vec![rule(0)]),
            ..Default::default()
        },
    );
    let heap = live() - heap0;
    println!(
        "the hub's core keeps {:.1} MB for a {PEERS}-peer netmap ({:.1} KB per peer)",
        heap as f64 / 1e6,
        heap as f64 / 1e3 / PEERS as f64
    );
    for i in 1..=PEERS {
        nodes[i].handle_netmap(
            start,
            MapResponse {
                seq: 1,
                node: Some(node(i, keys[i])),
                peers: Some(vec![node(0, keys[0])]),
                packet_filter: Some(vec![rule(i)]),
                ..Default::default()
            },
        );
    }
    let mut hub_time = Duration::ZERO;
    let mut now = start;
    // Establish every tunnel: the hub sends one packet to every peer.
    for i in 1..=PEERS {
        let p = udp(overlay(0), overlay(i));
        nodes[0].handle_tun_packet(now, Packet::copy_from(&p[..]));
    }
    let setup = run(&mut nodes, now, &mut hub_time);
    let established = nodes[0].status(now).peers.iter().filter(|p| p.pq).count();
    println!(
        "{PEERS} peers: {established} post-quantum tunnels established ({setup} datagrams), hub CPU {:.1} ms",
        hub_time.as_secs_f64() * 1e3
    );

    // One rotation interval later, every key is replaced.
    let before: u64 = nodes[0]
        .status(now)
        .peers
        .iter()
        .map(|p| p.pq_handshakes)
        .sum();
    hub_time = Duration::ZERO;
    now += ROTATION + Duration::from_secs(1);
    for (i, n) in nodes.iter_mut().enumerate() {
        let t = Instant::now();
        n.handle_timeout(now);
        if i == 0 {
            hub_time += t.elapsed();
        }
    }
    let moved = run(&mut nodes, now, &mut hub_time);
    // The peers that initiate to the hub rotate on their own timers; run those too.
    for _ in 0..3 {
        now += Duration::from_millis(300);
        for (i, n) in nodes.iter_mut().enumerate() {
            let t = Instant::now();
            n.handle_timeout(now);
            if i == 0 {
                hub_time += t.elapsed();
            }
        }
        run(&mut nodes, now, &mut hub_time);
    }
    let after: u64 = nodes[0]
        .status(now)
        .peers
        .iter()
        .map(|p| p.pq_handshakes)
        .sum();
    let rotated = after - before;
    println!(
        "one rotation of {rotated} keys (hub as initiator for some, responder for the rest; {moved}+ datagrams): hub CPU {:.1} ms",
        hub_time.as_secs_f64() * 1e3
    );
    println!(
        "  = {:.1} us per peer per rotation; every {}s that is {:.3} % of one core",
        hub_time.as_secs_f64() * 1e6 / rotated.max(1) as f64,
        ROTATION.as_secs(),
        100.0 * hub_time.as_secs_f64() / ROTATION.as_secs_f64()
    );
}

/// Delivers datagrams until the network is quiet; times the hub's share.
fn run(nodes: &mut [NodeState], now: Instant, hub_time: &mut Duration) -> usize {
    let mut moved = 0;
    loop {
        let mut progress = false;
        for i in 0..nodes.len() {
            loop {
                let t = Instant::now();
                let next = nodes[i].poll_transmit();
                if i == 0 {
                    *hub_time += t.elapsed();
                }
                let Some(tx) = next else { break };
                progress = true;
                moved += 1;
                let Some(dst) = tx.dst.udp() else { continue };
                let Some(j) = (dst.ip().to_string().starts_with("10."))
                    .then(|| match dst.ip() {
                        IpAddr::V4(v4) => (u32::from(v4) - 0x0a00_0000) as usize - 1,
                        IpAddr::V6(_) => usize::MAX,
                    })
                    .filter(|j| *j < nodes.len())
                else {
                    continue;
                };
                let from = addr(i);
                let t = Instant::now();
                nodes[j].handle_datagram(now, SockId::Main, from, tx.payload);
                if j == 0 {
                    *hub_time += t.elapsed();
                }
                while nodes[j].poll_tun_write().is_some() {}
            }
        }
        if !progress {
            return moved;
        }
    }
}

fn udp(src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
    let payload = b"bench";
    let total = 20 + 8 + payload.len();
    let mut p = vec![0x45, 0, 0, total as u8, 0, 0, 0x40, 0, 64, 17, 0, 0];
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&[0x30, 0x39, 0x30, 0x39, 0, (8 + payload.len()) as u8, 0, 0]);
    p.extend_from_slice(payload);
    p
}
