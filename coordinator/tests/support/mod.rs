//! Helpers shared by the coordinator's integration tests.
#![allow(clippy::unwrap_used, dead_code, unreachable_pub)]

use std::time::Duration;

use coordinator::db;
use coordinator::hub::Hub;
use coordinator::ops::{self, CreateAuthKey};
use coordinator::state::{AppState, Inner, unix_now};
use hybrid::StaticKeypair;
use rand::{SeedableRng, rngs::StdRng};
use wire::{CapabilityVersion, Hello, MachineKey, NodeKey};

pub async fn state(dir: &std::path::Path) -> AppState {
    state_with_pin(dir, [7; 32]).await
}

/// A state whose admin listener certificate has `admin_pin`.
pub async fn state_with_pin(dir: &std::path::Path, admin_pin: [u8; 32]) -> AppState {
    let pool = db::open(&dir.join("c.db").display().to_string())
        .await
        .unwrap();
    let mut conn = pool.acquire().await.unwrap();
    let mesh = db::mesh::get_or_create(
        &mut conn,
        "mesh.internal",
        "fd11:2233:4455::/48".parse().unwrap(),
        unix_now(),
    )
    .await
    .unwrap();
    drop(conn);
    let audit = std::sync::Arc::new(
        coordinator::audit_store::AuditStore::open(dir, &pool)
            .await
            .unwrap(),
    );
    let key = StaticKeypair::generate(&mut StdRng::seed_from_u64(1));
    AppState::new(Inner {
        db: pool,
        hub: Hub::new(
            "mesh.internal".into(),
            policy::Policy::allow_all(),
            0,
            vec![],
            unix_now(),
        ),
        fingerprint: hybrid::fingerprint(&key.public()),
        control_key: key,
        mesh,
        ephemeral_timeout: Duration::from_secs(60),
        tickets: std::sync::Arc::new(hybrid::ticket::TicketSigner::from_seed([2; 32])),
        embedded_relay: None,
        relay: None,
        admission: Default::default(),
        admin_pin,
        audit,
    })
}

pub fn hello(i: u8, host: &str, key: Option<&str>) -> Hello {
    Hello {
        capability: CapabilityVersion::CURRENT,
        node_key: NodeKey::from_bytes([i; 32]),
        hostname: host.into(),
        auth_key: key.map(|k| k.parse().unwrap()),
        endpoints: vec!["198.51.100.5:41641".parse().unwrap()],
        os: "linux".into(),
        client_version: "test".into(),
        node_key_proof: None,
    }
}

pub fn machine(i: u8) -> MachineKey {
    MachineKey::from_bytes([i; 32])
}

pub async fn key(st: &AppState, reusable: bool, expiry_secs: u64) -> String {
    ops::create_auth_key(
        st,
        CreateAuthKey {
            reusable,
            ephemeral: false,
            tags: vec!["tag:db".into()],
            user: None,
            expiry_secs,
        },
        "test",
    )
    .await
    .unwrap()
    .key
}
