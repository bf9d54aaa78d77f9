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
use std::os::fd::{AsFd, AsRawFd};

use socket2::{Domain, Protocol, SockRef, Socket, Type};

/// The receive and send buffers UDP sockets that carry tunnels ask for ([`large_buffers`]).
/// A reader that falls behind for a moment (its thread preempted, a batch being encrypted)
/// must not lose what arrives meanwhile: at 2 Gbit/s the system's usual default (208 KiB)
/// fills in under a millisecond, and every datagram lost there is a segment the tunnelled TCP
/// must send again (and slow down for).
pub const UDP_BUFFER: usize = 4 << 20;

/// Gives `sock` receive and send buffers of `bytes` each: past the system's limits
/// (`net.core.rmem_max`, `wmem_max`) where the process may (`SO_RCVBUFFORCE` with
/// `CAP_NET_ADMIN`, as a node running its TUN device has), else as large as those limits
/// allow. Best effort: a socket keeps what the kernel grants.
pub fn large_buffers<'a>(sock: impl Into<SockRef<'a>>, bytes: usize) {
    let sock = sock.into();
    let want = i32::try_from(bytes).unwrap_or(i32::MAX);
    if set_int_option(&*sock, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, want).is_err() {
        let _ = sock.set_recv_buffer_size(bytes);
    }
    if set_int_option(&*sock, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, want).is_err() {
        let _ = sock.set_send_buffer_size(bytes);
    }
}

/// Sets the int-valued socket option `level`/`name` of `sock` to `value` (`setsockopt`).
pub fn set_int_option(sock: impl AsFd, level: i32, name: i32, value: i32) -> io::Result<()> {
    // SAFETY: a valid socket descriptor, and a pointer to an int with its size.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_fd().as_raw_fd(),
            level,
            name,
            std::ptr::from_ref(&value).cast(),
            size_of::<i32>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

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

    /// A UDP socket bound to `addr` (non-blocking; IPv6 sockets are IPv6 only), with
    /// [`large_buffers`] of [`UDP_BUFFER`].
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
        large_buffers(&s, UDP_BUFFER);
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

    #[test]
    fn udp_sockets_get_large_buffers_past_the_system_limit_where_allowed() {
        let limit = |name: &str| -> usize {
            std::fs::read_to_string(format!("/proc/sys/net/core/{name}"))
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0)
        };
        let u = Dialer::PLAIN.udp("127.0.0.1:0".parse().unwrap()).unwrap();
        // The kernel doubles what it is asked for (its own bookkeeping), and caps a plain
        // request at the system's limit; a forced one (root) is not capped.
        // SAFETY: geteuid takes nothing and cannot fail.
        let root = unsafe { libc::geteuid() } == 0;
        for (got, max) in [
            (u.recv_buffer_size().unwrap(), limit("rmem_max")),
            (u.send_buffer_size().unwrap(), limit("wmem_max")),
        ] {
            let want = if root {
                UDP_BUFFER
            } else {
                UDP_BUFFER.min(max)
            };
            assert!(
                got >= 2 * want,
                "got {got}, asked {UDP_BUFFER}, limit {max}"
            );
        }
        // Below the limits, a plain socket would have the default (about 208 KiB).
        let plain = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let default = SockRef::from(&plain).recv_buffer_size().unwrap();
        assert!(default < 2 * UDP_BUFFER, "the default is already {default}");
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
