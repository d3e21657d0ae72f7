//! SCRAM-SHA-256 and SCRAM-SHA-256-PLUS (RFC 5802, RFC 7677), the server
//! side, as PostgreSQL speaks it. The server stores only the verifier
//! (salt, iterations, StoredKey, ServerKey), never the password.
//!
//! Channel binding is `tls-server-end-point` (RFC 5929): the hash of the
//! server certificate, so a man in the middle with another certificate
//! cannot relay the exchange. `-PLUS` is offered only over TLS, and a
//! client that says it could bind but thinks the server cannot (`y`) while
//! the server offered `-PLUS` is refused as a downgrade.
//!
//! Unknown users get a full exchange with a stable fake salt, so the
//! answer does not tell which role names exist.

use aws_lc_rs::{constant_time, digest, hmac, pbkdf2, rand};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use std::num::NonZeroU32;
use zeroize::Zeroizing;

pub const MECH: &str = "SCRAM-SHA-256";
pub const MECH_PLUS: &str = "SCRAM-SHA-256-PLUS";
pub const DEFAULT_ITERATIONS: u32 = 4096;

/// What the server stores for a role: PostgreSQL's verifier format
/// `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`.
#[derive(Clone)]
pub struct ScramVerifier {
    pub iterations: u32,
    pub salt: Vec<u8>,
    stored_key: Zeroizing<Vec<u8>>,
    server_key: Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for ScramVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScramVerifier")
            .field("iterations", &self.iterations)
            .finish_non_exhaustive()
    }
}

fn hmac_sha256(key: &[u8], msg: &[u8]) -> Vec<u8> {
    let k = hmac::Key::new(hmac::HMAC_SHA256, key);
    hmac::sign(&k, msg).as_ref().to_vec()
}

fn sha256(data: &[u8]) -> Vec<u8> {
    digest::digest(&digest::SHA256, data).as_ref().to_vec()
}

/// SASLprep as PostgreSQL applies it: if the password does not normalize,
/// it is used as it is.
fn normalize(password: &str) -> String {
    stringprep::saslprep(password)
        .map(|c| c.into_owned())
        .unwrap_or_else(|_| password.to_string())
}

fn salted_password(password: &str, salt: &[u8], iterations: u32) -> Zeroizing<Vec<u8>> {
    let mut out = Zeroizing::new(vec![0u8; 32]);
    pbkdf2::derive(
        pbkdf2::PBKDF2_HMAC_SHA256,
        NonZeroU32::new(iterations).expect("iterations > 0"),
        salt,
        normalize(password).as_bytes(),
        &mut out,
    );
    out
}

impl ScramVerifier {
    /// A verifier for `password` with a fresh random salt.
    pub fn from_password(password: &str, iterations: u32) -> ScramVerifier {
        let mut salt = vec![0u8; 16];
        rand::fill(&mut salt).expect("system RNG");
        Self::from_password_and_salt(password, salt, iterations)
    }

    fn from_password_and_salt(password: &str, salt: Vec<u8>, iterations: u32) -> ScramVerifier {
        let salted = salted_password(password, &salt, iterations);
        let client_key = Zeroizing::new(hmac_sha256(&salted, b"Client Key"));
        ScramVerifier {
            iterations,
            salt,
            stored_key: Zeroizing::new(sha256(&client_key)),
            server_key: Zeroizing::new(hmac_sha256(&salted, b"Server Key")),
        }
    }

    pub fn parse(s: &str) -> Option<ScramVerifier> {
        let rest = s.strip_prefix("SCRAM-SHA-256$")?;
        let (iter_salt, keys) = rest.split_once('$')?;
        let (iters, salt) = iter_salt.split_once(':')?;
        let (stored, server) = keys.split_once(':')?;
        let v = ScramVerifier {
            iterations: iters.parse().ok().filter(|i| *i > 0)?,
            salt: B64.decode(salt).ok()?,
            stored_key: Zeroizing::new(B64.decode(stored).ok()?),
            server_key: Zeroizing::new(B64.decode(server).ok()?),
        };
        (v.stored_key.len() == 32 && v.server_key.len() == 32).then_some(v)
    }

    pub fn encode(&self) -> String {
        format!(
            "SCRAM-SHA-256${}:{}${}:{}",
            self.iterations,
            B64.encode(&self.salt),
            B64.encode(&*self.stored_key),
            B64.encode(&*self.server_key)
        )
    }
}

/// What the connection can bind to.
#[derive(Debug, Clone)]
pub enum Binding {
    /// Plaintext connection: no `-PLUS`.
    Plain,
    /// TLS with the `tls-server-end-point` hash of our certificate.
    Tls(Vec<u8>),
}

/// The mechanisms offered on a connection, preferred first.
pub fn mechanisms(binding: &Binding) -> Vec<String> {
    match binding {
        Binding::Plain => vec![MECH.into()],
        Binding::Tls(_) => vec![MECH_PLUS.into(), MECH.into()],
    }
}

/// Why authentication failed: SQLSTATE and message for the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthFailure {
    pub code: &'static str,
    pub message: String,
}

fn protocol(msg: &str) -> AuthFailure {
    AuthFailure {
        code: "08P01",
        message: format!("malformed SCRAM message ({msg})"),
    }
}

enum Stage {
    AwaitFirst,
    AwaitFinal {
        client_first_bare: String,
        server_first: String,
        nonce: String,
        gs2_header: String,
    },
    Done,
}

/// One SCRAM exchange.
pub struct ScramServer {
    user: String,
    verifier: Option<ScramVerifier>,
    /// Stands in for the verifier of an unknown user.
    mock: ScramVerifier,
    binding: Binding,
    stage: Stage,
    server_nonce: Option<String>,
}

impl ScramServer {
    /// `verifier` is `None` for a role that does not exist; `mock_key` is a
    /// per-server secret that makes the fake salt stable per role name.
    pub fn new(
        user: &str,
        verifier: Option<ScramVerifier>,
        binding: Binding,
        mock_key: &[u8],
    ) -> Self {
        let fake_salt = hmac_sha256(mock_key, user.as_bytes())[..16].to_vec();
        let mock = ScramVerifier {
            iterations: DEFAULT_ITERATIONS,
            salt: fake_salt,
            stored_key: Zeroizing::new(vec![0; 32]),
            server_key: Zeroizing::new(vec![0; 32]),
        };
        ScramServer {
            user: user.to_string(),
            verifier,
            mock,
            binding,
            stage: Stage::AwaitFirst,
            server_nonce: None,
        }
    }

    fn failed(&self) -> AuthFailure {
        AuthFailure {
            code: "28P01",
            message: format!("password authentication failed for user \"{}\"", self.user),
        }
    }

    /// Handles SASLInitialResponse; returns server-first-message.
    pub fn client_first(&mut self, mechanism: &str, data: &[u8]) -> Result<String, AuthFailure> {
        if !matches!(self.stage, Stage::AwaitFirst) {
            return Err(protocol("unexpected initial response"));
        }
        let offered = mechanisms(&self.binding);
        if !offered.iter().any(|m| m == mechanism) {
            return Err(AuthFailure {
                code: "28000",
                message: format!(
                    "SASL mechanism {mechanism:?} is not offered on this connection (offered: {})",
                    offered.join(", ")
                ),
            });
        }
        let msg = std::str::from_utf8(data).map_err(|_| protocol("not UTF-8"))?;
        // gs2-header: cbind-flag "," [authzid] ","
        let (flag, rest) = msg
            .split_once(',')
            .ok_or_else(|| protocol("no gs2 header"))?;
        let (authzid, bare) = rest
            .split_once(',')
            .ok_or_else(|| protocol("no gs2 header"))?;
        if !authzid.is_empty() {
            return Err(protocol("authorization identities are not supported"));
        }
        let plus = mechanism == MECH_PLUS;
        match (flag, plus) {
            ("p=tls-server-end-point", true) => {}
            (f, true) => {
                return Err(AuthFailure {
                    code: "08P01",
                    message: format!(
                        "SCRAM-SHA-256-PLUS selected but channel binding flag is {f:?}"
                    ),
                })
            }
            ("n", false) => {}
            ("y", false) => {
                if matches!(self.binding, Binding::Tls(_)) {
                    // The client could bind and we offered -PLUS: someone
                    // removed it from the list on the way.
                    return Err(AuthFailure {
                        code: "28000",
                        message: "SCRAM channel binding negotiation error: the client supports binding but did not see SCRAM-SHA-256-PLUS offered (possible downgrade attack)".into(),
                    });
                }
            }
            (f, false) => {
                return Err(AuthFailure {
                    code: "08P01",
                    message: format!("channel binding flag {f:?} requires SCRAM-SHA-256-PLUS"),
                })
            }
        }
        let client_nonce = bare
            .split(',')
            .find_map(|a| a.strip_prefix("r="))
            .filter(|n| !n.is_empty() && n.bytes().all(|b| (0x21..=0x7e).contains(&b) && b != b','))
            .ok_or_else(|| protocol("no client nonce"))?;
        if bare.split(',').any(|a| a.starts_with("m=")) {
            return Err(protocol("mandatory extensions are not supported"));
        }
        let server_nonce = self.server_nonce.clone().unwrap_or_else(|| {
            let mut raw = [0u8; 18];
            rand::fill(&mut raw).expect("system RNG");
            B64.encode(raw)
        });
        let nonce = format!("{client_nonce}{server_nonce}");
        let v = self.verifier.as_ref().unwrap_or(&self.mock);
        let server_first = format!("r={nonce},s={},i={}", B64.encode(&v.salt), v.iterations);
        self.stage = Stage::AwaitFinal {
            client_first_bare: bare.to_string(),
            server_first: server_first.clone(),
            nonce,
            gs2_header: format!("{flag},{authzid},"),
        };
        Ok(server_first)
    }

    /// Handles SASLResponse (client-final-message); returns
    /// server-final-message on success.
    pub fn client_final(&mut self, data: &[u8]) -> Result<String, AuthFailure> {
        let Stage::AwaitFinal {
            client_first_bare,
            server_first,
            nonce,
            gs2_header,
        } = std::mem::replace(&mut self.stage, Stage::Done)
        else {
            return Err(protocol("unexpected response"));
        };
        let msg = std::str::from_utf8(data).map_err(|_| protocol("not UTF-8"))?;
        let (without_proof, proof_b64) =
            msg.rsplit_once(",p=").ok_or_else(|| protocol("no proof"))?;
        let mut cbind = None;
        let mut got_nonce = None;
        for attr in without_proof.split(',') {
            if let Some(c) = attr.strip_prefix("c=") {
                cbind = Some(c);
            } else if let Some(r) = attr.strip_prefix("r=") {
                got_nonce = Some(r);
            }
        }
        let cbind = B64
            .decode(cbind.ok_or_else(|| protocol("no channel binding attribute"))?)
            .map_err(|_| protocol("channel binding is not base64"))?;
        let mut expected = gs2_header.clone().into_bytes();
        if gs2_header.starts_with("p=") {
            match &self.binding {
                Binding::Tls(hash) => expected.extend_from_slice(hash),
                Binding::Plain => return Err(protocol("channel binding without TLS")),
            }
        }
        if constant_time::verify_slices_are_equal(&cbind, &expected).is_err() {
            return Err(AuthFailure {
                code: "28000",
                message: "SCRAM channel binding check failed: the client is bound to another TLS certificate (a proxy or man in the middle?)".into(),
            });
        }
        if got_nonce != Some(nonce.as_str()) {
            return Err(protocol("nonce mismatch"));
        }
        let proof = B64
            .decode(proof_b64)
            .map_err(|_| protocol("proof is not base64"))?;
        let Some(v) = self.verifier.as_ref() else {
            return Err(self.failed());
        };
        if proof.len() != 32 {
            return Err(self.failed());
        }
        let auth_message = format!("{client_first_bare},{server_first},{without_proof}");
        let client_signature = hmac_sha256(&v.stored_key, auth_message.as_bytes());
        let client_key: Zeroizing<Vec<u8>> = Zeroizing::new(
            proof
                .iter()
                .zip(client_signature.iter())
                .map(|(p, s)| p ^ s)
                .collect(),
        );
        if constant_time::verify_slices_are_equal(&sha256(&client_key), &v.stored_key).is_err() {
            return Err(self.failed());
        }
        let server_signature = hmac_sha256(&v.server_key, auth_message.as_bytes());
        Ok(format!("v={}", B64.encode(server_signature)))
    }
}

/// The `tls-server-end-point` channel binding of a DER certificate: its
/// hash with the certificate's signature hash (SHA-256 for MD5 and SHA-1).
/// `None` for signature algorithms without a defined hash (Ed25519,
/// RSA-PSS), in which case `-PLUS` is not offered.
pub fn tls_server_end_point(cert_der: &[u8]) -> Option<Vec<u8>> {
    let oid = signature_oid(cert_der)?;
    const SHA1_RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x05];
    const SHA256_RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0b];
    const SHA384_RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0c];
    const SHA512_RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0d];
    const ECDSA_SHA256: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02];
    const ECDSA_SHA384: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x03];
    const ECDSA_SHA512: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x04];
    let alg = match oid {
        o if o == SHA1_RSA || o == SHA256_RSA || o == ECDSA_SHA256 => &digest::SHA256,
        o if o == SHA384_RSA || o == ECDSA_SHA384 => &digest::SHA384,
        o if o == SHA512_RSA || o == ECDSA_SHA512 => &digest::SHA512,
        _ => return None,
    };
    Some(digest::digest(alg, cert_der).as_ref().to_vec())
}

/// Reads one DER TLV at `at`: (tag, value start, value end).
fn tlv(der: &[u8], at: usize) -> Option<(u8, usize, usize)> {
    let tag = *der.get(at)?;
    let first = *der.get(at + 1)? as usize;
    let (len, hdr) = if first < 0x80 {
        (first, 2)
    } else {
        let n = first & 0x7f;
        if n == 0 || n > 4 {
            return None;
        }
        let mut len = 0usize;
        for i in 0..n {
            len = (len << 8) | *der.get(at + 2 + i)? as usize;
        }
        (len, 2 + n)
    };
    let start = at + hdr;
    let end = start.checked_add(len)?;
    (end <= der.len()).then_some((tag, start, end))
}

/// Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm, signature }
fn signature_oid(der: &[u8]) -> Option<&[u8]> {
    let (t, body, _) = tlv(der, 0)?;
    if t != 0x30 {
        return None;
    }
    let (_, _, tbs_end) = tlv(der, body)?;
    let (t, alg_body, _) = tlv(der, tbs_end)?;
    if t != 0x30 {
        return None;
    }
    let (t, oid_start, oid_end) = tlv(der, alg_body)?;
    (t == 0x06).then(|| &der[oid_start..oid_end])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 7677's example exchange, byte for byte.
    #[test]
    fn rfc7677_example_exchange() {
        let salt = B64.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap();
        let v = ScramVerifier::from_password_and_salt("pencil", salt, 4096);
        let mut s = ScramServer::new("user", Some(v), Binding::Plain, b"k");
        s.server_nonce = Some("%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0".into());
        let first = s
            .client_first(MECH, b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO")
            .unwrap();
        assert_eq!(
            first,
            "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
        );
        let fin = s
            .client_final(b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
            .unwrap();
        assert_eq!(fin, "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=");
    }

    fn client_final_for(password: &str, server_first: &str, bare: &str, cbind: &[u8]) -> String {
        let mut it = server_first.split(',');
        let nonce = it.next().unwrap().strip_prefix("r=").unwrap();
        let salt = B64
            .decode(it.next().unwrap().strip_prefix("s=").unwrap())
            .unwrap();
        let iters: u32 = it
            .next()
            .unwrap()
            .strip_prefix("i=")
            .unwrap()
            .parse()
            .unwrap();
        let salted = salted_password(password, &salt, iters);
        let client_key = hmac_sha256(&salted, b"Client Key");
        let stored = sha256(&client_key);
        let without = format!("c={},r={nonce}", B64.encode(cbind));
        let auth = format!("{bare},{server_first},{without}");
        let sig = hmac_sha256(&stored, auth.as_bytes());
        let proof: Vec<u8> = client_key.iter().zip(sig).map(|(a, b)| a ^ b).collect();
        format!("{without},p={}", B64.encode(proof))
    }

    #[test]
    fn wrong_password_and_unknown_user_fail_the_same_way() {
        let v = ScramVerifier::from_password("right", 4096);
        let mut s = ScramServer::new("alice", Some(v), Binding::Plain, b"k");
        let first = s.client_first(MECH, b"n,,n=,r=abc").unwrap();
        let e = s
            .client_final(client_final_for("wrong", &first, "n=,r=abc", b"n,,").as_bytes())
            .unwrap_err();
        assert_eq!(e.code, "28P01");

        let mut s = ScramServer::new("mallory", None, Binding::Plain, b"k");
        let first = s.client_first(MECH, b"n,,n=,r=abc").unwrap();
        // The fake salt is stable per name (no probing by salt changes).
        let again = ScramServer::new("mallory", None, Binding::Plain, b"k")
            .client_first(MECH, b"n,,n=,r=abc")
            .unwrap();
        assert_eq!(first.split(',').nth(1), again.split(',').nth(1));
        let e = s
            .client_final(client_final_for("x", &first, "n=,r=abc", b"n,,").as_bytes())
            .unwrap_err();
        assert_eq!(e.code, "28P01");
        assert!(e.message.contains("mallory"));
    }

    #[test]
    fn channel_binding_must_match_our_certificate() {
        let v = ScramVerifier::from_password("pw", 4096);
        let hash = vec![7u8; 32];
        // Right binding data: accepted.
        let mut s = ScramServer::new("u", Some(v.clone()), Binding::Tls(hash.clone()), b"k");
        let first = s
            .client_first(MECH_PLUS, b"p=tls-server-end-point,,n=,r=x")
            .unwrap();
        let mut cb = b"p=tls-server-end-point,,".to_vec();
        cb.extend_from_slice(&hash);
        assert!(s
            .client_final(client_final_for("pw", &first, "n=,r=x", &cb).as_bytes())
            .is_ok());
        // Another certificate's hash (a relaying proxy): refused.
        let mut s = ScramServer::new("u", Some(v.clone()), Binding::Tls(hash.clone()), b"k");
        let first = s
            .client_first(MECH_PLUS, b"p=tls-server-end-point,,n=,r=x")
            .unwrap();
        let mut cb = b"p=tls-server-end-point,,".to_vec();
        cb.extend_from_slice(&[8u8; 32]);
        let e = s
            .client_final(client_final_for("pw", &first, "n=,r=x", &cb).as_bytes())
            .unwrap_err();
        assert_eq!(e.code, "28000");
        // -PLUS over plaintext is not offered; 'y' over TLS is a downgrade.
        let mut s = ScramServer::new("u", Some(v.clone()), Binding::Plain, b"k");
        assert_eq!(
            s.client_first(MECH_PLUS, b"p=tls-server-end-point,,n=,r=x")
                .unwrap_err()
                .code,
            "28000"
        );
        let mut s = ScramServer::new("u", Some(v), Binding::Tls(hash), b"k");
        assert_eq!(
            s.client_first(MECH, b"y,,n=,r=x").unwrap_err().code,
            "28000"
        );
    }

    #[test]
    fn verifier_round_trips_and_rejects_garbage() {
        let v = ScramVerifier::from_password("pw", 4096);
        let s = v.encode();
        assert!(s.starts_with("SCRAM-SHA-256$4096:"));
        assert_eq!(ScramVerifier::parse(&s).unwrap().encode(), s);
        assert!(ScramVerifier::parse("md5abc").is_none());
        assert!(ScramVerifier::parse("SCRAM-SHA-256$0:AA==$AA==:AA==").is_none());
        assert!(!format!("{v:?}").contains(&B64.encode(&*v.stored_key)));
    }

    #[test]
    fn malformed_messages_are_protocol_errors() {
        let v = ScramVerifier::from_password("pw", 4096);
        let mut s = ScramServer::new("u", Some(v), Binding::Plain, b"k");
        assert_eq!(s.client_first(MECH, b"garbage").unwrap_err().code, "08P01");
        assert_eq!(
            s.client_first(MECH, b"n,,n=,x=1").unwrap_err().code,
            "08P01"
        );
        assert_eq!(
            s.client_first(MECH, &[0xff, 0xfe]).unwrap_err().code,
            "08P01"
        );
    }
}
