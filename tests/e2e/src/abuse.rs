//! Hostile traffic for the abuse tests, each bounded in time: junk at a node's UDP port, a
//! handshake flood and half-open WebSockets at a coordinator's `/control`, new UDP flows by
//! the ten thousand, and capturing datagrams to replay them later.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::Context;
use rand::{RngExt, SeedableRng, rngs::StdRng};

/// Sends junk to `to` for `seconds`, at most `rate` datagrams a second, cycling through what a
/// stranger or a peer's impostor can send: random bytes, two-chunk post-quantum messages with
/// a correct `mac1` (the attacker read `target`'s key from a netmap) and junk inside,
/// WireGuard-shaped handshake initiations, disco frames in `peer`'s name, and one-frame
/// "message 1"s without valid MACs. Returns the number sent.
pub fn junk_flood(
    to: SocketAddr,
    target: wire::NodeKey,
    peer: wire::NodeKey,
    seconds: u64,
    rate: u64,
) -> anyhow::Result<u64> {
    let sock = UdpSocket::bind("0.0.0.0:0")?;
    let mut rng = StdRng::seed_from_u64(7);
    let mac1 = node_proto::frame::Mac1Key::new(&target);
    let end = Instant::now() + Duration::from_secs(seconds);
    let mut sent = 0u64;
    let started = Instant::now();
    while Instant::now() < end {
        let d: Vec<Vec<u8>> = match sent % 5 {
            0 => vec![
                (0..rng.random_range(1..1400))
                    .map(|_| rng.random())
                    .collect(),
            ],
            1 => {
                let junk: Vec<u8> = (0..1300).map(|_| rng.random()).collect();
                node_proto::frame::Message::new(
                    node_proto::frame::Kind::PqInit,
                    rng.random(),
                    &junk,
                )
                .frames(&mac1, None)
                .into_iter()
                .map(|(f, _)| f)
                .collect()
            }
            2 => {
                let mut w = vec![1u8, 0, 0, 0];
                w.extend((0..144).map(|_| rng.random::<u8>()));
                vec![w]
            }
            3 => {
                let sealed: Vec<u8> = (0..40).map(|_| rng.random()).collect();
                vec![node_proto::disco::frame(peer.as_bytes(), &sealed)]
            }
            _ => {
                // A whole "message 1" in one frame, junk inside, without valid MACs: what a
                // stranger who knows only the frame layout sends.
                let mut f = b"LTC\x01\x01".to_vec();
                f.extend_from_slice(&rng.random::<u32>().to_be_bytes());
                f.extend_from_slice(&[0, 1]);
                f.extend((0..900).map(|_| rng.random::<u8>()));
                vec![f]
            }
        };
        for b in d {
            let _ = sock.send_to(&b, to);
            sent += 1;
        }
        pace(started, sent, rate);
    }
    Ok(sent)
}

/// Sends WireGuard handshake initiations with a correct mac1 (the attacker read `target`'s key
/// from a netmap) and junk inside to `to` for `seconds`, `rate` a second: past the target's
/// limit for this source address, every handshake from the address needs a cookie. Returns
/// the number sent.
pub fn wg_flood(
    to: SocketAddr,
    target: wire::NodeKey,
    seconds: u64,
    rate: u64,
) -> anyhow::Result<u64> {
    let sock = UdpSocket::bind("0.0.0.0:0")?;
    let mut rng = StdRng::seed_from_u64(11);
    let end = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let mut sent = 0u64;
    while Instant::now() < end {
        let mut m = [0u8; 148];
        rand::Rng::fill_bytes(&mut rng, &mut m);
        m[..4].copy_from_slice(&[1, 0, 0, 0]);
        node_proto::wg::message::set_mac1(&mut m, target.as_bytes());
        let _ = sock.send_to(&m, to);
        sent += 1;
        pace(started, sent, rate);
    }
    Ok(sent)
}

/// Sleeps until `sent` datagrams are due at `rate` a second since `started`.
fn pace(started: Instant, sent: u64, rate: u64) {
    let due = Duration::from_secs_f64(sent as f64 / rate as f64);
    if let Some(wait) = due.checked_sub(started.elapsed()) {
        std::thread::sleep(wait);
    }
}

/// Floods `url`'s `/control` for `seconds`: `concurrency` workers each opening sessions with a
/// fresh message 1 as fast as the coordinator lets them, plus `half_open` WebSockets opened
/// and left silent. Returns (handshakes answered, sessions refused, half-open sockets held).
pub fn control_flood(
    url: &str,
    control_key: [u8; 32],
    seconds: u64,
    concurrency: usize,
    half_open: usize,
) -> anyhow::Result<(u64, u64, usize)> {
    let ws_url = format!(
        "ws://{}/control",
        url.strip_prefix("http://").context("an http:// URL")?
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        use futures_util::{SinkExt, StreamExt};
        use tokio_tungstenite::tungstenite::Message;
        let end = tokio::time::Instant::now() + Duration::from_secs(seconds);
        let mut held = Vec::new();
        for _ in 0..half_open {
            if let Ok(Ok((ws, _))) = tokio::time::timeout(
                Duration::from_secs(2),
                tokio_tungstenite::connect_async(ws_url.as_str()),
            )
            .await
            {
                held.push(ws);
            }
        }
        let holding = held.len();
        let mut tasks = Vec::new();
        for w in 0..concurrency {
            let ws_url = ws_url.clone();
            tasks.push(tokio::spawn(async move {
                let (mut ok, mut refused) = (0u64, 0u64);
                let mut rng = StdRng::seed_from_u64(w as u64);
                while tokio::time::Instant::now() < end {
                    let machine = hybrid::StaticKeypair::generate(&mut rng);
                    let Ok((_, m1)) = hybrid::InitiatorHandshake::start(
                        &mut rng,
                        hybrid::Purpose::Control,
                        &machine,
                        &control_key,
                        &hybrid::Psk::zero(),
                        &[],
                    ) else {
                        continue;
                    };
                    let attempt = async {
                        let (mut ws, _) = tokio_tungstenite::connect_async(ws_url.as_str())
                            .await
                            .ok()?;
                        ws.send(Message::Binary(m1.into())).await.ok()?;
                        loop {
                            match ws.next().await {
                                Some(Ok(Message::Binary(_))) => return Some(()),
                                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                                _ => return None,
                            }
                        }
                    };
                    match tokio::time::timeout(Duration::from_secs(3), attempt).await {
                        Ok(Some(())) => ok += 1,
                        _ => {
                            refused += 1;
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                }
                (ok, refused)
            }));
        }
        let (mut ok, mut refused) = (0, 0);
        for t in tasks {
            if let Ok((o, r)) = t.await {
                ok += o;
                refused += r;
            }
        }
        tokio::time::sleep_until(end).await;
        drop(held);
        Ok((ok, refused, holding))
    })
}

/// Opens `flows` UDP flows to `to`'s address within `seconds`: one datagram per (source
/// port, destination port) pair, over `ports` destination ports from `to`'s port up. Returns
/// the number sent.
pub fn udp_spray(to: SocketAddr, flows: u64, ports: u16, seconds: u64) -> anyhow::Result<u64> {
    let started = Instant::now();
    let end = started + Duration::from_secs(seconds);
    let ports = u64::from(ports.max(1));
    // Spread evenly over the time given: the point is many flows, not a bandwidth flood the
    // tunnel would shed.
    let per_flow = Duration::from_secs(seconds).as_secs_f64() / flows.max(1) as f64;
    let mut sent = 0;
    while sent < flows && Instant::now() < end {
        let s = UdpSocket::bind("0.0.0.0:0")?;
        for p in 0..ports.min(flows - sent) {
            let port = to.port().wrapping_add(u16::try_from(p).unwrap_or(0));
            if s.send_to(b"flow", SocketAddr::new(to.ip(), port)).is_ok() {
                sent += 1;
            }
            let due = Duration::from_secs_f64(per_flow * sent as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(wait);
            }
        }
    }
    Ok(sent)
}

/// Captures the payloads of UDP datagrams to `dst` arriving on interface `iface` for
/// `seconds` (an `AF_PACKET` socket; root in the namespace), length-prefixed.
pub fn udp_capture(iface: &str, dst: SocketAddr, seconds: u64) -> anyhow::Result<Vec<Vec<u8>>> {
    let SocketAddr::V4(dst) = dst else {
        anyhow::bail!("IPv4 only");
    };
    let name = std::ffi::CString::new(iface)?;
    // SAFETY: if_nametoindex reads a NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    anyhow::ensure!(index != 0, "no interface {iface}");
    let proto = (libc::ETH_P_IP as u16).to_be();
    // SAFETY: plain socket creation; the fd is owned below.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_DGRAM, i32::from(proto)) };
    anyhow::ensure!(
        fd >= 0,
        "AF_PACKET socket: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: fd is a socket we just created and nobody else owns.
    let sock: std::os::fd::OwnedFd = unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) };
    // SAFETY: an all-zero sockaddr_ll is valid; the fields are set before use.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = proto;
    sll.sll_ifindex = index as i32;
    // SAFETY: sll is a valid sockaddr_ll of the size passed.
    let r = unsafe {
        libc::bind(
            std::os::fd::AsRawFd::as_raw_fd(&sock),
            (&raw const sll).cast(),
            size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    anyhow::ensure!(
        r == 0,
        "binding to {iface}: {}",
        std::io::Error::last_os_error()
    );
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 200_000,
    };
    // SAFETY: setting a timeval option on our socket.
    unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&sock),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const tv).cast(),
            size_of::<libc::timeval>() as u32,
        );
    }
    let end = Instant::now() + Duration::from_secs(seconds);
    let mut out = Vec::new();
    let mut buf = vec![0u8; 65536];
    while Instant::now() < end {
        // SAFETY: buf is valid for its length.
        let n = unsafe {
            libc::recv(
                std::os::fd::AsRawFd::as_raw_fd(&sock),
                buf.as_mut_ptr().cast(),
                buf.len(),
                0,
            )
        };
        let Ok(n) = usize::try_from(n) else {
            continue;
        };
        let p = &buf[..n];
        if p.len() < 28 || p[0] >> 4 != 4 || p[9] != 17 {
            continue;
        }
        let ihl = usize::from(p[0] & 0x0f) * 4;
        let to_ip = Ipv4Addr::new(p[16], p[17], p[18], p[19]);
        let Some(udp) = p.get(ihl..) else { continue };
        if udp.len() < 8 {
            continue;
        }
        let to_port = u16::from_be_bytes([udp[2], udp[3]]);
        if to_ip == *dst.ip() && to_port == dst.port() {
            out.push(udp[8..].to_vec());
        }
    }
    Ok(out)
}

/// Encodes captured datagrams for a file.
pub fn encode_capture(datagrams: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for d in datagrams {
        out.extend_from_slice(&u32::try_from(d.len()).unwrap_or(0).to_be_bytes());
        out.extend_from_slice(d);
    }
    out
}

/// Decodes a capture file.
pub fn decode_capture(mut b: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while b.len() >= 4 {
        let n = u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize;
        let Some(d) = b.get(4..4 + n) else { break };
        out.push(d.to_vec());
        b = &b[4 + n..];
    }
    out
}
