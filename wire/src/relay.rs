//! Relays as the coordinator describes them to nodes, and what nodes report about their own
//! network (home relay, NAT behaviour).

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

use crate::keys::{RelayKey, push_hex};

/// A relay's id in the netmap (stable while the relay is configured).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RelayId(pub u32);

impl fmt::Display for RelayId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "relay-{}", self.0)
    }
}

/// One relay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayInfo {
    /// Its id.
    pub id: RelayId,
    /// A name for humans (`lattice status` shows `relay NAME`).
    pub name: String,
    /// Its static key (nodes require proof of it).
    pub key: RelayKey,
    /// QUIC address (UDP), the main transport.
    #[serde(default)]
    pub quic: Option<SocketAddr>,
    /// SHA-256 of the QUIC server's certificate (DER), which nodes pin.
    #[serde(default)]
    pub cert_sha256: Option<CertPin>,
    /// WebSocket URL (`http://host:port/relay`), for networks that block UDP.
    #[serde(default)]
    pub websocket: Option<String>,
    /// STUN servers it runs (UDP); two addresses let nodes tell whether their NAT's mapping
    /// depends on the destination.
    #[serde(default)]
    pub stun: Vec<SocketAddr>,
}

/// A certificate pin: 32 bytes, hex in text.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct CertPin(pub [u8; 32]);

impl fmt::Debug for CertPin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut s = String::new();
        push_hex(&mut s, &self.0[..4]);
        write!(f, "CertPin({s}…)")
    }
}

impl Serialize for CertPin {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut out = String::with_capacity(64);
        push_hex(&mut out, &self.0);
        s.serialize_str(&out)
    }
}

impl<'de> Deserialize<'de> for CertPin {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        crate::keys::parse_hex::<32>(&s)
            .map(Self)
            .ok_or_else(|| serde::de::Error::custom("expected 64 hex digits"))
    }
}

/// How a node's NAT treats its UDP port, as the node measured it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NatInfo {
    /// Whether any STUN server answered (false: UDP looks blocked).
    pub udp: bool,
    /// Whether the public port differs by destination (an endpoint-dependent, "hard" NAT).
    /// `None` when fewer than two STUN servers answered.
    #[serde(default)]
    pub mapping_varies: Option<bool>,
    /// The public IPv4 address STUN saw.
    #[serde(default)]
    pub public_ip: Option<IpAddr>,
    /// A port mapping obtained from the gateway (UPnP, NAT-PMP or PCP).
    #[serde(default)]
    pub port_mapped: Option<SocketAddr>,
}

impl NatInfo {
    /// Whether the node sits behind an endpoint-dependent (symmetric) NAT.
    pub fn is_hard(&self) -> bool {
        self.mapping_varies == Some(true) && self.port_mapped.is_none()
    }
}

/// Node keys relays must stop serving before their tickets run out (removed, expired or
/// rotated-away keys), as the coordinator publishes them at `GET /relay/revocations`. A relay
/// refuses each key until `until` (the last second any ticket for it can be valid).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevocationList {
    /// When the coordinator made the list (Unix seconds).
    pub issued_at: i64,
    /// The keys.
    #[serde(default)]
    pub revoked: Vec<Revocation>,
}

/// One revoked node key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    /// The key.
    pub node_key: crate::NodeKey,
    /// Refuse it until this Unix second.
    pub until: i64,
}

/// A [`RevocationList`] as sent: its exact JSON text and an Ed25519 signature over it under
/// the coordinator's relay-ticket key (context `lattice relay revocations v1`), so a relay can
/// trust it over plain HTTP.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedRevocations {
    /// The JSON of a [`RevocationList`].
    pub list: String,
    /// 128 hex digits.
    pub sig: String,
}

/// The signature context of [`SignedRevocations`].
pub const REVOCATIONS_CONTEXT: &[u8] = b"lattice relay revocations v1";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_info_has_a_stable_json_form() {
        let r = RelayInfo {
            id: RelayId(1),
            name: "coordinator".into(),
            key: RelayKey::from_bytes([1; 32]),
            quic: Some("198.51.100.1:8080".parse().unwrap()),
            cert_sha256: Some(CertPin([0xab; 32])),
            websocket: Some("http://198.51.100.1:8080/relay".into()),
            stun: vec!["198.51.100.1:3478".parse().unwrap()],
        };
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["id"], 1);
        assert_eq!(v["key"], format!("relaykey:{}", "01".repeat(32)));
        assert_eq!(v["cert_sha256"], "ab".repeat(32));
        assert_eq!(serde_json::from_value::<RelayInfo>(v).unwrap(), r);
        let minimal: RelayInfo = serde_json::from_str(&format!(
            r#"{{"id": 2, "name": "r", "key": "relaykey:{}"}}"#,
            "02".repeat(32)
        ))
        .unwrap();
        assert!(minimal.quic.is_none() && minimal.stun.is_empty());
    }

    #[test]
    fn can_deserialize_signed_revocations() {
        let json = format!(
            r#"{{"list": "{{\"issued_at\": 5, \"revoked\": [{{\"node_key\": \"nodekey:{}\", \"until\": 9}}]}}", "sig": "00"}}"#,
            "ab".repeat(32)
        );
        let s: SignedRevocations = serde_json::from_str(&json).unwrap();
        let l: RevocationList = serde_json::from_str(&s.list).unwrap();
        assert_eq!(l.issued_at, 5);
        assert_eq!(l.revoked[0].until, 9);
        assert_eq!(
            l.revoked[0].node_key,
            crate::NodeKey::from_bytes([0xab; 32])
        );
        let round: RevocationList =
            serde_json::from_str(&serde_json::to_string(&l).unwrap()).unwrap();
        assert_eq!(round, l);
        // Unknown fields from a newer coordinator are ignored.
        let newer: RevocationList =
            serde_json::from_str(r#"{"issued_at": 1, "revoked": [], "epoch": 3}"#).unwrap();
        assert!(newer.revoked.is_empty());
    }

    #[test]
    fn hard_nat_means_varying_mapping_without_a_port_mapping() {
        let mut n = NatInfo {
            udp: true,
            mapping_varies: Some(true),
            ..NatInfo::default()
        };
        assert!(n.is_hard());
        n.port_mapped = Some("203.0.113.1:4000".parse().unwrap());
        assert!(!n.is_hard());
        assert!(!NatInfo::default().is_hard());
    }
}
