//! A token issuer for federation tests: an ES256 key the test holds, its JWK set in a file,
//! and tokens signed with it. `lattice-testtool issuer` serves the set (with OpenID
//! discovery) from inside a lab namespace.

use std::path::Path;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

/// One signing key.
pub struct IssuerKey {
    kid: String,
    enc: EncodingKey,
    /// Its public JWK.
    pub jwk: Value,
}

impl IssuerKey {
    /// A fresh P-256 key named `kid`.
    pub fn new(kid: &str) -> anyhow::Result<Self> {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .map_err(|_| anyhow::anyhow!("generating a P-256 key"))?;
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref())
            .map_err(|_| anyhow::anyhow!("loading the P-256 key"))?;
        let p = pair.public_key().as_ref();
        let b = |x: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(x);
        Ok(Self {
            kid: kid.into(),
            enc: EncodingKey::from_ec_der(pkcs8.as_ref()),
            jwk: json!({"kty": "EC", "crv": "P-256", "kid": kid, "alg": "ES256",
                "x": b(&p[1..33]), "y": b(&p[33..])}),
        })
    }

    /// A token with `claims`.
    pub fn sign(&self, claims: &Value) -> anyhow::Result<String> {
        let mut h = Header::new(Algorithm::ES256);
        h.kid = Some(self.kid.clone());
        Ok(jsonwebtoken::encode(&h, claims, &self.enc)?)
    }
}

/// Writes the JWK set of `keys` to `path` (what the issuer serves).
pub fn publish(path: &Path, keys: &[&IssuerKey]) -> anyhow::Result<()> {
    let set = json!({"keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>()});
    std::fs::write(path, serde_json::to_vec(&set)?)?;
    Ok(())
}
