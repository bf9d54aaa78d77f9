//! Port mapping through the gateway (UPnP-IGD, NAT-PMP or PCP, whichever it offers): a mapped
//! public port for the node's UDP port is the best endpoint there is behind a NAT.

use std::net::SocketAddr;
use std::num::NonZeroU16;

use tokio::sync::watch;

/// A running port-mapping client.
pub struct PortMapper {
    client: portmapper::Client,
}

impl PortMapper {
    /// Starts mapping `port`.
    pub fn start(port: u16) -> Self {
        let client = portmapper::Client::new(portmapper::Config::default());
        if let Some(p) = NonZeroU16::new(port) {
            client.update_local_port(p);
            client.procure_mapping();
        }
        Self { client }
    }

    /// Changes of the mapped external address.
    pub fn watch(&self) -> watch::Receiver<Option<std::net::SocketAddrV4>> {
        self.client.watch_external_address()
    }

    /// Which mapping protocols the gateway answers (for `lattice netcheck`).
    pub async fn probe(&self) -> Option<(bool, bool, bool)> {
        let out = self.client.probe().await.ok()?.ok()?;
        Some((out.upnp, out.nat_pmp, out.pcp))
    }

    /// The current mapping.
    pub fn current(&self) -> Option<SocketAddr> {
        (*self.client.watch_external_address().borrow()).map(SocketAddr::V4)
    }
}
