//! The TUN device: created once the node knows its overlay addresses.
//!
//! The IPv4 address is assigned with the /10 of the overlay range and the IPv6 address with the
//! mesh's /48, so the kernel's connected routes send all mesh traffic into the device without
//! touching any other route. The DNS resolver address 100.100.100.100/32 is assigned too, which
//! makes queries to it local to this host (served by the node's DNS on that address).
//!
//! The device is opened with offloads (`IFF_VNET_HDR`): the kernel hands over TCP and UDP
//! runs of up to 64 KiB in one read, which are cut into MTU-sized packets here, and packets
//! written back are coalesced into such runs again (GRO), as wireguard-go does. Where the
//! kernel has no offloads, reads and writes are one packet each.
//!
//! With several data-plane workers the device has one queue per worker (`IFF_MULTI_QUEUE`):
//! the kernel spreads the packets it hands up over the queues by flow, so each flow is read
//! by one worker, in order. Every queue keeps the offloads.
//!
//! Writes happen on a task of their own per queue: the worker hands over batches and goes on
//! reading, so a write (which runs the kernel's receive path for the packets, TCP included)
//! never holds up UDP reception. The writer hands each batch's buffers back for reuse.

use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context;
use node_proto::Packet;
use tokio::runtime::Handle;
use tokio::sync::mpsc;
use tracing::debug;
use tun_rs::{
    AsyncDevice, DeviceBuilder, ExpandBuffer, GROTable, IDEAL_BATCH_SIZE, VIRTIO_NET_HDR_LEN,
};

use crate::io::recycle::ReadSlots;
use crate::io::udp::on;

/// The node-local DNS address.
pub const RESOLVER: Ipv4Addr = Ipv4Addr::new(100, 100, 100, 100);
const V4_PREFIX: u8 = 10;
const V6_PREFIX: u8 = 48;
/// Batches waiting for the writer task. Few: a queue here is latency for every flow through
/// the device, and the loop waits (reading nothing new) only while all of them are full.
const WRITE_QUEUE: usize = 4;

/// The most bytes the GRO code coalesces into one write (a run's head packet and the rest).
const MAX_RUN: usize = 2 * VIRTIO_NET_HDR_LEN + 65_535;
/// Buffers per batch that may stay grown from heading a run (runs tend to start at the same
/// places batch after batch); others go back to packet size, or over time every buffer would
/// have headed a run once and a batch would hold 8 MB.
const KEEP_GROWN: usize = 16;
/// A buffer with more room than this has headed a run (at the usual MTUs a packet needs less).
const GROWN: usize = 4096;

/// A batch for the writer: buffers and how many of them hold a packet.
type WriteBatch = (Vec<WriteBuf>, usize);

/// A buffer for one packet on its way to the device. It starts at the packet's size; the GRO
/// code, which coalesces a run only into a buffer with room for all of it, is told it has
/// room for a whole run and grows the run's head as it appends. So buffers cost what they
/// carry: a batch of 1,280-byte packets no longer reserves 64 KiB per packet.
#[derive(Default)]
pub struct WriteBuf(Vec<u8>);

impl AsRef<[u8]> for WriteBuf {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl AsMut<[u8]> for WriteBuf {
    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.0
    }
}

impl ExpandBuffer for WriteBuf {
    fn buf_capacity(&self) -> usize {
        self.0.capacity().max(MAX_RUN)
    }

    fn buf_resize(&mut self, new_len: usize, value: u8) {
        self.room_for(new_len);
        self.0.resize(new_len, value);
    }

    fn buf_extend_from_slice(&mut self, extend: &[u8]) {
        self.room_for(self.0.len() + extend.len());
        self.0.extend_from_slice(extend);
    }
}

impl WriteBuf {
    /// Grows a buffer that starts heading a run to a whole run's size at once: grown by
    /// doubling, a 64 KiB run would be copied five or six times on its way there.
    fn room_for(&mut self, len: usize) {
        if len > self.0.capacity() {
            self.0.reserve_exact(len.max(MAX_RUN) - self.0.len());
        }
    }
}

/// An up TUN device with its addresses (the control loop's handle).
pub struct Tun {
    dev: Arc<AsyncDevice>,
    name: String,
    addrs: Vec<IpAddr>,
}

/// One queue of the device: a worker reads it ([`TunQueue::reader`]), and writes it itself or
/// through a writer task.
pub struct TunQueue {
    dev: Arc<AsyncDevice>,
    /// Packets waiting for [`TunQueue::write_queued`], each after `VIRTIO_NET_HDR_LEN` bytes
    /// of room for the offload header.
    out: Vec<WriteBuf>,
    queued: usize,
    /// Grown buffers kept in the batch being filled.
    grown: usize,
    writer: Writer,
}

/// Who writes a queue's batches to the device.
enum Writer {
    /// The queue's owner, itself.
    Caller {
        gro: Box<GROTable>,
        failed: Arc<AtomicU64>,
    },
    /// A task, while the owner goes on.
    Task {
        to_writer: mpsc::Sender<WriteBatch>,
        /// Written batches, their buffers ready to fill again.
        written: mpsc::UnboundedReceiver<Vec<WriteBuf>>,
    },
}

/// Buffers for reading: one raw read (header + up to 64 KiB), cut into packets.
pub struct ReadBufs {
    raw: Vec<u8>,
    /// A buffer per packet of a read.
    pub packets: ReadSlots,
    sizes: Vec<usize>,
}

/// Buffers handed on as packets kept for reads whose own buffers are still out (at most about
/// 1.4 MB per worker): enough for the batches a pipelined worker has in flight.
const PACKETS_KEPT: usize = 1024;

impl ReadBufs {
    /// Buffers for packets of up to `mtu` bytes, each with room to be sealed where it lies
    /// ([`node_proto::wg::session::SEAL_ROOM`]).
    pub fn new(mtu: u16) -> Self {
        Self {
            raw: vec![0; VIRTIO_NET_HDR_LEN + 65_535],
            packets: ReadSlots::new(
                IDEAL_BATCH_SIZE,
                usize::from(mtu).max(1280) + 64,
                node_proto::wg::session::SEAL_ROOM,
                PACKETS_KEPT,
            ),
            sizes: vec![0; IDEAL_BATCH_SIZE],
        }
    }

    /// Moves the first `n` packets of the last read to `out`, each in the buffer it was read
    /// into (no copy).
    pub fn take(&mut self, n: usize, out: &mut Vec<Packet>) {
        for i in 0..n.min(IDEAL_BATCH_SIZE) {
            let mut p = self.packets.hand_on(i);
            p.truncate(self.sizes[i]);
            out.push(Packet::from_bytes(p));
        }
    }
}

/// Whether a read error is about one bad packet (dropped) rather than the device.
pub fn is_packet_error(e: &io::Error) -> bool {
    e.raw_os_error().is_none() && e.kind() != io::ErrorKind::WouldBlock
}

impl Tun {
    /// Creates the device `name` with `addrs` and `mtu`, with one queue per runtime in
    /// `runtimes` (at least one), each registered with its runtime (whose thread then waits
    /// for it; `None`: the current one) and written by a task of its own (on the current
    /// runtime) with `writer_tasks`, else by its owner. Packets in a batch the kernel refused
    /// are counted in `write_failed`.
    pub fn create(
        name: &str,
        mtu: u16,
        addrs: &[IpAddr],
        runtimes: &[Option<Handle>],
        writer_tasks: bool,
        write_failed: &Arc<AtomicU64>,
    ) -> anyhow::Result<(Self, Vec<TunQueue>)> {
        let queues = runtimes.len().max(1);
        let runtime = |i: usize| runtimes.get(i).and_then(Option::as_ref);
        let mut b = DeviceBuilder::new().name(name).mtu(mtu).offload(true);
        if queues > 1 {
            b = b.multi_queue(true);
        }
        for a in addrs {
            b = match a {
                IpAddr::V4(v4) => b.ipv4(*v4, V4_PREFIX, None),
                IpAddr::V6(v6) => b.ipv6(*v6, V6_PREFIX),
            };
        }
        // Queue 0 is also the control loop's handle ([`Tun`]), which only changes addresses
        // (no waiting for readiness), so it may belong to worker 0's runtime too.
        let dev = on(runtime(0), || b.build_async()).with_context(|| {
            format!("creating TUN device {name} (are we root, with /dev/net/tun?)")
        })?;
        dev.add_address_v4(RESOLVER, 32u8)
            .context("assigning the DNS resolver address")?;
        let dev = Arc::new(dev);
        let mut all = vec![TunQueue::start(
            Arc::clone(&dev),
            writer_tasks,
            write_failed,
        )];
        for i in 1..queues {
            let q = on(runtime(i), || dev.try_clone())
                .with_context(|| format!("opening queue {i} of TUN device {name}"))?;
            all.push(TunQueue::start(Arc::new(q), writer_tasks, write_failed));
        }
        let tun = Self {
            dev,
            name: name.to_owned(),
            addrs: addrs.to_vec(),
        };
        Ok((tun, all))
    }

    /// The device name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Replaces the overlay addresses.
    pub fn set_addresses(&mut self, addrs: &[IpAddr]) -> anyhow::Result<()> {
        for old in self.addrs.clone() {
            if !addrs.contains(&old) {
                self.dev
                    .remove_address(old)
                    .with_context(|| format!("removing {old} from {}", self.name))?;
            }
        }
        for new in addrs {
            if self.addrs.contains(new) {
                continue;
            }
            match new {
                IpAddr::V4(v4) => self.dev.add_address_v4(*v4, V4_PREFIX),
                IpAddr::V6(v6) => self.dev.add_address_v6(*v6, V6_PREFIX),
            }
            .with_context(|| format!("adding {new} to {}", self.name))?;
        }
        self.addrs = addrs.to_vec();
        Ok(())
    }
}

impl TunQueue {
    fn start(dev: Arc<AsyncDevice>, task: bool, write_failed: &Arc<AtomicU64>) -> Self {
        let failed = Arc::clone(write_failed);
        let writer = if task {
            let (to_writer, batches) = mpsc::channel(WRITE_QUEUE);
            let (give_back, written) = mpsc::unbounded_channel();
            // Ends when the queue is dropped (the sender with it).
            tokio::spawn(write_batches(Arc::clone(&dev), batches, give_back, failed));
            Writer::Task { to_writer, written }
        } else {
            Writer::Caller {
                gro: Box::default(),
                failed,
            }
        };
        Self {
            dev,
            out: Vec::new(),
            queued: 0,
            grown: 0,
            writer,
        }
    }

    /// The queue's reading side: a worker reads with it while the queue itself (its writing
    /// side) may belong to another thread.
    pub fn reader(&self) -> TunReader {
        TunReader(Arc::clone(&self.dev))
    }

    /// Queues `packet` for the next [`TunQueue::write_queued`]; returns whether the queue is full
    /// (then write it).
    pub fn queue(&mut self, packet: &[u8]) -> bool {
        if self.queued == self.out.len() {
            self.out.push(WriteBuf::default());
        }
        if self.queued == 0 {
            self.grown = 0;
        }
        let buf = &mut self.out[self.queued].0;
        if buf.capacity() > GROWN {
            if self.grown < KEEP_GROWN {
                self.grown += 1;
            } else {
                *buf = Vec::new();
            }
        }
        buf.clear();
        buf.resize(VIRTIO_NET_HDR_LEN, 0);
        buf.extend_from_slice(packet);
        self.queued += 1;
        self.queued == IDEAL_BATCH_SIZE
    }

    /// Writes the queued packets, coalescing TCP and UDP runs where the kernel allows, or
    /// hands them to the writer task (waiting only while its queue is full).
    pub async fn write_queued(&mut self) {
        if self.queued == 0 {
            return;
        }
        let n = self.queued;
        self.queued = 0;
        match &mut self.writer {
            Writer::Caller { gro, failed } => {
                write_batch(&self.dev, gro, &mut self.out[..n], failed).await;
            }
            Writer::Task { to_writer, written } => {
                let spare = written.try_recv().unwrap_or_default();
                let batch = std::mem::replace(&mut self.out, spare);
                if to_writer.send((batch, n)).await.is_err() {
                    debug!(packets = n, "the TUN writer has stopped; packets dropped");
                }
            }
        }
    }
}

/// Reads one queue of the device ([`TunQueue::reader`]).
pub struct TunReader(Arc<AsyncDevice>);

impl TunReader {
    /// Waits for and reads one batch of packets; returns how many.
    pub async fn read(&self, b: &mut ReadBufs) -> io::Result<usize> {
        self.0
            .recv_multiple(&mut b.raw, b.packets.to_read(), &mut b.sizes, 0)
            .await
    }

    /// Reads one batch when one is waiting (`WouldBlock` otherwise).
    pub fn try_read(&self, b: &mut ReadBufs) -> io::Result<usize> {
        self.0
            .try_recv_multiple(&mut b.raw, b.packets.to_read(), &mut b.sizes, 0)
    }
}

/// Writes one batch; counts its packets in `failed` when the kernel refuses it.
async fn write_batch(
    dev: &AsyncDevice,
    gro: &mut GROTable,
    bufs: &mut [WriteBuf],
    failed: &AtomicU64,
) {
    let n = bufs.len();
    if let Err(e) = dev.send_multiple(gro, bufs, VIRTIO_NET_HDR_LEN).await {
        let total = failed.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
        debug!(error = %e, packets = n, total, "tun write failed");
    }
}

/// The writer task: writes each batch, then gives its buffers back.
async fn write_batches(
    dev: Arc<AsyncDevice>,
    mut batches: mpsc::Receiver<WriteBatch>,
    give_back: mpsc::UnboundedSender<Vec<WriteBuf>>,
    failed: Arc<AtomicU64>,
) {
    let mut gro = GROTable::default();
    while let Some((mut bufs, n)) = batches.recv().await {
        write_batch(&dev, &mut gro, &mut bufs[..n], &failed).await;
        // Gone only when the device is being dropped.
        let _ = give_back.send(bufs);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The packets of a read leave in the buffers they were read into, each with room to be
    /// sealed where it lies (so sealing allocates nothing); once they are gone, the next read
    /// goes into the same buffers.
    #[test]
    fn packets_read_leave_in_their_buffers_with_room_to_be_sealed() {
        let mut bufs = ReadBufs::new(1280);
        let to_read = bufs.packets.to_read();
        for (i, len) in [60usize, 1344, 1].into_iter().enumerate() {
            to_read[i][..len].fill(i as u8 + 1);
            bufs.sizes[i] = len;
        }
        let read: Vec<*const u8> = bufs.packets.read().iter().map(|p| p.as_ptr()).collect();
        let mut out = Vec::new();
        bufs.take(3, &mut out);
        for (i, (p, len)) in out.iter_mut().zip([60usize, 1344, 1]).enumerate() {
            assert_eq!(p.as_ptr(), read[i], "packet {i} was copied");
            assert_eq!(p.len(), len);
            assert!(p.iter().all(|&b| b == i as u8 + 1));
            let b = p.buf_mut();
            assert!(b.capacity() >= len + node_proto::wg::session::SEAL_ROOM);
        }
        // The first packet is still alive at the next read: its place reads into another
        // buffer; the other two places read into their own again.
        let first = out.remove(0);
        drop(out);
        let again: Vec<*const u8> = bufs.packets.to_read().iter().map(|p| p.as_ptr()).collect();
        assert!(!read.contains(&again[0]));
        assert_eq!(&again[1..], &read[1..]);
        assert!(bufs.packets.read().iter().all(|b| b.len() == 1344));
        assert_eq!(bufs.packets.counts(), (3, 2));
        drop(first);
    }

    /// A buffer that starts heading a run grows once, to a whole run, and its later packets
    /// are appended in place (no reallocation, so no copy of what it already holds).
    #[test]
    fn a_run_head_grows_once_to_a_whole_run() {
        let mut buf = WriteBuf(vec![7; VIRTIO_NET_HDR_LEN + 1280]);
        buf.buf_extend_from_slice(&[1; 1228]);
        assert!(buf.0.capacity() >= MAX_RUN);
        let at = buf.0.as_ptr();
        while buf.0.len() + 1228 <= MAX_RUN {
            buf.buf_extend_from_slice(&[1; 1228]);
        }
        assert_eq!(buf.0.as_ptr(), at, "appended in place");
        assert_eq!(
            &buf.0[..VIRTIO_NET_HDR_LEN + 1280],
            &[7; VIRTIO_NET_HDR_LEN + 1280][..]
        );

        // The same for a head that a prepend resizes.
        let mut buf = WriteBuf(vec![0; VIRTIO_NET_HDR_LEN + 1280]);
        buf.buf_resize(VIRTIO_NET_HDR_LEN + 2 * 1280, 0);
        assert!(buf.0.capacity() >= MAX_RUN);
        assert_eq!(buf.0.len(), VIRTIO_NET_HDR_LEN + 2 * 1280);
    }
}
