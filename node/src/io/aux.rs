//! Extra UDP sockets for reaching peers behind endpoint-dependent ("hard") NATs: each gets its
//! own NAT mapping, so a peer spraying our public IP can hit one of them. The core names them
//! (`SockId::Aux(n)`); they are opened on first use and stay open while the node runs.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tracing::debug;

/// Most extra sockets.
pub const MAX_AUX: u16 = 256;

/// A datagram received on an extra socket.
#[derive(Debug)]
pub struct AuxDatagram {
    /// Which socket.
    pub sock: u16,
    /// From where.
    pub from: SocketAddr,
    /// The bytes.
    pub bytes: Vec<u8>,
}

/// The extra sockets.
pub struct AuxSockets {
    socks: HashMap<u16, Arc<UdpSocket>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    tx: mpsc::Sender<AuxDatagram>,
    dialer: relay::dial::Dialer,
}

impl Drop for AuxSockets {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl AuxSockets {
    /// Extra sockets made by `dialer`, reporting what they receive on `tx`.
    pub fn new(dialer: relay::dial::Dialer, tx: mpsc::Sender<AuxDatagram>) -> Self {
        Self {
            socks: HashMap::new(),
            tasks: Vec::new(),
            tx,
            dialer,
        }
    }

    /// Sends from socket `n` (opened on first use; IPv4 only: hard NATs are an IPv4 affair).
    pub fn send(&mut self, n: u16, dst: SocketAddr, payload: &[u8]) {
        if n >= MAX_AUX || !dst.is_ipv4() {
            return;
        }
        let sock = match self.socks.get(&n) {
            Some(s) => Arc::clone(s),
            None => {
                let std_sock = match self
                    .dialer
                    .udp(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)))
                {
                    Ok(s) => std::net::UdpSocket::from(s),
                    Err(e) => {
                        debug!(error = %e, "cannot open an extra UDP socket");
                        return;
                    }
                };
                let Ok(s) = UdpSocket::from_std(std_sock) else {
                    return;
                };
                let s = Arc::new(s);
                self.socks.insert(n, Arc::clone(&s));
                let (rx_sock, tx) = (Arc::clone(&s), self.tx.clone());
                self.tasks.push(tokio::spawn(async move {
                    let mut buf = vec![0u8; 65_535];
                    while let Ok((len, from)) = rx_sock.recv_from(&mut buf).await {
                        let d = AuxDatagram {
                            sock: n,
                            from,
                            bytes: buf[..len].to_vec(),
                        };
                        if tx.send(d).await.is_err() {
                            return;
                        }
                    }
                }));
                s
            }
        };
        let _ = sock.try_send_to(payload, dst);
    }

    /// How many are open.
    pub fn len(&self) -> usize {
        self.socks.len()
    }

    /// Whether none is open.
    pub fn is_empty(&self) -> bool {
        self.socks.is_empty()
    }
}
