//! How a node opens its sockets to the underlay (the coordinator, relays, STUN, peers' direct
//! paths).
//!
//! A node that sends its internet traffic through an exit node routes the default route into
//! its own TUN device; its own sockets must not follow it (they would loop through the mesh
//! they carry). They carry a firewall mark (`SO_MARK`) instead, and the node's policy routing
//! sends marked traffic by the main table. A [`Dialer`] is that choice, passed to every place
//! that opens a socket; the mark is set before `connect` or `bind`, because a connected
//! socket keeps the route it was given.

use std::io;
use std::net::SocketAddr;

use socket2::{Domain, Protocol, SockRef, Socket, Type};

/// How outbound sockets are made: with or without a firewall mark.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Dialer {
    mark: Option<u32>,
}

impl Dialer {
    /// Sockets as the system makes them.
    pub const PLAIN: Self = Self { mark: None };

    /// Sockets carrying firewall mark `mark` (needs `CAP_NET_ADMIN`).
    pub fn marked(mark: u32) -> Self {
        Self { mark: Some(mark) }
    }

    /// The mark, if any.
    pub fn mark(self) -> Option<u32> {
        self.mark
    }

    /// Gives socket `sock` this dialer's mark.
    pub fn apply<'a>(self, sock: impl Into<SockRef<'a>>) -> io::Result<()> {
        if let Some(m) = self.mark {
            sock.into().set_mark(m)?;
        }
        Ok(())
    }

    /// A UDP socket bound to `addr` (non-blocking; IPv6 sockets are IPv6 only).
    pub fn udp(self, addr: SocketAddr) -> io::Result<Socket> {
        self.udp_with(addr, false)
    }

    /// A UDP socket bound to `addr` with `SO_REUSEPORT`, so sockets of one process can share
    /// the port (the kernel spreads datagrams over them by source and destination).
    pub fn udp_shared(self, addr: SocketAddr) -> io::Result<Socket> {
        self.udp_with(addr, true)
    }

    fn udp_with(self, addr: SocketAddr, reuse_port: bool) -> io::Result<Socket> {
        let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
        if addr.is_ipv6() {
            s.set_only_v6(true)?;
        }
        if reuse_port {
            s.set_reuse_port(true)?;
        }
        self.apply(&s)?;
        s.set_nonblocking(true)?;
        s.bind(&addr.into())?;
        Ok(s)
    }

    /// A TCP connection to `authority` (`host:port`), trying each address it resolves to.
    pub async fn tcp(self, authority: &str) -> io::Result<tokio::net::TcpStream> {
        let mut last = None;
        for addr in tokio::net::lookup_host(authority).await? {
            match self.tcp_to(addr).await {
                Ok(s) => return Ok(s),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("{authority} resolves to no address"),
            )
        }))
    }

    /// A TCP connection to `addr`.
    pub async fn tcp_to(self, addr: SocketAddr) -> io::Result<tokio::net::TcpStream> {
        let sock = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        self.apply(&sock)?;
        let stream = sock.connect(addr).await?;
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_plain_dialer_connects_and_binds_without_a_mark() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let s = Dialer::PLAIN.tcp(&addr.to_string()).await.unwrap();
        assert_eq!(SockRef::from(&s).mark().unwrap(), 0);
        let u = Dialer::PLAIN.udp("127.0.0.1:0".parse().unwrap()).unwrap();
        assert_eq!(u.mark().unwrap(), 0);
        assert!(Dialer::PLAIN.tcp("127.0.0.1:notaport").await.is_err());
    }

    #[tokio::test]
    async fn a_marked_dialer_marks_its_sockets_before_they_connect() {
        // Setting a mark needs CAP_NET_ADMIN: without it, the dialer says so.
        let d = Dialer::marked(0x4c_0000);
        match d.udp("127.0.0.1:0".parse().unwrap()) {
            Ok(u) => {
                assert_eq!(u.mark().unwrap(), 0x4c_0000);
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                let s = d.tcp_to(listener.local_addr().unwrap()).await.unwrap();
                assert_eq!(SockRef::from(&s).mark().unwrap(), 0x4c_0000);
            }
            Err(e) => assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}"),
        }
    }
}
