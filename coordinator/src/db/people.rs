//! The `users` and `logins` tables: people who sign in through the mesh's OpenID Connect
//! provider, and the sign-ins in progress. Pending logins live here rather than in memory so
//! that the provider's callback may reach any replica, and so that a `state` is claimed by
//! exactly one callback even when two race on different replicas.

use sqlx::{AnyConnection, FromRow};
use wire::MachineKey;

use super::DbError;
use crate::oidc::{Identity, Login, LoginError, MAX_PENDING, MAX_PENDING_PER_IP};

/// A pending (or finished) login as stored.
#[derive(Clone, PartialEq, Eq)]
pub struct StoredLogin {
    /// The secrets and code.
    pub login: Login,
    /// The machine that asked to sign in.
    pub machine_key: String,
    /// The device's hostname, shown on the sign-in page.
    pub hostname: String,
    /// Set once the provider's callback claimed the login.
    pub callback_at: Option<i64>,
    /// Who signed in, once done.
    pub user_id: Option<i64>,
    /// Whether the sign-in used a second factor.
    pub mfa: bool,
    /// Why the sign-in failed, if it did.
    pub error: Option<String>,
}

impl std::fmt::Debug for StoredLogin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredLogin")
            .field("login", &self.login)
            .field("hostname", &self.hostname)
            .field("callback_at", &self.callback_at)
            .field("user_id", &self.user_id)
            .field("error", &self.error)
            .finish_non_exhaustive()
    }
}

#[derive(FromRow)]
struct LoginRow {
    state: String,
    user_code: String,
    nonce: String,
    pkce_verifier: String,
    machine_key: String,
    hostname: String,
    expires_at: i64,
    callback_at: Option<i64>,
    user_id: Option<i64>,
    mfa: i64,
    error: Option<String>,
}

impl From<LoginRow> for StoredLogin {
    fn from(r: LoginRow) -> Self {
        Self {
            login: Login {
                user_code: r.user_code,
                state: r.state,
                nonce: r.nonce,
                pkce_verifier: r.pkce_verifier,
                expires_at: r.expires_at,
            },
            machine_key: r.machine_key,
            hostname: r.hostname,
            callback_at: r.callback_at,
            user_id: r.user_id,
            mfa: r.mfa != 0,
            error: r.error,
        }
    }
}

macro_rules! select_logins {
    ($rest:literal) => {
        concat!(
            "SELECT state, user_code, nonce, pkce_verifier, machine_key, hostname, expires_at, ",
            "callback_at, user_id, mfa, error FROM logins ",
            $rest
        )
    };
}

/// Stores a new login for `owner` (a machine key's text, or `admin:HASH`; see
/// [`by_owner`]), unless too many are pending (in all, or from `source_ip`).
pub async fn insert_login(
    conn: &mut AnyConnection,
    login: &Login,
    owner: &str,
    hostname: &str,
    source_ip: &str,
    now: i64,
) -> Result<Result<(), LoginError>, DbError> {
    sqlx::query("DELETE FROM logins WHERE expires_at <= $1")
        .bind(now)
        .execute(&mut *conn)
        .await?;
    let (all,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM logins WHERE callback_at IS NULL")
        .fetch_one(&mut *conn)
        .await?;
    let (from_ip,): (i64,) =
        sqlx::query_as("SELECT COUNT(*) FROM logins WHERE callback_at IS NULL AND source_ip = $1")
            .bind(source_ip)
            .fetch_one(&mut *conn)
            .await?;
    if u64::try_from(all).unwrap_or(0) >= MAX_PENDING
        || u64::try_from(from_ip).unwrap_or(0) >= MAX_PENDING_PER_IP
    {
        return Ok(Err(LoginError::Busy));
    }
    sqlx::query(
        "INSERT INTO logins (state, user_code, nonce, pkce_verifier, machine_key, hostname, \
         source_ip, created_at, expires_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(&login.state)
    .bind(&login.user_code)
    .bind(&login.nonce)
    .bind(&login.pkce_verifier)
    .bind(owner)
    .bind(hostname)
    .bind(source_ip)
    .bind(now)
    .bind(login.expires_at)
    .execute(&mut *conn)
    .await?;
    Ok(Ok(()))
}

/// The login `machine` already has pending (not yet claimed, not expired), to show the same
/// URL again when the device reconnects.
pub async fn pending_for_machine(
    conn: &mut AnyConnection,
    machine: &MachineKey,
    now: i64,
) -> Result<Option<StoredLogin>, DbError> {
    let row: Option<LoginRow> = sqlx::query_as(select_logins!(
        "WHERE machine_key = $1 AND callback_at IS NULL AND expires_at > $2 \
         ORDER BY expires_at DESC LIMIT 1"
    ))
    .bind(machine.to_text())
    .bind(now)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(row.map(StoredLogin::from))
}

/// The newest login (in any stage) that `owner` started: a machine key's text, or
/// `admin:HASH` for an admin sign-in polled with a secret whose SHA-256 is HASH.
pub async fn by_owner(
    conn: &mut AnyConnection,
    owner: &str,
) -> Result<Option<StoredLogin>, DbError> {
    let row: Option<LoginRow> = sqlx::query_as(select_logins!(
        "WHERE machine_key = $1 ORDER BY expires_at DESC LIMIT 1"
    ))
    .bind(owner)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(row.map(StoredLogin::from))
}

/// The pending login whose user code is `code` (normalized), if it has not expired.
pub async fn by_user_code(
    conn: &mut AnyConnection,
    code: &str,
    now: i64,
) -> Result<Option<StoredLogin>, DbError> {
    let row: Option<LoginRow> = sqlx::query_as(select_logins!(
        "WHERE user_code = $1 AND callback_at IS NULL AND expires_at > $2"
    ))
    .bind(crate::oidc::normalize_user_code(code))
    .bind(now)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(row.map(StoredLogin::from))
}

/// The login `state` names, in whatever stage it is.
pub async fn by_state(
    conn: &mut AnyConnection,
    state: &str,
) -> Result<Option<StoredLogin>, DbError> {
    let row: Option<LoginRow> = sqlx::query_as(select_logins!("WHERE state = $1"))
        .bind(state)
        .fetch_optional(&mut *conn)
        .await?;
    Ok(row.map(StoredLogin::from))
}

/// The provider's callback brought `state`: claims the login it belongs to. A state is good
/// for one callback, and only while its login lasts; the claim is one conditional update, so
/// of two callbacks racing (on any replicas) one wins.
pub async fn claim_login(
    conn: &mut AnyConnection,
    state: &str,
    now: i64,
) -> Result<Result<StoredLogin, LoginError>, DbError> {
    let claimed =
        sqlx::query("UPDATE logins SET callback_at = $1 WHERE state = $2 AND callback_at IS NULL")
            .bind(now)
            .bind(state)
            .execute(&mut *conn)
            .await?
            .rows_affected();
    if claimed != 1 {
        return Ok(Err(LoginError::UnknownState));
    }
    let Some(login) = by_state(conn, state).await? else {
        return Ok(Err(LoginError::UnknownState));
    };
    if login.login.expires_at <= now {
        return Ok(Err(LoginError::Expired));
    }
    Ok(Ok(login))
}

/// Records the outcome of a claimed login: who signed in (and with a second factor or not),
/// or why it failed.
pub async fn finish_login(
    conn: &mut AnyConnection,
    state: &str,
    outcome: Result<(i64, bool), &str>,
) -> Result<(), DbError> {
    let (user, mfa, error) = match outcome {
        Ok((u, mfa)) => (Some(u), i64::from(mfa), None),
        Err(e) => (None, 0, Some(e)),
    };
    sqlx::query("UPDATE logins SET user_id = $1, mfa = $2, error = $3 WHERE state = $4")
        .bind(user)
        .bind(mfa)
        .bind(error)
        .bind(state)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Forgets a login whose outcome was used (or that the device gave up on).
pub async fn delete_login(conn: &mut AnyConnection, state: &str) -> Result<(), DbError> {
    sqlx::query("DELETE FROM logins WHERE state = $1")
        .bind(state)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// A person known to the mesh.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct User {
    /// Row id.
    pub id: i64,
    /// The provider's issuer.
    pub issuer: String,
    /// The provider's subject.
    pub subject: String,
    /// The name policies use (e-mail).
    pub login_name: String,
    /// Display name.
    pub display_name: Option<String>,
    /// The provider's groups at the last sign-in.
    pub groups: Vec<String>,
    /// This user's node key lifetime in seconds (None: the mesh's).
    pub key_expiry_s: Option<i64>,
    /// First sign-in (Unix seconds).
    pub created_at: i64,
    /// Last sign-in.
    pub last_login_at: i64,
}

#[derive(FromRow)]
struct UserRow {
    id: i64,
    issuer: String,
    subject: String,
    login_name: String,
    display_name: Option<String>,
    groups: String,
    key_expiry_s: Option<i64>,
    created_at: i64,
    last_login_at: i64,
}

impl TryFrom<UserRow> for User {
    type Error = DbError;

    fn try_from(r: UserRow) -> Result<Self, DbError> {
        Ok(Self {
            groups: serde_json::from_str(&r.groups).map_err(|_| DbError::Corrupt {
                table: "users",
                detail: format!("user {}: bad groups", r.id),
            })?,
            id: r.id,
            issuer: r.issuer,
            subject: r.subject,
            login_name: r.login_name,
            display_name: r.display_name,
            key_expiry_s: r.key_expiry_s,
            created_at: r.created_at,
            last_login_at: r.last_login_at,
        })
    }
}

macro_rules! select_users {
    ($rest:literal) => {
        concat!(
            "SELECT id, issuer, subject, login_name, display_name, groups, key_expiry_s, ",
            "created_at, last_login_at FROM users ",
            $rest
        )
    };
}

/// Every user, by login name.
pub async fn users(conn: &mut AnyConnection) -> Result<Vec<User>, DbError> {
    let rows: Vec<UserRow> = sqlx::query_as(select_users!("ORDER BY login_name"))
        .fetch_all(&mut *conn)
        .await?;
    rows.into_iter().map(User::try_from).collect()
}

/// The user with row id `id`.
pub async fn user(conn: &mut AnyConnection, id: i64) -> Result<Option<User>, DbError> {
    let row: Option<UserRow> = sqlx::query_as(select_users!("WHERE id = $1"))
        .bind(id)
        .fetch_optional(&mut *conn)
        .await?;
    row.map(User::try_from).transpose()
}

/// The user called `login_name`.
pub async fn user_by_name(
    conn: &mut AnyConnection,
    login_name: &str,
) -> Result<Option<User>, DbError> {
    let row: Option<UserRow> = sqlx::query_as(select_users!("WHERE login_name = $1"))
        .bind(login_name)
        .fetch_optional(&mut *conn)
        .await?;
    row.map(User::try_from).transpose()
}

/// Why a signed-in person cannot be recorded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UserConflict {
    /// Another identity (an account deleted and made again at the provider, say) holds the
    /// login name.
    #[error(
        "{0} is already the name of another account at the identity provider; an admin must remove that user first"
    )]
    NameTaken(String),
}

/// Records a sign-in: creates the user, or refreshes their e-mail, name and groups (the
/// identity is the issuer and subject). Returns the user and their login name before, if it
/// changed (their nodes must follow).
pub async fn upsert_user(
    conn: &mut AnyConnection,
    id: &Identity,
    now: i64,
) -> Result<Result<(User, Option<String>), UserConflict>, DbError> {
    let name = id.login_name();
    let groups = serde_json::to_string(&id.groups).unwrap_or_else(|_| "[]".into());
    let existing: Option<UserRow> =
        sqlx::query_as(select_users!("WHERE issuer = $1 AND subject = $2"))
            .bind(&id.issuer)
            .bind(&id.subject)
            .fetch_optional(&mut *conn)
            .await?;
    if let Some(holder) = user_by_name(conn, &name).await?
        && (holder.issuer != id.issuer || holder.subject != id.subject)
    {
        return Ok(Err(UserConflict::NameTaken(name)));
    }
    let renamed = match existing {
        Some(u) => {
            sqlx::query(
                "UPDATE users SET login_name = $1, display_name = $2, groups = $3, \
                 last_login_at = $4 WHERE id = $5",
            )
            .bind(&name)
            .bind(&id.name)
            .bind(&groups)
            .bind(now)
            .bind(u.id)
            .execute(&mut *conn)
            .await?;
            (u.login_name != name).then_some(u.login_name)
        }
        None => {
            sqlx::query(
                "INSERT INTO users (issuer, subject, login_name, display_name, groups, \
                 created_at, last_login_at) VALUES ($1, $2, $3, $4, $5, $6, $6)",
            )
            .bind(&id.issuer)
            .bind(&id.subject)
            .bind(&name)
            .bind(&id.name)
            .bind(&groups)
            .bind(now)
            .execute(&mut *conn)
            .await?;
            None
        }
    };
    let user = user_by_name(conn, &name).await?.ok_or(DbError::Corrupt {
        table: "users",
        detail: format!("user {name} vanished after its sign-in"),
    })?;
    Ok(Ok((user, renamed)))
}

/// Sets (or with `None` clears) a user's own node key lifetime. False if there is no such
/// user.
pub async fn set_user_key_expiry(
    conn: &mut AnyConnection,
    login_name: &str,
    secs: Option<i64>,
) -> Result<bool, DbError> {
    let n = sqlx::query("UPDATE users SET key_expiry_s = $1 WHERE login_name = $2")
        .bind(secs)
        .bind(login_name)
        .execute(&mut *conn)
        .await?
        .rows_affected();
    Ok(n == 1)
}
