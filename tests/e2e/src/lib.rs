//! A network-namespace lab for Lattice: namespaces, bridges, veth links and NAT routers made
//! with iproute2 and nftables, and helpers that start the real `lattice-coordinator` and
//! `lattice` binaries inside them. Used by the e2e tests, `scripts/demo` and the benchmarks.
//!
//! Every namespace is named `lt<pid>x<n>-<role>`; a [`Lab`] deletes its namespaces and kills its
//! processes when dropped (pass or fail), and a new lab first removes namespaces left by lab
//! processes that no longer exist (e.g. killed by a test timeout).

pub mod abuse;
pub mod browser;
pub mod lab;
pub mod mesh;
mod secrets;

pub use lab::{Lab, Nat, Proc};
pub use mesh::{Coordinator, MeshNode};
pub mod bench;
pub mod issuer;
pub mod load;
