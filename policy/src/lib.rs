//! Lattice access policy.
//!
//! Turns a policy plus the coordinator's inventory of nodes into what each node needs: the
//! inbound [`wire::FilterRule`]s it enforces and the set of peers it may see. Pure functions, no
//! I/O, no clock: the caller passes the time.
//!
//! Until an admin sets a policy file, the coordinator uses [`Policy::allow_all`], a named
//! default under which every node may reach every node on every port. It is compiled through the
//! same path as any other policy (it is not a bypass of the filter).
#![warn(missing_docs)]

mod compile;
mod inventory;

pub use compile::Compiled;
pub use inventory::{Inventory, InventoryNode};

/// An access policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    kind: PolicyKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum PolicyKind {
    AllowAll,
}

impl Policy {
    /// The built-in default: every node may reach every node, any protocol and port.
    pub fn allow_all() -> Self {
        Self {
            kind: PolicyKind::AllowAll,
        }
    }

    /// A short name for logs and `policy get`.
    pub fn name(&self) -> &'static str {
        match self.kind {
            PolicyKind::AllowAll => compile::ALLOW_ALL_ORIGIN,
        }
    }
}

impl Default for Policy {
    fn default() -> Self {
        Self::allow_all()
    }
}
