//! Serving HTTP (and the WebSocket upgrades on it) to the open internet, with limits that
//! `axum::serve` does not have: at most [`HttpLimits::max_connections`] connections at once and
//! [`HttpLimits::per_ip`] from one address (more are closed as they are accepted), and a
//! deadline for a request's headers, so a client that opens connections and sends its headers a
//! byte at a time (slowloris) cannot hold them. A TLS handshake costs the server key work, so
//! one address (an IPv6 /64) may start [`HandshakeRate::burst`] of them at once and then one
//! per [`HandshakeRate::interval`] (the relay's QUIC listener counts its
//! handshakes the same way); a connection beyond that is closed before its handshake.
//!
//! Each connection's slot ([`ConnSlot`]) travels in the request's extensions; a handler that
//! upgrades the connection to a WebSocket keeps it for the socket's life, so upgraded
//! connections count too. Handlers see the peer address as `ConnectInfo<SocketAddr>`.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tower::ServiceExt;
use tracing::{debug, warn};

/// Connection limits.
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    /// Connections open at once (upgraded ones included).
    pub max_connections: usize,
    /// Connections open at once from one address.
    pub per_ip: usize,
    /// Time to receive a request's headers.
    pub header_timeout: Duration,
    /// TLS handshakes one address may start.
    pub handshakes: HandshakeRate,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            max_connections: 50_000,
            per_ip: 4_096,
            header_timeout: Duration::from_secs(10),
            handshakes: HandshakeRate::default(),
        }
    }
}

/// How many handshakes (TLS or QUIC: key work for the server) one address may start: `burst`
/// at once, then one per `interval`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandshakeRate {
    /// Handshakes at once.
    pub burst: u32,
    /// Then one per this long.
    pub interval: Duration,
}

impl Default for HandshakeRate {
    /// 200 at once, then 20 a second: the coordinator's own limit on control sessions per
    /// address. A node makes one handshake per connection; a thousand behind one NAT that
    /// reconnect together are all back within a minute, while one host making handshakes as
    /// fast as it can costs the server twenty a second instead of all its CPUs.
    fn default() -> Self {
        Self {
            burst: 200,
            interval: Duration::from_millis(50),
        }
    }
}

/// Addresses whose handshakes a listener tracks at most: past them (after letting go of
/// those whose allowance is whole again) a new address waits.
pub const MAX_HANDSHAKE_SOURCES: usize = 65_536;

/// The handshakes each address started ([`HandshakeRate`]; sans-IO: time is passed in),
/// shared by a listener's connections (cheap to clone).
#[derive(Clone)]
pub(crate) struct Handshakes {
    rate: HandshakeRate,
    /// When each address's allowance is whole again (the "theoretical arrival time" of GCRA):
    /// a handshake is let through while that is at most `burst - 1` intervals ahead.
    due: Arc<Mutex<HashMap<IpAddr, Instant>>>,
}

impl Handshakes {
    pub(crate) fn new(rate: HandshakeRate) -> Self {
        Self {
            rate,
            due: Arc::default(),
        }
    }

    /// Whether `ip` may start a handshake at `now` (and counts it if so).
    pub(crate) fn allow(&self, ip: IpAddr, now: Instant) -> bool {
        let key = wire::counted_ip(ip);
        let HandshakeRate { burst, interval } = self.rate;
        let tolerance = interval.saturating_mul(burst.saturating_sub(1));
        let mut due = self
            .due
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let at = due.get(&key).copied().filter(|d| *d > now).unwrap_or(now);
        if burst == 0 || at.saturating_duration_since(now) > tolerance {
            return false;
        }
        if !due.contains_key(&key) && due.len() >= MAX_HANDSHAKE_SOURCES {
            due.retain(|_, d| *d > now);
            if due.len() >= MAX_HANDSHAKE_SOURCES {
                return false;
            }
        }
        due.insert(key, at + interval);
        true
    }
}

/// TLS handshakes this process's listeners did not start: their address had started its
/// [`HandshakeRate`].
static TLS_TOO_OFTEN: AtomicU64 = AtomicU64::new(0);

/// How many TLS handshakes this process's listeners turned away ([`HandshakeRate`]).
pub fn tls_handshakes_too_often() -> u64 {
    TLS_TOO_OFTEN.load(Ordering::Relaxed)
}

#[derive(Default)]
struct Counts {
    total: usize,
    per_ip: HashMap<IpAddr, usize>,
}

/// One admitted connection; the count goes down when the last clone is dropped.
#[derive(Clone)]
pub struct ConnSlot(#[allow(dead_code)] Arc<SlotInner>);

struct SlotInner {
    counts: Arc<Mutex<Counts>>,
    ip: IpAddr,
}

impl Drop for SlotInner {
    fn drop(&mut self) {
        let mut c = lock(&self.counts);
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                c.per_ip.remove(&self.ip);
            }
        }
    }
}

fn lock(m: &Mutex<Counts>) -> std::sync::MutexGuard<'_, Counts> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Counts a listener's connections against its limits: at most `max` at once, `per_ip` from
/// one address (the QUIC listener's too, see [`crate::server::QuicLimits`]).
#[derive(Clone)]
pub(crate) struct Admission {
    counts: Arc<Mutex<Counts>>,
    max: usize,
    per_ip: usize,
}

impl Admission {
    pub(crate) fn new(max: usize, per_ip: usize) -> Self {
        Self {
            counts: Arc::default(),
            max,
            per_ip,
        }
    }

    /// A slot for one more connection from `ip`, unless that would pass a limit.
    pub(crate) fn admit(&self, ip: IpAddr) -> Option<ConnSlot> {
        let mut c = lock(&self.counts);
        let mine = c.per_ip.get(&ip).copied().unwrap_or(0);
        if c.total >= self.max || mine >= self.per_ip {
            return None;
        }
        c.total += 1;
        *c.per_ip.entry(ip).or_insert(0) += 1;
        Some(ConnSlot(Arc::new(SlotInner {
            counts: Arc::clone(&self.counts),
            ip,
        })))
    }
}

/// Serves `app` on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: HttpLimits,
    shutdown: impl Future<Output = ()>,
) {
    serve_inner(listener, Mode::Plain(app), limits, shutdown).await;
}

/// Serves `app` over TLS (`tls`) on `listener` until `shutdown` completes. The TLS handshake
/// must finish within the header deadline.
pub async fn serve_tls(
    listener: TcpListener,
    app: Router,
    limits: HttpLimits,
    tls: Arc<rustls::ServerConfig>,
    shutdown: impl Future<Output = ()>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    serve_inner(listener, Mode::Tls(acceptor, app), limits, shutdown).await;
}

/// Serves TLS and plain HTTP on one port: a connection whose first byte starts a TLS
/// handshake gets `tls_app` over TLS, any other gets `plain_app`. The coordinator uses it to
/// serve its embedded relay's WebSocket (over TLS, pinned like the relay's QUIC) on the same
/// port as its public HTTP.
pub async fn serve_mixed(
    listener: TcpListener,
    plain_app: Router,
    tls_app: Router,
    limits: HttpLimits,
    tls: Arc<rustls::ServerConfig>,
    shutdown: impl Future<Output = ()>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    serve_inner(
        listener,
        Mode::Mixed(plain_app, acceptor, tls_app),
        limits,
        shutdown,
    )
    .await;
}

#[derive(Clone)]
enum Mode {
    Plain(Router),
    Tls(tokio_rustls::TlsAcceptor, Router),
    Mixed(Router, tokio_rustls::TlsAcceptor, Router),
}

/// The first byte of a TLS record carrying a handshake.
const TLS_HANDSHAKE: u8 = 0x16;

async fn serve_inner(
    listener: TcpListener,
    mode: Mode,
    limits: HttpLimits,
    shutdown: impl Future<Output = ()>,
) {
    let admission = Admission::new(limits.max_connections, limits.per_ip);
    let handshakes = Handshakes::new(limits.handshakes);
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => return,
        };
        let Some(slot) = admission.admit(peer.ip()) else {
            debug!(%peer, "connection limit reached; closing a new connection");
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let mode = mode.clone();
        let handshakes = handshakes.clone();
        let header_timeout = limits.header_timeout;
        tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + header_timeout;
            let (tls, app) = match mode {
                Mode::Plain(app) => (None, app),
                Mode::Tls(acceptor, app) => (Some(acceptor), app),
                Mode::Mixed(plain, acceptor, tls_app) => {
                    let mut first = [0u8; 1];
                    match tokio::time::timeout_at(deadline, stream.peek(&mut first)).await {
                        Ok(Ok(1)) if first[0] == TLS_HANDSHAKE => (Some(acceptor), tls_app),
                        Ok(Ok(1)) => (None, plain),
                        _ => return,
                    }
                }
            };
            let conn_slot = slot.clone();
            let svc = app.map_request(move |mut req: hyper::Request<Incoming>| {
                req.extensions_mut().insert(ConnectInfo(peer));
                req.extensions_mut().insert(conn_slot.clone());
                req.map(axum::body::Body::new)
            });
            let _slot = slot;
            // HTTP/1.1 only (with upgrades, for the WebSocket): every client here speaks it
            // (TLS offers only `http/1.1`), and an HTTP/2 connection has no header deadline, so
            // one that sent its preface and then nothing held its slot for good.
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout);
            let svc = TowerToHyperService::new(svc);
            let result = match tls {
                None => {
                    builder
                        .serve_connection(TokioIo::new(stream), svc)
                        .with_upgrades()
                        .await
                }
                Some(acceptor) => {
                    if !handshakes.allow(peer.ip(), Instant::now()) {
                        TLS_TOO_OFTEN.fetch_add(1, Ordering::Relaxed);
                        debug!(%peer, "too many TLS handshakes from this address; closing");
                        return;
                    }
                    let tls = match tokio::time::timeout_at(deadline, acceptor.accept(stream)).await
                    {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            debug!(%peer, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            debug!(%peer, "TLS handshake timed out");
                            return;
                        }
                    };
                    builder
                        .serve_connection(TokioIo::new(tls), svc)
                        .with_upgrades()
                        .await
                }
            };
            if let Err(e) = result {
                debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
}

/// `GET http://{authority}{path}` over plain HTTP/1.1, reading at most `max` bytes of the
/// answer (a hostile server cannot make the caller buffer an endless body; the caller bounds
/// the time). Fails on a non-2xx status.
pub async fn get(authority: &str, path: &str, max: usize) -> anyhow::Result<bytes::Bytes> {
    get_with(crate::dial::Dialer::PLAIN, authority, path, max).await
}

/// [`get`] over a connection made by `dialer`.
pub async fn get_with(
    dialer: crate::dial::Dialer,
    authority: &str,
    path: &str,
    max: usize,
) -> anyhow::Result<bytes::Bytes> {
    use anyhow::Context;
    let stream = dialer
        .tcp(authority)
        .await
        .with_context(|| format!("cannot connect to {authority}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = hyper::Request::builder()
        .uri(path)
        .header("host", authority)
        .body(http_body_util::Empty::<bytes::Bytes>::new())?;
    let resp = sender
        .send_request(req)
        .await
        .with_context(|| format!("{authority} did not answer GET {path}"))?;
    if !resp.status().is_success() {
        anyhow::bail!("{authority} answered {} to GET {path}", resp.status());
    }
    let body = http_body_util::Limited::new(resp.into_body(), max);
    Ok(http_body_util::BodyExt::collect(body)
        .await
        .map_err(|e| anyhow::anyhow!("reading GET {path}: {e}"))?
        .to_bytes())
}

/// The peer address a request came from, if the server recorded it.
pub fn peer_ip(info: Option<&ConnectInfo<SocketAddr>>) -> IpAddr {
    info.map_or(IpAddr::from([0, 0, 0, 0]), |c| c.0.ip())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn start(limits: HttpLimits) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new().route("/", axum::routing::get(|| async { "ok" }));
        tokio::spawn(serve(listener, app, limits, std::future::pending()));
        addr
    }

    async fn get(addr: SocketAddr) -> std::io::Result<String> {
        get_on(tokio::net::TcpStream::connect(addr).await?).await
    }

    /// Asks for `/` on `s` and reads the whole answer.
    async fn get_on<S>(mut s: S) -> std::io::Result<String>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await?;
        let mut out = String::new();
        s.read_to_string(&mut out).await?;
        Ok(out)
    }

    #[tokio::test]
    async fn a_client_that_never_finishes_its_headers_is_cut_off() {
        let addr = start(HttpLimits {
            header_timeout: Duration::from_millis(300),
            ..HttpLimits::default()
        })
        .await;
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n").await.unwrap();
        let mut buf = [0u8; 256];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("the server kept a slow client past the header deadline")
            .unwrap_or(0);
        // Closed (0) or a 408 response: either way the connection is over.
        assert!(n == 0 || String::from_utf8_lossy(&buf[..n]).contains("408"));
        assert!(get(addr).await.unwrap().contains("ok"));
    }

    /// HTTP/2 is not spoken: a client that sends its preface and then nothing is cut off at
    /// the header deadline like any slow client (an HTTP/2 connection had no deadline at all).
    #[tokio::test]
    async fn an_http2_preface_is_not_served_and_its_connection_is_cut_off() {
        let addr = start(HttpLimits {
            header_timeout: Duration::from_millis(300),
            ..HttpLimits::default()
        })
        .await;
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        // The connection preface, then an empty SETTINGS frame.
        s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
            .await
            .unwrap();
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut got))
            .await
            .expect("the server kept an HTTP/2 client past the header deadline")
            .unwrap();
        // An HTTP/2 server's first frame is its SETTINGS (type 4 at byte 3); at most an
        // HTTP/1.1 error here.
        assert!(
            got.is_empty() || got.starts_with(b"HTTP/1.1 "),
            "answered {:?}",
            String::from_utf8_lossy(&got)
        );
        assert!(get(addr).await.unwrap().contains("ok"));
    }

    #[tokio::test]
    async fn connections_beyond_the_per_address_limit_are_closed_and_others_still_served() {
        let addr = start(HttpLimits {
            per_ip: 4,
            ..HttpLimits::default()
        })
        .await;
        // Four idle connections hold every slot 127.0.0.1 has.
        let mut idle = Vec::new();
        for _ in 0..4 {
            idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let refused = get(addr).await;
        assert!(
            refused.map_or(true, |r| r.is_empty()),
            "a fifth connection was served"
        );
        drop(idle);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(get(addr).await.unwrap().contains("ok"));
    }

    #[tokio::test]
    async fn one_port_serves_plain_http_and_tls_to_different_routers() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cert = crate::tls::RelayCert::generate().unwrap();
        let tls = Arc::new(crate::tls::server_tls(&cert, &[b"http/1.1"]).unwrap());
        let plain = Router::new().route("/", axum::routing::get(|| async { "plain" }));
        let secure = Router::new().route("/", axum::routing::get(|| async { "secure" }));
        tokio::spawn(serve_mixed(
            listener,
            plain,
            secure,
            HttpLimits::default(),
            tls,
            std::future::pending(),
        ));
        assert!(get(addr).await.unwrap().ends_with("plain"));
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut s = crate::tls::connect_pinned(tcp, cert.pin(), &[b"http/1.1"])
            .await
            .unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out).await;
        assert!(out.ends_with("secure"), "{out}");
        // A client pinning another certificate does not get through.
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        assert!(
            crate::tls::connect_pinned(tcp, [0; 32], &[b"http/1.1"])
                .await
                .is_err()
        );
    }

    #[test]
    fn an_address_starts_its_burst_of_handshakes_then_one_per_interval() {
        let rate = HandshakeRate {
            burst: 4,
            interval: Duration::from_millis(100),
        };
        let h = Handshakes::new(rate);
        let t0 = Instant::now();
        let a: IpAddr = "198.51.100.7".parse().unwrap();
        let allowed =
            |ip: IpAddr, at: Instant, n: usize| (0..n).filter(|_| h.allow(ip, at)).count();
        assert_eq!(allowed(a, t0, 10), 4, "the burst");
        assert_eq!(
            allowed("198.51.100.8".parse().unwrap(), t0, 10),
            4,
            "another address"
        );
        assert_eq!(allowed(a, t0 + Duration::from_millis(99), 10), 0);
        assert_eq!(
            allowed(a, t0 + Duration::from_millis(100), 10),
            1,
            "one per interval"
        );
        assert_eq!(
            allowed(a, t0 + Duration::from_millis(350), 10),
            2,
            "no more than earned"
        );
        // Quiet for the whole burst's time: the whole burst again, and no more.
        assert_eq!(allowed(a, t0 + Duration::from_secs(5), 10), 4);
        // An IPv6 /64 is one address, an IPv4-mapped address is its IPv4 one.
        for i in 0..4 {
            assert!(h.allow(format!("2001:db8:5:6::{i}").parse().unwrap(), t0));
        }
        assert!(!h.allow("2001:db8:5:6:ffff::9".parse().unwrap(), t0));
        assert!(h.allow("2001:db8:5:7::1".parse().unwrap(), t0));
        assert!(!h.allow("::ffff:198.51.100.8".parse().unwrap(), t0));

        // The addresses tracked are bounded: past them a new one waits until some allowance
        // is whole again and its address can be let go.
        let h = Handshakes::new(rate);
        for i in 0..MAX_HANDSHAKE_SOURCES as u32 {
            assert!(h.allow(IpAddr::V4((0x0a00_0000 + i).into()), t0));
        }
        assert!(!h.allow(a, t0), "a new address past the bound");
        assert!(h.allow(IpAddr::V4(0x0a00_0000.into()), t0), "a tracked one");
        assert!(
            h.allow(a, t0 + Duration::from_millis(100)),
            "once the others' are whole"
        );
        assert!(h.due.lock().unwrap().len() <= 2);
    }

    /// What one TLS client gets from `addr`: `Ok` if its handshake and request went through.
    async fn tls_get(addr: SocketAddr, from: &str, pin: [u8; 32]) -> anyhow::Result<String> {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind(format!("{from}:0").parse()?)?;
        let tcp = socket.connect(addr).await?;
        let s = crate::tls::connect_pinned(tcp, pin, &[b"http/1.1"]).await?;
        Ok(get_on(s).await?)
    }

    #[tokio::test]
    async fn an_address_making_tls_handshakes_too_often_is_closed_before_them_and_others_are_not() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cert = crate::tls::RelayCert::generate().unwrap();
        let tls = Arc::new(crate::tls::server_tls(&cert, &[b"http/1.1"]).unwrap());
        let app = Router::new().route("/", axum::routing::get(|| async { "secure" }));
        let limits = HttpLimits {
            handshakes: HandshakeRate {
                burst: 5,
                interval: Duration::from_millis(500),
            },
            ..HttpLimits::default()
        };
        tokio::spawn(serve_tls(
            listener,
            app,
            limits,
            tls,
            std::future::pending(),
        ));
        let before = tls_handshakes_too_often();
        let start = Instant::now();
        let mut served = 0;
        for _ in 0..20 {
            if tls_get(addr, "127.0.0.1", cert.pin())
                .await
                .is_ok_and(|r| r.ends_with("secure"))
            {
                served += 1;
            }
        }
        // The burst, and one more for each half second the twenty took.
        let earned = 5 + (start.elapsed().as_millis() / 500) as usize;
        assert!(
            (5..=earned).contains(&served),
            "{served} of 20 handshakes from one address served, {earned} allowed"
        );
        assert!(tls_handshakes_too_often() - before >= (20 - served) as u64);
        // Another address is served meanwhile, and the first one again after a pause.
        let other = tls_get(addr, "127.0.0.2", cert.pin()).await.unwrap();
        assert!(other.ends_with("secure"), "{other}");
        tokio::time::sleep(Duration::from_millis(600)).await;
        let again = tls_get(addr, "127.0.0.1", cert.pin()).await.unwrap();
        assert!(again.ends_with("secure"), "{again}");
    }
}
