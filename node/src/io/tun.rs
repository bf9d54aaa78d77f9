//! The TUN device: created once the node knows its overlay addresses.
//!
//! The IPv4 address is assigned with the /10 of the overlay range and the IPv6 address with the
//! mesh's /48, so the kernel's connected routes send all mesh traffic into the device without
//! touching any other route. The DNS resolver address 100.100.100.100/32 is assigned too, which
//! makes queries to it local to this host (served by the node's DNS on that address).

use std::net::{IpAddr, Ipv4Addr};

use anyhow::Context;
use tun_rs::{AsyncDevice, DeviceBuilder};

/// The node-local DNS address.
pub const RESOLVER: Ipv4Addr = Ipv4Addr::new(100, 100, 100, 100);
const V4_PREFIX: u8 = 10;
const V6_PREFIX: u8 = 48;

/// An up TUN device with its addresses.
pub struct Tun {
    /// The device.
    pub dev: AsyncDevice,
    name: String,
    addrs: Vec<IpAddr>,
}

impl Tun {
    /// Creates the device `name` with `addrs` and `mtu`.
    pub fn create(name: &str, mtu: u16, addrs: &[IpAddr]) -> anyhow::Result<Self> {
        let mut b = DeviceBuilder::new().name(name).mtu(mtu);
        for a in addrs {
            b = match a {
                IpAddr::V4(v4) => b.ipv4(*v4, V4_PREFIX, None),
                IpAddr::V6(v6) => b.ipv6(*v6, V6_PREFIX),
            };
        }
        let dev = b.build_async().with_context(|| {
            format!("creating TUN device {name} (are we root, with /dev/net/tun?)")
        })?;
        dev.add_address_v4(RESOLVER, 32u8)
            .context("assigning the DNS resolver address")?;
        Ok(Self {
            dev,
            name: name.to_owned(),
            addrs: addrs.to_vec(),
        })
    }

    /// The device name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Replaces the overlay addresses.
    pub fn set_addresses(&mut self, addrs: &[IpAddr]) -> anyhow::Result<()> {
        for old in self.addrs.clone() {
            if !addrs.contains(&old) {
                self.dev
                    .remove_address(old)
                    .with_context(|| format!("removing {old} from {}", self.name))?;
            }
        }
        for new in addrs {
            if self.addrs.contains(new) {
                continue;
            }
            match new {
                IpAddr::V4(v4) => self.dev.add_address_v4(*v4, V4_PREFIX),
                IpAddr::V6(v6) => self.dev.add_address_v6(*v6, V6_PREFIX),
            }
            .with_context(|| format!("adding {new} to {}", self.name))?;
        }
        self.addrs = addrs.to_vec();
        Ok(())
    }
}
