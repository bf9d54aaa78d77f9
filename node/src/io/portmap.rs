//! Port mapping through the gateway (UPnP-IGD, NAT-PMP or PCP, whichever it offers): a mapped
//! public port for the node's UDP port is the best endpoint there is behind a NAT.

use std::net::SocketAddr;
use std::num::NonZeroU16;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::watch;

/// How often the gateway is asked which mapping protocols it offers.
const PROBE_EVERY: std::time::Duration = std::time::Duration::from_secs(120);

/// Which mapping protocols the gateway answered, for `lattice netcheck`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GatewayProtocols {
    /// UPnP-IGD.
    pub upnp: bool,
    /// NAT-PMP.
    pub nat_pmp: bool,
    /// PCP.
    pub pcp: bool,
}

/// A running port-mapping client.
pub struct PortMapper {
    client: portmapper::Client,
    protocols: Arc<Mutex<Option<GatewayProtocols>>>,
    prober: tokio::task::AbortHandle,
}

impl PortMapper {
    /// Starts mapping `port`, and asks the gateway now and then which protocols it offers.
    pub fn start(port: u16) -> Self {
        let client = portmapper::Client::new(portmapper::Config::default());
        if let Some(p) = NonZeroU16::new(port) {
            client.update_local_port(p);
            client.procure_mapping();
        }
        let protocols = Arc::new(Mutex::new(None));
        let prober = {
            let client = client.clone();
            let protocols = Arc::clone(&protocols);
            tokio::spawn(async move {
                loop {
                    if let Ok(Ok(p)) = client.probe().await {
                        let found = GatewayProtocols {
                            upnp: p.upnp,
                            nat_pmp: p.nat_pmp,
                            pcp: p.pcp,
                        };
                        *protocols.lock().unwrap_or_else(PoisonError::into_inner) = Some(found);
                    }
                    tokio::time::sleep(PROBE_EVERY).await;
                }
            })
            .abort_handle()
        };
        Self {
            client,
            protocols,
            prober,
        }
    }

    /// What the gateway offered when last asked (`None`: not asked yet or no answer).
    pub fn protocols(&self) -> Option<GatewayProtocols> {
        *self
            .protocols
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Changes of the mapped external address.
    pub fn watch(&self) -> watch::Receiver<Option<std::net::SocketAddrV4>> {
        self.client.watch_external_address()
    }

    /// The current mapping.
    pub fn current(&self) -> Option<SocketAddr> {
        (*self.client.watch_external_address().borrow()).map(SocketAddr::V4)
    }
}

impl Drop for PortMapper {
    fn drop(&mut self) {
        self.prober.abort();
    }
}
