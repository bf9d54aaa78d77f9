//! Signing people in through an OpenID Connect provider (the coordinator as relying party),
//! sans-IO: the pending logins of a device flow run in front of the provider's authorization
//! code flow, and what an ID token says about the person.
//!
//! `lattice up` without an auth key starts a login ([`Logins::start`]) and shows the user a
//! URL with a short code; the browser is sent to the provider with a fresh `state`, `nonce`
//! and PKCE challenge ([`authorize_url`]); the provider's callback must bring back a `state`
//! that is pending and unused ([`Logins::callback`], one use only, so a replayed callback is
//! refused); the ID token from the code exchange is verified with [`crate::jwt::verify`]
//! (issuer, audience = client id, signature, expiry) and then [`identity`] checks the nonce,
//! the authorized party, the allowed e-mail domains, and reads the groups and whether the
//! login used a second factor. Time and randomness are passed in.

use std::collections::HashMap;

use base64::Engine as _;
use rand::Rng;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::jwt::Verified;

/// How long a login may stay pending (the user opens the URL and signs in).
pub const LOGIN_TTL_S: i64 = 600;
/// Most logins pending at once (each costs a little memory until it expires).
pub const MAX_PENDING: usize = 4096;

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
    /// What the device polls with (secret to the device).
    pub device_code: String,
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

/// The pending logins of one coordinator.
#[derive(Debug, Default)]
pub struct Logins {
    by_state: HashMap<String, Login>,
}

impl Logins {
    /// Starts a login at `now`.
    pub fn start(&mut self, now: i64, rng: &mut impl Rng) -> Result<Login, LoginError> {
        self.by_state.retain(|_, l| l.expires_at > now);
        if self.by_state.len() >= MAX_PENDING {
            return Err(LoginError::Busy);
        }
        let login = Login {
            device_code: token(rng, 32),
            user_code: user_code(rng),
            state: token(rng, 24),
            nonce: token(rng, 24),
            pkce_verifier: token(rng, 48),
            expires_at: now + LOGIN_TTL_S,
        };
        self.by_state.insert(login.state.clone(), login.clone());
        Ok(login)
    }

    /// The pending login whose user code is `code` (what the user opens), if any.
    pub fn by_user_code(&self, code: &str, now: i64) -> Option<&Login> {
        let code = code.trim().to_ascii_uppercase();
        self.by_state
            .values()
            .find(|l| l.user_code == code && l.expires_at > now)
    }

    /// The provider's callback brought `state`: the login it belongs to, removed (a state
    /// is good for one callback).
    pub fn callback(&mut self, state: &str, now: i64) -> Result<Login, LoginError> {
        let login = self
            .by_state
            .remove(state)
            .ok_or(LoginError::UnknownState)?;
        if login.expires_at <= now {
            return Err(LoginError::Expired);
        }
        Ok(login)
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
    fn a_callback_state_is_good_once_and_only_while_the_login_lasts() {
        let mut rng = StdRng::seed_from_u64(1);
        let mut logins = Logins::default();
        let a = logins.start(1000, &mut rng).unwrap();
        let b = logins.start(1000, &mut rng).unwrap();
        assert_ne!(a.state, b.state);
        assert_ne!(a.device_code, b.device_code);
        assert_eq!(a.user_code.len(), 9);
        assert_eq!(
            logins.by_user_code(&a.user_code.to_lowercase(), 1001),
            Some(&a)
        );
        assert_eq!(logins.callback(&a.state, 1001).unwrap(), a);
        // Replayed: refused.
        assert_eq!(
            logins.callback(&a.state, 1001),
            Err(LoginError::UnknownState)
        );
        assert_eq!(
            logins.callback("forged", 1001),
            Err(LoginError::UnknownState)
        );
        // Too late.
        assert_eq!(
            logins.callback(&b.state, 1000 + LOGIN_TTL_S),
            Err(LoginError::Expired)
        );
        assert_eq!(logins.by_user_code(&b.user_code, 1000 + LOGIN_TTL_S), None);
    }

    #[test]
    fn pending_logins_are_bounded() {
        let mut rng = StdRng::seed_from_u64(2);
        let mut logins = Logins::default();
        for _ in 0..MAX_PENDING {
            logins.start(0, &mut rng).unwrap();
        }
        assert_eq!(logins.start(0, &mut rng), Err(LoginError::Busy));
        // Expired ones make room.
        assert!(logins.start(LOGIN_TTL_S, &mut rng).is_ok());
    }

    #[test]
    fn the_authorize_url_carries_state_nonce_and_an_s256_challenge() {
        let mut rng = StdRng::seed_from_u64(3);
        let login = Logins::default().start(0, &mut rng).unwrap();
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
        let login = Logins::default().start(0, &mut rng).unwrap();
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
