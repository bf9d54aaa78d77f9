//! Traffic for the e2e tests, run inside lab namespaces:
//! timestamped UDP streams (to see exactly when a peer stops accepting packets), checksummed
//! TCP transfers, and long-lived TCP connections that report when they are cut.
#![allow(clippy::print_stdout)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use clap::{Parser, Subcommand};
use sha2::{Digest, Sha256};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve an OpenID issuer's discovery document and the JWK set in `--jwks` (read again
    /// for every request, so keys can rotate) over plain HTTP for `--seconds`.
    Issuer {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        jwks: std::path::PathBuf,
        #[arg(long)]
        seconds: u64,
    },
    /// Sign a device in as a person would in a browser (see `e2e::browser::sign_in`): the
    /// sign-in page at `url` must show `code`; signs in at the provider as `sub`. Prints
    /// `callback <URL>`, `status <code>` and the coordinator's final page; exits 1 unless it
    /// answered 200.
    SignIn {
        #[arg(long)]
        url: String,
        #[arg(long)]
        code: String,
        #[arg(long)]
        sub: String,
    },
    /// One plain-http request; prints `status <code>` and the body.
    Http {
        #[arg(long, default_value = "GET")]
        method: String,
        #[arg(long)]
        url: String,
        #[arg(long)]
        json: Option<String>,
    },
    /// Print `<recv unix ms> <seq> <sent unix ms>` for every datagram received.
    UdpRecv {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        seconds: u64,
    },
    /// Send `<seq> <sent unix ms>` datagrams at a fixed interval.
    UdpSend {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 50)]
        interval_ms: u64,
        #[arg(long)]
        seconds: u64,
    },
    /// Accept one connection, read it to the end, print `<bytes> <sha256>` (and the client's
    /// address, as `peer <addr>`, on stderr).
    TcpRecv {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Forward UDP between the last client of `listen` and `upstream` (from a socket bound to
    /// `upstream_bind`); with `--tamper-frames`, flip a byte in every Lattice frame.
    UdpProxy {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        upstream: SocketAddr,
        #[arg(long)]
        upstream_bind: SocketAddr,
        #[arg(long)]
        tamper_frames: bool,
    },
    /// Echo every connection (one thread each) for `seconds`; print `reset <unix ms>` when a
    /// connection is reset.
    TcpEcho {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        seconds: u64,
    },
    /// Connect and exchange a byte every 100 ms for up to `seconds`. Prints `connected <ms>`,
    /// then `closed <unix ms> <why>` when the connection dies or `alive` at the end. Exits 1
    /// if it cannot connect within 3 s.
    TcpHold {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        seconds: u64,
        /// Exchange a byte every this many milliseconds (a long interval leaves the
        /// connection idle in between); a reply must come within 5 s.
        #[arg(long, default_value_t = 100)]
        interval_ms: u64,
    },
    /// Try to connect within `timeout_ms`; print `open` (exit 0) or `blocked: <why>` (exit 1).
    TcpProbe {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 2000)]
        timeout_ms: u64,
    },
    /// Try to open a relay session as the node with private key `node_secret` (hex), with a
    /// ticket signed by `ticket_seed` (hex; the coordinator's is its state dir's `ticket.key`).
    /// Prints `accepted` (exit 0) or `rejected: <why>` (exit 1).
    RelayProbe {
        #[command(flatten)]
        login: RelayLogin,
    },
    /// Connects to a relay's WebSocket as `relay-probe` does, then sends `to` 1,200-byte
    /// packets for `seconds`, as many as its queue takes; prints `sent <n>`.
    RelayFlood {
        #[command(flatten)]
        login: RelayLogin,
        #[arg(long)]
        to: wire::NodeKey,
        #[arg(long)]
        seconds: u64,
    },
    /// Junk at a node's UDP port for `seconds` (see `e2e::abuse::junk_flood`); prints
    /// `sent <n>`.
    JunkFlood {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        target_key: wire::NodeKey,
        #[arg(long)]
        peer_key: wire::NodeKey,
        #[arg(long)]
        seconds: u64,
        #[arg(long, default_value_t = 20_000)]
        rate: u64,
    },
    /// WireGuard initiations with a correct mac1 at a node's UDP port for `seconds` (see
    /// `e2e::abuse::wg_flood`); prints `sent <n>`.
    WgFlood {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        target_key: wire::NodeKey,
        #[arg(long)]
        seconds: u64,
        #[arg(long, default_value_t = 5_000)]
        rate: u64,
    },
    /// A handshake flood and half-open WebSockets at `/control`; prints
    /// `answered <n> refused <n> half-open <n>`.
    ControlFlood {
        #[arg(long)]
        url: String,
        #[arg(long)]
        control_key: wire::ControlKey,
        #[arg(long)]
        seconds: u64,
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        #[arg(long, default_value_t = 0)]
        half_open: usize,
    },
    /// `flows` new UDP flows (source port x `ports` destination ports); prints `sent <n>`.
    UdpSpray {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        flows: u64,
        #[arg(long, default_value_t = 1000)]
        ports: u16,
        #[arg(long, default_value_t = 30)]
        seconds: u64,
    },
    /// Captures the UDP payloads sent to `dst` seen on `iface` for `seconds` into `out`;
    /// prints `captured <n>`.
    UdpCapture {
        #[arg(long)]
        iface: String,
        #[arg(long)]
        dst: SocketAddr,
        #[arg(long)]
        seconds: u64,
        #[arg(long)]
        out: std::path::PathBuf,
    },
    /// Accepts one connection and, `after_ms` later, sends it `push` unprompted (the peer
    /// speaks first after a silence).
    TcpPush {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        after_ms: u64,
    },
    /// Connects and waits up to `timeout_ms` for 4 bytes; prints `connected <ms>`, then
    /// `received <ms>` or `timeout <why>`.
    TcpWait {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        timeout_ms: u64,
    },
    /// Sends every datagram of a capture file to `to` and counts what comes back within 2 s;
    /// prints `replayed <n> answered <n>`.
    UdpReplay {
        #[arg(long)]
        file: std::path::PathBuf,
        #[arg(long)]
        to: SocketAddr,
    },
    /// Send `bytes` pseudo-random bytes from `seed`, print `<bytes> <sha256>`.
    TcpSend {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long)]
        bytes: u64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
}

fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}

/// How `relay-probe` and `relay-flood` reach a relay's WebSocket, and as which node.
#[derive(clap::Args)]
struct RelayLogin {
    #[arg(long)]
    websocket: String,
    /// The relay's certificate pin (64 hex digits).
    #[arg(long)]
    cert_sha256: String,
    #[arg(long)]
    relay_key: wire::RelayKey,
    #[arg(long)]
    node_secret: String,
    #[arg(long)]
    ticket_seed: String,
}

/// The relay (over its WebSocket), the node with private key `node_secret` (hex) and a ticket
/// for it signed with the ticket-key `ticket_seed` (hex), as a node would hold one.
fn relay_login(
    RelayLogin {
        websocket,
        cert_sha256,
        relay_key,
        node_secret,
        ticket_seed,
    }: RelayLogin,
) -> anyhow::Result<(wire::RelayInfo, hybrid::StaticKeypair, Vec<u8>)> {
    let secret = wire::keys::parse_hex::<32>(node_secret.trim()).context("--node-secret")?;
    let seed = wire::keys::parse_hex::<32>(ticket_seed.trim()).context("--ticket-seed")?;
    let node = hybrid::StaticKeypair::from_secret(secret);
    let not_after = (now_ms() / 1000) as i64 + 60;
    let ticket = hybrid::ticket::TicketSigner::from_seed(seed).issue(hybrid::ticket::Ticket {
        node_key: node.public(),
        not_after,
    });
    let info = wire::RelayInfo {
        id: wire::RelayId(0),
        name: "probe".into(),
        key: relay_key,
        quic: None,
        cert_sha256: Some(wire::CertPin(
            wire::keys::parse_hex::<32>(cert_sha256.trim()).context("--cert-sha256")?,
        )),
        websocket: Some(websocket),
        stun: vec![],
    };
    Ok((info, node, ticket.to_vec()))
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Issuer {
            listen,
            jwks,
            seconds,
        } => serve_issuer(listen, &jwks, Duration::from_secs(seconds))?,
        Cmd::SignIn { url, code, sub } => {
            let done = e2e::browser::sign_in(&url, &code, &sub)?;
            println!("callback {}", done.callback);
            println!("status {}", done.page.status);
            println!("{}", done.page.body);
            if done.page.status != 200 {
                std::process::exit(1);
            }
        }
        Cmd::Http { method, url, json } => {
            let r = e2e::browser::request(
                &method,
                &url,
                json.as_ref().map(|_| "application/json"),
                json.as_deref().unwrap_or(""),
            )?;
            println!("status {}", r.status);
            println!("{}", r.body);
        }
        Cmd::UdpRecv { listen, seconds } => {
            let s = UdpSocket::bind(listen).with_context(|| format!("binding {listen}"))?;
            s.set_read_timeout(Some(Duration::from_millis(200)))?;
            let end = Instant::now() + Duration::from_secs(seconds);
            let mut buf = [0u8; 256];
            let mut out = std::io::stdout().lock();
            while Instant::now() < end {
                if let Ok((n, _)) = s.recv_from(&mut buf) {
                    let text = String::from_utf8_lossy(&buf[..n]);
                    writeln!(out, "{} {text}", now_ms())?;
                    out.flush()?;
                }
            }
        }
        Cmd::UdpSend {
            to,
            interval_ms,
            seconds,
        } => {
            let bind: SocketAddr = if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse()?;
            let s = UdpSocket::bind(bind)?;
            let end = Instant::now() + Duration::from_secs(seconds);
            let mut seq = 0u64;
            while Instant::now() < end {
                let _ = s.send_to(format!("{seq} {}", now_ms()).as_bytes(), to);
                seq += 1;
                std::thread::sleep(Duration::from_millis(interval_ms));
            }
        }
        Cmd::TcpRecv { listen } => {
            let l = TcpListener::bind(listen).with_context(|| format!("binding {listen}"))?;
            let (mut c, peer) = l.accept()?;
            eprintln!("peer {peer}");
            let mut h = Sha256::new();
            let mut total = 0u64;
            let mut buf = vec![0u8; 1 << 16];
            loop {
                let n = c.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
                total += n as u64;
            }
            println!("{total} {}", hex(&h.finalize()));
        }
        Cmd::UdpProxy {
            listen,
            upstream,
            upstream_bind,
            tamper_frames,
        } => {
            let front = std::sync::Arc::new(UdpSocket::bind(listen)?);
            let back = std::sync::Arc::new(UdpSocket::bind(upstream_bind)?);
            let client = std::sync::Arc::new(std::sync::Mutex::new(None::<SocketAddr>));
            let tamper = move |b: &mut [u8]| {
                if tamper_frames && b.starts_with(b"LTC\x01") && b.len() > 12 {
                    let n = b.len();
                    b[n - 1] ^= 0x01;
                }
            };
            let (f2, b2, c2) = (front.clone(), back.clone(), client.clone());
            std::thread::spawn(move || {
                let mut buf = [0u8; 2048];
                while let Ok((n, _)) = b2.recv_from(&mut buf) {
                    tamper(&mut buf[..n]);
                    let to = *c2.lock().expect("lock");
                    if let Some(to) = to {
                        let _ = f2.send_to(&buf[..n], to);
                    }
                }
            });
            let mut buf = [0u8; 2048];
            loop {
                let (n, from) = front.recv_from(&mut buf)?;
                *client.lock().expect("lock") = Some(from);
                tamper(&mut buf[..n]);
                let _ = back.send_to(&buf[..n], upstream);
            }
        }
        Cmd::TcpEcho { listen, seconds } => {
            let l = TcpListener::bind(listen).with_context(|| format!("binding {listen}"))?;
            l.set_nonblocking(true)?;
            let end = Instant::now() + Duration::from_secs(seconds);
            while Instant::now() < end {
                match l.accept() {
                    Ok((c, _)) => {
                        c.set_nonblocking(false)?;
                        std::thread::spawn(move || echo(c));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        }
        Cmd::TcpHold {
            to,
            seconds,
            interval_ms,
        } => {
            let mut c = match TcpStream::connect_timeout(&to, Duration::from_secs(3)) {
                Ok(c) => c,
                Err(e) => {
                    println!("blocked: {e}");
                    std::process::exit(1);
                }
            };
            c.set_read_timeout(Some(Duration::from_secs(5)))?;
            println!("connected {}", now_ms());
            std::io::stdout().flush()?;
            let end = Instant::now() + Duration::from_secs(seconds);
            let mut b = [0u8; 1];
            while Instant::now() < end {
                let r = c.write_all(b"x").and_then(|()| c.read_exact(&mut b));
                if let Err(e) = r {
                    println!("closed {} {:?}", now_ms(), e.kind());
                    return Ok(());
                }
                std::thread::sleep(Duration::from_millis(interval_ms));
            }
            println!("alive");
        }
        Cmd::TcpProbe { to, timeout_ms } => {
            match TcpStream::connect_timeout(&to, Duration::from_millis(timeout_ms)) {
                Ok(_) => println!("open"),
                Err(e) => {
                    println!("blocked: {:?}", e.kind());
                    std::process::exit(1);
                }
            }
        }
        Cmd::RelayProbe { login } => {
            let (info, node, ticket) = relay_login(login)?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            match rt.block_on(relay::client::connect(&info, &node, &ticket)) {
                Ok(_) => println!("accepted"),
                Err(e) => {
                    println!("rejected: {e:#}");
                    std::process::exit(1);
                }
            }
        }
        Cmd::RelayFlood { login, to, seconds } => {
            let (info, node, ticket) = relay_login(login)?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let sent = rt.block_on(async {
                let conn = relay::client::connect(&info, &node, &ticket).await?;
                let end = Instant::now() + Duration::from_secs(seconds);
                let packet = [0x5au8; 1200];
                let mut sent = 0u64;
                while Instant::now() < end {
                    if conn.send(to.as_bytes(), &packet) {
                        sent += 1;
                    } else {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    if sent.is_multiple_of(64) {
                        tokio::task::yield_now().await;
                    }
                }
                anyhow::Ok(sent)
            })?;
            println!("sent {sent}");
        }
        Cmd::JunkFlood {
            to,
            target_key,
            peer_key,
            seconds,
            rate,
        } => {
            let n = e2e::abuse::junk_flood(to, target_key, peer_key, seconds, rate)?;
            println!("sent {n}");
        }
        Cmd::WgFlood {
            to,
            target_key,
            seconds,
            rate,
        } => {
            let n = e2e::abuse::wg_flood(to, target_key, seconds, rate)?;
            println!("sent {n}");
        }
        Cmd::ControlFlood {
            url,
            control_key,
            seconds,
            concurrency,
            half_open,
        } => {
            let (ok, refused, held) = e2e::abuse::control_flood(
                &url,
                *control_key.as_bytes(),
                seconds,
                concurrency,
                half_open,
            )?;
            println!("answered {ok} refused {refused} half-open {held}");
        }
        Cmd::UdpSpray {
            to,
            flows,
            ports,
            seconds,
        } => {
            println!("sent {}", e2e::abuse::udp_spray(to, flows, ports, seconds)?);
        }
        Cmd::UdpCapture {
            iface,
            dst,
            seconds,
            out,
        } => {
            let d = e2e::abuse::udp_capture(&iface, dst, seconds)?;
            std::fs::write(&out, e2e::abuse::encode_capture(&d))?;
            println!("captured {}", d.len());
        }
        Cmd::UdpReplay { file, to } => {
            let d = e2e::abuse::decode_capture(&std::fs::read(&file)?);
            let s = UdpSocket::bind("0.0.0.0:0")?;
            for b in &d {
                s.send_to(b, to)?;
                std::thread::sleep(Duration::from_micros(200));
            }
            // Whatever the target sends back to the replayer within 2 s.
            s.set_read_timeout(Some(Duration::from_millis(100)))?;
            let end = Instant::now() + Duration::from_secs(2);
            let mut answered = 0;
            let mut buf = [0u8; 2048];
            while Instant::now() < end {
                if s.recv_from(&mut buf).is_ok() {
                    answered += 1;
                }
            }
            println!("replayed {} answered {answered}", d.len());
        }
        Cmd::TcpPush { listen, after_ms } => {
            let l = TcpListener::bind(listen).with_context(|| format!("binding {listen}"))?;
            let (mut c, _) = l.accept()?;
            std::thread::sleep(Duration::from_millis(after_ms));
            c.write_all(b"push")?;
            std::thread::sleep(Duration::from_secs(30));
        }
        Cmd::TcpWait { to, timeout_ms } => {
            let mut c = TcpStream::connect_timeout(&to, Duration::from_secs(3))?;
            println!("connected {}", now_ms());
            std::io::stdout().flush()?;
            c.set_read_timeout(Some(Duration::from_millis(timeout_ms)))?;
            let mut b = [0u8; 4];
            match c.read_exact(&mut b) {
                Ok(()) => println!("received {}", now_ms()),
                Err(e) => println!("timeout {:?}", e.kind()),
            }
        }
        Cmd::TcpSend { to, bytes, seed } => {
            let mut c = TcpStream::connect_timeout(&to, Duration::from_secs(10))
                .with_context(|| format!("connecting to {to}"))?;
            let mut h = Sha256::new();
            let mut state = seed | 1;
            let mut left = bytes;
            let mut buf = vec![0u8; 1 << 16];
            while left > 0 {
                let n = left.min(buf.len() as u64) as usize;
                for chunk in buf[..n].chunks_mut(8) {
                    // xorshift64: fast, deterministic filler
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    let b = state.to_le_bytes();
                    chunk.copy_from_slice(&b[..chunk.len()]);
                }
                c.write_all(&buf[..n])?;
                h.update(&buf[..n]);
                left -= n as u64;
            }
            c.shutdown(std::net::Shutdown::Write)?;
            // Wait for the receiver to close, so all data has been read.
            let _ = c.read(&mut [0u8; 1]);
            println!("{bytes} {}", hex(&h.finalize()));
        }
    }
    Ok(())
}

fn echo(mut c: TcpStream) {
    let mut buf = [0u8; 4096];
    loop {
        match c.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if c.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e) => {
                if e.kind() == std::io::ErrorKind::ConnectionReset {
                    println!("reset {}", now_ms());
                    let _ = std::io::stdout().flush();
                }
                return;
            }
        }
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A one-request-per-connection HTTP/1.0-style server for two paths.
fn serve_issuer(listen: SocketAddr, jwks: &std::path::Path, for_: Duration) -> anyhow::Result<()> {
    let l = TcpListener::bind(listen).with_context(|| format!("binding {listen}"))?;
    l.set_nonblocking(true)?;
    let issuer = format!("http://{listen}");
    let end = Instant::now() + for_;
    println!("issuer {issuer} serving");
    while Instant::now() < end {
        let mut s = match l.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        s.set_nonblocking(false)?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        let mut req = Vec::new();
        let mut buf = [0u8; 1024];
        while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 8192 {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => req.extend_from_slice(&buf[..n]),
            }
        }
        let line = String::from_utf8_lossy(&req);
        let path = line.split_whitespace().nth(1).unwrap_or("");
        let (status, body) = match path {
            "/.well-known/openid-configuration" => (
                "200 OK",
                serde_json::json!({"issuer": issuer, "jwks_uri": format!("{issuer}/jwks")})
                    .to_string(),
            ),
            "/jwks" => match std::fs::read_to_string(jwks) {
                Ok(b) => ("200 OK", b),
                Err(_) => ("500 Internal Server Error", String::new()),
            },
            _ => ("404 Not Found", String::new()),
        };
        println!("{} GET {path} {status}", now_ms());
        let _ = write!(
            s,
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        );
    }
    Ok(())
}
