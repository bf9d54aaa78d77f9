//! Sending frames as QUIC datagrams, on both ends of a relay connection.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;

/// What [`Datagrams::send`] did with a frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Sent {
    /// Queued on the connection.
    Queued,
    /// Dropped: the connection is gone, or the path's datagram size shrank below the frame
    /// since it was last asked (lost as an oversized UDP packet would be; the next frame asks
    /// afresh).
    Dropped,
    /// Larger than a datagram may be: handed back, for the connection's stream.
    TooLarge(Bytes),
}

/// A QUIC connection's datagrams, with the largest datagram the connection allows
/// remembered between frames.
///
/// Asking the connection for that size locks its state, which its driver holds while it
/// encrypts and sends a batch; asked on every frame, a sender on another thread waited on the
/// driver twice per packet (once for the size, once to queue). The size is asked again only
/// when a frame is larger than the one remembered (path MTU discovery may have raised it) or
/// after the connection refused a frame as too large.
#[derive(Debug, Clone)]
pub struct Datagrams {
    conn: quinn::Connection,
    /// The largest datagram the connection last said it allows (0: ask).
    max: Arc<AtomicUsize>,
}

impl Datagrams {
    /// The datagram side of `conn`.
    pub fn new(conn: quinn::Connection) -> Self {
        Self {
            conn,
            max: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// The connection.
    pub fn connection(&self) -> &quinn::Connection {
        &self.conn
    }

    /// Queues `frame` as one datagram if it fits. The connection drops its oldest datagram
    /// when its buffer is full, as a UDP socket's queue would.
    pub fn send(&self, frame: Bytes) -> Sent {
        if frame.len() > self.max.load(Ordering::Relaxed) {
            let max = self.conn.max_datagram_size().unwrap_or(0);
            self.max.store(max, Ordering::Relaxed);
            if frame.len() > max {
                return Sent::TooLarge(frame);
            }
        }
        match self.conn.send_datagram(frame) {
            Ok(()) => Sent::Queued,
            Err(quinn::SendDatagramError::TooLarge) => {
                self.max.store(0, Ordering::Relaxed);
                Sent::Dropped
            }
            Err(_) => Sent::Dropped,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls;

    /// Two ends of a real QUIC connection over loopback.
    async fn pair() -> (quinn::Endpoint, quinn::Connection, quinn::Connection) {
        let cert = tls::RelayCert::generate().unwrap();
        let server = quinn::Endpoint::server(
            tls::server_config(&cert).unwrap(),
            "127.0.0.1:0".parse().unwrap(),
        )
        .unwrap();
        let addr = server.local_addr().unwrap();
        let mut client = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        client.set_default_client_config(tls::client_config(cert.pin()).unwrap());
        let (c, s) = tokio::join!(
            async {
                client
                    .connect(addr, tls::SERVER_NAME)
                    .unwrap()
                    .await
                    .unwrap()
            },
            async { server.accept().await.unwrap().await.unwrap() },
        );
        (server, c, s)
    }

    #[tokio::test]
    async fn frames_that_fit_go_as_datagrams_and_larger_ones_come_back() {
        let (_server, c, s) = pair().await;
        let d = Datagrams::new(c.clone());
        let max = c.max_datagram_size().unwrap();
        // Larger than any datagram on any path (path MTU discovery may raise `max` while
        // the test runs, up to what UDP over Ethernet carries).
        let huge = Bytes::from(vec![3; 65_536]);
        // Nothing asked yet: the first frame asks, and the size is remembered.
        assert_eq!(d.send(Bytes::from(vec![1; 100])), Sent::Queued);
        assert!(d.max.load(Ordering::Relaxed) >= max);
        assert_eq!(d.send(Bytes::from(vec![2; max])), Sent::Queued);
        assert_eq!(d.send(huge.clone()), Sent::TooLarge(huge.clone()));
        assert_eq!(d.send(Bytes::from(vec![4; 10])), Sent::Queued);
        for want in [vec![1; 100], vec![2; max], vec![4; 10]] {
            assert_eq!(s.read_datagram().await.unwrap(), want);
        }
        assert_eq!(c.stats().frame_tx.datagram, 3);
        // A size remembered larger than the connection allows (the path shrank): the frame
        // is dropped, and the next one asks again.
        d.max.store(usize::MAX, Ordering::Relaxed);
        assert_eq!(d.send(huge.clone()), Sent::Dropped);
        assert_eq!(d.max.load(Ordering::Relaxed), 0);
        assert_eq!(d.send(huge.clone()), Sent::TooLarge(huge));
        assert!(d.max.load(Ordering::Relaxed) >= max);
        // Once the connection is gone, frames are dropped.
        c.close(0u32.into(), b"done");
        assert_eq!(d.send(Bytes::from(vec![7; 10])), Sent::Dropped);
    }
}
