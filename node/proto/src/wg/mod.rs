//! WireGuard's protocol (the whitepaper's sections 5 and 6), sans-IO: the handshake, sessions
//! that seal and open from several threads at once, and the timers, on the caller's clock and
//! randomness.
//!
//! gotatun's `Tunn` takes `&mut self` for every packet and keeps its sessions private, so one
//! peer's packets in one direction can only be sealed one at a time, and its timers read the
//! real clock (STYLE S6). Here a [`Session`] seals with `&self` and an atomic counter: a
//! thread takes a run of counters in order and seals them while other threads seal theirs,
//! and the order the messages leave in is the order their counters were taken.
//!
//! - [`handshake`]: `Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s` step by step;
//! - [`session`]: transport data, the replay window;
//! - [`peer`]: one peer's handshakes, sessions, queue and timers;
//! - [`cookie`]: mac1 on every handshake, and cookies for sources over their limit.
//!
//! gotatun stays the reference: the tests run every exchange against its `Tunn`.

pub mod cookie;
mod crypto;
pub mod handshake;
pub mod message;
pub mod peer;
pub mod session;
#[cfg(test)]
mod tests;

use std::time::Duration;

pub use handshake::{Identity, timestamp};
pub use peer::{Error, Outcome, Peer, Stats};
pub use session::{OpenError, Session};

/// A session we started is rekeyed after sending this many messages.
pub const REKEY_AFTER_MESSAGES: u64 = 1 << 60;
/// No session seals or opens a message with a counter at or past this.
pub const REJECT_AFTER_MESSAGES: u64 = u64::MAX - (1 << 13);
/// A session we started is rekeyed when it is this old and we send.
pub const REKEY_AFTER_TIME: Duration = Duration::from_secs(120);
/// No session is used past this age.
pub const REJECT_AFTER_TIME: Duration = Duration::from_secs(180);
/// A handshake is retried for this long, then given up.
pub const REKEY_ATTEMPT_TIME: Duration = Duration::from_secs(90);
/// A handshake unanswered for this long is sent again (a new one).
pub const REKEY_TIMEOUT: Duration = Duration::from_secs(5);
/// Data heard and nothing sent for this long: a keepalive.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// A cookie is used for this long after it arrived.
pub const COOKIE_REFRESH_TIME: Duration = Duration::from_secs(120);
/// How often [`Peer::update_timers`] must run for the timers to fire on time.
pub const TIMER_GRANULARITY: Duration = Duration::from_millis(250);
