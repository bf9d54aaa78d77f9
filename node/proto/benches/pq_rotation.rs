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

use std::time::{Duration, Instant};

use node_proto::{NodeState, Packet};
use wire::NodeKey;

mod common;
use common::{hub_map, overlay, peer_map, run, udp};

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

fn main() {
    let start = Instant::now();
    let config = |i: usize| common::config(i, ROTATION);
    // Node 0 is the hub; nodes 1..=PEERS each know only the hub.
    let mut nodes: Vec<NodeState> = (0..=PEERS)
        .map(|i| NodeState::new(config(i), [i as u8; 32], start))
        .collect();
    let keys: Vec<NodeKey> = nodes.iter().map(NodeState::node_key).collect();
    let heap0 = live();
    nodes[0].handle_netmap(start, hub_map(PEERS, &keys));
    let heap = live() - heap0;
    println!(
        "the hub's core keeps {:.1} MB for a {PEERS}-peer netmap ({:.1} KB per peer)",
        heap as f64 / 1e6,
        heap as f64 / 1e3 / PEERS as f64
    );
    for (i, n) in nodes.iter_mut().enumerate().skip(1) {
        n.handle_netmap(start, peer_map(i, &keys));
    }
    let mut hub_time = Duration::ZERO;
    let mut now = start;
    // Establish every tunnel: the hub sends one packet to every peer.
    for i in 1..=PEERS {
        let p = udp(overlay(0), overlay(i), b"bench");
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
