//! What a relay session decides, sans-IO: on the relay's side, whether a node's `Auth` frame
//! admits it and what each frame it sends afterwards asks for; on the node's side, its answer
//! to the relay's challenge and whether the relay proved its key. Time comes from the caller;
//! the server ([`crate::server`]) and the client ([`crate::client`]) move the frames, look
//! destinations up, send and count.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hybrid::StaticKeypair;

use crate::proto::{self, Frame, VERSION};
use crate::server::Authorizer;

/// At most one `PeerGone` per destination per this interval.
pub const PEER_GONE_INTERVAL: Duration = Duration::from_secs(1);
/// Destinations a session remembers telling its node about; past this it forgets them all
/// (a node sending to many made-up keys then hears about each again, no more than once a
/// second each, and the map stays bounded).
const GONE_REMEMBERED: usize = 4096;

/// Checks a node's first frame, which must be an `Auth` answering `nonce` with a MAC made
/// with the relay's key `relay` and a ticket `auth` accepts at Unix time `now`: the node's
/// key and the last second its session may run, or why it is refused.
pub fn authenticate(
    relay: &StaticKeypair,
    auth: &dyn Authorizer,
    nonce: &[u8; 32],
    frame: &[u8],
    now: i64,
) -> Result<([u8; 32], i64), String> {
    let Ok(Frame::Auth {
        node_key,
        mac,
        ticket,
    }) = proto::decode(frame)
    else {
        return Err("expected an authentication frame".into());
    };
    if !proto::check_client_mac(relay, &node_key, nonce, ticket, &mac) {
        return Err("authentication failed (wrong relay key, or not the node's key)".into());
    }
    let valid_until = auth.authorize(&node_key, ticket, now)?;
    if !auth.still_vouched(&node_key) {
        return Err("node is not vouched for by the coordinator".into());
    }
    Ok((node_key, valid_until))
}

/// The relay's first frame to a node: a challenge with a fresh `nonce`.
pub fn challenge(nonce: [u8; 32]) -> Vec<u8> {
    proto::encode(&Frame::Challenge {
        version: VERSION,
        nonce,
    })
}

/// The relay's answer to a node `authenticate` admitted: `Accepted`, with the relay's proof
/// that it holds `relay` (its MAC over the challenge's `nonce`); `None` for a node key no key
/// exchange works with (low order).
pub fn accepted(relay: &StaticKeypair, node_key: &[u8; 32], nonce: &[u8; 32]) -> Option<Vec<u8>> {
    let mac = proto::server_mac(relay, node_key, nonce)?;
    Some(proto::encode(&Frame::Accepted { mac }))
}

/// Why a relay did not admit this node, as the node sees it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// The relay's first frame was not a challenge.
    #[error("the relay did not send a challenge")]
    NoChallenge,
    /// The relay speaks another version of the protocol.
    #[error("relay speaks protocol version {0}, this node {VERSION}")]
    Version(u8),
    /// The relay key the coordinator lists is one no key exchange works with (low order).
    #[error("the relay's key is unusable")]
    UnusableKey,
    /// The relay's answer was not made with the key the coordinator lists.
    #[error("the relay could not prove it holds the key the coordinator lists")]
    WrongRelayKey,
    /// The relay refused the node, for this reason.
    #[error("relay refused this node: {0}")]
    Refused(String),
    /// The relay answered with something else.
    #[error("unexpected answer from the relay")]
    Unexpected,
}

/// The node's answer to the relay's first frame, `challenge`: the challenge's nonce and the
/// `Auth` frame that proves the node holds `node`'s key, with its `ticket`, made for the
/// relay with the key `relay_key` the coordinator lists.
pub fn answer_challenge(
    challenge: &[u8],
    node: &StaticKeypair,
    relay_key: &[u8; 32],
    ticket: &[u8],
) -> Result<([u8; 32], Vec<u8>), AuthError> {
    let Ok(Frame::Challenge { version, nonce }) = proto::decode(challenge) else {
        return Err(AuthError::NoChallenge);
    };
    if version != VERSION {
        return Err(AuthError::Version(version));
    }
    let mac = proto::client_mac(node, relay_key, &nonce, ticket).ok_or(AuthError::UnusableKey)?;
    let auth = proto::encode(&Frame::Auth {
        node_key: node.public(),
        mac,
        ticket,
    });
    Ok((nonce, auth))
}

/// Whether the relay's `answer` to the node's `Auth` admits it, and proves the relay holds
/// the key `relay_key` the coordinator lists (its MAC over the challenge's `nonce`).
pub fn check_admission(
    answer: &[u8],
    node: &StaticKeypair,
    relay_key: &[u8; 32],
    nonce: &[u8; 32],
) -> Result<(), AuthError> {
    match proto::decode(answer) {
        Ok(Frame::Accepted { mac }) if proto::check_server_mac(node, relay_key, nonce, &mac) => {
            Ok(())
        }
        Ok(Frame::Accepted { .. }) => Err(AuthError::WrongRelayKey),
        Ok(Frame::Rejected { reason }) => Err(AuthError::Refused(reason.to_owned())),
        _ => Err(AuthError::Unexpected),
    }
}

/// The time, read only when a decision needs it.
pub trait Clock {
    /// Unix seconds (a refreshed ticket, a refusal list).
    fn unix(&self) -> i64;
    /// The monotonic clock (the rate limit).
    fn now(&self) -> Instant;
}

/// How many bytes a node may have forwarded: `bytes_per_sec` on average, `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientRate {
    /// The average.
    pub bytes_per_sec: u64,
    /// What may go at once.
    pub burst: u64,
}

impl ClientRate {
    /// `mbit` megabits a second, with a tenth of a second's worth (at least 64 KiB) at once.
    pub fn mbit(mbit: u32) -> Self {
        let bytes_per_sec = u64::from(mbit) * 125_000;
        Self {
            bytes_per_sec,
            burst: (bytes_per_sec / 10).max(64 << 10),
        }
    }
}

/// A token bucket of bytes, kept in byte-nanoseconds so no fraction is lost however often it
/// is asked.
#[derive(Debug)]
struct ByteBucket {
    rate: ClientRate,
    /// Tokens, times 10^9.
    tokens: u128,
    last: Option<Instant>,
}

impl ByteBucket {
    const NANOS: u128 = 1_000_000_000;

    fn new(rate: ClientRate) -> Self {
        Self {
            rate,
            tokens: u128::from(rate.burst) * Self::NANOS,
            last: None,
        }
    }

    /// Takes `len` bytes' worth at `now` if there are.
    fn take(&mut self, len: u64, now: Instant) -> bool {
        let full = u128::from(self.rate.burst) * Self::NANOS;
        if let Some(last) = self.last {
            let elapsed = now.saturating_duration_since(last).as_nanos();
            self.tokens = self
                .tokens
                .saturating_add(elapsed.saturating_mul(u128::from(self.rate.bytes_per_sec)))
                .min(full);
        }
        self.last = Some(now);
        let cost = u128::from(len) * Self::NANOS;
        if self.tokens < cost {
            return false;
        }
        self.tokens -= cost;
        true
    }
}

/// What a frame from an authenticated node asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Forward its payload (`len` bytes) to the node `dst`, as the `Recv` frame
    /// [`into_recv`] makes of it.
    Forward {
        /// The destination's node key.
        dst: [u8; 32],
        /// Payload bytes.
        len: u64,
    },
    /// Dropped: the node is no longer vouched for (its session is closing).
    Unvouched,
    /// Dropped: the node sent more than its [`ClientRate`] allows.
    RateLimited,
    /// Answer the node with this frame.
    Reply(Bytes),
    /// Its refreshed ticket lets the session run until this Unix second.
    ValidUntil(i64),
    /// Its refreshed ticket was refused, for this reason (the session runs on until its old
    /// one expires).
    TicketRefused(String),
    /// A refreshed ticket in the same second as the last one checked: dropped unchecked.
    TicketTooSoon,
    /// Forward nothing from these nodes to this one from now on (sorted, no duplicates;
    /// empty: forward from all). Replaces the list before.
    Refuse(Vec<[u8; 32]>),
    /// A `Refuse` frame in the same second as the last one applied: dropped (a node sends
    /// its list when it changes, no more than every two seconds).
    RefuseTooSoon,
    /// Nothing to do (a `Pong`).
    Nothing,
    /// A frame a node never sends (counted as malformed); `first` for the session's first
    /// such frame, the one worth a warning.
    Unexpected {
        /// Whether it is the session's first.
        first: bool,
    },
    /// Not a frame (counted as malformed).
    Malformed,
}

/// One authenticated node's session.
///
/// A node is authenticated, not trusted: a ticket's check costs a signature verification on
/// the relay thread that forwards everyone else's packets, so at most one refreshed ticket is
/// checked per second (a node refreshes about once a minute), and a node sending frames it never
/// should is warned about once, not once a frame.
#[derive(Debug)]
pub struct Session {
    key: [u8; 32],
    /// When each destination the node sent to was last reported gone.
    gone_sent: HashMap<[u8; 32], Instant>,
    /// The Unix second of the last refreshed ticket checked.
    ticket_checked: Option<i64>,
    /// The Unix second of the last `Refuse` frame applied.
    refuse_applied: Option<i64>,
    /// Whether it has sent a frame it never should.
    unexpected: bool,
    /// What it may still have forwarded, if the relay limits each node.
    rate: Option<ByteBucket>,
}

impl Session {
    /// The session of the node with `key`, forwarding as much as `rate` allows (`None`: no
    /// limit).
    pub fn new(key: [u8; 32], rate: Option<ClientRate>) -> Self {
        Self {
            key,
            gone_sent: HashMap::new(),
            ticket_checked: None,
            refuse_applied: None,
            unexpected: false,
            rate: rate.map(ByteBucket::new),
        }
    }

    /// The node's key.
    pub fn key(&self) -> &[u8; 32] {
        &self.key
    }

    /// What `frame` from the node asks for; `alive` is whether the node is still vouched for,
    /// `auth` checks a refreshed ticket at the Unix time `clock` gives. The clock is read only
    /// for a ticket or a refusal list, and for a packet when the node's rate is limited.
    pub fn on_frame(
        &mut self,
        frame: &[u8],
        alive: bool,
        auth: &dyn Authorizer,
        clock: &impl Clock,
    ) -> Step {
        match proto::decode(frame) {
            Ok(Frame::Send { dst, payload }) if alive => {
                let len = payload.len() as u64;
                if let Some(rate) = &mut self.rate
                    && !rate.take(len, clock.now())
                {
                    return Step::RateLimited;
                }
                Step::Forward { dst, len }
            }
            Ok(Frame::Send { .. }) => Step::Unvouched,
            Ok(Frame::Ticket { ticket }) => {
                let now = clock.unix();
                if self.ticket_checked == Some(now) {
                    return Step::TicketTooSoon;
                }
                self.ticket_checked = Some(now);
                match auth.authorize(&self.key, ticket, now) {
                    Ok(until) => Step::ValidUntil(until),
                    Err(reason) => Step::TicketRefused(reason),
                }
            }
            Ok(Frame::Refuse { keys }) => {
                // Applying a list takes the lock every forwarding thread reads under: at most
                // one a second.
                let now = clock.unix();
                if self.refuse_applied == Some(now) {
                    return Step::RefuseTooSoon;
                }
                self.refuse_applied = Some(now);
                let mut keys: Vec<[u8; 32]> = proto::refused_keys(keys).collect();
                keys.sort_unstable();
                keys.dedup();
                Step::Refuse(keys)
            }
            Ok(Frame::Ping { data }) => Step::Reply(proto::encode(&Frame::Pong { data }).into()),
            Ok(Frame::Pong { .. }) => Step::Nothing,
            Ok(_) => Step::Unexpected {
                first: !std::mem::replace(&mut self.unexpected, true),
            },
            Err(_) => Step::Malformed,
        }
    }

    /// The `PeerGone` frame to tell the node that `dst` is not connected here, unless it was
    /// told less than [`PEER_GONE_INTERVAL`] before `now`.
    pub fn peer_gone(&mut self, dst: [u8; 32], now: Instant) -> Option<Bytes> {
        if self.gone_sent.len() > GONE_REMEMBERED {
            self.gone_sent.clear();
        }
        let due = self
            .gone_sent
            .get(&dst)
            .is_none_or(|t| now.duration_since(*t) >= PEER_GONE_INTERVAL);
        due.then(|| {
            self.gone_sent.insert(dst, now);
            proto::encode(&Frame::PeerGone { key: dst }).into()
        })
    }
}

/// The `Recv` frame the destination gets for the `Send` frame `frame` (one [`Session::on_frame`]
/// made a [`Step::Forward`] of) from `src`: made where the frame lies when nothing else holds
/// its buffer, else copied.
pub fn into_recv(frame: Bytes, src: &[u8; 32]) -> Bytes {
    match frame.try_into_mut() {
        Ok(mut f) => {
            // A Send frame, so this cannot refuse.
            proto::send_to_recv(&mut f, src);
            f.freeze()
        }
        Err(f) => Bytes::from(proto::encode_packet(
            true,
            src,
            f.get(proto::PACKET_HEADER..).unwrap_or_default(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    /// A clock no decision may read.
    struct Never;

    impl Clock for Never {
        fn unix(&self) -> i64 {
            panic!("the clock was read")
        }
        fn now(&self) -> Instant {
            panic!("the clock was read")
        }
    }

    /// A clock at this Unix second (the monotonic clock is not asked for).
    struct At(i64);

    impl Clock for At {
        fn unix(&self) -> i64 {
            self.0
        }
        fn now(&self) -> Instant {
            panic!("the monotonic clock was read")
        }
    }

    /// A clock at this instant (Unix second 0).
    struct Mono(Instant);

    impl Clock for Mono {
        fn unix(&self) -> i64 {
            0
        }
        fn now(&self) -> Instant {
            self.0
        }
    }

    #[test]
    fn a_rate_limited_node_gets_its_burst_then_its_rate_and_no_fraction_is_lost() {
        let rate = ClientRate {
            bytes_per_sec: 1_000_000,
            burst: 10_000,
        };
        let mut s = Session::new([2; 32], Some(rate));
        let packet = proto::encode_packet(false, &[3; 32], &[7; 1_000]);
        let t0 = Instant::now();
        let forwarded = |s: &mut Session, now: Instant, n: usize| {
            (0..n)
                .filter(|_| {
                    matches!(
                        s.on_frame(&packet, true, &TICKETS, &Mono(now)),
                        Step::Forward { .. }
                    )
                })
                .count()
        };
        // The burst at once, then nothing more at that instant.
        assert_eq!(forwarded(&mut s, t0, 50), 10);
        assert_eq!(
            s.on_frame(&packet, true, &TICKETS, &Mono(t0)),
            Step::RateLimited
        );
        // A second of 1,000-byte packets offered every 100 us: a thousand go (at 1 MB/s a
        // packet is earned in a millisecond, a hundredth of it between two offers).
        let mut sent = 0;
        for i in 1..=10_000u32 {
            sent += forwarded(&mut s, t0 + Duration::from_micros(u64::from(i) * 100), 1);
        }
        assert!(
            (999..=1_001).contains(&sent),
            "{sent} forwarded in a second"
        );
        // Idle for a minute: the burst again, no more.
        assert_eq!(forwarded(&mut s, t0 + Duration::from_secs(61), 50), 10);
        // Without a limit the clock is never read.
        let mut free = Session::new([2; 32], None);
        assert!(matches!(
            free.on_frame(&packet, true, &TICKETS, &Never),
            Step::Forward { .. }
        ));
        assert_eq!(ClientRate::mbit(100).bytes_per_sec, 12_500_000);
        assert_eq!(ClientRate::mbit(100).burst, 1_250_000);
        assert_eq!(ClientRate::mbit(1).burst, 64 << 10);
    }

    /// Accepts tickets that read "ok" until second 100 (a refreshed one until 200), refuses
    /// the rest; vouches for every key but `revoked`.
    struct Tickets {
        revoked: [u8; 32],
    }

    impl Authorizer for Tickets {
        fn authorize(&self, _key: &[u8; 32], ticket: &[u8], now: i64) -> Result<i64, String> {
            match ticket {
                b"ok" if now < 100 => Ok(100),
                b"fresh" => Ok(200),
                _ => Err(format!("bad ticket at {now}")),
            }
        }

        fn still_vouched(&self, key: &[u8; 32]) -> bool {
            key != &self.revoked
        }
    }

    const TICKETS: Tickets = Tickets { revoked: [0; 32] };

    fn keypair(b: u8) -> StaticKeypair {
        StaticKeypair::from_secret([b; 32])
    }

    /// The node's `Auth` frame for the challenge with `nonce` from `relay`.
    fn auth_frame(
        node: &StaticKeypair,
        relay: &StaticKeypair,
        nonce: &[u8; 32],
        ticket: &[u8],
    ) -> Vec<u8> {
        answer_challenge(&challenge(*nonce), node, &relay.public(), ticket)
            .unwrap()
            .1
    }

    #[test]
    fn a_node_is_admitted_only_with_its_own_key_a_good_ticket_and_the_nonce_it_was_sent() {
        let (relay, node) = (keypair(1), keypair(2));
        let nonce = [5; 32];
        let good = auth_frame(&node, &relay, &nonce, b"ok");
        assert_eq!(
            authenticate(&relay, &TICKETS, &nonce, &good, 10),
            Ok((node.public(), 100))
        );
        // The ticket has run out.
        let late = authenticate(&relay, &TICKETS, &nonce, &good, 100).unwrap_err();
        assert!(late.contains("bad ticket at 100"), "{late}");
        // Made for another challenge, or for another relay.
        let other_nonce = authenticate(&relay, &TICKETS, &[6; 32], &good, 10).unwrap_err();
        assert!(
            other_nonce.starts_with("authentication failed"),
            "{other_nonce}"
        );
        let other_relay = auth_frame(&node, &keypair(3), &nonce, b"ok");
        assert!(authenticate(&relay, &TICKETS, &nonce, &other_relay, 10).is_err());
        // Not an Auth frame at all.
        let ping = proto::encode(&Frame::Ping { data: [0; 8] });
        assert_eq!(
            authenticate(&relay, &TICKETS, &nonce, &ping, 10),
            Err("expected an authentication frame".into())
        );
        // A good ticket for a node the coordinator no longer vouches for.
        let revoked = Tickets {
            revoked: node.public(),
        };
        assert_eq!(
            authenticate(&relay, &revoked, &nonce, &good, 10),
            Err("node is not vouched for by the coordinator".into())
        );
    }

    /// The whole exchange between the two sides, in memory: the relay's challenge, the
    /// node's answer, the relay's check and its proof, the node's check of that proof.
    #[test]
    fn node_and_relay_admit_each_other_only_with_the_keys_the_coordinator_lists() {
        let (relay, node) = (keypair(1), keypair(2));
        let nonce = [5; 32];
        let challenge = challenge(nonce);
        let (got, auth) = answer_challenge(&challenge, &node, &relay.public(), b"ok").unwrap();
        assert_eq!(got, nonce);
        let (key, until) = authenticate(&relay, &TICKETS, &nonce, &auth, 10).unwrap();
        assert_eq!((key, until), (node.public(), 100));
        let accepted = |by: &StaticKeypair| accepted(by, &key, &nonce).unwrap();
        assert_eq!(
            check_admission(&accepted(&relay), &node, &relay.public(), &nonce),
            Ok(())
        );
        // An impostor at the relay's address, without its key: its proof does not check out,
        // and the answer it got was made for the real relay (a MAC it cannot check).
        let impostor = keypair(3);
        assert_eq!(
            check_admission(&accepted(&impostor), &node, &relay.public(), &nonce),
            Err(AuthError::WrongRelayKey)
        );
        assert!(authenticate(&impostor, &TICKETS, &nonce, &auth, 10).is_err());
        // A proof for another challenge.
        assert_eq!(
            check_admission(&accepted(&relay), &node, &relay.public(), &[6; 32]),
            Err(AuthError::WrongRelayKey)
        );
        // Refused, something else, another version, no challenge at all.
        let refused = proto::encode(&Frame::Rejected { reason: "expired" });
        assert_eq!(
            check_admission(&refused, &node, &relay.public(), &nonce),
            Err(AuthError::Refused("expired".into()))
        );
        let pong = proto::encode(&Frame::Pong { data: [0; 8] });
        assert_eq!(
            check_admission(&pong, &node, &relay.public(), &nonce),
            Err(AuthError::Unexpected)
        );
        let newer = proto::encode(&Frame::Challenge {
            version: VERSION + 1,
            nonce,
        });
        assert_eq!(
            answer_challenge(&newer, &node, &relay.public(), b"ok"),
            Err(AuthError::Version(VERSION + 1))
        );
        assert_eq!(
            answer_challenge(&pong, &node, &relay.public(), b"ok"),
            Err(AuthError::NoChallenge)
        );
        // A listed key no exchange works with (all zeros: low order).
        assert_eq!(
            answer_challenge(&challenge, &node, &[0; 32], b"ok"),
            Err(AuthError::UnusableKey)
        );
    }

    #[test]
    fn frames_become_steps_and_the_clock_is_read_only_for_a_ticket() {
        let mut s = Session::new([2; 32], None);
        let never = &Never;
        let send = proto::encode_packet(false, &[3; 32], &[7; 40]);
        assert_eq!(
            s.on_frame(&send, true, &TICKETS, never),
            Step::Forward {
                dst: [3; 32],
                len: 40
            }
        );
        assert_eq!(s.on_frame(&send, false, &TICKETS, never), Step::Unvouched);
        let ping = proto::encode(&Frame::Ping { data: [4; 8] });
        assert_eq!(
            s.on_frame(&ping, true, &TICKETS, never),
            Step::Reply(proto::encode(&Frame::Pong { data: [4; 8] }).into())
        );
        let pong = proto::encode(&Frame::Pong { data: [4; 8] });
        assert_eq!(s.on_frame(&pong, true, &TICKETS, never), Step::Nothing);
        let gone = proto::encode(&Frame::PeerGone { key: [3; 32] });
        assert_eq!(
            s.on_frame(&gone, true, &TICKETS, never),
            Step::Unexpected { first: true }
        );
        assert_eq!(
            s.on_frame(&gone, true, &TICKETS, never),
            Step::Unexpected { first: false }
        );
        assert_eq!(
            s.on_frame(&[0xff, 1, 2], true, &TICKETS, never),
            Step::Malformed
        );
        assert_eq!(s.on_frame(&[], true, &TICKETS, never), Step::Malformed);
        let fresh = proto::encode(&Frame::Ticket { ticket: b"fresh" });
        assert_eq!(
            s.on_frame(&fresh, true, &TICKETS, &At(50)),
            Step::ValidUntil(200)
        );
        let stale = proto::encode(&Frame::Ticket { ticket: b"ok" });
        assert_eq!(
            s.on_frame(&stale, true, &TICKETS, &At(150)),
            Step::TicketRefused("bad ticket at 150".into())
        );
    }

    /// Counts the tickets it checks; accepts every one.
    struct Counting(AtomicU32);

    impl Authorizer for Counting {
        fn authorize(&self, _key: &[u8; 32], _ticket: &[u8], now: i64) -> Result<i64, String> {
            self.0.fetch_add(1, Ordering::Relaxed);
            Ok(now + 60)
        }
    }

    #[test]
    fn a_flood_of_refreshed_tickets_is_checked_once_a_second() {
        let mut s = Session::new([2; 32], None);
        let auth = Counting(AtomicU32::new(0));
        let ticket = proto::encode(&Frame::Ticket { ticket: b"t" });
        assert_eq!(
            s.on_frame(&ticket, true, &auth, &At(10)),
            Step::ValidUntil(70)
        );
        for _ in 0..1000 {
            assert_eq!(
                s.on_frame(&ticket, true, &auth, &At(10)),
                Step::TicketTooSoon
            );
        }
        assert_eq!(auth.0.load(Ordering::Relaxed), 1, "one check in second 10");
        assert_eq!(
            s.on_frame(&ticket, true, &auth, &At(11)),
            Step::ValidUntil(71)
        );
        // A clock set back is another second too.
        assert_eq!(
            s.on_frame(&ticket, true, &auth, &At(5)),
            Step::ValidUntil(65)
        );
        assert_eq!(auth.0.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn a_refusal_list_is_sorted_without_duplicates_and_applied_once_a_second() {
        let mut s = Session::new([2; 32], None);
        let auth = Counting(AtomicU32::new(0));
        let refuse = proto::encode_refuse(&[[9; 32], [3; 32], [9; 32]]);
        assert_eq!(
            s.on_frame(&refuse, true, &auth, &At(10)),
            Step::Refuse(vec![[3; 32], [9; 32]])
        );
        let none = proto::encode_refuse(&[]);
        assert_eq!(s.on_frame(&none, true, &auth, &At(10)), Step::RefuseTooSoon);
        assert_eq!(
            s.on_frame(&none, true, &auth, &At(11)),
            Step::Refuse(vec![])
        );
        // Whole keys only.
        let mut cut = refuse.clone();
        cut.pop();
        assert_eq!(s.on_frame(&cut, true, &auth, &At(12)), Step::Malformed);
        // Refusing asks nothing of the ticket checker.
        assert_eq!(auth.0.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_missing_destination_is_reported_at_most_once_a_second_and_the_memory_stays_bounded() {
        let mut s = Session::new([2; 32], None);
        let t0 = Instant::now();
        let gone = |k: [u8; 32]| Bytes::from(proto::encode(&Frame::PeerGone { key: k }));
        assert_eq!(s.peer_gone([3; 32], t0), Some(gone([3; 32])));
        assert_eq!(s.peer_gone([3; 32], t0 + Duration::from_millis(999)), None);
        // Another destination is reported on its own clock.
        assert_eq!(
            s.peer_gone([4; 32], t0 + Duration::from_millis(500)),
            Some(gone([4; 32]))
        );
        assert_eq!(
            s.peer_gone([3; 32], t0 + PEER_GONE_INTERVAL),
            Some(gone([3; 32]))
        );
        assert_eq!(s.peer_gone([4; 32], t0 + PEER_GONE_INTERVAL), None);
        // Thousands of made-up destinations: each told once, the map never past its bound.
        let later = t0 + Duration::from_secs(5);
        for i in 0..3 * GONE_REMEMBERED as u32 {
            let mut k = [0u8; 32];
            k[..4].copy_from_slice(&i.to_le_bytes());
            k[31] = 1;
            assert!(s.peer_gone(k, later).is_some());
            assert!(s.gone_sent.len() <= GONE_REMEMBERED + 1);
        }
    }

    #[test]
    fn a_send_frame_becomes_the_recv_frame_from_its_source_in_place_or_copied() {
        let src = [8; 32];
        let want = Bytes::from(proto::encode_packet(true, &src, b"payload"));
        // Alone in its buffer: rewritten where it lies.
        let frame = Bytes::from(proto::encode_packet(false, &[3; 32], b"payload"));
        let at = frame.as_ptr();
        let recv = into_recv(frame, &src);
        assert_eq!(recv, want);
        assert_eq!(recv.as_ptr(), at);
        // Shared (another datagram of the same receive still holds the buffer): copied, and
        // the other holder sees its bytes unchanged.
        let frame = Bytes::from(proto::encode_packet(false, &[3; 32], b"payload"));
        let other = frame.clone();
        let recv = into_recv(frame, &src);
        assert_eq!(recv, want);
        assert_eq!(other[0], 0x10);
        assert_eq!(&other[1..33], &[3; 32]);
    }
}
