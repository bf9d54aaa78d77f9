//! Shared application state handed to every handler.

use std::ops::Deref;
use std::sync::Arc;
use std::time::Duration;

use hybrid::ticket::TicketSigner;
use hybrid::{FINGERPRINT_LEN, StaticKeypair};
use wire::{ControlKey, RelayInfo};

use crate::admission::ControlAdmission;
use crate::audit_store::AuditStore;
use crate::db::Pool;
use crate::db::mesh::MeshSettings;
use crate::feed::{Feed, ReplicaInfo};
use crate::hub::Hub;
use crate::presence::Presence;

/// Handler state (cheap to clone).
#[derive(Clone)]
pub struct AppState(Arc<Inner>);

/// What every handler can reach.
pub struct Inner {
    /// The database.
    pub db: Pool,
    /// The in-memory mesh.
    pub hub: Arc<Hub>,
    /// The coordinator's static Noise key.
    pub control_key: StaticKeypair,
    /// Fingerprint of the control key, as embedded in auth keys.
    pub fingerprint: [u8; FINGERPRINT_LEN],
    /// Mesh settings.
    pub mesh: MeshSettings,
    /// How long an ephemeral node may stay away before it is removed.
    pub ephemeral_timeout: Duration,
    /// Signs relay tickets.
    pub tickets: Arc<TicketSigner>,
    /// The embedded relay, as nodes see it (None with `--no-embedded-relay`).
    pub embedded_relay: Option<RelayInfo>,
    /// The embedded relay itself, for its counters.
    pub relay: Option<relay::Relay>,
    /// What the control endpoint admits before a node authenticates.
    pub admission: Arc<ControlAdmission>,
    /// SHA-256 of the admin listener's TLS certificate (admin tokens carry it).
    pub admin_pin: [u8; 32],
    /// The audit log's key and checkpoint (kept outside the database).
    pub audit: Arc<AuditStore>,
    /// This process as one of the mesh's replicas.
    pub replica: ReplicaInfo,
    /// How far this replica has followed the change feed.
    pub feed: Arc<Feed>,
    /// Session comings and goings on their way to the database.
    pub presence: Arc<Presence>,
    /// Outside issuers' signing keys (workload identity federation, and the OpenID Connect
    /// provider's).
    pub keys: Arc<crate::jwks::KeyCache>,
    /// Signing people in (`serve --oidc-issuer ...`), if configured.
    pub sign_in: Option<Arc<crate::ops::people::SignIn>>,
    /// Wrong user codes tried on the sign-in page.
    pub code_guesses: std::sync::Mutex<crate::oidc::Guesses>,
    /// What the coordinator counts for its metrics.
    pub counters: crate::metrics::Counters,
    /// The web console's signed-in browsers.
    pub console: crate::console::Sessions,
}

impl AppState {
    /// Wraps the state.
    pub fn new(inner: Inner) -> Self {
        Self(Arc::new(inner))
    }

    /// The control key in wire form.
    pub fn control_public(&self) -> ControlKey {
        ControlKey::from_bytes(self.control_key.public())
    }
}

impl Deref for AppState {
    type Target = Inner;

    fn deref(&self) -> &Inner {
        &self.0
    }
}

/// Current unix time in seconds.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Current unix time in milliseconds.
pub fn unix_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
