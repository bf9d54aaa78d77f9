//! WireGuard's four messages on the wire (whitepaper section 5.4): their types, lengths and
//! field offsets. Every field is little-endian; a message whose length is not its type's is
//! no message.

/// Handshake initiation.
pub(crate) const INITIATION: u8 = 1;
/// Handshake response.
pub(crate) const RESPONSE: u8 = 2;
/// Cookie reply.
pub(crate) const COOKIE_REPLY: u8 = 3;
/// Transport data.
pub(crate) const DATA: u8 = 4;

/// An initiation: type and three zero bytes, sender index, ephemeral key, sealed static key,
/// sealed timestamp, mac1, mac2.
pub(crate) const INITIATION_LEN: usize = 148;
/// A response: type, sender index, receiver index, ephemeral key, sealed nothing, mac1, mac2.
pub(crate) const RESPONSE_LEN: usize = 92;
/// A cookie reply: type, receiver index, nonce, sealed cookie.
pub(crate) const COOKIE_REPLY_LEN: usize = 64;
/// A data message's header: type, receiver index, counter.
pub(crate) const DATA_HEADER_LEN: usize = 16;
/// The shortest data message: a keepalive (no packet, only the tag).
pub(crate) const DATA_MIN_LEN: usize = DATA_HEADER_LEN + super::crypto::TAG_LEN;

pub(crate) mod initiation {
    pub(crate) const SENDER: usize = 4;
    pub(crate) const EPHEMERAL: usize = 8;
    pub(crate) const STATIC: usize = 40;
    pub(crate) const TIMESTAMP: usize = 88;
    pub(crate) const MAC1: usize = 116;
}

pub(crate) mod response {
    pub(crate) const SENDER: usize = 4;
    pub(crate) const RECEIVER: usize = 8;
    pub(crate) const EPHEMERAL: usize = 12;
    pub(crate) const EMPTY: usize = 44;
    pub(crate) const MAC1: usize = 60;
}

pub(crate) mod cookie_reply {
    pub(crate) const RECEIVER: usize = 4;
    pub(crate) const NONCE: usize = 8;
    pub(crate) const COOKIE: usize = 32;
}

pub(crate) mod data {
    pub(crate) const RECEIVER: usize = 4;
    pub(crate) const COUNTER: usize = 8;
}

/// What a datagram is, judged by its type byte, reserved bytes and length only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A handshake initiation.
    Initiation,
    /// A handshake response.
    Response,
    /// A cookie reply.
    CookieReply,
    /// Transport data.
    Data,
}

/// The kind of `msg`, or `None` when it is no WireGuard message.
pub fn kind(msg: &[u8]) -> Option<Kind> {
    if msg.len() < 4 || msg[1..4] != [0, 0, 0] {
        return None;
    }
    match (msg[0], msg.len()) {
        (INITIATION, INITIATION_LEN) => Some(Kind::Initiation),
        (RESPONSE, RESPONSE_LEN) => Some(Kind::Response),
        (COOKIE_REPLY, COOKIE_REPLY_LEN) => Some(Kind::CookieReply),
        (DATA, n) if n >= DATA_MIN_LEN => Some(Kind::Data),
        _ => None,
    }
}

/// Writes the mac1 of the handshake message `msg` (an initiation or a response) to the owner
/// of `receiver`, and clears its mac2: what anyone who knows the receiver's public key can
/// do (a peer's, or a tester's forgeries). Whether `msg` is a handshake message.
pub fn set_mac1(msg: &mut [u8], receiver: &[u8; 32]) -> bool {
    set_macs(msg, receiver, None)
}

/// [`set_mac1`], and the mac2 made with `cookie` (one the receiver sent, [`open_cookie`]).
pub fn set_macs(msg: &mut [u8], receiver: &[u8; 32], cookie: Option<&[u8; 16]>) -> bool {
    let at = match kind(msg) {
        Some(Kind::Initiation) => initiation::MAC1,
        Some(Kind::Response) => response::MAC1,
        _ => return false,
    };
    super::handshake::write_macs(
        msg,
        at,
        &super::handshake::PublicKeyInfo::new(*receiver),
        cookie,
    );
    true
}

/// The cookie in `reply`, a cookie reply from the owner of `sender` to the handshake message
/// whose mac1 was `mac1`; `None` if it is not one.
pub fn open_cookie(reply: &[u8], sender: &[u8; 32], mac1: &[u8; 16]) -> Option<[u8; 16]> {
    if kind(reply) != Some(Kind::CookieReply) {
        return None;
    }
    let nonce: [u8; 24] = reply[cookie_reply::NONCE..cookie_reply::COOKIE]
        .try_into()
        .ok()?;
    let sealed: [u8; 32] = reply[cookie_reply::COOKIE..].try_into().ok()?;
    let key = super::handshake::PublicKeyInfo::new(*sender).cookie_key;
    super::crypto::xopen(&key, &nonce, mac1, &sealed)
}

/// The little-endian `u32` at `at`.
pub(crate) fn u32_at(msg: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(msg[at..at + 4].try_into().expect("4 bytes"))
}

/// The little-endian `u64` at `at`.
pub(crate) fn u64_at(msg: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(msg[at..at + 8].try_into().expect("8 bytes"))
}

/// The 32 bytes at `at`.
pub(crate) fn key_at(msg: &[u8], at: usize) -> [u8; 32] {
    msg[at..at + 32].try_into().expect("32 bytes")
}
