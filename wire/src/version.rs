//! Capability version: what a node understands, sent in every `Hello`.

use serde::{Deserialize, Serialize};

/// The protocol capability a process speaks. A coordinator never sends a node anything the
/// node's capability does not cover.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct CapabilityVersion(pub u32);

impl CapabilityVersion {
    /// The version this build speaks.
    ///
    /// History:
    /// - 1: 2026-11-23: initial protocol (hello/welcome, full + delta netmaps, filter rules).
    /// - 2: 2026-11-23: filter rules with validity ranges (time windows, expiry); posture
    ///   reports; tunnel security setting.
    pub const CURRENT: Self = Self(2);
}
