//! Certificate credentials (Azure AD's `private_key_jwt`): an identity
//! registered with the *public* X.509 certificate of a P-256 key pair
//! proves itself at the token endpoint with a short-lived ES256 JWT (a
//! client assertion) signed by the private key, which never leaves its
//! owner. No shared secret crosses between the vault administrator and the
//! identity's owner.
//!
//! What the vault checks (in this order): header `alg` is ES256 (and
//! `x5t#S256`, when present, names the registered certificate); the
//! signature (ECDSA P-256 SHA-256, JWS fixed `r||s`) under the registered
//! public key; `iss` = `sub` = the client id; `aud` is the vault's token
//! endpoint; `exp` in the future and at most 10 minutes after `nbf`/`iat`;
//! `nbf`/`iat` not more than 60 s in the future; the certificate's own
//! validity period; and `jti` not seen before (single use until `exp`).

use std::collections::HashMap;
use std::sync::Mutex;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    EcdsaKeyPair, KeyPair, UnparsedPublicKey, ECDSA_P256_SHA256_FIXED,
    ECDSA_P256_SHA256_FIXED_SIGNING,
};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::b64;
use crate::seal::random_bytes;

/// `client_assertion_type` for a JWT client assertion (RFC 7523).
pub const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// Clock skew tolerated for `nbf`/`iat` in the future.
pub const MAX_SKEW_SECS: i64 = 60;
/// Longest accepted assertion lifetime (`exp` − `nbf`/`iat`).
pub const MAX_LIFETIME_SECS: i64 = 600;
/// Lifetime of the assertions `VaultClient` signs.
pub const CLIENT_ASSERTION_LIFETIME_SECS: i64 = 300;
/// Replay cache capacity (live `jti`s); when full of unexpired entries,
/// assertions are refused rather than remembered less.
pub const REPLAY_CACHE_MAX: usize = 100_000;

/// The registered certificate of an identity (all public).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct CertificateCredential {
    /// SHA-256 of the certificate's DER, lowercase hex.
    pub thumbprint_sha256: String,
    /// The P-256 public key, uncompressed point (0x04 || x || y), base64url.
    pub public_key: String,
    /// The certificate's subject, RFC 4514 style (informational).
    pub subject: String,
    /// Certificate validity (Unix seconds).
    pub not_before: i64,
    pub not_after: i64,
}

/// Why a certificate could not be registered (400 message).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertificateError {
    #[error("'certificate' must be one PEM certificate (-----BEGIN CERTIFICATE-----)")]
    NotPem,
    #[error("the certificate is not a valid X.509 certificate: {0}")]
    Malformed(String),
    #[error("the certificate's key is {0}; only EC P-256 (ES256) keys are accepted")]
    UnsupportedKey(String),
    #[error("the certificate has already expired")]
    Expired,
}

impl CertificateCredential {
    /// Parses a PEM certificate and keeps its P-256 public key, thumbprint,
    /// subject and validity.
    pub fn from_pem(pem: &str) -> Result<Self, CertificateError> {
        let mut rd = pem.as_bytes();
        let mut certs = rustls_pemfile::certs(&mut rd);
        let der = match (certs.next(), certs.next()) {
            (Some(Ok(c)), None) => c,
            _ => return Err(CertificateError::NotPem),
        };
        Self::from_der(der.as_ref())
    }

    pub fn from_der(der: &[u8]) -> Result<Self, CertificateError> {
        use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY};
        let (rest, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| CertificateError::Malformed(e.to_string()))?;
        if !rest.is_empty() {
            return Err(CertificateError::Malformed(
                "trailing data after the certificate".into(),
            ));
        }
        let spki = cert.public_key();
        let alg = &spki.algorithm;
        if alg.algorithm != OID_KEY_TYPE_EC_PUBLIC_KEY {
            let what = match spki.parsed() {
                Ok(x509_parser::public_key::PublicKey::RSA(_)) => "RSA".to_string(),
                _ => format!("algorithm {}", alg.algorithm),
            };
            return Err(CertificateError::UnsupportedKey(what));
        }
        let curve = alg.parameters.as_ref().and_then(|p| p.as_oid().ok());
        if curve.as_ref() != Some(&OID_EC_P256) {
            return Err(CertificateError::UnsupportedKey(match curve {
                Some(c) => format!("EC on curve {c}"),
                None => "EC without a named curve".into(),
            }));
        }
        let point = spki.subject_public_key.data.as_ref();
        if point.len() != 65 || point[0] != 0x04 {
            return Err(CertificateError::Malformed(
                "the EC public key is not an uncompressed P-256 point".into(),
            ));
        }
        let v = cert.validity();
        Ok(CertificateCredential {
            thumbprint_sha256: hex::encode(sha256(der)),
            public_key: b64::encode(point),
            subject: cert.subject().to_string(),
            not_before: v.not_before.timestamp(),
            not_after: v.not_after.timestamp(),
        })
    }

    fn public_point(&self) -> Option<Vec<u8>> {
        b64::decode(&self.public_key).filter(|p| p.len() == 65)
    }
}

fn sha256(b: &[u8]) -> Vec<u8> {
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, b)
        .as_ref()
        .to_vec()
}

/// Why a client assertion was refused (the token endpoint's message).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AssertionError {
    #[error("the client assertion is not a well-formed JWT ({0})")]
    Malformed(&'static str),
    #[error("the client assertion's algorithm '{0}' is not accepted; sign it with ES256")]
    WrongAlgorithm(String),
    #[error("the client assertion's x5t#S256 names a certificate other than the one registered for this identity")]
    WrongCertificate,
    #[error("the client assertion's signature is invalid (not made with the registered certificate's key)")]
    BadSignature,
    #[error("the client assertion's iss and sub must both be the client id {0}")]
    WrongSubject(String),
    #[error(
        "the client assertion's audience '{got}' is not this vault's token endpoint ({expected})"
    )]
    WrongAudience { got: String, expected: String },
    #[error("the client assertion has expired (exp {exp}, now {now})")]
    Expired { exp: i64, now: i64 },
    #[error("the client assertion is not yet valid (nbf/iat {nbf}, now {now}, allowed skew {MAX_SKEW_SECS} s)")]
    NotYetValid { nbf: i64, now: i64 },
    #[error("the client assertion's lifetime exceeds {MAX_LIFETIME_SECS} s (exp − nbf/iat)")]
    TooLong,
    #[error("the client assertion has no jti; a unique jti is required")]
    MissingJti,
    #[error("the client assertion was already used (jti replayed)")]
    Replayed,
    #[error("the vault is remembering too many recent client assertions; retry shortly")]
    ReplayCacheFull,
    #[error("the identity's certificate is outside its validity period (valid {not_before} to {not_after})")]
    CertificateNotValid { not_before: i64, not_after: i64 },
}

/// What a verified assertion says (for the replay cache).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssertionClaims {
    pub client_id: String,
    pub jti: String,
    pub exp: i64,
}

/// Reads `iss` (or `sub`) of an assertion without verifying it: which
/// identity claims to have signed it (only to look up its key).
pub fn unverified_issuer(assertion: &str) -> Option<String> {
    let c = assertion.split('.').nth(1)?;
    let claims: Value = serde_json::from_slice(&b64::decode(c)?).ok()?;
    claims["iss"]
        .as_str()
        .or_else(|| claims["sub"].as_str())
        .map(str::to_string)
}

fn b64_json(s: &str) -> Result<Value, AssertionError> {
    b64::decode(s)
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        .filter(Value::is_object)
        .ok_or(AssertionError::Malformed("a part is not base64url JSON"))
}

/// Verifies an assertion for `client_id` against its registered
/// certificate. `audiences` are the accepted token endpoint URLs (the first
/// is named in the error). Does not consult the replay cache.
pub fn verify_assertion(
    assertion: &str,
    cred: &CertificateCredential,
    client_id: &str,
    audiences: &[String],
    now: i64,
) -> Result<AssertionClaims, AssertionError> {
    let mut parts = assertion.split('.');
    let (Some(h), Some(c), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(AssertionError::Malformed("not three dot-separated parts"));
    };
    let header = b64_json(h)?;
    let alg = header["alg"].as_str().unwrap_or("");
    if alg != "ES256" {
        return Err(AssertionError::WrongAlgorithm(alg.to_string()));
    }
    if let Some(x5t) = header.get("x5t#S256") {
        let named = x5t.as_str().and_then(b64::decode);
        let ours = hex::decode(&cred.thumbprint_sha256).ok();
        if named.is_none() || named != ours {
            return Err(AssertionError::WrongCertificate);
        }
    }
    let sig = b64::decode(s).ok_or(AssertionError::Malformed("signature is not base64url"))?;
    let point = cred
        .public_point()
        .ok_or(AssertionError::Malformed("stored key unusable"))?;
    let signing_input = &assertion[..h.len() + 1 + c.len()];
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, &point)
        .verify(signing_input.as_bytes(), &sig)
        .map_err(|_| AssertionError::BadSignature)?;
    let claims = b64_json(c)?;
    let is_client = |k: &str| {
        claims[k]
            .as_str()
            .is_some_and(|v| v.eq_ignore_ascii_case(client_id))
    };
    if !is_client("iss") || !is_client("sub") {
        return Err(AssertionError::WrongSubject(client_id.to_string()));
    }
    let aud_ok = match &claims["aud"] {
        Value::String(a) => audiences.iter().any(|x| x == a),
        // RFC 7519 allows an array; every entry must be ours (a JWT meant
        // for several audiences could be replayed at the others).
        Value::Array(a) => {
            !a.is_empty()
                && a.iter()
                    .all(|v| v.as_str().is_some_and(|s| audiences.iter().any(|x| x == s)))
        }
        _ => false,
    };
    if !aud_ok {
        return Err(AssertionError::WrongAudience {
            got: match &claims["aud"] {
                Value::String(a) => a.clone(),
                Value::Null => String::new(),
                other => other.to_string(),
            },
            expected: audiences.first().cloned().unwrap_or_default(),
        });
    }
    let exp = claims["exp"]
        .as_i64()
        .ok_or(AssertionError::Malformed("exp is missing or not a number"))?;
    let int = |k: &str| -> Result<Option<i64>, AssertionError> {
        match claims.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_i64()
                .map(Some)
                .ok_or(AssertionError::Malformed("nbf/iat is not a number")),
        }
    };
    let (nbf, iat) = (int("nbf")?, int("iat")?);
    let start = match (nbf, iat) {
        (Some(n), Some(i)) => n.min(i),
        (Some(t), None) | (None, Some(t)) => t,
        (None, None) => {
            return Err(AssertionError::Malformed(
                "nbf or iat is required to bound the lifetime",
            ))
        }
    };
    if now >= exp {
        return Err(AssertionError::Expired { exp, now });
    }
    let latest = nbf.into_iter().chain(iat).max().unwrap_or(start);
    if latest > now + MAX_SKEW_SECS {
        return Err(AssertionError::NotYetValid { nbf: latest, now });
    }
    if exp - start > MAX_LIFETIME_SECS {
        return Err(AssertionError::TooLong);
    }
    if now < cred.not_before || now > cred.not_after {
        return Err(AssertionError::CertificateNotValid {
            not_before: cred.not_before,
            not_after: cred.not_after,
        });
    }
    let jti = claims["jti"]
        .as_str()
        .filter(|j| !j.is_empty() && j.len() <= 256)
        .ok_or(AssertionError::MissingJti)?;
    Ok(AssertionClaims {
        client_id: client_id.to_string(),
        jti: jti.to_string(),
        exp,
    })
}

/// `jti`s of accepted assertions, kept until their `exp`: each assertion
/// is accepted once. In memory: a restart forgets them (an assertion
/// captured before a restart could be replayed until it expires, at most
/// 10 minutes).
#[derive(Default)]
pub struct ReplayCache {
    seen: Mutex<HashMap<(String, String), i64>>,
}

impl ReplayCache {
    /// Records the assertion; refuses it if its `jti` was already used.
    pub fn check_and_remember(&self, c: &AssertionClaims, now: i64) -> Result<(), AssertionError> {
        let mut m = self.seen.lock().expect("replay cache lock");
        let k = (c.client_id.clone(), c.jti.clone());
        if m.get(&k).is_some_and(|exp| *exp > now) {
            return Err(AssertionError::Replayed);
        }
        if m.len() >= REPLAY_CACHE_MAX {
            m.retain(|_, exp| *exp > now);
            if m.len() >= REPLAY_CACHE_MAX {
                // Forgetting live entries would reopen replays: refuse.
                return Err(AssertionError::ReplayCacheFull);
            }
        }
        m.insert(k, c.exp);
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.seen.lock().expect("replay cache lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A private key for signing client assertions (PKCS#8, P-256).
pub struct AssertionSigner {
    key: EcdsaKeyPair,
}

impl std::fmt::Debug for AssertionSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AssertionSigner(P-256)")
    }
}

/// Why a private key could not be loaded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignerError {
    #[error("the private key must be a PKCS#8 PEM (-----BEGIN PRIVATE KEY-----)")]
    NotPkcs8Pem,
    #[error("the private key is not an EC P-256 PKCS#8 key")]
    NotP256,
}

impl AssertionSigner {
    /// From a PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`).
    pub fn from_pkcs8_pem(pem: &[u8]) -> Result<Self, SignerError> {
        let mut rd = pem;
        let der = match rustls_pemfile::private_key(&mut rd) {
            Ok(Some(rustls::pki_types::PrivateKeyDer::Pkcs8(k))) => {
                zeroize::Zeroizing::new(k.secret_pkcs8_der().to_vec())
            }
            _ => return Err(SignerError::NotPkcs8Pem),
        };
        Self::from_pkcs8_der(&der)
    }

    pub fn from_pkcs8_der(der: &[u8]) -> Result<Self, SignerError> {
        EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der)
            .map(|key| AssertionSigner { key })
            .map_err(|_| SignerError::NotP256)
    }

    /// The public key, uncompressed point.
    pub fn public_point(&self) -> &[u8] {
        self.key.public_key().as_ref()
    }

    /// Signs an assertion with arbitrary header and claims (tests use this
    /// to build refusable ones).
    pub fn sign_raw(&self, header: &Value, claims: &Value) -> String {
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

    /// A fresh assertion: `iss` = `sub` = `client_id`, `aud` = the token
    /// endpoint, `iat` = `nbf` = `now`, `exp` = `now + lifetime`, random `jti`.
    pub fn assertion(&self, client_id: &str, aud: &str, now: i64, lifetime: i64) -> String {
        self.sign_raw(
            &json!({"alg": "ES256", "typ": "JWT"}),
            &json!({
                "iss": client_id, "sub": client_id, "aud": aud,
                "iat": now, "nbf": now, "exp": now + lifetime,
                "jti": crate::store::new_guid(),
            }),
        )
    }
}

/// A throwaway P-256 key pair and a self-signed certificate whose subject
/// OU is `client_id`: `(pkcs8_pem, certificate_pem)`. This is what a
/// database server generates for itself (tests and tools use it too).
pub fn generate_identity_certificate(
    client_id: &str,
    common_name: &str,
) -> Result<(zeroize::Zeroizing<String>, String), crate::error::VaultError> {
    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| crate::error::VaultError::Tls(e.to_string()))?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())
        .map_err(|e| crate::error::VaultError::Tls(e.to_string()))?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, common_name);
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationalUnitName, client_id);
    params.serial_number = Some(rcgen::SerialNumber::from_slice(&random_bytes::<16>()));
    let cert = params
        .self_signed(&kp)
        .map_err(|e| crate::error::VaultError::Tls(e.to_string()))?;
    Ok((zeroize::Zeroizing::new(kp.serialize_pem()), cert.pem()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CID: &str = "11111111-2222-3333-4444-555555555555";
    const AUD: &str = "https://127.0.0.1:8443/tenant/oauth2/v2.0/token";

    fn setup() -> (AssertionSigner, CertificateCredential) {
        let (key, cert) = generate_identity_certificate(CID, "db-1").unwrap();
        let s = AssertionSigner::from_pkcs8_pem(key.as_bytes()).unwrap();
        let c = CertificateCredential::from_pem(&cert).unwrap();
        (s, c)
    }

    fn auds() -> Vec<String> {
        vec![AUD.to_string()]
    }

    fn claims(now: i64) -> Value {
        json!({"iss": CID, "sub": CID, "aud": AUD, "iat": now, "nbf": now, "exp": now + 300, "jti": "j1"})
    }

    fn header() -> Value {
        json!({"alg": "ES256", "typ": "JWT"})
    }

    #[test]
    fn parses_certificate() {
        let (s, c) = setup();
        assert_eq!(c.thumbprint_sha256.len(), 64);
        assert!(c.subject.contains(CID), "{}", c.subject);
        assert_eq!(b64::decode(&c.public_key).unwrap(), s.public_point());
        assert!(c.not_after > c.not_before);
        assert_eq!(
            CertificateCredential::from_pem("hello"),
            Err(CertificateError::NotPem)
        );
    }

    #[test]
    fn refuses_other_key_types() {
        for alg in [&rcgen::PKCS_ECDSA_P384_SHA384, &rcgen::PKCS_ED25519] {
            let kp = rcgen::KeyPair::generate_for(alg).unwrap();
            let cert = rcgen::CertificateParams::new(vec!["x".to_string()])
                .unwrap()
                .self_signed(&kp)
                .unwrap();
            let e = CertificateCredential::from_pem(&cert.pem()).unwrap_err();
            assert!(
                matches!(e, CertificateError::UnsupportedKey(_)),
                "{alg:?}: {e}"
            );
        }
    }

    #[test]
    fn accepts_good_assertion_and_the_client_one() {
        let (s, c) = setup();
        let now = 1_900_000_000
            .min(c.not_after - 1000)
            .max(c.not_before + 1000);
        let a = s.sign_raw(&header(), &claims(now));
        let got = verify_assertion(&a, &c, CID, &auds(), now).unwrap();
        assert_eq!(got.jti, "j1");
        assert_eq!(got.exp, now + 300);
        let a = s.assertion(CID, AUD, now, CLIENT_ASSERTION_LIFETIME_SECS);
        assert!(verify_assertion(&a, &c, CID, &auds(), now).is_ok());
        assert_eq!(unverified_issuer(&a).as_deref(), Some(CID));
        // Skew: nbf up to 60 s ahead is fine, beyond is not.
        let mut cl = claims(now + 60);
        cl["exp"] = json!(now + 200);
        assert!(verify_assertion(&s.sign_raw(&header(), &cl), &c, CID, &auds(), now).is_ok());
        // x5t#S256 naming our certificate is fine.
        let mut h = header();
        h["x5t#S256"] = json!(b64::encode(&hex::decode(&c.thumbprint_sha256).unwrap()));
        assert!(verify_assertion(&s.sign_raw(&h, &claims(now)), &c, CID, &auds(), now).is_ok());
    }

    #[test]
    fn refusals() {
        let (s, c) = setup();
        let now = 1_800_000_000;
        let v = |a: &str| verify_assertion(a, &c, CID, &auds(), now);
        // Another key.
        let (other, _) = setup();
        assert_eq!(
            v(&other.sign_raw(&header(), &claims(now))),
            Err(AssertionError::BadSignature)
        );
        // Tampered claims under the original signature.
        let good = s.sign_raw(&header(), &claims(now));
        let p: Vec<&str> = good.split('.').collect();
        let mut cl = claims(now);
        cl["exp"] = json!(now + 3000);
        let forged = format!(
            "{}.{}.{}",
            p[0],
            b64::encode(cl.to_string().as_bytes()),
            p[2]
        );
        assert_eq!(v(&forged), Err(AssertionError::BadSignature));
        // Flipped signature bit.
        let mut sig = b64::decode(p[2]).unwrap();
        sig[10] ^= 1;
        let flipped = format!("{}.{}.{}", p[0], p[1], b64::encode(&sig));
        assert_eq!(v(&flipped), Err(AssertionError::BadSignature));
        // alg none / HS256.
        let none = format!(
            "{}.{}.",
            b64::encode(br#"{"alg":"none"}"#),
            b64::encode(claims(now).to_string().as_bytes())
        );
        assert_eq!(v(&none), Err(AssertionError::WrongAlgorithm("none".into())));
        let hs = s.sign_raw(&json!({"alg": "HS256"}), &claims(now));
        assert_eq!(v(&hs), Err(AssertionError::WrongAlgorithm("HS256".into())));
        // Expired.
        let mut cl = claims(now - 400);
        cl["exp"] = json!(now - 100);
        assert!(matches!(
            v(&s.sign_raw(&header(), &cl)),
            Err(AssertionError::Expired { .. })
        ));
        // Exactly at exp is expired.
        let mut cl = claims(now - 300);
        cl["exp"] = json!(now);
        assert!(matches!(
            v(&s.sign_raw(&header(), &cl)),
            Err(AssertionError::Expired { .. })
        ));
        // Future nbf beyond the skew.
        let mut cl = claims(now + 61);
        cl["exp"] = json!(now + 300);
        assert!(matches!(
            v(&s.sign_raw(&header(), &cl)),
            Err(AssertionError::NotYetValid { .. })
        ));
        // Future iat alone beyond the skew.
        let mut cl = claims(now);
        cl["iat"] = json!(now + 120);
        assert!(matches!(
            v(&s.sign_raw(&header(), &cl)),
            Err(AssertionError::NotYetValid { .. })
        ));
        // Too long.
        let mut cl = claims(now);
        cl["exp"] = json!(now + 601);
        assert_eq!(v(&s.sign_raw(&header(), &cl)), Err(AssertionError::TooLong));
        // No nbf/iat at all.
        let mut cl = claims(now);
        cl.as_object_mut().unwrap().remove("nbf");
        cl.as_object_mut().unwrap().remove("iat");
        assert!(matches!(
            v(&s.sign_raw(&header(), &cl)),
            Err(AssertionError::Malformed(_))
        ));
        // Wrong audience, audience with another tenant, array with a stranger.
        for aud in [
            json!("https://login.microsoftonline.com/tenant/oauth2/v2.0/token"),
            json!("https://127.0.0.1:8443/other/oauth2/v2.0/token"),
            json!([AUD, "https://elsewhere/token"]),
            Value::Null,
        ] {
            let mut cl = claims(now);
            cl["aud"] = aud;
            assert!(
                matches!(
                    v(&s.sign_raw(&header(), &cl)),
                    Err(AssertionError::WrongAudience { .. })
                ),
                "{cl}"
            );
        }
        // iss/sub must both be the client id.
        for k in ["iss", "sub"] {
            let mut cl = claims(now);
            cl[k] = json!("someone-else");
            assert_eq!(
                v(&s.sign_raw(&header(), &cl)),
                Err(AssertionError::WrongSubject(CID.into()))
            );
        }
        // No jti.
        let mut cl = claims(now);
        cl.as_object_mut().unwrap().remove("jti");
        assert_eq!(
            v(&s.sign_raw(&header(), &cl)),
            Err(AssertionError::MissingJti)
        );
        // x5t#S256 naming another certificate.
        let mut h = header();
        h["x5t#S256"] = json!(b64::encode(&[0u8; 32]));
        assert_eq!(
            v(&s.sign_raw(&h, &claims(now))),
            Err(AssertionError::WrongCertificate)
        );
        // Certificate outside its validity.
        let mut expired = c.clone();
        expired.not_after = now - 1;
        assert!(matches!(
            verify_assertion(
                &s.sign_raw(&header(), &claims(now)),
                &expired,
                CID,
                &auds(),
                now
            ),
            Err(AssertionError::CertificateNotValid { .. })
        ));
        assert!(matches!(v("a.b"), Err(AssertionError::Malformed(_))));
    }

    #[test]
    fn replay_cache_single_use_until_exp() {
        let cache = ReplayCache::default();
        let c = AssertionClaims {
            client_id: CID.into(),
            jti: "j".into(),
            exp: 1000,
        };
        assert!(cache.check_and_remember(&c, 900).is_ok());
        assert_eq!(
            cache.check_and_remember(&c, 901),
            Err(AssertionError::Replayed)
        );
        // Another client may use the same jti.
        let other = AssertionClaims {
            client_id: "other".into(),
            ..c.clone()
        };
        assert!(cache.check_and_remember(&other, 901).is_ok());
        assert_eq!(cache.len(), 2);
    }

    #[test]
    fn replay_cache_is_bounded_and_fails_closed() {
        let cache = ReplayCache::default();
        for i in 0..REPLAY_CACHE_MAX {
            let c = AssertionClaims {
                client_id: CID.into(),
                jti: i.to_string(),
                exp: 1000,
            };
            cache.check_and_remember(&c, 500).unwrap();
        }
        let next = AssertionClaims {
            client_id: CID.into(),
            jti: "next".into(),
            exp: 1000,
        };
        // Full of live entries: refuse rather than forget one.
        assert_eq!(
            cache.check_and_remember(&next, 600),
            Err(AssertionError::ReplayCacheFull)
        );
        // Once they expired, they are dropped and new ones fit.
        let later = AssertionClaims {
            exp: 2000,
            ..next.clone()
        };
        assert!(cache.check_and_remember(&later, 1000).is_ok());
        assert_eq!(cache.len(), 1);
        // An expired entry does not block its jti forever.
        assert!(cache
            .check_and_remember(
                &AssertionClaims {
                    exp: 3000,
                    ..later.clone()
                },
                2000
            )
            .is_ok());
    }

    #[test]
    fn signer_refuses_non_p256() {
        assert_eq!(
            AssertionSigner::from_pkcs8_pem(b"nope").unwrap_err(),
            SignerError::NotPkcs8Pem
        );
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        assert_eq!(
            AssertionSigner::from_pkcs8_pem(kp.serialize_pem().as_bytes()).unwrap_err(),
            SignerError::NotP256
        );
    }
}
