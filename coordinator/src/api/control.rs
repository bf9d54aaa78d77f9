//! The control channel: a hybrid Noise session over a WebSocket at `/control`.
//!
//! 1. The node sends Noise message 1 (one binary WebSocket message); the coordinator answers
//!    with message 2. The machine key the node proved here is its identity for the session.
//! 2. Every later binary message is a channel frame. The node sends `Hello`; the coordinator
//!    registers or resumes it and answers `Welcome` (or `Error` and closes).
//! 3. The coordinator streams netmaps (full, then deltas) whenever the mesh changes, and
//!    handles `Endpoints`, `Posture` and `Logout` from the node.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, bail};
use axum::Extension;
use axum::Router;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hybrid::{Channel, Psk, Purpose, ResponderHandshake};
use rand::{SeedableRng, rngs::StdRng};
use tokio::time::{Instant, interval};
use tracing::{debug, info, warn};
use wire::{ClientMessage, ErrorCode, Hello, MachineKey, ServerMessage, Welcome};

use crate::admission::PreAuth;
use crate::db;
use crate::db::changes::Kind;
use crate::feed;
use crate::model::NodeRecord;
use crate::netmap::{SentMap, next_map};
use crate::register::{self, RegisterError};
use crate::state::{AppState, unix_now};
use crate::{ops, relays};

/// How long a node has to complete the handshake and send `Hello`.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a handshake may wait for a free slot on the handshake pool.
const HANDSHAKE_QUEUE: Duration = Duration::from_secs(2);
/// Largest message a node may send: nodes send hellos, endpoints, posture and netinfo, all
/// small. (The coordinator's own messages, netmaps, may be far larger.)
const MAX_CLIENT_MESSAGE: usize = 256 << 10;
/// The coordinator pings every this often...
const PING_INTERVAL: Duration = Duration::from_secs(10);
/// ...and drops a session that has been silent this long.
const IDLE_TIMEOUT: Duration = Duration::from_secs(35);
/// Largest WebSocket message: one Noise frame.
const MAX_WS_MESSAGE: usize = 65_535;
/// A session's WebSocket read buffer. tungstenite zero-fills the whole buffer before each
/// read, and its default (128 KiB) held per session made a coordinator with 5,000 nodes
/// spend 640 MB on buffers; control messages are small, and a larger frame grows it.
const WS_READ_BUFFER: usize = 8 << 10;

/// Control routes.
pub fn router() -> Router<AppState> {
    Router::new().route("/control", get(upgrade))
}

async fn upgrade(
    State(st): State<AppState>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    slot: Option<Extension<relay::http::ConnSlot>>,
    ws: WebSocketUpgrade,
) -> Response {
    let ip = relay::http::peer_ip(peer.as_ref().map(|e| &e.0));
    let pre_auth = match st.admission.begin(ip, std::time::Instant::now()) {
        Ok(p) => p,
        Err(refusal) => {
            debug!(%ip, %refusal, "control session refused");
            return (StatusCode::TOO_MANY_REQUESTS, refusal.to_string()).into_response();
        }
    };
    ws.max_message_size(MAX_WS_MESSAGE)
        .max_frame_size(MAX_WS_MESSAGE)
        .read_buffer_size(WS_READ_BUFFER)
        .write_buffer_size(WS_READ_BUFFER)
        .on_upgrade(move |socket| async move {
            // The connection counts against the listener's limits while the session lasts.
            let _slot = slot;
            if let Err(e) = session(st, socket, pre_auth).await {
                debug!(error = %format!("{e:#}"), "control session ended with an error");
            }
        })
}

struct Conn {
    socket: WebSocket,
    channel: Channel,
}

impl Conn {
    async fn send(&mut self, msg: &ServerMessage) -> anyhow::Result<()> {
        let json = serde_json::to_vec(msg).context("encoding a server message")?;
        for frame in self.channel.seal(&json)? {
            self.socket.send(Message::Binary(frame.into())).await?;
        }
        Ok(())
    }

    async fn refuse(&mut self, code: ErrorCode, message: String) -> anyhow::Result<()> {
        self.send(&ServerMessage::Error { code, message }).await?;
        let _ = self.socket.send(Message::Close(None)).await;
        Ok(())
    }

    /// Reads the next application message; `None` when the peer closed.
    async fn recv(&mut self) -> anyhow::Result<Option<ClientMessage>> {
        loop {
            let Some(frame) = self.socket.recv().await else {
                return Ok(None);
            };
            match frame? {
                Message::Binary(b) => {
                    if let Some(msg) = self.channel.open(&b)? {
                        return Ok(Some(serde_json::from_slice(&msg)?));
                    }
                }
                Message::Close(_) => return Ok(None),
                Message::Ping(_) | Message::Pong(_) => {}
                Message::Text(_) => bail!("text frame on the control channel"),
            }
        }
    }
}

async fn session(st: AppState, mut socket: WebSocket, pre_auth: PreAuth) -> anyhow::Result<()> {
    let deadline = Instant::now() + HELLO_TIMEOUT;
    let (mut channel, machine, session_hash) =
        tokio::time::timeout_at(deadline, handshake(&st, &mut socket))
            .await
            .context("handshake timed out")??;
    channel.limit_inbound(MAX_CLIENT_MESSAGE);
    let mut conn = Conn { socket, channel };
    let hello = match tokio::time::timeout_at(deadline, conn.recv())
        .await
        .context("hello timed out")??
    {
        Some(ClientMessage::Hello(h)) => h,
        Some(_) => bail!("first message was not a hello"),
        None => return Ok(()),
    };
    pre_auth.release();
    if hello.capability < wire::CapabilityVersion(1) {
        return conn
            .refuse(ErrorCode::Unsupported, "client too old".into())
            .await;
    }
    if !proves_node_key(&st, &hello, &session_hash, &machine) {
        info!(machine = %machine, node_key = %hello.node_key, "refused a node that did not prove its node key");
        return conn
            .refuse(
                ErrorCode::BadRequest,
                "the node did not prove it holds its node key".into(),
            )
            .await;
    }
    let (record, registered_now) =
        match register::register_or_resume(&st, &machine, &hello, unix_now()).await {
            Ok(r) => r,
            Err(RegisterError::Refused(code, message)) => {
                info!(machine = %machine, ?code, %message, "refused a node");
                return conn.refuse(code, message).await;
            }
            Err(RegisterError::Db(e)) => {
                let _ = conn
                    .refuse(ErrorCode::Internal, "internal error; retry later".into())
                    .await;
                return Err(e.into());
            }
        };
    if registered_now {
        info!(node = %record.name, id = %record.id, ip = %record.ipv4, "node registered");
    } else {
        info!(node = %record.name, id = %record.id, "node resumed");
    }
    let result = stream(&st, &mut conn, &record, registered_now).await;
    if record.ephemeral {
        schedule_ephemeral_collection(st.clone(), record.id);
    }
    result
}

/// Whether `hello` carries a valid proof that the node holds the private half of its node
/// key, bound to this session and machine (a node must not claim another node's key).
fn proves_node_key(st: &AppState, hello: &Hello, session: &[u8; 32], machine: &MachineKey) -> bool {
    let Some(proof) = hello
        .node_key_proof
        .as_deref()
        .and_then(wire::keys::parse_hex::<32>)
    else {
        return false;
    };
    st.control_key.check_possession_proof(
        hello.node_key.as_bytes(),
        session,
        machine.as_bytes(),
        &proof,
    )
}

async fn handshake(
    st: &AppState,
    socket: &mut WebSocket,
) -> anyhow::Result<(Channel, MachineKey, [u8; 32])> {
    let msg1 = loop {
        match socket.recv().await {
            Some(Ok(Message::Binary(b))) => break b,
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            Some(Ok(_)) | None => bail!("connection closed before the handshake"),
            Some(Err(e)) => return Err(e.into()),
        }
    };
    // A message 1 seen before costs nothing more (a recorded one replayed forever would
    // otherwise cost a full handshake each time).
    st.admission.first_sight(&msg1)?;
    let Some(permit) = st.admission.handshake_slot(HANDSHAKE_QUEUE).await else {
        bail!("too many handshakes in progress");
    };
    let control_key = st.control_key.clone();
    let (msg2, done, machine) = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        let mut rng = StdRng::from_rng(&mut rand::rng());
        let (responder, init) =
            ResponderHandshake::read_initiation(&mut rng, Purpose::Control, &control_key, &msg1)?;
        let (msg2, done) = responder.respond(&mut rng, &Psk::zero(), &[])?;
        anyhow::Ok((msg2, done, MachineKey::from_bytes(init.remote_static)))
    })
    .await
    .context("the handshake task failed")??;
    socket.send(Message::Binary(msg2.into())).await?;
    let session_hash = *done.handshake_hash();
    Ok((done.into_channel(), machine, session_hash))
}

async fn stream(
    st: &AppState,
    conn: &mut Conn,
    record: &NodeRecord,
    registered_now: bool,
) -> anyhow::Result<()> {
    let mut guard = st.hub.attach(record.id);
    conn.send(&ServerMessage::Welcome(Welcome {
        node_id: record.id,
        name: record.name.clone(),
        fqdn: format!("{}.{}", record.name, st.mesh.domain),
        addresses: record.addresses(),
        registered_now,
        ephemeral: record.ephemeral,
        user: record.user.clone(),
        tags: record.tags.clone(),
    }))
    .await?;
    let mut sent = SentMap::default();
    let mut ping = interval(PING_INTERVAL);
    let mut ticket_tick = interval(relays::TICKET_REFRESH);
    ticket_tick.tick().await;
    let mut ticket_due = true;
    let mut last_heard = Instant::now();
    loop {
        let ticket = ticket_due.then(|| relays::issue(&st.tickets, &record.node_key));
        ticket_due = false;
        let pending = guard.inbox.take();
        let next = {
            let hub = st.hub.read();
            next_map(
                &mut sent,
                &hub.snapshot(unix_now()),
                record.id,
                ticket,
                &pending,
            )
        };
        if let Some(map) = next {
            debug!(node = %record.name, seq = map.seq, full = map.is_full(), "sending netmap");
            conn.send(&ServerMessage::Map(Box::new(map))).await?;
        }
        tokio::select! {
            () = guard.inbox.changed() => {}
            kick = guard.kicks.recv() => {
                if let Some(k) = kick {
                    info!(node = %record.name, code = ?k.code, "closing control session");
                    return conn.refuse(k.code, k.message).await;
                }
            }
            frame = conn.socket.recv() => {
                last_heard = Instant::now();
                let Some(frame) = frame else { return Ok(()) };
                match frame? {
                    Message::Binary(b) => {
                        if let Some(msg) = conn.channel.open(&b)? {
                            let msg: ClientMessage = serde_json::from_slice(&msg)
                                .context("decoding a client message")?;
                            if handle_client_message(st, record, msg).await? {
                                return Ok(());
                            }
                        }
                    }
                    Message::Close(_) => return Ok(()),
                    Message::Ping(_) | Message::Pong(_) => {}
                    Message::Text(_) => bail!("text frame on the control channel"),
                }
            }
            _ = ticket_tick.tick() => ticket_due = true,
            _ = ping.tick() => {
                if last_heard.elapsed() > IDLE_TIMEOUT {
                    warn!(node = %record.name, "control session idle; dropping it");
                    return Ok(());
                }
                conn.socket.send(Message::Ping(Vec::new().into())).await?;
            }
        }
    }
}

/// Handles one message; returns true when the session should end.
async fn handle_client_message(
    st: &AppState,
    record: &NodeRecord,
    msg: ClientMessage,
) -> anyhow::Result<bool> {
    match msg {
        ClientMessage::Endpoints { endpoints } => {
            if endpoints.len() > 32 {
                bail!("too many endpoints");
            }
            let mut tx = db::begin_write(&st.db).await?;
            db::nodes::set_endpoints(&mut tx, record.id, &endpoints, unix_now()).await?;
            let seq = feed::note(&mut tx, Kind::Node, Some(record.id), None).await?;
            feed::commit(st, tx, seq).await?;
            Ok(false)
        }
        ClientMessage::Logout => {
            info!(node = %record.name, "node logged out");
            ops::remove_node(
                st,
                &record.name,
                &format!("node:{}", record.name),
                "logged out",
            )
            .await
            .map_err(|e| anyhow::anyhow!("logout: {e}"))?;
            Ok(true)
        }
        ClientMessage::NetInfo { home_relay, nat } => {
            let known =
                home_relay.is_none_or(|id| st.hub.read().relays().iter().any(|r| r.id == id));
            if !known {
                debug!(node = %record.name, ?home_relay, "ignoring an unknown home relay");
                return Ok(false);
            }
            let mut tx = db::begin_write(&st.db).await?;
            db::nodes::set_netinfo(&mut tx, record.id, home_relay, &nat).await?;
            let seq = feed::note(&mut tx, Kind::Node, Some(record.id), None).await?;
            feed::commit(st, tx, seq).await?;
            Ok(false)
        }
        ClientMessage::Posture { facts } => {
            if let Err(e) = ops::policy::record_posture(st, record.id, facts).await {
                warn!(node = %record.name, error = %e, "could not record a posture report");
            }
            Ok(false)
        }
        ClientMessage::IdToken { id_token } => {
            // A fresh token from the node's issuer extends its access; a refused one leaves
            // the current expiry in place (the node is cut off when it passes).
            let now = unix_now();
            let admitted = ops::federation::admit_token(st, &id_token.0, now).await;
            let a = match admitted {
                Ok(a) => a,
                Err(e) => {
                    warn!(node = %record.name, error = %e, "renewal token refused");
                    return Ok(false);
                }
            };
            let mut tx = db::begin_write(&st.db).await?;
            if let Err(e) = register::renew(st, &mut tx, record, &a, now).await {
                warn!(node = %record.name, error = %e, "renewal token refused");
                return Ok(false);
            }
            let seq = feed::note(&mut tx, Kind::Node, Some(record.id), None).await?;
            feed::commit(st, tx, seq).await?;
            info!(node = %record.name, until = a.until, "access renewed by a fresh id token");
            Ok(false)
        }
        ClientMessage::Hello(_) => bail!("second hello on one session"),
        ClientMessage::Unknown => Ok(false),
    }
}

/// Removes an ephemeral node if it has not come back within the configured timeout.
pub fn schedule_ephemeral_collection(st: AppState, id: wire::NodeId) {
    tokio::spawn(async move {
        tokio::time::sleep(st.ephemeral_timeout).await;
        if let Err(e) = ops::collect_ephemeral(&st, id).await {
            warn!(node = %id, error = %e, "could not remove an ephemeral node");
        }
    });
}
