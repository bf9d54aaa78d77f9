//! Which peer an address belongs to: peers' own addresses, the subnets routers carry for the
//! mesh, and the exit node this node chose; and which addresses this node accepts packets
//! for (its own, the subnets it routes, everything outside the mesh if it is an exit node).

use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use wire::NodeKey;

use super::{Event, NodeState};
use crate::FastMap;
use crate::status::ExitStatus;

/// Where addresses lead and which ones are this node's: the tables every data packet is
/// checked against. The core keeps them behind an `Arc` and changes them copy-on-write
/// ([`NodeState::routes_mut`]), so the crypto jobs of a batch check what they deliver
/// against the tables as they were when the batch was fed, without the core's lock.
#[derive(Debug, Clone, Default)]
pub(crate) struct Routes {
    /// Peers by their overlay addresses.
    pub(super) by_ip: FastMap<IpAddr, NodeKey>,
    /// Subnets peers route for us (their primary routes), longest prefix first.
    pub(super) peer_routes: Vec<(IpNet, NodeKey)>,
    /// This node's overlay addresses.
    pub(super) local_addrs: Vec<IpAddr>,
    /// Subnets this node routes for the mesh (approved; exit routes apart).
    pub(super) served_routes: Vec<IpNet>,
    /// Whether this node is an approved exit node (it forwards to addresses outside the mesh).
    pub(super) serves_exit: bool,
    /// The exit node this node sends internet traffic through (`--exit-node`), once it
    /// offers approved exit routes.
    exit: Option<ExitPeer>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ExitPeer {
    key: NodeKey,
    v4: bool,
    v6: bool,
}

/// Whether `ip` is one of the mesh's own addresses: 100.64.0.0/10, or the mesh's IPv6 /48
/// (the one this node's IPv6 address is in). Exit routes never cover these.
fn in_mesh(local: &[IpAddr], ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => {
            let o = a.octets();
            o[0] == 100 && (o[1] & 0xc0) == 64
        }
        IpAddr::V6(a) => local.iter().any(|l| match l {
            IpAddr::V6(l) => l.segments()[..3] == a.segments()[..3],
            IpAddr::V4(_) => false,
        }),
    }
}

impl NodeState {
    /// Sends this node's traffic for addresses outside the mesh through the peer named
    /// `wanted` (its name, FQDN or overlay address), once that peer offers approved exit
    /// routes; `None` stops using an exit node. Until the peer is there, such traffic is
    /// dropped (counted as having no route).
    pub fn set_exit_node(&mut self, wanted: Option<String>) {
        self.exit_wanted = wanted.map(|w| w.trim().trim_end_matches('.').to_owned());
        self.refresh_routes();
    }

    /// The state of `--exit-node`, if one was asked for.
    pub fn exit_status(&self) -> Option<ExitStatus> {
        let wanted = self.exit_wanted.clone()?;
        let named = self.peer_named(&wanted);
        let peer = named.and_then(|k| self.peers.get(&k));
        let problem = match (peer, self.routes.exit) {
            (None, _) => Some(format!("no peer named {wanted} is visible to this node")),
            (Some(_), None) if self.routes.serves_exit => {
                Some("this node is an exit node itself; it does not use another".into())
            }
            (Some(p), None) => Some(format!(
                "{} does not offer an approved exit route (`lattice up --advertise-exit-node` \
                 on it, then `lattice-coordinator nodes routes {} --approve 0.0.0.0/0 \
                 --approve ::/0`)",
                p.node.name, p.node.name
            )),
            (Some(_), Some(_)) => None,
        };
        Some(ExitStatus {
            wanted,
            peer: peer.map(|p| p.node.id),
            name: peer.map(|p| p.node.name.clone()),
            online: peer.is_some_and(|p| p.node.online),
            problem,
        })
    }

    /// The peer `wanted` names: by name, FQDN or overlay address.
    pub(super) fn peer_named(&self, wanted: &str) -> Option<NodeKey> {
        let wanted = wanted.trim().trim_end_matches('.');
        if let Ok(ip) = wanted.parse::<IpAddr>() {
            return self.routes.by_ip.get(&ip).copied();
        }
        self.peers
            .iter()
            .find(|(_, p)| {
                p.node.name.eq_ignore_ascii_case(wanted)
                    || p.node
                        .fqdn
                        .trim_end_matches('.')
                        .eq_ignore_ascii_case(wanted)
            })
            .map(|(k, _)| *k)
    }

    /// Rebuilds the route tables from the netmap and the exit node choice: the primary subnet
    /// routes of peers, the approved routes of this node, and the chosen exit node; tells the
    /// shell when what it installs changes.
    pub(super) fn refresh_routes(&mut self) {
        let approved: &[IpNet] = self
            .self_node
            .as_ref()
            .map_or(&[], |n| n.approved_routes.as_slice());
        let served: Vec<IpNet> = approved
            .iter()
            .filter(|r| r.prefix_len() > 0)
            .copied()
            .collect();
        let serves_exit = approved.iter().any(|r| r.prefix_len() == 0);
        // A subnet this node serves itself is reached directly, never through a peer.
        let mut via: Vec<(IpNet, NodeKey)> = self
            .peers
            .iter()
            .flat_map(|(k, p)| {
                p.node
                    .primary_routes
                    .iter()
                    .filter(|r| r.prefix_len() > 0 && !served.contains(r))
                    .map(move |r| (*r, *k))
            })
            .collect();
        // Where the policy steers a subnet through chosen routers (`via`), the first of them
        // that is online carries it for this node, instead of the route's primary router.
        for (route, routers) in &self.via_routes {
            if route.prefix_len() == 0 || served.contains(route) {
                continue;
            }
            let peer = |online: bool| {
                routers.iter().find_map(|id| {
                    let key = self.by_id.get(id)?;
                    let p = self.peers.get(key)?;
                    (!online || p.node.online).then_some(*key)
                })
            };
            if let Some(key) = peer(true).or_else(|| peer(false)) {
                via.retain(|(n, _)| n != route);
                via.push((*route, key));
            }
        }
        via.sort_by(|a, b| b.0.prefix_len().cmp(&a.0.prefix_len()).then(a.0.cmp(&b.0)));
        let exit = match &self.exit_wanted {
            Some(w) if !serves_exit => self.peer_named(w).and_then(|key| {
                let routes = &self.peers.get(&key)?.node.primary_routes;
                let v4 = routes
                    .iter()
                    .any(|r| matches!(r, IpNet::V4(n) if n.prefix_len() == 0));
                let v6 = routes
                    .iter()
                    .any(|r| matches!(r, IpNet::V6(n) if n.prefix_len() == 0));
                (v4 || v6).then_some(ExitPeer { key, v4, v6 })
            }),
            _ => None,
        };
        if exit != self.routes.exit {
            self.routes_mut().exit = exit;
        }
        if via != self.routes.peer_routes
            || served != self.routes.served_routes
            || serves_exit != self.routes.serves_exit
        {
            let mut via_peers: Vec<IpNet> = via.iter().map(|(n, _)| *n).collect();
            via_peers.sort_unstable();
            via_peers.dedup();
            self.events.push_back(Event::RoutesChanged {
                via_peers,
                served: served.clone(),
                exit: serves_exit,
            });
            let routes = self.routes_mut();
            routes.peer_routes = via;
            routes.served_routes = served;
            routes.serves_exit = serves_exit;
        }
    }

    /// The route tables, to change: copied first if a batch's jobs still hold them.
    pub(super) fn routes_mut(&mut self) -> &mut Routes {
        Arc::make_mut(&mut self.routes)
    }
}

impl Routes {
    /// The peer that `dst` belongs to: the owner of the address, the router of the most
    /// specific subnet route holding it, or the chosen exit node for an address outside the
    /// mesh.
    pub(super) fn owner_of(&self, dst: IpAddr) -> Option<NodeKey> {
        self.by_ip
            .get(&dst)
            .copied()
            .or_else(|| {
                self.peer_routes
                    .iter()
                    .find(|(n, _)| n.contains(&dst))
                    .map(|(_, k)| *k)
            })
            .or_else(|| self.exit_for(dst))
    }

    /// The chosen exit node, if it carries `ip` (outside the mesh, of a family it routes).
    fn exit_for(&self, ip: IpAddr) -> Option<NodeKey> {
        let e = self.exit?;
        let family = if ip.is_ipv4() { e.v4 } else { e.v6 };
        (family && !in_mesh(&self.local_addrs, ip)).then_some(e.key)
    }

    /// Whether `src` is peer `key`'s own address or inside a subnet it routes.
    fn own_or_routed(&self, key: &NodeKey, src: IpAddr) -> bool {
        self.by_ip.get(&src) == Some(key)
            || self
                .peer_routes
                .iter()
                .any(|(n, k)| k == key && n.contains(&src))
    }

    /// Whether `src` may come from peer `key`: its own address, inside a subnet it routes, or
    /// (the chosen exit node) outside the mesh.
    pub(super) fn peer_may_send_from(&self, key: &NodeKey, src: IpAddr) -> bool {
        self.own_or_routed(key, src)
            || (!self.by_ip.contains_key(&src) && self.exit_for(src) == Some(*key))
    }

    /// Whether `src` from peer `key` is admitted only because `key` is the exit node: an
    /// address on the internet. Such packets are let in only as part of flows this node
    /// opened; whatever the rules say, the internet cannot open connections to it through
    /// the exit node.
    pub(super) fn only_through_exit(&self, key: &NodeKey, src: IpAddr) -> bool {
        !self.own_or_routed(key, src)
    }

    /// Whether `ip` is this node's, inside a subnet it routes, or (an exit node) outside the
    /// mesh.
    pub(super) fn is_ours(&self, ip: IpAddr) -> bool {
        self.local_addrs.contains(&ip)
            || self.served_routes.iter().any(|n| n.contains(&ip))
            || (self.serves_exit && !in_mesh(&self.local_addrs, ip))
    }
}

#[cfg(test)]
mod tests {
    use super::in_mesh;

    #[test]
    fn the_mesh_ranges_are_never_outside_the_mesh() {
        let local = [
            "100.64.0.7".parse().unwrap(),
            "fd7a:1:2::7".parse().unwrap(),
        ];
        for inside in ["100.64.0.1", "100.127.255.254", "fd7a:1:2::99"] {
            assert!(in_mesh(&local, inside.parse().unwrap()), "{inside}");
        }
        for outside in [
            "100.128.0.1",
            "100.63.255.255",
            "8.8.8.8",
            "fd7a:1:3::1",
            "2001:db8::1",
        ] {
            assert!(!in_mesh(&local, outside.parse().unwrap()), "{outside}");
        }
    }
}
