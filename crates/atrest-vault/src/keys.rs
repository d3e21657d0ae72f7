//! RSA key material and the cryptographic operations of the keys API, all
//! through aws-lc-rs. The private key exists only as sealed PKCS#8 on disk
//! and as aws-lc-rs key objects in memory; it has no accessor that returns
//! it except `pkcs8()` (used for sealing and backup, never for an answer).

use aws_lc_rs::digest;
use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rsa::{
    KeyPair, KeyPairComponents, KeySize, OaepAlgorithm, OaepPrivateDecryptingKey,
    OaepPublicEncryptingKey, Pkcs1PrivateDecryptingKey, Pkcs1PublicEncryptingKey,
    PrivateDecryptingKey, OAEP_SHA1_MGF1SHA1, OAEP_SHA256_MGF1SHA256,
};
use aws_lc_rs::signature::{self, KeyPair as _, RsaEncoding, RsaParameters};
use serde_json::{json, Value};
use zeroize::Zeroizing;

use crate::b64;
use crate::der;
use crate::error::ApiError;

/// Encryption/wrap algorithms of the keys API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EncAlg {
    RsaOaep256,
    RsaOaep,
    Rsa15,
}

impl EncAlg {
    pub fn parse(s: &str) -> Result<Self, ApiError> {
        match s {
            "RSA-OAEP-256" => Ok(EncAlg::RsaOaep256),
            "RSA-OAEP" => Ok(EncAlg::RsaOaep),
            "RSA1_5" => Ok(EncAlg::Rsa15),
            other => Err(ApiError::bad_parameter(format!(
                "algorithm '{other}' is not supported for RSA keys; use RSA-OAEP-256 or RSA-OAEP"
            ))),
        }
    }
    fn oaep(self) -> Option<&'static OaepAlgorithm> {
        match self {
            EncAlg::RsaOaep256 => Some(&OAEP_SHA256_MGF1SHA256),
            EncAlg::RsaOaep => Some(&OAEP_SHA1_MGF1SHA1),
            EncAlg::Rsa15 => None,
        }
    }
}

/// Signature algorithms of the keys API (the value signed is a digest).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignAlg {
    Rs256,
    Rs384,
    Rs512,
    Ps256,
    Ps384,
    Ps512,
}

impl SignAlg {
    pub fn parse(s: &str) -> Result<Self, ApiError> {
        Ok(match s {
            "RS256" => SignAlg::Rs256,
            "RS384" => SignAlg::Rs384,
            "RS512" => SignAlg::Rs512,
            "PS256" => SignAlg::Ps256,
            "PS384" => SignAlg::Ps384,
            "PS512" => SignAlg::Ps512,
            other => {
                return Err(ApiError::bad_parameter(format!(
                    "signature algorithm '{other}' is not supported for RSA keys"
                )))
            }
        })
    }
    fn digest_alg(self) -> &'static digest::Algorithm {
        match self {
            SignAlg::Rs256 | SignAlg::Ps256 => &digest::SHA256,
            SignAlg::Rs384 | SignAlg::Ps384 => &digest::SHA384,
            SignAlg::Rs512 | SignAlg::Ps512 => &digest::SHA512,
        }
    }
    fn encoding(self) -> &'static dyn RsaEncoding {
        match self {
            SignAlg::Rs256 => &signature::RSA_PKCS1_SHA256,
            SignAlg::Rs384 => &signature::RSA_PKCS1_SHA384,
            SignAlg::Rs512 => &signature::RSA_PKCS1_SHA512,
            SignAlg::Ps256 => &signature::RSA_PSS_SHA256,
            SignAlg::Ps384 => &signature::RSA_PSS_SHA384,
            SignAlg::Ps512 => &signature::RSA_PSS_SHA512,
        }
    }
    fn params(self) -> &'static RsaParameters {
        match self {
            SignAlg::Rs256 => &signature::RSA_PKCS1_2048_8192_SHA256,
            SignAlg::Rs384 => &signature::RSA_PKCS1_2048_8192_SHA384,
            SignAlg::Rs512 => &signature::RSA_PKCS1_2048_8192_SHA512,
            SignAlg::Ps256 => &signature::RSA_PSS_2048_8192_SHA256,
            SignAlg::Ps384 => &signature::RSA_PSS_2048_8192_SHA384,
            SignAlg::Ps512 => &signature::RSA_PSS_2048_8192_SHA512,
        }
    }
}

/// An RSA key version: private operations plus its public half.
pub struct RsaKey {
    pkcs8: Zeroizing<Vec<u8>>,
    keypair: KeyPair,
    oaep: OaepPrivateDecryptingKey,
    pkcs1: Pkcs1PrivateDecryptingKey,
    oaep_pub: OaepPublicEncryptingKey,
    pkcs1_pub: Pkcs1PublicEncryptingKey,
    public_der: Vec<u8>,
    n: Vec<u8>,
    e: Vec<u8>,
}

impl std::fmt::Debug for RsaKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RsaKey({} bits, private part redacted)", self.bits())
    }
}

fn bad_key(msg: &str) -> ApiError {
    ApiError::bad_parameter(msg.to_string())
}

impl RsaKey {
    /// Generates a key of 2048, 3072 or 4096 bits (the sizes Azure offers).
    pub fn generate(bits: u32) -> Result<Self, ApiError> {
        let size = match bits {
            2048 => KeySize::Rsa2048,
            3072 => KeySize::Rsa3072,
            4096 => KeySize::Rsa4096,
            other => {
                return Err(ApiError::bad_parameter(format!(
                    "key_size {other} is not supported; use 2048, 3072 or 4096"
                )))
            }
        };
        let kp =
            KeyPair::generate(size).map_err(|_| ApiError::internal("RSA key generation failed"))?;
        let der = kp
            .as_der()
            .map_err(|_| ApiError::internal("RSA key encoding failed"))?;
        Self::from_pkcs8(der.as_ref())
    }

    /// Parses an unencrypted PKCS#8 `PrivateKeyInfo` holding an RSA key.
    pub fn from_pkcs8(pkcs8: &[u8]) -> Result<Self, ApiError> {
        let keypair = KeyPair::from_pkcs8(pkcs8)
            .map_err(|_| bad_key("the key is not a valid PKCS#8 RSA private key"))?;
        let bits = keypair.public_modulus_len() * 8;
        if !(2048..=4096).contains(&bits) {
            return Err(ApiError::bad_parameter(format!(
                "RSA keys of {bits} bits are not supported; use 2048, 3072 or 4096"
            )));
        }
        let private =
            PrivateDecryptingKey::from_pkcs8(pkcs8).map_err(|_| bad_key("invalid RSA key"))?;
        let oaep_pub = OaepPublicEncryptingKey::new(private.public_key())
            .map_err(|_| bad_key("invalid RSA key"))?;
        let pkcs1_pub = Pkcs1PublicEncryptingKey::new(private.public_key())
            .map_err(|_| bad_key("invalid RSA key"))?;
        let oaep =
            OaepPrivateDecryptingKey::new(private).map_err(|_| bad_key("invalid RSA key"))?;
        let pkcs1 = Pkcs1PrivateDecryptingKey::new(
            PrivateDecryptingKey::from_pkcs8(pkcs8).map_err(|_| bad_key("invalid RSA key"))?,
        )
        .map_err(|_| bad_key("invalid RSA key"))?;
        let public_der = keypair.public_key().as_ref().to_vec();
        let (n, e) = der::rsa_public_components(&public_der)
            .map_err(|_| ApiError::internal("RSA public key encoding failed"))?;
        Ok(RsaKey {
            pkcs8: Zeroizing::new(pkcs8.to_vec()),
            keypair,
            oaep,
            pkcs1,
            oaep_pub,
            pkcs1_pub,
            public_der,
            n,
            e,
        })
    }

    /// Builds a key from a JWK with private components (Azure's import body).
    pub fn from_jwk(jwk: &Value) -> Result<Self, ApiError> {
        let kty = jwk.get("kty").and_then(Value::as_str).unwrap_or("");
        if kty != "RSA" && kty != "RSA-HSM" {
            return Err(ApiError::bad_parameter(format!(
                "key type '{kty}' is not supported; only RSA keys can be imported"
            )));
        }
        let field = |name: &str| -> Result<Zeroizing<Vec<u8>>, ApiError> {
            let s = jwk.get(name).and_then(Value::as_str).ok_or_else(|| {
                ApiError::bad_parameter(format!(
                    "the JSON web key is missing '{name}'; an RSA import needs n, e, d, p, q, dp, dq and qi"
                ))
            })?;
            b64::decode(s).map(Zeroizing::new).ok_or_else(|| {
                ApiError::bad_parameter(format!(
                    "the JSON web key field '{name}' is not valid base64url"
                ))
            })
        };
        let (n, e) = (field("n")?, field("e")?);
        let comps = KeyPairComponents {
            public_key: aws_lc_rs::rsa::PublicKeyComponents {
                n: der::unsigned(&n).to_vec(),
                e: der::unsigned(&e).to_vec(),
            },
            d: field("d")?,
            p: field("p")?,
            q: field("q")?,
            dP: field("dp")?,
            dQ: field("dq")?,
            qInv: field("qi")?,
        };
        let kp = KeyPair::from_components(&comps)
            .map_err(|_| bad_key("the JSON web key's components do not form a valid RSA key"))?;
        let der = kp
            .as_der()
            .map_err(|_| ApiError::internal("RSA key encoding failed"))?;
        Self::from_pkcs8(der.as_ref())
    }

    /// Sealing and backup only: never put this in a response.
    pub fn pkcs8(&self) -> &[u8] {
        &self.pkcs8
    }

    pub fn bits(&self) -> usize {
        self.keypair.public_modulus_len() * 8
    }

    pub fn modulus_len(&self) -> usize {
        self.keypair.public_modulus_len()
    }

    /// The public JWK as Azure returns it.
    pub fn public_jwk(&self, kid: &str, key_ops: &[String]) -> Value {
        json!({
            "kid": kid,
            "kty": "RSA",
            "key_ops": key_ops,
            "n": b64::encode(&self.n),
            "e": b64::encode(&self.e),
        })
    }

    pub fn encrypt(&self, alg: EncAlg, plaintext: &[u8]) -> Result<Vec<u8>, ApiError> {
        let mut out = vec![0u8; self.modulus_len()];
        match alg.oaep() {
            Some(oaep_alg) => {
                let key = &self.oaep_pub;
                let max = key.max_plaintext_size(oaep_alg);
                if plaintext.is_empty() || plaintext.len() > max {
                    return Err(ApiError::bad_parameter(format!(
                        "the value is {} bytes; {} with a {}-bit key takes 1 to {max} bytes",
                        plaintext.len(),
                        alg_name(alg),
                        self.bits()
                    )));
                }
                let n = key
                    .encrypt(oaep_alg, plaintext, &mut out, None)
                    .map_err(|_| ApiError::bad_parameter("encryption failed"))?
                    .len();
                out.truncate(n);
            }
            None => {
                let key = &self.pkcs1_pub;
                let max = key.max_plaintext_size();
                if plaintext.is_empty() || plaintext.len() > max {
                    return Err(ApiError::bad_parameter(format!(
                        "the value is {} bytes; RSA1_5 with a {}-bit key takes 1 to {max} bytes",
                        plaintext.len(),
                        self.bits()
                    )));
                }
                let n = key
                    .encrypt(plaintext, &mut out)
                    .map_err(|_| ApiError::bad_parameter("encryption failed"))?
                    .len();
                out.truncate(n);
            }
        }
        Ok(out)
    }

    /// Decrypts; the plaintext is zeroized when the caller drops it.
    pub fn decrypt(&self, alg: EncAlg, ciphertext: &[u8]) -> Result<Zeroizing<Vec<u8>>, ApiError> {
        if ciphertext.len() != self.modulus_len() {
            return Err(ApiError::bad_parameter(format!(
                "the ciphertext is {} bytes; a {}-bit key's ciphertext is exactly {} bytes",
                ciphertext.len(),
                self.bits(),
                self.modulus_len()
            )));
        }
        let mut out = Zeroizing::new(vec![0u8; self.modulus_len()]);
        let n = match alg.oaep() {
            Some(oaep_alg) => self
                .oaep
                .decrypt(oaep_alg, ciphertext, &mut out, None)
                .map(|p| p.len()),
            None => self.pkcs1.decrypt(ciphertext, &mut out).map(|p| p.len()),
        }
        .map_err(|_| {
            ApiError::bad_parameter(format!(
                "the value could not be decrypted with this key version and {}",
                alg_name(alg)
            ))
        })?;
        out.truncate(n);
        Ok(out)
    }

    pub fn sign(&self, alg: SignAlg, digest_bytes: &[u8]) -> Result<Vec<u8>, ApiError> {
        let d = digest::Digest::import_less_safe(digest_bytes, alg.digest_alg()).map_err(|_| {
            ApiError::bad_parameter(format!(
                "the digest is {} bytes; {alg:?} needs a {}-byte digest",
                digest_bytes.len(),
                alg.digest_alg().output_len()
            ))
        })?;
        let mut sig = vec![0u8; self.modulus_len()];
        self.keypair
            .sign_digest(alg.encoding(), &d, &mut sig)
            .map_err(|_| ApiError::internal("signing failed"))?;
        Ok(sig)
    }

    pub fn verify(&self, alg: SignAlg, digest_bytes: &[u8], sig: &[u8]) -> Result<bool, ApiError> {
        let d = digest::Digest::import_less_safe(digest_bytes, alg.digest_alg()).map_err(|_| {
            ApiError::bad_parameter(format!(
                "the digest is {} bytes; {alg:?} needs a {}-byte digest",
                digest_bytes.len(),
                alg.digest_alg().output_len()
            ))
        })?;
        let pk = signature::UnparsedPublicKey::new(alg.params(), &self.public_der);
        Ok(pk.verify_digest(&d, sig).is_ok())
    }
}

pub fn alg_name(alg: EncAlg) -> &'static str {
    match alg {
        EncAlg::RsaOaep256 => "RSA-OAEP-256",
        EncAlg::RsaOaep => "RSA-OAEP",
        EncAlg::Rsa15 => "RSA1_5",
    }
}

/// Parses PEM (`PRIVATE KEY`) or raw DER PKCS#8.
pub fn pkcs8_from_pem_or_der(bytes: &[u8]) -> Result<Zeroizing<Vec<u8>>, ApiError> {
    if bytes.starts_with(b"-----") {
        let mut reader = std::io::BufReader::new(bytes);
        for item in rustls_pemfile::read_all(&mut reader) {
            match item {
                Ok(rustls_pemfile::Item::Pkcs8Key(k)) => {
                    return Ok(Zeroizing::new(k.secret_pkcs8_der().to_vec()))
                }
                Ok(rustls_pemfile::Item::Pkcs1Key(_)) => {
                    return Err(ApiError::bad_parameter(
                        "PKCS#1 'RSA PRIVATE KEY' PEM is not accepted; convert it to PKCS#8 ('PRIVATE KEY')",
                    ))
                }
                Ok(_) => continue,
                Err(_) => return Err(ApiError::bad_parameter("the PEM file is malformed")),
            }
        }
        Err(ApiError::bad_parameter(
            "no 'PRIVATE KEY' block found in the PEM file",
        ))
    } else {
        Ok(Zeroizing::new(bytes.to_vec()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::OnceLock;

    fn key() -> &'static RsaKey {
        static K: OnceLock<RsaKey> = OnceLock::new();
        K.get_or_init(|| RsaKey::generate(2048).unwrap())
    }

    #[test]
    fn wrap_unwrap_all_algorithms() {
        let k = key();
        for alg in [EncAlg::RsaOaep256, EncAlg::RsaOaep, EncAlg::Rsa15] {
            let ct = k.encrypt(alg, b"0123456789abcdef0123456789abcdef").unwrap();
            assert_eq!(ct.len(), 256);
            assert_eq!(
                &k.decrypt(alg, &ct).unwrap()[..],
                b"0123456789abcdef0123456789abcdef"
            );
        }
    }

    #[test]
    fn wrong_algorithm_or_length_is_bad_parameter() {
        let k = key();
        let ct = k.encrypt(EncAlg::RsaOaep256, b"dek").unwrap();
        assert_eq!(k.decrypt(EncAlg::RsaOaep, &ct).unwrap_err().status, 400);
        assert_eq!(
            k.decrypt(EncAlg::RsaOaep256, &ct[1..]).unwrap_err().status,
            400
        );
        let too_long = vec![1u8; 191];
        assert_eq!(
            k.encrypt(EncAlg::RsaOaep256, &too_long).unwrap_err().status,
            400
        );
        assert!(k.encrypt(EncAlg::RsaOaep256, &too_long[..190]).is_ok());
        assert_eq!(k.encrypt(EncAlg::RsaOaep256, b"").unwrap_err().status, 400);
    }

    #[test]
    fn sign_verify_digest() {
        let k = key();
        let d = digest::digest(&digest::SHA256, b"hello");
        for alg in [SignAlg::Rs256, SignAlg::Ps256] {
            let sig = k.sign(alg, d.as_ref()).unwrap();
            assert!(k.verify(alg, d.as_ref(), &sig).unwrap());
            let mut bad = sig.clone();
            bad[10] ^= 1;
            assert!(!k.verify(alg, d.as_ref(), &bad).unwrap());
        }
        // A PKCS#1 v1.5 signature over the digest verifies as a normal
        // message signature over the message: proves we sign the digest.
        let sig = k.sign(SignAlg::Rs256, d.as_ref()).unwrap();
        signature::UnparsedPublicKey::new(&signature::RSA_PKCS1_2048_8192_SHA256, &k.public_der)
            .verify(b"hello", &sig)
            .unwrap();
        assert_eq!(k.sign(SignAlg::Rs256, &[0u8; 20]).unwrap_err().status, 400);
    }

    #[test]
    fn pkcs8_roundtrip_keeps_public_key() {
        let k = key();
        let k2 = RsaKey::from_pkcs8(k.pkcs8()).unwrap();
        assert_eq!(k.n, k2.n);
        assert!(RsaKey::from_pkcs8(&k.pkcs8()[..100]).is_err());
        assert!(!format!("{k:?}").contains(&hex::encode(&k.pkcs8()[..16])));
    }

    #[test]
    fn jwk_import_rejects_missing_and_inconsistent_parts() {
        let err = RsaKey::from_jwk(&json!({"kty":"RSA","n":"AQAB","e":"AQAB"})).unwrap_err();
        assert!(err.message.contains("'d'"), "{}", err.message);
        let err = RsaKey::from_jwk(&json!({"kty":"EC"})).unwrap_err();
        assert_eq!(err.status, 400);
        let bogus = json!({"kty":"RSA","n":"AQAB","e":"AQAB","d":"AQAB","p":"AQAB","q":"AQAB","dp":"AQAB","dq":"AQAB","qi":"AQAB"});
        assert_eq!(RsaKey::from_jwk(&bogus).unwrap_err().status, 400);
    }

    #[test]
    fn key_sizes() {
        assert_eq!(RsaKey::generate(1024).unwrap_err().status, 400);
    }
}
