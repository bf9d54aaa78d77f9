//! NAT boxes as Linux netfilter behaves: `masquerade` (endpoint-independent mapping, filtering
//! by remote address and port), `masquerade random` (a random port per destination), a
//! full-cone NAT, and a firewall that drops all UDP.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};

use rand::{Rng, RngExt};

/// How a NAT behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NatKind {
    /// Endpoint-independent mapping and filtering ("full cone").
    Open,
    /// Endpoint-independent mapping, address-and-port-dependent filtering (`masquerade`).
    Easy,
    /// Endpoint-dependent mapping with random ports (`masquerade random`): symmetric.
    Hard,
    /// Drops all UDP.
    Blocked,
    /// Like [`NatKind::Easy`], but unsolicited packets reach the box itself (a Docker host or
    /// a cloud VM without a firewall): each leaves an entry, and the box's own next flow
    /// toward that sender from the same public port clashes with it and gets another port.
    WanInput,
}

/// One NAT box.
#[derive(Debug)]
pub(crate) struct NatBox {
    kind: NatKind,
    public_ip: IpAddr,
    /// (internal, destination if endpoint-dependent) -> public port.
    map: HashMap<(SocketAddr, Option<SocketAddr>), u16>,
    /// public port -> internal address.
    rev: HashMap<u16, SocketAddr>,
    /// (public port, remote) pairs the box lets in.
    allowed: HashSet<(u16, SocketAddr)>,
    /// Added to the source port of new mappings (a router whose port range moved).
    shift: u16,
    /// (public port, remote) pairs an unsolicited packet claimed ([`NatKind::WanInput`]).
    clashes: HashSet<(u16, SocketAddr)>,
}

impl NatBox {
    pub(crate) fn new(kind: NatKind, public_ip: IpAddr) -> Self {
        Self {
            kind,
            public_ip,
            map: HashMap::new(),
            rev: HashMap::new(),
            allowed: HashSet::new(),
            shift: 0,
            clashes: HashSet::new(),
        }
    }

    pub(crate) fn public_ip(&self) -> IpAddr {
        self.public_ip
    }

    /// Forgets every mapping (`conntrack -F`): the next packets get new ones.
    pub(crate) fn flush(&mut self) {
        self.map.clear();
        self.rev.clear();
        self.allowed.clear();
        self.clashes.clear();
    }

    /// Forgets every mapping and gives new ones ports `shift` higher than before (a home
    /// router that rebooted, or whose mappings timed out and came back elsewhere): a real
    /// rebinding, where the peer's idea of our public port is wrong afterwards.
    pub(crate) fn rebind(&mut self, shift: u16) {
        self.flush();
        self.shift = self.shift.wrapping_add(shift);
    }

    /// A packet from `internal` to `dst`: the public source it leaves with, or `None`.
    pub(crate) fn outbound(
        &mut self,
        internal: SocketAddr,
        dst: SocketAddr,
        rng: &mut impl Rng,
    ) -> Option<SocketAddr> {
        let mut key = match self.kind {
            NatKind::Blocked => return None,
            NatKind::Hard => (internal, Some(dst)),
            NatKind::Open | NatKind::Easy | NatKind::WanInput => (internal, None),
        };
        // A flow toward a sender whose unsolicited packet claimed the usual public port gets
        // a port of its own (the conntrack clash), unless it already has one.
        if self.kind == NatKind::WanInput {
            let own = (internal, Some(dst));
            let usual = self
                .map
                .get(&key)
                .copied()
                .unwrap_or(internal.port().wrapping_add(self.shift).max(1024));
            if self.map.contains_key(&own)
                || self.clashes.contains(&(usual, dst)) && !self.allowed.contains(&(usual, dst))
            {
                key = own;
            }
        }
        let port = match self.map.get(&key) {
            Some(p) => *p,
            None => {
                // Like masquerade: keep the source port if it is free, unless randomizing.
                let mut p = internal.port().wrapping_add(self.shift).max(1024);
                if self.kind == NatKind::Hard || key.1.is_some() || self.rev.contains_key(&p) {
                    loop {
                        p = rng.random_range(1024..=u16::MAX);
                        if !self.rev.contains_key(&p) {
                            break;
                        }
                    }
                }
                self.map.insert(key, p);
                self.rev.insert(p, internal);
                p
            }
        };
        self.allowed.insert((port, dst));
        Some(SocketAddr::new(self.public_ip, port))
    }

    /// A packet from `from` to public `port`: the internal address it goes to, or `None`.
    pub(crate) fn inbound(&mut self, port: u16, from: SocketAddr) -> Option<SocketAddr> {
        if self.kind == NatKind::WanInput && !self.allowed.contains(&(port, from)) {
            // The box takes it for itself, and remembers.
            self.clashes.insert((port, from));
            return None;
        }
        let internal = *self.rev.get(&port)?;
        match self.kind {
            NatKind::Blocked => None,
            NatKind::Open => Some(internal),
            NatKind::Easy | NatKind::Hard => {
                self.allowed.contains(&(port, from)).then_some(internal)
            }
            NatKind::WanInput => Some(internal),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{SeedableRng, rngs::StdRng};

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn masquerade_keeps_the_port_and_filters_by_remote() {
        let mut rng = StdRng::seed_from_u64(1);
        let mut n = NatBox::new(NatKind::Easy, "203.0.113.1".parse().unwrap());
        let out1 = n
            .outbound(a("10.0.0.2:41641"), a("192.0.2.1:3478"), &mut rng)
            .unwrap();
        let out2 = n
            .outbound(a("10.0.0.2:41641"), a("192.0.2.2:3478"), &mut rng)
            .unwrap();
        assert_eq!(out1, a("203.0.113.1:41641"));
        assert_eq!(out1, out2, "endpoint-independent mapping");
        assert_eq!(
            n.inbound(41641, a("192.0.2.1:3478")),
            Some(a("10.0.0.2:41641"))
        );
        assert_eq!(
            n.inbound(41641, a("192.0.2.9:3478")),
            None,
            "filtered: never sent there"
        );
        n.flush();
        assert_eq!(n.inbound(41641, a("192.0.2.1:3478")), None);
    }

    #[test]
    fn masquerade_random_maps_per_destination() {
        let mut rng = StdRng::seed_from_u64(2);
        let mut n = NatBox::new(NatKind::Hard, "203.0.113.1".parse().unwrap());
        let out1 = n
            .outbound(a("10.0.0.2:41641"), a("192.0.2.1:3478"), &mut rng)
            .unwrap();
        let out2 = n
            .outbound(a("10.0.0.2:41641"), a("192.0.2.2:3478"), &mut rng)
            .unwrap();
        assert_ne!(out1.port(), out2.port());
        assert_eq!(
            n.outbound(a("10.0.0.2:41641"), a("192.0.2.1:3478"), &mut rng),
            Some(out1)
        );
        assert_eq!(
            n.inbound(out1.port(), a("192.0.2.1:3478")),
            Some(a("10.0.0.2:41641"))
        );
        assert_eq!(n.inbound(out1.port(), a("192.0.2.2:3478")), None);
    }

    #[test]
    fn open_nats_let_anyone_in_and_blocked_ones_nobody() {
        let mut rng = StdRng::seed_from_u64(3);
        let mut open = NatBox::new(NatKind::Open, "203.0.113.1".parse().unwrap());
        let out = open
            .outbound(a("10.0.0.2:1"), a("192.0.2.1:1"), &mut rng)
            .unwrap();
        assert_eq!(
            open.inbound(out.port(), a("198.51.100.7:9")),
            Some(a("10.0.0.2:1"))
        );
        let mut blocked = NatBox::new(NatKind::Blocked, "203.0.113.2".parse().unwrap());
        assert_eq!(
            blocked.outbound(a("10.0.0.2:1"), a("192.0.2.1:1"), &mut rng),
            None
        );
    }
}
