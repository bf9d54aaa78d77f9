//! People signing in through the mesh's OpenID Connect provider: starting a sign-in for a
//! device, the provider's callback (code exchange, the user recorded, their nodes' groups
//! refreshed), and waiting for the outcome. Users: list, and their own key lifetime.

use std::time::Duration;

use rand::SeedableRng as _;
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tracing::{info, warn};
use wire::MachineKey;

use crate::audit::NewEntry;
use crate::db::changes::Kind;
use crate::db::people::{StoredLogin, User};
use crate::db::{self, DbError};
use crate::error::ApiError;
use crate::feed;
use crate::oidc::{self, Login, LoginError, OidcConfig};
use crate::secret::Secret;
use crate::state::{AppState, unix_now, unix_now_ms};

/// The mesh's OpenID Connect provider, as `serve --oidc-*` configured it.
#[derive(Debug)]
pub struct SignIn {
    /// The provider and what to read from its tokens.
    pub cfg: OidcConfig,
    /// Our client secret at the provider.
    pub client_secret: Secret,
    /// The coordinator's public URL (`serve --public-url`): the sign-in page and the
    /// provider's redirect target are under it.
    pub public_url: String,
    /// People (login names) who may sign in as admins.
    pub admins: Vec<String>,
    /// Provider groups whose members may sign in as admins.
    pub admin_groups: Vec<String>,
}

impl SignIn {
    /// Whether `user` may administer the mesh (listed by name, or in an admin group at their
    /// last sign-in).
    pub fn is_admin(&self, user: &User) -> bool {
        self.admins
            .iter()
            .any(|a| a.eq_ignore_ascii_case(&user.login_name))
            || user.groups.iter().any(|g| self.admin_groups.contains(g))
    }

    /// Where the provider sends the browser back (register this at the provider).
    pub fn redirect_uri(&self) -> String {
        format!("{}/oidc/callback", self.public_url)
    }

    /// The page a device shows its user.
    pub fn login_url(&self, user_code: &str) -> String {
        format!("{}/login?code={user_code}", self.public_url)
    }
}

/// Someone signed in for a device: who, and whether with a second factor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedIn {
    /// The user.
    pub user: User,
    /// Whether the sign-in used a second factor.
    pub mfa: bool,
}

/// Why a sign-in could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// No provider configured.
    #[error("this mesh has no identity provider; join with an auth key")]
    NotConfigured,
    /// Too many pending.
    #[error(transparent)]
    Refused(#[from] LoginError),
    /// The database failed.
    #[error(transparent)]
    Db(#[from] DbError),
}

/// Starts a sign-in for `machine` (or returns the one it already has pending, so a device
/// that reconnects shows the same URL).
pub async fn start(
    st: &AppState,
    machine: &MachineKey,
    hostname: &str,
    source_ip: &str,
    now: i64,
) -> Result<(StoredLogin, String), StartError> {
    let sign_in = st.sign_in.as_ref().ok_or(StartError::NotConfigured)?;
    let mut conn = st.db.acquire().await.map_err(DbError::from)?;
    if let Some(pending) = db::people::pending_for_machine(&mut conn, machine, now).await? {
        let url = sign_in.login_url(&pending.login.user_code);
        return Ok((pending, url));
    }
    drop(conn);
    let login = Login::new(now, &mut StdRng::from_rng(&mut rand::rng()));
    let mut tx = db::begin_write(&st.db).await?;
    db::people::insert_login(
        &mut tx,
        &login,
        &machine.to_text(),
        hostname,
        source_ip,
        now,
    )
    .await??;
    tx.commit().await.map_err(DbError::from)?;
    let url = sign_in.login_url(&login.user_code);
    Ok((
        StoredLogin {
            login,
            machine_key: machine.to_text(),
            hostname: hostname.to_owned(),
            callback_at: None,
            user_id: None,
            mfa: false,
            error: None,
        },
        url,
    ))
}

/// How a sign-in ended, as the device's session sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Not yet.
    Pending,
    /// Signed in.
    Done(SignedIn),
    /// Refused (the message says why).
    Failed(String),
    /// The sign-in link expired unused (or the row is gone).
    Expired,
}

/// Where the sign-in `state` stands.
pub async fn outcome(st: &AppState, state: &str, now: i64) -> Result<Outcome, DbError> {
    let mut conn = st.db.acquire().await?;
    let Some(l) = db::people::by_state(&mut conn, state).await? else {
        return Ok(Outcome::Expired);
    };
    if let Some(e) = l.error {
        return Ok(Outcome::Failed(e));
    }
    if let Some(id) = l.user_id {
        return Ok(match db::people::user(&mut conn, id).await? {
            Some(user) => Outcome::Done(SignedIn { user, mfa: l.mfa }),
            None => Outcome::Failed("the user was removed during the sign-in".into()),
        });
    }
    // A claimed login has a little longer than its link to finish the code exchange.
    let grace = if l.callback_at.is_some() { 60 } else { 0 };
    if l.login.expires_at + grace <= now {
        return Ok(Outcome::Expired);
    }
    Ok(Outcome::Pending)
}

/// Waits (polling every second) until the sign-in `state` is done, failed or expired.
pub async fn wait(st: &AppState, state: &str) -> Result<Outcome, DbError> {
    loop {
        match outcome(st, state, unix_now()).await? {
            Outcome::Pending => tokio::time::sleep(Duration::from_secs(1)).await,
            done => return Ok(done),
        }
    }
}

/// Forgets a sign-in whose outcome was used.
pub async fn forget(st: &AppState, state: &str) -> Result<(), DbError> {
    let mut conn = st.db.acquire().await?;
    db::people::delete_login(&mut conn, state).await
}

/// What the sign-in page shows for a user code: the device asking.
pub async fn pending_by_code(
    st: &AppState,
    code: &str,
    now: i64,
) -> Result<Option<(StoredLogin, String)>, ApiError> {
    let sign_in = st
        .sign_in
        .as_ref()
        .ok_or_else(|| ApiError::NotFound("this mesh has no identity provider".into()))?;
    let mut conn = st.db.acquire().await.map_err(DbError::from)?;
    let Some(l) = db::people::by_user_code(&mut conn, code, now).await? else {
        return Ok(None);
    };
    let provider = st
        .keys
        .provider(&sign_in.cfg.issuer)
        .await
        .map_err(|e| ApiError::Unavailable(format!("the identity provider: {e:#}")))?;
    let endpoint = provider.authorization_endpoint.clone().ok_or_else(|| {
        ApiError::Unavailable(
            "the identity provider's discovery document names no authorization_endpoint".into(),
        )
    })?;
    let url = oidc::authorize_url(&sign_in.cfg, &endpoint, &sign_in.redirect_uri(), &l.login);
    Ok(Some((l, url)))
}

/// The provider sent the browser back with `code` and `state` (or `error`): claims the
/// login (once), exchanges the code, checks the ID token, records the user (their nodes
/// follow their new groups) and the login's outcome. Returns who signed in, or why not (for
/// the page; the device is told the same).
pub async fn callback(
    st: &AppState,
    state: &str,
    code: Option<&str>,
    provider_error: Option<&str>,
    now: i64,
) -> Result<Result<String, String>, DbError> {
    let Some(sign_in) = st.sign_in.as_ref() else {
        return Ok(Err("this mesh has no identity provider".into()));
    };
    let login = {
        let mut conn = st.db.acquire().await?;
        match db::people::claim_login(&mut conn, state, now).await? {
            Ok(l) => l,
            // Nothing to record: the state is not ours, or used, or too old.
            Err(e) => return Ok(Err(e.to_string())),
        }
    };
    let identity = match (code, provider_error) {
        (_, Some(e)) => Err(format!("the identity provider refused: {e}")),
        (None, None) => Err("the identity provider sent no code".into()),
        (Some(code), None) => oidc::exchange_code(
            &st.keys,
            &sign_in.cfg,
            sign_in.client_secret.expose(),
            &sign_in.redirect_uri(),
            code,
            &login.login,
            now,
        )
        .await
        .map_err(|e| format!("{e:#}")),
    };
    let identity = match identity {
        Ok(i) => i,
        Err(why) => {
            warn!(state_of = %login.hostname, reason = %why, "sign-in refused");
            let mut conn = st.db.acquire().await?;
            db::people::finish_login(&mut conn, state, Err(&why)).await?;
            return Ok(Err(why));
        }
    };
    let mut tx = db::begin_write(&st.db).await?;
    let (user, renamed) = match db::people::upsert_user(&mut tx, &identity, now).await? {
        Ok(u) => u,
        Err(conflict) => {
            let why = conflict.to_string();
            db::people::finish_login(&mut tx, state, Err(&why)).await?;
            tx.commit().await.map_err(DbError::from)?;
            return Ok(Err(why));
        }
    };
    let old_name = renamed.as_deref().unwrap_or(&user.login_name);
    let changed = db::nodes::follow_user(&mut tx, old_name, &user.login_name, &user.groups).await?;
    db::people::finish_login(&mut tx, state, Ok((user.id, identity.mfa))).await?;
    db::audit::append(
        &mut tx,
        st.audit.key(),
        NewEntry::new(
            format!("user:{}", user.login_name),
            "user.login",
            &user.login_name,
            json!({"issuer": user.issuer, "subject": user.subject, "groups": user.groups,
                   "mfa": identity.mfa, "device": login.hostname,
                   "renamed_from": renamed}),
        ),
        unix_now_ms(),
    )
    .await?;
    let mut seq = None;
    for id in changed {
        seq = Some(feed::note(&mut tx, Kind::Node, Some(id), None).await?);
    }
    match seq {
        Some(seq) => feed::commit(st, tx, seq).await?,
        None => tx.commit().await.map_err(DbError::from)?,
    }
    info!(user = %user.login_name, device = %login.hostname, mfa = identity.mfa, "signed in");
    Ok(Ok(user.login_name))
}

/// A user as `users list` shows them.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UserView {
    /// The name policies use.
    pub login_name: String,
    /// Display name.
    pub display_name: Option<String>,
    /// The provider's issuer and subject.
    pub issuer: String,
    /// See `issuer`.
    pub subject: String,
    /// Groups at the last sign-in.
    pub groups: Vec<String>,
    /// The user's own key lifetime (seconds), if set.
    pub key_expiry_secs: Option<i64>,
    /// Last sign-in, Unix seconds.
    pub last_login_unix: i64,
}

/// Every user.
pub async fn list_users(st: &AppState) -> Result<Vec<UserView>, ApiError> {
    let mut conn = st.db.acquire().await.map_err(DbError::from)?;
    Ok(db::people::users(&mut conn)
        .await?
        .into_iter()
        .map(|u| UserView {
            login_name: u.login_name,
            display_name: u.display_name,
            issuer: u.issuer,
            subject: u.subject,
            groups: u.groups,
            key_expiry_secs: u.key_expiry_s,
            last_login_unix: u.last_login_at,
        })
        .collect())
}

/// Sets (or clears) a user's own node key lifetime; keys issued at their next sign-in get it.
pub async fn set_user_key_expiry(
    st: &AppState,
    login_name: &str,
    secs: Option<i64>,
    actor: &str,
) -> Result<(), ApiError> {
    if secs.is_some_and(|s| s <= 0) {
        return Err(ApiError::BadRequest(
            "the key expiry must be positive".into(),
        ));
    }
    let mut tx = db::begin_write(&st.db).await?;
    if !db::people::set_user_key_expiry(&mut tx, login_name, secs).await? {
        return Err(ApiError::NotFound(format!("no user named {login_name:?}")));
    }
    db::audit::append(
        &mut tx,
        st.audit.key(),
        NewEntry::new(
            actor,
            "user.key_expiry",
            login_name,
            json!({"key_expiry_secs": secs}),
        ),
        unix_now_ms(),
    )
    .await?;
    tx.commit().await.map_err(DbError::from)?;
    Ok(())
}

/// How long the admin token of a person's admin sign-in lasts.
pub const ADMIN_SESSION_S: u64 = 12 * 3600;

/// An admin sign-in, started: the page to open, its code, and the secret to poll with.
#[derive(Serialize, Deserialize)]
pub struct AdminLoginStart {
    /// The sign-in page.
    pub url: String,
    /// The code it shows.
    pub user_code: String,
    /// When the link stops working (Unix seconds).
    pub expires_unix: i64,
    /// What `poll` is called with (secret to the caller).
    pub poll_token: String,
}

impl std::fmt::Debug for AdminLoginStart {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminLoginStart")
            .field("url", &self.url)
            .field("expires_unix", &self.expires_unix)
            .finish_non_exhaustive()
    }
}

fn poll_owner(poll_token: &str) -> String {
    use sha2::Digest as _;
    let mut s = String::from("admin:");
    wire::keys::push_hex(&mut s, &sha2::Sha256::digest(poll_token.as_bytes()));
    s
}

/// Starts a person's sign-in to the admin API (`lattice-coordinator login`, or the web
/// console); `device` names the way in, for the audit log.
pub async fn start_admin(
    st: &AppState,
    device: &str,
    source_ip: &str,
    now: i64,
) -> Result<AdminLoginStart, ApiError> {
    let sign_in = st
        .sign_in
        .as_ref()
        .ok_or_else(|| ApiError::NotFound("this mesh has no identity provider".into()))?;
    let mut rng = StdRng::from_rng(&mut rand::rng());
    let login = Login::new(now, &mut rng);
    let poll_token = {
        use base64::Engine as _;
        let b: [u8; 32] = crate::secret::random(&mut rng);
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
    };
    let mut tx = db::begin_write(&st.db).await?;
    db::people::insert_login(
        &mut tx,
        &login,
        &poll_owner(&poll_token),
        device,
        source_ip,
        now,
    )
    .await?
    .map_err(|e| ApiError::Conflict(e.to_string()))?;
    tx.commit().await.map_err(DbError::from)?;
    Ok(AdminLoginStart {
        url: sign_in.login_url(&login.user_code),
        user_code: login.user_code,
        expires_unix: login.expires_at,
        poll_token,
    })
}

/// Where an admin sign-in stands, for its poller.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum AdminPoll {
    /// Not yet.
    Pending,
    /// Done: an admin token for the session (shown this once).
    Done {
        /// The token.
        token: String,
        /// Who signed in.
        user: String,
        /// When the token stops working.
        expires_at: i64,
    },
}

/// Polls an admin sign-in: once the person has signed in, and if they are an admin, hands
/// out an admin token for [`ADMIN_SESSION_S`] that acts as them (audited as them).
pub async fn poll_admin(st: &AppState, poll_token: &str, now: i64) -> Result<AdminPoll, ApiError> {
    let sign_in = st
        .sign_in
        .as_ref()
        .ok_or_else(|| ApiError::NotFound("this mesh has no identity provider".into()))?;
    let login = {
        let mut conn = st.db.acquire().await.map_err(DbError::from)?;
        db::people::by_owner(&mut conn, &poll_owner(poll_token)).await?
    };
    let Some(login) = login else {
        return Err(ApiError::NotFound(
            "no such sign-in (it may have expired)".into(),
        ));
    };
    let signed = match outcome(st, &login.login.state, now).await? {
        Outcome::Pending => return Ok(AdminPoll::Pending),
        Outcome::Done(s) => s,
        Outcome::Failed(why) => {
            forget(st, &login.login.state).await?;
            return Err(ApiError::Forbidden(format!("sign-in refused: {why}")));
        }
        Outcome::Expired => {
            forget(st, &login.login.state).await?;
            return Err(ApiError::NotFound("the sign-in link expired".into()));
        }
    };
    forget(st, &login.login.state).await?;
    let who = format!("user:{}", signed.user.login_name);
    if !sign_in.is_admin(&signed.user) {
        warn!(user = %signed.user.login_name, "a person who is not an admin tried to sign in to the admin API");
        return Err(ApiError::Forbidden(format!(
            "{} is not an admin of this mesh (serve --oidc-admin / --oidc-admin-group)",
            signed.user.login_name
        )));
    }
    let created = super::create_token(
        st,
        super::CreateToken {
            scope: Some(db::keys::TokenScope::Write),
            expiry_secs: Some(ADMIN_SESSION_S),
        },
        &format!("{}{who}", super::SESSION_PREFIX),
    )
    .await?;
    info!(user = %signed.user.login_name, "admin signed in");
    Ok(AdminPoll::Done {
        token: created.token,
        user: signed.user.login_name,
        expires_at: created.expires_at,
    })
}
