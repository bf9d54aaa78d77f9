//! The magicsock's sockets: one UDP socket per address family on the node's one port. All of
//! the node's UDP traffic (WireGuard, STUN and disco) leaves through them, so the NAT mapping
//! a peer sees is the one the tunnel uses.
//!
//! A run of equal-sized datagrams to one address leaves in one `sendmsg` with UDP GSO (the
//! kernel, or the veth/NIC, cuts it into datagrams), each datagram one slice of the message
//! where it lies (no copy into a send buffer), and the kernel hands coalesced datagrams up
//! with GRO, many per `recvmmsg` (through `quinn-udp`, as single datagrams are sent). Where
//! the kernel refuses GSO, the datagrams go one by one.
//!
//! Sends happen on a task of their own ([`Sender`]): the event loop hands over each run and
//! goes on encrypting while the kernel sends the last one.

use std::io::{self, IoSlice, IoSliceMut};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;
use node_proto::Packet;
use quinn_udp::{RecvMeta, Transmit, UdpSockRef, UdpSocketState};
use relay::dial::set_int_option;
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::runtime::Handle;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::io::recycle::ReadSlots;

/// Receive slots per `recvmmsg`.
pub const RECV_SLOTS: usize = 16;
/// Bytes per receive slot: room for one GRO-coalesced run.
pub const RECV_SLOT: usize = 65_535;
/// The most bytes one GSO send carries.
const GSO_BYTES: usize = 60_000;
/// The most datagrams one GSO send carries (the kernel's `UDP_MAX_SEGMENTS`).
const GSO_SEGMENTS: usize = 64;
/// Runs waiting for the sender task (at most `GSO_BYTES` each): few, as every queued byte is
/// latency for the tunnel's other flows.
const SEND_QUEUE: usize = 4;

/// One UDP socket with its offload state.
pub struct Sock {
    io: UdpSocket,
    state: UdpSocketState,
    /// A GSO send failed as where the device or kernel cannot segment ([`gso_unsupported`]):
    /// runs go datagram by datagram from then on (as `quinn-udp` does for its own sends).
    gso_failed: AtomicBool,
}

impl Sock {
    fn new(io: UdpSocket) -> anyhow::Result<Self> {
        let state = UdpSocketState::new(UdpSockRef::from(&io))
            .context("configuring the UDP socket (GSO/GRO, packet info)")?;
        // quinn-udp forbids fragmentation (QUIC probes the path MTU itself). A tunnel cannot:
        // keep the kernel default, which fragments a datagram larger than the known path MTU
        // instead of dropping it, as kernel WireGuard does.
        let v6 = io.local_addr()?.is_ipv6();
        let (level, name, value) = if v6 {
            (
                libc::IPPROTO_IPV6,
                libc::IPV6_MTU_DISCOVER,
                libc::IPV6_PMTUDISC_WANT,
            )
        } else {
            (
                libc::IPPROTO_IP,
                libc::IP_MTU_DISCOVER,
                libc::IP_PMTUDISC_WANT,
            )
        };
        set_int_option(&io, level, name, value).context("allowing fragmentation")?;
        if v6 {
            set_int_option(&io, libc::IPPROTO_IPV6, libc::IPV6_DONTFRAG, 0)
                .context("allowing fragmentation")?;
        }
        Ok(Self {
            io,
            state,
            gso_failed: AtomicBool::new(false),
        })
    }

    /// Receives into `bufs`; returns how many slots were filled. Each filled slot holds
    /// `meta.len` bytes: datagrams of `meta.stride` bytes (the last may be shorter).
    /// Cancel-safe: nothing is read until the socket is readable.
    pub async fn recv(
        &self,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> io::Result<usize> {
        loop {
            self.io.readable().await?;
            match self.io.try_io(Interest::READABLE, || {
                self.state.recv(UdpSockRef::from(&self.io), bufs, meta)
            }) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                r => return r,
            }
        }
    }

    /// Sends `datagrams` to `dst`: a run of more than one (all as long as the first but the
    /// last, which may be shorter; see [`Batch`]) in one GSO send, each datagram a slice of
    /// the message where it lies, falling back to one send per datagram when the kernel
    /// refuses the run.
    pub async fn send<D: AsRef<[u8]>>(&self, dst: SocketAddr, datagrams: &[D]) {
        if let [first, _, ..] = datagrams
            && !self.gso_failed.load(Ordering::Relaxed)
        {
            match self.send_run(dst, datagrams, first.as_ref().len()).await {
                Ok(()) => return,
                Err(e) => {
                    let unsupported = gso_unsupported(&e);
                    debug!(%dst, error = %e, unsupported, "GSO send failed; sending datagram by datagram");
                    if unsupported {
                        self.gso_failed.store(true, Ordering::Relaxed);
                    }
                }
            }
        }
        for d in datagrams {
            if let Err(e) = self.send_one(dst, d.as_ref()).await {
                debug!(%dst, error = %e, "udp send failed");
            }
        }
    }

    /// One `sendmsg` of `datagrams` as `segment`-byte datagrams (UDP GSO), one slice each.
    async fn send_run<D: AsRef<[u8]>>(
        &self,
        dst: SocketAddr,
        datagrams: &[D],
        segment: usize,
    ) -> io::Result<()> {
        let segment = u16::try_from(segment)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "segment too large"))?;
        let slices: Vec<IoSlice<'_>> = datagrams.iter().map(|d| IoSlice::new(d.as_ref())).collect();
        let addr = socket2::SockAddr::from(dst);
        let control = gso_control(segment);
        let msg = socket2::MsgHdr::new()
            .with_addr(&addr)
            .with_buffers(&slices)
            .with_control(control.bytes());
        loop {
            match self.io.try_io(Interest::WRITABLE, || {
                socket2::SockRef::from(&self.io).sendmsg(&msg, 0)
            }) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.io.writable().await?,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                r => return r.map(drop),
            }
        }
    }

    /// Sends one datagram (through `quinn-udp`).
    async fn send_one(&self, dst: SocketAddr, contents: &[u8]) -> io::Result<()> {
        let t = Transmit {
            destination: dst,
            ecn: None,
            contents,
            segment_size: None,
            src_ip: None,
        };
        loop {
            match self.io.try_io(Interest::WRITABLE, || {
                self.state.try_send(UdpSockRef::from(&self.io), &t)
            }) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.io.writable().await?,
                r => return r,
            }
        }
    }

    /// Sends one datagram with IP TTL (IPv6 hop limit) `ttl`, then gives the socket back its
    /// default: a primer (see `node_proto::path`). Sends on this socket all come from the
    /// one [`Sender`] task, so nothing else leaves with the low TTL.
    pub async fn send_with_ttl(&self, dst: SocketAddr, contents: &[u8], ttl: u8) {
        let (level, name) = match self.io.local_addr() {
            Ok(a) if a.is_ipv6() => (libc::IPPROTO_IPV6, libc::IPV6_UNICAST_HOPS),
            _ => (libc::IPPROTO_IP, libc::IP_TTL),
        };
        if let Err(e) = set_int_option(&self.io, level, name, i32::from(ttl)) {
            debug!(%dst, error = %e, "cannot set the TTL of a primer; not sending it");
            return;
        }
        if let Err(e) = self.send_one(dst, contents).await {
            debug!(%dst, error = %e, "udp send failed");
        }
        // -1: the system's default again.
        if let Err(e) = set_int_option(&self.io, level, name, -1) {
            warn!(error = %e, "cannot restore the socket's TTL");
        }
    }

    /// How many datagrams one GSO send may carry (1 without GSO).
    pub fn max_segments(&self) -> usize {
        if self.gso_failed.load(Ordering::Relaxed) {
            return 1;
        }
        self.state.max_gso_segments().min(GSO_SEGMENTS)
    }
}

/// Coalesces consecutive datagrams to one destination into GSO runs: equal-sized datagrams,
/// the last possibly shorter. The datagrams stay in their own buffers until they are sent.
#[derive(Default)]
pub struct Batch {
    dst: Option<SocketAddr>,
    datagrams: Vec<Packet>,
    bytes: usize,
    segment: usize,
}

impl Batch {
    /// Whether a datagram of `len` bytes to `dst` can join the run (with at most `max`
    /// datagrams).
    pub fn fits(&self, dst: SocketAddr, len: usize, max: usize) -> bool {
        self.dst == Some(dst)
            // A shorter datagram can only end a run: once one is in, the run is closed.
            && self.bytes == self.datagrams.len() * self.segment
            && self.datagrams.len() < max
            && len <= self.segment
            && self.bytes + len <= GSO_BYTES
    }

    /// Adds `datagram` to the run (check [`Batch::fits`] first; otherwise send and clear it).
    pub fn push(&mut self, dst: SocketAddr, datagram: Packet) {
        if self.dst.is_none() {
            self.dst = Some(dst);
            self.segment = datagram.len();
        }
        self.bytes += datagram.len();
        self.datagrams.push(datagram);
    }

    /// Takes the run out (destination and datagrams), leaving the batch empty with `spare`
    /// (emptied) to fill next.
    pub fn take(&mut self, mut spare: Vec<Packet>) -> Option<(SocketAddr, Vec<Packet>)> {
        let dst = self.dst.take()?;
        self.bytes = 0;
        spare.clear();
        Some((dst, std::mem::replace(&mut self.datagrams, spare)))
    }
}

/// One send: a run of datagrams, or a primer (one datagram).
struct SendJob {
    dst: SocketAddr,
    datagrams: Vec<Packet>,
    /// A primer's TTL.
    ttl: Option<u8>,
}

impl SendJob {
    /// Sends the datagrams, and lets them go (their buffers are used again); the emptied
    /// list, to fill again.
    async fn send(mut self, sockets: &Sockets) -> Vec<Packet> {
        if let Some(sock) = sockets.for_dst(&self.dst) {
            match (self.ttl, self.datagrams.first()) {
                (Some(ttl), Some(d)) => sock.send_with_ttl(self.dst, d, ttl).await,
                _ => sock.send(self.dst, &self.datagrams).await,
            }
        }
        self.datagrams.clear();
        self.datagrams
    }
}

/// Sends runs of datagrams in the order given: itself, or through a task of its own.
pub struct Sender {
    how: SendBy,
    batch: Batch,
}

enum SendBy {
    /// The caller's own thread makes the system calls.
    Caller {
        sockets: Arc<Sockets>,
        /// The last run's list, to fill again.
        spare: Vec<Packet>,
    },
    /// A task sends while the caller goes on.
    Task {
        jobs: mpsc::Sender<SendJob>,
        /// Sent runs' lists, to fill again.
        sent: mpsc::UnboundedReceiver<Vec<Packet>>,
    },
}

impl Sender {
    /// A sender for `sockets`. With `task`, the sends run on a task of their own (on the
    /// runtime's threads, in parallel with the caller), which ends when the `Sender` is
    /// dropped; without, [`Sender::flush`] makes the system call itself.
    pub fn start(sockets: Arc<Sockets>, task: bool) -> Self {
        let how = if task {
            let (jobs, mut rx) = mpsc::channel::<SendJob>(SEND_QUEUE);
            let (give_back, sent) = mpsc::unbounded_channel();
            tokio::spawn(async move {
                while let Some(job) = rx.recv().await {
                    let _ = give_back.send(job.send(&sockets).await);
                }
            });
            SendBy::Task { jobs, sent }
        } else {
            SendBy::Caller {
                sockets,
                spare: Vec::new(),
            }
        };
        Self {
            how,
            batch: Batch::default(),
        }
    }

    /// Adds a datagram to the current run, first handing the run over when `datagram` cannot
    /// join it (at most `max` datagrams per run).
    pub async fn push(&mut self, dst: SocketAddr, datagram: Packet, max: usize) {
        if !self.batch.fits(dst, datagram.len(), max) {
            self.flush().await;
        }
        self.batch.push(dst, datagram);
    }

    /// Sends one datagram with its own TTL (a primer), after the current run.
    pub async fn push_with_ttl(&mut self, dst: SocketAddr, datagram: Packet, ttl: u8) {
        self.flush().await;
        let mut datagrams = self.spare();
        datagrams.push(datagram);
        self.hand_over(SendJob {
            dst,
            datagrams,
            ttl: Some(ttl),
        })
        .await;
    }

    /// Sends the current run (or hands it to the sender task, waiting only while its queue is
    /// full).
    pub async fn flush(&mut self) {
        if self.batch.dst.is_none() {
            return;
        }
        let spare = self.spare();
        if let Some((dst, datagrams)) = self.batch.take(spare) {
            self.hand_over(SendJob {
                dst,
                datagrams,
                ttl: None,
            })
            .await;
        }
    }

    /// An empty list to fill (a sent run's, emptied by [`SendJob::send`]).
    fn spare(&mut self) -> Vec<Packet> {
        match &mut self.how {
            SendBy::Caller { spare, .. } => std::mem::take(spare),
            SendBy::Task { sent, .. } => sent.try_recv().unwrap_or_default(),
        }
    }

    async fn hand_over(&mut self, job: SendJob) {
        match &mut self.how {
            SendBy::Caller { sockets, spare } => *spare = job.send(sockets).await,
            SendBy::Task { jobs, .. } => {
                if jobs.send(job).await.is_err() {
                    debug!("the UDP sender has stopped; datagrams dropped");
                }
            }
        }
    }
}

/// Whether a failed GSO send says the kernel or device cannot segment at all: Linux offers
/// no better sign than `EIO` (a device without checksum offload) or `EINVAL` (an old
/// kernel), as `quinn-udp` finds. Other errors (no route, a run too long) are about that send.
fn gso_unsupported(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EIO | libc::EINVAL))
}

/// A GSO send's control message (`UDP_SEGMENT`), in a buffer aligned as a `cmsghdr`.
#[repr(C, align(8))]
struct GsoControl {
    buf: [u8; 32],
    len: usize,
}

impl GsoControl {
    fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// The control message that makes one `sendmsg` a run of `segment`-byte datagrams.
fn gso_control(segment: u16) -> GsoControl {
    // SAFETY: CMSG_SPACE and CMSG_LEN are arithmetic on a length (libc declares them unsafe).
    let (space, len) = unsafe {
        (
            libc::CMSG_SPACE(size_of::<u16>() as u32) as usize,
            libc::CMSG_LEN(size_of::<u16>() as u32) as usize,
        )
    };
    let mut c = GsoControl {
        buf: [0; 32],
        len: space,
    };
    assert!(
        space <= c.buf.len(),
        "a cmsghdr with a u16 fits in 32 bytes"
    );
    // SAFETY: the message header points at `c.buf`, aligned for a `cmsghdr` and `space`
    // bytes long, which CMSG_FIRSTHDR then finds room for: its header and data are written
    // within the buffer (the data unaligned, as CMSG_DATA may be).
    unsafe {
        let mut hdr: libc::msghdr = std::mem::zeroed();
        hdr.msg_control = c.buf.as_mut_ptr().cast();
        hdr.msg_controllen = space as _;
        let cmsg = libc::CMSG_FIRSTHDR(&hdr);
        assert!(!cmsg.is_null(), "room for the control message");
        (*cmsg).cmsg_level = libc::SOL_UDP;
        (*cmsg).cmsg_type = libc::UDP_SEGMENT;
        (*cmsg).cmsg_len = len as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<u16>(), segment);
    }
    c
}

/// The node's UDP sockets.
pub struct Sockets {
    /// IPv4 socket.
    pub v4: Sock,
    /// IPv6 socket, when the host has IPv6.
    pub v6: Option<Sock>,
    /// The shared port.
    pub port: u16,
}

impl Sockets {
    /// Binds `port` (0 picks one) on both families, with sockets from `dialer`.
    pub fn bind(port: u16, dialer: relay::dial::Dialer) -> anyhow::Result<Self> {
        Ok(Self::bind_group(port, dialer, 1)?.remove(0))
    }

    /// `n` sets of sockets on one port (0 picks one), one per data-plane worker: with more
    /// than one they share the port with `SO_REUSEPORT`, and the kernel hands each peer's
    /// datagrams (by source address and port) to one of them.
    ///
    /// The port is first bound alone, without `SO_REUSEPORT`: that fails while any other
    /// socket holds it, so a second daemon told the same port gets "address in use" instead
    /// of a share of this one's traffic.
    pub fn bind_group(
        port: u16,
        dialer: relay::dial::Dialer,
        n: usize,
    ) -> anyhow::Result<Vec<Self>> {
        Self::bind_group_on(port, dialer, &vec![None; n.max(1)])
    }

    /// [`Sockets::bind_group`] with one set per runtime in `runtimes`, each registered with
    /// its runtime (whose thread then waits for it), or with the current one for `None`.
    pub fn bind_group_on(
        port: u16,
        dialer: relay::dial::Dialer,
        runtimes: &[Option<Handle>],
    ) -> anyhow::Result<Vec<Self>> {
        if runtimes.len() <= 1 {
            return on(runtimes.first().and_then(Option::as_ref), || {
                let v4 = bind_v4(dialer, port, false)?;
                let port = v4.local_addr()?.port();
                let v4 = Sock::new(v4)?;
                let v6 = bind_v6(dialer, port, false);
                Ok(vec![Self { v4, v6, port }])
            });
        }
        let mut last = None;
        // A port picked at random may be taken between the probe and the group: pick again.
        for _ in 0..if port == 0 { 8 } else { 1 } {
            match Self::try_group(port, dialer, runtimes) {
                Ok(g) => return Ok(g),
                Err(e) => last = Some(e),
            }
        }
        Err(last.expect("at least one try"))
    }

    fn try_group(
        port: u16,
        dialer: relay::dial::Dialer,
        runtimes: &[Option<Handle>],
    ) -> anyhow::Result<Vec<Self>> {
        let probe = bind_v4(dialer, port, false)?;
        let port = probe.local_addr()?.port();
        // The IPv6 port must be free too (another daemon may hold only that family).
        let probe6 = bind(
            dialer,
            SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)),
            false,
        );
        let v6_works = match &probe6 {
            Ok(_) => true,
            Err(e) => {
                let in_use = e
                    .downcast_ref::<io::Error>()
                    .is_some_and(|e| e.kind() == io::ErrorKind::AddrInUse);
                anyhow::ensure!(!in_use, "binding UDP port {port} (IPv6): address in use");
                false
            }
        };
        drop((probe, probe6));
        let mut group = Vec::with_capacity(runtimes.len());
        for runtime in runtimes {
            let set = on(runtime.as_ref(), || -> anyhow::Result<Self> {
                let v4 =
                    bind_v4(dialer, port, true).context("another data-plane worker's socket")?;
                let v4 = Sock::new(v4)?;
                let v6 = if v6_works {
                    bind_v6(dialer, port, true)
                } else {
                    None
                };
                Ok(Self { v4, v6, port })
            })?;
            group.push(set);
        }
        if !v6_works {
            warn!("no IPv6 UDP socket; peers are reached over IPv4 only");
        }
        Ok(group)
    }

    /// The socket for `dst`'s family.
    pub fn for_dst(&self, dst: &SocketAddr) -> Option<&Sock> {
        match dst {
            SocketAddr::V4(_) => Some(&self.v4),
            SocketAddr::V6(_) => self.v6.as_ref(),
        }
    }
}

/// Runs `f` with `runtime` as the current runtime (the one sockets made in `f` register
/// with), or with the current one.
pub fn on<T>(runtime: Option<&Handle>, f: impl FnOnce() -> T) -> T {
    match runtime {
        Some(h) => {
            let _entered = h.enter();
            f()
        }
        None => f(),
    }
}

fn bind_v4(dialer: relay::dial::Dialer, port: u16, shared: bool) -> anyhow::Result<UdpSocket> {
    bind(
        dialer,
        SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)),
        shared,
    )
    .with_context(|| format!("binding UDP port {port}"))
}

fn bind_v6(dialer: relay::dial::Dialer, port: u16, shared: bool) -> Option<Sock> {
    match bind(
        dialer,
        SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)),
        shared,
    )
    .and_then(Sock::new)
    {
        Ok(s) => Some(s),
        Err(e) => {
            warn!(error = %e, "no IPv6 UDP socket; peers are reached over IPv4 only");
            None
        }
    }
}

fn bind(dialer: relay::dial::Dialer, addr: SocketAddr, shared: bool) -> anyhow::Result<UdpSocket> {
    let s = if shared {
        dialer.udp_shared(addr)?
    } else {
        dialer.udp(addr)?
    };
    // The dialer gave it large buffers (past the system's limits, as root).
    Ok(UdpSocket::from_std(s.into())?)
}

/// A slot holding at least this many bytes is handed on whole ([`RecvBufs`]); the datagrams
/// of one holding fewer are copied out, so a few small datagrams never keep 64 KiB alive.
const HAND_ON_BYTES: usize = RECV_SLOT / 4;

/// A worker's receive slots for one socket, whose datagrams become packets without a copy.
///
/// A slot that came back well filled (a GRO run of one sender's datagrams, up to 64 KiB) is
/// handed on whole: its datagrams become [`Packet`]s that share its allocation, each decrypted
/// where it lies, and the slot is read into again once they are all gone ([`ReadSlots`]). A
/// slot with little in it has its datagrams copied out and stays.
pub struct RecvBufs {
    /// `RECV_SLOTS` slots of `RECV_SLOT` bytes.
    pub slots: ReadSlots,
    meta: [RecvMeta; RECV_SLOTS],
}

impl Default for RecvBufs {
    fn default() -> Self {
        Self {
            slots: ReadSlots::new(RECV_SLOTS, RECV_SLOT, 0, RECV_SLOTS),
            meta: [RecvMeta::default(); RECV_SLOTS],
        }
    }
}

impl RecvBufs {
    /// Receives from `sock` into the slots (never returns for a socket that does not
    /// exist); returns how many slots were filled, for [`RecvBufs::take`]. Cancel-safe.
    pub async fn recv(&mut self, sock: Option<&Sock>) -> io::Result<usize> {
        let Some(sock) = sock else {
            return std::future::pending().await;
        };
        // On the stack: this runs every time a worker waits for its sockets.
        let mut slots = self.slots.to_read().iter_mut();
        let mut slices: [IoSliceMut<'_>; RECV_SLOTS] = std::array::from_fn(|_| {
            IoSliceMut::new(slots.next().map_or(&mut [][..], |s| &mut s[..]))
        });
        sock.recv(&mut slices, &mut self.meta).await
    }

    /// Moves the datagrams of the first `n` slots the last [`RecvBufs::recv`] filled to
    /// `out`, each with its sender, in the order they came.
    pub fn take(&mut self, n: usize, out: &mut Vec<(SocketAddr, Packet)>) {
        for i in 0..n.min(RECV_SLOTS) {
            let m = self.meta[i];
            let len = m.len.min(RECV_SLOT);
            let stride = m.stride.max(1);
            if len < HAND_ON_BYTES {
                out.extend(
                    self.slots.read()[i][..len]
                        .chunks(stride)
                        .map(|d| (m.addr, Packet::copy_from(d))),
                );
                continue;
            }
            let mut run = self.slots.hand_on(i);
            run.truncate(len);
            while !run.is_empty() {
                let d = run.split_to(stride.min(run.len()));
                out.push((m.addr, Packet::from_bytes(d)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, port))
    }

    fn datagram(fill: u8, len: usize) -> Packet {
        Packet::from_bytes(bytes::BytesMut::from(&vec![fill; len][..]))
    }

    #[test]
    fn a_run_takes_equal_datagrams_to_one_address_and_ends_at_a_shorter_one() {
        let mut b = Batch::default();
        assert!(
            !b.fits(addr(1), 100, 64),
            "an empty batch has no run to join"
        );
        b.push(addr(1), datagram(1, 100));
        assert!(b.fits(addr(1), 100, 64));
        assert!(!b.fits(addr(2), 100, 64), "another destination");
        assert!(!b.fits(addr(1), 101, 64), "a longer datagram");
        b.push(addr(1), datagram(2, 100));
        assert!(!b.fits(addr(1), 100, 2), "the segment limit");
        assert!(b.fits(addr(1), 40, 64));
        b.push(addr(1), datagram(3, 40));
        assert!(!b.fits(addr(1), 40, 64), "a shorter datagram ends the run");
        let (dst, run) = b.take(Vec::new()).unwrap();
        let lens: Vec<usize> = run.iter().map(|d| d.len()).collect();
        assert_eq!((dst, lens), (addr(1), vec![100, 100, 40]));
        assert_eq!(
            (run[0][0], run[2][39]),
            (1, 3),
            "the datagrams themselves, in order"
        );
        assert!(b.take(run).is_none(), "taken: empty");
        assert!(!b.fits(addr(1), 100, 64), "a new run starts empty");
        b.push(addr(3), datagram(4, 10));
        assert_eq!(b.take(Vec::new()).unwrap().1.len(), 1);
    }

    #[test]
    fn a_run_stays_under_the_gso_byte_limit() {
        let mut b = Batch::default();
        let mut n = 1;
        b.push(addr(1), datagram(0, 1500));
        while b.fits(addr(1), 1500, usize::MAX) {
            b.push(addr(1), datagram(0, 1500));
            n += 1;
        }
        assert_eq!(n, GSO_BYTES / 1500);
    }

    /// Sends `datagrams` from `a` to `to` as GSO runs of at most `a.max_segments()`.
    async fn send_runs(a: &Sock, to: SocketAddr, datagrams: impl IntoIterator<Item = Packet>) {
        let mut batch = Batch::default();
        for d in datagrams {
            if !batch.fits(to, d.len(), a.max_segments())
                && let Some((dst, run)) = batch.take(Vec::new())
            {
                a.send(dst, &run).await;
            }
            batch.push(to, d);
        }
        if let Some((dst, run)) = batch.take(Vec::new()) {
            a.send(dst, &run).await;
        }
    }

    /// A group of sockets shares one port, and a second group (another daemon told the same
    /// port) is refused instead of joining it and taking a share of the first one's traffic.
    #[tokio::test]
    async fn a_second_group_on_a_taken_port_is_refused() {
        let first = Sockets::bind_group(0, relay::dial::Dialer::PLAIN, 3).expect("a group");
        assert_eq!(first.len(), 3);
        let port = first[0].port;
        assert!(port != 0 && first.iter().all(|s| s.port == port));
        for s in &first {
            assert_eq!(s.v4.io.local_addr().unwrap().port(), port);
        }
        let again = Sockets::bind_group(port, relay::dial::Dialer::PLAIN, 2);
        let e = again.err().expect("the taken port is refused");
        assert!(
            e.chain().any(|c| c
                .downcast_ref::<io::Error>()
                .is_some_and(|e| e.kind() == io::ErrorKind::AddrInUse)),
            "{e:#}"
        );
        assert!(Sockets::bind(port, relay::dial::Dialer::PLAIN).is_err());
        drop(first);
        // Once the group is gone the port is free again.
        Sockets::bind_group(port, relay::dial::Dialer::PLAIN, 2).expect("the freed port");
    }

    /// Real sockets on loopback: a GSO run arrives as the same datagrams, in order, with
    /// their boundaries intact (whether or not the kernel coalesces them again with GRO).
    #[tokio::test]
    async fn gso_runs_arrive_as_the_datagrams_they_were_made_of() {
        let a = Sock::new(bind(relay::dial::Dialer::PLAIN, addr(0), false).unwrap()).unwrap();
        let b = Sock::new(bind(relay::dial::Dialer::PLAIN, addr(0), false).unwrap()).unwrap();
        let to = b.io.local_addr().unwrap();
        assert!(a.max_segments() > 1, "GSO on loopback");
        let want: Vec<Vec<u8>> = (0..50u8)
            .map(|i| vec![i; if i == 49 { 333 } else { 1200 }])
            .collect();
        send_runs(
            &a,
            to,
            want.iter()
                .map(|d| Packet::from_bytes(bytes::BytesMut::from(&d[..]))),
        )
        .await;
        assert!(
            !a.gso_failed.load(Ordering::Relaxed),
            "runs went as GSO sends"
        );
        let mut got = Vec::new();
        let mut buf = vec![0u8; RECV_SLOTS * RECV_SLOT];
        let mut meta = [RecvMeta::default(); RECV_SLOTS];
        while got.len() < want.len() {
            let mut slices: Vec<IoSliceMut<'_>> =
                buf.chunks_mut(RECV_SLOT).map(IoSliceMut::new).collect();
            let n = tokio::time::timeout(
                std::time::Duration::from_secs(5),
                b.recv(&mut slices, &mut meta),
            )
            .await
            .expect("datagrams arrive")
            .unwrap();
            for (slot, m) in buf.chunks(RECV_SLOT).zip(&meta[..n]) {
                assert_eq!(m.addr, a.io.local_addr().unwrap());
                got.extend(slot[..m.len].chunks(m.stride).map(<[u8]>::to_vec));
            }
        }
        assert_eq!(got, want);
    }

    /// A run the kernel refuses as one GSO send (here two 40,000-byte datagrams, more than
    /// one UDP message may carry) still arrives, datagram by datagram; a refusal that says
    /// nothing of GSO itself leaves runs on, one that does ends them.
    #[tokio::test]
    async fn a_run_the_kernel_refuses_goes_datagram_by_datagram() {
        let a = Sock::new(bind(relay::dial::Dialer::PLAIN, addr(0), false).unwrap()).unwrap();
        let b = Sock::new(bind(relay::dial::Dialer::PLAIN, addr(0), false).unwrap()).unwrap();
        let to = b.io.local_addr().unwrap();
        assert!(a.max_segments() > 1, "GSO on loopback");
        let refused = a
            .send_run(to, &[datagram(1, 40_000), datagram(2, 40_000)], 40_000)
            .await
            .expect_err("too long for one message");
        a.send(to, &[datagram(1, 40_000), datagram(2, 40_000)])
            .await;
        assert_eq!(
            a.gso_failed.load(Ordering::Relaxed),
            gso_unsupported(&refused)
        );
        assert!(!gso_unsupported(&io::Error::from_raw_os_error(
            libc::EHOSTUNREACH
        )));
        assert!(gso_unsupported(&io::Error::from_raw_os_error(libc::EIO)));
        let mut buf = vec![0u8; 65_535];
        for fill in [1, 2] {
            let n = tokio::time::timeout(std::time::Duration::from_secs(5), b.io.recv(&mut buf))
                .await
                .expect("the datagram arrives")
                .unwrap();
            assert_eq!(n, 40_000);
            assert!(buf[..n].iter().all(|&x| x == fill), "datagram {fill} whole");
        }
        // A device that cannot segment: no more runs.
        a.gso_failed.store(true, Ordering::Relaxed);
        assert_eq!(a.max_segments(), 1);
    }

    /// Sends `count` datagrams of 1,200 bytes numbered from `first` (in their first two bytes)
    /// from `a` to `to` as GSO runs.
    async fn send_numbered(a: &Sock, to: SocketAddr, first: u16, count: u16) {
        let numbered = (first..first + count).map(|i| {
            let mut d = datagram((i % 251) as u8, 1200);
            d[..2].copy_from_slice(&i.to_le_bytes());
            d
        });
        send_runs(a, to, numbered).await;
    }

    /// Receives until `count` datagrams have come, as packets.
    async fn receive(bufs: &mut RecvBufs, sock: &Sock, count: usize) -> Vec<(SocketAddr, Packet)> {
        let mut got = Vec::new();
        while got.len() < count {
            let n = tokio::time::timeout(std::time::Duration::from_secs(5), bufs.recv(Some(sock)))
                .await
                .expect("datagrams arrive")
                .unwrap();
            bufs.take(n, &mut got);
        }
        got
    }

    /// The number and filling a packet from `send_numbered` carries, checked whole.
    fn number(p: &[u8]) -> u16 {
        let i = u16::from_le_bytes([p[0], p[1]]);
        assert_eq!(p.len(), 1200);
        assert!(
            p[2..].iter().all(|&b| b == (i % 251) as u8),
            "datagram {i} overwritten"
        );
        i
    }

    /// Real sockets on loopback: GRO runs are handed on as packets sharing their slot, which
    /// is not received into again while any of them lives (a packet kept across later receives
    /// keeps its bytes), and is used again once they are all gone; a lone small datagram is
    /// copied out, its slot kept.
    #[tokio::test]
    async fn received_runs_become_packets_in_their_slot_which_is_used_again_once_they_are_gone() {
        let a = Sock::new(bind(relay::dial::Dialer::PLAIN, addr(0), false).unwrap()).unwrap();
        let b = Sock::new(bind(relay::dial::Dialer::PLAIN, addr(0), false).unwrap()).unwrap();
        let to = b.io.local_addr().unwrap();
        assert!(
            a.max_segments() > 1,
            "this kernel sends UDP GSO on loopback"
        );
        let mut bufs = RecvBufs::default();
        // A small datagram alone: copied out, nothing handed on.
        a.send(to, &[b"small"]).await;
        let got = receive(&mut bufs, &b, 1).await;
        assert_eq!(&got[0].1[..], b"small");
        assert_eq!(bufs.slots.counts().0, 0);
        // Three rounds of 120 datagrams; the first round's packets are kept through the next
        // two, whose own are dropped as they come.
        send_numbered(&a, to, 0, 120).await;
        let kept = receive(&mut bufs, &b, 120).await;
        let handed = bufs.slots.counts().0;
        assert!(handed > 0, "no GRO run was handed on");
        for round in 1..3u16 {
            send_numbered(&a, to, round * 120, 120).await;
            let got = receive(&mut bufs, &b, 120).await;
            let numbers: Vec<u16> = got.iter().map(|(_, p)| number(p)).collect();
            assert_eq!(
                numbers,
                (round * 120..round * 120 + 120).collect::<Vec<_>>()
            );
            assert!(
                got.iter()
                    .all(|(from, _)| *from == a.io.local_addr().unwrap())
            );
        }
        let numbers: Vec<u16> = kept.iter().map(|(_, p)| number(p)).collect();
        assert_eq!(
            numbers,
            (0..120).collect::<Vec<_>>(),
            "kept packets changed"
        );
        assert!(
            bufs.slots.counts().1 > 0,
            "slots whose packets were dropped were not used again"
        );
        let reused = bufs.slots.counts().1;
        // Once the kept packets are gone too, their slots come back.
        drop(kept);
        send_numbered(&a, to, 360, 120).await;
        let got = receive(&mut bufs, &b, 120).await;
        assert_eq!(number(&got[0].1), 360);
        assert!(bufs.slots.counts().1 > reused);
    }
}
