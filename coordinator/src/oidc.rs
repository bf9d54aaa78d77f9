//! Signing people in through an OpenID Connect provider (the coordinator as relying party),
//! sans-IO: the pending logins of a device flow run in front of the provider's authorization
//! code flow, and what an ID token says about the person.
//!
//! `lattice up` without an auth key starts a login ([`Login::new`], kept in the database by
//! `db::people`) and shows the user a URL with a short code; the browser is sent to the
//! provider with a fresh `state`, `nonce` and PKCE challenge ([`authorize_url`]); the
//! provider's callback must bring back a `state` that is pending and unused (one use only,
//! so a replayed callback is refused: `db::people::claim_login`); the ID token from the code exchange is verified with [`crate::jwt::verify`]
//! (issuer, audience = client id, signature, expiry) and then [`identity`] checks the nonce,
//! the authorized party, the allowed e-mail domains, and reads the groups and whether the
//! login used a second factor. Time and randomness are passed in.

use std::collections::HashMap;
use std::net::IpAddr;

use base64::Engine as _;
use rand::Rng;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::jwt::Verified;

/// How long a login may stay pending (the user opens the URL and signs in).
pub const LOGIN_TTL_S: i64 = 600;
/// Most logins pending at once, and from one address (each is a database row until it
/// expires; the per-address bound keeps one source from starving everyone else).
pub const MAX_PENDING: u64 = 4096;
/// See [`MAX_PENDING`].
pub const MAX_PENDING_PER_IP: u64 = 16;

/// How the coordinator is registered with the provider.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OidcConfig {
    /// The provider's issuer URL (its `iss`).
    pub issuer: String,
    /// Our client id (the ID token's audience).
    pub client_id: String,
    /// Where the groups are in the ID token (dotted path; default `groups`).
    pub groups_claim: String,
    /// E-mail domains allowed to sign in (empty: any).
    pub allowed_domains: Vec<String>,
    /// `acr` values that mean a second factor was used (providers name them differently);
    /// besides these, an `amr` listing a second factor counts.
    pub mfa_acr_values: Vec<String>,
}

/// One pending login.
#[derive(Clone, PartialEq, Eq)]
pub struct Login {
    /// What the user types or sees in the URL (short, unambiguous).
    pub user_code: String,
    /// Sent to the provider and checked on the callback.
    pub state: String,
    /// Sent to the provider and checked in the ID token.
    pub nonce: String,
    /// PKCE verifier, sent with the code exchange.
    pub pkce_verifier: String,
    /// Unix seconds after which the login is void.
    pub expires_at: i64,
}

impl std::fmt::Debug for Login {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Login")
            .field("user_code", &self.user_code)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

/// Why a login step was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoginError {
    /// Too many logins pending.
    #[error("too many logins are pending; try again in a few minutes")]
    Busy,
    /// The callback's `state` is not one we issued, or was used already.
    #[error("unknown or already used login state (a replayed or forged callback)")]
    UnknownState,
    /// The login expired before the user finished.
    #[error("the login expired; start it again")]
    Expired,
    /// The ID token's nonce is not this login's.
    #[error("the ID token's nonce does not match this login")]
    Nonce,
    /// The ID token names several audiences and we are not its authorized party.
    #[error("the ID token was issued to {0:?}, not to this coordinator")]
    AuthorizedParty(String),
    /// The e-mail is missing, unverified or of a domain not allowed.
    #[error("{0}")]
    Domain(String),
}

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

fn token(rng: &mut impl Rng, bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    rng.fill_bytes(&mut b);
    b64(&b)
}

/// A user code: 8 letters from an alphabet without look-alikes, shown as `ABCD-EFGH`.
fn user_code(rng: &mut impl Rng) -> String {
    const ALPHABET: &[u8] = b"BCDFGHJKLMNPQRSTVWXZ";
    let mut s = String::with_capacity(9);
    for i in 0..8 {
        if i == 4 {
            s.push('-');
        }
        let mut b = [0u8; 1];
        // Rejection sampling keeps every letter equally likely.
        loop {
            rng.fill_bytes(&mut b);
            if usize::from(b[0]) < 256 - 256 % ALPHABET.len() {
                break;
            }
        }
        s.push(char::from(ALPHABET[usize::from(b[0]) % ALPHABET.len()]));
    }
    s
}

/// The PKCE S256 challenge of `verifier` (RFC 7636).
pub fn pkce_challenge(verifier: &str) -> String {
    b64(&Sha256::digest(verifier.as_bytes()))
}

impl Login {
    /// A new login at `now`: fresh secrets, valid for [`LOGIN_TTL_S`]. (The database keeps
    /// pending logins, so that the provider's callback may reach any replica; it gives each
    /// `state` to one callback only.)
    pub fn new(now: i64, rng: &mut impl Rng) -> Self {
        Self {
            user_code: user_code(rng),
            state: token(rng, 24),
            nonce: token(rng, 24),
            pkce_verifier: token(rng, 48),
            expires_at: now + LOGIN_TTL_S,
        }
    }
}

/// A user code as typed (any case, spaces around): as stored.
pub fn normalize_user_code(code: &str) -> String {
    code.trim().to_ascii_uppercase()
}

/// Wrong user codes one address may try per [`GUESS_WINDOW_S`], and all addresses together
/// per minute: a user code has 20^8 values, so guessing one of the few pending codes takes
/// months at these rates (RFC 8628, 5.1).
pub const GUESSES_PER_IP: u32 = 10;
/// See [`GUESSES_PER_IP`].
pub const GUESS_WINDOW_S: i64 = 600;
/// See [`GUESSES_PER_IP`].
pub const GUESSES_PER_MINUTE: u32 = 600;
/// Addresses tracked at once (the oldest are forgotten first).
const MAX_GUESSERS: usize = 65_536;

/// Counts wrong user codes on the sign-in page, per address and in all (sans-IO: the caller
/// passes the time).
#[derive(Debug, Default)]
pub struct Guesses {
    per_ip: HashMap<IpAddr, (u32, i64)>,
    global: (u32, i64),
}

impl Guesses {
    /// Whether `ip` may look a code up at `now`.
    pub fn allowed(&mut self, ip: IpAddr, now: i64) -> bool {
        if now - self.global.1 >= 60 {
            self.global = (0, now);
        }
        let mine = match self.per_ip.get(&ip) {
            Some(&(n, since)) if now - since < GUESS_WINDOW_S => n,
            _ => 0,
        };
        mine < GUESSES_PER_IP && self.global.0 < GUESSES_PER_MINUTE
    }

    /// `ip` tried a code that is not pending at `now`.
    pub fn failed(&mut self, ip: IpAddr, now: i64) {
        if self.per_ip.len() >= MAX_GUESSERS && !self.per_ip.contains_key(&ip) {
            self.per_ip
                .retain(|_, (_, since)| now - *since < GUESS_WINDOW_S);
            if self.per_ip.len() >= MAX_GUESSERS
                && let Some(oldest) = self.per_ip.iter().min_by_key(|(_, v)| v.1).map(|(k, _)| *k)
            {
                self.per_ip.remove(&oldest);
            }
        }
        let e = self.per_ip.entry(ip).or_insert((0, now));
        if now - e.1 >= GUESS_WINDOW_S {
            *e = (0, now);
        }
        e.0 += 1;
        if now - self.global.1 >= 60 {
            self.global = (0, now);
        }
        self.global.0 += 1;
    }
}

/// Percent-encodes everything but RFC 3986's unreserved characters (query strings and
/// `application/x-www-form-urlencoded` bodies).
pub fn form_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The URL the user's browser is sent to: the authorization code flow with PKCE (S256),
/// `state` and `nonce`.
pub fn authorize_url(
    cfg: &OidcConfig,
    authorization_endpoint: &str,
    redirect_uri: &str,
    login: &Login,
) -> String {
    let q = form_encode;
    let sep = if authorization_endpoint.contains('?') {
        '&'
    } else {
        '?'
    };
    format!(
        "{authorization_endpoint}{sep}response_type=code&client_id={}&redirect_uri={}\
         &scope={}&state={}&nonce={}&code_challenge={}&code_challenge_method=S256",
        q(&cfg.client_id),
        q(redirect_uri),
        q("openid email profile"),
        q(&login.state),
        q(&login.nonce),
        q(&pkce_challenge(&login.pkce_verifier)),
    )
}

/// A person, as the provider vouches for them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// `iss` and `sub`: the identity (stable; e-mail addresses change).
    pub issuer: String,
    /// `sub`.
    pub subject: String,
    /// E-mail, for display and as the policy's user name.
    pub email: Option<String>,
    /// Display name.
    pub name: Option<String>,
    /// The provider's groups.
    pub groups: Vec<String>,
    /// Whether the login used a second factor (`amr` or `acr`).
    pub mfa: bool,
}

impl Identity {
    /// How policies and nodes name this person: the e-mail, or `SUBJECT@ISSUER-HOST` for
    /// an account without one.
    pub fn login_name(&self) -> String {
        self.email.clone().unwrap_or_else(|| {
            let host = self
                .issuer
                .split("://")
                .nth(1)
                .unwrap_or(&self.issuer)
                .split(['/', ':'])
                .next()
                .unwrap_or_default();
            format!("{}@{host}", self.subject)
        })
    }
}

/// Methods (RFC 8176 `amr` values) that count as a second factor.
const MFA_AMR: &[&str] = &["mfa", "otp", "hwk", "sc", "swk", "fido", "sms", "tel"];

/// What a verified ID token says about the person who signed in for `login`.
pub fn identity(cfg: &OidcConfig, token: &Verified, login: &Login) -> Result<Identity, LoginError> {
    if token.claim_text("nonce").as_deref() != Some(login.nonce.as_str()) {
        return Err(LoginError::Nonce);
    }
    // With several audiences, `azp` must be us (OpenID Connect Core 3.1.3.7).
    if let Some(Value::Array(aud)) = token.claim("aud")
        && aud.len() > 1
        && token.claim_text("azp").as_deref() != Some(cfg.client_id.as_str())
    {
        return Err(LoginError::AuthorizedParty(
            token.claim_text("azp").unwrap_or_default(),
        ));
    }
    let email = token.claim_text("email").map(|e| e.to_ascii_lowercase());
    if !cfg.allowed_domains.is_empty() {
        let verified = token.claim("email_verified") != Some(&Value::Bool(false));
        let domain = email
            .as_deref()
            .and_then(|e| e.rsplit_once('@'))
            .map(|(_, d)| d);
        let ok = verified
            && domain.is_some_and(|d| {
                cfg.allowed_domains
                    .iter()
                    .any(|a| a.eq_ignore_ascii_case(d))
            });
        if !ok {
            return Err(LoginError::Domain(format!(
                "{} may not sign in here (allowed: {})",
                email
                    .as_deref()
                    .unwrap_or("an account without a verified e-mail"),
                cfg.allowed_domains.join(", ")
            )));
        }
    }
    let groups = match token.claim(&cfg.groups_claim) {
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|g| g.as_str().map(str::to_owned))
            .collect(),
        Some(Value::String(s)) => vec![s.clone()],
        _ => Vec::new(),
    };
    let amr_mfa = match token.claim("amr") {
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_str)
            .any(|m| MFA_AMR.contains(&m)),
        _ => false,
    };
    let acr_mfa = token
        .claim_text("acr")
        .is_some_and(|a| cfg.mfa_acr_values.contains(&a));
    Ok(Identity {
        issuer: token.issuer.clone(),
        subject: token.subject.clone(),
        email,
        name: token.claim_text("name"),
        groups,
        mfa: amr_mfa || acr_mfa,
    })
}

/// Exchanges the provider's authorization `code` for an ID token (with the login's PKCE
/// verifier and client-secret basic authentication), verifies it (signature by the
/// provider's keys, issuer, audience = our client id, expiry) and returns who signed in.
pub async fn exchange_code(
    keys: &crate::jwks::KeyCache,
    cfg: &OidcConfig,
    client_secret: &str,
    redirect_uri: &str,
    code: &str,
    login: &Login,
    now: i64,
) -> anyhow::Result<Identity> {
    use anyhow::Context as _;
    #[derive(serde::Deserialize)]
    struct Tokens {
        id_token: String,
    }
    let provider = keys.provider(&cfg.issuer).await?;
    let endpoint = provider
        .token_endpoint
        .as_deref()
        .context("the provider's discovery document names no token_endpoint")?;
    let body = keys
        .post_form(
            endpoint,
            (&cfg.client_id, client_secret),
            &[
                ("grant_type", "authorization_code"),
                ("code", code),
                ("redirect_uri", redirect_uri),
                ("code_verifier", &login.pkce_verifier),
                ("client_id", &cfg.client_id),
            ],
        )
        .await
        .context("exchanging the authorization code")?;
    let tokens: Tokens =
        serde_json::from_slice(&body).context("the token endpoint's answer has no id_token")?;
    let set = keys.keys_for(&cfg.issuer, &tokens.id_token).await?;
    let verified = crate::jwt::verify(
        &tokens.id_token,
        &set,
        crate::jwt::Expect {
            issuer: &cfg.issuer,
            audience: &cfg.client_id,
        },
        now,
    )?;
    Ok(identity(cfg, &verified, login)?)
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand::rngs::StdRng;
    use serde_json::json;

    use super::*;

    fn cfg() -> OidcConfig {
        OidcConfig {
            issuer: "https://idp.example.com".into(),
            client_id: "lattice".into(),
            groups_claim: "groups".into(),
            allowed_domains: vec!["example.com".into()],
            mfa_acr_values: vec!["urn:example:mfa".into()],
        }
    }

    fn verified(claims: Value) -> Verified {
        let Value::Object(claims) = claims else {
            panic!()
        };
        Verified {
            issuer: "https://idp.example.com".into(),
            subject: "u-1".into(),
            expires_at: 2_000_000_000,
            issued_at: None,
            claims,
            token_hash: String::new(),
        }
    }

    #[test]
    fn logins_get_fresh_secrets_and_a_short_unambiguous_code() {
        let mut rng = StdRng::seed_from_u64(1);
        let a = Login::new(1000, &mut rng);
        let b = Login::new(1000, &mut rng);
        assert_ne!(a.state, b.state);
        assert_ne!(a.nonce, b.nonce);
        assert_ne!(a.pkce_verifier, b.pkce_verifier);
        assert_eq!(a.expires_at, 1000 + LOGIN_TTL_S);
        assert_eq!(a.user_code.len(), 9);
        assert_eq!(&a.user_code[4..5], "-");
        assert!(
            a.user_code
                .chars()
                .all(|c| c == '-' || "BCDFGHJKLMNPQRSTVWXZ".contains(c)),
            "{}",
            a.user_code
        );
        assert_eq!(
            normalize_user_code(&format!(" {} ", a.user_code.to_lowercase())),
            a.user_code
        );
        // The verifier is 64 characters of base64url (RFC 7636 allows 43 to 128).
        assert_eq!(a.pkce_verifier.len(), 64);
        let dbg = format!("{a:?}");
        assert!(
            !dbg.contains(&a.state) && !dbg.contains(&a.pkce_verifier) && !dbg.contains(&a.nonce)
        );
    }

    #[test]
    fn wrong_codes_are_limited_per_address_and_in_all() {
        let mut g = Guesses::default();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        for _ in 0..GUESSES_PER_IP {
            assert!(g.allowed(a, 100));
            g.failed(a, 100);
        }
        assert!(!g.allowed(a, 100), "a's budget is spent");
        assert!(g.allowed(b, 100), "b is not a");
        assert!(
            g.allowed(a, 100 + GUESS_WINDOW_S),
            "a window later a may try again"
        );
        // Many addresses together hit the global budget.
        let mut g = Guesses::default();
        for i in 0..GUESSES_PER_MINUTE {
            let ip = IpAddr::from([10, 0, (i / 256) as u8, (i % 256) as u8]);
            g.failed(ip, 1000);
        }
        assert!(!g.allowed(b, 1030));
        assert!(g.allowed(b, 1060));
    }

    #[test]
    fn an_account_without_email_is_named_by_subject_and_issuer_host() {
        let id = Identity {
            issuer: "https://login.example.com:8443/realms/x".into(),
            subject: "u-7".into(),
            email: None,
            name: None,
            groups: vec![],
            mfa: false,
        };
        assert_eq!(id.login_name(), "u-7@login.example.com");
        let with = Identity {
            email: Some("bob@example.com".into()),
            ..id
        };
        assert_eq!(with.login_name(), "bob@example.com");
    }

    #[test]
    fn the_authorize_url_carries_state_nonce_and_an_s256_challenge() {
        let mut rng = StdRng::seed_from_u64(3);
        let login = Login::new(0, &mut rng);
        let url = authorize_url(
            &cfg(),
            "https://idp.example.com/authorize",
            "https://coord.example.com/oidc/callback",
            &login,
        );
        assert!(
            url.starts_with(
                "https://idp.example.com/authorize?response_type=code&client_id=lattice"
            )
        );
        assert!(url.contains("&redirect_uri=https%3A%2F%2Fcoord.example.com%2Foidc%2Fcallback"));
        assert!(url.contains("&scope=openid%20email%20profile"));
        assert!(url.contains(&format!("&state={}", login.state)));
        assert!(url.contains(&format!("&nonce={}", login.nonce)));
        assert!(url.contains(&format!(
            "&code_challenge={}&code_challenge_method=S256",
            pkce_challenge(&login.pkce_verifier)
        )));
        assert!(
            !url.contains(&login.pkce_verifier),
            "the verifier stays with us"
        );
        // RFC 7636 appendix B.
        assert_eq!(
            pkce_challenge("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"),
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        );
    }

    #[test]
    fn an_id_token_gives_the_person_groups_and_second_factor_after_the_checks() {
        let mut rng = StdRng::seed_from_u64(4);
        let login = Login::new(0, &mut rng);
        let base = json!({"sub": "u-1", "aud": "lattice", "nonce": login.nonce,
            "email": "Alice@Example.com", "email_verified": true, "name": "Alice",
            "groups": ["sre", "eng"], "amr": ["pwd", "otp"]});
        let id = identity(&cfg(), &verified(base.clone()), &login).unwrap();
        assert_eq!(id.email.as_deref(), Some("alice@example.com"));
        assert_eq!(id.groups, ["sre", "eng"]);
        assert!(id.mfa);
        assert_eq!(id.name.as_deref(), Some("Alice"));

        let with = |f: &dyn Fn(&mut Value)| {
            let mut c = base.clone();
            f(&mut c);
            identity(&cfg(), &verified(c), &login)
        };
        assert_eq!(
            with(&|c| c["nonce"] = json!("other")),
            Err(LoginError::Nonce)
        );
        assert_eq!(
            with(&|c| {
                c.as_object_mut().unwrap().remove("nonce");
            }),
            Err(LoginError::Nonce)
        );
        assert!(matches!(
            with(&|c| c["email"] = json!("mallory@evil.com")),
            Err(LoginError::Domain(_))
        ));
        assert!(matches!(
            with(&|c| c["email_verified"] = json!(false)),
            Err(LoginError::Domain(_))
        ));
        assert!(matches!(
            with(&|c| c["aud"] = json!(["lattice", "other"])),
            Err(LoginError::AuthorizedParty(_))
        ));
        assert!(
            with(&|c| {
                c["aud"] = json!(["lattice", "other"]);
                c["azp"] = json!("lattice");
            })
            .is_ok()
        );
        // A password alone is one factor; an acr the admin named as MFA is two; others not.
        assert!(!with(&|c| c["amr"] = json!(["pwd"])).unwrap().mfa);
        assert!(
            !with(&|c| {
                c["amr"] = json!(["pwd"]);
                c["acr"] = json!("urn:example:password");
            })
            .unwrap()
            .mfa
        );
        assert!(
            with(&|c| {
                c["amr"] = json!(["pwd"]);
                c["acr"] = json!("urn:example:mfa");
            })
            .unwrap()
            .mfa
        );
        // Groups under a nested claim (Keycloak's realm roles, say).
        let nested = OidcConfig {
            groups_claim: "realm_access.roles".into(),
            ..cfg()
        };
        let mut c = base.clone();
        c["realm_access"] = json!({"roles": ["admin"]});
        assert_eq!(
            identity(&nested, &verified(c), &login).unwrap().groups,
            ["admin"]
        );
    }
}
