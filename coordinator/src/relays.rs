//! Relays: the embedded relay, tickets, and the relays admins register.
//!
//! Every node gets a relay ticket (signed by the coordinator's ticket key, valid
//! [`TICKET_TTL`]) in its netmap and a fresh one every [`TICKET_REFRESH`]. Standalone relays
//! check tickets with the ticket public key; the embedded relay also checks, every second,
//! that the node is still a member, so a removed node loses the relay at once.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use hybrid::ticket::{Ticket, TicketSigner};
use relay::{Authorizer, Relay, TicketAuthorizer};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tracing::{info, warn};
use wire::{CertPin, NodeKey, RelayId, RelayInfo, RelayKey, TicketKey};

use crate::audit::NewEntry;
use crate::db;
use crate::db::changes::Kind;
use crate::error::ApiError;
use crate::feed::{self, Feed};
use crate::hub::Hub;
use crate::state::{AppState, unix_now, unix_now_ms};

/// How long a ticket is valid: the longest a removed node can keep using a standalone relay.
pub const TICKET_TTL: Duration = Duration::from_secs(120);
/// How often nodes get a fresh ticket.
pub const TICKET_REFRESH: Duration = Duration::from_secs(60);
/// The embedded relay's id.
pub const EMBEDDED: RelayId = RelayId(0);
/// The relay-ticket signing key, in the state dir.
pub const TICKET_KEY_FILE: &str = "ticket.key";

/// Loads (or creates) the ticket signing key in `dir`.
pub fn load_or_create_signer(dir: &Path) -> anyhow::Result<TicketSigner> {
    let path = dir.join(TICKET_KEY_FILE);
    let (seed, created) = statefs::load_or_create_secret(&path, || {
        let mut seed = [0u8; 32];
        rand::Rng::fill_bytes(&mut rand::rng(), &mut seed);
        seed
    })?;
    if created {
        info!(path = %path.display(), "generated a new relay ticket key");
    }
    Ok(TicketSigner::from_seed(*seed))
}

/// A ticket for `key`, hex, valid from now for [`TICKET_TTL`].
pub fn issue(signer: &TicketSigner, key: &NodeKey) -> String {
    let t = signer.issue(Ticket {
        node_key: *key.as_bytes(),
        not_after: unix_now() + i64::try_from(TICKET_TTL.as_secs()).unwrap_or(120),
    });
    let mut s = String::with_capacity(t.len() * 2);
    wire::keys::push_hex(&mut s, &t);
    s
}

/// How long past its ticket's end the embedded relay serves a node that is still a member
/// while the database does not answer (nodes renew tickets through control sessions, and a
/// new session needs the database).
pub const DATABASE_OUTAGE_GRACE: Duration = Duration::from_secs(24 * 3600);

/// The embedded relay's authorizer: a valid ticket, and the node still a member; while the
/// database does not answer (and for two minutes after), a member whose ticket ran out is
/// still served, up to [`DATABASE_OUTAGE_GRACE`].
pub struct HubAuthorizer {
    hub: Arc<Hub>,
    tickets: TicketAuthorizer,
}

impl HubAuthorizer {
    /// An authorizer for tickets signed by `ticket_key`, for the members of `hub`, excusing
    /// expired tickets while `feed` says the database is away.
    pub fn new(hub: Arc<Hub>, ticket_key: TicketKey, feed: Arc<Feed>) -> Self {
        let members = Arc::clone(&hub);
        let grace = i64::try_from(DATABASE_OUTAGE_GRACE.as_secs()).unwrap_or(i64::MAX);
        let excuse = move |node_key: &[u8; 32], not_after: i64, now: i64| {
            now - not_after <= grace
                && feed.database_excuses_expiry(now)
                && is_member(&members, node_key)
        };
        Self {
            hub,
            tickets: TicketAuthorizer::with_excuse(ticket_key, Box::new(excuse)),
        }
    }
}

/// Whether `node_key` belongs to a node of the mesh.
fn is_member(hub: &Hub, node_key: &[u8; 32]) -> bool {
    hub.read()
        .node_by_key(&NodeKey::from_bytes(*node_key))
        .is_some()
}

impl Authorizer for HubAuthorizer {
    fn authorize(&self, node_key: &[u8; 32], ticket: &[u8], now: i64) -> Result<i64, String> {
        self.tickets.authorize(node_key, ticket, now)
    }

    fn still_vouched(&self, node_key: &[u8; 32]) -> bool {
        is_member(&self.hub, node_key)
    }

    fn serves_expired(&self, node_key: &[u8; 32], not_after: i64, now: i64) -> bool {
        self.tickets.serves_expired(node_key, not_after, now)
    }
}

/// Settings of the embedded relay.
#[derive(Debug, Clone)]
pub struct EmbeddedConfig {
    /// QUIC (UDP) listen address.
    pub quic_listen: SocketAddr,
    /// STUN listen addresses.
    pub stun_listen: Vec<SocketAddr>,
    /// The coordinator's HTTP listen address (the WebSocket fallback lives there).
    pub http_listen: SocketAddr,
    /// `--public-url`, to derive advertised addresses from.
    pub public_url: Option<String>,
    /// Threads serving QUIC.
    pub quic_threads: usize,
    /// What it forwards for each node at most (`None`: no limit).
    pub client_rate: Option<relay::ClientRate>,
}

/// The running embedded relay.
pub struct Embedded {
    /// The relay.
    pub relay: Relay,
    /// How nodes reach it.
    pub info: RelayInfo,
    /// TLS for its WebSocket fallback (the certificate its QUIC uses, pinned in the netmap),
    /// served on the coordinator's HTTP port next to plain HTTP.
    pub ws_tls: Arc<rustls::ServerConfig>,
    /// What its STUN server answered.
    pub stun: Arc<relay::stun::StunStats>,
    /// Its QUIC endpoints (closed when dropped).
    pub quic: relay::QuicListener,
}

/// Starts the embedded relay: QUIC on `quic_listen`, STUN on each `stun_listen`; the
/// WebSocket route is served by the coordinator's HTTP server ([`Relay::router`]).
pub async fn start_embedded(
    cfg: &EmbeddedConfig,
    state_dir: &Path,
    hub: Arc<Hub>,
    ticket_key: TicketKey,
    feed: Arc<Feed>,
) -> anyhow::Result<Embedded> {
    let (key, cert) = relay::identity::load_or_create(&state_dir.join("relay"))?;
    let relay = Relay::with_client_rate(
        key,
        Arc::new(HubAuthorizer::new(hub, ticket_key, feed)),
        cfg.client_rate,
    );
    let threads = cfg.quic_threads;
    let quic = relay::QuicListener::start(
        &relay,
        &cert,
        cfg.quic_listen,
        threads,
        relay::QuicLimits::default(),
    )
    .with_context(|| format!("binding the relay's QUIC port {}", cfg.quic_listen))?;
    let stats = Arc::new(relay::stun::StunStats::default());
    let mut stun = Vec::new();
    for addr in &cfg.stun_listen {
        let s = tokio::net::UdpSocket::bind(addr)
            .await
            .with_context(|| format!("binding STUN on {addr}"))?;
        stun.push(s.local_addr()?);
        tokio::spawn(relay::stun::serve(s, Arc::clone(&stats)));
    }
    let quic_addr = quic.local_addr();
    tokio::spawn(relay.clone().run_sweeper());
    let host = public_host(cfg.public_url.as_deref())
        .or_else(|| (!cfg.http_listen.ip().is_unspecified()).then(|| cfg.http_listen.ip()));
    let advertise = |a: SocketAddr| -> Option<SocketAddr> {
        if a.ip().is_unspecified() {
            host.map(|h| SocketAddr::new(h, a.port()))
        } else {
            Some(a)
        }
    };
    // The WebSocket is served over TLS on the HTTP port (plain HTTP and TLS share it), so its
    // URL is the public one with https.
    let websocket = match (&cfg.public_url, advertise(cfg.http_listen)) {
        (Some(u), _) => {
            let authority = u.split("://").nth(1).unwrap_or(u).trim_end_matches('/');
            Some(format!("https://{authority}/relay"))
        }
        (None, Some(a)) => Some(format!("https://{a}/relay")),
        (None, None) => None,
    };
    let info = RelayInfo {
        id: EMBEDDED,
        name: "coordinator".into(),
        key: RelayKey::from_bytes(relay.public_key()),
        quic: advertise(quic_addr),
        cert_sha256: Some(CertPin(cert.pin())),
        websocket,
        stun: stun.iter().filter_map(|a| advertise(*a)).collect(),
    };
    if info.quic.is_none() {
        warn!(
            "the embedded relay listens on an unspecified address and --public-url names no IP: nodes get only its WebSocket"
        );
    }
    info!(quic = ?info.quic, quic_threads = threads, stun = ?info.stun, websocket = ?info.websocket, "embedded relay started");
    let ws_tls = Arc::new(relay::tls::server_tls(&cert, &[b"http/1.1"])?);
    Ok(Embedded {
        relay,
        info,
        ws_tls,
        stun: stats,
        quic,
    })
}

/// The IP in `--public-url`, if it names one.
fn public_host(url: Option<&str>) -> Option<IpAddr> {
    let rest = url?.split("://").nth(1)?;
    let authority = rest.split('/').next()?;
    if let Ok(sa) = authority.parse::<SocketAddr>() {
        return Some(sa.ip());
    }
    let host = authority.rsplit_once(':').map_or(authority, |(h, _)| h);
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .ok()
}

/// A relay registration request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AddRelay {
    /// Name.
    pub name: String,
    /// Its key (printed by `lattice-relay serve`).
    pub key: RelayKey,
    /// QUIC address.
    #[serde(default)]
    pub quic: Option<SocketAddr>,
    /// Certificate pin.
    #[serde(default)]
    pub cert_sha256: Option<CertPin>,
    /// WebSocket URL.
    #[serde(default)]
    pub websocket: Option<String>,
    /// STUN addresses.
    #[serde(default)]
    pub stun: Vec<SocketAddr>,
}

/// Registers a standalone relay (audited); nodes learn of it at once.
pub async fn add(st: &AppState, req: AddRelay, actor: &str) -> Result<RelayInfo, ApiError> {
    let name_ok = !req.name.is_empty()
        && req.name.len() <= 63
        && req
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if !name_ok {
        return Err(ApiError::BadRequest(format!(
            "invalid relay name {:?}: use letters, digits, - and _",
            req.name
        )));
    }
    if req.quic.is_some() != req.cert_sha256.is_some() {
        return Err(ApiError::BadRequest(
            "--quic and --cert-sha256 go together (nodes pin the QUIC certificate)".into(),
        ));
    }
    if req.quic.is_none() && req.websocket.is_none() {
        return Err(ApiError::BadRequest(
            "a relay needs --quic or --websocket (and --cert-sha256)".into(),
        ));
    }
    if let Some(u) = &req.websocket
        && !u.starts_with("https://")
    {
        return Err(ApiError::BadRequest(format!(
            "--websocket must be an https:// URL (the relay serves its WebSocket over TLS \
             with its pinned certificate), not {u:?}"
        )));
    }
    if req.cert_sha256.is_none() {
        return Err(ApiError::BadRequest(
            "a relay needs --cert-sha256 (nodes pin its certificate for QUIC and the \
             WebSocket)"
                .into(),
        ));
    }
    if req.stun.len() > 4 {
        return Err(ApiError::BadRequest("at most 4 STUN addresses".into()));
    }
    let info = RelayInfo {
        id: RelayId(0),
        name: req.name,
        key: req.key,
        quic: req.quic,
        cert_sha256: req.cert_sha256,
        websocket: req.websocket,
        stun: req.stun,
    };
    let mut tx = db::begin_write(&st.db).await?;
    let stored = db::relays::insert(&mut tx, &info, actor, unix_now())
        .await
        .map_err(|e| match e {
            db::DbError::Sqlx(sqlx::Error::Database(d)) if d.is_unique_violation() => {
                ApiError::Conflict(format!("a relay named {:?} exists", info.name))
            }
            other => other.into(),
        })?;
    db::audit::append(
        &mut tx,
        st.audit.key(),
        NewEntry::new(
            actor,
            "relay.add",
            &stored.name,
            json!({"id": stored.id.0, "key": stored.key.to_text(), "quic": stored.quic,
                   "websocket": stored.websocket, "stun": stored.stun}),
        ),
        unix_now_ms(),
    )
    .await?;
    let seq = feed::note(&mut tx, Kind::Relays, None, None).await?;
    feed::commit(st, tx, seq).await?;
    Ok(stored)
}

/// Every relay nodes are told about.
pub fn list(st: &AppState) -> Vec<RelayInfo> {
    st.hub.read().relays().as_ref().clone()
}

/// The embedded relay's sessions and counters.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RelayStats {
    /// Nodes with a session (by name; the key when the node is unknown).
    pub sessions: Vec<String>,
    /// Counters.
    pub counters: serde_json::Value,
}

/// The embedded relay's sessions and counters.
pub fn stats(st: &AppState) -> Result<RelayStats, ApiError> {
    let Some(relay) = &st.relay else {
        return Err(ApiError::NotFound(
            "the embedded relay is off (--no-embedded-relay)".into(),
        ));
    };
    let hub = st.hub.read();
    let sessions = relay
        .session_keys()
        .into_iter()
        .map(|k| {
            let key = NodeKey::from_bytes(k);
            hub.node_by_key(&key)
                .and_then(|id| hub.node(id))
                .map_or_else(|| key.to_string(), |n| n.record.name.clone())
        })
        .collect();
    Ok(RelayStats {
        sessions,
        counters: serde_json::to_value(relay.stats()).unwrap_or_default(),
    })
}

/// Removes a registered relay (audited).
pub async fn remove(st: &AppState, name: &str, actor: &str) -> Result<(), ApiError> {
    let mut tx = db::begin_write(&st.db).await?;
    let Some(id) = db::relays::remove(&mut tx, name).await? else {
        return Err(ApiError::NotFound(format!(
            "no registered relay named {name:?} (the embedded relay is turned off with --no-embedded-relay)"
        )));
    };
    db::audit::append(
        &mut tx,
        st.audit.key(),
        NewEntry::new(actor, "relay.remove", name, json!({"id": id.0})),
        unix_now_ms(),
    )
    .await?;
    let seq = feed::note(&mut tx, Kind::Relays, None, None).await?;
    feed::commit(st, tx, seq).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_public_host_comes_from_the_url() {
        assert_eq!(
            public_host(Some("http://198.51.100.1:8080")),
            Some("198.51.100.1".parse().unwrap())
        );
        assert_eq!(
            public_host(Some("https://[2001:db8::1]:443/x")),
            Some("2001:db8::1".parse().unwrap())
        );
        assert_eq!(public_host(Some("http://coord.example:8080")), None);
        assert_eq!(public_host(None), None);
    }

    #[test]
    fn tickets_verify_under_the_ticket_key_for_their_ttl() {
        let s = TicketSigner::from_seed([3; 32]);
        let key = NodeKey::from_bytes([8; 32]);
        let hex = issue(&s, &key);
        let bytes: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        let t = hybrid::ticket::verify(&s.public(), &bytes, unix_now()).unwrap();
        assert_eq!(t.node_key, [8; 32]);
        assert!(t.not_after >= unix_now() + 119);
        assert!(hybrid::ticket::verify(&s.public(), &bytes, unix_now() + 121).is_err());
    }
}
