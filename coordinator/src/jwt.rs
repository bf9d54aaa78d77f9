//! JSON Web Tokens from issuers outside the mesh: workload identity tokens (Kubernetes
//! service accounts, CI systems, SPIFFE JWT-SVIDs) and OpenID Connect ID tokens.
//!
//! Sans-IO: the caller fetches the issuer's key set and passes the time. [`verify`] checks the
//! signature against the key the token names, then the issuer, the audience, expiry and
//! not-before, and every refusal names the check that failed. Only asymmetric algorithms are
//! accepted (RS*, PS*, ES256/384, EdDSA): `none` and shared-secret HMAC never are, whatever the
//! token's header says, and the key's own type must fit the algorithm.

use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};

/// How much clock difference between us and the issuer is tolerated, in seconds.
pub const LEEWAY_S: i64 = 60;
/// Longest token accepted, in bytes (issuers' tokens are a few KiB).
pub const MAX_TOKEN_LEN: usize = 16 << 10;

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    /// Not three base64url parts with a JSON header and claims.
    #[error("not a JWT: {0}")]
    Malformed(String),
    /// `none`, HMAC, or an algorithm we do not know.
    #[error("signing algorithm {0} is not accepted (only RS*, PS*, ES256, ES384 and EdDSA are)")]
    Algorithm(String),
    /// The issuer's key set has no key with the token's `kid` (or the token names none and
    /// the set has several).
    #[error("the issuer has no key {kid:?} (its key set holds {known:?})")]
    UnknownKey {
        /// The token's key id.
        kid: Option<String>,
        /// The key ids the set holds.
        known: Vec<String>,
    },
    /// The signature does not verify with the named key, or the key does not fit the
    /// algorithm.
    #[error("the signature does not verify with the issuer's key {0:?}")]
    Signature(Option<String>),
    /// `iss` differs from the expected issuer.
    #[error("issuer is {got:?}, expected {want:?}")]
    Issuer {
        /// The token's `iss`.
        got: String,
        /// The trusted issuer.
        want: String,
    },
    /// `aud` does not include the expected audience.
    #[error("audience {got:?} does not include {want:?}")]
    Audience {
        /// The token's `aud` values.
        got: Vec<String>,
        /// The audience we require.
        want: String,
    },
    /// `exp` is past (beyond the leeway).
    #[error("the token expired at {exp} (unix seconds; now {now})")]
    Expired {
        /// The token's `exp`.
        exp: i64,
        /// Our clock.
        now: i64,
    },
    /// `nbf` or `iat` is in the future (beyond the leeway).
    #[error("the token is not valid before {nbf} (unix seconds; now {now})")]
    NotYetValid {
        /// The token's `nbf` (or `iat`).
        nbf: i64,
        /// Our clock.
        now: i64,
    },
    /// A claim every token must carry is absent or of the wrong type.
    #[error("the token has no valid {0:?} claim")]
    Missing(&'static str),
}

/// What a verified token says.
#[derive(Debug, Clone, PartialEq)]
pub struct Verified {
    /// `iss`.
    pub issuer: String,
    /// `sub`.
    pub subject: String,
    /// `exp` (unix seconds).
    pub expires_at: i64,
    /// `iat` (unix seconds), when present.
    pub issued_at: Option<i64>,
    /// Every claim, for rules that match on them.
    pub claims: Map<String, Value>,
    /// SHA-256 of the token (hex): what binds one token to one machine.
    pub token_hash: String,
}

impl Verified {
    /// The claim at a dotted path (`sub`, `kubernetes.io.namespace` is looked up as the
    /// longest key that exists at each level, so keys containing dots work), as text:
    /// strings as they are, numbers and booleans in JSON form; arrays and objects are not
    /// text.
    pub fn claim_text(&self, path: &str) -> Option<String> {
        let v = lookup(&self.claims, path)?;
        match v {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            Value::Bool(b) => Some(b.to_string()),
            _ => None,
        }
    }

    /// The claim at a dotted path, whatever its type.
    pub fn claim(&self, path: &str) -> Option<&Value> {
        lookup(&self.claims, path)
    }
}

fn lookup<'a>(map: &'a Map<String, Value>, path: &str) -> Option<&'a Value> {
    if let Some(v) = map.get(path) {
        return Some(v);
    }
    // The longest prefix that is a key, then the rest inside it.
    let mut cut = path.len();
    while let Some(i) = path[..cut].rfind('.') {
        if let Some(Value::Object(inner)) = map.get(&path[..i])
            && let Some(v) = lookup(inner, &path[i + 1..])
        {
            return Some(v);
        }
        cut = i;
    }
    None
}

/// The token's `iss`, unverified: which issuer's keys to fetch. Nothing else may be trusted
/// before [`verify`].
pub fn unverified_issuer(token: &str) -> Result<String, JwtError> {
    let claims = unverified_claims(token)?;
    match claims.get("iss") {
        Some(Value::String(s)) => Ok(s.clone()),
        _ => Err(JwtError::Missing("iss")),
    }
}

fn unverified_claims(token: &str) -> Result<Map<String, Value>, JwtError> {
    use base64::Engine as _;
    let token = token.trim();
    if token.len() > MAX_TOKEN_LEN {
        return Err(JwtError::Malformed(format!(
            "{} bytes; the limit is {MAX_TOKEN_LEN}",
            token.len()
        )));
    }
    let mut parts = token.split('.');
    let (Some(_), Some(claims), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtError::Malformed(
            "a JWT has three dot-separated parts".into(),
        ));
    };
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(claims)
        .map_err(|e| JwtError::Malformed(format!("claims are not base64url: {e}")))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| JwtError::Malformed(format!("claims are not a JSON object: {e}")))
}

/// What a token must say besides carrying a good signature.
#[derive(Debug, Clone, Copy)]
pub struct Expect<'a> {
    /// The exact `iss`.
    pub issuer: &'a str,
    /// A value `aud` must hold (a string, or one of an array).
    pub audience: &'a str,
}

/// Verifies `token` with `keys` (the issuer's key set) at `now` (unix seconds).
pub fn verify(
    token: &str,
    keys: &JwkSet,
    expect: Expect<'_>,
    now: i64,
) -> Result<Verified, JwtError> {
    let token = token.trim();
    // Shape and size first: nothing below runs on arbitrary bytes.
    unverified_claims(token)?;
    let header = jsonwebtoken::decode_header(token)
        .map_err(|e| JwtError::Malformed(format!("header: {e}")))?;
    let alg = header.alg;
    if !accepted(alg) {
        return Err(JwtError::Algorithm(format!("{alg:?}")));
    }
    let jwk = pick_key(keys, header.kid.as_deref())?;
    let key = DecodingKey::from_jwk(jwk).map_err(|_| JwtError::Signature(header.kid.clone()))?;
    let mut validation = Validation::new(alg);
    // The time and claim checks are ours (with the caller's clock and named refusals).
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.validate_aud = false;
    validation.required_spec_claims.clear();
    let data = jsonwebtoken::decode::<Map<String, Value>>(token, &key, &validation)
        .map_err(|_| JwtError::Signature(header.kid.clone()))?;
    let claims = data.claims;

    let iss = match claims.get("iss") {
        Some(Value::String(s)) => s.clone(),
        _ => return Err(JwtError::Missing("iss")),
    };
    if iss != expect.issuer {
        return Err(JwtError::Issuer {
            got: iss,
            want: expect.issuer.to_owned(),
        });
    }
    let aud: Vec<String> = match claims.get("aud") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| v.as_str().map(str::to_owned))
            .collect::<Option<_>>()
            .ok_or(JwtError::Missing("aud"))?,
        _ => return Err(JwtError::Missing("aud")),
    };
    if !aud.iter().any(|a| a == expect.audience) {
        return Err(JwtError::Audience {
            got: aud,
            want: expect.audience.to_owned(),
        });
    }
    let time = |name: &'static str| -> Result<Option<i64>, JwtError> {
        match claims.get(name) {
            None => Ok(None),
            Some(v) => v
                .as_i64()
                .or_else(|| v.as_f64().map(|f| f as i64))
                .map(Some)
                .ok_or(JwtError::Missing(name)),
        }
    };
    let exp = time("exp")?.ok_or(JwtError::Missing("exp"))?;
    if now > exp.saturating_add(LEEWAY_S) {
        return Err(JwtError::Expired { exp, now });
    }
    let iat = time("iat")?;
    for nbf in [time("nbf")?, iat].into_iter().flatten() {
        if nbf > now.saturating_add(LEEWAY_S) {
            return Err(JwtError::NotYetValid { nbf, now });
        }
    }
    let sub = match claims.get("sub") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        _ => return Err(JwtError::Missing("sub")),
    };
    let mut token_hash = String::new();
    wire::keys::push_hex(
        &mut token_hash,
        &<sha2::Sha256 as sha2::Digest>::digest(token.as_bytes()),
    );
    Ok(Verified {
        issuer: iss,
        subject: sub,
        expires_at: exp,
        issued_at: iat,
        claims,
        token_hash,
    })
}

fn accepted(alg: Algorithm) -> bool {
    matches!(
        alg,
        Algorithm::RS256
            | Algorithm::RS384
            | Algorithm::RS512
            | Algorithm::PS256
            | Algorithm::PS384
            | Algorithm::PS512
            | Algorithm::ES256
            | Algorithm::ES384
            | Algorithm::EdDSA
    )
}

/// The key a token names; a token without `kid` may use a set of exactly one key.
fn pick_key<'a>(keys: &'a JwkSet, kid: Option<&str>) -> Result<&'a Jwk, JwtError> {
    let found = match kid {
        Some(k) => keys
            .keys
            .iter()
            .find(|j| j.common.key_id.as_deref() == Some(k)),
        None if keys.keys.len() == 1 => keys.keys.first(),
        None => None,
    };
    found.ok_or_else(|| JwtError::UnknownKey {
        kid: kid.map(str::to_owned),
        known: keys
            .keys
            .iter()
            .filter_map(|j| j.common.key_id.clone())
            .collect(),
    })
}

/// Whether `kid` is in `keys` (a token naming an unknown key is the signal to fetch the
/// issuer's keys again: they rotate).
pub fn knows_key(keys: &JwkSet, token: &str) -> bool {
    match jsonwebtoken::decode_header(token.trim()) {
        Ok(h) => pick_key(keys, h.kid.as_deref()).is_ok(),
        Err(_) => true,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use aws_lc_rs::rand::SystemRandom;
    use aws_lc_rs::signature::{
        ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, Ed25519KeyPair, KeyPair,
    };
    use base64::Engine as _;
    use jsonwebtoken::{EncodingKey, Header};
    use serde_json::json;

    fn b64(b: &[u8]) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
    }

    /// A test issuer's signing key and its public JWK.
    pub(crate) struct TestKey {
        pub(crate) kid: String,
        alg: Algorithm,
        encoding: EncodingKey,
        pub(crate) jwk: Value,
    }

    impl TestKey {
        pub(crate) fn es256(kid: &str) -> Self {
            let rng = SystemRandom::new();
            let pkcs8 =
                EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
            let pair =
                EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref()).unwrap();
            let public = pair.public_key().as_ref();
            assert_eq!(public.len(), 65, "uncompressed point");
            Self {
                kid: kid.into(),
                alg: Algorithm::ES256,
                encoding: EncodingKey::from_ec_der(pkcs8.as_ref()),
                jwk: json!({"kty": "EC", "crv": "P-256", "kid": kid, "alg": "ES256", "use": "sig",
                    "x": b64(&public[1..33]), "y": b64(&public[33..])}),
            }
        }

        pub(crate) fn ed25519(kid: &str) -> Self {
            let rng = SystemRandom::new();
            let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
            let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
            Self {
                kid: kid.into(),
                alg: Algorithm::EdDSA,
                encoding: EncodingKey::from_ed_der(pkcs8.as_ref()),
                jwk: json!({"kty": "OKP", "crv": "Ed25519", "kid": kid,
                    "x": b64(pair.public_key().as_ref())}),
            }
        }

        pub(crate) fn sign(&self, claims: &Value) -> String {
            let mut h = Header::new(self.alg);
            h.kid = Some(self.kid.clone());
            jsonwebtoken::encode(&h, claims, &self.encoding).unwrap()
        }
    }

    pub(crate) fn set(keys: &[&TestKey]) -> JwkSet {
        serde_json::from_value(
            json!({"keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>()}),
        )
        .unwrap()
    }

    const ISS: &str = "https://issuer.test";
    const NOW: i64 = 1_800_000_000;

    fn claims() -> Value {
        json!({"iss": ISS, "aud": ["lattice", "other"], "sub": "repo:org/app:ref:refs/heads/main",
            "iat": NOW - 10, "nbf": NOW - 10, "exp": NOW + 600,
            "repository": "org/app", "kubernetes.io": {"namespace": "ci", "pod": {"name": "p-1"}}})
    }

    fn expect() -> Expect<'static> {
        Expect {
            issuer: ISS,
            audience: "lattice",
        }
    }

    #[test]
    fn a_good_token_verifies_with_either_key_type_and_exposes_its_claims() {
        for key in [TestKey::es256("k1"), TestKey::ed25519("k1")] {
            let other = TestKey::es256("k0");
            let t = key.sign(&claims());
            let v = verify(&t, &set(&[&other, &key]), expect(), NOW).unwrap();
            assert_eq!(v.subject, "repo:org/app:ref:refs/heads/main");
            assert_eq!(v.expires_at, NOW + 600);
            assert_eq!(v.claim_text("repository").as_deref(), Some("org/app"));
            assert_eq!(
                v.claim_text("kubernetes.io.namespace").as_deref(),
                Some("ci")
            );
            assert_eq!(
                v.claim_text("kubernetes.io.pod.name").as_deref(),
                Some("p-1")
            );
            assert_eq!(v.claim_text("kubernetes.io"), None, "objects are not text");
            assert_eq!(unverified_issuer(&t).unwrap(), ISS);
        }
    }

    #[test]
    fn every_refusal_names_the_check_that_failed() {
        let key = TestKey::es256("k1");
        let keys = set(&[&key]);
        let with = |f: &dyn Fn(&mut Value)| {
            let mut c = claims();
            f(&mut c);
            key.sign(&c)
        };
        // A forged signature: the same claims signed by another key with the same kid.
        let forger = TestKey::es256("k1");
        assert_eq!(
            verify(&forger.sign(&claims()), &keys, expect(), NOW),
            Err(JwtError::Signature(Some("k1".into())))
        );
        // A tampered payload.
        let good = key.sign(&claims());
        let mut parts: Vec<String> = good.split('.').map(str::to_owned).collect();
        let mut c = claims();
        c["sub"] = json!("repo:evil/app:ref:refs/heads/main");
        parts[1] = b64(&serde_json::to_vec(&c).unwrap());
        assert!(matches!(
            verify(&parts.join("."), &keys, expect(), NOW),
            Err(JwtError::Signature(_))
        ));
        // An unknown kid.
        let stranger = TestKey::es256("k9");
        assert_eq!(
            verify(&stranger.sign(&claims()), &keys, expect(), NOW),
            Err(JwtError::UnknownKey {
                kid: Some("k9".into()),
                known: vec!["k1".into()]
            })
        );
        assert!(!knows_key(&keys, &stranger.sign(&claims())));
        assert!(knows_key(&keys, &good));
        // Wrong issuer, wrong audience.
        assert!(matches!(
            verify(
                &with(&|c| c["iss"] = json!("https://evil.test")),
                &keys,
                expect(),
                NOW
            ),
            Err(JwtError::Issuer { .. })
        ));
        assert!(matches!(
            verify(
                &with(&|c| c["aud"] = json!("someone-else")),
                &keys,
                expect(),
                NOW
            ),
            Err(JwtError::Audience { .. })
        ));
        // Expired (past the leeway), not yet valid, issued in the future.
        assert_eq!(
            verify(&good, &keys, expect(), NOW + 600 + LEEWAY_S + 1),
            Err(JwtError::Expired {
                exp: NOW + 600,
                now: NOW + 600 + LEEWAY_S + 1
            })
        );
        assert!(verify(&good, &keys, expect(), NOW + 600 + LEEWAY_S).is_ok());
        assert!(matches!(
            verify(
                &with(&|c| c["nbf"] = json!(NOW + 3600)),
                &keys,
                expect(),
                NOW
            ),
            Err(JwtError::NotYetValid { .. })
        ));
        assert!(matches!(
            verify(
                &with(&|c| c["iat"] = json!(NOW + 3600)),
                &keys,
                expect(),
                NOW
            ),
            Err(JwtError::NotYetValid { .. })
        ));
        // Claims every token needs.
        for name in ["exp", "sub", "aud", "iss"] {
            let t = with(&|c| {
                c.as_object_mut().unwrap().remove(name);
            });
            assert_eq!(
                verify(&t, &keys, expect(), NOW),
                Err(JwtError::Missing(name)),
                "{name}"
            );
        }
    }

    #[test]
    fn none_and_shared_secret_algorithms_are_refused_whatever_the_keys() {
        let key = TestKey::es256("k1");
        let keys = set(&[&key]);
        let payload = b64(&serde_json::to_vec(&claims()).unwrap());
        let none = format!(
            "{}.{payload}.",
            b64(br#"{"alg":"none","typ":"JWT","kid":"k1"}"#)
        );
        assert!(verify(&none, &keys, expect(), NOW).is_err());
        // HS256 keyed with the public key's bytes (the classic confusion attack).
        let mut h = Header::new(Algorithm::HS256);
        h.kid = Some("k1".into());
        let x = key.jwk["x"].as_str().unwrap().to_owned();
        let hs =
            jsonwebtoken::encode(&h, &claims(), &EncodingKey::from_secret(x.as_bytes())).unwrap();
        assert_eq!(
            verify(&hs, &keys, expect(), NOW),
            Err(JwtError::Algorithm("HS256".into()))
        );
        // An EdDSA header over an EC key.
        let ed = TestKey::ed25519("k1");
        assert!(matches!(
            verify(&ed.sign(&claims()), &keys, expect(), NOW),
            Err(JwtError::Signature(_))
        ));
    }

    #[test]
    fn malformed_tokens_are_refused_without_panicking() {
        let keys = set(&[&TestKey::es256("k1")]);
        for t in [
            "",
            "a.b",
            "a.b.c.d",
            "!!!.###.$$$",
            "eyJhbGciOiJFUzI1NiJ9.bm90IGpzb24.c2ln",
            &"a".repeat(MAX_TOKEN_LEN + 1),
        ] {
            assert!(
                matches!(verify(t, &keys, expect(), NOW), Err(JwtError::Malformed(_))),
                "{t:.40}"
            );
        }
    }
}
