//! Messages on the node <-> coordinator control channel.
//!
//! The channel is a hybrid Noise session (see the `hybrid` crate) over a WebSocket. Each
//! application message is one JSON object. The node speaks first with [`Hello`]; the
//! coordinator answers [`Welcome`] (or an [`ServerMessage::Error`] and closes), then streams
//! [`MapResponse`]s.
//!
//! The node's identity is the machine key it proved in the Noise handshake. No message carries
//! an identity the coordinator would trust.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

use crate::authkey::AuthKey;
use crate::ids::NodeId;
use crate::keys::NodeKey;
use crate::netmap::MapResponse;
use crate::version::CapabilityVersion;

/// Node -> coordinator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientMessage {
    /// First message on every connection.
    Hello(Hello),
    /// The node's reachable UDP endpoints changed.
    Endpoints {
        /// The new endpoint list, best first.
        endpoints: Vec<SocketAddr>,
    },
    /// The node is leaving for good (`lattice logout`, or `down` on an ephemeral node).
    Logout,
    /// The node's network: its home relay and NAT behaviour (sent when they change).
    NetInfo {
        /// The relay the node is reached through first.
        #[serde(default)]
        home_relay: Option<crate::relay::RelayId>,
        /// NAT behaviour.
        nat: crate::relay::NatInfo,
    },
    /// A fresh token from the issuer the node joined through: extends its access to the
    /// new token's lifetime.
    IdToken {
        /// The token.
        id_token: IdToken,
    },
    /// Sign the node's user in again (`lattice login`): the coordinator answers with
    /// `LoginRequired` and, once the user has signed in (or failed to), `LoginResult`.
    Login,
    /// Ask for just-in-time access (`lattice request-access`): `ports` on `to` for
    /// `for_secs`, for `reason`. Answered by `AccessRequestResult` with the same `req`.
    RequestAccess {
        /// Chosen by the node to match the answer.
        req: u64,
        /// The destination, as the policy names it (`tag:prod`).
        to: String,
        /// Ports: `22,5432`, `8000-8099` or `*`.
        ports: String,
        /// How long, once approved.
        for_secs: u64,
        /// Why (shown to the approvers and kept in the audit log).
        reason: String,
    },
    /// The node's posture facts (sent when they change).
    Posture {
        /// Facts by attribute name (`node:os`, `node:diskEncrypted`, `fact:...`).
        facts: BTreeMap<String, AttrValue>,
    },
    /// How the node reaches each peer it has a tunnel with (sent when it changes, at most
    /// every few seconds): what admins see in `nodes list` and the web console.
    Paths {
        /// One entry per peer with a tunnel or an attempt at one, by peer id.
        paths: Vec<PeerPath>,
    },
    /// A message this build does not know.
    #[serde(other)]
    Unknown,
}

/// Most entries in one [`ClientMessage::Paths`] report (it stays well under the control
/// channel's message limit).
pub const MAX_REPORTED_PATHS: usize = 1024;

/// How a node reaches one peer, as it reports it to the coordinator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerPath {
    /// The peer.
    pub peer: NodeId,
    /// `direct`, `relay` or `none`.
    pub kind: PathKind,
    /// The peer's address, when direct.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addr: Option<SocketAddr>,
    /// The relay's name, when relayed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay: Option<String>,
    /// Why the path is not direct.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The kind of path a [`PeerPath`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PathKind {
    /// Straight over UDP.
    Direct,
    /// Through a relay.
    Relay,
    /// Not reachable (yet).
    None,
}

impl PathKind {
    /// The word `lattice status` uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Relay => "relay",
            Self::None => "none",
        }
    }
}

/// The value of a node attribute (posture fact or admin-set attribute).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum AttrValue {
    /// A boolean.
    Bool(bool),
    /// A number.
    Number(f64),
    /// A string.
    String(String),
}

impl AttrValue {
    /// Reads a value from text: `true`/`false`, a number, or else a string.
    pub fn from_text(s: &str) -> Self {
        match s {
            "true" => Self::Bool(true),
            "false" => Self::Bool(false),
            _ => s
                .parse::<f64>()
                .ok()
                .filter(|n| n.is_finite())
                .map_or_else(|| Self::String(s.to_owned()), Self::Number),
        }
    }
}

impl fmt::Display for AttrValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Bool(b) => write!(f, "{b}"),
            Self::Number(n) => write!(f, "{n}"),
            Self::String(s) => write!(f, "{s}"),
        }
    }
}

/// The node's opening message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// What the node understands.
    pub capability: CapabilityVersion,
    /// The node's WireGuard public key.
    pub node_key: NodeKey,
    /// Requested name; the coordinator makes it a unique DNS label.
    pub hostname: String,
    /// Present when the node is not yet registered (or was removed and is re-joining).
    #[serde(default)]
    pub auth_key: Option<AuthKey>,
    /// Reachable UDP endpoints, best first.
    #[serde(default)]
    pub endpoints: Vec<SocketAddr>,
    /// Operating system (`linux`).
    #[serde(default)]
    pub os: String,
    /// Client software version.
    #[serde(default)]
    pub client_version: String,
    /// Proof that the node holds the private half of `node_key` (64 hex digits; see
    /// `hybrid::StaticKeypair::possession_proof`): a MAC under the X25519 result of the node
    /// key and the coordinator's control key, over this session's handshake hash and the
    /// machine key. Without it a node could claim another node's key.
    #[serde(default)]
    pub node_key_proof: Option<String>,
    /// A signed token from an outside issuer the mesh trusts (workload identity federation):
    /// joins (or renews) the node without an auth key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id_token: Option<IdToken>,
    /// Subnets (and, as `0.0.0.0/0` and `::/0`, the internet) the node offers to route for
    /// the mesh (`lattice up --advertise-routes`, `--advertise-exit-node`); an admin or the
    /// policy's `autoApprovers` approves them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub advertised_routes: Vec<ipnet::IpNet>,
}

/// A JSON Web Token from an outside issuer (a Kubernetes service account, a CI system, a
/// SPIFFE JWT-SVID). It is a bearer credential: `Debug` never shows it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct IdToken(pub String);

impl fmt::Debug for IdToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IdToken(<{} bytes redacted>)", self.0.len())
    }
}

/// Coordinator -> node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMessage {
    /// Registration or resumption succeeded.
    Welcome(Welcome),
    /// A netmap (full or delta).
    Map(Box<MapResponse>),
    /// A fatal error; the coordinator closes the connection after sending it.
    Error {
        /// Machine-readable reason.
        code: ErrorCode,
        /// Human-readable detail.
        message: String,
    },
    /// The node's user must sign in at the identity provider: the node shows `url` (and
    /// `user_code`, which the page shows too) and waits. Sent in answer to a `Hello` from a
    /// machine that is not registered (or whose key expired) and has no auth key, and to
    /// `Login`.
    LoginRequired {
        /// The page to open in any browser.
        url: String,
        /// The short code the page shows, so the user can check it is their device's.
        user_code: String,
        /// When the sign-in link stops working (Unix seconds).
        expires_unix: i64,
    },
    /// How the sign-in asked for by `Login` ended: on success the node's key lasts until
    /// the new `key_expiry_unix` its next netmap carries.
    LoginResult {
        /// The user who signed in.
        #[serde(default)]
        user: Option<String>,
        /// Why the sign-in failed or could not start.
        #[serde(default)]
        error: Option<String>,
    },
    /// The answer to `RequestAccess`: the request's id, or why it was refused.
    AccessRequestResult {
        /// The node's `req`.
        req: u64,
        /// The filed request's id.
        #[serde(default)]
        id: Option<i64>,
        /// Why it was refused.
        #[serde(default)]
        error: Option<String>,
    },
    /// A message this build does not know.
    #[serde(other)]
    Unknown,
}

impl ServerMessage {
    /// Decodes a message: the same result as `serde_json::from_slice`, but a netmap (the
    /// large, frequent message) is decoded straight into its struct rather than through the
    /// buffered form serde gives internally tagged enums, which costs about twice as much.
    pub fn from_json(bytes: &[u8]) -> serde_json::Result<Self> {
        #[derive(Deserialize)]
        struct Tag<'a> {
            #[serde(rename = "type", borrow)]
            kind: Option<std::borrow::Cow<'a, str>>,
        }
        if let Ok(Tag { kind: Some(kind) }) = serde_json::from_slice::<Tag<'_>>(bytes)
            && kind == "map"
        {
            return serde_json::from_slice::<MapResponse>(bytes).map(|m| Self::Map(Box::new(m)));
        }
        serde_json::from_slice(bytes)
    }
}

/// The node's identity as the coordinator assigned it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    /// The node's id.
    pub node_id: NodeId,
    /// Unique short name.
    pub name: String,
    /// Fully qualified name.
    pub fqdn: String,
    /// Overlay addresses.
    pub addresses: Vec<IpAddr>,
    /// Whether this is the node's first registration (false when resuming).
    #[serde(default)]
    pub registered_now: bool,
    /// Whether the node is ephemeral.
    #[serde(default)]
    pub ephemeral: bool,
    /// The owning user, if any.
    #[serde(default)]
    pub user: Option<String>,
    /// ACL tags.
    #[serde(default)]
    pub tags: Vec<String>,
}

/// Why the coordinator refused a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The node is unknown and sent no auth key.
    AuthKeyRequired,
    /// The auth key does not exist or its secret is wrong.
    AuthKeyInvalid,
    /// The auth key has expired.
    AuthKeyExpired,
    /// The auth key was revoked.
    AuthKeyRevoked,
    /// The single-use auth key was already used.
    AuthKeyUsed,
    /// An admin removed this node.
    NodeRemoved,
    /// The node's key expired; it must re-join.
    NodeExpired,
    /// The node speaks a protocol the coordinator does not support.
    Unsupported,
    /// The request was malformed.
    BadRequest,
    /// The outside token was refused (the message names the failed check: signature,
    /// issuer, audience, expiry, a claim); a fresh, valid token may succeed.
    IdTokenRefused,
    /// The sign-in at the identity provider failed or was refused (the message says why).
    LoginFailed,
    /// The coordinator failed; retry later.
    Internal,
    /// A code this build does not know.
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    /// Whether retrying the same request later can succeed.
    pub fn is_retryable(self) -> bool {
        matches!(self, Self::Internal | Self::Unknown)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn can_deserialize_hello() {
        let json = format!(
            r#"{{"type": "hello", "capability": 1, "node_key": "nodekey:{}",
                "hostname": "db-1", "auth_key": "lk1-{}-{}-{}", "endpoints": ["10.0.0.1:41641"]}}"#,
            "aa".repeat(32),
            "11".repeat(16),
            "22".repeat(6),
            "33".repeat(20)
        );
        let ClientMessage::Hello(h) = serde_json::from_str(&json).unwrap() else {
            panic!("not a hello");
        };
        assert_eq!(h.capability, CapabilityVersion(1));
        assert_eq!(h.hostname, "db-1");
        assert_eq!(h.auth_key.unwrap().id_hex(), "222222222222");
        assert_eq!(h.os, "");
    }

    #[test]
    fn can_deserialize_welcome() {
        let json = r#"{"type": "welcome", "node_id": 4, "name": "db-1",
            "fqdn": "db-1.mesh.internal", "addresses": ["100.64.0.4", "fd7a:1::4"]}"#;
        let ServerMessage::Welcome(w) = serde_json::from_str(json).unwrap() else {
            panic!("not a welcome");
        };
        assert_eq!(w.node_id, NodeId(4));
        assert!(!w.registered_now);
    }

    #[test]
    fn from_json_decodes_like_serde_does() {
        let map = ServerMessage::Map(Box::new(MapResponse {
            seq: 7,
            peers_removed: vec![NodeId(3)],
            ..MapResponse::default()
        }));
        let texts = [
            serde_json::to_string(&map).unwrap(),
            // The tag after the fields, and unknown fields.
            r#"{"seq": 2, "future": [1], "type": "map"}"#.to_owned(),
            r#"{"type": "welcome", "node_id": 4, "name": "db-1",
                "fqdn": "db-1.mesh.internal", "addresses": ["100.64.0.4"]}"#
                .to_owned(),
            r#"{"type": "error", "code": "auth_key_used", "message": "used"}"#.to_owned(),
            r#"{"type": "nudge"}"#.to_owned(),
            // Malformed ones fail both ways.
            r#"{"type": "map", "seq": "x"}"#.to_owned(),
            r#"{"type": "map", "type": "welcome"}"#.to_owned(),
            r#"{"seq": 1}"#.to_owned(),
            "[".to_owned(),
        ];
        for t in texts {
            let a = ServerMessage::from_json(t.as_bytes());
            let b = serde_json::from_slice::<ServerMessage>(t.as_bytes());
            assert_eq!(a.as_ref().ok(), b.as_ref().ok(), "{t}");
            assert_eq!(a.is_err(), b.is_err(), "{t}");
        }
        assert_eq!(
            ServerMessage::from_json(serde_json::to_string(&map).unwrap().as_bytes()).unwrap(),
            map
        );
    }

    #[test]
    fn can_deserialize_error() {
        let json = r#"{"type": "error", "code": "auth_key_used", "message": "already used"}"#;
        let msg: ServerMessage = serde_json::from_str(json).unwrap();
        assert_eq!(
            msg,
            ServerMessage::Error {
                code: ErrorCode::AuthKeyUsed,
                message: "already used".into()
            }
        );
    }

    #[test]
    fn messages_round_trip() {
        let msgs = vec![
            ClientMessage::Endpoints {
                endpoints: vec!["[2001:db8::1]:5".parse().unwrap()],
            },
            ClientMessage::Logout,
            ClientMessage::Posture {
                facts: [
                    ("node:os".to_owned(), AttrValue::String("linux".into())),
                    ("node:diskEncrypted".to_owned(), AttrValue::Bool(false)),
                    ("fact:score".to_owned(), AttrValue::Number(7.5)),
                ]
                .into_iter()
                .collect(),
            },
        ];
        for m in msgs {
            let json = serde_json::to_string(&m).unwrap();
            assert_eq!(serde_json::from_str::<ClientMessage>(&json).unwrap(), m);
        }
        let s = ServerMessage::Map(Box::new(MapResponse {
            seq: 3,
            ..Default::default()
        }));
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<ServerMessage>(&json).unwrap(), s);
    }

    #[test]
    fn can_deserialize_posture_and_attr_values_from_text() {
        let json =
            r#"{"type": "posture", "facts": {"node:os": "linux", "fact:ok": true, "fact:n": 3}}"#;
        let ClientMessage::Posture { facts } = serde_json::from_str(json).unwrap() else {
            panic!("not posture");
        };
        assert_eq!(facts["fact:ok"], AttrValue::Bool(true));
        assert_eq!(facts["fact:n"], AttrValue::Number(3.0));
        assert_eq!(AttrValue::from_text("false"), AttrValue::Bool(false));
        assert_eq!(AttrValue::from_text("1.5"), AttrValue::Number(1.5));
        assert_eq!(AttrValue::from_text("on"), AttrValue::String("on".into()));
        assert_eq!(AttrValue::from_text("NaN"), AttrValue::String("NaN".into()));
    }

    #[test]
    fn unknown_variants_are_tolerated() {
        let c: ClientMessage = serde_json::from_str(r#"{"type": "teleport", "to": 1}"#).unwrap();
        assert_eq!(c, ClientMessage::Unknown);
        let s: ServerMessage = serde_json::from_str(r#"{"type": "nudge"}"#).unwrap();
        assert_eq!(s, ServerMessage::Unknown);
        let code: ErrorCode = serde_json::from_str(r#""quota_exceeded""#).unwrap();
        assert_eq!(code, ErrorCode::Unknown);
        assert!(code.is_retryable());
    }
}
