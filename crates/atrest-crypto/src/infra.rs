//! The infrastructure layer: a second, independent encryption layer under
//! the data layer, with another algorithm and another implementation.
//!
//! * AEAD: AEGIS-256 with a 128-bit tag, from libaegis (C, Frank Denis)
//!   through the `aegis` crate, which compiles it with the system C compiler
//!   and picks its AES-NI code path at run time. Nothing is shared with
//!   AWS-LC, which does the data layer's AES-256-GCM; both use the CPU's AES
//!   round instruction (see `docs/CRYPTO.md` for what that does and does
//!   not make independent).
//! * Nonces: 256 bits, a random 192-bit prefix drawn per key instance from
//!   the operating system's CSPRNG through the `getrandom` crate (the
//!   `getrandom(2)` system call on Linux; never AWS-LC's DRBG, so a flaw in
//!   one library's random generator cannot repeat nonces in both layers),
//!   followed by a 64-bit per-instance counter. No system call per seal;
//!   the prefix is drawn again every [`NONCE_PREFIX_REFRESH`] seals. See
//!   [`InfraUnitKey`] and `docs/CRYPTO.md` for why nonces never repeat.
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
use std::sync::Mutex;

use aegis::aegis256::Aegis256;
use aegis::aegis256x2::Aegis256X2;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::{CryptoError, DekId, FileId, FileKind, SealContext};

/// AEGIS-256 tag (16) plus AEGIS-256 nonce (32) at the end of every unit.
pub const INFRA_OVERHEAD: usize = INFRA_TAG_LEN + INFRA_NONCE_LEN;
/// AEGIS-256 tag length used by this layer (the 128-bit variant).
pub const INFRA_TAG_LEN: usize = 16;
/// AEGIS-256 nonce length: 256 bits.
pub const INFRA_NONCE_LEN: usize = 32;
/// Random bytes at the front of every unit nonce (192 bits, from the OS).
pub const NONCE_PREFIX_LEN: usize = 24;
/// The per-instance counter at the end of every unit nonce (64 bits, big-endian).
const NONCE_COUNTER_LEN: usize = INFRA_NONCE_LEN - NONCE_PREFIX_LEN;
const _: () = assert!(NONCE_COUNTER_LEN == std::mem::size_of::<u64>());
/// Seals after which a key instance draws a new nonce prefix from the OS:
/// bounds how many nonces two copies of one process (a VM snapshot restored
/// twice) can repeat before their prefixes diverge. Uniqueness within an
/// instance comes from the counter alone and does not depend on it.
pub const NONCE_PREFIX_REFRESH: u64 = 1 << 16;
/// The counter never reaches this value: a seal that would use it fails
/// instead of wrapping. Far above any real usage (the data layer stops a
/// file's DEK at 2^32 seals, and this layer seals once per data-layer seal).
pub const NONCE_COUNTER_LIMIT: u64 = 1 << 63;
const KEY_LEN: usize = 32;
/// Nonce (32) + wrapped key (32) + tag (16).
pub const INFRA_WRAPPED_LEN: usize = INFRA_NONCE_LEN + KEY_LEN + INFRA_TAG_LEN;
/// The cipher id of AEGIS-256 units in the infrastructure layer's AAD (the
/// data layer's AES-256-GCM is 1; 2 was XChaCha20-Poly1305 in pre-release
/// builds; AEGIS-256X2 units are [`InfraUnitCipher::Aegis256X2`], 4).
pub const INFRA_CIPHER_ID: u8 = 3;
/// Domain label of the infrastructure layer's unit AAD (the data layer uses
/// `ATRSEAL1`).
const UNIT_LABEL: &[u8; 8] = b"ATRINFR1";
/// Domain label of the infrastructure key wrap (the data layer uses `ATRWRAP1`).
const WRAP_LABEL: &[u8; 8] = b"ATRIWRP1";

/// The unit cipher of files this build creates, as shown by the benchmark
/// (`inspect` shows each file's own, [`InfraUnitCipher::name`]).
pub const INFRA_CIPHER_NAME: &str = "AEGIS-256X2";
/// The library that runs it.
pub const INFRA_IMPLEMENTATION: &str = "libaegis (C) via the aegis crate 0.9";

/// The AEAD that seals a file's units in the infrastructure layer. Chosen
/// when the file is created and recorded in its header; the key wrap is
/// AEGIS-256 in both cases.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum InfraUnitCipher {
    /// AEGIS-256: files of header format 3 (created before AEGIS-256X2).
    Aegis256 = INFRA_CIPHER_ID,
    /// AEGIS-256X2, the two-lane variant (same key, nonce and tag sizes and
    /// security claims): every file created since, and every format-4 WAL.
    Aegis256X2 = 4,
}

impl InfraUnitCipher {
    /// What this build uses for new files.
    pub const NEW_FILES: InfraUnitCipher = InfraUnitCipher::Aegis256X2;

    pub fn id(self) -> u8 {
        self as u8
    }

    pub fn from_id(id: u8) -> Option<Self> {
        match id {
            3 => Some(Self::Aegis256),
            4 => Some(Self::Aegis256X2),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Aegis256 => "AEGIS-256",
            Self::Aegis256X2 => "AEGIS-256X2",
        }
    }
}

type Cipher = Aegis256<INFRA_TAG_LEN>;
type CipherX2 = Aegis256X2<INFRA_TAG_LEN>;

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

/// [`aegis_seal`] with AEGIS-256X2.
fn aegis_x2_seal(
    key: &[u8; KEY_LEN],
    nonce: &[u8; INFRA_NONCE_LEN],
    aad: &[u8],
    body: &mut [u8],
) -> [u8; INFRA_TAG_LEN] {
    let mut cipher = CipherX2::new(key, nonce);
    let tag = cipher.encrypt_in_place(body, aad);
    wipe_cipher_x2(&mut cipher);
    tag
}

/// [`aegis_open`] with AEGIS-256X2.
fn aegis_x2_open(
    key: &[u8; KEY_LEN],
    nonce: &[u8; INFRA_NONCE_LEN],
    aad: &[u8],
    body: &mut [u8],
    tag: &[u8; INFRA_TAG_LEN],
) -> bool {
    let mut cipher = CipherX2::new(key, nonce);
    let ok = cipher.decrypt_in_place(body, tag, aad).is_ok();
    wipe_cipher_x2(&mut cipher);
    ok
}

/// [`wipe_cipher`] for an `Aegis256X2` value.
fn wipe_cipher_x2(cipher: &mut CipherX2) {
    *cipher = CipherX2::new(&[0u8; KEY_LEN], &[0u8; INFRA_NONCE_LEN]);
    std::hint::black_box(cipher);
}

/// Bumped in the child of every `fork()` by the storage engine's
/// `pthread_atfork` handler ([`note_fork_in_child`]). A key instance made
/// before the fork refuses to seal in the child, whose copy of the nonce
/// counter would repeat the parent's nonces.
static FORK_EPOCH: AtomicU64 = AtomicU64::new(0);

/// Records that this process is the child of a `fork()`: every
/// [`InfraUnitKey`] that existed before refuses to seal from now on
/// (reopening the file makes a new instance with a fresh nonce prefix).
/// Async-signal-safe (one atomic add), so it can run in an atfork handler.
pub fn note_fork_in_child() {
    FORK_EPOCH.fetch_add(1, Ordering::SeqCst);
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

fn unit_aad(
    cipher: InfraUnitCipher,
    ctx: &SealContext,
    dek_id: DekId,
    unit_len: usize,
) -> [u8; 64] {
    let mut a = [0u8; 64];
    a[0..8].copy_from_slice(UNIT_LABEL);
    a[8] = cipher.id();
    a[9] = ctx.kind as u8;
    a[10..26].copy_from_slice(&ctx.file_id.0);
    a[26..42].copy_from_slice(&dek_id.0);
    a[42..50].copy_from_slice(&ctx.index.to_be_bytes());
    a[50..54].copy_from_slice(&(unit_len as u32).to_be_bytes());
    a[54..62].copy_from_slice(&ctx.generation.to_be_bytes());
    a[62..64].copy_from_slice(&ctx.class.to_be_bytes());
    a
}

/// An infrastructure DEK made ready for sealing units.
///
/// Nonces: `prefix (24 random bytes) ‖ counter (8 bytes, big-endian)`.
/// The counter is per instance and atomic, so every seal through one
/// instance, from any thread or file handle sharing it, gets a distinct
/// counter value and therefore a distinct nonce, whatever the prefix.
/// The prefix comes from the OS CSPRNG when the instance is made (a file
/// opened) and again every [`NONCE_PREFIX_REFRESH`] seals, so two
/// instances of one key (the file reopened, another process) collide only
/// if two 192-bit random prefixes do. The counter never wraps
/// ([`NONCE_COUNTER_LIMIT`]), and an instance refuses to seal in the child
/// of a `fork()` (see [`note_fork_in_child`]). The key is zeroized on drop;
/// the prefix is not secret (it is written in every nonce).
pub struct InfraUnitKey {
    key: Zeroizing<[u8; KEY_LEN]>,
    cipher: InfraUnitCipher,
    dek_id: DekId,
    /// The next nonce counter value, i.e. the number of seals started.
    counter: AtomicU64,
    prefix: Mutex<[u8; NONCE_PREFIX_LEN]>,
    fork_epoch: u64,
}

impl InfraUnitKey {
    /// Makes a key sealing with `cipher` under `dek`, drawing its first
    /// nonce prefix from the OS CSPRNG.
    pub fn new(dek: &InfraDek, cipher: InfraUnitCipher) -> Result<Self, CryptoError> {
        let mut prefix = [0u8; NONCE_PREFIX_LEN];
        os_random(&mut prefix)?;
        Ok(Self {
            key: Zeroizing::new(*dek.expose_secret()),
            cipher,
            dek_id: dek.id(),
            counter: AtomicU64::new(0),
            prefix: Mutex::new(prefix),
            fork_epoch: FORK_EPOCH.load(Ordering::SeqCst),
        })
    }

    pub fn dek_id(&self) -> DekId {
        self.dek_id
    }

    pub fn cipher(&self) -> InfraUnitCipher {
        self.cipher
    }

    /// Units sealed under this key instance (seals started; a seal cannot
    /// fail once its nonce is taken, except at the limits below).
    pub fn sealed_count(&self) -> u64 {
        self.counter.load(Ordering::Relaxed)
    }

    /// The next unit nonce: a fresh counter value behind the current prefix.
    fn next_nonce(&self) -> Result<[u8; INFRA_NONCE_LEN], CryptoError> {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        if n >= NONCE_COUNTER_LIMIT {
            return Err(CryptoError::UsageLimitReached {
                dek_id: format!("{} (infrastructure layer)", self.dek_id),
                count: n,
            });
        }
        if FORK_EPOCH.load(Ordering::Relaxed) != self.fork_epoch {
            return Err(CryptoError::UsedAfterFork);
        }
        let mut nonce = [0u8; INFRA_NONCE_LEN];
        let mut prefix = self.prefix.lock().unwrap_or_else(|p| p.into_inner());
        if n != 0 && n.is_multiple_of(NONCE_PREFIX_REFRESH) {
            os_random(&mut prefix[..])?;
        }
        nonce[..NONCE_PREFIX_LEN].copy_from_slice(&prefix[..]);
        drop(prefix);
        nonce[NONCE_PREFIX_LEN..].copy_from_slice(&n.to_be_bytes());
        Ok(nonce)
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
        let nonce = self.next_nonce()?;
        let aad = unit_aad(self.cipher, ctx, self.dek_id, len);
        let (body, trailer) = unit.split_at_mut(len - INFRA_OVERHEAD);
        let tag = match self.cipher {
            InfraUnitCipher::Aegis256 => aegis_seal(&self.key, &nonce, &aad, body),
            InfraUnitCipher::Aegis256X2 => aegis_x2_seal(&self.key, &nonce, &aad, body),
        };
        trailer[..INFRA_TAG_LEN].copy_from_slice(&tag);
        trailer[INFRA_TAG_LEN..].copy_from_slice(&nonce);
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
        let aad = unit_aad(self.cipher, ctx, self.dek_id, len);
        let (body, trailer) = unit.split_at_mut(len - INFRA_OVERHEAD);
        let (tag, nonce) = trailer.split_at(INFRA_TAG_LEN);
        let tag: [u8; INFRA_TAG_LEN] = tag.try_into().expect("tag length");
        let nonce: [u8; INFRA_NONCE_LEN] = nonce.try_into().expect("nonce length");
        let ok = match self.cipher {
            InfraUnitCipher::Aegis256 => aegis_open(&self.key, &nonce, &aad, body, &tag),
            InfraUnitCipher::Aegis256X2 => aegis_x2_open(&self.key, &nonce, &aad, body, &tag),
        };
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

    const X2: InfraUnitCipher = InfraUnitCipher::Aegis256X2;

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
        let key = InfraUnitKey::new(&InfraDek::generate().unwrap(), X2).unwrap();
        let mut page = sealed(&key, 3);
        assert!(!page.windows(11).any(|w| w == b"hello infra"));
        key.open(&ctx(3), &mut page).unwrap();
        assert_eq!(&page[..11], b"hello infra");
        assert!(page[4096 - INFRA_OVERHEAD..].iter().all(|&b| b == 0));
        assert_eq!(key.sealed_count(), 1);
    }

    #[test]
    fn every_bit_flip_and_every_move_is_detected() {
        let key = InfraUnitKey::new(&InfraDek::generate().unwrap(), X2).unwrap();
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
        let other = InfraUnitKey::new(&InfraDek::generate().unwrap(), X2).unwrap();
        let mut copy = page.clone();
        assert!(other.open(&ctx(1), &mut copy).is_err());
        assert!(key.open(&ctx(1), &mut vec![0u8; 4096]).is_err());
        assert!(key
            .open(&ctx(1), &mut page[..INFRA_OVERHEAD - 1].to_vec())
            .is_err());
    }

    #[test]
    fn same_plaintext_seals_differently() {
        let key = InfraUnitKey::new(&InfraDek::generate().unwrap(), X2).unwrap();
        let (a, b) = (sealed(&key, 1), sealed(&key, 1));
        assert_ne!(a, b);
        assert_ne!(
            a[4096 - INFRA_NONCE_LEN..],
            b[4096 - INFRA_NONCE_LEN..],
            "nonces differ"
        );
    }

    fn nonce_of(unit: &[u8]) -> [u8; INFRA_NONCE_LEN] {
        unit[unit.len() - INFRA_NONCE_LEN..].try_into().unwrap()
    }

    /// Many seals through one instance, from several threads at once, all
    /// get distinct nonces sharing the instance's prefix, with counters
    /// 0..n; every unit still opens.
    #[test]
    fn nonces_are_unique_across_threads_and_units_open() {
        let key =
            std::sync::Arc::new(InfraUnitKey::new(&InfraDek::generate().unwrap(), X2).unwrap());
        let per_thread = 5_000u64;
        let units: Vec<Vec<u8>> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..4)
                .map(|t| {
                    let key = std::sync::Arc::clone(&key);
                    s.spawn(move || {
                        (0..per_thread)
                            .map(|i| {
                                let mut u = vec![t as u8; 64];
                                u[1..9].copy_from_slice(&i.to_be_bytes());
                                key.seal(&ctx(i), &mut u).unwrap();
                                u
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            hs.into_iter().flat_map(|h| h.join().unwrap()).collect()
        });
        let n = 4 * per_thread;
        assert_eq!(key.sealed_count(), n);
        let nonces: std::collections::HashSet<_> = units.iter().map(|u| nonce_of(u)).collect();
        assert_eq!(nonces.len() as u64, n, "every nonce distinct");
        let mut counters: Vec<u64> = nonces
            .iter()
            .map(|x| u64::from_be_bytes(x[NONCE_PREFIX_LEN..].try_into().unwrap()))
            .collect();
        counters.sort_unstable();
        assert_eq!(counters, (0..n).collect::<Vec<_>>());
        let first = nonce_of(&units[0]);
        assert!(nonces
            .iter()
            .all(|x| x[..NONCE_PREFIX_LEN] == first[..NONCE_PREFIX_LEN]));
        for (k, u) in units.iter().enumerate() {
            let mut u = u.clone();
            let i = (k as u64) % per_thread;
            key.open(&ctx(i), &mut u).unwrap();
            assert_eq!(u[1..9], i.to_be_bytes());
        }
    }

    /// Two instances of the same key (the file opened twice, or by two
    /// processes) draw different prefixes, so their nonces never meet even
    /// though both counters start at 0; each opens the other's units.
    #[test]
    fn key_instances_draw_different_prefixes() {
        let dek = InfraDek::generate().unwrap();
        let (a, b) = (
            InfraUnitKey::new(&dek, X2).unwrap(),
            InfraUnitKey::new(&dek, X2).unwrap(),
        );
        let (ua, ub) = (sealed(&a, 1), sealed(&b, 1));
        let (na, nb) = (nonce_of(&ua), nonce_of(&ub));
        assert_ne!(na[..NONCE_PREFIX_LEN], nb[..NONCE_PREFIX_LEN]);
        assert_eq!(
            na[NONCE_PREFIX_LEN..],
            nb[NONCE_PREFIX_LEN..],
            "both counters at 0"
        );
        b.open(&ctx(1), &mut ua.clone()).unwrap();
        a.open(&ctx(1), &mut ub.clone()).unwrap();
    }

    /// Every NONCE_PREFIX_REFRESH seals the prefix is drawn again; the
    /// counter carries on, so uniqueness does not depend on the prefix.
    #[test]
    fn prefix_is_refreshed_and_counter_continues() {
        let key = InfraUnitKey::new(&InfraDek::generate().unwrap(), X2).unwrap();
        let mut unit = vec![0u8; INFRA_OVERHEAD];
        let mut last = [0u8; INFRA_NONCE_LEN];
        let mut prefixes = std::collections::HashSet::new();
        for i in 0..NONCE_PREFIX_REFRESH + 1 {
            key.seal(&ctx(1), &mut unit).unwrap();
            last = nonce_of(&unit);
            assert_eq!(last[NONCE_PREFIX_LEN..], i.to_be_bytes());
            if i == 0 || i == NONCE_PREFIX_REFRESH {
                prefixes.insert(last[..NONCE_PREFIX_LEN].to_vec());
            }
        }
        assert_eq!(prefixes.len(), 2, "a new prefix after the refresh");
        key.open(&ctx(1), &mut unit).unwrap();
        assert_ne!(last, [0u8; INFRA_NONCE_LEN]);
    }

    /// The counter never wraps: at the limit a seal fails (and names no key
    /// bytes), it does not reuse counter 0.
    #[test]
    fn counter_at_its_limit_fails_instead_of_wrapping() {
        let key = InfraUnitKey::new(&InfraDek::generate().unwrap(), X2).unwrap();
        key.counter
            .store(NONCE_COUNTER_LIMIT - 1, Ordering::Relaxed);
        let mut unit = vec![0u8; 100];
        key.seal(&ctx(1), &mut unit).unwrap();
        let err = key.seal(&ctx(1), &mut unit).unwrap_err();
        assert!(
            matches!(err, CryptoError::UsageLimitReached { .. }),
            "{err}"
        );
        assert!(!err.to_string().contains(&hex::encode(key.key.as_slice())));
        assert!(key.seal(&ctx(1), &mut unit).is_err());
    }

    /// A key instance from another fork epoch (made before a fork, used
    /// in the child) refuses to seal; opening needs no nonce and works.
    /// (The epoch itself is bumped in `tests/fork.rs`, in its own process,
    /// so that it cannot disturb the tests running here in parallel.)
    #[test]
    fn an_instance_from_another_fork_epoch_refuses_to_seal() {
        let dek = InfraDek::generate().unwrap();
        let mut old = InfraUnitKey::new(&dek, X2).unwrap();
        let mut unit = sealed(&old, 2);
        old.fork_epoch = old.fork_epoch.wrapping_sub(1);
        assert_eq!(
            old.seal(&ctx(2), &mut unit.clone()),
            Err(CryptoError::UsedAfterFork)
        );
        old.open(&ctx(2), &mut unit).unwrap();
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
        let infra =
            InfraUnitKey::new(&InfraDek::from_parts(dek.id(), dek.expose_secret()), X2).unwrap();
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

    /// draft-irtf-cfrg-aegis-aead, AEGIS-256X2 test vector 2 (16-byte
    /// tag): pins the algorithm libaegis runs behind [`aegis_x2_seal`].
    #[test]
    fn aegis256x2_known_answer() {
        let h = |s: &str| hex::decode(s).unwrap();
        let key: [u8; 32] = h("000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f")
            .try_into()
            .unwrap();
        let nonce: [u8; 32] = h("101112131415161718191a1b1c1d1e1f202122232425262728292a2b2c2d2e2f")
            .try_into()
            .unwrap();
        let ad = h("0102030401020304");
        let msg = h(&"04050607".repeat(30));
        let mut buf = msg.clone();
        let tag = aegis_x2_seal(&key, &nonce, &ad, &mut buf);
        assert_eq!(
            hex::encode(&buf),
            "72120c2ea8236180d67859001f4729077b7064c414384fe3a7b52f1571f4f8a7\
             d0f01e18db4f3bc0adb150702e5d147a8d36522132761b994c1bd395589e2ccf\
             0790dfe2a3d12d61cd666b2859827739db4037dd3124c78424459376f6cac08e\
             1a7223a2a43e398ce6385cd654a19f481cba3b8f25910b42"
        );
        assert_eq!(hex::encode(tag), "635d391828520bf1512763f0c8f5cdbd");
        assert!(aegis_x2_open(&key, &nonce, &ad, &mut buf, &tag));
        assert_eq!(buf, msg);
    }

    /// A file's unit cipher is part of its units: AEGIS-256 (format-3
    /// files) and AEGIS-256X2 units under the same key do not open as each
    /// other, and each round-trips.
    #[test]
    fn the_two_unit_ciphers_do_not_open_each_others_units() {
        let dek = InfraDek::generate().unwrap();
        let old = InfraUnitKey::new(&dek, InfraUnitCipher::Aegis256).unwrap();
        let new = InfraUnitKey::new(&dek, X2).unwrap();
        let (a, b) = (sealed(&old, 4), sealed(&new, 4));
        assert!(new.open(&ctx(4), &mut a.clone()).is_err());
        assert!(old.open(&ctx(4), &mut b.clone()).is_err());
        for (key, mut unit) in [(&old, a), (&new, b)] {
            key.open(&ctx(4), &mut unit).unwrap();
            assert_eq!(&unit[..11], b"hello infra");
        }
        assert_eq!(InfraUnitCipher::NEW_FILES, X2);
        for c in [InfraUnitCipher::Aegis256, X2] {
            assert_eq!(InfraUnitCipher::from_id(c.id()), Some(c));
        }
        assert_eq!(InfraUnitCipher::from_id(2), None);
    }

    #[test]
    fn debug_never_shows_key_bytes() {
        let dek = InfraDek::generate().unwrap();
        let shown = format!("{dek:?}");
        assert!(shown.contains("redacted"));
        assert!(!shown.contains(&hex::encode(dek.expose_secret())));
    }
}
