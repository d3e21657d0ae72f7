//! Wrapping a DEK under a symmetric 256-bit key (the service key, or a
//! companion file's parent key) with AES-256-GCM.

use aws_lc_rs::aead::{Aad, Nonce, RandomizedNonceKey, AES_256_GCM, NONCE_LEN};
use zeroize::Zeroizing;

use crate::{CryptoError, Dek, DekId};

/// Nonce (12) + wrapped key (32) + tag (16).
pub const WRAPPED_LEN: usize = NONCE_LEN + 32 + 16;

/// A symmetric key-encryption key. The raw bytes are not kept after setup.
pub struct SymmetricKek {
    key: RandomizedNonceKey,
}

impl SymmetricKek {
    pub fn new(bytes: &[u8; 32]) -> Result<Self, CryptoError> {
        let key = RandomizedNonceKey::new(&AES_256_GCM, bytes)
            .map_err(|_| CryptoError::Library("AES-256-GCM key setup"))?;
        Ok(Self { key })
    }

    /// Wraps `dek`. `binding` is authenticated with it (for example the KEK
    /// reference), so a wrapped key only unwraps in the context it was made for.
    pub fn wrap(&self, dek: &Dek, binding: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let mut buf = Zeroizing::new(*dek.expose_secret());
        let aad = aad(dek.id(), binding);
        let (nonce, tag) = self
            .key
            .seal_in_place_separate_tag(Aad::from(&aad[..]), &mut buf[..])
            .map_err(|_| CryptoError::Library("AES-256-GCM wrap"))?;
        let mut out = Vec::with_capacity(WRAPPED_LEN);
        out.extend_from_slice(nonce.as_ref());
        out.extend_from_slice(&buf[..]);
        out.extend_from_slice(tag.as_ref());
        Ok(out)
    }

    /// Unwraps a key made by [`Self::wrap`] with the same `dek_id` and `binding`.
    pub fn unwrap(
        &self,
        dek_id: DekId,
        wrapped: &[u8],
        binding: &[u8],
    ) -> Result<Dek, CryptoError> {
        if wrapped.len() != WRAPPED_LEN {
            return Err(CryptoError::AuthenticationFailed);
        }
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&wrapped[..NONCE_LEN]);
        let mut buf = Zeroizing::new([0u8; 48]);
        buf.copy_from_slice(&wrapped[NONCE_LEN..]);
        let aad = aad(dek_id, binding);
        self.key
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&aad[..]),
                &mut buf[..],
            )
            .map_err(|_| CryptoError::AuthenticationFailed)?;
        let mut key = Zeroizing::new([0u8; 32]);
        key.copy_from_slice(&buf[..32]);
        Ok(Dek::from_parts(dek_id, &key))
    }
}

fn aad(dek_id: DekId, binding: &[u8]) -> Vec<u8> {
    let mut a = Vec::with_capacity(32 + binding.len());
    a.extend_from_slice(b"ATRWRAP1");
    a.extend_from_slice(&dek_id.0);
    a.extend_from_slice(binding);
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrap_round_trip_and_bindings() {
        let kek = SymmetricKek::new(&[1; 32]).unwrap();
        let dek = Dek::generate().unwrap();
        let w = kek.wrap(&dek, b"ctx").unwrap();
        assert_eq!(w.len(), WRAPPED_LEN);
        assert!(!w.windows(32).any(|x| x == dek.expose_secret()));
        let back = kek.unwrap(dek.id(), &w, b"ctx").unwrap();
        assert_eq!(back.expose_secret(), dek.expose_secret());

        assert!(kek.unwrap(dek.id(), &w, b"other").is_err());
        assert!(kek.unwrap(DekId([0; 16]), &w, b"ctx").is_err());
        let other = SymmetricKek::new(&[2; 32]).unwrap();
        assert!(other.unwrap(dek.id(), &w, b"ctx").is_err());
        let mut bad = w.clone();
        bad[20] ^= 0x80;
        assert!(kek.unwrap(dek.id(), &bad, b"ctx").is_err());
        assert!(kek.unwrap(dek.id(), &w[..59], b"ctx").is_err());
    }
}
