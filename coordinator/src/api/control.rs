//! The control channel: a hybrid Noise session over a WebSocket at `/control`.
//!
//! 1. The node sends Noise message 1 (one binary WebSocket message); the coordinator answers
//!    with message 2. The machine key the node proved here is its identity for the session.
//! 2. Every later binary message is a channel frame. The node sends `Hello`; the coordinator
//!    registers or resumes it and answers `Welcome` (or `Error` and closes).
//! 3. The coordinator streams netmaps (full, then deltas) whenever the mesh changes, and
//!    handles what the node reports about itself (`Endpoints`, `NetInfo`, `Paths`,
//!    `Posture`, `IdToken`; at a bounded pace, [`crate::pacer`]), its access requests and
//!    `Logout`.

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
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
use crate::bucket::Bucket;
use crate::db;
use crate::db::changes::Kind;
use crate::feed;
use crate::model::NodeRecord;
use crate::netmap::{SentMap, next_map};
use crate::pacer::{Offer, Pacer, ReportKind};
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
/// Most peer paths kept from one report (nodes send at most [`wire::MAX_REPORTED_PATHS`]).
const MAX_REPORTED_PATHS: usize = wire::MAX_REPORTED_PATHS;
/// Longest relay name or reason kept from a path report.
const MAX_PATH_TEXT: usize = 256;
/// A session's WebSocket read buffer. tungstenite zero-fills the whole buffer before each
/// read, and its default (128 KiB) held per session made a coordinator with 5,000 nodes
/// spend 640 MB on buffers; control messages are small, and a larger frame grows it.
const WS_READ_BUFFER: usize = 8 << 10;

/// Reports of one kind (endpoints, netinfo, paths, posture, id tokens) a session applies at
/// once before it applies one per [`REPORT_INTERVAL`] (the latest of those that came).
pub const REPORT_BURST: u32 = 5;
/// See [`REPORT_BURST`].
pub const REPORT_INTERVAL: Duration = Duration::from_secs(1);
/// Access requests a session files at once before it files one per [`ACCESS_INTERVAL`] (and
/// answers the others that they come too fast).
pub const ACCESS_BURST: u32 = 10;
/// See [`ACCESS_BURST`].
pub const ACCESS_INTERVAL: Duration = Duration::from_secs(6);

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
            if let Err(e) = session(st, socket, pre_auth, ip).await {
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

async fn session(
    st: AppState,
    mut socket: WebSocket,
    pre_auth: PreAuth,
    ip: std::net::IpAddr,
) -> anyhow::Result<()> {
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
    let mut signed_in = None;
    let (record, registered_now) = loop {
        let result =
            register::register_or_resume(&st, &machine, &hello, signed_in.as_ref(), unix_now())
                .await;
        match result {
            Ok(r) => {
                let counter = if r.1 {
                    &st.counters.registered
                } else {
                    &st.counters.resumed
                };
                counter.fetch_add(1, Relaxed);
                break r;
            }
            Err(RegisterError::LoginRequired) if signed_in.is_none() => {
                match wait_for_sign_in(&st, &mut conn, &machine, &hello.hostname, ip).await? {
                    SignInWait::Done(s) => signed_in = Some(s),
                    SignInWait::Refused(code, message) => {
                        info!(machine = %machine, %message, "sign-in failed");
                        return conn.refuse(code, message).await;
                    }
                    SignInWait::Gone => return Ok(()),
                }
            }
            Err(RegisterError::LoginRequired) => {
                return conn
                    .refuse(
                        ErrorCode::Internal,
                        "the sign-in did not register the node".into(),
                    )
                    .await;
            }
            Err(RegisterError::Refused(code, message)) => {
                st.counters.refused.fetch_add(1, Relaxed);
                info!(machine = %machine, ?code, %message, "refused a node");
                return conn.refuse(code, message).await;
            }
            Err(RegisterError::Db(e)) => {
                let _ = conn
                    .refuse(ErrorCode::Internal, "internal error; retry later".into())
                    .await;
                return Err(e.into());
            }
        }
    };
    if registered_now {
        info!(node = %record.name, id = %record.id, ip = %record.ipv4, "node registered");
    } else {
        info!(node = %record.name, id = %record.id, "node resumed");
    }
    let result = stream(&st, &mut conn, &record, registered_now, ip).await;
    if record.ephemeral {
        schedule_ephemeral_collection(st.clone(), record.id);
    }
    result
}

enum SignInWait {
    Done(ops::people::SignedIn),
    Refused(ErrorCode, String),
    Gone,
}

/// The machine may join once its user signs in: shows the node a sign-in link (the one it
/// already has, if it reconnected) and waits until the sign-in is done, refused or expired,
/// or the node goes away.
async fn wait_for_sign_in(
    st: &AppState,
    conn: &mut Conn,
    machine: &MachineKey,
    hostname: &str,
    ip: std::net::IpAddr,
) -> anyhow::Result<SignInWait> {
    let (login, url) =
        match ops::people::start(st, machine, hostname, &ip.to_string(), unix_now()).await {
            Ok(l) => l,
            Err(ops::people::StartError::Db(e)) => return Err(e.into()),
            Err(e) => return Ok(SignInWait::Refused(ErrorCode::LoginFailed, e.to_string())),
        };
    info!(machine = %machine, %hostname, user_code = %login.login.user_code, "waiting for a sign-in");
    conn.send(&ServerMessage::LoginRequired {
        url,
        user_code: login.login.user_code.clone(),
        expires_unix: login.login.expires_at,
    })
    .await?;
    let state = login.login.state;
    let outcome = {
        let wait = ops::people::wait(st, &state);
        tokio::pin!(wait);
        let mut ping = interval(PING_INTERVAL);
        loop {
            tokio::select! {
                o = &mut wait => break o?,
                // Endpoints and posture sent meanwhile are sent again after the welcome.
                msg = conn.recv() => if msg?.is_none() {
                    return Ok(SignInWait::Gone);
                },
                _ = ping.tick() => conn.socket.send(Message::Ping(Vec::new().into())).await?,
            }
        }
    };
    Ok(match outcome {
        ops::people::Outcome::Done(s) => {
            ops::people::forget(st, &state).await?;
            SignInWait::Done(s)
        }
        ops::people::Outcome::Failed(why) => {
            ops::people::forget(st, &state).await?;
            SignInWait::Refused(ErrorCode::LoginFailed, format!("sign-in refused: {why}"))
        }
        // The node comes back for a fresh link.
        ops::people::Outcome::Expired | ops::people::Outcome::Pending => SignInWait::Refused(
            ErrorCode::Internal,
            "the sign-in link expired; reconnect for a new one".into(),
        ),
    })
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
    ip: std::net::IpAddr,
) -> anyhow::Result<()> {
    let mut guard = st.hub.attach(record.id);
    // A sign-in the node asked for (`lattice login`) runs beside the session and reports
    // through `notices`; it ends with the session.
    let (notice_tx, mut notices) = tokio::sync::mpsc::channel::<ServerMessage>(4);
    let mut sign_in: Option<AbortOnDrop> = None;
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
    let _open = crate::metrics::SessionGauge::open(&st.counters);
    let mut sent = SentMap::default();
    let mut ping = interval(PING_INTERVAL);
    let mut ticket_tick = interval(relays::TICKET_REFRESH);
    ticket_tick.tick().await;
    let mut ticket_due = true;
    let mut last_heard = Instant::now();
    let started = std::time::Instant::now();
    let mut reports = Pacer::new(REPORT_BURST, REPORT_INTERVAL, started);
    let mut access = Bucket::new(ACCESS_BURST, ACCESS_INTERVAL, started);
    loop {
        let ticket = ticket_due.then(|| relays::issue(&st.tickets, &record.node_key));
        ticket_due = false;
        let pending = guard.inbox.take();
        let built = std::time::Instant::now();
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
        st.counters.netmap(
            built.elapsed(),
            next.as_ref().map(wire::netmap::MapResponse::is_full),
        );
        if let Some(map) = next {
            debug!(node = %record.name, seq = map.seq, full = map.is_full(), "sending netmap");
            conn.send(&ServerMessage::Map(Box::new(map))).await?;
        }
        let report_due = reports.next_due();
        tokio::select! {
            () = guard.inbox.changed() => {}
            () = sleep_until(report_due) => {
                for msg in reports.take_due(std::time::Instant::now()) {
                    if apply_report(st, record, &mut reports, msg).await? {
                        return Ok(());
                    }
                }
            }
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
                            if let Some(kind) = report_kind(&msg) {
                                match reports.offer(kind, msg, std::time::Instant::now()) {
                                    Offer::Apply(msg) => {
                                        if apply_report(st, record, &mut reports, msg).await? {
                                            return Ok(());
                                        }
                                    }
                                    Offer::Held { superseded } => {
                                        st.counters.reports_held.fetch_add(1, Relaxed);
                                        if superseded {
                                            st.counters.reports_superseded.fetch_add(1, Relaxed);
                                        }
                                    }
                                }
                                continue;
                            }
                            if let ClientMessage::RequestAccess { req, to, ports, for_secs, reason } = msg {
                                if !access.try_take(std::time::Instant::now()) {
                                    st.counters.access_requests_throttled.fetch_add(1, Relaxed);
                                    let error = format!(
                                        "too many access requests from this node: at most \
                                         {ACCESS_BURST} at once, then one every {} s",
                                        ACCESS_INTERVAL.as_secs()
                                    );
                                    conn.send(&ServerMessage::AccessRequestResult {
                                        req,
                                        id: None,
                                        error: Some(error),
                                    })
                                    .await?;
                                    continue;
                                }
                                let filed = ops::access::file(
                                    st, record, &to, &ports, for_secs, &reason, unix_now(),
                                )
                                .await;
                                let (id, error) = match filed {
                                    Ok(Ok(id)) => (Some(id), None),
                                    Ok(Err(e)) => (None, Some(e)),
                                    // The database is away: the node is told, the session stays.
                                    Err(e) => {
                                        warn!(node = %record.name, error = %e, "could not file an access request");
                                        (None, Some("the coordinator cannot file it now; try again later".into()))
                                    }
                                };
                                conn.send(&ServerMessage::AccessRequestResult { req, id, error })
                                    .await?;
                                continue;
                            }
                            if matches!(msg, ClientMessage::Login) {
                                if sign_in.as_ref().is_none_or(AbortOnDrop::is_finished) {
                                    sign_in = Some(AbortOnDrop(tokio::spawn(sign_in_again(
                                        st.clone(),
                                        record.clone(),
                                        ip,
                                        notice_tx.clone(),
                                    ))));
                                }
                                continue;
                            }
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
            Some(notice) = notices.recv() => conn.send(&notice).await?,
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

/// Acts on a report a node sent about itself. When the database fails (it is restarting,
/// or unreachable for a while) the session goes on and the report waits to be tried again
/// at the report pace: only what the node does wrong ends its session. (Ending it made the
/// node reconnect into a coordinator that could not take new sessions either, and a node
/// without a session gets no fresh relay tickets.)
async fn apply_report(
    st: &AppState,
    record: &NodeRecord,
    reports: &mut Pacer<ClientMessage>,
    msg: ClientMessage,
) -> anyhow::Result<bool> {
    let again = report_kind(&msg).map(|kind| (kind, msg.clone()));
    // Counted before it is acted on: a peer may see its effect before this returns.
    st.counters.reports_applied.fetch_add(1, Relaxed);
    match handle_client_message(st, record, msg).await {
        Err(e) if store_failed(&e) => {
            st.counters.reports_applied.fetch_sub(1, Relaxed);
            st.counters.reports_failed.fetch_add(1, Relaxed);
            debug!(node = %record.name, error = %format!("{e:#}"), "could not store a report; it waits to be tried again");
            if let Some((kind, msg)) = again {
                reports.retry(kind, msg);
            }
            Ok(false)
        }
        done => done,
    }
}

/// The database failed to store something (as opposed to a node sending what it must not).
#[derive(Debug, thiserror::Error)]
#[error("the database could not store it: {0}")]
struct StoreFailed(String);

/// Whether `e` is the database failing.
fn store_failed(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.is::<StoreFailed>()
            || matches!(c.downcast_ref::<db::DbError>(), Some(db::DbError::Sqlx(_)))
    })
}

/// Which kind of report about itself a node's message is, if it is one.
fn report_kind(msg: &ClientMessage) -> Option<ReportKind> {
    Some(match msg {
        ClientMessage::Endpoints { .. } => ReportKind::Endpoints,
        ClientMessage::NetInfo { .. } => ReportKind::NetInfo,
        ClientMessage::Paths { .. } => ReportKind::Paths,
        ClientMessage::Posture { .. } => ReportKind::Posture,
        ClientMessage::IdToken { .. } => ReportKind::IdToken,
        _ => return None,
    })
}

/// Sleeps until `due`, or for ever when there is nothing to wait for.
async fn sleep_until(due: Option<std::time::Instant>) {
    match due {
        Some(due) => tokio::time::sleep_until(Instant::from_std(due)).await,
        None => std::future::pending().await,
    }
}

/// Aborts a task when dropped (a session's sign-in ends with the session).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl AbortOnDrop {
    fn is_finished(&self) -> bool {
        self.0.is_finished()
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// `lattice login` on a registered node: its user signs in again, and the node's key then
/// lasts a new lifetime with the sign-in's groups. The outcome goes to the node as
/// `LoginResult` (the session stays up whatever happens).
async fn sign_in_again(
    st: AppState,
    record: NodeRecord,
    ip: std::net::IpAddr,
    notices: tokio::sync::mpsc::Sender<ServerMessage>,
) {
    let result = async {
        if record.user.is_none() || !record.tags.is_empty() {
            return Ok(Err(format!(
                "node {} is not owned by a person (it is {}); it renews with its auth key or token",
                record.name,
                record.tags.join(",")
            )));
        }
        let (login, url) = match ops::people::start(
            &st,
            &record.machine_key,
            &record.name,
            &ip.to_string(),
            unix_now(),
        )
        .await
        {
            Ok(l) => l,
            Err(ops::people::StartError::Db(e)) => return Err(anyhow::Error::from(e)),
            Err(e) => return Ok(Err(e.to_string())),
        };
        let _ = notices
            .send(ServerMessage::LoginRequired {
                url,
                user_code: login.login.user_code.clone(),
                expires_unix: login.login.expires_at,
            })
            .await;
        let state = login.login.state;
        let outcome = ops::people::wait(&st, &state).await?;
        ops::people::forget(&st, &state).await?;
        let signed = match outcome {
            ops::people::Outcome::Done(s) => s,
            ops::people::Outcome::Failed(why) => return Ok(Err(format!("sign-in refused: {why}"))),
            ops::people::Outcome::Expired | ops::people::Outcome::Pending => {
                return Ok(Err("the sign-in link expired".into()));
            }
        };
        let now = unix_now();
        let mut tx = db::begin_write(&st.db).await?;
        let Some(node) = db::nodes::by_id(&mut tx, record.id).await? else {
            return Ok(Err("the node was removed".into()));
        };
        match register::renew_by_sign_in(&st, &mut tx, &node, &signed, now).await {
            Ok(until) => {
                let seq = feed::note(&mut tx, Kind::Node, Some(node.id), None).await?;
                feed::commit(&st, tx, seq).await?;
                info!(node = %node.name, user = %signed.user.login_name, until, "signed in again");
                Ok(Ok(signed.user.login_name))
            }
            Err(RegisterError::Db(e)) => Err(e.into()),
            Err(e) => Ok(Err(e.to_string())),
        }
    }
    .await;
    let msg = match result {
        Ok(Ok(user)) => ServerMessage::LoginResult {
            user: Some(user),
            error: None,
        },
        Ok(Err(why)) => ServerMessage::LoginResult {
            user: None,
            error: Some(why),
        },
        Err(e) => {
            warn!(node = %record.name, error = %format!("{e:#}"), "sign-in failed");
            ServerMessage::LoginResult {
                user: None,
                error: Some("internal error; try again".into()),
            }
        }
    };
    let _ = notices.send(msg).await;
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
        ClientMessage::Paths { mut paths } => {
            // What a node says about its own paths is shown, never acted on: bounded, and
            // kept out of the change feed (no peer's netmap depends on it).
            paths.truncate(MAX_REPORTED_PATHS);
            for p in &mut paths {
                for text in [&mut p.reason, &mut p.relay].into_iter().flatten() {
                    if text.len() > MAX_PATH_TEXT {
                        let mut end = MAX_PATH_TEXT;
                        while !text.is_char_boundary(end) {
                            end -= 1;
                        }
                        text.truncate(end);
                    }
                }
            }
            let mut tx = db::begin_write(&st.db).await?;
            db::nodes::set_paths(&mut tx, record.id, &paths, unix_now()).await?;
            tx.commit().await.map_err(db::DbError::from)?;
            Ok(false)
        }
        ClientMessage::Posture { facts } => {
            match ops::policy::record_posture(st, record.id, facts).await {
                Ok(_) => {}
                Err(crate::error::ApiError::Internal(e)) => bail!(StoreFailed(e)),
                Err(e) => {
                    warn!(node = %record.name, error = %e, "could not record a posture report");
                }
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
        // Handled by the session loop.
        ClientMessage::Login | ClientMessage::RequestAccess { .. } => Ok(false),
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
