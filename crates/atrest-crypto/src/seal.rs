//! Sealing one unit (a database page, a WAL frame header, a block of a
//! journal) with AES-256-GCM.
//!
//! A sealed unit keeps its length: the last [`SEAL_OVERHEAD`] bytes of the
//! buffer hold the tag and the nonce, the rest is ciphertext. For database
//! pages those bytes are SQLite's reserved bytes, so a sealed page is
//! exactly one page on disk.
//!
//! ```text
//! | ciphertext (len - 28) | tag (16) | nonce (12) |
//! ```
//!
//! Nonces are 96-bit random values drawn by AWS-LC itself (the FIPS-approved
//! internal IV construction); see docs/CRYPTO.md for the usage limit.

use std::sync::atomic::{AtomicU64, Ordering};

use aws_lc_rs::aead::{Aad, Nonce, RandomizedNonceKey, AES_256_GCM, NONCE_LEN};

use crate::{CryptoError, Dek, DekId, FileId, FileKind};

/// Tag (16) plus nonce (12) bytes at the end of every sealed unit.
pub const SEAL_OVERHEAD: usize = 28;
const TAG_LEN: usize = 16;

/// Units one DEK may seal before it must be replaced: 2^32, the NIST SP
/// 800-38D §8.3 bound for random 96-bit IVs (collision chance below 2^-32).
pub const SEAL_USAGE_LIMIT: u64 = 1 << 32;
/// Past this many seals atrest warns that the DEK should be rotated.
pub const SEAL_USAGE_WARN: u64 = 1 << 31;

/// The cipher suite recorded in file headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum CipherId {
    /// AES-256-GCM, random 96-bit nonce, 128-bit tag, 64-byte AAD.
    Aes256GcmRandomNonce = 1,
}

impl CipherId {
    pub fn from_u8(v: u8) -> Option<Self> {
        (v == 1).then_some(Self::Aes256GcmRandomNonce)
    }
    pub fn name(self) -> &'static str {
        match self {
            Self::Aes256GcmRandomNonce => "AES-256-GCM",
        }
    }
}

/// Where a unit lives. Everything here is bound as associated data, so a
/// unit copied to another index, class, file or key fails to open.
#[derive(Debug, Clone, Copy)]
pub struct SealContext {
    pub file_id: FileId,
    pub kind: FileKind,
    /// What the unit is within its file (page, WAL header, frame header, block).
    pub class: u16,
    /// Page number, frame number or block number.
    pub index: u64,
    /// A generation the unit belongs to (the WAL salts), or 0.
    pub generation: u64,
}

impl SealContext {
    fn aad(&self, cipher: CipherId, dek_id: DekId, unit_len: usize) -> [u8; 64] {
        let mut a = [0u8; 64];
        a[0..8].copy_from_slice(b"ATRSEAL1");
        a[8] = cipher as u8;
        a[9] = self.kind as u8;
        a[10..26].copy_from_slice(&self.file_id.0);
        a[26..42].copy_from_slice(&dek_id.0);
        a[42..50].copy_from_slice(&self.index.to_be_bytes());
        a[50..54].copy_from_slice(&(unit_len as u32).to_be_bytes());
        a[54..62].copy_from_slice(&self.generation.to_be_bytes());
        a[62..64].copy_from_slice(&self.class.to_be_bytes());
        a
    }
}

/// A DEK made ready for sealing units, with its usage counter.
pub struct UnitKey {
    key: RandomizedNonceKey,
    dek_id: DekId,
    sealed: AtomicU64,
}

impl UnitKey {
    /// Prepares `dek`; `already_sealed` is the count recorded for it so far.
    pub fn new(dek: &Dek, already_sealed: u64) -> Result<Self, CryptoError> {
        let key = RandomizedNonceKey::new(&AES_256_GCM, dek.expose_secret())
            .map_err(|_| CryptoError::Library("AES-256-GCM key setup"))?;
        Ok(Self {
            key,
            dek_id: dek.id(),
            sealed: AtomicU64::new(already_sealed),
        })
    }

    pub fn dek_id(&self) -> DekId {
        self.dek_id
    }

    pub fn cipher(&self) -> CipherId {
        CipherId::Aes256GcmRandomNonce
    }

    /// Units sealed under this key so far (including earlier processes).
    pub fn sealed_count(&self) -> u64 {
        self.sealed.load(Ordering::Relaxed)
    }

    /// Seals `unit` in place: its first `len - 28` bytes are the plaintext,
    /// the last 28 are overwritten with tag and nonce.
    pub fn seal(&self, ctx: &SealContext, unit: &mut [u8]) -> Result<(), CryptoError> {
        let len = unit.len();
        if len < SEAL_OVERHEAD {
            return Err(CryptoError::UnitTooShort {
                len,
                min: SEAL_OVERHEAD,
            });
        }
        let count = self.sealed.fetch_add(1, Ordering::Relaxed);
        if count >= SEAL_USAGE_LIMIT {
            self.sealed.fetch_sub(1, Ordering::Relaxed);
            return Err(CryptoError::UsageLimitReached {
                dek_id: self.dek_id.to_hex(),
                count,
            });
        }
        let aad = ctx.aad(self.cipher(), self.dek_id, len);
        let (body, trailer) = unit.split_at_mut(len - SEAL_OVERHEAD);
        let (nonce, tag) = self
            .key
            .seal_in_place_separate_tag(Aad::from(aad), body)
            .map_err(|_| CryptoError::Library("AES-256-GCM seal"))?;
        trailer[..TAG_LEN].copy_from_slice(tag.as_ref());
        trailer[TAG_LEN..].copy_from_slice(nonce.as_ref());
        Ok(())
    }

    /// Opens a sealed unit in place. On success the first `len - 28` bytes
    /// are plaintext and the trailer is zeroed (SQLite sees zero reserved
    /// bytes). On failure the buffer content is unspecified and must not be
    /// used.
    pub fn open(&self, ctx: &SealContext, unit: &mut [u8]) -> Result<(), CryptoError> {
        let len = unit.len();
        if len < SEAL_OVERHEAD {
            return Err(CryptoError::UnitTooShort {
                len,
                min: SEAL_OVERHEAD,
            });
        }
        let aad = ctx.aad(self.cipher(), self.dek_id, len);
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&unit[len - NONCE_LEN..]);
        let nonce = Nonce::assume_unique_for_key(nonce);
        let ok = self
            .key
            .open_in_place(nonce, Aad::from(aad), &mut unit[..len - NONCE_LEN])
            .is_ok();
        unit[len - SEAL_OVERHEAD..].fill(0);
        if ok {
            Ok(())
        } else {
            Err(CryptoError::AuthenticationFailed)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(index: u64) -> SealContext {
        SealContext {
            file_id: FileId([7; 16]),
            kind: FileKind::MainDb,
            class: 1,
            index,
            generation: 0,
        }
    }

    fn sealed_page(key: &UnitKey, index: u64) -> Vec<u8> {
        let mut page = vec![0u8; 4096];
        page[..11].copy_from_slice(b"hello pages");
        key.seal(&ctx(index), &mut page).unwrap();
        page
    }

    #[test]
    fn round_trip_keeps_length_and_zeroes_trailer() {
        let key = UnitKey::new(&Dek::generate().unwrap(), 0).unwrap();
        let mut page = sealed_page(&key, 3);
        assert_eq!(page.len(), 4096);
        assert!(!page.windows(11).any(|w| w == b"hello pages"));
        key.open(&ctx(3), &mut page).unwrap();
        assert_eq!(&page[..11], b"hello pages");
        assert!(page[4096 - SEAL_OVERHEAD..].iter().all(|&b| b == 0));
        assert_eq!(key.sealed_count(), 1);
    }

    #[test]
    fn every_bit_flip_is_detected() {
        let key = UnitKey::new(&Dek::generate().unwrap(), 0).unwrap();
        let page = sealed_page(&key, 1);
        // Every byte position, one bit each: ciphertext, tag and nonce.
        for pos in 0..page.len() {
            let mut bad = page.clone();
            bad[pos] ^= 1 << (pos % 8);
            assert_eq!(
                key.open(&ctx(1), &mut bad),
                Err(CryptoError::AuthenticationFailed),
                "byte {pos}"
            );
        }
    }

    #[test]
    fn moved_unit_fails_to_open() {
        let key = UnitKey::new(&Dek::generate().unwrap(), 0).unwrap();
        let page = sealed_page(&key, 5);
        let variants = [
            SealContext { index: 6, ..ctx(5) },
            SealContext {
                file_id: FileId([8; 16]),
                ..ctx(5)
            },
            SealContext {
                kind: FileKind::Wal,
                ..ctx(5)
            },
            SealContext { class: 2, ..ctx(5) },
            SealContext {
                generation: 9,
                ..ctx(5)
            },
        ];
        for v in variants {
            let mut copy = page.clone();
            assert_eq!(
                key.open(&v, &mut copy),
                Err(CryptoError::AuthenticationFailed),
                "{v:?}"
            );
        }
        // Truncating changes the length bound into the AAD.
        let mut short = page[..page.len() - 1].to_vec();
        assert!(key.open(&ctx(5), &mut short).is_err());
    }

    #[test]
    fn wrong_key_fails_and_all_zero_unit_fails() {
        let key = UnitKey::new(&Dek::generate().unwrap(), 0).unwrap();
        let other = UnitKey::new(&Dek::generate().unwrap(), 0).unwrap();
        let mut page = sealed_page(&key, 1);
        assert_eq!(
            other.open(&ctx(1), &mut page),
            Err(CryptoError::AuthenticationFailed)
        );
        let mut zero = vec![0u8; 4096];
        assert_eq!(
            key.open(&ctx(1), &mut zero),
            Err(CryptoError::AuthenticationFailed)
        );
    }

    #[test]
    fn same_plaintext_seals_differently() {
        let key = UnitKey::new(&Dek::generate().unwrap(), 0).unwrap();
        assert_ne!(sealed_page(&key, 1), sealed_page(&key, 1));
    }

    #[test]
    fn usage_limit_is_enforced() {
        let key = UnitKey::new(&Dek::generate().unwrap(), SEAL_USAGE_LIMIT - 1).unwrap();
        let mut page = vec![0u8; 64];
        key.seal(&ctx(1), &mut page).unwrap();
        let err = key.seal(&ctx(1), &mut page).unwrap_err();
        assert!(matches!(err, CryptoError::UsageLimitReached { .. }));
        assert_eq!(key.sealed_count(), SEAL_USAGE_LIMIT);
    }
}
