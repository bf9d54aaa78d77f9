//! The control client: keeps a hybrid Noise session to the coordinator over a WebSocket,
//! reconnecting with jittered exponential backoff, and relays messages between it and the event
//! loop. It holds no mesh state; the event loop does.
//!
//! A mesh may be served by several coordinator replicas (all holding the one pinned control
//! key). The client knows them all ([`Replicas`]: the `--coordinator` URLs and the list the
//! netmap carries) and, when its session ends, moves on to the next one after a short jittered
//! pause; only after every replica failed in turn does it back off exponentially.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use hybrid::{Channel, InitiatorHandshake, Psk, Purpose, StaticKeypair};
use rand::RngExt;
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, timeout};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tracing::{debug, info, warn};
use wire::netmap::MapResponse;
use wire::{ClientMessage, ControlKey, ErrorCode, Hello, ServerMessage, Welcome};

use crate::io::idtoken::IdTokenSource;
use crate::io::posture::Facts;

/// What the control client tells the event loop.
#[derive(Debug)]
pub enum ControlEvent {
    /// Registered or resumed, through the coordinator at the URL.
    Welcome(Welcome, String),
    /// A netmap message.
    Map(Box<MapResponse>),
    /// The coordinator refused the node for good (removed, expired, bad auth key).
    Refused(ErrorCode, String),
    /// The node's user must sign in at this URL (the page shows the code too).
    LoginRequired {
        /// The sign-in page.
        url: String,
        /// The code the page shows.
        user_code: String,
        /// When the link stops working (Unix seconds).
        expires_unix: i64,
    },
    /// How a sign-in asked for with `ClientMessage::Login` ended.
    LoginResult(Result<String, String>),
    /// The answer to `ClientMessage::RequestAccess` number `req`: the request's id, or why
    /// it was refused.
    AccessRequestResult(u64, Result<i64, String>),
    /// The session ended; the client is reconnecting.
    Disconnected(String),
}

/// Settings of the control client.
pub struct ControlConfig {
    /// `http://host:port` of every coordinator replica known at start, the preferred first.
    pub urls: Vec<String>,
    /// The pinned coordinator key.
    pub control_key: ControlKey,
    /// The machine key proven on every connection.
    pub machine: StaticKeypair,
    /// The node (WireGuard) key, whose possession is also proven on every connection.
    pub node: StaticKeypair,
    /// Hello template (endpoints are filled in per connection).
    pub hello: Hello,
    /// Where the node's token from an outside issuer comes from, if it joins with one: read
    /// for every connection's hello, and again every `id_token_refresh` to send a fresh one.
    pub id_token: Option<IdTokenSource>,
    /// How often the token is read again (`--id-token-refresh`).
    pub id_token_refresh: Duration,
    /// How the connection's socket is made (marked while the node uses an exit node).
    pub dialer: relay::dial::Dialer,
}

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const PING_INTERVAL: Duration = Duration::from_secs(10);
const IDLE_TIMEOUT: Duration = Duration::from_secs(35);
/// The longest wait between rounds of trying every replica.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Runs the client until the coordinator refuses the node or the event loop goes away.
/// `replicas` delivers replica lists learned later (from netmaps).
pub async fn run(
    cfg: ControlConfig,
    events: mpsc::Sender<ControlEvent>,
    mut outbox: mpsc::Receiver<ClientMessage>,
    mut endpoints: watch::Receiver<Vec<SocketAddr>>,
    mut posture: watch::Receiver<Option<Facts>>,
    mut replicas: watch::Receiver<Vec<String>>,
) {
    let mut known = Replicas::new(cfg.urls.clone());
    loop {
        if replicas.has_changed().unwrap_or(false) {
            known.learn(&replicas.borrow_and_update());
        }
        let url = known.current().to_owned();
        let started = Instant::now();
        let reason = match session(
            &cfg,
            &url,
            &events,
            &mut outbox,
            &mut endpoints,
            &mut posture,
        )
        .await
        {
            Ok(End::Refused) | Ok(End::LoopGone) => return,
            Ok(End::Closed(reason)) => reason,
            Err(e) => format!("{e:#}"),
        };
        if events
            .send(ControlEvent::Disconnected(reason.clone()))
            .await
            .is_err()
        {
            return;
        }
        let wait = known.failed(started.elapsed(), rand::rng().random_range(0..=1000));
        warn!(coordinator = %url, reason = %reason, next = %known.current(), retry_in = ?wait,
              "control connection lost; reconnecting");
        tokio::time::sleep(wait).await;
    }
}

/// The coordinator replicas a node can reach and which one to try next (pure).
#[derive(Debug, Clone)]
pub struct Replicas {
    urls: Vec<String>,
    next: usize,
    /// Failures in a row since the last session that lasted.
    failures: u32,
}

/// A session that lasted this long counts as a success.
const STABLE: Duration = Duration::from_secs(30);
/// The pause before trying another replica: up to this much, at random, so the nodes of a
/// replica that died do not all arrive at the next one in the same instant.
pub const SWITCH_JITTER: Duration = Duration::from_millis(1000);

impl Replicas {
    /// The replicas at `urls` (duplicates dropped), the first tried first.
    pub fn new(urls: Vec<String>) -> Self {
        let mut r = Self {
            urls: Vec::new(),
            next: 0,
            failures: 0,
        };
        r.learn(&urls);
        r
    }

    /// Adds replicas from a newer list; the one in use stays in use.
    pub fn learn(&mut self, urls: &[String]) {
        for u in urls {
            let u = u.trim_end_matches('/').to_owned();
            if !u.is_empty() && !self.urls.contains(&u) {
                self.urls.push(u);
            }
        }
    }

    /// The replica to use now.
    pub fn current(&self) -> &str {
        self.urls.get(self.next).map_or("", String::as_str)
    }

    /// Every replica known.
    pub fn all(&self) -> &[String] {
        &self.urls
    }

    /// The session with the current replica ended after `lasted`: moves to the next one and
    /// says how long to wait first. `jitter_ms` (0..=1000, random) spreads the nodes out.
    /// Switching costs at most [`SWITCH_JITTER`]; once every replica failed in a row the wait
    /// doubles per round, up to [`MAX_BACKOFF`].
    pub fn failed(&mut self, lasted: Duration, jitter_ms: u64) -> Duration {
        if lasted >= STABLE {
            self.failures = 0;
        }
        self.failures += 1;
        if !self.urls.is_empty() {
            self.next = (self.next + 1) % self.urls.len();
        }
        let n = u32::try_from(self.urls.len().max(1)).unwrap_or(u32::MAX);
        let frac = |d: Duration| d.mul_f64(jitter_ms.min(1000) as f64 / 1000.0);
        if self.failures <= n {
            return frac(SWITCH_JITTER);
        }
        let rounds = (self.failures - 1) / n;
        let base = Duration::from_millis(500)
            .saturating_mul(1u32 << rounds.min(10))
            .min(MAX_BACKOFF);
        base + frac(base / 2)
    }
}

enum End {
    Refused,
    LoopGone,
    Closed(String),
}

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

async fn session(
    cfg: &ControlConfig,
    url: &str,
    events: &mpsc::Sender<ControlEvent>,
    outbox: &mut mpsc::Receiver<ClientMessage>,
    endpoints: &mut watch::Receiver<Vec<SocketAddr>>,
    posture: &mut watch::Receiver<Option<Facts>>,
) -> anyhow::Result<End> {
    let ws_url = ws_url(url)?;
    // Control messages are small: a small read buffer (tungstenite zero-fills all of it
    // before every read; a larger frame grows it).
    let ws_config = WebSocketConfig::default()
        .max_message_size(Some(65_535))
        .max_frame_size(Some(65_535))
        .read_buffer_size(8 << 10)
        .write_buffer_size(8 << 10);
    let (mut ws, _) = timeout(HANDSHAKE_TIMEOUT, async {
        // The control channel brings its own encryption (the hybrid handshake with the
        // pinned key), so it runs over plain WebSocket.
        let Some(rest) = ws_url.strip_prefix("ws://") else {
            bail!("the control channel runs over plain http:// ({ws_url} is not)");
        };
        let authority = rest.split('/').next().unwrap_or_default();
        let tcp = cfg.dialer.tcp(authority).await?;
        tokio_tungstenite::client_async_with_config(ws_url.as_str(), tcp, Some(ws_config))
            .await
            .map_err(anyhow::Error::from)
    })
    .await
    .context("connecting to the coordinator timed out")?
    .with_context(|| format!("connecting to {ws_url}"))?;

    let (mut channel, session_hash) = timeout(HANDSHAKE_TIMEOUT, handshake(cfg, url, &mut ws))
        .await
        .context("control handshake timed out")??;
    let mut hello = cfg.hello.clone();
    hello.endpoints = endpoints.borrow_and_update().clone();
    let mut sent_token = match &cfg.id_token {
        Some(src) => Some(src.read()?),
        None => None,
    };
    hello.id_token.clone_from(&sent_token);
    let proof = cfg
        .node
        .possession_proof(
            cfg.control_key.as_bytes(),
            &session_hash,
            &cfg.machine.public(),
        )
        .context("the coordinator's key is unusable")?;
    let mut proof_hex = String::new();
    wire::keys::push_hex(&mut proof_hex, &proof);
    hello.node_key_proof = Some(proof_hex);
    send(&mut ws, &mut channel, &ClientMessage::Hello(hello)).await?;
    // The coordinator may have missed changes while we were away: report the current posture
    // on every connection.
    let facts = posture.borrow_and_update().clone();
    if let Some(facts) = facts {
        send(&mut ws, &mut channel, &ClientMessage::Posture { facts }).await?;
    }

    let mut ping = tokio::time::interval(PING_INTERVAL);
    let mut renew = tokio::time::interval(cfg.id_token_refresh);
    renew.reset();
    let mut last_heard = Instant::now();
    // A person's node whose key expires mid-session is cut off; its user signs in again on
    // the next connection (the coordinator offers a sign-in link), so it reconnects.
    let mut owned_by_person = false;
    loop {
        tokio::select! {
            frame = ws.next() => {
                last_heard = Instant::now();
                let Some(frame) = frame else {
                    return Ok(End::Closed("coordinator closed the connection".into()));
                };
                let bytes = match frame? {
                    Message::Binary(b) => b,
                    Message::Close(_) => return Ok(End::Closed("coordinator closed the connection".into())),
                    Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
                    Message::Text(_) => bail!("text frame on the control channel"),
                };
                let Some(msg) = channel.open(&bytes)? else { continue };
                let msg = ServerMessage::from_json(&msg)
                    .context("decoding a coordinator message")?;
                let event = match msg {
                    ServerMessage::Welcome(w) => {
                        owned_by_person = w.user.is_some() && w.tags.is_empty();
                        ControlEvent::Welcome(w, url.to_owned())
                    }
                    ServerMessage::LoginRequired { url, user_code, expires_unix } => {
                        ControlEvent::LoginRequired { url, user_code, expires_unix }
                    }
                    ServerMessage::LoginResult { user, error } => {
                        ControlEvent::LoginResult(match (user, error) {
                            (Some(u), None) => Ok(u),
                            (_, e) => Err(e.unwrap_or_else(|| "the sign-in failed".into())),
                        })
                    }
                    ServerMessage::AccessRequestResult { req, id, error } => {
                        ControlEvent::AccessRequestResult(req, match (id, error) {
                            (Some(id), None) => Ok(id),
                            (_, e) => Err(e.unwrap_or_else(|| "the request was refused".into())),
                        })
                    }
                    ServerMessage::Error { code: code @ ErrorCode::NodeExpired, message }
                        if owned_by_person =>
                    {
                        warn!(%message, "this node's key expired; its user must sign in again");
                        return Ok(End::Closed(format!("{code:?}: {message}")));
                    }
                    ServerMessage::Map(m) => ControlEvent::Map(m),
                    // A node that joined with a token comes back with a fresh one (refreshed on
                    // disk): a refused token or an expired node is worth trying again.
                    ServerMessage::Error {
                        code: code @ (ErrorCode::IdTokenRefused | ErrorCode::NodeExpired),
                        message,
                    } if cfg.id_token.is_some() => {
                        return Ok(End::Closed(format!("{code:?}: {message}")));
                    }
                    ServerMessage::Error { code, message } if !code.is_retryable() => {
                        let _ = events.send(ControlEvent::Refused(code, message)).await;
                        return Ok(End::Refused);
                    }
                    ServerMessage::Error { code, message } => {
                        return Ok(End::Closed(format!("coordinator error {code:?}: {message}")));
                    }
                    ServerMessage::Unknown => {
                        debug!("ignoring an unknown message from the coordinator");
                        continue;
                    }
                };
                if events.send(event).await.is_err() {
                    return Ok(End::LoopGone);
                }
            }
            out = outbox.recv() => {
                let Some(out) = out else { return Ok(End::LoopGone) };
                send(&mut ws, &mut channel, &out).await?;
            }
            changed = endpoints.changed() => {
                if changed.is_err() {
                    return Ok(End::LoopGone);
                }
                let eps = endpoints.borrow_and_update().clone();
                send(&mut ws, &mut channel, &ClientMessage::Endpoints { endpoints: eps }).await?;
            }
            changed = posture.changed() => {
                if changed.is_err() {
                    return Ok(End::LoopGone);
                }
                let facts = posture.borrow_and_update().clone();
                if let Some(facts) = facts {
                    send(&mut ws, &mut channel, &ClientMessage::Posture { facts }).await?;
                }
            }
            _ = renew.tick(), if cfg.id_token.is_some() => {
                let Some(src) = &cfg.id_token else { continue };
                match src.read() {
                    Ok(t) if sent_token.as_ref() != Some(&t) => {
                        debug!("sending a fresh id token");
                        send(&mut ws, &mut channel, &ClientMessage::IdToken { id_token: t.clone() })
                            .await?;
                        sent_token = Some(t);
                    }
                    Ok(_) => {}
                    Err(e) => warn!(error = %format!("{e:#}"), "cannot read a fresh id token"),
                }
            }
            _ = ping.tick() => {
                if last_heard.elapsed() > IDLE_TIMEOUT {
                    return Ok(End::Closed("coordinator stopped answering".into()));
                }
                ws.send(Message::Ping(Vec::new().into())).await?;
            }
        }
    }
}

/// The control handshake; returns the channel and the session's handshake hash.
async fn handshake(
    cfg: &ControlConfig,
    url: &str,
    ws: &mut Ws,
) -> anyhow::Result<(Channel, [u8; 32])> {
    let (initiator, msg1) = {
        let mut rng = rand::rng();
        InitiatorHandshake::start(
            &mut rng,
            Purpose::Control,
            &cfg.machine,
            cfg.control_key.as_bytes(),
            &Psk::zero(),
            &[],
        )?
    };
    ws.send(Message::Binary(msg1.into())).await?;
    let msg2 = loop {
        match ws.next().await {
            Some(Ok(Message::Binary(b))) => break b,
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            Some(Ok(_)) | None => {
                bail!("the coordinator closed the connection during the handshake")
            }
            Some(Err(e)) => return Err(e.into()),
        }
    };
    let done = initiator
        .finish(&msg2)
        .context("the coordinator failed the handshake (wrong pinned key?)")?;
    info!(coordinator = %url, "control channel established");
    let session_hash = *done.handshake_hash();
    Ok((done.into_channel(), session_hash))
}

async fn send(ws: &mut Ws, channel: &mut Channel, msg: &ClientMessage) -> anyhow::Result<()> {
    let json = serde_json::to_vec(msg)?;
    for frame in channel.seal(&json)? {
        ws.send(Message::Binary(frame.into())).await?;
    }
    Ok(())
}

/// `http://h:p` -> `ws://h:p/control`.
pub fn ws_url(url: &str) -> anyhow::Result<String> {
    let base = url.trim_end_matches('/');
    if let Some(rest) = base.strip_prefix("http://") {
        Ok(format!("ws://{rest}/control"))
    } else if let Some(rest) = base.strip_prefix("https://") {
        Ok(format!("wss://{rest}/control"))
    } else {
        bail!("coordinator URL must start with http:// or https://")
    }
}

/// Largest `/key` answer accepted (it is a few hundred bytes).
const MAX_KEY_ANSWER: usize = 64 << 10;

/// Fetches the coordinator's control key over plain HTTP and checks it against `fingerprint`
/// (from an auth key). The fingerprint is what makes this safe without TLS. The whole fetch
/// has one deadline and the answer a size limit, so a hostile server can neither hold the
/// join forever nor make the node buffer an endless body.
pub async fn fetch_control_key(
    dialer: relay::dial::Dialer,
    url: &str,
    fingerprint: &[u8; 16],
) -> anyhow::Result<ControlKey> {
    timeout(
        HANDSHAKE_TIMEOUT,
        fetch_control_key_unbounded(dialer, url, fingerprint),
    )
    .await
    .with_context(|| format!("the coordinator at {url} did not answer GET /key in time"))?
}

async fn fetch_control_key_unbounded(
    dialer: relay::dial::Dialer,
    url: &str,
    fingerprint: &[u8; 16],
) -> anyhow::Result<ControlKey> {
    #[derive(serde::Deserialize)]
    struct KeyInfo {
        control_key: ControlKey,
    }
    let authority = url
        .trim_end_matches('/')
        .strip_prefix("http://")
        .context("the first join needs an http:// coordinator URL")?;
    let body = relay::http::get_with(dialer, authority, "/key", MAX_KEY_ANSWER)
        .await
        .context("fetching the coordinator's key")?;
    let info: KeyInfo = serde_json::from_slice(&body).context("decoding /key")?;
    if &hybrid::fingerprint(info.control_key.as_bytes()) != fingerprint {
        bail!(
            "the coordinator at {url} is not the one the auth key was issued by \
             (key fingerprint mismatch)"
        );
    }
    Ok(info.control_key)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server that answers `GET /key` with `head` and then `body_len` bytes of `x`,
    /// slowly if `drip` (one byte per 100 ms); returns its URL.
    async fn hostile_key_server(head: &'static str, body_len: usize, drip: bool) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        tokio::spawn(async move {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            let _ = s.write_all(head.as_bytes()).await;
            let chunk = vec![b'x'; 64 << 10];
            let mut left = body_len;
            while left > 0 {
                let n = if drip { 1 } else { left.min(chunk.len()) };
                if s.write_all(&chunk[..n]).await.is_err() {
                    return;
                }
                left -= n;
                if drip {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        });
        url
    }

    #[tokio::test]
    async fn the_first_join_refuses_an_endless_key_answer() {
        let url = hostile_key_server(
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n100000\r\n",
            1 << 20,
            false,
        )
        .await;
        let err = fetch_control_key(relay::dial::Dialer::PLAIN, &url, &[0; 16])
            .await
            .unwrap_err();
        assert!(format!("{err:#}").contains("length limit"), "{err:#}");
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_join_gives_up_on_a_server_that_answers_a_byte_at_a_time() {
        let url = hostile_key_server(
            "HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\n",
            100_000,
            true,
        )
        .await;
        let err = fetch_control_key(relay::dial::Dialer::PLAIN, &url, &[0; 16])
            .await
            .unwrap_err();
        assert!(format!("{err:#}").contains("in time"), "{err:#}");
    }

    #[test]
    fn a_lost_replica_is_left_for_the_next_at_once_and_backoff_starts_after_a_full_round() {
        let mut r = Replicas::new(vec!["http://a:1/".into(), "http://b:1".into()]);
        assert_eq!(r.current(), "http://a:1");
        // The netmap names the replicas again, plus a third: nothing moves.
        r.learn(&[
            "http://b:1".into(),
            "http://c:1".into(),
            "http://a:1".into(),
        ]);
        assert_eq!(r.all(), ["http://a:1", "http://b:1", "http://c:1"]);
        assert_eq!(r.current(), "http://a:1");
        // A dies after a long session: straight to b, within the switch jitter.
        let w = r.failed(Duration::from_secs(600), 1000);
        assert_eq!((r.current(), w), ("http://b:1", SWITCH_JITTER));
        assert_eq!(r.failed(Duration::ZERO, 0), Duration::ZERO);
        assert_eq!(r.current(), "http://c:1");
        assert!(r.failed(Duration::ZERO, 500) <= SWITCH_JITTER);
        assert_eq!(r.current(), "http://a:1");
        // All three failed in a row: now the wait grows, to the cap.
        let w4 = r.failed(Duration::ZERO, 0);
        assert_eq!(w4, Duration::from_secs(1));
        let mut last = w4;
        for _ in 0..40 {
            last = r.failed(Duration::ZERO, 1000);
        }
        assert_eq!(last, MAX_BACKOFF + MAX_BACKOFF / 2);
        // A session that lasted resets it.
        assert!(r.failed(STABLE, 1000) <= SWITCH_JITTER);
    }

    #[test]
    fn websocket_url_is_derived_from_the_http_url() {
        assert_eq!(
            ws_url("http://10.0.0.1:8080").unwrap(),
            "ws://10.0.0.1:8080/control"
        );
        assert_eq!(
            ws_url("https://c.example/").unwrap(),
            "wss://c.example/control"
        );
        assert!(ws_url("ftp://x").is_err());
    }
}
