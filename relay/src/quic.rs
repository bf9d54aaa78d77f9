//! The relay's QUIC listener on threads of its own.
//!
//! Every relayed datagram passes four tasks: the endpoint's driver reads it from the socket,
//! its connection's driver decrypts it, the sender's session forwards it, and the receiver's
//! connection driver encrypts and sends it. On a runtime with many worker threads each hop
//! may wake a task on another thread. Measured on 16 CPUs with the coordinator's relay on its
//! multi-threaded runtime: relay over QUIC at 24% of the direct path, 35% with the runtime
//! cut to two threads.
//!
//! [`QuicListener`] runs `threads` endpoints on one UDP port instead (`SO_REUSEPORT` when
//! more than one), each driven by a single-threaded runtime on a thread of its own
//! (`relay-quicN`): the kernel hands each client's datagrams to one of them by a hash of its
//! address, and all of that client's tasks run on that thread. A datagram forwarded to a
//! client of another thread wakes that thread, which sends whatever it finds queued. The
//! limits ([`QuicLimits`]) are counted across all of them. With several threads, a client
//! whose address changes (a NAT rebinding) can land on an endpoint that does not know its
//! connection; that endpoint answers with a stateless reset (all of them share the key their
//! connection IDs are checked with and the key resets are made with, so it takes the ID for
//! one of theirs and the client takes the reset), and the node's relay client reconnects at
//! once, as after any loss of its connection, instead of waiting out an idle timeout.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::server::{QuicGate, QuicLimits, Relay};
use crate::tls::RelayCert;

/// How long a closed endpoint's thread waits for its connections to tell their clients.
const CLOSING: Duration = Duration::from_secs(1);

/// The QUIC listener's threads when not told, on `cpus` CPUs: one per four CPUs, at least
/// one and at most four (one up to 7 CPUs, four from 16). One thread bounds what passes
/// between two busy nodes: on 16 CPUs (`bench-relay`, one stream between two nodes through the
/// coordinator's relay, in one session on one machine) it ran at 1.98 and 2.03 Gbit/s with its
/// one thread 99% busy, and at 2.88 Gbit/s on four threads where the two nodes were served by
/// different ones (92% and 87% busy), since the nodes hand a batch's relayed packets over at
/// once (before that, 1.49-1.62 on one thread and 1.56 on four; the outbox between threads
/// was then still woken per packet, see `server::QuicOut`). Where both land on one thread,
/// four run as one.
pub fn default_threads(cpus: usize) -> usize {
    (cpus / 4).clamp(1, 4)
}

/// [`default_threads`] of this machine's CPUs.
pub fn default_threads_here() -> usize {
    default_threads(std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get))
}

/// The relay's QUIC endpoints, each on a thread of its own; dropping it closes them (their
/// threads then end).
pub struct QuicListener {
    endpoints: Vec<quinn::Endpoint>,
    addr: SocketAddr,
}

impl QuicListener {
    /// Binds `threads` endpoints (at least one) to `addr` and serves `relay` on them within
    /// `limits`, counted across all of them. With port 0 the first endpoint picks the port and
    /// the others share it.
    pub fn start(
        relay: &Relay,
        cert: &RelayCert,
        addr: SocketAddr,
        threads: usize,
        limits: QuicLimits,
    ) -> anyhow::Result<Self> {
        let threads = threads.max(1);
        let server = crate::tls::server_config(cert)?;
        // One reset key and one key for connection IDs for all: an endpoint that a client
        // lands on after its address changed takes the connection ID it names for one of
        // ours (each endpoint's would otherwise be hashed with a key of its own, and a packet
        // with another's dropped as invalid) and answers with a reset the client can check.
        let mut config = quinn::EndpointConfig::default();
        let cid_key: u64 = rand::RngExt::random(&mut rand::rng());
        config.cid_generator(move || {
            Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
        });
        let gate = QuicGate::new(&limits);
        let mut listener = Self {
            endpoints: Vec::with_capacity(threads),
            addr,
        };
        for i in 0..threads {
            let socket = bind(listener.addr, threads > 1)
                .with_context(|| format!("binding QUIC on {}", listener.addr))?;
            listener.addr = socket.local_addr()?;
            let (tx, rx) = std::sync::mpsc::sync_channel(1);
            let (relay, server, config, gate) =
                (relay.clone(), server.clone(), config.clone(), gate.clone());
            std::thread::Builder::new()
                .name(format!("relay-quic{i}"))
                .spawn(move || {
                    let rt = match tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                    {
                        Ok(rt) => rt,
                        Err(e) => {
                            let _ = tx.send(Err(anyhow::Error::new(e).context("a runtime")));
                            return;
                        }
                    };
                    let endpoint = {
                        let _in = rt.enter();
                        quinn::Endpoint::new(
                            config,
                            Some(server),
                            socket,
                            Arc::new(quinn::TokioRuntime),
                        )
                    };
                    match endpoint {
                        Ok(e) => {
                            if tx.send(Ok(e.clone())).is_ok() {
                                rt.block_on(async {
                                    relay.serve_quic(e.clone(), limits, gate).await;
                                    // Closed: let the connections' drivers tell the clients.
                                    let _ = tokio::time::timeout(CLOSING, e.wait_idle()).await;
                                });
                            }
                        }
                        Err(e) => {
                            let _ = tx.send(Err(anyhow::Error::new(e).context("an endpoint")));
                        }
                    }
                })
                .context("starting a QUIC thread")?;
            // Dropping `listener` on an error closes the endpoints already running.
            let endpoint = rx.recv().context("a QUIC thread ended while starting")??;
            listener.endpoints.push(endpoint);
        }
        Ok(listener)
    }

    /// The UDP address the endpoints share.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections open on each endpoint, handshakes included.
    pub fn open_connections(&self) -> Vec<usize> {
        self.endpoints
            .iter()
            .map(quinn::Endpoint::open_connections)
            .collect()
    }
}

impl Drop for QuicListener {
    fn drop(&mut self) {
        for e in &self.endpoints {
            e.close(0u32.into(), b"relay shutting down");
        }
    }
}

/// A UDP socket on `addr` with the relay's large buffers, shared by port with other such
/// sockets when `shared`.
fn bind(addr: SocketAddr, shared: bool) -> std::io::Result<std::net::UdpSocket> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    if shared {
        socket.set_reuse_port(true)?;
    }
    socket.bind(&addr.into())?;
    let socket = std::net::UdpSocket::from(socket);
    crate::dial::large_buffers(&socket, crate::dial::UDP_BUFFER);
    Ok(socket)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One thread where CPUs are few (a datagram between clients of two threads crosses
    /// between them), one per four CPUs past that, never more than four.
    #[test]
    fn threads_by_default_grow_with_the_cpus_up_to_four() {
        let by_cpus: Vec<usize> = [1, 2, 4, 7, 8, 12, 16, 64]
            .into_iter()
            .map(default_threads)
            .collect();
        assert_eq!(by_cpus, [1, 1, 1, 1, 2, 3, 4, 4]);
    }
}
