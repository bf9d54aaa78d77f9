//! IP packet parsing for the filter, in the smoltcp style: [`PacketInfo::parse`] checks every
//! length once, and nothing derived from a successful parse can panic. Malformed packets are
//! an `Err` (the caller drops and counts them).
//!
//! What is extracted is exactly what the filter and flow table need: the 5-tuple, TCP flags,
//! ICMP type and echo id, and for ICMP errors the 5-tuple of the packet they quote.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use wire::IpProto;

/// Why a packet was not parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Shorter than its headers say.
    #[error("truncated packet")]
    Truncated,
    /// Not IPv4 or IPv6, or an invalid header field.
    #[error("malformed IP header")]
    Malformed,
}

/// The flow identity of a packet. For ICMP echo, both ports carry the echo identifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FiveTuple {
    /// Transport protocol.
    pub proto: IpProto,
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// Source port (0 when the protocol has none).
    pub src_port: u16,
    /// Destination port (0 when the protocol has none).
    pub dst_port: u16,
}

impl FiveTuple {
    /// The same flow seen from the other side.
    pub fn reversed(&self) -> Self {
        Self {
            proto: self.proto,
            src: self.dst,
            dst: self.src,
            src_port: self.dst_port,
            dst_port: self.src_port,
        }
    }
}

/// The transport-level facts the filter uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// TCP: flags and the sequence facts the flow table needs to reset a flow.
    Tcp {
        /// The TCP flags (FIN=0x01, SYN=0x02, RST=0x04, ACK=0x10).
        flags: u8,
        /// Sequence number.
        seq: u32,
        /// Acknowledgment number.
        ack: u32,
        /// Sequence space the segment occupies: payload bytes, plus one each for SYN and FIN.
        seg_len: u32,
    },
    /// UDP.
    Udp,
    /// ICMP echo request or reply.
    IcmpEcho {
        /// True for a request.
        request: bool,
    },
    /// An ICMP error quoting a packet of some flow (destination unreachable, time exceeded,
    /// packet too big, parameter problem).
    IcmpError {
        /// The quoted packet's flow, as the quoting side sent it.
        quoted: Option<FiveTuple>,
    },
    /// Any other ICMP message.
    IcmpOther,
    /// A non-initial fragment: it carries no transport header (ports are 0). `offset` is in
    /// units of 8 bytes.
    Fragment {
        /// Fragment offset in 8-byte units.
        offset: u16,
    },
    /// SCTP or another protocol.
    Other,
}

/// TCP flag bits.
pub mod tcp_flags {
    /// FIN.
    pub const FIN: u8 = 0x01;
    /// SYN.
    pub const SYN: u8 = 0x02;
    /// RST.
    pub const RST: u8 = 0x04;
    /// ACK.
    pub const ACK: u8 = 0x10;
}

/// A parsed packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PacketInfo {
    /// Flow identity.
    pub tuple: FiveTuple,
    /// Transport facts.
    pub transport: Transport,
}

impl PacketInfo {
    /// Parses an IPv4 or IPv6 packet.
    pub fn parse(bytes: &[u8]) -> Result<Self, ParseError> {
        let (proto, src, dst, l4, fragment_offset) = ip_header(bytes)?;
        let (src_port, dst_port, transport) = if fragment_offset != 0 {
            (
                0,
                0,
                Transport::Fragment {
                    offset: fragment_offset,
                },
            )
        } else {
            transport(proto, l4, src.is_ipv4())?
        };
        Ok(Self {
            tuple: FiveTuple {
                proto,
                src,
                dst,
                src_port,
                dst_port,
            },
            transport,
        })
    }
}

/// The destination address of an IP packet, without parsing the rest.
pub fn destination(bytes: &[u8]) -> Option<IpAddr> {
    match bytes.first()? >> 4 {
        4 => Some(IpAddr::V4(Ipv4Addr::from(arr4(bytes.get(16..20)?)))),
        6 => Some(IpAddr::V6(Ipv6Addr::from(arr16(bytes.get(24..40)?)))),
        _ => None,
    }
}

/// The length an IP packet's header claims (WireGuard pads packets; the padding is cut off
/// with this before they reach the TUN device).
pub fn claimed_len(bytes: &[u8]) -> Option<usize> {
    match bytes.first()? >> 4 {
        4 => Some(usize::from(u16::from_be_bytes([
            *bytes.get(2)?,
            *bytes.get(3)?,
        ]))),
        6 => Some(40 + usize::from(u16::from_be_bytes([*bytes.get(4)?, *bytes.get(5)?]))),
        _ => None,
    }
}

/// The source address of an IP packet, without parsing the rest.
pub fn source(bytes: &[u8]) -> Option<IpAddr> {
    match bytes.first()? >> 4 {
        4 => Some(IpAddr::V4(Ipv4Addr::from(arr4(bytes.get(12..16)?)))),
        6 => Some(IpAddr::V6(Ipv6Addr::from(arr16(bytes.get(8..24)?)))),
        _ => None,
    }
}

fn arr4(s: &[u8]) -> [u8; 4] {
    let mut a = [0u8; 4];
    a.copy_from_slice(s);
    a
}

fn arr16(s: &[u8]) -> [u8; 16] {
    let mut a = [0u8; 16];
    a.copy_from_slice(s);
    a
}

type IpHeader<'a> = (IpProto, IpAddr, IpAddr, &'a [u8], u16);

/// Parses the IP header (and IPv6 extension headers); returns protocol, addresses, the
/// transport bytes and the fragment offset (0 for unfragmented and first fragments).
fn ip_header(b: &[u8]) -> Result<IpHeader<'_>, ParseError> {
    let version = b.first().ok_or(ParseError::Truncated)? >> 4;
    match version {
        4 => {
            if b.len() < 20 {
                return Err(ParseError::Truncated);
            }
            let ihl = usize::from(b[0] & 0x0f) * 4;
            let total = usize::from(u16::from_be_bytes([b[2], b[3]]));
            if ihl < 20 || total < ihl {
                return Err(ParseError::Malformed);
            }
            if b.len() < total {
                return Err(ParseError::Truncated);
            }
            let offset = u16::from_be_bytes([b[6], b[7]]) & 0x1fff;
            let src = IpAddr::V4(Ipv4Addr::from(arr4(&b[12..16])));
            let dst = IpAddr::V4(Ipv4Addr::from(arr4(&b[16..20])));
            Ok((IpProto(b[9]), src, dst, &b[ihl..total], offset))
        }
        6 => {
            if b.len() < 40 {
                return Err(ParseError::Truncated);
            }
            let payload_len = usize::from(u16::from_be_bytes([b[4], b[5]]));
            let end = 40 + payload_len;
            if b.len() < end {
                return Err(ParseError::Truncated);
            }
            let src = IpAddr::V6(Ipv6Addr::from(arr16(&b[8..24])));
            let dst = IpAddr::V6(Ipv6Addr::from(arr16(&b[24..40])));
            let mut next = b[6];
            let mut off = 40;
            let mut fragment_offset = 0;
            // Walk extension headers; at most 8 so a crafted chain cannot loop long.
            for _ in 0..8 {
                match next {
                    // hop-by-hop, routing, destination options
                    0 | 43 | 60 => {
                        let h = b.get(off..off + 2).ok_or(ParseError::Truncated)?;
                        next = h[0];
                        off += (usize::from(h[1]) + 1) * 8;
                    }
                    // fragment
                    44 => {
                        let h = b.get(off..off + 8).ok_or(ParseError::Truncated)?;
                        fragment_offset = u16::from_be_bytes([h[2], h[3]]) >> 3;
                        next = h[0];
                        off += 8;
                    }
                    // authentication header: length in 4-byte units, minus 2
                    51 => {
                        let h = b.get(off..off + 2).ok_or(ParseError::Truncated)?;
                        next = h[0];
                        off += (usize::from(h[1]) + 2) * 4;
                    }
                    _ => break,
                }
                if off > end {
                    return Err(ParseError::Truncated);
                }
            }
            if matches!(next, 0 | 43 | 60 | 44 | 51) {
                return Err(ParseError::Malformed);
            }
            Ok((IpProto(next), src, dst, &b[off..end], fragment_offset))
        }
        _ => Err(ParseError::Malformed),
    }
}

fn transport(proto: IpProto, l4: &[u8], v4: bool) -> Result<(u16, u16, Transport), ParseError> {
    let ports = |min: usize| -> Result<(u16, u16), ParseError> {
        if l4.len() < min {
            return Err(ParseError::Truncated);
        }
        Ok((
            u16::from_be_bytes([l4[0], l4[1]]),
            u16::from_be_bytes([l4[2], l4[3]]),
        ))
    };
    match proto {
        IpProto::TCP => {
            let (s, d) = ports(20)?;
            let data_offset = usize::from(l4[12] >> 4) * 4;
            if data_offset < 20 || data_offset > l4.len() {
                return Err(ParseError::Malformed);
            }
            let flags = l4[13];
            let payload =
                u32::try_from(l4.len() - data_offset).map_err(|_| ParseError::Malformed)?;
            let seg_len = payload
                + u32::from(flags & tcp_flags::SYN != 0)
                + u32::from(flags & tcp_flags::FIN != 0);
            Ok((
                s,
                d,
                Transport::Tcp {
                    flags,
                    seq: u32::from_be_bytes([l4[4], l4[5], l4[6], l4[7]]),
                    ack: u32::from_be_bytes([l4[8], l4[9], l4[10], l4[11]]),
                    seg_len,
                },
            ))
        }
        IpProto::UDP => {
            let (s, d) = ports(8)?;
            Ok((s, d, Transport::Udp))
        }
        IpProto::SCTP => {
            let (s, d) = ports(12)?;
            Ok((s, d, Transport::Other))
        }
        IpProto::ICMP if v4 => icmp(l4, ICMPV4),
        IpProto::ICMPV6 if !v4 => icmp(l4, ICMPV6),
        _ => Ok((0, 0, Transport::Other)),
    }
}

struct IcmpTypes {
    echo_request: u8,
    echo_reply: u8,
    errors: &'static [u8],
}

const ICMPV4: IcmpTypes = IcmpTypes {
    echo_request: 8,
    echo_reply: 0,
    // destination unreachable, time exceeded, parameter problem
    errors: &[3, 11, 12],
};

const ICMPV6: IcmpTypes = IcmpTypes {
    echo_request: 128,
    echo_reply: 129,
    // destination unreachable, packet too big, time exceeded, parameter problem
    errors: &[1, 2, 3, 4],
};

fn icmp(l4: &[u8], types: IcmpTypes) -> Result<(u16, u16, Transport), ParseError> {
    if l4.len() < 8 {
        return Err(ParseError::Truncated);
    }
    let ty = l4[0];
    if ty == types.echo_request || ty == types.echo_reply {
        let id = u16::from_be_bytes([l4[4], l4[5]]);
        return Ok((
            id,
            id,
            Transport::IcmpEcho {
                request: ty == types.echo_request,
            },
        ));
    }
    if types.errors.contains(&ty) {
        // The quoted packet follows the 8-byte ICMP header; it is usually truncated, so only
        // its IP header and first 8 transport bytes are read.
        let quoted = quoted_tuple(&l4[8..]);
        return Ok((0, 0, Transport::IcmpError { quoted }));
    }
    Ok((0, 0, Transport::IcmpOther))
}

fn quoted_tuple(b: &[u8]) -> Option<FiveTuple> {
    let version = b.first()? >> 4;
    let (proto, src, dst, l4) = match version {
        4 => {
            let ihl = usize::from(b[0] & 0x0f) * 4;
            if ihl < 20 || b.len() < ihl {
                return None;
            }
            (
                IpProto(b[9]),
                IpAddr::V4(Ipv4Addr::from(arr4(&b[12..16]))),
                IpAddr::V4(Ipv4Addr::from(arr4(&b[16..20]))),
                &b[ihl..],
            )
        }
        6 => {
            if b.len() < 40 {
                return None;
            }
            (
                IpProto(b[6]),
                IpAddr::V6(Ipv6Addr::from(arr16(&b[8..24]))),
                IpAddr::V6(Ipv6Addr::from(arr16(&b[24..40]))),
                &b[40..],
            )
        }
        _ => return None,
    };
    let (src_port, dst_port) = match proto {
        IpProto::TCP | IpProto::UDP | IpProto::SCTP => {
            let p = l4.get(0..4)?;
            (
                u16::from_be_bytes([p[0], p[1]]),
                u16::from_be_bytes([p[2], p[3]]),
            )
        }
        IpProto::ICMP | IpProto::ICMPV6 => {
            let p = l4.get(4..6)?;
            let id = u16::from_be_bytes([p[0], p[1]]);
            (id, id)
        }
        _ => (0, 0),
    };
    Some(FiveTuple {
        proto,
        src,
        dst,
        src_port,
        dst_port,
    })
}

/// Builds a TCP segment with RST and ACK set from `src` to `dst` (same IP version), with
/// valid IP and TCP checksums. `None` when the address families differ.
pub fn tcp_reset(src: (IpAddr, u16), dst: (IpAddr, u16), seq: u32, ack: u32) -> Option<Vec<u8>> {
    let mut tcp = [0u8; 20];
    tcp[0..2].copy_from_slice(&src.1.to_be_bytes());
    tcp[2..4].copy_from_slice(&dst.1.to_be_bytes());
    tcp[4..8].copy_from_slice(&seq.to_be_bytes());
    tcp[8..12].copy_from_slice(&ack.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = tcp_flags::RST | tcp_flags::ACK;
    let mut out = Vec::with_capacity(60);
    let mut pseudo = Vec::with_capacity(40);
    match (src.0, dst.0) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut ip = [0u8; 20];
            ip[0] = 0x45;
            ip[2..4].copy_from_slice(&40u16.to_be_bytes());
            ip[6] = 0x40; // don't fragment
            ip[8] = 64;
            ip[9] = IpProto::TCP.0;
            ip[12..16].copy_from_slice(&s.octets());
            ip[16..20].copy_from_slice(&d.octets());
            let sum = internet_checksum(0, &ip);
            ip[10..12].copy_from_slice(&sum.to_be_bytes());
            out.extend_from_slice(&ip);
            pseudo.extend_from_slice(&s.octets());
            pseudo.extend_from_slice(&d.octets());
            pseudo.extend_from_slice(&[0, IpProto::TCP.0, 0, 20]);
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let mut ip = [0u8; 40];
            ip[0] = 0x60;
            ip[4..6].copy_from_slice(&20u16.to_be_bytes());
            ip[6] = IpProto::TCP.0;
            ip[7] = 64;
            ip[8..24].copy_from_slice(&s.octets());
            ip[24..40].copy_from_slice(&d.octets());
            out.extend_from_slice(&ip);
            pseudo.extend_from_slice(&s.octets());
            pseudo.extend_from_slice(&d.octets());
            pseudo.extend_from_slice(&[0, 0, 0, 20, 0, 0, 0, IpProto::TCP.0]);
        }
        _ => return None,
    }
    let partial = !internet_checksum(0, &pseudo);
    let sum = internet_checksum(partial, &tcp);
    tcp[16..18].copy_from_slice(&sum.to_be_bytes());
    out.extend_from_slice(&tcp);
    Some(out)
}

/// The Internet checksum (RFC 1071) of `b`, continuing from the one's-complement sum `start`
/// (pass the complement of an earlier result to chain).
fn internet_checksum(start: u16, b: &[u8]) -> u16 {
    let mut sum = u32::from(start);
    for c in b.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(u16::try_from(sum).unwrap_or(u16::MAX))
}

/// Whether TCP sequence number `a` comes after `b` (serial arithmetic, RFC 1982).
pub fn seq_after(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Builds an IPv4 packet with the given protocol and transport bytes.
    pub(crate) fn ipv4(src: [u8; 4], dst: [u8; 4], proto: u8, l4: &[u8]) -> Vec<u8> {
        let total = 20 + l4.len();
        let mut p = vec![
            0x45,
            0,
            (total >> 8) as u8,
            total as u8,
            0,
            0,
            0x40,
            0,
            64,
            proto,
            0,
            0,
        ];
        p.extend_from_slice(&src);
        p.extend_from_slice(&dst);
        let sum = internet_checksum(0, &p);
        p[10..12].copy_from_slice(&sum.to_be_bytes());
        p.extend_from_slice(l4);
        p
    }

    /// Builds an IPv6 packet.
    pub(crate) fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, next: u8, l4: &[u8]) -> Vec<u8> {
        let mut p = vec![0x60, 0, 0, 0];
        p.extend_from_slice(&(l4.len() as u16).to_be_bytes());
        p.push(next);
        p.push(64);
        p.extend_from_slice(&src.octets());
        p.extend_from_slice(&dst.octets());
        p.extend_from_slice(l4);
        p
    }

    pub(crate) fn tcp(sport: u16, dport: u16, flags: u8) -> Vec<u8> {
        let mut t = vec![0u8; 20];
        t[0..2].copy_from_slice(&sport.to_be_bytes());
        t[2..4].copy_from_slice(&dport.to_be_bytes());
        t[12] = 5 << 4;
        t[13] = flags;
        t
    }

    pub(crate) fn udp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
        let mut u = Vec::new();
        u.extend_from_slice(&sport.to_be_bytes());
        u.extend_from_slice(&dport.to_be_bytes());
        u.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        u.extend_from_slice(&[0, 0]);
        u.extend_from_slice(payload);
        u
    }

    pub(crate) fn icmp_echo(request: bool, id: u16, v6: bool) -> Vec<u8> {
        let ty = match (request, v6) {
            (true, false) => 8,
            (false, false) => 0,
            (true, true) => 128,
            (false, true) => 129,
        };
        let mut i = vec![ty, 0, 0, 0];
        i.extend_from_slice(&id.to_be_bytes());
        i.extend_from_slice(&[0, 1]);
        i
    }

    /// Whether a packet's IP header checksum (v4) and TCP checksum are valid.
    fn tcp_checksums_ok(p: &[u8]) -> bool {
        let (pseudo, ip_ok, l4) = match p[0] >> 4 {
            4 => {
                let mut ph = p[12..20].to_vec();
                ph.extend_from_slice(&[0, 6, 0, (p.len() - 20) as u8]);
                (ph, internet_checksum(0, &p[..20]) == 0, &p[20..])
            }
            _ => {
                let mut ph = p[8..40].to_vec();
                ph.extend_from_slice(&[0, 0, 0, (p.len() - 40) as u8, 0, 0, 0, 6]);
                (ph, true, &p[40..])
            }
        };
        let partial = !internet_checksum(0, &pseudo);
        ip_ok && internet_checksum(partial, l4) == 0
    }

    #[test]
    fn resets_carry_the_given_numbers_and_valid_checksums() {
        for (a, b) in [("100.64.0.1", "100.64.0.2"), ("fd00::1", "fd00::2")] {
            let p = tcp_reset(
                (a.parse().unwrap(), 22),
                (b.parse().unwrap(), 40000),
                0xfffffff0,
                7,
            )
            .unwrap();
            assert!(tcp_checksums_ok(&p), "{a}: bad checksum");
            let info = PacketInfo::parse(&p).unwrap();
            assert_eq!(info.tuple.src.to_string(), a);
            assert_eq!((info.tuple.src_port, info.tuple.dst_port), (22, 40000));
            assert_eq!(
                info.transport,
                Transport::Tcp {
                    flags: tcp_flags::RST | tcp_flags::ACK,
                    seq: 0xfffffff0,
                    ack: 7,
                    seg_len: 0
                }
            );
        }
        assert!(
            tcp_reset(
                ("100.64.0.1".parse().unwrap(), 1),
                ("fd00::2".parse().unwrap(), 2),
                0,
                0
            )
            .is_none()
        );
    }

    #[test]
    fn sequence_numbers_compare_across_the_wrap() {
        assert!(seq_after(1, 0));
        assert!(seq_after(5, u32::MAX - 5));
        assert!(!seq_after(u32::MAX - 5, 5));
        assert!(!seq_after(7, 7));
    }

    #[test]
    fn parses_ipv4_tcp() {
        let p = ipv4(
            [100, 64, 0, 1],
            [100, 64, 0, 2],
            6,
            &tcp(40000, 22, tcp_flags::SYN),
        );
        let info = PacketInfo::parse(&p).unwrap();
        assert_eq!(info.tuple.proto, IpProto::TCP);
        assert_eq!(info.tuple.src.to_string(), "100.64.0.1");
        assert_eq!(info.tuple.dst_port, 22);
        assert_eq!(
            info.transport,
            Transport::Tcp {
                flags: tcp_flags::SYN,
                seq: 0,
                ack: 0,
                seg_len: 1
            }
        );
        assert_eq!(destination(&p).unwrap().to_string(), "100.64.0.2");
        assert_eq!(source(&p).unwrap().to_string(), "100.64.0.1");
    }

    #[test]
    fn parses_ipv6_udp_behind_extension_headers() {
        let mut l4 = vec![17, 0, 0, 0, 0, 0, 0, 0]; // hop-by-hop, next = UDP, 8 bytes
        l4.extend(udp(5353, 53, b"q"));
        let p = ipv6(
            "fd00::1".parse().unwrap(),
            "fd00::2".parse().unwrap(),
            0,
            &l4,
        );
        let info = PacketInfo::parse(&p).unwrap();
        assert_eq!(info.tuple.proto, IpProto::UDP);
        assert_eq!((info.tuple.src_port, info.tuple.dst_port), (5353, 53));
    }

    #[test]
    fn icmp_echo_uses_the_identifier_as_port() {
        let p = ipv4([1, 1, 1, 1], [2, 2, 2, 2], 1, &icmp_echo(true, 77, false));
        let info = PacketInfo::parse(&p).unwrap();
        assert_eq!(info.transport, Transport::IcmpEcho { request: true });
        assert_eq!((info.tuple.src_port, info.tuple.dst_port), (77, 77));
        let p6 = ipv6(
            "fd00::1".parse().unwrap(),
            "fd00::2".parse().unwrap(),
            58,
            &icmp_echo(false, 9, true),
        );
        let info6 = PacketInfo::parse(&p6).unwrap();
        assert_eq!(info6.transport, Transport::IcmpEcho { request: false });
    }

    #[test]
    fn icmp_error_exposes_the_quoted_flow() {
        let quoted = ipv4([100, 64, 0, 1], [100, 64, 0, 2], 17, &udp(1000, 2000, b""));
        let mut err = vec![3, 3, 0, 0, 0, 0, 0, 0];
        err.extend_from_slice(&quoted[..28]);
        let p = ipv4([100, 64, 0, 2], [100, 64, 0, 1], 1, &err);
        let info = PacketInfo::parse(&p).unwrap();
        let Transport::IcmpError { quoted: Some(q) } = info.transport else {
            panic!("not an icmp error: {info:?}");
        };
        assert_eq!(
            (q.src_port, q.dst_port, q.proto),
            (1000, 2000, IpProto::UDP)
        );
    }

    #[test]
    fn fragments_and_garbage_are_errors() {
        let mut p = ipv4([1, 1, 1, 1], [2, 2, 2, 2], 17, &udp(1, 2, b""));
        p[6] = 0x00;
        p[7] = 0x10; // offset 16
        let info = PacketInfo::parse(&p).unwrap();
        assert_eq!(info.transport, Transport::Fragment { offset: 16 });
        assert_eq!((info.tuple.src_port, info.tuple.dst_port), (0, 0));
        assert_eq!(PacketInfo::parse(&[]), Err(ParseError::Truncated));
        assert_eq!(PacketInfo::parse(&[0x50; 40]), Err(ParseError::Malformed));
        let short = ipv4([1, 1, 1, 1], [2, 2, 2, 2], 6, &[0; 10]);
        assert_eq!(PacketInfo::parse(&short), Err(ParseError::Truncated));
        // total length larger than the buffer
        let mut lying = ipv4([1, 1, 1, 1], [2, 2, 2, 2], 17, &udp(1, 2, b""));
        lying[3] = 200;
        assert_eq!(PacketInfo::parse(&lying), Err(ParseError::Truncated));
    }

    #[test]
    fn ipv6_extension_header_length_overflow_is_caught() {
        // hop-by-hop claims 255*8 bytes of options in a tiny packet (cf. nebula #1789)
        let l4 = vec![17, 255, 0, 0, 0, 0, 0, 0];
        let p = ipv6(
            "fd00::1".parse().unwrap(),
            "fd00::2".parse().unwrap(),
            0,
            &l4,
        );
        assert_eq!(PacketInfo::parse(&p), Err(ParseError::Truncated));
        // a chain that never ends in a transport header
        let l4 = [0u8; 8].repeat(9);
        let p = ipv6(
            "fd00::1".parse().unwrap(),
            "fd00::2".parse().unwrap(),
            0,
            &l4,
        );
        assert!(PacketInfo::parse(&p).is_err());
    }

    proptest! {
        #[test]
        fn parsing_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = PacketInfo::parse(&bytes);
            let _ = destination(&bytes);
            let _ = source(&bytes);
        }

        #[test]
        fn parsing_mutated_valid_packets_never_panics(
            flips in proptest::collection::vec((0usize..60, any::<u8>()), 0..6),
            v6 in any::<bool>(),
        ) {
            let mut p = if v6 {
                ipv6("fd00::1".parse().unwrap(), "fd00::2".parse().unwrap(), 6, &tcp(1, 2, 0))
            } else {
                ipv4([1, 2, 3, 4], [5, 6, 7, 8], 6, &tcp(1, 2, 0))
            };
            for (i, b) in flips {
                if let Some(x) = p.get_mut(i) { *x = b; }
            }
            let _ = PacketInfo::parse(&p);
        }
    }
}
