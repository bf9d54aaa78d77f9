//! The node's DNS resolver at 100.100.100.100 (hickory-server).
//!
//! Mesh names (`db-1`, `db-1.mesh.internal`) and reverse lookups of overlay addresses are
//! answered from the netmap; everything else is forwarded to the upstream servers this host
//! had in /etc/resolv.conf when the node started (the file is read, never written).

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use hickory_proto::op::{Header, HeaderCounts, Message, Metadata, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, PTR};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use hickory_server::net::runtime::Time;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::watch;
use tracing::{debug, info};

const TTL: u32 = 60;
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);

/// Mesh names and addresses, rebuilt on every netmap change.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DnsTable {
    domain: String,
    names: BTreeMap<String, Vec<IpAddr>>,
    reverse: HashMap<IpAddr, String>,
}

impl DnsTable {
    /// Builds the table from `(short name, addresses)` pairs.
    pub fn new(domain: &str, records: Vec<(String, Vec<IpAddr>)>) -> Self {
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        let mut names = BTreeMap::new();
        let mut reverse = HashMap::new();
        for (name, addrs) in records {
            let name = name.to_ascii_lowercase();
            for a in &addrs {
                reverse.insert(*a, format!("{name}.{domain}."));
            }
            names.insert(name, addrs);
        }
        Self {
            domain,
            names,
            reverse,
        }
    }
}

/// What to do with a query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Address records.
    Addresses(Vec<IpAddr>),
    /// A reverse-lookup answer.
    Pointer(String),
    /// The name exists but has no records of this type.
    NoData,
    /// The name is in the mesh domain but does not exist.
    NxDomain,
    /// Not ours: ask upstream.
    Forward,
}

/// Decides how to answer `qname`/`qtype` from the table.
pub fn resolve(table: &DnsTable, qname: &str, qtype: RecordType) -> Answer {
    let q = qname.trim_end_matches('.').to_ascii_lowercase();
    if q.ends_with(".in-addr.arpa") || q.ends_with(".ip6.arpa") {
        return match reverse_ip(&q).and_then(|ip| table.reverse.get(&ip)) {
            Some(name) if qtype == RecordType::PTR => Answer::Pointer(name.clone()),
            Some(_) => Answer::NoData,
            None => Answer::Forward,
        };
    }
    let in_domain = !table.domain.is_empty()
        && (q == table.domain || q.ends_with(&format!(".{}", table.domain)));
    let label = if in_domain {
        q.strip_suffix(&table.domain)
            .and_then(|s| s.strip_suffix('.'))
    } else if !q.contains('.') {
        Some(q.as_str())
    } else {
        None
    };
    let Some(label) = label else {
        return if in_domain {
            Answer::NoData
        } else {
            Answer::Forward
        };
    };
    let Some(addrs) = table.names.get(label) else {
        return if in_domain {
            Answer::NxDomain
        } else {
            Answer::Forward
        };
    };
    let wanted: Vec<IpAddr> = addrs
        .iter()
        .copied()
        .filter(|a| match qtype {
            RecordType::A => a.is_ipv4(),
            RecordType::AAAA => a.is_ipv6(),
            RecordType::ANY => true,
            _ => false,
        })
        .collect();
    if wanted.is_empty() {
        Answer::NoData
    } else {
        Answer::Addresses(wanted)
    }
}

fn reverse_ip(q: &str) -> Option<IpAddr> {
    if let Some(v4) = q.strip_suffix(".in-addr.arpa") {
        let mut octets: Vec<u8> = v4
            .split('.')
            .map(|p| p.parse().ok())
            .collect::<Option<_>>()?;
        if octets.len() != 4 {
            return None;
        }
        octets.reverse();
        return Some(IpAddr::from([octets[0], octets[1], octets[2], octets[3]]));
    }
    let v6 = q.strip_suffix(".ip6.arpa")?;
    let nibbles: Vec<u8> = v6
        .split('.')
        .map(|p| {
            u8::from_str_radix(p, 16)
                .ok()
                .filter(|n| *n < 16 && p.len() == 1)
        })
        .collect::<Option<_>>()?;
    if nibbles.len() != 32 {
        return None;
    }
    let mut bytes = [0u8; 16];
    for (i, pair) in nibbles
        .iter()
        .rev()
        .collect::<Vec<_>>()
        .chunks(2)
        .enumerate()
    {
        bytes[i] = (pair[0] << 4) | pair[1];
    }
    Some(IpAddr::from(bytes))
}

/// What the resolver answered, by kind (for `lattice status --json` and metrics).
#[derive(Debug, Default)]
pub struct DnsCounters {
    /// Mesh names and reverse lookups answered from the netmap.
    pub answered: std::sync::atomic::AtomicU64,
    /// Mesh names that do not exist.
    pub nxdomain: std::sync::atomic::AtomicU64,
    /// Other names, answered by an upstream server.
    pub forwarded: std::sync::atomic::AtomicU64,
    /// Other names no upstream answered.
    pub failed: std::sync::atomic::AtomicU64,
}

/// The hickory request handler.
pub struct MeshResolver {
    table: watch::Receiver<Arc<DnsTable>>,
    upstreams: Vec<SocketAddr>,
    counters: Arc<DnsCounters>,
}

impl MeshResolver {
    /// A resolver answering from `table` and forwarding to `upstreams`, counting in
    /// `counters`.
    pub fn new(
        table: watch::Receiver<Arc<DnsTable>>,
        upstreams: Vec<SocketAddr>,
        counters: Arc<DnsCounters>,
    ) -> Self {
        Self {
            table,
            upstreams,
            counters,
        }
    }

    fn count(&self, c: &std::sync::atomic::AtomicU64) {
        c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    async fn forward(&self, raw: &[u8]) -> Option<Message> {
        for up in &self.upstreams {
            let bind: SocketAddr = if up.is_ipv4() {
                "0.0.0.0:0".parse().ok()?
            } else {
                "[::]:0".parse().ok()?
            };
            let Ok(sock) = UdpSocket::bind(bind).await else {
                continue;
            };
            if sock.send_to(raw, up).await.is_err() {
                continue;
            }
            let mut buf = vec![0u8; 4096];
            if let Ok(Ok((n, from))) =
                tokio::time::timeout(UPSTREAM_TIMEOUT, sock.recv_from(&mut buf)).await
                && from == *up
                && let Ok(m) = Message::from_vec(&buf[..n])
            {
                return Some(m);
            }
        }
        None
    }
}

#[async_trait::async_trait]
impl RequestHandler for MeshResolver {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response: R,
    ) -> ResponseInfo {
        let builder = MessageResponseBuilder::from_message_request(request);
        let mut meta = Metadata::response_from_request(&request.metadata);
        let Ok(info) = request.request_info() else {
            meta.response_code = ResponseCode::FormErr;
            return send(&mut response, builder.build_no_records(meta)).await;
        };
        let qname = info.query.name().to_string();
        let qtype = info.query.query_type();
        let answer = resolve(&self.table.borrow(), &qname, qtype);
        debug!(%qname, ?qtype, ?answer, "dns query");
        let name = Name::from(info.query.name().clone());
        let records: Vec<Record> = match &answer {
            Answer::Addresses(addrs) => addrs
                .iter()
                .map(|a| match a {
                    IpAddr::V4(v4) => Record::from_rdata(name.clone(), TTL, RData::A(A(*v4))),
                    IpAddr::V6(v6) => Record::from_rdata(name.clone(), TTL, RData::AAAA(AAAA(*v6))),
                })
                .collect(),
            Answer::Pointer(target) => match Name::from_ascii(target) {
                Ok(t) => vec![Record::from_rdata(name.clone(), TTL, RData::PTR(PTR(t)))],
                Err(_) => Vec::new(),
            },
            _ => Vec::new(),
        };
        match answer {
            Answer::Forward => {
                let Some(reply) = self.forward(request.as_slice()).await else {
                    self.count(&self.counters.failed);
                    meta.response_code = ResponseCode::ServFail;
                    meta.recursion_available = true;
                    return send(&mut response, builder.build_no_records(meta)).await;
                };
                self.count(&self.counters.forwarded);
                meta.response_code = reply.metadata.response_code;
                meta.recursion_available = true;
                let resp = builder.build(
                    meta,
                    reply.answers.iter(),
                    reply.authorities.iter(),
                    std::iter::empty(),
                    reply.additionals.iter(),
                );
                send(&mut response, resp).await
            }
            other => {
                meta.authoritative = true;
                meta.recursion_available = true;
                if other == Answer::NxDomain {
                    self.count(&self.counters.nxdomain);
                    meta.response_code = ResponseCode::NXDomain;
                } else {
                    self.count(&self.counters.answered);
                }
                let resp = builder.build(
                    meta,
                    records.iter(),
                    std::iter::empty(),
                    std::iter::empty(),
                    std::iter::empty(),
                );
                send(&mut response, resp).await
            }
        }
    }
}

async fn send<'a, R: ResponseHandler>(
    response: &mut R,
    msg: hickory_server::zone_handler::MessageResponse<
        '_,
        'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
    >,
) -> ResponseInfo {
    let meta = *msg.metadata();
    match response.send_response(msg).await {
        Ok(info) => info,
        Err(e) => {
            debug!(error = %e, "could not send a dns response");
            let mut m = meta;
            m.response_code = ResponseCode::ServFail;
            ResponseInfo::from(Header {
                metadata: m,
                counts: HeaderCounts::default(),
            })
        }
    }
}

/// Upstream servers from /etc/resolv.conf, minus our own address.
pub fn system_upstreams() -> Vec<SocketAddr> {
    let Ok(text) = std::fs::read_to_string("/etc/resolv.conf") else {
        return Vec::new();
    };
    parse_resolv_conf(&text)
}

fn parse_resolv_conf(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|rest| rest.trim().parse::<IpAddr>().ok())
        .filter(|ip| *ip != IpAddr::V4(crate::io::tun::RESOLVER))
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

/// Serves DNS on 100.100.100.100:53 (UDP and TCP) until the process ends.
///
/// The address is assigned to the TUN `device`, so Linux (a weak-host system) would also
/// accept queries that other machines route to 100.100.100.100 through this host: an open
/// resolver on the LAN that forwards to this host's upstreams and tells anyone the mesh's names.
/// The sockets are bound to the device (`SO_BINDTODEVICE`), and the kernel then delivers only
/// queries from this host itself (local traffic to an address of the device counts as arriving
/// on it); a query routed in from a LAN interface never reaches them.
pub async fn serve(
    table: watch::Receiver<Arc<DnsTable>>,
    device: &str,
    counters: Arc<DnsCounters>,
) -> anyhow::Result<()> {
    let addr = SocketAddr::new(IpAddr::V4(crate::io::tun::RESOLVER), 53);
    let upstreams = system_upstreams();
    let (udp, tcp) = bind_local_only(addr, device)
        .with_context(|| format!("binding DNS on {addr} (device {device})"))?;
    info!(%addr, %device, ?upstreams, "mesh DNS listening");
    let mut server = hickory_server::Server::new(MeshResolver::new(table, upstreams, counters));
    server.register_socket(udp);
    server.register_listener(tcp, Duration::from_secs(5), 4096);
    server.block_until_done().await?;
    Ok(())
}

/// UDP and TCP sockets on `addr` that receive only what arrives on `device`.
pub fn bind_local_only(
    addr: SocketAddr,
    device: &str,
) -> std::io::Result<(UdpSocket, TcpListener)> {
    use socket2::{Domain, Protocol, Socket, Type};
    let domain = Domain::for_address(addr);
    let udp = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
    udp.bind_device(Some(device.as_bytes()))?;
    udp.set_nonblocking(true)?;
    udp.bind(&addr.into())?;
    let tcp = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
    tcp.bind_device(Some(device.as_bytes()))?;
    tcp.set_reuse_address(true)?;
    tcp.set_nonblocking(true)?;
    tcp.bind(&addr.into())?;
    tcp.listen(1024)?;
    Ok((
        UdpSocket::from_std(udp.into())?,
        TcpListener::from_std(tcp.into())?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> DnsTable {
        DnsTable::new(
            "mesh.internal",
            vec![
                (
                    "db-1".into(),
                    vec![
                        "100.64.0.3".parse().unwrap(),
                        "fd00:1::6440:3".parse().unwrap(),
                    ],
                ),
                ("web".into(), vec!["100.64.0.4".parse().unwrap()]),
            ],
        )
    }

    #[test]
    fn mesh_names_resolve_short_and_qualified() {
        let t = table();
        let a: IpAddr = "100.64.0.3".parse().unwrap();
        assert_eq!(
            resolve(&t, "db-1.mesh.internal.", RecordType::A),
            Answer::Addresses(vec![a])
        );
        assert_eq!(
            resolve(&t, "DB-1", RecordType::A),
            Answer::Addresses(vec![a])
        );
        assert_eq!(
            resolve(&t, "db-1.mesh.internal", RecordType::AAAA),
            Answer::Addresses(vec!["fd00:1::6440:3".parse().unwrap()])
        );
        assert_eq!(
            resolve(&t, "web.mesh.internal", RecordType::AAAA),
            Answer::NoData
        );
        assert_eq!(
            resolve(&t, "web.mesh.internal", RecordType::MX),
            Answer::NoData
        );
    }

    #[test]
    fn unknown_mesh_names_are_nxdomain_and_others_are_forwarded() {
        let t = table();
        assert_eq!(
            resolve(&t, "nope.mesh.internal", RecordType::A),
            Answer::NxDomain
        );
        assert_eq!(
            resolve(&t, "a.b.mesh.internal", RecordType::A),
            Answer::NxDomain
        );
        assert_eq!(resolve(&t, "example.com.", RecordType::A), Answer::Forward);
        assert_eq!(resolve(&t, "localhost", RecordType::A), Answer::Forward);
        assert_eq!(resolve(&t, "mesh.internal", RecordType::A), Answer::NoData);
    }

    #[test]
    fn reverse_lookups_of_overlay_addresses() {
        let t = table();
        assert_eq!(
            resolve(&t, "3.0.64.100.in-addr.arpa.", RecordType::PTR),
            Answer::Pointer("db-1.mesh.internal.".into())
        );
        let v6 = "3.0.0.0.0.4.4.6.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.1.0.0.0.0.0.d.f.ip6.arpa.";
        assert_eq!(
            resolve(&t, v6, RecordType::PTR),
            Answer::Pointer("db-1.mesh.internal.".into())
        );
        assert_eq!(
            resolve(&t, "9.9.9.9.in-addr.arpa", RecordType::PTR),
            Answer::Forward
        );
        assert_eq!(
            resolve(&t, "x.in-addr.arpa", RecordType::PTR),
            Answer::Forward
        );
    }

    #[tokio::test]
    async fn queries_for_other_names_are_forwarded_to_the_upstream_over_udp() {
        use hickory_proto::op::{Message, Query};
        // A real upstream on loopback that answers every A query with 192.0.2.1.
        let upstream = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let up_addr = upstream.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 512];
            let (n, from) = upstream.recv_from(&mut buf).await.unwrap();
            let q = Message::from_vec(&buf[..n]).unwrap();
            let mut reply = Message::response(q.metadata.id, q.metadata.op_code);
            let name = q.queries[0].name().clone();
            reply.add_query(q.queries[0].clone());
            reply.add_answer(Record::from_rdata(
                name,
                30,
                RData::A(A("192.0.2.1".parse().unwrap())),
            ));
            upstream
                .send_to(&reply.to_vec().unwrap(), from)
                .await
                .unwrap();
        });
        let (_tx, rx) = watch::channel(Arc::new(table()));
        let resolver = MeshResolver::new(rx, vec![up_addr], Arc::default());
        let mut query = Message::query();
        query.add_query(Query::query(
            Name::from_ascii("example.com.").unwrap(),
            RecordType::A,
        ));
        let reply = resolver
            .forward(&query.to_vec().unwrap())
            .await
            .expect("an answer");
        assert_eq!(reply.answers.len(), 1);
        assert_eq!(
            reply.answers[0].data,
            RData::A(A("192.0.2.1".parse().unwrap()))
        );
        // No upstream answering: no answer (the handler then says SERVFAIL).
        let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let (_tx2, rx2) = watch::channel(Arc::new(table()));
        let dead = MeshResolver::new(rx2, vec![silent.local_addr().unwrap()], Arc::default());
        assert!(dead.forward(&query.to_vec().unwrap()).await.is_none());
    }

    #[test]
    fn resolv_conf_parsing_skips_our_own_address() {
        let ups = parse_resolv_conf(
            "# c\nnameserver 100.100.100.100\nnameserver 192.0.2.53\nsearch x\nnameserver ::1\n",
        );
        assert_eq!(
            ups,
            vec![
                "192.0.2.53:53".parse().unwrap(),
                "[::1]:53".parse().unwrap()
            ]
        );
    }
}
