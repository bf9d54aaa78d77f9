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

/// A fresh, empty database and state dir for one test, on one backend.
pub struct TestDb {
    /// The state dir (keys, audit checkpoint; the SQLite file too on SQLite).
    pub dir: tempfile::TempDir,
    /// What `db::open` takes.
    pub url: String,
    /// The PostgreSQL server and the database made for this test.
    pg: Option<(String, String)>,
}

impl TestDb {
    /// A SQLite database in the state dir.
    pub fn sqlite() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let url = dir.path().join("c.db").display().to_string();
        Self { dir, url, pg: None }
    }

    /// A new database on the PostgreSQL server `LATTICE_TEST_PG` names (`scripts/test` starts
    /// one), or `None` (the test is skipped, loudly) when there is none, unless
    /// `LATTICE_PG_REQUIRED=1`.
    pub async fn postgres() -> Option<Self> {
        let Ok(server) = std::env::var("LATTICE_TEST_PG") else {
            assert!(
                std::env::var("LATTICE_PG_REQUIRED").as_deref() != Ok("1"),
                "LATTICE_PG_REQUIRED=1 but LATTICE_TEST_PG names no PostgreSQL server"
            );
            eprintln!(
                "SKIPPED: set LATTICE_TEST_PG=postgres://... (scripts/test does) to run on PostgreSQL"
            );
            return None;
        };
        let name = format!(
            "lattice_test_{}_{:016x}",
            std::process::id(),
            rand::random::<u64>()
        );
        let url = db::create_postgres_database(&server, &name).await.unwrap();
        Some(Self {
            dir: tempfile::tempdir().unwrap(),
            url,
            pg: Some((server, name)),
        })
    }

    /// The state dir.
    pub fn path(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// Whether this is the PostgreSQL run.
    pub fn is_postgres(&self) -> bool {
        self.pg.is_some()
    }

    /// Drops an append-only trigger, as someone with write access to the database could.
    pub async fn drop_trigger(&self, conn: &mut sqlx::AnyConnection, trigger: &str, table: &str) {
        let q = if self.is_postgres() {
            format!("DROP TRIGGER {trigger} ON {table}")
        } else {
            format!("DROP TRIGGER {trigger}")
        };
        sqlx::query(sqlx::AssertSqlSafe(q))
            .execute(&mut *conn)
            .await
            .unwrap();
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Some((server, name)) = self.pg.take() {
            // Drop runs inside the test's runtime; the database goes on a thread of its own.
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                if let Err(e) = rt.block_on(db::drop_postgres_database(&server, &name)) {
                    eprintln!("could not drop test database {name}: {e}");
                }
            })
            .join();
        }
    }
}

/// Runs an async test body once on SQLite and once on PostgreSQL:
/// `db_test!(async fn name(db) { ... })` makes `name::sqlite` and `name::postgres`.
#[macro_export]
macro_rules! db_test {
    ($(#[$attr:meta])* async fn $name:ident($db:ident) $body:block) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            $(#[$attr])*
            async fn run($db: $crate::support::TestDb) $body
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn sqlite() {
                run($crate::support::TestDb::sqlite()).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn postgres() {
                if let Some(db) = $crate::support::TestDb::postgres().await {
                    run(db).await
                }
            }
        }
    };
}

pub async fn state(db: &TestDb) -> AppState {
    state_with_pin(db, [7; 32]).await
}

/// A state whose admin listener certificate has `admin_pin`.
pub async fn state_with_pin(tdb: &TestDb, admin_pin: [u8; 32]) -> AppState {
    state_with(tdb, admin_pin, None).await
}

/// A state whose admin listener certificate has `admin_pin`, where people sign in through
/// `sign_in`.
pub async fn state_with(
    tdb: &TestDb,
    admin_pin: [u8; 32],
    sign_in: Option<std::sync::Arc<ops::people::SignIn>>,
) -> AppState {
    let dir = tdb.path();
    let pool = db::open(&tdb.url).await.unwrap();
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
    let st = AppState::new(Inner {
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
        replica: coordinator::feed::ReplicaInfo::new(None, None),
        feed: Default::default(),
        presence: Default::default(),
        keys: std::sync::Arc::new(coordinator::jwks::KeyCache::new(None).unwrap()),
        sign_in,
        code_guesses: Default::default(),
        counters: Default::default(),
        console: Default::default(),
    });
    coordinator::feed::start(&st).await.unwrap();
    st
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
        id_token: None,
        advertised_routes: Vec::new(),
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
