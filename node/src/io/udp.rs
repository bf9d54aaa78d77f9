//! The magicsock's sockets: one UDP socket per address family on the node's one port. All of
//! the node's UDP traffic (WireGuard, and later STUN and disco) leaves through them, so the NAT
//! mapping a peer sees is the one the tunnel uses.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use anyhow::Context;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::UdpSocket;
use tracing::warn;

const BUFFER: usize = 4 << 20;

/// The node's UDP sockets.
pub struct Sockets {
    /// IPv4 socket.
    pub v4: UdpSocket,
    /// IPv6 socket, when the host has IPv6.
    pub v6: Option<UdpSocket>,
    /// The shared port.
    pub port: u16,
}

impl Sockets {
    /// Binds `port` (0 picks one) on both families.
    pub fn bind(port: u16) -> anyhow::Result<Self> {
        let v4 = bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)))
            .with_context(|| format!("binding UDP port {port}"))?;
        let port = v4.local_addr()?.port();
        let v6 = match bind(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port))) {
            Ok(s) => Some(s),
            Err(e) => {
                warn!(error = %e, "no IPv6 UDP socket; peers are reached over IPv4 only");
                None
            }
        };
        Ok(Self { v4, v6, port })
    }

    /// The socket for `dst`'s family.
    pub fn for_dst(&self, dst: &SocketAddr) -> Option<&UdpSocket> {
        match dst {
            SocketAddr::V4(_) => Some(&self.v4),
            SocketAddr::V6(_) => self.v6.as_ref(),
        }
    }
}

fn bind(addr: SocketAddr) -> anyhow::Result<UdpSocket> {
    let domain = if addr.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    let s = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    // Larger buffers absorb bursts; the kernel caps them at its limits.
    let _ = s.set_recv_buffer_size(BUFFER);
    let _ = s.set_send_buffer_size(BUFFER);
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    Ok(UdpSocket::from_std(s.into())?)
}
