//! The relay's STUN server: answers Binding requests with the address they came from
//! (XOR-MAPPED-ADDRESS), so nodes learn their public address and how their NAT maps ports.
//! Nothing else is answered. An answer is at most 32 bytes larger than its request (a 20-byte
//! request from an IPv6 address gets 52), so a request whose source is forged makes the relay
//! send its victim somewhat more than the forger sent: [`Limiter`] bounds how much each source
//! address gets, so the server cannot be used to flood a third party.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use stun_rs::attributes::stun::{Fingerprint, XorMappedAddress};
use stun_rs::methods::BINDING;
use stun_rs::{MessageClass, MessageDecoderBuilder, MessageEncoderBuilder, StunMessageBuilder};
use tokio::net::UdpSocket;
use tracing::debug;

/// What the sockets of one STUN server share: its counters, and one [`Limiter`] (a relay
/// listening on several addresses answers a source no more often than one would: each
/// address counting for itself, a forger spreading its requests over them multiplied what its
/// victim was sent).
#[derive(Debug, Default)]
pub struct StunStats {
    /// Binding requests answered.
    pub answered: AtomicU64,
    /// Datagrams that were not Binding requests.
    pub ignored: AtomicU64,
    /// Binding requests not answered: their source had its answers for the second.
    pub limited: AtomicU64,
    limiter: Mutex<Limiter>,
}

/// Binding requests answered per source address in a second (an IPv6 address counts by its
/// /64). A node asks each relay a few times every 30 s; this leaves room for a thousand of them
/// behind one NAT asking at once, and bounds what a forged flood sends its victim to about
/// 13 KB/s from a relay, however many addresses it listens on.
pub const PER_SOURCE: u32 = 256;

/// Sources counted in one second: a request from a new source beyond them waits for the next
/// second (it is not answered; a node asks again within seconds).
pub const MAX_SOURCES: usize = 65_536;

/// How many answers each source address has had this second (sans-IO: time is passed in).
#[derive(Debug)]
pub struct Limiter {
    second: Option<Instant>,
    counts: HashMap<IpAddr, u32>,
}

impl Default for Limiter {
    fn default() -> Self {
        Self::new()
    }
}

impl Limiter {
    /// A limiter that has counted nothing.
    pub fn new() -> Self {
        Self {
            second: None,
            counts: HashMap::new(),
        }
    }

    /// Whether a Binding request from `ip` at `now` may be answered (and counts it if so).
    pub fn allow(&mut self, ip: IpAddr, now: Instant) -> bool {
        match self.second {
            Some(start) if now.saturating_duration_since(start) < Duration::from_secs(1) => {}
            _ => {
                self.second = Some(now);
                self.counts.clear();
            }
        }
        let full = self.counts.len() >= MAX_SOURCES;
        let source = wire::counted_ip(ip);
        match self.counts.get_mut(&source) {
            Some(n) if *n >= PER_SOURCE => false,
            Some(n) => {
                *n += 1;
                true
            }
            None if full => false,
            None => {
                self.counts.insert(source, 1);
                true
            }
        }
    }
}

/// The answer to a STUN datagram from `from`, or `None` if it is not a Binding request.
pub fn answer(request: &[u8], from: SocketAddr) -> Option<Vec<u8>> {
    // Cheap signature check before decoding: first two bits zero and the magic cookie.
    if request.len() < 20 || request[0] & 0xc0 != 0 || request[4..8] != [0x21, 0x12, 0xa4, 0x42] {
        return None;
    }
    let decoder = MessageDecoderBuilder::default().build();
    let (msg, _) = decoder.decode(request).ok()?;
    if msg.method() != BINDING || msg.class() != MessageClass::Request {
        return None;
    }
    let resp = StunMessageBuilder::new(BINDING, MessageClass::SuccessResponse)
        .with_transaction_id(*msg.transaction_id())
        .with_attribute(XorMappedAddress::from(from))
        .with_attribute(Fingerprint::default())
        .build();
    let mut buf = [0u8; 128];
    let n = MessageEncoderBuilder::default()
        .build()
        .encode(&mut buf, &resp)
        .ok()?;
    Some(buf[..n].to_vec())
}

/// Serves STUN on `socket` until the task is dropped, answering each source within
/// [`PER_SOURCE`] a second across all the sockets served with `stats`.
pub async fn serve(socket: UdpSocket, stats: Arc<StunStats>) {
    let mut buf = [0u8; 1500];
    let allow = |ip: IpAddr| {
        stats
            .limiter
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .allow(ip, Instant::now())
    };
    loop {
        let Ok((n, from)) = socket.recv_from(&mut buf).await else {
            continue;
        };
        match answer(&buf[..n], from) {
            Some(_) if !allow(from.ip()) => {
                stats.limited.fetch_add(1, Ordering::Relaxed);
            }
            Some(resp) => {
                if let Err(e) = socket.send_to(&resp, from).await {
                    debug!(%from, error = %e, "stun reply failed");
                }
                stats.answered.fetch_add(1, Ordering::Relaxed);
            }
            None => {
                stats.ignored.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn request(tx: [u8; 12]) -> Vec<u8> {
        let msg = StunMessageBuilder::new(BINDING, MessageClass::Request)
            .with_transaction_id(stun_rs::TransactionId::from(tx))
            .with_attribute(Fingerprint::default())
            .build();
        let mut buf = [0u8; 64];
        let n = MessageEncoderBuilder::default()
            .build()
            .encode(&mut buf, &msg)
            .unwrap();
        buf[..n].to_vec()
    }

    #[test]
    fn a_binding_request_is_answered_with_the_source_address() {
        let from: SocketAddr = "203.0.113.9:40123".parse().unwrap();
        let resp = answer(&request([7; 12]), from).unwrap();
        let (msg, _) = MessageDecoderBuilder::default()
            .build()
            .decode(&resp)
            .unwrap();
        assert_eq!(msg.class(), MessageClass::SuccessResponse);
        assert_eq!(msg.transaction_id().as_bytes(), &[7; 12]);
        let mapped = msg
            .get::<XorMappedAddress>()
            .unwrap()
            .as_xor_mapped_address()
            .unwrap()
            .socket_address();
        assert_eq!(*mapped, from);
        let v6: SocketAddr = "[2001:db8::1]:9".parse().unwrap();
        assert!(answer(&request([8; 12]), v6).is_some());
    }

    #[test]
    fn other_messages_get_no_answer() {
        let from: SocketAddr = "203.0.113.9:1".parse().unwrap();
        assert!(answer(b"hello", from).is_none());
        assert!(answer(&[0u8; 40], from).is_none());
        // A response is not answered (no loops between two servers).
        let resp = answer(&request([1; 12]), from).unwrap();
        assert!(answer(&resp, from).is_none());
    }

    #[test]
    fn each_source_gets_its_answers_a_second_and_the_sources_are_bounded() {
        let t0 = Instant::now();
        let mut l = Limiter::new();
        let a: IpAddr = "203.0.113.9".parse().unwrap();
        let b: IpAddr = "203.0.113.10".parse().unwrap();
        let allowed = |l: &mut Limiter, ip: IpAddr, at: Instant, n: u32| {
            (0..n).filter(|_| l.allow(ip, at)).count() as u32
        };
        assert_eq!(allowed(&mut l, a, t0, 1000), PER_SOURCE);
        assert_eq!(
            allowed(&mut l, b, t0, 10),
            10,
            "another source is not held back"
        );
        let later = t0 + Duration::from_millis(999);
        assert_eq!(allowed(&mut l, a, later, 10), 0, "still the same second");
        let next = t0 + Duration::from_secs(1);
        assert_eq!(allowed(&mut l, a, next, 1000), PER_SOURCE, "a new second");

        // An IPv6 /64 is one source; an IPv4-mapped address is its IPv4 address.
        let mut l = Limiter::new();
        for i in 0..PER_SOURCE {
            assert!(l.allow(format!("2001:db8:1:2::{i:x}").parse().unwrap(), t0));
        }
        assert!(!l.allow("2001:db8:1:2:ffff::1".parse().unwrap(), t0));
        assert!(l.allow("2001:db8:1:3::1".parse().unwrap(), t0));
        assert_eq!(allowed(&mut l, a, t0, PER_SOURCE), PER_SOURCE);
        assert!(!l.allow("::ffff:203.0.113.9".parse().unwrap(), t0));

        // Past MAX_SOURCES in a second a new source waits; those counted go on.
        let mut l = Limiter::new();
        for i in 0..MAX_SOURCES as u32 {
            assert!(l.allow(IpAddr::V4((0x0a00_0000 + i).into()), t0));
        }
        assert!(!l.allow(b, t0), "a new source past the bound");
        assert!(l.allow(IpAddr::V4(0x0a00_0000.into()), t0), "a counted one");
        assert!(l.allow(b, next), "the next second counts afresh");
    }

    /// Binding requests sent from one socket, whose answers are read as they come (a socket's
    /// buffer holds only a few hundred).
    struct Flood {
        reader: tokio::task::JoinHandle<u32>,
        start: Instant,
    }

    /// Sends `sent` Binding requests from one address on 127.0.0.1 to `targets` in turn, paced
    /// so that the kernel keeps every one.
    async fn flood(targets: &[SocketAddr], sent: u32) -> Flood {
        let flooder = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let reader = {
            let flooder = Arc::clone(&flooder);
            tokio::spawn(async move {
                let mut buf = [0u8; 128];
                let mut answered = 0u32;
                while let Ok(Ok(_)) =
                    tokio::time::timeout(Duration::from_millis(500), flooder.recv(&mut buf)).await
                {
                    answered += 1;
                }
                answered
            })
        };
        let start = Instant::now();
        for i in 0..sent {
            let to = targets[i as usize % targets.len()];
            flooder.send_to(&request([i as u8; 12]), to).await.unwrap();
            if i % 32 == 31 {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        Flood { reader, start }
    }

    impl Flood {
        /// How many answers came (once none came for half a second), and in how many
        /// seconds (begun) since the first request.
        async fn answered(self) -> (u32, u32) {
            let answered = self.reader.await.unwrap();
            (answered, self.start.elapsed().as_secs() as u32 + 1)
        }
    }

    /// A relay listening for STUN on two addresses: a flood from one source spread over both
    /// gets the answers one address would give it, not twice as many.
    #[tokio::test]
    async fn a_flood_spread_over_two_listening_addresses_gets_one_addresss_answers() {
        let stats = Arc::new(StunStats::default());
        let mut addrs = Vec::new();
        let mut tasks = Vec::new();
        for ip in ["127.0.0.1:0", "127.0.0.3:0"] {
            let server = UdpSocket::bind(ip).await.unwrap();
            addrs.push(server.local_addr().unwrap());
            tasks.push(tokio::spawn(serve(server, Arc::clone(&stats))));
        }
        // Each address alone would answer PER_SOURCE of them in the first second.
        let sent = 4 * PER_SOURCE;
        let (answered, seconds) = flood(&addrs, sent).await.answered().await;
        assert!(
            answered <= PER_SOURCE * seconds,
            "{answered} of {sent} answered in {seconds} s over two addresses; at most \
             {PER_SOURCE} a second allowed"
        );
        assert!(answered >= 32, "{answered} answered");
        for t in tasks {
            t.abort();
        }
    }

    #[tokio::test]
    async fn a_flood_from_one_address_gets_its_answers_and_another_address_still_gets_its() {
        let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = server.local_addr().unwrap();
        let stats = Arc::new(StunStats::default());
        let task = tokio::spawn(serve(server, Arc::clone(&stats)));
        let other = UdpSocket::bind("127.0.0.2:0").await.unwrap();
        // Without the limit each one is answered.
        let sent = 4 * PER_SOURCE;
        let flooding = flood(&[addr], sent).await;
        other.send_to(&request([1; 12]), addr).await.unwrap();
        let mut buf = [0u8; 128];
        let n = tokio::time::timeout(Duration::from_secs(5), other.recv(&mut buf))
            .await
            .expect("the other address is answered")
            .unwrap();
        let (msg, _) = MessageDecoderBuilder::default()
            .build()
            .decode(&buf[..n])
            .unwrap();
        assert_eq!(msg.class(), MessageClass::SuccessResponse);
        let (answered, seconds) = flooding.answered().await;
        assert!(
            answered <= PER_SOURCE * seconds,
            "{answered} of {sent} answered in {seconds} s; at most {PER_SOURCE} a second allowed"
        );
        // (A loaded machine may drop some requests in the kernel: bounds, not exact counts.)
        assert!(answered >= 32, "{answered} answered");
        let limited = stats.limited.load(Ordering::Relaxed);
        assert!(
            u64::from(sent - answered) >= limited && limited > 0,
            "{limited} counted as limited, {answered} of {sent} answered"
        );
        task.abort();
    }

    proptest! {
        #[test]
        fn arbitrary_datagrams_never_panic(mut b in proptest::collection::vec(any::<u8>(), 0..120)) {
            let from: SocketAddr = "192.0.2.1:1".parse().unwrap();
            let _ = answer(&b, from);
            if b.len() >= 8 {
                b[0] &= 0x3f;
                b[4..8].copy_from_slice(&[0x21, 0x12, 0xa4, 0x42]);
                let _ = answer(&b, from);
            }
        }
    }
}
