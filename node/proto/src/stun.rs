//! The STUN client's codec (sans-IO): Binding requests and the mapped address in responses.

use std::net::SocketAddr;

use stun_rs::attributes::stun::{Fingerprint, XorMappedAddress};
use stun_rs::methods::BINDING;
use stun_rs::{
    MessageClass, MessageDecoderBuilder, MessageEncoderBuilder, StunMessageBuilder, TransactionId,
};

/// A Binding request with transaction id `tx`.
pub fn binding_request(tx: [u8; 12]) -> Vec<u8> {
    let msg = StunMessageBuilder::new(BINDING, MessageClass::Request)
        .with_transaction_id(TransactionId::from(tx))
        .with_attribute(Fingerprint::default())
        .build();
    let mut buf = [0u8; 64];
    let n = MessageEncoderBuilder::default()
        .build()
        .encode(&mut buf, &msg)
        .expect("a Binding request fits in 64 bytes");
    buf[..n].to_vec()
}

/// The transaction id and mapped address of a Binding success response; `None` for anything
/// else.
pub fn parse_response(b: &[u8]) -> Option<([u8; 12], SocketAddr)> {
    let (msg, _) = MessageDecoderBuilder::default().build().decode(b).ok()?;
    if msg.method() != BINDING || msg.class() != MessageClass::SuccessResponse {
        return None;
    }
    let mapped = *msg
        .get::<XorMappedAddress>()?
        .as_xor_mapped_address()
        .ok()?
        .socket_address();
    Some((*msg.transaction_id().as_bytes(), mapped))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn requests_and_responses_round_trip() {
        let req = binding_request([5; 12]);
        assert_eq!(
            crate::magicsock::classify(&req),
            crate::magicsock::DatagramKind::Stun
        );
        assert_eq!(parse_response(&req), None, "a request is not a response");
        let from: SocketAddr = "203.0.113.4:40000".parse().unwrap();
        let resp = relay::stun::answer(&req, from).unwrap();
        assert_eq!(parse_response(&resp), Some(([5; 12], from)));
    }

    proptest! {
        #[test]
        fn parsing_arbitrary_bytes_never_panics(b in proptest::collection::vec(any::<u8>(), 0..100)) {
            let _ = parse_response(&b);
        }
    }
}
