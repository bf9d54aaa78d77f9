//! The relay's STUN server: answers Binding requests with the address they came from
//! (XOR-MAPPED-ADDRESS), so nodes learn their public address and how their NAT maps ports.
//! Nothing else is answered, and an answer is never larger than its request plus a few bytes,
//! so the server cannot be used to amplify traffic.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use stun_rs::attributes::stun::{Fingerprint, XorMappedAddress};
use stun_rs::methods::BINDING;
use stun_rs::{MessageClass, MessageDecoderBuilder, MessageEncoderBuilder, StunMessageBuilder};
use tokio::net::UdpSocket;
use tracing::debug;

/// Counters of one STUN server.
#[derive(Debug, Default)]
pub struct StunStats {
    /// Binding requests answered.
    pub answered: AtomicU64,
    /// Datagrams that were not Binding requests.
    pub ignored: AtomicU64,
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

/// Serves STUN on `socket` until the task is dropped.
pub async fn serve(socket: UdpSocket, stats: Arc<StunStats>) {
    let mut buf = [0u8; 1500];
    loop {
        let Ok((n, from)) = socket.recv_from(&mut buf).await else {
            continue;
        };
        match answer(&buf[..n], from) {
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
