//! The node's side of a relay connection: QUIC when UDP gets through, else the WebSocket.
//!
//! [`connect`] authenticates (and checks the relay's proof of its key) and returns a
//! [`RelayConn`]: a sender for packets to other nodes and a receiver of what arrives.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use hybrid::StaticKeypair;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tracing::debug;
use wire::RelayInfo;

use crate::datagram::{Datagrams, Sent};
use crate::dial::Dialer;
use crate::proto::{self, Frame, MAX_FRAME};
use crate::server::{read_prefixed, write_burst};
use crate::session;
use crate::tls;

/// How long QUIC may take before the WebSocket is tried.
const QUIC_TIMEOUT: Duration = Duration::from_secs(3);
/// How long the WebSocket may take.
const WS_TIMEOUT: Duration = Duration::from_secs(10);
const QUEUE: usize = 2048;
/// Batches of frames waiting for a QUIC connection's thread ([`FrameSender::send_batch`]);
/// when full, a batch is dropped, as a full UDP socket buffer drops.
const BATCHES: usize = 32;

/// The last ping's data and when it was sent.
type PingSent = std::sync::Mutex<Option<([u8; 8], Instant)>>;

/// Which transport a connection uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// QUIC datagrams.
    Quic,
    /// A WebSocket over TCP.
    WebSocket,
}

impl Transport {
    /// A name for status output.
    pub fn name(self) -> &'static str {
        match self {
            Self::Quic => "quic",
            Self::WebSocket => "websocket",
        }
    }
}

/// What arrives from the relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// A packet from another node.
    Packet {
        /// Its node key.
        src: [u8; 32],
        /// The bytes (a view into the frame they arrived in).
        payload: Bytes,
    },
    /// The destination of an earlier packet is not connected to this relay.
    PeerGone([u8; 32]),
    /// The answer to [`RelayConn::ping`], with the round-trip time.
    Pong(Duration),
}

/// An authenticated relay connection. Dropping it closes the connection.
pub struct RelayConn {
    /// The frame queue, and over QUIC the connection, whose datagrams are read and sent
    /// without a task between.
    sender: FrameSender,
    /// Frames as they arrive, decoded by [`RelayConn::recv`].
    frames: mpsc::Receiver<Bytes>,
    transport: Transport,
    ping_sent: PingSent,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// Queues frames on a relay connection from elsewhere (the connection's own queue, no task in
/// between); see [`RelayConn::sender`].
#[derive(Debug, Clone)]
pub struct FrameSender {
    out: mpsc::Sender<Bytes>,
    quic: Option<Datagrams>,
    /// Over QUIC, batches of frames for the task on the connection's thread that queues them
    /// as datagrams ([`FrameSender::send_batch`]).
    batches: Option<mpsc::Sender<Vec<Bytes>>>,
}

impl FrameSender {
    /// Queues a `Send` frame ([`proto::encode_packet`]): over QUIC straight into the
    /// connection's datagram queue (which drops its oldest when full, as a UDP queue would)
    /// when it fits in a datagram, otherwise on the connection's frame queue; false when that
    /// is full or the connection is gone.
    pub fn send(&self, frame: Bytes) -> bool {
        let frame = match &self.quic {
            Some(d) if frame.first() == Some(&0x10) => match d.send(frame) {
                Sent::Queued => return true,
                Sent::Dropped => return false,
                Sent::TooLarge(f) => f,
            },
            _ => frame,
        };
        self.out.try_send(frame).is_ok()
    }

    /// Queues `Send` frames as [`FrameSender::send`] does, all at once: over QUIC the batch
    /// goes to the connection's own thread, which queues its datagrams there, so the sender
    /// takes no lock the connection's driver holds and the driver wakes once for the batch
    /// and sends it in full GSO runs (one at a time from another thread, each frame waited
    /// for the driver's lock and woke it). How many were queued (a batch is queued or
    /// dropped whole over QUIC).
    pub fn send_batch(&self, frames: Vec<Bytes>) -> usize {
        match &self.batches {
            Some(b) => {
                let n = frames.len();
                if b.try_send(frames).is_ok() { n } else { 0 }
            }
            None => frames
                .into_iter()
                .map(|f| self.send(f))
                .filter(|&sent| sent)
                .count(),
        }
    }
}

impl Drop for RelayConn {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl RelayConn {
    /// The transport in use.
    pub fn transport(&self) -> Transport {
        self.transport
    }

    /// The next thing from the relay; `None` once the connection is gone. Cancel-safe.
    pub async fn recv(&mut self) -> Option<Incoming> {
        loop {
            let frame = match &self.sender.quic {
                // Both are cancel-safe: a datagram not yet returned stays in the connection.
                Some(c) => tokio::select! {
                    f = self.frames.recv() => f?,
                    d = c.connection().read_datagram() => d.ok()?,
                },
                None => self.frames.recv().await?,
            };
            if let Some(ev) = decode_incoming(&frame, &self.ping_sent) {
                return Some(ev);
            }
        }
    }

    /// A handle that queues frames on this connection.
    pub fn sender(&self) -> FrameSender {
        self.sender.clone()
    }

    /// Queues a packet for `dst`; false when the queue is full or the connection is gone.
    pub fn send(&self, dst: &[u8; 32], payload: &[u8]) -> bool {
        self.sender
            .send(proto::encode_packet(false, dst, payload).into())
    }

    /// Whether the connection is gone.
    pub fn is_closed(&self) -> bool {
        self.sender.out.is_closed()
    }

    /// Hands the relay a refreshed ticket.
    pub fn refresh_ticket(&self, ticket: &[u8]) {
        let _ = self
            .sender
            .out
            .try_send(proto::encode(&Frame::Ticket { ticket }).into());
    }

    /// Tells the relay to forward nothing from `keys` (at most [`proto::MAX_REFUSED`]) to this
    /// node, in place of the list sent before (empty: forward from all). The relay applies one
    /// list a second: send one only when it changes, no more than every two seconds. False
    /// when the frame queue is full or the connection is gone.
    pub fn refuse(&self, keys: &[[u8; 32]]) -> bool {
        self.sender
            .out
            .try_send(proto::encode_refuse(keys).into())
            .is_ok()
    }

    /// Sends a latency probe; its [`Incoming::Pong`] carries the round-trip time.
    pub fn ping(&self) {
        let data: [u8; 8] = rand::random();
        if let Ok(mut p) = self.ping_sent.lock() {
            *p = Some((data, Instant::now()));
        }
        let _ = self
            .sender
            .out
            .try_send(proto::encode(&Frame::Ping { data }).into());
    }
}

/// Connects to `relay` as `node` with `ticket`: QUIC first (if the relay offers it), then the
/// WebSocket.
pub async fn connect(
    relay: &RelayInfo,
    node: &StaticKeypair,
    ticket: &[u8],
) -> anyhow::Result<RelayConn> {
    connect_with(Dialer::PLAIN, relay, node, ticket).await
}

/// [`connect`] with sockets made by `dialer`.
pub async fn connect_with(
    dialer: Dialer,
    relay: &RelayInfo,
    node: &StaticKeypair,
    ticket: &[u8],
) -> anyhow::Result<RelayConn> {
    let mut errors = Vec::new();
    if let (Some(addr), Some(pin)) = (relay.quic, relay.cert_sha256) {
        match tokio::time::timeout(
            QUIC_TIMEOUT,
            connect_quic(dialer, addr, pin.0, relay, node, ticket),
        )
        .await
        {
            Ok(Ok(c)) => return Ok(c),
            Ok(Err(e)) => errors.push(format!("quic: {e:#}")),
            Err(_) => errors.push("quic: no answer (UDP blocked?)".into()),
        }
    }
    if let Some(url) = &relay.websocket {
        match tokio::time::timeout(WS_TIMEOUT, connect_ws(dialer, url, relay, node, ticket)).await {
            Ok(Ok(c)) => return Ok(c),
            Ok(Err(e)) => errors.push(format!("websocket: {e:#}")),
            Err(_) => errors.push("websocket: timed out".into()),
        }
    }
    if errors.is_empty() {
        bail!("relay {} offers no transport", relay.name);
    }
    bail!("cannot reach relay {}: {}", relay.name, errors.join("; "))
}

/// Runs the authentication exchange over a frame channel (decided by [`session`]).
async fn authenticate(
    incoming: &mut mpsc::Receiver<Bytes>,
    out: &mpsc::Sender<Bytes>,
    relay: &RelayInfo,
    node: &StaticKeypair,
    ticket: &[u8],
) -> anyhow::Result<()> {
    let first = incoming
        .recv()
        .await
        .context("relay closed the connection")?;
    let (nonce, auth) = session::answer_challenge(&first, node, relay.key.as_bytes(), ticket)?;
    out.send(auth.into()).await?;
    let answer = incoming
        .recv()
        .await
        .context("relay closed the connection")?;
    session::check_admission(&answer, node, relay.key.as_bytes(), &nonce)?;
    Ok(())
}

/// What a frame from the relay means to the node (`None`: nothing, or not for it).
fn decode_incoming(frame: &Bytes, ping_sent: &PingSent) -> Option<Incoming> {
    Some(match proto::decode(frame) {
        Ok(Frame::Recv { src, payload }) => Incoming::Packet {
            src,
            payload: frame.slice_ref(payload),
        },
        Ok(Frame::PeerGone { key }) => Incoming::PeerGone(key),
        Ok(Frame::Pong { data }) => {
            let sent = ping_sent.lock().ok().and_then(|mut p| p.take());
            match sent {
                Some((d, at)) if d == data => Incoming::Pong(at.elapsed()),
                _ => return None,
            }
        }
        _ => return None,
    })
}

async fn connect_quic(
    dialer: Dialer,
    addr: SocketAddr,
    pin: [u8; 32],
    relay: &RelayInfo,
    node: &StaticKeypair,
    ticket: &[u8],
) -> anyhow::Result<RelayConn> {
    let bind: SocketAddr = if addr.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = dialer.udp(bind).context("binding a QUIC socket")?;
    let mut endpoint = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        None,
        socket.into(),
        Arc::new(quinn::TokioRuntime),
    )
    .context("binding a QUIC socket")?;
    endpoint.set_default_client_config(tls::client_config(pin)?);
    let conn = endpoint
        .connect(addr, tls::SERVER_NAME)?
        .await
        .context("QUIC handshake")?;
    let (mut send, mut recv) = conn
        .accept_bi()
        .await
        .context("waiting for the relay's stream")?;
    let (in_tx, mut in_rx) = mpsc::channel::<Bytes>(QUEUE);
    let (out_tx, mut out_rx) = mpsc::channel::<Bytes>(QUEUE);
    // The stream carries the handshake and oversized frames; datagrams carry packets (read
    // by `RelayConn::recv` and sent by `FrameSender::send` themselves, with no task between).
    let reader = tokio::spawn(async move {
        while let Ok(Some(f)) = read_prefixed(&mut recv).await {
            if in_tx.send(Bytes::from(f)).await.is_err() {
                return;
            }
        }
    });
    let writer_conn = conn.clone();
    let writer = tokio::spawn(async move {
        // Keep the endpoint alive as long as the connection.
        let _endpoint = endpoint;
        // Only what `FrameSender::send` did not send as a datagram comes here.
        while let Some(f) = out_rx.recv().await {
            if send.write_all(&proto::length_prefixed(&f)).await.is_err() {
                break;
            }
        }
        writer_conn.close(0u32.into(), b"bye");
    });
    authenticate(&mut in_rx, &out_tx, relay, node, ticket).await?;
    debug!(relay = %relay.name, %addr, "relay connected over QUIC");
    let datagrams = Datagrams::new(conn);
    let (batches, mut batch_rx) = mpsc::channel::<Vec<Bytes>>(BATCHES);
    let queuer = {
        let (datagrams, out) = (datagrams.clone(), out_tx.clone());
        tokio::spawn(async move {
            while let Some(frames) = batch_rx.recv().await {
                for f in frames {
                    if let Sent::TooLarge(f) = datagrams.send(f) {
                        let _ = out.try_send(f);
                    }
                }
            }
        })
    };
    let mut c = finish(in_rx, out_tx, Transport::Quic, vec![reader, writer, queuer]);
    c.sender.quic = Some(datagrams);
    c.sender.batches = Some(batches);
    Ok(c)
}

fn finish(
    frames: mpsc::Receiver<Bytes>,
    out: mpsc::Sender<Bytes>,
    transport: Transport,
    tasks: Vec<tokio::task::JoinHandle<()>>,
) -> RelayConn {
    RelayConn {
        sender: FrameSender {
            out,
            quic: None,
            batches: None,
        },
        frames,
        transport,
        ping_sent: std::sync::Mutex::new(None),
        tasks,
    }
}

async fn connect_ws(
    dialer: Dialer,
    url: &str,
    relay: &RelayInfo,
    node: &StaticKeypair,
    ticket: &[u8],
) -> anyhow::Result<RelayConn> {
    // The WebSocket runs over TLS pinned to the relay's certificate (the one its QUIC uses),
    // so the relay protocol's metadata (node keys, tickets, who talks to whom) is never in
    // clear, and an impostor on the path cannot terminate it.
    let Some(rest) = url.strip_prefix("https://") else {
        anyhow::bail!(
            "relay {} lists a WebSocket URL that is not https:// ({url}); plain ws:// would \
             carry relay metadata in clear",
            relay.name
        );
    };
    let pin = relay.cert_sha256.with_context(|| {
        format!(
            "relay {} has no certificate pin for its WebSocket",
            relay.name
        )
    })?;
    let authority = rest.split('/').next().unwrap_or(rest);
    let ws_url = format!("wss://{rest}");
    let tcp = dialer
        .tcp(authority)
        .await
        .with_context(|| format!("connecting to {authority}"))?;
    let tls = tls::connect_pinned(tcp, pin.0, &[b"http/1.1"]).await?;
    let cfg = WebSocketConfig::default()
        .max_message_size(Some(MAX_FRAME + 16))
        .max_frame_size(Some(MAX_FRAME + 16));
    let (ws, _) = tokio_tungstenite::client_async_with_config(ws_url.as_str(), tls, Some(cfg))
        .await
        .with_context(|| format!("connecting to {ws_url}"))?;
    let (mut sink, mut stream) = ws.split();
    let (in_tx, mut in_rx) = mpsc::channel::<Bytes>(QUEUE);
    let (out_tx, mut out_rx) = mpsc::channel::<Bytes>(QUEUE);
    let reader = tokio::spawn(async move {
        while let Some(Ok(msg)) = stream.next().await {
            match msg {
                Message::Binary(b) => {
                    let sent = in_tx.send(b).await;
                    if sent.is_err() {
                        return;
                    }
                }
                Message::Close(_) => return,
                _ => {}
            }
        }
    });
    let writer = tokio::spawn(async move {
        let mut ping = tokio::time::interval(Duration::from_secs(10));
        loop {
            tokio::select! {
                f = out_rx.recv() => {
                    let Some(f) = f else { break };
                    if write_burst(&mut sink, f, || out_rx.try_recv().ok(), Message::Binary).await.is_err() {
                        return;
                    }
                }
                _ = ping.tick() => {
                    if sink.send(Message::Ping(Vec::new().into())).await.is_err() {
                        return;
                    }
                }
            }
        }
        let _ = sink.close().await;
    });
    authenticate(&mut in_rx, &out_tx, relay, node, ticket).await?;
    debug!(relay = %relay.name, url = %ws_url, "relay connected over WebSocket");
    Ok(finish(
        in_rx,
        out_tx,
        Transport::WebSocket,
        vec![reader, writer],
    ))
}
