//! BYOK import: PKCS#8 (PEM or DER) and PKCS#12 (.pfx) files are turned
//! into the JSON web key that Azure's import API takes, on the operator's
//! side (the CLI), so the REST API stays Azure's.
//!
//! PKCS#12 support covers what current tools write (OpenSSL 3 defaults):
//! a shrouded key bag under PBES2 (PBKDF2-HMAC-SHA256/SHA-1, AES-128/192/
//! 256-CBC), and the file's HMAC (PKCS#12 KDF, SHA-256 or SHA-1) is checked
//! so a wrong password or an altered file is refused. Legacy 3DES/RC2
//! encryption is refused with a way out.

use std::num::NonZeroU32;

use aws_lc_rs::cipher::{
    DecryptionContext, PaddedBlockDecryptingKey, UnboundCipherKey, AES_128, AES_192, AES_256,
};
use aws_lc_rs::digest;
use aws_lc_rs::hmac;
use aws_lc_rs::iv::FixedLength;
use aws_lc_rs::pbkdf2;
use serde_json::{json, Value};
use zeroize::Zeroizing;

use crate::b64;
use crate::der::{children, expect, read_tlv, unsigned, Tlv};
use crate::error::ApiError;

fn bad(msg: &str) -> ApiError {
    ApiError::bad_parameter(msg.to_string())
}

const OID_DATA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x07, 0x01];
const OID_KEY_BAG: &[u8] = &[
    0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x0c, 0x0a, 0x01, 0x01,
];
const OID_SHROUDED_BAG: &[u8] = &[
    0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x0c, 0x0a, 0x01, 0x02,
];
const OID_PBES2: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x05, 0x0d];
const OID_PBKDF2: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x05, 0x0c];
const OID_HMAC_SHA1: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x02, 0x07];
const OID_HMAC_SHA256: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x02, 0x09];
const OID_AES128_CBC: &[u8] = &[0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x01, 0x02];
const OID_AES192_CBC: &[u8] = &[0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x01, 0x16];
const OID_AES256_CBC: &[u8] = &[0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x01, 0x2a];
const OID_SHA1: &[u8] = &[0x2b, 0x0e, 0x03, 0x02, 0x1a];
const OID_SHA256: &[u8] = &[0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01];

fn seq(v: &[u8]) -> Result<Vec<Tlv<'_>>, ApiError> {
    children(v).map_err(|_| bad("the key file is malformed (DER)"))
}

/// The i-th child, or a clear error instead of a panic on short input.
fn at<'a>(v: &'a [Tlv<'a>], i: usize) -> Result<&'a Tlv<'a>, ApiError> {
    v.get(i)
        .ok_or_else(|| bad("the key file is malformed (missing element)"))
}

fn int_u64(t: &Tlv<'_>) -> Result<u64, ApiError> {
    if t.tag != 0x02 || t.value.is_empty() || t.value.len() > 8 {
        return Err(bad("the key file is malformed (integer)"));
    }
    Ok(t.value.iter().fold(0u64, |a, b| (a << 8) | *b as u64))
}

/// The private JWK (n e d p q dp dq qi) of an unencrypted PKCS#8 RSA key.
pub fn pkcs8_to_jwk(pkcs8: &[u8]) -> Result<Value, ApiError> {
    // Validate with aws-lc-rs first: only a real RSA key gets this far.
    crate::keys::RsaKey::from_pkcs8(pkcs8)?;
    let outer = seq(expect(pkcs8, 0x30).map_err(|_| bad("not a PKCS#8 key"))?)?;
    if outer.len() < 3 || outer[2].tag != 0x04 {
        return Err(bad("not a PKCS#8 key"));
    }
    let inner = seq(expect(outer[2].value, 0x30).map_err(|_| bad("not an RSA private key"))?)?;
    if inner.len() < 9 || inner.iter().take(9).any(|t| t.tag != 0x02) {
        return Err(bad("not a two-prime RSA private key"));
    }
    let f = |i: usize| b64::encode(unsigned(inner[i].value));
    Ok(json!({
        "kty": "RSA", "n": f(1), "e": f(2), "d": f(3), "p": f(4), "q": f(5),
        "dp": f(6), "dq": f(7), "qi": f(8),
    }))
}

/// PKCS#12 KDF (RFC 7292 appendix B) for the MAC key (ID 3).
fn pkcs12_kdf(
    alg: &'static digest::Algorithm,
    password: &str,
    salt: &[u8],
    iterations: u32,
    out_len: usize,
) -> Zeroizing<Vec<u8>> {
    let v = 64usize;
    let mut pw = Zeroizing::new(Vec::new());
    for u in password.encode_utf16() {
        pw.extend_from_slice(&u.to_be_bytes());
    }
    pw.extend_from_slice(&[0, 0]);
    let fill = |src: &[u8]| -> Vec<u8> {
        if src.is_empty() {
            return vec![];
        }
        let n = v * src.len().div_ceil(v);
        (0..n).map(|i| src[i % src.len()]).collect()
    };
    let mut input = Zeroizing::new(vec![3u8; v]);
    input.extend(fill(salt));
    input.extend(fill(&pw));
    let mut a = digest::digest(alg, &input).as_ref().to_vec();
    for _ in 1..iterations {
        a = digest::digest(alg, &a).as_ref().to_vec();
    }
    a.truncate(out_len);
    Zeroizing::new(a)
}

fn decrypt_pbes2(
    params: &[u8],
    ciphertext: &[u8],
    password: &str,
) -> Result<Zeroizing<Vec<u8>>, ApiError> {
    let p = seq(params)?;
    if p.len() != 2 {
        return Err(bad("malformed PBES2 parameters"));
    }
    let kdf = seq(p[0].value)?;
    let enc = seq(p[1].value)?;
    if kdf.len() != 2 || kdf[0].value != OID_PBKDF2 || enc.len() != 2 {
        return Err(bad("PKCS#12 key encryption must be PBES2 with PBKDF2"));
    }
    let kp = seq(kdf[1].value)?;
    if kp.len() < 2 || kp[0].tag != 0x04 {
        return Err(bad("malformed PBKDF2 parameters"));
    }
    let salt = kp[0].value;
    let iterations = int_u64(&kp[1])?;
    let prf = kp
        .iter()
        .skip(2)
        .find(|t| t.tag == 0x30)
        .map(|t| seq(t.value))
        .transpose()?
        .and_then(|s| s.first().map(|o| o.value.to_vec()));
    let prf = match prf.as_deref() {
        None | Some(OID_HMAC_SHA1) => pbkdf2::PBKDF2_HMAC_SHA1,
        Some(OID_HMAC_SHA256) => pbkdf2::PBKDF2_HMAC_SHA256,
        Some(_) => return Err(bad("unsupported PBKDF2 PRF; use HMAC-SHA256")),
    };
    let (alg, klen) = match enc[0].value {
        OID_AES128_CBC => (&AES_128, 16),
        OID_AES192_CBC => (&AES_192, 24),
        OID_AES256_CBC => (&AES_256, 32),
        _ => {
            return Err(bad(
                "unsupported PKCS#12 cipher; re-export with -keypbe AES-256-CBC",
            ))
        }
    };
    if enc[1].tag != 0x04 || enc[1].value.len() != 16 {
        return Err(bad("malformed AES-CBC IV"));
    }
    let iterations =
        NonZeroU32::new(u32::try_from(iterations).map_err(|_| bad("iteration count too large"))?)
            .ok_or_else(|| bad("iteration count is zero"))?;
    let mut key = Zeroizing::new(vec![0u8; klen]);
    pbkdf2::derive(prf, iterations, salt, password.as_bytes(), &mut key);
    let dk = PaddedBlockDecryptingKey::cbc_pkcs7(
        UnboundCipherKey::new(alg, &key).map_err(|_| bad("cipher setup failed"))?,
    )
    .map_err(|_| bad("cipher setup failed"))?;
    let iv: [u8; 16] = enc[1].value.try_into().map_err(|_| bad("malformed IV"))?;
    let mut buf = Zeroizing::new(ciphertext.to_vec());
    let n = dk
        .decrypt(&mut buf, DecryptionContext::Iv128(FixedLength::from(iv)))
        .map_err(|_| bad("the PKCS#12 key could not be decrypted (wrong password?)"))?
        .len();
    buf.truncate(n);
    Ok(buf)
}

/// Extracts the (first) private key of a PKCS#12 file as PKCS#8 DER.
pub fn pkcs12_to_pkcs8(pfx: &[u8], password: &str) -> Result<Zeroizing<Vec<u8>>, ApiError> {
    let top = seq(expect(pfx, 0x30).map_err(|_| bad("not a PKCS#12 file"))?)?;
    if top.len() < 2 || int_u64(&top[0])? != 3 {
        return Err(bad("not a PKCS#12 (version 3) file"));
    }
    let ci = seq(top[1].value)?;
    if ci.len() != 2 || ci[0].value != OID_DATA {
        return Err(bad(
            "PKCS#12 files protected by public-key integrity are not supported",
        ));
    }
    let auth_safe = expect(ci[1].value, 0x04).map_err(|_| bad("malformed PKCS#12 content"))?;
    // Integrity: the HMAC over the authenticated safe.
    let mac = top
        .get(2)
        .ok_or_else(|| bad("the PKCS#12 file has no MAC; refusing an unauthenticated key file"))?;
    let md = seq(mac.value)?;
    let digest_info = seq(at(&md, 0)?.value)?;
    let mac_alg = seq(at(&digest_info, 0)?.value)?;
    let (dalg, halg) = match at(&mac_alg, 0)?.value {
        OID_SHA256 => (&digest::SHA256, hmac::HMAC_SHA256),
        OID_SHA1 => (
            &digest::SHA1_FOR_LEGACY_USE_ONLY,
            hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY,
        ),
        _ => return Err(bad("unsupported PKCS#12 MAC algorithm; use SHA-256")),
    };
    let mac_salt = md
        .get(1)
        .filter(|t| t.tag == 0x04)
        .ok_or_else(|| bad("malformed PKCS#12 MAC"))?
        .value;
    let iters = match md.get(2) {
        Some(t) => int_u64(t)? as u32,
        None => 1,
    };
    if iters == 0 || iters > 10_000_000 {
        return Err(bad("unreasonable PKCS#12 MAC iteration count"));
    }
    let mac_key = pkcs12_kdf(dalg, password, mac_salt, iters, dalg.output_len());
    let expected = at(&digest_info, 1)?.value;
    hmac::verify(&hmac::Key::new(halg, &mac_key), auth_safe, expected)
        .map_err(|_| bad("the PKCS#12 MAC does not verify: wrong password or altered file"))?;

    for content in seq(expect(auth_safe, 0x30).map_err(|_| bad("malformed PKCS#12 content"))?)? {
        let c = seq(content.value)?;
        if c.len() != 2 || c[0].value != OID_DATA {
            // encryptedData holds the certificates; the key is not there
            // in the files current tools write.
            continue;
        }
        let safe = expect(c[1].value, 0x04).map_err(|_| bad("malformed PKCS#12 bag"))?;
        for bag in seq(expect(safe, 0x30).map_err(|_| bad("malformed PKCS#12 bag"))?)? {
            let b = seq(bag.value)?;
            if b.len() < 2 {
                continue;
            }
            let (val, _) = read_tlv(b[1].value).map_err(|_| bad("malformed PKCS#12 bag"))?;
            if b[0].value == OID_KEY_BAG {
                return Ok(Zeroizing::new(crate::der::encode(0x30, val.value)));
            }
            if b[0].value == OID_SHROUDED_BAG {
                let epki = seq(val.value)?;
                let alg = seq(at(&epki, 0)?.value)?;
                if at(&alg, 0)?.value != OID_PBES2 {
                    return Err(bad(
                        "legacy PKCS#12 key encryption (3DES/RC2) is not supported; re-export with: openssl pkcs12 -export -keypbe AES-256-CBC -macalg sha256",
                    ));
                }
                return decrypt_pbes2(at(&alg, 1)?.value, at(&epki, 1)?.value, password);
            }
        }
    }
    Err(bad("no private key found in the PKCS#12 file"))
}

/// Reads a key file (PKCS#8 PEM/DER or PKCS#12) into an importable JWK.
pub fn file_to_jwk(bytes: &[u8], password: Option<&str>) -> Result<Value, ApiError> {
    if bytes.starts_with(b"-----") {
        let der = crate::keys::pkcs8_from_pem_or_der(bytes)?;
        return pkcs8_to_jwk(&der);
    }
    // DER: a PKCS#8 key, or a PFX (whose first element is INTEGER 3).
    if let Ok(top) = expect(bytes, 0x30).and_then(children) {
        if top.len() >= 2 && top[0].tag == 0x02 && top[0].value == [3] && top[1].tag == 0x30 {
            let pkcs8 = pkcs12_to_pkcs8(bytes, password.unwrap_or(""))?;
            return pkcs8_to_jwk(&pkcs8);
        }
    }
    pkcs8_to_jwk(bytes)
}

/// A fresh RSA-2048 key as a private JWK (for tests of the import path).
pub fn generate_test_jwk() -> Value {
    let k = crate::keys::RsaKey::generate(2048).expect("keygen");
    pkcs8_to_jwk(k.pkcs8()).expect("jwk")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::{EncAlg, RsaKey};

    #[test]
    fn pkcs8_jwk_roundtrip_is_the_same_key() {
        let k = RsaKey::generate(2048).unwrap();
        let jwk = pkcs8_to_jwk(k.pkcs8()).unwrap();
        let k2 = RsaKey::from_jwk(&jwk).unwrap();
        let ct = k.encrypt(EncAlg::RsaOaep256, b"dek").unwrap();
        assert_eq!(&k2.decrypt(EncAlg::RsaOaep256, &ct).unwrap()[..], b"dek");
        assert!(pkcs8_to_jwk(b"\x30\x03\x02\x01\x00").is_err());
    }

    fn openssl() -> bool {
        std::process::Command::new("openssl")
            .arg("version")
            .output()
            .is_ok_and(|o| o.status.success())
    }

    #[test]
    fn openssl_pkcs12_and_pem_import() {
        if !openssl() {
            assert!(
                std::env::var_os("CI").is_none(),
                "openssl is needed in CI (setup-test-deps.sh installs it)"
            );
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let p = |n: &str| d.path().join(n).to_str().unwrap().to_string();
        let run = |args: &[&str]| {
            let o = std::process::Command::new("openssl")
                .args(args)
                .output()
                .unwrap();
            assert!(
                o.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        };
        run(&[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
            &p("k.pem"),
        ]);
        run(&[
            "req",
            "-new",
            "-x509",
            "-key",
            &p("k.pem"),
            "-subj",
            "/CN=t",
            "-days",
            "1",
            "-out",
            &p("c.pem"),
        ]);
        run(&[
            "pkcs12",
            "-export",
            "-inkey",
            &p("k.pem"),
            "-in",
            &p("c.pem"),
            "-passout",
            "pass:pw",
            "-keypbe",
            "AES-256-CBC",
            "-certpbe",
            "AES-256-CBC",
            "-macalg",
            "sha256",
            "-out",
            &p("k.pfx"),
        ]);
        run(&[
            "pkcs8",
            "-topk8",
            "-nocrypt",
            "-in",
            &p("k.pem"),
            "-outform",
            "DER",
            "-out",
            &p("k.der"),
        ]);
        let pem = std::fs::read(p("k.pem")).unwrap();
        let der = std::fs::read(p("k.der")).unwrap();
        let pfx = std::fs::read(p("k.pfx")).unwrap();
        let a = file_to_jwk(&pem, None).unwrap();
        let b = file_to_jwk(&der, None).unwrap();
        let c = file_to_jwk(&pfx, Some("pw")).unwrap();
        assert_eq!(a, b);
        assert_eq!(a, c);
        let e = file_to_jwk(&pfx, Some("wrong")).unwrap_err();
        assert!(e.message.contains("wrong password"), "{}", e.message);
        let mut altered = pfx.clone();
        let n = altered.len() / 2;
        altered[n] ^= 1;
        assert_eq!(file_to_jwk(&altered, Some("pw")).unwrap_err().status, 400);
        // Malformed input never panics: every truncation, and bit flips
        // spread over the file, give a clear error (or, for flips in
        // ignored certificate data, the same key).
        for len in 0..pfx.len() {
            let r = file_to_jwk(&pfx[..len], Some("pw"));
            assert!(
                r.is_err() || r.as_ref().ok() == Some(&a),
                "truncated to {len}"
            );
        }
        for i in (0..pfx.len()).step_by(5) {
            let mut m = pfx.clone();
            m[i] ^= 0x41;
            if let Ok(j) = file_to_jwk(&m, Some("pw")) {
                assert_eq!(j, a, "flip at {i} changed the key");
            }
        }
        for i in (0..der.len()).step_by(3) {
            let mut m = der.clone();
            m[i] ^= 0x41;
            let _ = file_to_jwk(&m, None);
        }
    }
}
