//! The infrastructure layer: a second, independent encryption layer under
//! the data layer, with another algorithm and another implementation.
//!
//! * AEAD: AEGIS-256 with a 128-bit tag, from libaegis (C, Frank Denis)
//!   through the `aegis` crate, which compiles it with the system C compiler
//!   and picks its AES-NI code path at run time. Nothing is shared with
//!   AWS-LC, which does the data layer's AES-256-GCM; both use the CPU's AES
//!   round instruction (see `docs/CRYPTO.md` for what that does and does
//!   not make independent).
//! * Nonces: 256-bit values from the operating system's CSPRNG through the
//!   `getrandom` crate (the `getrandom(2)` system call on Linux), never from
//!   AWS-LC's DRBG, so a flaw in one library's random generator cannot
//!   repeat nonces in both layers.
//! * Keys: one random 256-bit infrastructure DEK per file ([`InfraDek`]),
//!   wrapped with AEGIS-256 under an infrastructure master key
//!   ([`InfraKek`]) that is neither the service key nor a customer key.
//!
//! A unit sealed by this layer keeps its length; its last
//! [`INFRA_OVERHEAD`] bytes hold the tag and the nonce:
//!
//! ```text
//! | ciphertext (len - 48) | AEGIS-256 tag (16) | AEGIS-256 nonce (32) |
//! ```
//!
//! The storage engine seals with the data layer first (AES-256-GCM over the
//! first `len - 48` bytes, its own 28-byte trailer inside them) and then with
//! this layer over the whole unit, so this is the last transformation before
//! bytes reach the file, and the first undone when they come back.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

use aegis::aegis256::Aegis256;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::{CryptoError, DekId, FileId, FileKind, SealContext};

/// AEGIS-256 tag (16) plus AEGIS-256 nonce (32) at the end of every unit.
pub const INFRA_OVERHEAD: usize = INFRA_TAG_LEN + INFRA_NONCE_LEN;
/// AEGIS-256 tag length used by this layer (the 128-bit variant).
pub const INFRA_TAG_LEN: usize = 16;
/// AEGIS-256 nonce length: 256 bits.
pub const INFRA_NONCE_LEN: usize = 32;
const KEY_LEN: usize = 32;
/// Nonce (32) + wrapped key (32) + tag (16).
pub const INFRA_WRAPPED_LEN: usize = INFRA_NONCE_LEN + KEY_LEN + INFRA_TAG_LEN;
/// The cipher id bound into the infrastructure layer's AAD (the data layer's
/// AES-256-GCM is 1; 2 was XChaCha20-Poly1305 in pre-release builds).
pub const INFRA_CIPHER_ID: u8 = 3;
/// Domain label of the infrastructure layer's unit AAD (the data layer uses
/// `ATRSEAL1`).
const UNIT_LABEL: &[u8; 8] = b"ATRINFR1";
/// Domain label of the infrastructure key wrap (the data layer uses `ATRWRAP1`).
const WRAP_LABEL: &[u8; 8] = b"ATRIWRP1";

/// The layer's algorithm, as shown by `inspect`, `stats` and the benchmark.
pub const INFRA_CIPHER_NAME: &str = "AEGIS-256";
/// The library that runs it.
pub const INFRA_IMPLEMENTATION: &str = "libaegis (C) via the aegis crate 0.9";

type Cipher = Aegis256<INFRA_TAG_LEN>;

/// Seals `body` in place with AEGIS-256 (libaegis) and returns the tag.
/// The cipher value holds a copy of the key; it is wiped before returning
/// (best effort: libaegis keeps its state on its own stack frame and
/// wipes nothing we can see).
fn aegis_seal(
    key: &[u8; KEY_LEN],
    nonce: &[u8; INFRA_NONCE_LEN],
    aad: &[u8],
    body: &mut [u8],
) -> [u8; INFRA_TAG_LEN] {
    let mut cipher = Cipher::new(key, nonce);
    let tag = cipher.encrypt_in_place(body, aad);
    wipe_cipher(&mut cipher);
    tag
}

/// Opens `body` in place; on failure libaegis erases the buffer.
fn aegis_open(
    key: &[u8; KEY_LEN],
    nonce: &[u8; INFRA_NONCE_LEN],
    aad: &[u8],
    body: &mut [u8],
    tag: &[u8; INFRA_TAG_LEN],
) -> bool {
    let mut cipher = Cipher::new(key, nonce);
    let ok = cipher.decrypt_in_place(body, tag, aad).is_ok();
    wipe_cipher(&mut cipher);
    ok
}

/// Overwrites the key (and nonce) copy inside an `Aegis256` value, which
/// is plain `Copy` data with no destructor of its own, with a cipher under
/// an all-zero key. Safe code only (the one `unsafe` module of atrest is the
/// SQLite VFS); `black_box` keeps the store from being optimized away.
/// Best effort, like any wipe of a stack value that may have been copied.
fn wipe_cipher(cipher: &mut Cipher) {
    *cipher = Cipher::new(&[0u8; KEY_LEN], &[0u8; INFRA_NONCE_LEN]);
    std::hint::black_box(cipher);
}

/// Fills `buf` from the operating system's CSPRNG (not AWS-LC).
pub fn os_random(buf: &mut [u8]) -> Result<(), CryptoError> {
    getrandom::getrandom(buf).map_err(|_| CryptoError::Library("getrandom (OS CSPRNG)"))
}

/// A per-file infrastructure data encryption key: 256 random bits from the
/// OS CSPRNG. Zeroized on drop, never printed.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct InfraDek {
    id: [u8; 16],
    bytes: [u8; 32],
}

impl InfraDek {
    /// A fresh random key with a fresh id.
    pub fn generate() -> Result<Self, CryptoError> {
        let mut k = Self {
            id: [0; 16],
            bytes: [0; 32],
        };
        os_random(&mut k.id)?;
        os_random(&mut k.bytes)?;
        Ok(k)
    }

    /// Rebuilds a key from its id and raw bytes (after unwrapping).
    pub fn from_parts(id: DekId, bytes: &[u8; 32]) -> Self {
        Self {
            id: id.0,
            bytes: *bytes,
        }
    }

    pub fn id(&self) -> DekId {
        DekId(self.id)
    }

    /// The raw key, only for handing to the cipher or the key wrap.
    pub fn expose_secret(&self) -> &[u8; 32] {
        &self.bytes
    }
}

impl fmt::Debug for InfraDek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "InfraDek({}, <redacted>)", hex::encode(self.id))
    }
}

fn unit_aad(ctx: &SealContext, dek_id: DekId, unit_len: usize) -> [u8; 64] {
    let mut a = [0u8; 64];
    a[0..8].copy_from_slice(UNIT_LABEL);
    a[8] = INFRA_CIPHER_ID;
    a[9] = ctx.kind as u8;
    a[10..26].copy_from_slice(&ctx.file_id.0);
    a[26..42].copy_from_slice(&dek_id.0);
    a[42..50].copy_from_slice(&ctx.index.to_be_bytes());
    a[50..54].copy_from_slice(&(unit_len as u32).to_be_bytes());
    a[54..62].copy_from_slice(&ctx.generation.to_be_bytes());
    a[62..64].copy_from_slice(&ctx.class.to_be_bytes());
    a
}

/// An infrastructure DEK made ready for sealing units, with counters.
/// The key is zeroized on drop.
pub struct InfraUnitKey {
    key: Zeroizing<[u8; KEY_LEN]>,
    dek_id: DekId,
    sealed: AtomicU64,
}

impl InfraUnitKey {
    pub fn new(dek: &InfraDek) -> Self {
        Self {
            key: Zeroizing::new(*dek.expose_secret()),
            dek_id: dek.id(),
            sealed: AtomicU64::new(0),
        }
    }

    pub fn dek_id(&self) -> DekId {
        self.dek_id
    }

    /// Units sealed under this key by this process.
    pub fn sealed_count(&self) -> u64 {
        self.sealed.load(Ordering::Relaxed)
    }

    /// Seals `unit` in place: its first `len - INFRA_OVERHEAD` bytes are
    /// encrypted, the last `INFRA_OVERHEAD` are overwritten with tag and
    /// nonce.
    pub fn seal(&self, ctx: &SealContext, unit: &mut [u8]) -> Result<(), CryptoError> {
        let len = unit.len();
        if len < INFRA_OVERHEAD {
            return Err(CryptoError::UnitTooShort {
                len,
                min: INFRA_OVERHEAD,
            });
        }
        let mut nonce = [0u8; INFRA_NONCE_LEN];
        os_random(&mut nonce)?;
        let aad = unit_aad(ctx, self.dek_id, len);
        let (body, trailer) = unit.split_at_mut(len - INFRA_OVERHEAD);
        let tag = aegis_seal(&self.key, &nonce, &aad, body);
        trailer[..INFRA_TAG_LEN].copy_from_slice(&tag);
        trailer[INFRA_TAG_LEN..].copy_from_slice(&nonce);
        self.sealed.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Opens a unit sealed by [`Self::seal`] in place. On success the first
    /// `len - INFRA_OVERHEAD` bytes are the data layer's sealed unit and the trailer is
    /// zeroed; on failure the buffer is unspecified and must not be used.
    pub fn open(&self, ctx: &SealContext, unit: &mut [u8]) -> Result<(), CryptoError> {
        let len = unit.len();
        if len < INFRA_OVERHEAD {
            return Err(CryptoError::UnitTooShort {
                len,
                min: INFRA_OVERHEAD,
            });
        }
        let aad = unit_aad(ctx, self.dek_id, len);
        let (body, trailer) = unit.split_at_mut(len - INFRA_OVERHEAD);
        let (tag, nonce) = trailer.split_at(INFRA_TAG_LEN);
        let tag: [u8; INFRA_TAG_LEN] = tag.try_into().expect("tag length");
        let nonce: [u8; INFRA_NONCE_LEN] = nonce.try_into().expect("nonce length");
        let ok = aegis_open(&self.key, &nonce, &aad, body, &tag);
        trailer.fill(0);
        if ok {
            Ok(())
        } else {
            Err(CryptoError::AuthenticationFailed)
        }
    }
}

/// An infrastructure master key (key-encryption key for infrastructure
/// DEKs). AEGIS-256 with a random 256-bit nonce; the key is zeroized on
/// drop.
pub struct InfraKek {
    key: Zeroizing<[u8; KEY_LEN]>,
}

impl InfraKek {
    pub fn new(bytes: &[u8; 32]) -> Self {
        Self {
            key: Zeroizing::new(*bytes),
        }
    }

    /// Wraps `dek` for file `file_id` of `kind`; `kek_id` names this master
    /// key and version. All three and the DEK id are authenticated.
    pub fn wrap(
        &self,
        dek: &InfraDek,
        file_id: FileId,
        kind: FileKind,
        kek_id: &str,
    ) -> Result<Vec<u8>, CryptoError> {
        let mut nonce = [0u8; INFRA_NONCE_LEN];
        os_random(&mut nonce)?;
        let mut buf = Zeroizing::new(*dek.expose_secret());
        let aad = wrap_aad(dek.id(), file_id, kind, kek_id);
        let tag = aegis_seal(&self.key, &nonce, &aad, &mut buf[..]);
        let mut out = Vec::with_capacity(INFRA_WRAPPED_LEN);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&buf[..]);
        out.extend_from_slice(&tag);
        Ok(out)
    }

    /// Unwraps a key made by [`Self::wrap`] with the same bindings.
    pub fn unwrap(
        &self,
        dek_id: DekId,
        wrapped: &[u8],
        file_id: FileId,
        kind: FileKind,
        kek_id: &str,
    ) -> Result<InfraDek, CryptoError> {
        if wrapped.len() != INFRA_WRAPPED_LEN {
            return Err(CryptoError::AuthenticationFailed);
        }
        let nonce: [u8; INFRA_NONCE_LEN] = wrapped[..INFRA_NONCE_LEN].try_into().expect("nonce");
        let mut buf = Zeroizing::new([0u8; KEY_LEN]);
        buf.copy_from_slice(&wrapped[INFRA_NONCE_LEN..INFRA_NONCE_LEN + KEY_LEN]);
        let tag: [u8; INFRA_TAG_LEN] = wrapped[INFRA_NONCE_LEN + KEY_LEN..]
            .try_into()
            .expect("tag");
        let aad = wrap_aad(dek_id, file_id, kind, kek_id);
        if !aegis_open(&self.key, &nonce, &aad, &mut buf[..], &tag) {
            return Err(CryptoError::AuthenticationFailed);
        }
        Ok(InfraDek::from_parts(dek_id, &buf))
    }
}

fn wrap_aad(dek_id: DekId, file_id: FileId, kind: FileKind, kek_id: &str) -> Vec<u8> {
    let mut a = Vec::with_capacity(48 + kek_id.len());
    a.extend_from_slice(WRAP_LABEL);
    a.extend_from_slice(&dek_id.0);
    a.extend_from_slice(&file_id.0);
    a.push(kind as u8);
    a.extend_from_slice(kek_id.as_bytes());
    a
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Dek, UnitKey, SEAL_OVERHEAD};

    fn ctx(index: u64) -> SealContext {
        SealContext {
            file_id: FileId([7; 16]),
            kind: FileKind::MainDb,
            class: 1,
            index,
            generation: 0,
        }
    }

    fn sealed(key: &InfraUnitKey, index: u64) -> Vec<u8> {
        let mut page = vec![0u8; 4096];
        page[..11].copy_from_slice(b"hello infra");
        key.seal(&ctx(index), &mut page).unwrap();
        page
    }

    #[test]
    fn round_trip_keeps_length_and_zeroes_trailer() {
        let key = InfraUnitKey::new(&InfraDek::generate().unwrap());
        let mut page = sealed(&key, 3);
        assert!(!page.windows(11).any(|w| w == b"hello infra"));
        key.open(&ctx(3), &mut page).unwrap();
        assert_eq!(&page[..11], b"hello infra");
        assert!(page[4096 - INFRA_OVERHEAD..].iter().all(|&b| b == 0));
        assert_eq!(key.sealed_count(), 1);
    }

    #[test]
    fn every_bit_flip_and_every_move_is_detected() {
        let key = InfraUnitKey::new(&InfraDek::generate().unwrap());
        let page = sealed(&key, 1);
        for pos in (0..page.len())
            .step_by(7)
            .chain(4096 - INFRA_OVERHEAD..4096)
        {
            let mut bad = page.clone();
            bad[pos] ^= 1 << (pos % 8);
            assert_eq!(
                key.open(&ctx(1), &mut bad),
                Err(CryptoError::AuthenticationFailed),
                "byte {pos}"
            );
        }
        for v in [
            SealContext { index: 2, ..ctx(1) },
            SealContext {
                file_id: FileId([8; 16]),
                ..ctx(1)
            },
            SealContext {
                kind: FileKind::Wal,
                ..ctx(1)
            },
            SealContext { class: 4, ..ctx(1) },
            SealContext {
                generation: 5,
                ..ctx(1)
            },
        ] {
            let mut copy = page.clone();
            assert!(key.open(&v, &mut copy).is_err(), "{v:?}");
        }
        let other = InfraUnitKey::new(&InfraDek::generate().unwrap());
        let mut copy = page.clone();
        assert!(other.open(&ctx(1), &mut copy).is_err());
        assert!(key.open(&ctx(1), &mut vec![0u8; 4096]).is_err());
        assert!(key
            .open(&ctx(1), &mut page[..INFRA_OVERHEAD - 1].to_vec())
            .is_err());
    }

    #[test]
    fn same_plaintext_seals_differently() {
        let key = InfraUnitKey::new(&InfraDek::generate().unwrap());
        let (a, b) = (sealed(&key, 1), sealed(&key, 1));
        assert_ne!(a, b);
        assert_ne!(
            a[4096 - INFRA_NONCE_LEN..],
            b[4096 - INFRA_NONCE_LEN..],
            "nonces differ"
        );
    }

    /// The two layers nest: the data layer seals the first `len - 48`
    /// bytes, the infrastructure layer the whole unit. Each layer alone
    /// hides the plaintext; removing either breaks the open.
    #[test]
    fn layers_nest_and_domains_are_separate() {
        let dek = Dek::generate().unwrap();
        let data = UnitKey::new(&dek, 0).unwrap();
        // Same key bytes in both layers: their AADs (labels) still differ,
        // and the ciphers differ, so neither opens the other's unit.
        let infra = InfraUnitKey::new(&InfraDek::from_parts(dek.id(), dek.expose_secret()));
        let mut page = vec![0u8; 4096];
        page[..5].copy_from_slice(b"plain");
        let n = page.len();
        data.seal(&ctx(1), &mut page[..n - INFRA_OVERHEAD]).unwrap();
        let data_only = page.clone();
        infra.seal(&ctx(1), &mut page).unwrap();
        assert_ne!(page[..n - INFRA_OVERHEAD], data_only[..n - INFRA_OVERHEAD]);
        // Opening the data layer without first removing the infra layer fails.
        assert!(data
            .open(&ctx(1), &mut page.clone()[..n - INFRA_OVERHEAD])
            .is_err());
        infra.open(&ctx(1), &mut page).unwrap();
        assert_eq!(page[..n - INFRA_OVERHEAD], data_only[..n - INFRA_OVERHEAD]);
        data.open(&ctx(1), &mut page[..n - INFRA_OVERHEAD]).unwrap();
        assert_eq!(&page[..5], b"plain");
        assert!(page[n - INFRA_OVERHEAD - SEAL_OVERHEAD..]
            .iter()
            .all(|&b| b == 0));
        // A data-layer unit is not an infra-layer unit of the same key.
        let mut d = data_only.clone();
        d[n - INFRA_OVERHEAD..].fill(0);
        assert!(infra.open(&ctx(1), &mut d).is_err());
    }

    #[test]
    fn wrap_round_trip_and_bindings() {
        let kek = InfraKek::new(&[3; 32]);
        let dek = InfraDek::generate().unwrap();
        let f = FileId([1; 16]);
        let w = kek.wrap(&dek, f, FileKind::MainDb, "infra:aa/v1").unwrap();
        assert_eq!(w.len(), INFRA_WRAPPED_LEN);
        assert!(!w.windows(32).any(|x| x == dek.expose_secret()));
        let back = kek
            .unwrap(dek.id(), &w, f, FileKind::MainDb, "infra:aa/v1")
            .unwrap();
        assert_eq!(back.expose_secret(), dek.expose_secret());
        assert!(kek
            .unwrap(dek.id(), &w, f, FileKind::MainDb, "infra:aa/v2")
            .is_err());
        assert!(kek
            .unwrap(
                dek.id(),
                &w,
                FileId([2; 16]),
                FileKind::MainDb,
                "infra:aa/v1"
            )
            .is_err());
        assert!(kek
            .unwrap(dek.id(), &w, f, FileKind::Wal, "infra:aa/v1")
            .is_err());
        assert!(kek
            .unwrap(DekId([0; 16]), &w, f, FileKind::MainDb, "infra:aa/v1")
            .is_err());
        assert!(InfraKek::new(&[4; 32])
            .unwrap(dek.id(), &w, f, FileKind::MainDb, "infra:aa/v1")
            .is_err());
        let mut bad = w.clone();
        bad[30] ^= 1;
        assert!(kek
            .unwrap(dek.id(), &bad, f, FileKind::MainDb, "infra:aa/v1")
            .is_err());
    }

    /// draft-irtf-cfrg-aegis-aead, AEGIS-256 test vector 3 (16-byte tag):
    /// pins the algorithm libaegis runs behind [`aegis_seal`].
    #[test]
    fn aegis256_known_answer() {
        let h = |s: &str| hex::decode(s).unwrap();
        let key: [u8; 32] = h("1001000000000000000000000000000000000000000000000000000000000000")
            .try_into()
            .unwrap();
        let nonce: [u8; 32] = h("1000020000000000000000000000000000000000000000000000000000000000")
            .try_into()
            .unwrap();
        let ad = h("0001020304050607");
        let msg = h("000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f");
        let mut buf = msg.clone();
        let tag = aegis_seal(&key, &nonce, &ad, &mut buf);
        assert_eq!(
            hex::encode(&buf),
            "f373079ed84b2709faee373584585d60accd191db310ef5d8b11833df9dec711"
        );
        assert_eq!(hex::encode(tag), "8d86f91ee606e9ff26a01b64ccbdd91d");
        assert!(aegis_open(&key, &nonce, &ad, &mut buf, &tag));
        assert_eq!(buf, msg);
        let mut bad = tag;
        bad[0] ^= 1;
        assert!(!aegis_open(&key, &nonce, &ad, &mut buf.clone(), &bad));
    }

    #[test]
    fn debug_never_shows_key_bytes() {
        let dek = InfraDek::generate().unwrap();
        let shown = format!("{dek:?}");
        assert!(shown.contains("redacted"));
        assert!(!shown.contains(&hex::encode(dek.expose_secret())));
    }
}
