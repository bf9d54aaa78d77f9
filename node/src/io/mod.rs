//! The I/O shell: everything that touches the operating system or the network.

pub mod aead;
pub mod api;
pub mod aux;
pub mod control;
pub mod dns;
pub mod event_loop;
pub mod idtoken;
pub mod ifaddrs;
pub mod keylog;
pub mod metrics;
pub mod portmap;
pub mod posture;
pub mod recycle;
pub mod relays;
pub mod routes;
pub mod steer;
pub mod tun;
pub mod udp;
pub mod workers;
