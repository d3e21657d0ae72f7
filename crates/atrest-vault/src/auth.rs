//! Access tokens: ES256-signed JWTs shaped like Azure AD v2 tokens
//! (`aud`, `iss`, `tid`, `oid`, `appid`), issued by the client-credentials
//! endpoint and checked on every data-plane request. Tokens name an
//! identity; the identity is looked up on every request, so deleting it
//! revokes its tokens at once.

use aws_lc_rs::constant_time;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    EcdsaKeyPair, KeyPair, UnparsedPublicKey, ECDSA_P256_SHA256_FIXED,
    ECDSA_P256_SHA256_FIXED_SIGNING,
};
use serde_json::{json, Value};

use crate::b64;
use crate::seal::random_bytes;

pub const AUDIENCE: &str = "https://vault.azure.net";

pub struct TokenSigner {
    key: EcdsaKeyPair,
    kid: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    pub tenant: String,
    pub client_id: String,
    pub exp: i64,
    pub nbf: i64,
}

/// Tokens whose signature, audience and tenant were already checked, by
/// SHA-256 of the token. Saves an ECDSA verification per request; expiry
/// and not-before are still checked against the clock on every use, and
/// the identity is still looked up (so revocation stays immediate).
#[derive(Default)]
pub struct VerifiedTokens {
    map: std::sync::Mutex<std::collections::HashMap<[u8; 32], Claims>>,
}

const CACHE_MAX: usize = 10_000;

impl VerifiedTokens {
    pub fn verify(
        &self,
        signer: &TokenSigner,
        token: &str,
        tenant: &str,
        now: i64,
    ) -> Result<Claims, TokenError> {
        let mut h = [0u8; 32];
        h.copy_from_slice(
            aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes()).as_ref(),
        );
        let cached = self.map.lock().expect("lock").get(&h).cloned();
        let claims = match cached {
            Some(c) => c,
            None => {
                let c = signer.verify(token, tenant, now)?;
                let mut m = self.map.lock().expect("lock");
                if m.len() >= CACHE_MAX {
                    m.retain(|_, c| c.exp > now);
                    if m.len() >= CACHE_MAX {
                        m.clear();
                    }
                }
                m.insert(h, c.clone());
                return Ok(c);
            }
        };
        if now >= claims.exp {
            return Err(TokenError::Expired);
        }
        if now < claims.nbf {
            return Err(TokenError::NotYetValid);
        }
        Ok(claims)
    }
}

/// Why a token was refused (the 401 message).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the token is malformed")]
    Malformed,
    #[error("the token's signature is invalid")]
    BadSignature,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not yet valid")]
    NotYetValid,
    #[error("the token's audience is not {AUDIENCE}")]
    WrongAudience,
    #[error("the token was issued for another tenant ({0})")]
    WrongTenant(String),
    #[error("the token's algorithm '{0}' is not accepted; tokens are ES256")]
    WrongAlgorithm(String),
}

impl TokenSigner {
    pub fn from_pkcs8(pkcs8: &[u8]) -> Option<Self> {
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8).ok()?;
        let kid = hex::encode(
            &aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, key.public_key().as_ref())
                .as_ref()[..8],
        );
        Some(TokenSigner { key, kid })
    }

    pub fn generate_pkcs8() -> Vec<u8> {
        EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &SystemRandom::new())
            .expect("ecdsa keygen")
            .as_ref()
            .to_vec()
    }

    /// The JWKS document published at the discovery keys endpoint.
    pub fn jwks(&self) -> Value {
        let pk = self.key.public_key().as_ref();
        // Uncompressed point: 0x04 || x || y.
        json!({"keys": [{
            "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": self.kid,
            "x": b64::encode(&pk[1..33]), "y": b64::encode(&pk[33..65]),
        }]})
    }

    pub fn issue(
        &self,
        issuer: &str,
        tenant: &str,
        client_id: &str,
        now: i64,
        lifetime: i64,
    ) -> String {
        let header = json!({"alg": "ES256", "typ": "JWT", "kid": self.kid});
        let claims = json!({
            "aud": AUDIENCE, "iss": issuer, "iat": now, "nbf": now, "exp": now + lifetime,
            "tid": tenant, "oid": client_id, "sub": client_id, "appid": client_id,
            "azp": client_id, "ver": "2.0", "jti": hex::encode(random_bytes::<12>()),
        });
        let signing_input = format!(
            "{}.{}",
            b64::encode(header.to_string().as_bytes()),
            b64::encode(claims.to_string().as_bytes())
        );
        let sig = self
            .key
            .sign(&SystemRandom::new(), signing_input.as_bytes())
            .expect("ecdsa sign");
        format!("{signing_input}.{}", b64::encode(sig.as_ref()))
    }

    pub fn verify(&self, token: &str, tenant: &str, now: i64) -> Result<Claims, TokenError> {
        let mut parts = token.split('.');
        let (Some(h), Some(c), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed);
        };
        let header: Value = b64::decode(h)
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or(TokenError::Malformed)?;
        let alg = header["alg"].as_str().unwrap_or("");
        if alg != "ES256" {
            return Err(TokenError::WrongAlgorithm(alg.to_string()));
        }
        let sig = b64::decode(s).ok_or(TokenError::Malformed)?;
        let signing_input = &token[..h.len() + 1 + c.len()];
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, self.key.public_key().as_ref())
            .verify(signing_input.as_bytes(), &sig)
            .map_err(|_| TokenError::BadSignature)?;
        let claims: Value = b64::decode(c)
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or(TokenError::Malformed)?;
        if claims["aud"].as_str() != Some(AUDIENCE) {
            return Err(TokenError::WrongAudience);
        }
        let tid = claims["tid"].as_str().unwrap_or("");
        if constant_time::verify_slices_are_equal(tid.as_bytes(), tenant.as_bytes()).is_err() {
            return Err(TokenError::WrongTenant(tid.to_string()));
        }
        let exp = claims["exp"].as_i64().ok_or(TokenError::Malformed)?;
        let nbf = claims["nbf"].as_i64().unwrap_or(0);
        if now >= exp {
            return Err(TokenError::Expired);
        }
        if now < nbf {
            return Err(TokenError::NotYetValid);
        }
        let client_id = claims["oid"].as_str().ok_or(TokenError::Malformed)?;
        Ok(Claims {
            tenant: tid.to_string(),
            client_id: client_id.to_string(),
            exp,
            nbf,
        })
    }
}

/// SHA-256 hex of a client secret, as stored.
pub fn secret_hash(secret: &str) -> String {
    hex::encode(aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        secret.as_bytes(),
    ))
}

/// Constant-time comparison of a presented secret against a stored hash.
pub fn secret_matches(secret: &str, stored_hash: &str) -> bool {
    constant_time::verify_slices_are_equal(secret_hash(secret).as_bytes(), stored_hash.as_bytes())
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer() -> TokenSigner {
        TokenSigner::from_pkcs8(&TokenSigner::generate_pkcs8()).unwrap()
    }

    #[test]
    fn issue_verify_and_refusals() {
        let s = signer();
        let t = s.issue("iss", "tenant-a", "client-1", 1000, 600);
        let c = s.verify(&t, "tenant-a", 1001).unwrap();
        assert_eq!(c.client_id, "client-1");
        assert_eq!(
            s.verify(&t, "tenant-b", 1001),
            Err(TokenError::WrongTenant("tenant-a".into()))
        );
        assert_eq!(s.verify(&t, "tenant-a", 1600), Err(TokenError::Expired));
        assert_eq!(s.verify(&t, "tenant-a", 999), Err(TokenError::NotYetValid));
        // Another vault's signer: forged from our point of view.
        let other = signer().issue("iss", "tenant-a", "client-1", 1000, 600);
        assert_eq!(
            s.verify(&other, "tenant-a", 1001),
            Err(TokenError::BadSignature)
        );
        // Tampered claims keep the old signature.
        let parts: Vec<&str> = t.split('.').collect();
        let forged_claims = b64::encode(
            json!({"aud": AUDIENCE, "tid": "tenant-a", "oid": "admin", "exp": 99999, "nbf": 0})
                .to_string()
                .as_bytes(),
        );
        let forged = format!("{}.{}.{}", parts[0], forged_claims, parts[2]);
        assert_eq!(
            s.verify(&forged, "tenant-a", 1001),
            Err(TokenError::BadSignature)
        );
        let none = format!("{}.{}.", b64::encode(br#"{"alg":"none"}"#), forged_claims);
        assert_eq!(
            s.verify(&none, "tenant-a", 1001),
            Err(TokenError::WrongAlgorithm("none".into()))
        );
        assert_eq!(
            s.verify("abc", "tenant-a", 1001),
            Err(TokenError::Malformed)
        );
    }

    #[test]
    fn cache_still_checks_expiry_and_refuses_forgeries() {
        let s = signer();
        let cache = VerifiedTokens::default();
        let t = s.issue("iss", "tenant-a", "c", 1000, 600);
        assert!(cache.verify(&s, &t, "tenant-a", 1001).is_ok());
        assert!(cache.verify(&s, &t, "tenant-a", 1002).is_ok());
        assert_eq!(
            cache.verify(&s, &t, "tenant-a", 1600),
            Err(TokenError::Expired)
        );
        let other = signer().issue("iss", "tenant-a", "c", 1000, 600);
        assert_eq!(
            cache.verify(&s, &other, "tenant-a", 1001),
            Err(TokenError::BadSignature)
        );
    }

    #[test]
    fn secrets() {
        let h = secret_hash("s3cret");
        assert!(secret_matches("s3cret", &h));
        assert!(!secret_matches("s3cret!", &h));
    }
}
