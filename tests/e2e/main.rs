//! End-to-end tests: the real `lattice-coordinator` and `lattice` binaries in network
//! namespaces, checked the way a user would check them (ping by name, checksummed transfers,
//! `lattice status --json`, `nodes list`).
//!
//! They need root (CI runs as root). Without it they print SKIPPED and pass, unless
//! `LATTICE_E2E_REQUIRED=1` is set, in which case they fail.

#![allow(clippy::unwrap_used)] // a test binary: a failed unwrap is a failed test

mod abuse;
mod backup;
mod console;
mod federation;
mod foundation;
mod hardening;
mod load;
mod metrics;
mod nat;
mod packaging;
mod people;
mod policy;
mod pq;
mod replicas;
mod routes;
mod support;
