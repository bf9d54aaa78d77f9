//! What a received GRO run costs per datagram: copied out into a packet of its own (as the
//! workers did until the read buffers were handed on) or handed on as packets that share the
//! receive slot, which is read into again once they are gone (`node::io::recycle`). The
//! packets are dropped on the thread that made them, then on another one (as a pipelined
//! worker's finishing thread drops them), with mimalloc as the node runs it.
//!
//! `cargo bench -p node --bench read_buffers`; prints nanoseconds per datagram, asserts
//! nothing.
#![allow(clippy::print_stdout, missing_docs)]

use std::sync::mpsc;
use std::time::Instant;

use node::io::recycle::Recycler;
use node_proto::Packet;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const SLOT: usize = 65_535;
/// A WireGuard data message carrying a 1,280-byte packet, near enough.
const STRIDE: usize = 1_360;
const SLOTS: usize = 200_000;

/// Takes each slot's packets, and the thread that drops them, if not the caller.
type Sink = (
    Box<dyn FnMut(Vec<Packet>)>,
    Option<std::thread::JoinHandle<()>>,
);

/// Where the packets of each slot go once made.
fn sink(other_thread: bool) -> Sink {
    if !other_thread {
        return (Box::new(drop), None);
    }
    // Deep enough that the two threads rarely wait for each other.
    let (tx, rx) = mpsc::sync_channel::<Vec<Packet>>(64);
    let t = std::thread::spawn(move || rx.into_iter().for_each(drop));
    (
        Box::new(move |p| tx.send(p).expect("the dropping thread")),
        Some(t),
    )
}

fn copied(slot: &[u8], other_thread: bool) -> f64 {
    let (mut out, t) = sink(other_thread);
    let per = SLOT / STRIDE;
    let start = Instant::now();
    for _ in 0..SLOTS {
        out(slot[..per * STRIDE]
            .chunks(STRIDE)
            .map(Packet::copy_from)
            .collect());
    }
    drop(out);
    t.map(std::thread::JoinHandle::join);
    start.elapsed().as_nanos() as f64 / (SLOTS * per) as f64
}

fn handed_on(other_thread: bool) -> (f64, u64) {
    let (mut out, t) = sink(other_thread);
    let per = SLOT / STRIDE;
    let mut r = Recycler::new(SLOT, 0, 16);
    let (mut head, mut buf) = r.take();
    let start = Instant::now();
    for _ in 0..SLOTS {
        let (next_head, next) = r.take();
        let mut run = std::mem::replace(&mut buf, next);
        r.hand_on(std::mem::replace(&mut head, next_head));
        run.truncate(per * STRIDE);
        let mut packets = Vec::with_capacity(per);
        while !run.is_empty() {
            packets.push(Packet::from_bytes(run.split_to(STRIDE)));
        }
        out(packets);
    }
    drop(out);
    t.map(std::thread::JoinHandle::join);
    let ns = start.elapsed().as_nanos() as f64 / (SLOTS * per) as f64;
    (ns, r.reused)
}

fn main() {
    let slot = vec![7u8; SLOT];
    println!("ns per {STRIDE}-byte datagram of a 64 KiB GRO run ({SLOTS} runs each)");
    for other_thread in [false, true] {
        let dropped = if other_thread {
            "on another thread"
        } else {
            "where made"
        };
        let copy = copied(&slot, other_thread);
        let (hand, reused) = handed_on(other_thread);
        println!(
            "dropped {dropped:<18} copied out {copy:6.1}   handed on {hand:6.1}   ({:.2}x; slots used again {reused} of {SLOTS})",
            copy / hand
        );
    }
}
