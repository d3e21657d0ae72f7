//! The vault master key and sealing of secrets at rest.
//!
//! The master key is never stored in the data directory: it comes from a key
//! file kept elsewhere (`init-key` writes one) or from a passphrase
//! stretched with PBKDF2-HMAC-SHA256 and a salt that is stored in the
//! database. Purpose keys are derived from it with HKDF, and every sealed
//! blob is AES-256-GCM with a random nonce and the blob's identity as AAD,
//! so a sealed private key cannot be moved to another key name or version.

use std::num::NonZeroU32;
use std::path::Path;

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use aws_lc_rs::hkdf;
use aws_lc_rs::pbkdf2;
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

use crate::error::VaultError;

pub const PBKDF2_ITERATIONS: u32 = 600_000;

/// 256-bit root secret; zeroized on drop, never printed.
pub struct MasterKey(Zeroizing<[u8; 32]>);

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(redacted)")
    }
}

pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    SystemRandom::new()
        .fill(&mut b)
        .expect("system random generator failed");
    b
}

impl MasterKey {
    pub fn from_bytes(b: [u8; 32]) -> Self {
        MasterKey(Zeroizing::new(b))
    }

    /// Reads a key file: 64 hex characters (what `init-key` writes).
    pub fn from_key_file(path: &Path) -> Result<Self, VaultError> {
        let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|e| {
            VaultError::Unseal(format!(
                "cannot read unseal key file {}: {e}",
                path.display()
            ))
        })?);
        let bytes = Zeroizing::new(hex::decode(text.trim()).map_err(|_| {
            VaultError::Unseal(format!("unseal key file {} is not hex", path.display()))
        })?);
        let arr: [u8; 32] = bytes.as_slice().try_into().map_err(|_| {
            VaultError::Unseal(format!(
                "unseal key file {} must hold 32 bytes (64 hex characters)",
                path.display()
            ))
        })?;
        Ok(MasterKey::from_bytes(arr))
    }

    /// Writes a new random key file with mode 0600; refuses to overwrite.
    pub fn create_key_file(path: &Path) -> Result<(), VaultError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let key = Zeroizing::new(hex::encode(random_bytes::<32>()));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)?;
        f.write_all(key.as_bytes())?;
        f.write_all(b"\n")?;
        f.sync_all()?;
        Ok(())
    }

    pub fn from_passphrase(pass: &[u8], salt: &[u8]) -> Self {
        let mut out = [0u8; 32];
        pbkdf2::derive(
            pbkdf2::PBKDF2_HMAC_SHA256,
            NonZeroU32::new(PBKDF2_ITERATIONS).expect("nonzero"),
            salt,
            pass,
            &mut out,
        );
        MasterKey::from_bytes(out)
    }

    /// A purpose key: HKDF-SHA256(master, info=label).
    pub fn derive(&self, label: &str) -> SealKey {
        struct Len32;
        impl hkdf::KeyType for Len32 {
            fn len(&self) -> usize {
                32
            }
        }
        let salt = hkdf::Salt::new(hkdf::HKDF_SHA256, b"atrest-vault");
        let prk = salt.extract(&self.0[..]);
        let info = [label.as_bytes()];
        let okm = prk.expand(&info, Len32).expect("hkdf length is valid");
        let mut k = Zeroizing::new([0u8; 32]);
        okm.fill(&mut k[..]).expect("hkdf fill");
        SealKey(k)
    }
}

/// An AES-256-GCM key for one purpose.
pub struct SealKey(Zeroizing<[u8; 32]>);

impl std::fmt::Debug for SealKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SealKey(redacted)")
    }
}

impl SealKey {
    fn key(&self) -> LessSafeKey {
        LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &self.0[..]).expect("32-byte key"))
    }

    /// `nonce || ciphertext || tag`.
    pub fn seal(&self, aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
        let nonce_bytes = random_bytes::<NONCE_LEN>();
        let mut buf = plaintext.to_vec();
        self.key()
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce_bytes),
                Aad::from(aad),
                &mut buf,
            )
            .expect("AES-GCM seal");
        let mut out = nonce_bytes.to_vec();
        out.extend_from_slice(&buf);
        buf.iter_mut().for_each(|b| *b = 0);
        out
    }

    pub fn open(&self, aad: &[u8], sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, VaultError> {
        if sealed.len() < NONCE_LEN + 16 {
            return Err(VaultError::Crypto("sealed blob too short"));
        }
        let nonce = Nonce::try_assume_unique_for_key(&sealed[..NONCE_LEN])
            .map_err(|_| VaultError::Crypto("bad nonce"))?;
        let mut buf = Zeroizing::new(sealed[NONCE_LEN..].to_vec());
        let n = self
            .key()
            .open_in_place(nonce, Aad::from(aad), &mut buf)
            .map_err(|_| VaultError::Crypto("sealed blob failed authentication"))?
            .len();
        buf.truncate(n);
        Ok(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_binds_aad_and_key() {
        let m = MasterKey::from_bytes([7u8; 32]);
        let k = m.derive("seal");
        let blob = k.seal(b"keys/a/1", b"secret");
        assert_eq!(&k.open(b"keys/a/1", &blob).unwrap()[..], b"secret");
        assert!(k.open(b"keys/a/2", &blob).is_err());
        assert!(m.derive("other").open(b"keys/a/1", &blob).is_err());
        let mut bad = blob.clone();
        bad[20] ^= 1;
        assert!(k.open(b"keys/a/1", &bad).is_err());
        assert!(k.open(b"", &blob[..10]).is_err());
    }

    #[test]
    fn key_file_roundtrip_and_no_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("unseal.key");
        MasterKey::create_key_file(&p).unwrap();
        assert!(MasterKey::create_key_file(&p).is_err());
        let a = MasterKey::from_key_file(&p).unwrap();
        let b = MasterKey::from_key_file(&p).unwrap();
        let blob = a.derive("x").seal(b"", b"v");
        assert!(b.derive("x").open(b"", &blob).is_ok());
        std::fs::write(&p, "abcd").unwrap();
        assert!(MasterKey::from_key_file(&p).is_err());
        assert!(!format!("{a:?}").contains("07"));
    }

    #[test]
    fn passphrase_depends_on_salt() {
        let a = MasterKey::from_passphrase(b"pw", b"salt-one-1234567");
        let b = MasterKey::from_passphrase(b"pw", b"salt-two-1234567");
        let blob = a.derive("x").seal(b"", b"v");
        assert!(b.derive("x").open(b"", &blob).is_err());
    }
}
