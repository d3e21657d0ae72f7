//! One encrypted file: the header, the keys, and the translation of
//! SQLite's reads and writes into sealed units (see [`crate::layout`]).
//!
//! This module is safe Rust over the [`RawFile`] trait; the FFI module
//! implements `RawFile` for the underlying unix VFS file, and the tests
//! implement it over memory.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use atrest_crypto::{
    CipherId, CryptoError, Dek, DekId, FileHeader, FileId, FileKind, InfraDek, InfraKeyRecord,
    InfraUnitCipher, InfraUnitKey, KeySource, Rotation, SealContext, SymmetricKek, UnitKey,
    WrappedDek, HEADER_SLOT_SIZE, INFRA_OVERHEAD, SEAL_OVERHEAD, SEAL_USAGE_WARN,
};
use rusqlite::ffi;

use crate::keyring::Keyring;
use crate::layout::{
    class, journal_block, Geometry, Unit, HEADER_LEN, TEMP_BLOCK, WAL_FRAME_HEADER, WAL_HEADER,
};
use crate::StorageError;

/// Seals reserved in the header at a time. A process that dies loses at
/// most this many from the DEK's budget (2^32): 65,536 restarts' worth.
const SEAL_LEASE: u64 = 1 << 16;

/// The file below us, in SQLite's terms. Errors are SQLite result codes.
pub trait RawFile {
    /// Reads `buf.len()` bytes at `off`; `Ok(false)` if the file ended
    /// first (the rest of `buf` is then zero).
    fn read_at(&mut self, buf: &mut [u8], off: u64) -> Result<bool, i32>;
    fn write_at(&mut self, buf: &[u8], off: u64) -> Result<(), i32>;
    fn truncate(&mut self, size: u64) -> Result<(), i32>;
    fn size(&mut self) -> Result<u64, i32>;
    fn sync(&mut self, flags: i32) -> Result<(), i32>;
}

/// Counters for benchmarks and metrics.
#[derive(Debug, Default)]
pub struct Stats {
    pub units_sealed: AtomicU64,
    pub units_opened: AtomicU64,
    pub bytes_sealed: AtomicU64,
    pub bytes_opened: AtomicU64,
    /// The infrastructure layer's units and bytes, counted apart.
    pub infra_units_sealed: AtomicU64,
    pub infra_units_opened: AtomicU64,
    pub infra_bytes_sealed: AtomicU64,
    pub infra_bytes_opened: AtomicU64,
    /// Files opened through the VFS, by SQLite's file type.
    pub opened_by_type: [AtomicU64; OPEN_TYPES.len()],
}

/// SQLite's file types, as counted in [`Stats::opened_by_type`].
pub const OPEN_TYPES: [(&str, i32); 8] = [
    ("main_db", ffi::SQLITE_OPEN_MAIN_DB),
    ("main_journal", ffi::SQLITE_OPEN_MAIN_JOURNAL),
    ("wal", ffi::SQLITE_OPEN_WAL),
    ("super_journal", ffi::SQLITE_OPEN_SUPER_JOURNAL),
    ("temp_db", ffi::SQLITE_OPEN_TEMP_DB),
    ("temp_journal", ffi::SQLITE_OPEN_TEMP_JOURNAL),
    ("transient_db", ffi::SQLITE_OPEN_TRANSIENT_DB),
    ("subjournal", ffi::SQLITE_OPEN_SUBJOURNAL),
];

impl Stats {
    pub fn count_open(&self, flags: i32) {
        if let Some(i) = OPEN_TYPES.iter().position(|(_, f)| flags & f != 0) {
            self.opened_by_type[i].fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Stats {
    fn sealed(&self, n: usize) {
        self.units_sealed.fetch_add(1, Ordering::Relaxed);
        self.bytes_sealed.fetch_add(n as u64, Ordering::Relaxed);
    }
    fn opened(&self, n: usize) {
        self.units_opened.fetch_add(1, Ordering::Relaxed);
        self.bytes_opened.fetch_add(n as u64, Ordering::Relaxed);
    }
    fn infra_sealed(&self, n: usize) {
        self.infra_units_sealed.fetch_add(1, Ordering::Relaxed);
        self.infra_bytes_sealed
            .fetch_add(n as u64, Ordering::Relaxed);
    }
    fn infra_opened(&self, n: usize) {
        self.infra_units_opened.fetch_add(1, Ordering::Relaxed);
        self.infra_bytes_opened
            .fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// A failed operation: the SQLite code to return and, when we know more,
/// the detailed error for the caller.
#[derive(Debug)]
pub struct Fail {
    pub rc: i32,
    pub detail: Option<StorageError>,
}

impl Fail {
    fn io(rc: i32) -> Self {
        Self { rc, detail: None }
    }
    fn with(rc: i32, detail: StorageError) -> Self {
        Self {
            rc,
            detail: Some(detail),
        }
    }
    fn tampered(path: &str, unit: &Unit) -> Self {
        Self::with(
            ffi::SQLITE_IOERR_DATA,
            StorageError::Tampered {
                path: path.to_string(),
                unit: unit.describe(),
            },
        )
    }
}

/// The last component of a file's path (what a database is bound to).
fn file_name(path: &str) -> String {
    std::path::Path::new(path)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.to_string())
}

/// A database file is bound to the name it was created under: one found
/// under another name was copied or swapped in, and is refused. A file
/// made before the binding is bound at its next header write.
fn check_db_name(header: &mut FileHeader, path: &str, writable: bool) -> Result<(), Fail> {
    let here = file_name(path);
    match &header.db_name {
        Some(n) if *n != here => Err(Fail::with(
            ffi::SQLITE_CANTOPEN,
            StorageError::Header {
                path: path.to_string(),
                reason: format!(
                    "it is the file of database {n}, copied or swapped in under the name {here}; \
                     restore {here} from a backup (and {n} under its own name)"
                ),
            },
        )),
        None if writable => {
            header.db_name = Some(here);
            Ok(())
        }
        _ => Ok(()),
    }
}

/// What every handle on one path shares: identity, key, counters.
pub struct SharedFile {
    pub path: String,
    pub kind: FileKind,
    pub file_id: FileId,
    /// Physical offset of the first unit (0 for header-less temp files).
    pub base: u64,
    /// The unit keys: replaced when a DEK rotation begins or ends.
    keys: RwLock<FileKeys>,
    /// Bytes of tags and nonces per unit: 28, or 76 with the infrastructure layer.
    pub ov: usize,
    /// Page size of a database or WAL, 0 while unknown.
    page_size: AtomicUsize,
    seals_reserved: AtomicU64,
    /// Held by every write to a database or WAL and by each batch of a DEK
    /// rotation: the rotation reads a page, re-seals it and writes it back,
    /// which must not interleave with a checkpoint writing the same page.
    /// Taken before `meta`.
    write_lock: Mutex<()>,
    meta: Mutex<Meta>,
}

/// One generation of unit keys: the data layer's and, with that layer,
/// the infrastructure layer's. A unit is sealed whole under one generation.
struct LayerKeys {
    data: UnitKey,
    infra: Option<InfraUnitKey>,
}

struct FileKeys {
    current: LayerKeys,
    /// During a DEK rotation: the keys of pages not re-sealed yet.
    previous: Option<LayerKeys>,
    /// During a DEK rotation: pages 1 to this one are under `current`,
    /// so it is tried first for them (the previous keys first above).
    watermark: u64,
}

/// Where a database's DEK rotation stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RotationStatus {
    /// Pages re-sealed under the new keys (or found so), from page 1 on.
    pub pages_done: u64,
    /// Pages in the file now.
    pub pages_total: u64,
    pub page_size: u64,
    pub started_unix: u64,
}

impl RotationStatus {
    pub fn complete(&self) -> bool {
        self.pages_done >= self.pages_total
    }
}

struct Meta {
    header: Option<FileHeader>,
    dek: Dek,
    /// The unwrapped infrastructure DEK (for rewrapping at rotation).
    infra_dek: Option<InfraDek>,
    /// During a DEK rotation: the previous DEKs (for rewrapping them at a
    /// key change; dropped, and so zeroized, when the rotation ends).
    previous: Option<(Dek, Option<InfraDek>)>,
    /// The header changed in memory (infrastructure rewrap) and must be
    /// written at the next sync or close.
    header_dirty: bool,
    /// WAL: salts of the current generation, and what of it is complete.
    wal_salts: Option<u64>,
    wal: WalProgress,
    warned_usage: bool,
    /// The slot the current header was last written to (or read from), and
    /// whether a sync has made it durable since. A new header goes to the
    /// other slot only when this one is durable, so some valid slot is
    /// always on disk whatever a crash tears.
    slot: u64,
    slot_synced: bool,
}

/// Which frames of the current WAL generation are complete commits: a
/// commit frame counts once it is written with the generation's salts in
/// its header and a page SQLite wrote (frame header and page are one unit,
/// so both are on disk together).
#[derive(Default, Clone, Copy)]
struct WalProgress {
    /// Frames up to (not including) this one end in a complete commit.
    committed: u64,
    /// One past the highest frame whose page SQLite has written.
    pages_written: u64,
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn companion_kek(parent: &Dek) -> Result<SymmetricKek, atrest_crypto::CryptoError> {
    let k = zeroize::Zeroizing::new(parent.derive(b"atrest companion wrap v1")?);
    SymmetricKek::new(&k)
}

fn companion_binding(parent: FileId, file: FileId, kind: FileKind) -> Vec<u8> {
    let mut b = Vec::with_capacity(33);
    b.extend_from_slice(&parent.0);
    b.extend_from_slice(&file.0);
    b.push(kind as u8);
    b
}

impl SharedFile {
    /// A temp file: random key, never stored, no header.
    pub fn temp(path: String, infra: bool) -> Result<Arc<Self>, Fail> {
        let dek = Dek::generate().map_err(|e| crypto_fail(&path, e))?;
        let key = UnitKey::new(&dek, 0).map_err(|e| crypto_fail(&path, e))?;
        // A throwaway infrastructure key too, from the OS CSPRNG.
        let infra = if infra {
            Some(
                InfraDek::generate()
                    .and_then(|d| InfraUnitKey::new(&d, InfraUnitCipher::NEW_FILES))
                    .map_err(|e| crypto_fail(&path, e))?,
            )
        } else {
            None
        };
        Ok(Arc::new(Self {
            ov: overhead(infra.is_some()),
            keys: RwLock::new(FileKeys {
                current: LayerKeys { data: key, infra },
                previous: None,
                watermark: 0,
            }),
            file_id: FileId::random().map_err(|e| crypto_fail(&path, e))?,
            path,
            kind: FileKind::Temp,
            base: 0,
            page_size: AtomicUsize::new(0),
            seals_reserved: AtomicU64::new(u64::MAX),
            write_lock: Mutex::new(()),
            meta: Mutex::new(Meta {
                header: None,
                dek,
                infra_dek: None,
                previous: None,
                header_dirty: false,
                wal_salts: None,
                wal: WalProgress::default(),
                warned_usage: false,
                slot: 0,
                slot_synced: true,
            }),
        }))
    }

    /// Reads the header of a persistent file, or writes a new one if the
    /// file is empty. `parent` is the open database a journal or WAL
    /// belongs to (needed only to create one).
    pub fn open(
        raw: &mut dyn RawFile,
        kind: FileKind,
        path: String,
        keyring: &Keyring,
        parent: Option<&SharedFile>,
        writable: bool,
    ) -> Result<Arc<Self>, Fail> {
        let phys = raw.size().map_err(Fail::io)?;
        let mut slots = vec![0u8; HEADER_LEN as usize];
        if phys > 0 {
            raw.read_at(&mut slots, 0).map_err(Fail::io)?;
        }
        let decoded: Vec<_> = slots
            .chunks(HEADER_SLOT_SIZE)
            .map(FileHeader::decode_unverified)
            .collect();
        let any_written = decoded.iter().any(|d| !matches!(d, Ok(None)));
        if !any_written && phys <= HEADER_LEN {
            return Self::create(raw, kind, path, keyring, parent, writable);
        }

        // A slot in a format this build does not read (a retired
        // pre-release format or a newer one) is reported as such when no
        // slot is usable, rather than as "not an atrest file".
        let unsupported = decoded.iter().find_map(|d| match d {
            Err(e @ CryptoError::UnsupportedFormat(_)) => Some(StorageError::Header {
                path: path.clone(),
                reason: e.to_string(),
            }),
            _ => None,
        });
        // Newest verifiable slot wins; the other may be torn or older.
        let mut candidates: Vec<_> = decoded
            .into_iter()
            .enumerate()
            .filter_map(|(i, d)| Some((i as u64, d.ok().flatten()?)))
            .collect();
        candidates.sort_by_key(|(_, u)| std::cmp::Reverse(u.claims().sequence));
        let mut last_err = unsupported;
        for (slot, cand) in candidates {
            let claims = cand.claims().clone();
            if claims.kind != kind {
                last_err = Some(StorageError::Header {
                    path: path.clone(),
                    reason: format!(
                        "it is a {} file, opened as a {}",
                        claims.kind.name(),
                        kind.name()
                    ),
                });
                continue;
            }
            let dek = match unwrap_file_dek(keyring, &claims, &path) {
                Ok(d) => d,
                Err(e) => {
                    last_err = Some(e);
                    continue;
                }
            };
            match cand.verify(&dek) {
                Ok(mut header) => {
                    check_parent(&header, parent, &path)?;
                    if kind == FileKind::MainDb {
                        check_db_name(&mut header, &path, writable)?;
                    }
                    let infra_dek = open_infra(keyring, &header, &path)?;
                    let previous = unwrap_previous(keyring, &header, &path)
                        .map_err(|e| Fail::with(ffi::SQLITE_CANTOPEN, e))?;
                    // Count every reserved seal as used: a crash may have used them.
                    let used = header.seals_reserved;
                    let shared = Self::from_header(
                        header,
                        (dek, infra_dek),
                        previous,
                        path,
                        used,
                        (slot, true),
                    )?;
                    if writable {
                        // A file still wrapped under an older infrastructure
                        // master key version is rewrapped at its next sync.
                        shared.rewrap_infra(keyring)?;
                    }
                    return Ok(shared);
                }
                Err(e) => {
                    last_err = Some(StorageError::Header {
                        path: path.clone(),
                        reason: e.to_string(),
                    })
                }
            }
        }
        let detail = last_err.unwrap_or_else(|| StorageError::Header {
            path: path.clone(),
            reason: "not an atrest file (no header slot parses); was it written by plain SQLite or damaged?".into(),
        });
        Err(Fail::with(ffi::SQLITE_CANTOPEN, detail))
    }

    fn from_header(
        header: FileHeader,
        (dek, infra_dek): (Dek, Option<InfraDek>),
        previous: Option<(Dek, Option<InfraDek>)>,
        path: String,
        sealed: u64,
        (slot, slot_synced): (u64, bool),
    ) -> Result<Arc<Self>, Fail> {
        // The unit cipher the file was created with (format 3: AEGIS-256).
        let unit_cipher = header
            .infra
            .as_ref()
            .map_or(InfraUnitCipher::NEW_FILES, |r| r.unit_cipher);
        let current = LayerKeys::new(&dek, infra_dek.as_ref(), unit_cipher, sealed)
            .map_err(|e| crypto_fail(&path, e))?;
        let prev_keys = previous
            .as_ref()
            .map(|(d, i)| LayerKeys::new(d, i.as_ref(), unit_cipher, 0))
            .transpose()
            .map_err(|e| crypto_fail(&path, e))?;
        Ok(Arc::new(Self {
            ov: overhead(current.infra.is_some()),
            keys: RwLock::new(FileKeys {
                current,
                previous: prev_keys,
                watermark: header.rotation.as_ref().map_or(0, |r| r.watermark),
            }),
            path,
            kind: header.kind,
            file_id: header.file_id,
            base: HEADER_LEN,
            page_size: AtomicUsize::new(header.unit_size as usize),
            seals_reserved: AtomicU64::new(header.seals_reserved),
            write_lock: Mutex::new(()),
            meta: Mutex::new(Meta {
                wal_salts: None,
                wal: WalProgress::default(),
                header: Some(header),
                dek,
                infra_dek,
                previous,
                header_dirty: false,
                warned_usage: false,
                slot,
                slot_synced,
            }),
        }))
    }

    fn create(
        raw: &mut dyn RawFile,
        kind: FileKind,
        path: String,
        keyring: &Keyring,
        parent: Option<&SharedFile>,
        writable: bool,
    ) -> Result<Arc<Self>, Fail> {
        let file_id = FileId::random().map_err(|e| crypto_fail(&path, e))?;
        if !writable {
            // Its key would have to be made now and could not be stored: a
            // later read-write open would seal pages under a lost key.
            return Err(Fail::with(
                ffi::SQLITE_CANTOPEN,
                StorageError::Unsupported {
                    path,
                    what: "the file is empty and opened read-only; create it with a read-write open first".into(),
                },
            ));
        }
        let (dek, key_source) = if kind == FileKind::MainDb {
            let (dek, wrapped) = keyring.new_wrapped_dek().map_err(|e| {
                Fail::with(
                    ffi::SQLITE_CANTOPEN,
                    StorageError::Key {
                        path: path.clone(),
                        source: e,
                    },
                )
            })?;
            (dek, KeySource::Kek(wrapped))
        } else {
            let parent = parent.ok_or_else(|| {
                Fail::with(
                    ffi::SQLITE_CANTOPEN,
                    StorageError::Unsupported {
                        path: path.clone(),
                        what: format!(
                            "a {} is being created for a database that is not open",
                            kind.name()
                        ),
                    },
                )
            })?;
            let pmeta = parent.meta.lock().unwrap();
            let parent_header = pmeta.header.as_ref().ok_or_else(|| {
                Fail::with(
                    ffi::SQLITE_CANTOPEN,
                    StorageError::Unsupported {
                        path: path.clone(),
                        what: "the parent database has no header (opened read-only while empty)"
                            .into(),
                    },
                )
            })?;
            let KeySource::Kek(parent_wrapped) = &parent_header.key_source else {
                return Err(Fail::io(ffi::SQLITE_CANTOPEN));
            };
            let dek = Dek::generate().map_err(|e| crypto_fail(&path, e))?;
            let wrapped = companion_kek(&pmeta.dek)
                .and_then(|k| k.wrap(&dek, &companion_binding(parent.file_id, file_id, kind)))
                .map_err(|e| crypto_fail(&path, e))?;
            (
                dek,
                KeySource::Parent {
                    parent_file_id: parent.file_id,
                    parent_dek_id: pmeta.dek.id(),
                    parent_wrapped: parent_wrapped.clone(),
                    wrapped,
                },
            )
        };
        let (infra_dek, infra) = match keyring.infra() {
            Some(protector) => {
                let idek = InfraDek::generate().map_err(|e| crypto_fail(&path, e))?;
                let wrapped = protector
                    .wrap(&idek, file_id, kind)
                    .map_err(|source| infra_key_fail(&path, source))?;
                let record = InfraKeyRecord {
                    dek_id: idek.id(),
                    wrapped,
                    unit_cipher: InfraUnitCipher::NEW_FILES,
                };
                (Some(idek), Some(record))
            }
            None => (None, None),
        };
        let header = FileHeader {
            sequence: 0,
            kind,
            cipher: CipherId::Aes256GcmRandomNonce,
            file_id,
            dek_id: dek.id(),
            unit_size: if kind == FileKind::Journal || kind == FileKind::SuperJournal {
                journal_block(overhead(infra.is_some())) as u32
            } else {
                0
            },
            infra,
            created_unix: now_unix(),
            key_source,
            seals_reserved: SEAL_LEASE,
            wal_salts: 0,
            wal_durable_frames: 0,
            rotation: None,
            fs: None,
            db_name: (kind == FileKind::MainDb).then(|| file_name(&path)),
        };
        {
            let mut slots = header.encode(&dek).map_err(|e| crypto_fail(&path, e))?;
            slots.resize(HEADER_LEN as usize, 0);
            raw.write_at(&slots, 0).map_err(Fail::io)?;
            if kind == FileKind::MainDb {
                // A database must never exist with pages but no header.
                raw.sync(ffi::SQLITE_SYNC_NORMAL).map_err(Fail::io)?;
            }
        }
        Self::from_header(
            header,
            (dek, infra_dek),
            None,
            path,
            0,
            (0, kind == FileKind::MainDb),
        )
    }

    /// If the file's infrastructure DEK is wrapped under another master key
    /// version than the keyring's current one, rewraps it (in memory; the
    /// header is written at the next sync or close of a handle). Returns
    /// whether it did. The data layer's keys are not touched.
    pub fn rewrap_infra(&self, keyring: &Keyring) -> Result<bool, Fail> {
        let Some(protector) = keyring.infra() else {
            return Ok(false);
        };
        let mut meta = self.meta.lock().unwrap();
        let Meta {
            header: Some(header),
            infra_dek: Some(idek),
            previous,
            ..
        } = &mut *meta
        else {
            return Ok(false);
        };
        let Some(record) = header.infra.as_mut() else {
            return Ok(false);
        };
        let current = protector.current_kek();
        let mut changed = false;
        if record.wrapped.kek != current {
            record.wrapped = protector
                .wrap(idek, self.file_id, self.kind)
                .map_err(|source| infra_key_fail(&self.path, source))?;
            changed = true;
        }
        if let (Some(rotation), Some((_, Some(prev_idek)))) = (header.rotation.as_mut(), previous) {
            if let Some(prev) = rotation.previous_infra.as_mut() {
                if prev.wrapped.kek != current {
                    prev.wrapped = protector
                        .wrap(prev_idek, self.file_id, self.kind)
                        .map_err(|source| infra_key_fail(&self.path, source))?;
                    changed = true;
                }
            }
        }
        meta.header_dirty |= changed;
        Ok(changed)
    }

    /// Whether a rewrapped header still waits to be written.
    /// A WAL's current generation (its salts) and how many of its frames
    /// end in complete commits written through this process; `None` before
    /// the WAL header is known.
    pub fn wal_committed(&self) -> Option<(u64, u64)> {
        let meta = self.meta.lock().unwrap();
        Some((meta.wal_salts?, meta.wal.committed))
    }

    /// The page size recorded or learned so far (0 while unknown).
    pub fn known_page_size(&self) -> usize {
        self.page_size.load(Ordering::Relaxed)
    }

    pub fn header_dirty(&self) -> bool {
        self.meta.lock().unwrap().header_dirty
    }

    /// Seals one unit with every layer of the file, under its current keys.
    fn seal_unit(&self, ctx: &SealContext, unit: &mut [u8], stats: &Stats) -> Result<(), Fail> {
        self.keys
            .read()
            .unwrap()
            .current
            .seal(ctx, unit, stats)
            .map_err(|e| crypto_fail(&self.path, e))
    }

    /// Opens one unit through every layer, outermost first. On success the
    /// unit's last `ov` bytes are zero. During a DEK rotation a unit opens
    /// under the current or the previous keys (each binds its DEK id in
    /// the associated data, so a unit opens under the keys it was sealed
    /// with or not at all).
    pub(crate) fn open_unit(
        &self,
        ctx: &SealContext,
        unit: &mut [u8],
        stats: &Stats,
    ) -> Result<(), CryptoError> {
        let keys = self.keys.read().unwrap();
        let Some(previous) = &keys.previous else {
            return keys.current.open(ctx, unit, stats);
        };
        // Page numbers start at 1: pages 1..=watermark are done.
        let (first, second) = if ctx.index <= keys.watermark {
            (&keys.current, previous)
        } else {
            (previous, &keys.current)
        };
        let sealed = unit.to_vec();
        if first.open(ctx, unit, stats).is_ok() {
            return Ok(());
        }
        unit.copy_from_slice(&sealed);
        second.open(ctx, unit, stats)
    }

    /// The current data-layer DEK's id.
    pub fn dek_id(&self) -> DekId {
        self.keys.read().unwrap().current.data.dek_id()
    }

    /// During a DEK rotation, the previous data-layer DEK's id.
    fn previous_dek_id(&self) -> Option<DekId> {
        self.keys
            .read()
            .unwrap()
            .previous
            .as_ref()
            .map(|p| p.data.dek_id())
    }

    /// Seals made so far under this file's current data-layer DEK: what
    /// the usage limit of docs/CRYPTO.md counts.
    pub fn seals_used(&self) -> u64 {
        self.keys.read().unwrap().current.data.sealed_count()
    }
}

impl LayerKeys {
    fn new(
        dek: &Dek,
        infra: Option<&InfraDek>,
        unit_cipher: InfraUnitCipher,
        sealed: u64,
    ) -> Result<Self, CryptoError> {
        Ok(Self {
            data: UnitKey::new(dek, sealed)?,
            infra: infra
                .map(|d| InfraUnitKey::new(d, unit_cipher))
                .transpose()?,
        })
    }

    /// The data layer over all but the last `INFRA_OVERHEAD` (48) bytes,
    /// then the infrastructure layer over all.
    fn seal(&self, ctx: &SealContext, unit: &mut [u8], stats: &Stats) -> Result<(), CryptoError> {
        let n = unit.len();
        match &self.infra {
            None => {
                self.data.seal(ctx, unit)?;
                stats.sealed(n);
            }
            Some(infra) => {
                if n < SEAL_OVERHEAD + INFRA_OVERHEAD {
                    return Err(CryptoError::UnitTooShort {
                        len: n,
                        min: SEAL_OVERHEAD + INFRA_OVERHEAD,
                    });
                }
                self.data.seal(ctx, &mut unit[..n - INFRA_OVERHEAD])?;
                stats.sealed(n - INFRA_OVERHEAD);
                infra.seal(ctx, unit)?;
                stats.infra_sealed(n);
            }
        }
        Ok(())
    }

    fn open(&self, ctx: &SealContext, unit: &mut [u8], stats: &Stats) -> Result<(), CryptoError> {
        let n = unit.len();
        match &self.infra {
            None => {
                self.data.open(ctx, unit)?;
                stats.opened(n);
            }
            Some(infra) => {
                if n < SEAL_OVERHEAD + INFRA_OVERHEAD {
                    return Err(CryptoError::UnitTooShort {
                        len: n,
                        min: SEAL_OVERHEAD + INFRA_OVERHEAD,
                    });
                }
                infra.open(ctx, unit)?;
                stats.infra_opened(n);
                self.data.open(ctx, &mut unit[..n - INFRA_OVERHEAD])?;
                stats.opened(n - INFRA_OVERHEAD);
            }
        }
        Ok(())
    }
}

/// Tag and nonce bytes per unit with or without the infrastructure layer.
pub fn overhead(infra: bool) -> usize {
    SEAL_OVERHEAD + if infra { INFRA_OVERHEAD } else { 0 }
}

fn infra_key_fail(path: &str, source: atrest_crypto::ProtectorError) -> Fail {
    Fail::with(
        ffi::SQLITE_CANTOPEN,
        StorageError::InfraKey {
            path: path.to_string(),
            source,
        },
    )
}

/// A new infrastructure DEK for a file whose header has that layer (same
/// unit cipher), wrapped under the current infrastructure master key.
fn new_infra_key(
    keyring: &Keyring,
    header: &FileHeader,
    path: &str,
) -> Result<(Option<InfraDek>, Option<InfraKeyRecord>), Fail> {
    let Some(old) = &header.infra else {
        return Ok((None, None));
    };
    let Some(protector) = keyring.infra() else {
        return Err(Fail::with(
            ffi::SQLITE_IOERR,
            StorageError::Layers {
                path: path.to_string(),
                file: header.layers().names().join(" + "),
                data_dir: "data".into(),
            },
        ));
    };
    let idek = InfraDek::generate().map_err(|e| crypto_fail(path, e))?;
    let wrapped = protector
        .wrap(&idek, header.file_id, header.kind)
        .map_err(|source| infra_key_fail(path, source))?;
    let record = InfraKeyRecord {
        dek_id: idek.id(),
        wrapped,
        unit_cipher: old.unit_cipher,
    };
    Ok((Some(idek), Some(record)))
}

/// Checks that a verified header names the layers the data directory
/// uses, and unwraps its infrastructure DEK.
fn open_infra(
    keyring: &Keyring,
    header: &FileHeader,
    path: &str,
) -> Result<Option<InfraDek>, Fail> {
    let want = keyring.infra().is_some();
    if header.layers().infrastructure != want {
        return Err(Fail::with(
            ffi::SQLITE_CANTOPEN,
            StorageError::Layers {
                path: path.to_string(),
                file: header.layers().names().join(" + "),
                data_dir: if want {
                    "data + infrastructure"
                } else {
                    "data"
                }
                .into(),
            },
        ));
    }
    unwrap_infra_dek(keyring, header, path).map_err(|e| Fail::with(ffi::SQLITE_CANTOPEN, e))
}

/// Unwraps the infrastructure DEK a verified header names, if any.
pub fn unwrap_infra_dek(
    keyring: &Keyring,
    header: &FileHeader,
    path: &str,
) -> Result<Option<InfraDek>, StorageError> {
    match &header.infra {
        None => Ok(None),
        Some(record) => unwrap_infra_record(keyring, header, record, path).map(Some),
    }
}

/// Unwraps one infrastructure key record of a verified header.
pub(crate) fn unwrap_infra_record(
    keyring: &Keyring,
    header: &FileHeader,
    record: &InfraKeyRecord,
    path: &str,
) -> Result<InfraDek, StorageError> {
    let protector = keyring.infra().ok_or_else(|| StorageError::Layers {
        path: path.to_string(),
        file: header.layers().names().join(" + "),
        data_dir: "data".into(),
    })?;
    let unwrapped = protector.unwrap(record.dek_id, &record.wrapped, header.file_id, header.kind);
    let unwrapped = match (unwrapped, keyring.infra_previous()) {
        (Err(atrest_crypto::ProtectorError::NotMine { .. }), Some(previous)) => {
            previous.unwrap(record.dek_id, &record.wrapped, header.file_id, header.kind)
        }
        (r, _) => r,
    };
    unwrapped.map_err(|source| StorageError::InfraKey {
        path: path.to_string(),
        source,
    })
}

/// Unwraps the previous DEKs a verified header names while its DEK
/// rotation runs.
pub(crate) fn unwrap_previous(
    keyring: &Keyring,
    header: &FileHeader,
    path: &str,
) -> Result<Option<(Dek, Option<InfraDek>)>, StorageError> {
    let Some(rotation) = &header.rotation else {
        return Ok(None);
    };
    let dek = keyring
        .unwrap(rotation.previous_dek_id, &rotation.previous_wrapped)
        .map_err(|source| StorageError::Key {
            path: path.to_string(),
            source,
        })?;
    let infra = rotation
        .previous_infra
        .as_ref()
        .map(|r| unwrap_infra_record(keyring, header, r, path))
        .transpose()?;
    Ok(Some((dek, infra)))
}

/// A journal or WAL must belong to the database it is opened for: one from
/// another database (same KEK, so it unwraps fine) must not be replayed
/// into this one. Without an open parent (a child journal that SQLite opens
/// through a super-journal only to read its name) there is nothing to
/// compare with.
fn check_parent(header: &FileHeader, parent: Option<&SharedFile>, path: &str) -> Result<(), Fail> {
    let (
        KeySource::Parent {
            parent_file_id,
            parent_dek_id,
            ..
        },
        Some(parent),
    ) = (&header.key_source, parent)
    else {
        return Ok(());
    };
    // Mid-rotation, a companion made before the rotation began names the
    // database's previous DEK.
    let known_dek =
        *parent_dek_id == parent.dek_id() || Some(*parent_dek_id) == parent.previous_dek_id();
    if *parent_file_id != parent.file_id || !known_dek {
        return Err(Fail::with(
            ffi::SQLITE_CANTOPEN,
            StorageError::Header {
                path: path.to_string(),
                reason: format!(
                    "this {} belongs to database file {parent_file_id}, not to {} (file {}): \
                     it was copied here from another database; move it away",
                    header.kind.name(),
                    parent.path,
                    parent.file_id
                ),
            },
        ));
    }
    Ok(())
}

fn crypto_fail(path: &str, e: atrest_crypto::CryptoError) -> Fail {
    Fail::with(
        ffi::SQLITE_IOERR,
        StorageError::Crypto {
            path: path.to_string(),
            source: e,
        },
    )
}

/// Unwraps the DEK a header names, through its parent for companion files.
pub fn unwrap_file_dek(
    keyring: &Keyring,
    claims: &FileHeader,
    path: &str,
) -> Result<Dek, StorageError> {
    let key_err = |source| StorageError::Key {
        path: path.to_string(),
        source,
    };
    match &claims.key_source {
        KeySource::Kek(w) => keyring.unwrap(claims.dek_id, w).map_err(key_err),
        KeySource::Parent {
            parent_file_id,
            parent_dek_id,
            parent_wrapped,
            wrapped,
        } => {
            let parent = keyring
                .unwrap(*parent_dek_id, parent_wrapped)
                .map_err(key_err)?;
            companion_kek(&parent)
                .and_then(|k| {
                    k.unwrap(
                        claims.dek_id,
                        wrapped,
                        &companion_binding(*parent_file_id, claims.file_id, claims.kind),
                    )
                })
                .map_err(|_| StorageError::Header {
                    path: path.to_string(),
                    reason: "the file's key does not unwrap under its parent database's key (header altered or from another database)".into(),
                })
        }
    }
}

/// Rewraps the infrastructure DEKs of a file that no handle has open,
/// under the keyring's current infrastructure master key version (see
/// [`crate::offline::rewrap_at_rest`] for the crash safety). Returns
/// `Ok(false)` if they already were, or if the file is not an atrest file
/// with a header (nothing to rewrap).
pub fn rewrap_infra_at_rest(
    path: &std::path::Path,
    keyring: &Keyring,
) -> Result<bool, StorageError> {
    use std::os::unix::fs::FileExt;
    let name = path.display().to_string();
    let f = std::fs::File::open(path).map_err(|e| StorageError::DataDir {
        path: name.clone(),
        reason: e.to_string(),
    })?;
    let mut slots = vec![0u8; HEADER_LEN as usize];
    let n = f
        .read_at(&mut slots, 0)
        .map_err(|e| StorageError::DataDir {
            path: name.clone(),
            reason: e.to_string(),
        })?;
    if n < 14
        || &slots[..8] != b"ATRESTH1"
            && &slots[HEADER_SLOT_SIZE..HEADER_SLOT_SIZE + 8] != b"ATRESTH1"
    {
        return Ok(false); // not an atrest file (a stray file): nothing to do
    }
    crate::offline::rewrap_layers_at_rest(path, keyring, false)
}

/// One open handle.
pub struct EncryptedFile<R: RawFile> {
    raw: R,
    shared: Arc<SharedFile>,
    stats: Arc<Stats>,
    scratch: Vec<u8>,
    /// Temp files only (one private handle, no crash consistency needed):
    /// the block being appended, kept in plaintext until it is full or
    /// another operation needs the disk, so sequential writes at any
    /// alignment seal each block once.
    tail: Option<TailBlock>,
    /// The tail block's plaintext (allocated once per handle).
    tail_buf: Vec<u8>,
    /// Temp files only: logical size including the tail.
    temp_len: u64,
    /// Verification of a copy (backup, archive): a WAL frame that does not
    /// authenticate is an error even past the synced end, since a copy is
    /// taken at a commit boundary and can have no torn tail.
    strict: bool,
    /// WAL only: a frame whose first bytes (its header) SQLite has written
    /// and whose page is expected next; sealed with the page as one unit.
    /// Its bytes (salts prefix included) are in `frame_buf`.
    pending: Option<PendingFrame>,
    frame_buf: Vec<u8>,
    /// WAL only: the frame the previous operation on this handle read and
    /// opened; its plaintext is still in `scratch`. Lets SQLite's checksum
    /// rewrite (read a frame, write back its header) re-seal without
    /// reading and opening the frame again.
    last_read: Option<LastRead>,
}

#[derive(Clone, Copy)]
struct TailBlock {
    index: u64,
    len: usize,
}

/// Which buffer holds a WAL frame to seal.
#[derive(Clone, Copy)]
enum FrameIn {
    Scratch,
    FrameBuf,
}

/// The largest `ov`: both layers' tags and nonces.
const MAX_OVERHEAD: usize = SEAL_OVERHEAD + INFRA_OVERHEAD;

#[derive(Clone, Copy)]
struct PendingFrame {
    unit: Unit,
    /// Logical bytes of the frame written so far, from its start.
    filled: usize,
}

struct LastRead {
    index: u64,
    /// The frame's sealed trailer as read (tags and nonces; the first `ov`
    /// bytes): unique per seal, so an equal trailer on disk means the same
    /// sealed frame.
    trailer: [u8; MAX_OVERHEAD],
}

impl<R: RawFile> EncryptedFile<R> {
    pub fn new(raw: R, shared: Arc<SharedFile>, stats: Arc<Stats>) -> Self {
        Self {
            raw,
            shared,
            stats,
            scratch: Vec::new(),
            tail: None,
            tail_buf: Vec::new(),
            temp_len: 0,
            strict: false,
            pending: None,
            frame_buf: Vec::new(),
            last_read: None,
        }
    }

    /// Makes every unit that fails authentication an error (see `strict`).
    pub fn strict(mut self) -> Self {
        self.strict = true;
        self
    }

    pub fn shared(&self) -> &Arc<SharedFile> {
        &self.shared
    }

    fn path(&self) -> &str {
        &self.shared.path
    }

    fn ctx(&self, unit: &Unit, generation: u64) -> SealContext {
        SealContext {
            file_id: self.shared.file_id,
            kind: self.shared.kind,
            class: unit.class,
            index: unit.index,
            generation,
        }
    }

    fn geometry(&mut self) -> Result<Geometry, Fail> {
        let base = self.shared.base;
        let ov = self.shared.ov;
        Ok(match self.shared.kind {
            FileKind::MainDb => Geometry::Pages {
                page_size: self.page_size()?,
                base,
                ov,
            },
            FileKind::Wal => Geometry::Wal {
                page_size: self.wal_page_size()?,
                base,
                ov,
            },
            FileKind::Temp => Geometry::Blocks {
                base,
                block: TEMP_BLOCK,
                ov,
            },
            _ => Geometry::Blocks {
                base,
                block: journal_block(ov),
                ov,
            },
        })
    }

    /// The database page size, as first written and recorded in the
    /// header (4096 for a file with no page yet).
    fn page_size(&mut self) -> Result<usize, Fail> {
        match self.shared.page_size.load(Ordering::Relaxed) {
            0 => Ok(4096),
            known => Ok(known),
        }
    }

    /// The WAL's page size, from its (sealed) WAL header if not yet known.
    fn wal_page_size(&mut self) -> Result<usize, Fail> {
        let known = self.shared.page_size.load(Ordering::Relaxed);
        if known != 0 {
            return Ok(known);
        }
        let unit = Geometry::Wal {
            page_size: 512,
            base: self.shared.base,
            ov: self.shared.ov,
        }
        .unit_at(0);
        let mut buf = vec![0u8; unit.plen()];
        if !self.raw.read_at(&mut buf, unit.pstart).map_err(Fail::io)? {
            return Ok(512); // no header yet: nothing to map
        }
        let ctx = self.ctx(&unit, 0);
        if self.shared.open_unit(&ctx, &mut buf, &self.stats).is_err() {
            return Err(Fail::tampered(self.path(), &unit));
        }
        self.learn_wal_header(&buf[..WAL_HEADER]);
        Ok(self.shared.page_size.load(Ordering::Relaxed).max(512))
    }

    fn learn_wal_header(&self, hdr: &[u8]) {
        let p = u32::from_be_bytes(hdr[8..12].try_into().unwrap()) as usize;
        if p.is_power_of_two() && (512..=65536).contains(&p) {
            self.shared.page_size.store(p, Ordering::Relaxed);
        }
        let salts = u64::from_be_bytes(hdr[16..24].try_into().unwrap());
        let mut meta = self.shared.meta.lock().unwrap();
        if meta.wal_salts != Some(salts) {
            meta.wal_salts = Some(salts);
            meta.wal = WalProgress::default();
        }
    }

    fn current_salts(&self) -> u64 {
        self.shared.meta.lock().unwrap().wal_salts.unwrap_or(0)
    }

    /// Frames of the current WAL generation known to be synced, from the
    /// header (0 if the header describes another generation).
    fn wal_durable(&self) -> u64 {
        let meta = self.shared.meta.lock().unwrap();
        match (&meta.header, meta.wal_salts) {
            (Some(h), Some(s)) if h.wal_salts == s => h.wal_durable_frames,
            _ => 0,
        }
    }

    fn seal(
        &mut self,
        unit: &Unit,
        generation: u64,
        sealed: std::ops::Range<usize>,
    ) -> Result<(), Fail> {
        let mut buf = std::mem::take(&mut self.scratch);
        let r = self.seal_buf(unit, generation, &mut buf[sealed]);
        self.scratch = buf;
        r
    }

    /// Seals `buf` (the unit's sealed part) with every layer of the file
    /// and extends the DEK's seal reservation when it runs out.
    fn seal_buf(&mut self, unit: &Unit, generation: u64, buf: &mut [u8]) -> Result<(), Fail> {
        let ctx = self.ctx(unit, generation);
        self.shared.seal_unit(&ctx, buf, &self.stats)?;
        if self.shared.seals_used() >= self.shared.seals_reserved.load(Ordering::Relaxed) {
            self.extend_seal_lease()?;
        }
        Ok(())
    }

    fn extend_seal_lease(&mut self) -> Result<(), Fail> {
        let shared = Arc::clone(&self.shared);
        let mut meta = shared.meta.lock().unwrap();
        let Some(header) = meta.header.as_mut() else {
            return Ok(()); // temp files: the key dies with the file
        };
        header.seals_reserved = shared.seals_used() + SEAL_LEASE;
        shared
            .seals_reserved
            .store(header.seals_reserved, Ordering::Relaxed);
        if header.seals_reserved >= SEAL_USAGE_WARN && !meta.warned_usage {
            meta.warned_usage = true;
            tracing::warn!(file = %shared.path, sealed = shared.seals_used(),
                "data encryption key is past half of its usage limit; rotate it (docs/CRYPTO.md)");
        }
        self.write_header_locked(&mut meta)?;
        // The reservation must be durable before seals beyond the old one
        // can reach the disk, or a crash could make the count too low.
        self.raw.sync(ffi::SQLITE_SYNC_NORMAL).map_err(Fail::io)?;
        meta.slot_synced = true;
        Ok(())
    }

    /// Writes the next header slot (the other slot stays as it was).
    fn write_header_locked(&mut self, meta: &mut Meta) -> Result<(), Fail> {
        let Some(header) = meta.header.as_mut() else {
            return Ok(());
        };
        header.sequence += 1;
        let bytes = header
            .encode(&meta.dek)
            .map_err(|e| crypto_fail(&self.shared.path, e))?;
        let slot = if meta.slot_synced {
            1 - meta.slot
        } else {
            meta.slot
        };
        self.raw
            .write_at(&bytes, slot * HEADER_SLOT_SIZE as u64)
            .map_err(Fail::io)?;
        meta.slot = slot;
        meta.slot_synced = false;
        meta.header_dirty = false;
        Ok(())
    }

    /// Records this file's DEK under a new wrapping without touching a
    /// page: a database's DEK (and mid-rotation its previous DEK) wrapped
    /// under the keyring's current KEK, or, for a WAL or journal, its
    /// parent's new wrapping, picked from `parent_wrappings` by the
    /// parent DEK it names. The header goes to both slots, each made
    /// durable before the next is written: at every moment some slot is
    /// valid (old or new wrapping), and afterwards no slot holds the old
    /// one. Returns the wrappings now recorded, current DEK first.
    pub fn rewrap(
        &mut self,
        keyring: &Keyring,
        parent_wrappings: &[(DekId, WrappedDek)],
    ) -> Result<Vec<(DekId, WrappedDek)>, Fail> {
        let shared = Arc::clone(&self.shared);
        let mut meta = shared.meta.lock().unwrap();
        let key_fail = |e| {
            Fail::with(
                ffi::SQLITE_IOERR,
                StorageError::Key {
                    path: shared.path.clone(),
                    source: e,
                },
            )
        };
        let Some(header) = meta.header.clone() else {
            return Err(Fail::io(ffi::SQLITE_MISUSE));
        };
        let mut recorded = vec![];
        let mut header = header;
        match (&mut header.key_source, parent_wrappings.is_empty()) {
            (KeySource::Kek(w), true) => {
                *w = keyring.wrap(&meta.dek).map_err(key_fail)?;
                recorded.push((header.dek_id, w.clone()));
                if let (Some(r), Some((prev, _))) = (header.rotation.as_mut(), &meta.previous) {
                    r.previous_wrapped = keyring.wrap(prev).map_err(key_fail)?;
                    recorded.push((r.previous_dek_id, r.previous_wrapped.clone()));
                }
            }
            (
                KeySource::Parent {
                    parent_dek_id,
                    parent_wrapped,
                    ..
                },
                false,
            ) => {
                let (_, w) = parent_wrappings
                    .iter()
                    .find(|(id, _)| id == parent_dek_id)
                    .ok_or_else(|| Fail::io(ffi::SQLITE_MISUSE))?;
                *parent_wrapped = w.clone();
                recorded.push((*parent_dek_id, w.clone()));
            }
            _ => return Err(Fail::io(ffi::SQLITE_MISUSE)),
        }
        if !meta.slot_synced {
            self.raw.sync(ffi::SQLITE_SYNC_NORMAL).map_err(Fail::io)?;
            meta.slot_synced = true;
        }
        meta.header = Some(header);
        self.write_header_both_slots(&mut meta)?;
        Ok(recorded)
    }

    /// Writes the header to both slots, each made durable before the
    /// other is written, so that afterwards no slot holds what it replaced.
    fn write_header_both_slots(&mut self, meta: &mut Meta) -> Result<(), Fail> {
        for _ in 0..2 {
            self.write_header_locked(meta)?;
            self.raw.sync(ffi::SQLITE_SYNC_NORMAL).map_err(Fail::io)?;
            meta.slot_synced = true;
        }
        Ok(())
    }

    fn require_database(&self) -> Result<(), Fail> {
        if self.shared.kind == FileKind::MainDb && self.shared.base == HEADER_LEN {
            return Ok(());
        }
        Err(Fail::with(
            ffi::SQLITE_MISUSE,
            StorageError::Unsupported {
                path: self.path().to_string(),
                what: format!("DEK rotation of a {} file", self.shared.kind.name()),
            },
        ))
    }

    /// Whole pages in the database file now.
    fn pages_in_file(&mut self) -> Result<u64, Fail> {
        let phys = self.raw.size().map_err(Fail::io)?;
        Ok(phys.saturating_sub(self.shared.base) / self.page_size()? as u64)
    }

    fn rotation_status(&mut self, rotation: &Rotation) -> Result<RotationStatus, Fail> {
        Ok(RotationStatus {
            pages_done: rotation.watermark,
            pages_total: self.pages_in_file()?,
            page_size: self.page_size()? as u64,
            started_unix: rotation.started_unix,
        })
    }

    /// Where this database's DEK rotation stands; `None` if none runs.
    pub fn rotation(&mut self) -> Result<Option<RotationStatus>, Fail> {
        self.require_database()?;
        let rotation = self
            .shared
            .meta
            .lock()
            .unwrap()
            .header
            .as_ref()
            .and_then(|h| h.rotation.clone());
        rotation.map(|r| self.rotation_status(&r)).transpose()
    }

    /// Begins a DEK rotation of this database file (or returns the one
    /// under way). New data-layer and infrastructure DEKs become current
    /// and seal every unit from now on; the old ones stay in the header,
    /// wrapped as before, to open the pages not re-sealed yet. The header
    /// naming the new keys is durable before any unit is sealed under them.
    pub fn rotation_begin(&mut self, keyring: &Keyring) -> Result<RotationStatus, Fail> {
        self.require_database()?;
        let shared = Arc::clone(&self.shared);
        let _writes = shared.write_lock.lock().unwrap();
        let mut meta = shared.meta.lock().unwrap();
        let header = meta
            .header
            .clone()
            .ok_or_else(|| Fail::io(ffi::SQLITE_MISUSE))?;
        if let Some(r) = &header.rotation {
            drop(meta);
            return self.rotation_status(r);
        }
        let path = shared.path.clone();
        let KeySource::Kek(old_wrapped) = &header.key_source else {
            return Err(Fail::io(ffi::SQLITE_MISUSE));
        };
        let (dek, wrapped) = keyring.new_wrapped_dek().map_err(|source| {
            Fail::with(
                ffi::SQLITE_IOERR,
                StorageError::Key {
                    path: path.clone(),
                    source,
                },
            )
        })?;
        let (infra_dek, infra) = new_infra_key(keyring, &header, &path)?;
        let unit_cipher = infra
            .as_ref()
            .map_or(InfraUnitCipher::NEW_FILES, |r| r.unit_cipher);
        let new_keys = LayerKeys::new(&dek, infra_dek.as_ref(), unit_cipher, 0)
            .map_err(|e| crypto_fail(&path, e))?;
        let mut next = header.clone();
        next.rotation = Some(Rotation {
            previous_dek_id: header.dek_id,
            previous_wrapped: old_wrapped.clone(),
            previous_infra: header.infra.clone(),
            watermark: 0,
            started_unix: now_unix(),
        });
        next.dek_id = dek.id();
        next.key_source = KeySource::Kek(wrapped);
        next.infra = infra;
        next.seals_reserved = SEAL_LEASE;
        if !meta.slot_synced {
            self.raw.sync(ffi::SQLITE_SYNC_NORMAL).map_err(Fail::io)?;
            meta.slot_synced = true;
        }
        // Written under the new DEK; on failure the file keeps its keys.
        let old_dek = std::mem::replace(&mut meta.dek, dek);
        meta.header = Some(next);
        let written = self
            .write_header_locked(&mut meta)
            .and_then(|()| self.raw.sync(ffi::SQLITE_SYNC_NORMAL).map_err(Fail::io));
        if let Err(e) = written {
            meta.dek = old_dek;
            meta.header = Some(header);
            return Err(e);
        }
        meta.slot_synced = true;
        let old_infra = std::mem::replace(&mut meta.infra_dek, infra_dek);
        meta.previous = Some((old_dek, old_infra));
        {
            let mut keys = shared.keys.write().unwrap();
            let old = std::mem::replace(&mut keys.current, new_keys);
            keys.previous = Some(old);
            keys.watermark = 0;
        }
        shared.seals_reserved.store(SEAL_LEASE, Ordering::Relaxed);
        let rotation = meta
            .header
            .as_ref()
            .and_then(|h| h.rotation.clone())
            .expect("set above");
        drop(meta);
        tracing::info!(file = %shared.path, "DEK rotation began");
        self.rotation_status(&rotation)
    }

    /// Re-seals up to `max_pages` pages of a running DEK rotation under
    /// the current keys, from where it stands, and records the progress.
    /// A page already under the current keys (written since the rotation
    /// began) is left as it is; a page that was never written (all zero,
    /// like SQLite's lock-byte page) is skipped. Pages are durable before
    /// the header says they are done, so a crash at any point resumes
    /// correctly. `Ok(None)`: no rotation runs.
    pub fn rotation_step(&mut self, max_pages: u64) -> Result<Option<RotationStatus>, Fail> {
        self.require_database()?;
        let shared = Arc::clone(&self.shared);
        let _writes = shared.write_lock.lock().unwrap();
        let Some(rotation) = shared
            .meta
            .lock()
            .unwrap()
            .header
            .as_ref()
            .and_then(|h| h.rotation.clone())
        else {
            return Ok(None);
        };
        let total = self.pages_in_file()?;
        let geo = self.geometry()?;
        let ps = self.page_size()? as u64;
        let end = rotation.watermark.saturating_add(max_pages).min(total);
        let mut wrote = false;
        let mut sealed = vec![];
        for page in rotation.watermark + 1..=end {
            let unit = geo.unit_at((page - 1) * ps);
            let plen = unit.plen();
            if !self.read_unit_into_scratch(&unit)? {
                break;
            }
            if self.scratch[..plen].iter().all(|&b| b == 0) {
                continue;
            }
            let ctx = self.ctx(&unit, 0);
            sealed.clear();
            sealed.extend_from_slice(&self.scratch[..plen]);
            let under_previous = {
                let keys = shared.keys.read().unwrap();
                keys.previous.as_ref().is_some_and(|prev| {
                    prev.open(&ctx, &mut self.scratch[..plen], &self.stats)
                        .is_ok()
                })
            };
            if !under_previous {
                self.scratch[..plen].copy_from_slice(&sealed);
                let current = shared.keys.read().unwrap().current.open(
                    &ctx,
                    &mut self.scratch[..plen],
                    &self.stats,
                );
                if current.is_err() {
                    return Err(Fail::tampered(self.path(), &unit));
                }
                continue;
            }
            self.seal(&unit, 0, 0..plen)?;
            self.raw
                .write_at(&self.scratch[..plen], unit.pstart)
                .map_err(Fail::io)?;
            wrote = true;
        }
        if wrote {
            self.raw.sync(ffi::SQLITE_SYNC_NORMAL).map_err(Fail::io)?;
        }
        let mut meta = shared.meta.lock().unwrap();
        if wrote {
            meta.slot_synced = true;
        }
        if let Some(r) = meta.header.as_mut().and_then(|h| h.rotation.as_mut()) {
            r.watermark = end;
        }
        // Not synced: a lost header write only makes the rotation redo
        // pages (the pages themselves are durable already).
        self.write_header_locked(&mut meta)?;
        shared.keys.write().unwrap().watermark = end;
        drop(meta);
        Ok(Some(RotationStatus {
            pages_done: end,
            pages_total: total,
            page_size: ps,
            started_unix: rotation.started_unix,
        }))
    }

    /// Ends a DEK rotation whose pages are all done: the previous keys
    /// leave the header (both slots, each durable before the other is
    /// written) and memory. The caller has rekeyed the WAL first
    /// ([`Self::rekey_empty_wal`]), so no companion names them either.
    pub fn rotation_finish(&mut self, keyring: &Keyring) -> Result<(), Fail> {
        self.require_database()?;
        let shared = Arc::clone(&self.shared);
        let _writes = shared.write_lock.lock().unwrap();
        let total = self.pages_in_file()?;
        self.raw.sync(ffi::SQLITE_SYNC_NORMAL).map_err(Fail::io)?;
        let mut meta = shared.meta.lock().unwrap();
        meta.slot_synced = true;
        let Some(rotation) = meta.header.as_ref().and_then(|h| h.rotation.clone()) else {
            return Ok(());
        };
        if rotation.watermark < total {
            return Err(Fail::with(
                ffi::SQLITE_MISUSE,
                StorageError::Unsupported {
                    path: shared.path.clone(),
                    what: format!(
                        "finishing a DEK rotation with {} of {total} pages re-sealed",
                        rotation.watermark
                    ),
                },
            ));
        }
        meta.header.as_mut().expect("checked").rotation = None;
        if let Err(e) = self.write_header_both_slots(&mut meta) {
            meta.header.as_mut().expect("checked").rotation = Some(rotation);
            return Err(e);
        }
        if let Some((old, _)) = meta.previous.take() {
            keyring.forget_key(old.id());
        }
        {
            let mut keys = shared.keys.write().unwrap();
            keys.previous = None;
            keys.watermark = 0;
        }
        drop(meta);
        tracing::info!(file = %shared.path, "DEK rotation finished");
        Ok(())
    }

    /// Gives an empty WAL new keys under its database's current DEK: a new
    /// WAL DEK (and infrastructure DEK), wrapped under the database's, and
    /// the database's current wrapping as the parent copy. Both header
    /// slots are rewritten, so the old keys are gone from the file. The
    /// caller holds SQLite's WAL write lock (`BEGIN IMMEDIATE` after a
    /// `TRUNCATE` checkpoint), so no frame can be written meanwhile; a WAL
    /// that holds frames is refused. `Ok(false)`: it already was.
    pub fn rekey_empty_wal(
        &mut self,
        keyring: &Keyring,
        parent: &SharedFile,
    ) -> Result<bool, Fail> {
        let shared = Arc::clone(&self.shared);
        if shared.kind != FileKind::Wal || shared.base != HEADER_LEN {
            return Err(Fail::io(ffi::SQLITE_MISUSE));
        }
        self.flush_pending()?;
        let (parent_dek, parent_wrapped) = {
            let pm = parent.meta.lock().unwrap();
            let Some(KeySource::Kek(w)) = pm.header.as_ref().map(|h| h.key_source.clone()) else {
                return Err(Fail::io(ffi::SQLITE_MISUSE));
            };
            (pm.dek.clone(), w)
        };
        let mut meta = shared.meta.lock().unwrap();
        let mut header = meta
            .header
            .clone()
            .ok_or_else(|| Fail::io(ffi::SQLITE_MISUSE))?;
        if matches!(&header.key_source,
            KeySource::Parent { parent_dek_id, .. } if *parent_dek_id == parent_dek.id())
        {
            return Ok(false);
        }
        if self.raw.size().map_err(Fail::io)? > shared.base {
            return Err(Fail::with(
                ffi::SQLITE_BUSY,
                StorageError::Unsupported {
                    path: shared.path.clone(),
                    what: "rekeying a WAL that holds frames; checkpoint it (TRUNCATE) first".into(),
                },
            ));
        }
        let path = shared.path.clone();
        let dek = Dek::generate().map_err(|e| crypto_fail(&path, e))?;
        let wrapped = companion_kek(&parent_dek)
            .and_then(|k| {
                k.wrap(
                    &dek,
                    &companion_binding(parent.file_id, shared.file_id, shared.kind),
                )
            })
            .map_err(|e| crypto_fail(&path, e))?;
        let (infra_dek, infra) = new_infra_key(keyring, &header, &path)?;
        let unit_cipher = infra
            .as_ref()
            .map_or(InfraUnitCipher::NEW_FILES, |r| r.unit_cipher);
        let new_keys = LayerKeys::new(&dek, infra_dek.as_ref(), unit_cipher, 0)
            .map_err(|e| crypto_fail(&path, e))?;
        header.dek_id = dek.id();
        header.key_source = KeySource::Parent {
            parent_file_id: parent.file_id,
            parent_dek_id: parent_dek.id(),
            parent_wrapped,
            wrapped,
        };
        header.infra = infra;
        header.seals_reserved = SEAL_LEASE;
        header.wal_salts = 0;
        header.wal_durable_frames = 0;
        if !meta.slot_synced {
            self.raw.sync(ffi::SQLITE_SYNC_NORMAL).map_err(Fail::io)?;
            meta.slot_synced = true;
        }
        let old_header = meta.header.replace(header);
        let old_dek = std::mem::replace(&mut meta.dek, dek);
        if let Err(e) = self.write_header_both_slots(&mut meta) {
            meta.header = old_header;
            meta.dek = old_dek;
            return Err(e);
        }
        meta.infra_dek = infra_dek;
        meta.wal_salts = None;
        meta.wal = WalProgress::default();
        shared.keys.write().unwrap().current = new_keys;
        shared.seals_reserved.store(SEAL_LEASE, Ordering::Relaxed);
        Ok(true)
    }

    /// Called when SQLite closes this handle: records the exact number of
    /// seals made so far, so that reopening does not count the unused rest
    /// of the reservation as used. No sync needed: if this write is lost,
    /// the slot before it over-counts, which is the safe direction.
    pub fn close(&mut self) -> Result<(), Fail> {
        self.last_read = None;
        self.flush_pending()?;
        let shared = Arc::clone(&self.shared);
        let mut meta = shared.meta.lock().unwrap();
        let used = shared.seals_used();
        let dirty = meta.header_dirty;
        match meta.header.as_mut() {
            Some(h) if used < h.seals_reserved => {
                h.seals_reserved = used;
                shared.seals_reserved.store(used, Ordering::Relaxed);
            }
            Some(_) if dirty => {}
            _ => return Ok(()),
        }
        self.write_header_locked(&mut meta)
    }

    /// SQLite's xRead. `Ok(false)` is a short read (rest zero-filled).
    pub fn read(&mut self, buf: &mut [u8], off: u64) -> Result<bool, Fail> {
        self.flush_tail()?;
        self.flush_pending()?;
        self.last_read = None;
        match self.read_units(buf, off) {
            // A *partial* read of page 1 is SQLite peeking at the database
            // header before it has recovered from a crash (hot journal, WAL).
            // A page written in several page-cache pages can be torn by a
            // kill; report "no header yet" so that recovery runs. The full
            // read of page 1 that follows is verified as strictly as any.
            Err(fail)
                if fail.rc == ffi::SQLITE_IOERR_DATA
                    && self.shared.kind == FileKind::MainDb
                    && off + buf.len() as u64
                        <= self.shared.page_size.load(Ordering::Relaxed) as u64
                    && buf.len() < self.shared.page_size.load(Ordering::Relaxed) =>
            {
                tracing::warn!(file = %self.shared.path, "page 1 does not authenticate yet; letting SQLite recover");
                buf.fill(0);
                Ok(false)
            }
            other => other,
        }
    }

    fn read_units(&mut self, buf: &mut [u8], off: u64) -> Result<bool, Fail> {
        let geo = self.geometry()?;
        let phys = match geo {
            // A temp file is private to this handle: its size is known.
            Geometry::Blocks { .. } if self.shared.kind == FileKind::Temp => {
                Some(geo.physical_size(self.temp_len))
            }
            Geometry::Blocks { .. } => Some(self.raw.size().map_err(Fail::io)?),
            _ => None,
        };
        let mut done = 0usize;
        while done < buf.len() {
            let pos = off + done as u64;
            let mut unit = geo.unit_at(pos);
            if let Some(phys) = phys {
                let present = block_len(&unit, phys);
                if pos >= unit.lstart + present as u64 {
                    buf[done..].fill(0);
                    return Ok(false);
                }
                unit.llen = present;
            }
            let within = (pos - unit.lstart) as usize;
            let n = (buf.len() - done).min(unit.llen - within);
            self.last_read = None;
            if unit.class == class::WAL_FRAME {
                if !self.read_frame(&unit, within, &mut buf[done..done + n])? {
                    return self.short_read(&unit, buf, done);
                }
            } else if !unit.appended && within == 0 && n == unit.llen {
                // Whole page: decrypt straight in the caller's buffer.
                let dst = &mut buf[done..done + n];
                if !self.raw.read_at(dst, unit.pstart).map_err(Fail::io)? {
                    return self.short_read(&unit, buf, done);
                }
                let ctx = self.ctx(&unit, 0);
                if self.shared.open_unit(&ctx, dst, &self.stats).is_err()
                    && !self.reread_after_rotation(&unit, &mut buf[done..done + n])?
                {
                    return Err(Fail::tampered(self.path(), &unit));
                }
            } else {
                let plen = unit.plen();
                if !self.read_unit_into_scratch(&unit)? {
                    return self.short_read(&unit, buf, done);
                }
                let ctx = self.ctx(&unit, 0);
                if self
                    .shared
                    .open_unit(&ctx, &mut self.scratch[..plen], &self.stats)
                    .is_err()
                {
                    let mut page = std::mem::take(&mut self.scratch);
                    let reread = self.reread_after_rotation(&unit, &mut page[..plen]);
                    self.scratch = page;
                    if !reread? {
                        return Err(Fail::tampered(self.path(), &unit));
                    }
                }
                if unit.class == class::WAL_HEADER && within == 0 && n == WAL_HEADER {
                    let hdr: [u8; WAL_HEADER] = self.scratch[..WAL_HEADER].try_into().unwrap();
                    self.learn_wal_header(&hdr);
                }
                buf[done..done + n].copy_from_slice(&self.scratch[within..][..n]);
            }
            done += n;
        }
        Ok(true)
    }

    /// A database page that did not open may have been read while a DEK
    /// rotation was re-sealing it in place (a read racing a write can see
    /// half of each). Once the rotation's batch is done (its write lock),
    /// the page is read and opened again. True if it opened.
    fn reread_after_rotation(&mut self, unit: &Unit, dst: &mut [u8]) -> Result<bool, Fail> {
        if self.shared.kind != FileKind::MainDb {
            return Ok(false);
        }
        let shared = Arc::clone(&self.shared);
        let _writes = shared.write_lock.lock().unwrap();
        if !self.raw.read_at(dst, unit.pstart).map_err(Fail::io)? {
            return Ok(false);
        }
        let ctx = self.ctx(unit, 0);
        Ok(shared.open_unit(&ctx, dst, &self.stats).is_ok())
    }

    /// Reads bytes `within..within + out.len()` of WAL frame `unit` (one
    /// sealed unit: frame header and page). `Ok(false)`: the frame is not
    /// (wholly) in the file. On success the frame's plaintext stays in
    /// `scratch` and `last_read` names it.
    fn read_frame(&mut self, unit: &Unit, within: usize, out: &mut [u8]) -> Result<bool, Fail> {
        let plen = unit.plen();
        if !self.read_unit_into_scratch(unit)? {
            return Ok(false);
        }
        let ov = self.shared.ov;
        let mut trailer = [0u8; MAX_OVERHEAD];
        trailer[..ov].copy_from_slice(&self.scratch[plen - ov..plen]);
        let salts = u64::from_be_bytes(self.scratch[..8].try_into().unwrap());
        if !self.open_frame_in_scratch(unit) {
            if within < WAL_FRAME_HEADER {
                // A frame that does not authenticate past the last synced
                // frame is a torn write from a crash (or a rolled-back
                // transaction's): hand SQLite zeros, which it reads as the
                // end of the log. Before the mark it is tampering.
                self.unsynced_frame(unit)?;
                out.fill(0);
                return Ok(true);
            }
            // SQLite reads a page alone only from a frame it knows is
            // there (committed, or its own transaction's).
            return Err(Fail::tampered(self.path(), unit));
        }
        if within < WAL_FRAME_HEADER {
            self.check_frame_generation(unit, salts)?;
        } else if salts != 0 && salts != self.current_salts() {
            // A page read alone must come from the current generation (an
            // authentic frame of an older WAL put in its place).
            return Err(Fail::tampered(self.path(), unit));
        }
        out.copy_from_slice(&self.scratch[unit.prefix + within..][..out.len()]);
        self.last_read = Some(LastRead {
            index: unit.index,
            trailer,
        });
        Ok(true)
    }

    /// The generation a WAL frame is sealed under: its salts, or for a frame
    /// SQLite wrote with zero salts (its checksum to be rewritten at
    /// commit), the current generation's.
    fn frame_generation(&self, salts: u64) -> u64 {
        if salts != 0 {
            salts
        } else {
            self.current_salts()
        }
    }

    /// Grows `scratch` to hold `plen` bytes.
    fn grow_scratch(&mut self, plen: usize) {
        if self.scratch.len() < plen {
            self.scratch.resize(plen, 0);
        }
    }

    /// Reads `unit` as stored into `scratch[..plen]`; false when the file
    /// ends before the unit does.
    fn read_unit_into_scratch(&mut self, unit: &Unit) -> Result<bool, Fail> {
        let plen = unit.plen();
        self.grow_scratch(plen);
        self.raw
            .read_at(&mut self.scratch[..plen], unit.pstart)
            .map_err(Fail::io)
    }

    /// Opens the WAL frame read into `scratch[..plen]` in place. False if
    /// it does not authenticate, or if its clear salts are not the ones
    /// sealed inside its header.
    fn open_frame_in_scratch(&mut self, unit: &Unit) -> bool {
        let (pre, plen) = (unit.prefix, unit.plen());
        let salts = u64::from_be_bytes(self.scratch[..8].try_into().unwrap());
        let ctx = self.ctx(unit, self.frame_generation(salts));
        if self
            .shared
            .open_unit(&ctx, &mut self.scratch[pre..plen], &self.stats)
            .is_err()
        {
            return false;
        }
        self.scratch[pre + 8..pre + 16] == self.scratch[..8]
    }

    /// Loads WAL frame `unit` into `scratch` (opened) so that part of it can
    /// be rewritten. A frame not in the file, or one that does not
    /// authenticate past the durable mark (torn, rolled back), loads as
    /// zeros, as reads hand it to SQLite; below the mark it is tampering.
    fn load_frame(&mut self, unit: &Unit) -> Result<(), Fail> {
        let plen = unit.plen();
        if self.read_unit_into_scratch(unit)? {
            if self.open_frame_in_scratch(unit) {
                return Ok(());
            }
            self.unsynced_frame(unit)?;
        }
        self.scratch[..plen].fill(0);
        Ok(())
    }

    /// Whether the sealed frame on disk is still the one `last` read (its
    /// trailer holds the seal's unique nonces).
    fn still_on_disk(&mut self, unit: &Unit, last: &LastRead) -> Result<bool, Fail> {
        let ov = self.shared.ov;
        let mut now = [0u8; MAX_OVERHEAD];
        let at = unit.pstart + (unit.plen() - ov) as u64;
        Ok(self.raw.read_at(&mut now[..ov], at).map_err(Fail::io)?
            && now[..ov] == last.trailer[..ov])
    }

    /// A frame failed to authenticate: fine past the durable mark (torn by
    /// a crash), tampering before it.
    fn unsynced_frame(&self, unit: &Unit) -> Result<(), Fail> {
        if self.strict || unit.index < self.wal_durable() {
            return Err(Fail::tampered(self.path(), unit));
        }
        tracing::debug!(file = %self.path(), frame = unit.index + 1, "ignoring torn WAL frame past the synced end");
        Ok(())
    }

    /// A frame of an older WAL generation may only sit past the frames the
    /// current generation has synced.
    fn check_frame_generation(&self, unit: &Unit, salts: u64) -> Result<(), Fail> {
        let durable = self.wal_durable();
        if salts != 0 && salts != self.current_salts() && unit.index < durable {
            return Err(Fail::with(
                ffi::SQLITE_IOERR_DATA,
                StorageError::Replayed {
                    path: self.path().to_string(),
                    unit: unit.describe(),
                    durable,
                },
            ));
        }
        Ok(())
    }

    /// The file ended inside `unit`: past the end is a short read; a page
    /// cut in half cannot be authenticated.
    fn short_read(&mut self, unit: &Unit, buf: &mut [u8], done: usize) -> Result<bool, Fail> {
        let phys = self.raw.size().map_err(Fail::io)?;
        if unit.class == class::PAGE && phys > unit.pstart {
            return Err(Fail::tampered(self.path(), unit));
        }
        buf[done..].fill(0);
        Ok(false)
    }

    /// SQLite's xWrite.
    pub fn write(&mut self, data: &[u8], off: u64) -> Result<(), Fail> {
        if self.shared.kind == FileKind::Temp {
            return self.write_temp(data, off);
        }
        let last_read = self.last_read.take();
        if self.pending.is_some() && !self.continues_pending(off) {
            self.flush_pending()?;
        }
        // A database page written now must not interleave with a DEK
        // rotation re-sealing the same page.
        let shared = Arc::clone(&self.shared);
        let _writes = (shared.kind == FileKind::MainDb).then(|| shared.write_lock.lock().unwrap());
        self.learn_from_write(data, off)?;
        let geo = self.geometry()?;
        if let Geometry::Blocks { .. } = geo {
            return self.write_blocks(geo, data, off);
        }
        let mut done = 0usize;
        while done < data.len() {
            let pos = off + done as u64;
            let unit = geo.unit_at(pos);
            let within = (pos - unit.lstart) as usize;
            let n = (data.len() - done).min(unit.llen - within);
            if unit.class == class::WAL_FRAME {
                self.write_frame(&unit, within, &data[done..done + n], last_read.as_ref())?;
                done += n;
                continue;
            }
            let plen = unit.plen();
            self.grow_scratch(plen);
            if within != 0 || n != unit.llen {
                // Part of a unit: read, open, patch, re-seal.
                if !self.read_unit_into_scratch(&unit)? {
                    return Err(Fail::with(
                        ffi::SQLITE_IOERR_WRITE,
                        StorageError::Unsupported {
                            path: self.path().to_string(),
                            what: format!(
                                "partial write of {} which does not exist yet",
                                unit.describe()
                            ),
                        },
                    ));
                }
                let ctx = self.ctx(&unit, 0);
                if self
                    .shared
                    .open_unit(&ctx, &mut self.scratch[..plen], &self.stats)
                    .is_err()
                {
                    return Err(Fail::tampered(self.path(), &unit));
                }
            }
            self.scratch[within..][..n].copy_from_slice(&data[done..done + n]);
            self.seal(&unit, 0, 0..plen)?;
            self.raw
                .write_at(&self.scratch[..plen], unit.pstart)
                .map_err(Fail::io)?;
            done += n;
        }
        Ok(())
    }

    /// Whether a write at `off` continues the pending frame.
    fn continues_pending(&self, off: u64) -> bool {
        self.pending
            .is_some_and(|p| off == p.unit.lstart + p.filled as u64)
    }

    /// Writes bytes `within..within + data.len()` of WAL frame `unit`.
    ///
    /// SQLite appends a frame as two writes, its 24-byte header and then
    /// its page. The header is kept (`pending`) until the page comes, and
    /// the two are sealed and written as one unit. Anything else that
    /// happens on the handle first writes the pending frame out, merged
    /// with what the file holds (`flush_pending`), so nothing SQLite wrote
    /// stays in memory past its next call on this file. A header written
    /// right after this handle read the same frame whole (SQLite rewriting
    /// checksums at commit: no page follows) is sealed at once with the
    /// page just read. Any other partial write (a page rewritten in place
    /// within a transaction) reads, opens, patches and re-seals the frame.
    fn write_frame(
        &mut self,
        unit: &Unit,
        within: usize,
        data: &[u8],
        last_read: Option<&LastRead>,
    ) -> Result<(), Fail> {
        let (pre, plen, n) = (unit.prefix, unit.plen(), data.len());
        if let Some(p) = self.pending {
            if p.unit.index == unit.index && p.filled == within {
                self.frame_buf[pre + within..pre + within + n].copy_from_slice(data);
                let filled = within + n;
                if filled < unit.llen {
                    self.pending = Some(PendingFrame { filled, ..p });
                    return Ok(());
                }
                self.pending = None;
                return self.seal_frame(unit, FrameIn::FrameBuf, true);
            }
            self.flush_pending()?;
        }
        if within == 0 && n == unit.llen {
            self.frame_buf.resize(plen, 0);
            self.frame_buf[pre..plen].copy_from_slice(data);
            return self.seal_frame(unit, FrameIn::FrameBuf, true);
        }
        if within == 0 {
            if let Some(last) = last_read.filter(|l| l.index == unit.index) {
                if self.still_on_disk(unit, last)? {
                    self.scratch[pre..pre + n].copy_from_slice(data);
                    return self.seal_frame(unit, FrameIn::Scratch, n > WAL_FRAME_HEADER);
                }
            }
            self.frame_buf.resize(plen, 0);
            self.frame_buf[pre..pre + n].copy_from_slice(data);
            self.pending = Some(PendingFrame {
                unit: *unit,
                filled: n,
            });
            return Ok(());
        }
        self.load_frame(unit)?;
        self.scratch[pre + within..pre + within + n].copy_from_slice(data);
        self.seal_frame(unit, FrameIn::Scratch, within + n > WAL_FRAME_HEADER)
    }

    /// Writes out a pending frame whose page never came, merged with the
    /// frame the file holds (or zeros), exactly as a plain file would then
    /// read.
    fn flush_pending(&mut self) -> Result<(), Fail> {
        let Some(p) = self.pending.take() else {
            return Ok(());
        };
        let unit = p.unit;
        self.load_frame(&unit)?;
        let span = unit.prefix..unit.prefix + p.filled;
        self.scratch[span.clone()].copy_from_slice(&self.frame_buf[span]);
        self.seal_frame(&unit, FrameIn::Scratch, p.filled > WAL_FRAME_HEADER)
    }

    /// Seals the WAL frame held (in plaintext, after its salts prefix) in
    /// `scratch` or `frame_buf`, writes it, and records commit progress.
    /// `page_written`: SQLite wrote page bytes of this frame in this write.
    fn seal_frame(&mut self, unit: &Unit, from: FrameIn, page_written: bool) -> Result<(), Fail> {
        let mut buf = match from {
            FrameIn::Scratch => std::mem::take(&mut self.scratch),
            FrameIn::FrameBuf => std::mem::take(&mut self.frame_buf),
        };
        let r = self.seal_frame_in(unit, &mut buf, page_written);
        match from {
            FrameIn::Scratch => self.scratch = buf,
            FrameIn::FrameBuf => self.frame_buf = buf,
        }
        r
    }

    fn seal_frame_in(
        &mut self,
        unit: &Unit,
        buf: &mut [u8],
        page_written: bool,
    ) -> Result<(), Fail> {
        let (pre, plen) = (unit.prefix, unit.plen());
        // The frame's salts (header bytes 8..16), in clear in front, tell
        // generations apart; bytes 4..8 are the database size after a
        // commit, 0 for frames that do not end a transaction.
        let (clear, body) = buf.split_at_mut(pre);
        clear.copy_from_slice(&body[8..16]);
        let salts = u64::from_be_bytes(buf[..8].try_into().unwrap());
        let commit = buf[pre + 4..pre + 8] != [0; 4];
        let generation = self.frame_generation(salts);
        self.seal_buf(unit, generation, &mut buf[pre..plen])?;
        self.raw
            .write_at(&buf[..plen], unit.pstart)
            .map_err(Fail::io)?;
        let mut meta = self.shared.meta.lock().unwrap();
        let current = meta.wal_salts;
        let w = &mut meta.wal;
        if page_written {
            w.pages_written = w.pages_written.max(unit.index + 1);
        }
        if commit && salts != 0 && current == Some(salts) && w.pages_written > unit.index {
            w.committed = w.committed.max(unit.index + 1);
        }
        Ok(())
    }

    /// What a write tells us: the database page size, the WAL page size and
    /// salts; and the reserve check on page 1.
    fn learn_from_write(&mut self, data: &[u8], off: u64) -> Result<(), Fail> {
        match self.shared.kind {
            FileKind::MainDb => {
                let len = data.len();
                if !(len.is_power_of_two()
                    && (512..=65536).contains(&len)
                    && off.is_multiple_of(len as u64))
                {
                    return Err(Fail::with(
                        ffi::SQLITE_IOERR_WRITE,
                        StorageError::Unsupported {
                            path: self.path().to_string(),
                            what: format!(
                                "write of {len} bytes at offset {off} is not a whole page"
                            ),
                        },
                    ));
                }
                if off == 0 {
                    let reserve = data[20];
                    if (reserve as usize) < self.shared.ov {
                        return Err(Fail::with(
                            ffi::SQLITE_IOERR_WRITE,
                            StorageError::Reserve {
                                path: self.path().to_string(),
                                page: 1,
                                have: reserve,
                                need: self.shared.ov,
                            },
                        ));
                    }
                }
                let established = self.shared.page_size.load(Ordering::Relaxed);
                // Page 1 declares the page size of the format being written.
                let declared = match off {
                    0 => match u16::from_be_bytes([data[16], data[17]]) {
                        1 => 65536,
                        n => n as usize,
                    },
                    _ => len,
                };
                if (established != 0 && established != len) || declared != len {
                    // A page-size change (VACUUM) makes SQLite write pages of
                    // one size as pieces or pairs of the other, with content
                    // where our tags must go: refuse before anything changes.
                    let (from, to) = match established {
                        0 => (len, declared),
                        e if e != len => (e, len),
                        e => (e, declared),
                    };
                    return Err(Fail::with(
                        ffi::SQLITE_IOERR_WRITE,
                        StorageError::Unsupported {
                            path: self.path().to_string(),
                            what: format!(
                                "changing the page size of an existing database ({from} to {to} bytes); \
                                 use `PRAGMA page_size={to}; VACUUM INTO 'new.db'` instead"
                            ),
                        },
                    ));
                }
                if established != len || off == 0 {
                    self.shared.page_size.store(len, Ordering::Relaxed);
                    let shared = Arc::clone(&self.shared);
                    let mut meta = shared.meta.lock().unwrap();
                    if meta
                        .header
                        .as_ref()
                        .is_some_and(|h| h.unit_size as usize != len)
                    {
                        meta.header.as_mut().unwrap().unit_size = len as u32;
                        self.write_header_locked(&mut meta)?;
                    }
                }
            }
            FileKind::Wal if off == 0 && data.len() >= WAL_HEADER => {
                self.learn_wal_header(&data[..WAL_HEADER]);
            }
            _ => {}
        }
        Ok(())
    }

    /// Appends and overwrites of a temp file, through the tail block.
    fn write_temp(&mut self, data: &[u8], off: u64) -> Result<(), Fail> {
        if off > self.temp_len {
            let zeros = vec![0u8; (off - self.temp_len) as usize];
            let end = self.temp_len;
            self.write_temp(&zeros, end)?;
        }
        let geo = Geometry::Blocks {
            base: 0,
            block: TEMP_BLOCK,
            ov: self.shared.ov,
        };
        let mut done = 0usize;
        while done < data.len() {
            let pos = off + done as u64;
            let unit = geo.unit_at(pos);
            let within = (pos - unit.lstart) as usize;
            let n = (data.len() - done).min(TEMP_BLOCK - within);
            if self.tail.as_ref().is_none_or(|t| t.index != unit.index) {
                self.flush_tail()?;
                // What of this block is already on disk (or in the file's
                // logical extent, for a block being rewritten).
                let present = (self.temp_len.saturating_sub(unit.lstart) as usize).min(TEMP_BLOCK);
                let mut buf = std::mem::take(&mut self.tail_buf);
                buf.resize(TEMP_BLOCK + self.shared.ov, 0);
                if present > 0 && !(within == 0 && n >= present) {
                    self.read(&mut buf[..present], unit.lstart)?;
                }
                buf[present..].fill(0);
                self.tail_buf = buf;
                self.tail = Some(TailBlock {
                    index: unit.index,
                    len: present,
                });
            }
            let tail = self.tail.as_mut().expect("tail set above");
            self.tail_buf[within..within + n].copy_from_slice(&data[done..done + n]);
            tail.len = tail.len.max(within + n);
            done += n;
            self.temp_len = self.temp_len.max(pos + n as u64);
            if tail.len == TEMP_BLOCK && within + n == TEMP_BLOCK {
                self.flush_tail()?;
            }
        }
        Ok(())
    }

    /// Seals and writes the pending tail block of a temp file, if any.
    fn flush_tail(&mut self) -> Result<(), Fail> {
        let Some(tail) = self.tail.take() else {
            return Ok(());
        };
        let unit = Unit {
            llen: tail.len,
            ..Geometry::Blocks {
                base: 0,
                block: TEMP_BLOCK,
                ov: self.shared.ov,
            }
            .unit_at(tail.index * TEMP_BLOCK as u64)
        };
        let plen = unit.plen();
        let ctx = self.ctx(&unit, 0);
        self.shared
            .seal_unit(&ctx, &mut self.tail_buf[..plen], &self.stats)?;
        self.raw
            .write_at(&self.tail_buf[..plen], unit.pstart)
            .map_err(Fail::io)
    }

    fn write_blocks(&mut self, geo: Geometry, data: &[u8], off: u64) -> Result<(), Fail> {
        let block = geo.unit_len();
        let phys = self.raw.size().map_err(Fail::io)?;
        let logical = geo.logical_size(phys);
        if off > logical {
            // Fill the gap with sealed zeros: every byte inside the file
            // must authenticate.
            let zeros = vec![0u8; (off - logical) as usize];
            self.write_blocks(geo, &zeros, logical)?;
            return self.write_blocks(geo, data, off);
        }
        let mut phys = phys;
        let mut done = 0usize;
        while done < data.len() {
            let pos = off + done as u64;
            let unit = geo.unit_at(pos);
            let present = block_len(&unit, phys);
            let within = (pos - unit.lstart) as usize;
            let n = (data.len() - done).min(block - within);
            let new_len = present.max(within + n);
            let ov = self.shared.ov;
            let plen = new_len + ov;
            if self.scratch.len() < block + ov {
                self.scratch.resize(block + ov, 0);
            }
            if present > 0 && !(within == 0 && n >= present) {
                let old = Unit {
                    llen: present,
                    ..unit
                };
                let oplen = old.plen();
                self.raw
                    .read_at(&mut self.scratch[..oplen], unit.pstart)
                    .map_err(Fail::io)?;
                let ctx = self.ctx(&old, 0);
                if self
                    .shared
                    .open_unit(&ctx, &mut self.scratch[..oplen], &self.stats)
                    .is_err()
                {
                    return Err(Fail::tampered(self.path(), &old));
                }
            }
            if present < within {
                self.scratch[present..within].fill(0);
            }
            self.scratch[within..within + n].copy_from_slice(&data[done..done + n]);
            let unit = Unit {
                llen: new_len,
                ..unit
            };
            self.seal(&unit, 0, 0..plen)?;
            self.raw
                .write_at(&self.scratch[..plen], unit.pstart)
                .map_err(Fail::io)?;
            phys = phys.max(unit.pstart + plen as u64);
            done += n;
        }
        Ok(())
    }

    /// SQLite's xTruncate.
    pub fn truncate(&mut self, size: u64) -> Result<(), Fail> {
        self.flush_tail()?;
        self.last_read = None;
        self.flush_pending()?;
        let shared = Arc::clone(&self.shared);
        let _writes = (shared.kind == FileKind::MainDb).then(|| shared.write_lock.lock().unwrap());
        self.truncate_units(size)?;
        if self.shared.kind == FileKind::Temp {
            // Only now: the re-read above needs the size still on disk.
            self.temp_len = self.temp_len.min(size);
        }
        Ok(())
    }

    fn truncate_units(&mut self, size: u64) -> Result<(), Fail> {
        let geo = self.geometry()?;
        if let Geometry::Blocks { block, .. } = geo {
            let tail = (size % block as u64) as usize;
            let phys = self.raw.size().map_err(Fail::io)?;
            if geo.logical_size(phys) <= size {
                return Ok(());
            }
            if tail > 0 {
                // Re-seal the block that becomes the last one, shorter.
                let mut keep = vec![0u8; tail];
                let start = size - tail as u64;
                self.read(&mut keep, start)?;
                self.raw
                    .truncate(geo.physical_size(start))
                    .map_err(Fail::io)?;
                return self.write_blocks(geo, &keep, start);
            }
        }
        self.raw
            .truncate(geo.physical_size(size))
            .map_err(Fail::io)?;
        if self.shared.kind == FileKind::Wal && size == 0 {
            let mut meta = self.shared.meta.lock().unwrap();
            meta.wal_salts = None;
            meta.wal = WalProgress::default();
        }
        Ok(())
    }

    /// SQLite's xFileSize.
    pub fn file_size(&mut self) -> Result<u64, Fail> {
        self.last_read = None;
        self.flush_pending()?;
        if self.shared.kind == FileKind::Temp {
            return Ok(self.temp_len);
        }
        let phys = self.raw.size().map_err(Fail::io)?;
        if phys <= self.shared.base {
            return Ok(0);
        }
        let geo = self.geometry()?;
        Ok(geo.logical_size(phys))
    }

    /// SQLite's xSync. For a WAL, records afterwards how many frames this
    /// sync made durable (complete commits written before it), so that a
    /// later loss of them reads as tampering, not as a torn tail.
    pub fn sync(&mut self, flags: i32) -> Result<(), Fail> {
        self.flush_tail()?;
        self.last_read = None;
        self.flush_pending()?;
        {
            // A header rewrapped in memory (infrastructure key rotation)
            // becomes durable with this sync.
            let shared = Arc::clone(&self.shared);
            let mut meta = shared.meta.lock().unwrap();
            if meta.header_dirty {
                self.write_header_locked(&mut meta)?;
            }
        }
        let before = {
            let meta = self.shared.meta.lock().unwrap();
            (meta.wal_salts, meta.wal.committed)
        };
        self.raw.sync(flags).map_err(Fail::io)?;
        self.shared.meta.lock().unwrap().slot_synced = true;
        if self.shared.kind == FileKind::Wal {
            let shared = Arc::clone(&self.shared);
            let mut meta = shared.meta.lock().unwrap();
            let (Some(salts), written) = before else {
                return Ok(());
            };
            if meta.wal_salts != Some(salts) {
                return Ok(()); // a new generation began meanwhile
            }
            let changed = meta
                .header
                .as_ref()
                .is_some_and(|h| h.wal_salts != salts || h.wal_durable_frames != written);
            if changed {
                let h = meta.header.as_mut().unwrap();
                h.wal_salts = salts;
                h.wal_durable_frames = written;
                self.write_header_locked(&mut meta)?;
            }
        }
        Ok(())
    }
}

/// Logical bytes of a block present in a file of `phys` bytes.
fn block_len(unit: &Unit, phys: u64) -> usize {
    if phys < unit.pstart + unit.ov as u64 + 1 {
        return 0;
    }
    ((phys - unit.pstart) as usize - unit.ov).min(unit.llen)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file in memory, with SQLite's short-read semantics.
    #[derive(Default)]
    struct MemFile(Vec<u8>);

    impl RawFile for MemFile {
        fn read_at(&mut self, buf: &mut [u8], off: u64) -> Result<bool, i32> {
            let off = off as usize;
            let avail = self.0.len().saturating_sub(off).min(buf.len());
            buf[..avail].copy_from_slice(&self.0[off.min(self.0.len())..][..avail]);
            buf[avail..].fill(0);
            Ok(avail == buf.len())
        }
        fn write_at(&mut self, buf: &[u8], off: u64) -> Result<(), i32> {
            let end = off as usize + buf.len();
            if self.0.len() < end {
                self.0.resize(end, 0);
            }
            self.0[off as usize..end].copy_from_slice(buf);
            Ok(())
        }
        fn truncate(&mut self, size: u64) -> Result<(), i32> {
            self.0.truncate(size as usize);
            Ok(())
        }
        fn size(&mut self) -> Result<u64, i32> {
            Ok(self.0.len() as u64)
        }
        fn sync(&mut self, _: i32) -> Result<(), i32> {
            Ok(())
        }
    }

    /// A protector holding one AES key in memory.
    struct TestProtector(SymmetricKek);

    impl std::fmt::Debug for TestProtector {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("TestProtector")
        }
    }

    impl atrest_crypto::KeyProtector for TestProtector {
        fn current_kek(&self) -> atrest_crypto::KekRef {
            atrest_crypto::KekRef {
                kind: atrest_crypto::ProtectorKind::Service,
                key_id: "service:test".into(),
            }
        }
        fn wrap(
            &self,
            dek: &Dek,
        ) -> Result<atrest_crypto::WrappedDek, atrest_crypto::ProtectorError> {
            Ok(atrest_crypto::WrappedDek {
                kek: self.current_kek(),
                algorithm: atrest_crypto::WrapAlgorithm::A256Gcm,
                bytes: self.0.wrap(dek, b"t").unwrap(),
            })
        }
        fn unwrap(
            &self,
            id: atrest_crypto::DekId,
            w: &atrest_crypto::WrappedDek,
        ) -> Result<Dek, atrest_crypto::ProtectorError> {
            self.0
                .unwrap(id, &w.bytes, b"t")
                .map_err(|e| atrest_crypto::ProtectorError::Other(e.to_string()))
        }
    }

    /// An infrastructure protector over a fresh keystore in a temp dir.
    fn infra_protector() -> (tempfile::TempDir, Arc<atrest_keystore::InfraProtector>) {
        let dir = tempfile::tempdir().unwrap();
        let ks = atrest_keystore::InfraKeystore::open(dir.path().join("iks")).unwrap();
        let id = ks.create_master_key().unwrap();
        (dir, Arc::new(ks.protector(id, 1).unwrap()))
    }

    /// A database file over memory, with the keyring that made it.
    fn db_file() -> (Keyring, EncryptedFile<MemFile>) {
        db_file_with(None)
    }

    fn db_file_with(
        infra: Option<Arc<atrest_keystore::InfraProtector>>,
    ) -> (Keyring, EncryptedFile<MemFile>) {
        let keyring = Keyring::new(
            Arc::new(TestProtector(SymmetricKek::new(&[9; 32]).unwrap())),
            infra,
        );
        let mut raw = MemFile::default();
        let shared = SharedFile::open(
            &mut raw,
            FileKind::MainDb,
            "m.db".into(),
            &keyring,
            None,
            true,
        )
        .unwrap();
        let file = EncryptedFile::new(raw, shared, Arc::new(Stats::default()));
        (keyring, file)
    }

    fn journal_file() -> EncryptedFile<MemFile> {
        journal_file_with(None)
    }

    fn journal_file_with(
        infra: Option<Arc<atrest_keystore::InfraProtector>>,
    ) -> EncryptedFile<MemFile> {
        let (keyring, db) = db_file_with(infra);
        let mut raw = MemFile::default();
        let shared = SharedFile::open(
            &mut raw,
            FileKind::Journal,
            "m.db-journal".into(),
            &keyring,
            Some(db.shared()),
            true,
        )
        .unwrap();
        EncryptedFile::new(raw, shared, Arc::new(Stats::default()))
    }

    /// A WAL over memory next to a database over memory.
    fn wal_file_with(
        infra: Option<Arc<atrest_keystore::InfraProtector>>,
    ) -> EncryptedFile<MemFile> {
        let (keyring, db) = db_file_with(infra);
        let mut raw = MemFile::default();
        let shared = SharedFile::open(
            &mut raw,
            FileKind::Wal,
            "m.db-wal".into(),
            &keyring,
            Some(db.shared()),
            true,
        )
        .unwrap();
        EncryptedFile::new(raw, shared, Arc::new(Stats::default()))
    }

    const P: usize = 4096;
    const SALTS: u64 = 0x1122_3344_5566_7788;

    fn frame_off(i: u64) -> u64 {
        (WAL_HEADER + i as usize * (WAL_FRAME_HEADER + P)) as u64
    }

    /// Writes a WAL header and `n` frames the way SQLite does (frame header,
    /// then page, in two writes); the last frame is a commit. Returns the
    /// pages as written (reserved bytes zero).
    fn write_wal(w: &mut EncryptedFile<MemFile>, n: u64) -> Vec<Vec<u8>> {
        let mut hdr = [0u8; WAL_HEADER];
        hdr[..4].copy_from_slice(&0x377f_0682u32.to_be_bytes());
        hdr[8..12].copy_from_slice(&(P as u32).to_be_bytes());
        hdr[16..24].copy_from_slice(&SALTS.to_be_bytes());
        w.write(&hdr, 0).unwrap();
        (0..n)
            .map(|i| {
                let mut fh = [0u8; WAL_FRAME_HEADER];
                fh[..4].copy_from_slice(&(i as u32 + 1).to_be_bytes());
                if i + 1 == n {
                    fh[4..8].copy_from_slice(&(n as u32).to_be_bytes());
                }
                fh[8..16].copy_from_slice(&SALTS.to_be_bytes());
                fh[16..24].copy_from_slice(&[i as u8 | 0x80; 8]);
                let mut page = vec![0u8; P];
                page[..P - 76].fill(i as u8 | 0x40);
                let before = w.raw.0.len();
                w.write(&fh, frame_off(i)).unwrap();
                assert_eq!(
                    w.raw.0.len(),
                    before,
                    "a frame header alone waits for its page"
                );
                w.write(&page, frame_off(i) + WAL_FRAME_HEADER as u64)
                    .unwrap();
                page
            })
            .collect()
    }

    fn read_frame_whole(w: &mut EncryptedFile<MemFile>, i: u64) -> Result<Vec<u8>, Fail> {
        let mut buf = vec![0u8; WAL_FRAME_HEADER + P];
        w.read(&mut buf, frame_off(i)).map(|_| buf)
    }

    fn read_page(w: &mut EncryptedFile<MemFile>, i: u64) -> Result<Vec<u8>, Fail> {
        let mut buf = vec![0u8; P];
        w.read(&mut buf, frame_off(i) + WAL_FRAME_HEADER as u64)
            .map(|_| buf)
    }

    /// Each WAL frame, written by SQLite as a header and a page, is sealed
    /// and written once, as one unit of salts + 24 + page bytes, by every
    /// layer; it reads back whole, as a header alone and as a page alone.
    #[test]
    fn a_wal_frame_is_one_sealed_unit() {
        let (_dir, infra) = infra_protector();
        for infra in [None, Some(infra)] {
            let mut w = wal_file_with(infra.clone());
            let pages = write_wal(&mut w, 5);
            let ov = w.shared.ov;
            let st = &w.stats;
            // WAL header + 5 frames, each layer once per unit.
            assert_eq!(st.units_sealed.load(Ordering::Relaxed), 6);
            let infra_units = if infra.is_some() { 6 } else { 0 };
            assert_eq!(st.infra_units_sealed.load(Ordering::Relaxed), infra_units);
            assert_eq!(
                w.raw.0.len(),
                HEADER_LEN as usize + WAL_HEADER + ov + 5 * (8 + WAL_FRAME_HEADER + P)
            );
            assert_eq!(w.file_size().unwrap(), frame_off(5));
            for (i, page) in pages.iter().enumerate() {
                let i = i as u64;
                let whole = read_frame_whole(&mut w, i).unwrap();
                assert_eq!(&whole[WAL_FRAME_HEADER..], &page[..]);
                assert_eq!(whole[..4], (i as u32 + 1).to_be_bytes());
                assert_eq!(&read_page(&mut w, i).unwrap(), page);
                let mut hdr = [0u8; 8];
                w.read(&mut hdr, frame_off(i) + 16).unwrap();
                assert_eq!(hdr, [i as u8 | 0x80; 8]);
            }
            // No plaintext reached the disk.
            assert!(!w.raw.0.windows(64).any(|x| x.iter().all(|&b| b == 0x41)));
        }
    }

    /// Flipping a bit in the header part, the page part, the trailer or the
    /// clear salts of a frame, or swapping two frames, makes the frame fail
    /// to authenticate, whichever part SQLite reads. (The frames are synced,
    /// so they are below the durable mark: tampering, not a torn tail.)
    #[test]
    fn tampered_or_swapped_wal_frames_are_detected() {
        let (_dir, infra) = infra_protector();
        for infra in [None, Some(infra)] {
            let mut w = wal_file_with(infra);
            write_wal(&mut w, 4);
            w.sync(0).unwrap();
            let clean = w.raw.0.clone();
            let base = HEADER_LEN as usize + WAL_HEADER + w.shared.ov;
            let pframe = 8 + WAL_FRAME_HEADER + P;
            let at = |i: usize| base + i * pframe;
            let mut cases: Vec<(&str, Vec<u8>, u64)> = vec![];
            for (name, pos, frame) in [
                ("salts", at(1) + 3, 1),
                ("header part", at(1) + 8 + 5, 1),
                ("page part", at(2) + 8 + WAL_FRAME_HEADER + 1000, 2),
                ("trailer", at(2) + pframe - 1, 2),
            ] {
                let mut bad = clean.clone();
                bad[pos] ^= 0x04;
                cases.push((name, bad, frame));
            }
            let mut swapped = clean.clone();
            swapped[at(1)..at(2)].copy_from_slice(&clean[at(2)..at(3)]);
            swapped[at(2)..at(3)].copy_from_slice(&clean[at(1)..at(2)]);
            cases.push(("swap", swapped, 1));
            for (name, bad, frame) in cases {
                w.raw.0 = bad;
                for (how, r) in [
                    ("whole", read_frame_whole(&mut w, frame).err()),
                    ("page", read_page(&mut w, frame).err()),
                ] {
                    let fail = r.unwrap_or_else(|| panic!("{name}: {how} read passed"));
                    assert_eq!(fail.rc, ffi::SQLITE_IOERR_DATA, "{name} {how}");
                    let msg = fail.detail.unwrap().to_string();
                    assert!(
                        msg.contains(&format!("WAL frame {} ", frame + 1)),
                        "{name} {how}: {msg}"
                    );
                }
            }
            w.raw.0 = clean;
            read_frame_whole(&mut w, 3).unwrap();
        }
    }

    /// SQLite's other WAL writes: a page rewritten in place within its
    /// transaction, and frame headers rewritten at commit right after the
    /// frame is read (one seal, no second read); a header whose page never
    /// comes is written out, merged with zeros, before the next operation.
    #[test]
    fn rewritten_frames_and_a_lone_header_read_back_as_written() {
        let mut w = wal_file_with(None);
        let mut pages = write_wal(&mut w, 3);
        // A page rewritten in place.
        pages[1][..10].copy_from_slice(b"rewritten!");
        w.write(&pages[1], frame_off(1) + WAL_FRAME_HEADER as u64)
            .unwrap();
        assert_eq!(read_page(&mut w, 1).unwrap(), pages[1]);
        // Checksum rewrite: read the whole frame, write its header back.
        let mut whole = read_frame_whole(&mut w, 1).unwrap();
        let sealed_before = w.stats.units_sealed.load(Ordering::Relaxed);
        let opened_before = w.stats.units_opened.load(Ordering::Relaxed);
        whole[16..24].copy_from_slice(b"NEWCKSUM");
        w.write(&whole[..WAL_FRAME_HEADER], frame_off(1)).unwrap();
        assert_eq!(
            w.stats.units_sealed.load(Ordering::Relaxed),
            sealed_before + 1
        );
        assert_eq!(w.stats.units_opened.load(Ordering::Relaxed), opened_before);
        assert_eq!(read_frame_whole(&mut w, 1).unwrap(), whole);
        // A stale read does not stand in for the frame: another write in
        // between, then a header write, goes through the disk.
        let _ = read_frame_whole(&mut w, 2).unwrap();
        w.write(&pages[0], frame_off(0) + WAL_FRAME_HEADER as u64)
            .unwrap();
        let mut h2 = read_frame_whole(&mut w, 2).unwrap()[..WAL_FRAME_HEADER].to_vec();
        h2[16] = b'X';
        let _ = read_frame_whole(&mut w, 0).unwrap();
        w.write(&h2, frame_off(2)).unwrap();
        w.read(&mut [0u8; 8], frame_off(0) + 16).unwrap(); // flushes it
        let back = read_frame_whole(&mut w, 2).unwrap();
        assert_eq!((&back[..24], &back[24..]), (&h2[..], &pages[2][..]));
        // A header alone for a new frame: pending until the next operation,
        // then written with a zero page (SQLite never reads that page).
        let mut fh = [0u8; WAL_FRAME_HEADER];
        fh[8..16].copy_from_slice(&SALTS.to_be_bytes());
        fh[0] = 9;
        let len = w.raw.0.len();
        w.write(&fh, frame_off(3)).unwrap();
        assert_eq!(w.raw.0.len(), len);
        assert_eq!(w.file_size().unwrap(), frame_off(4));
        let back = read_frame_whole(&mut w, 3).unwrap();
        assert_eq!(&back[..24], &fh[..]);
        assert!(back[24..].iter().all(|&b| b == 0));
    }

    /// A file created before AEGIS-256X2 (header format 3) keeps sealing
    /// its infrastructure layer with AEGIS-256, and its header stays format
    /// 3 when rewritten; its units are not AEGIS-256X2 units.
    #[test]
    fn a_format_3_file_keeps_aegis_256() {
        let (_dir, infra) = infra_protector();
        let (keyring, f) = db_file_with(Some(infra));
        assert_eq!(
            f.shared
                .keys
                .read()
                .unwrap()
                .current
                .infra
                .as_ref()
                .unwrap()
                .cipher(),
            InfraUnitCipher::Aegis256X2
        );
        let mut raw = MemFile(f.raw.0.clone());
        let (dek, idek) = {
            let meta = f.shared.meta.lock().unwrap();
            let mut h = meta.header.clone().unwrap();
            h.infra.as_mut().unwrap().unit_cipher = InfraUnitCipher::Aegis256;
            h.sequence += 1;
            let slot = h.encode(&meta.dek).unwrap();
            assert_eq!(slot[8..10], 3u16.to_be_bytes());
            raw.0[..slot.len()].copy_from_slice(&slot);
            (meta.dek.clone(), meta.infra_dek.clone().unwrap())
        };
        let shared = SharedFile::open(
            &mut raw,
            FileKind::MainDb,
            "m.db".into(),
            &keyring,
            None,
            true,
        )
        .unwrap();
        assert_eq!(
            shared
                .keys
                .read()
                .unwrap()
                .current
                .infra
                .as_ref()
                .unwrap()
                .cipher(),
            InfraUnitCipher::Aegis256
        );
        let mut f3 = EncryptedFile::new(raw, shared, Arc::new(Stats::default()));
        let mut page = vec![0u8; 4096];
        page[16..18].copy_from_slice(&4096u16.to_be_bytes());
        page[20] = (SEAL_OVERHEAD + INFRA_OVERHEAD) as u8;
        page[200..206].copy_from_slice(b"format");
        f3.write(&page, 0).unwrap();
        f3.sync(0).unwrap();
        let mut back = vec![0u8; 4096];
        f3.read(&mut back, 0).unwrap();
        assert_eq!(back, page);
        let newest = f3.raw.0[..HEADER_LEN as usize]
            .chunks(HEADER_SLOT_SIZE)
            .filter_map(|s| FileHeader::decode_unverified(s).ok().flatten())
            .map(|u| u.verify(&dek).unwrap())
            .max_by_key(|h| h.sequence)
            .unwrap();
        assert_eq!(newest.format_version(), 3);
        let disk = &f3.raw.0[HEADER_LEN as usize..HEADER_LEN as usize + 4096];
        let ctx = f3.ctx(
            &Geometry::Pages {
                page_size: 4096,
                base: HEADER_LEN,
                ov: 76,
            }
            .unit_at(0),
            0,
        );
        let x2 = InfraUnitKey::new(&idek, InfraUnitCipher::Aegis256X2).unwrap();
        assert!(x2.open(&ctx, &mut disk.to_vec()).is_err());
        let old = InfraUnitKey::new(&idek, InfraUnitCipher::Aegis256).unwrap();
        old.open(&ctx, &mut disk.to_vec()).unwrap();
    }

    /// Page 1 of a database declaring fewer reserved bytes than tag and
    /// nonce need is refused before anything is written.
    #[test]
    fn a_page_without_room_for_the_tag_is_refused() {
        let (_keyring, mut f) = db_file();
        let before = f.raw.0.len();
        let mut page = vec![0u8; 4096];
        page[16..18].copy_from_slice(&4096u16.to_be_bytes());
        page[20] = 8; // SQLite's reserved-bytes field: too few.
        let fail = f.write(&page, 0).unwrap_err();
        assert_eq!(fail.rc, ffi::SQLITE_IOERR_WRITE);
        let msg = fail.detail.unwrap().to_string();
        assert!(
            msg.contains("has 8 reserved bytes") && msg.contains("atrest needs 28"),
            "{msg}"
        );
        assert_eq!(f.raw.0.len(), before, "nothing written");
        page[20] = 28;
        f.write(&page, 0).unwrap();
    }

    #[test]
    fn temp_file_matches_a_plain_model() {
        let shared = SharedFile::temp("mem".into(), false).unwrap();
        model_check(EncryptedFile::new(
            MemFile::default(),
            shared,
            Arc::new(Stats::default()),
        ));
    }

    #[test]
    fn journal_file_matches_a_plain_model() {
        model_check(journal_file());
    }

    #[test]
    fn journal_and_temp_files_with_the_infrastructure_layer_match_a_plain_model() {
        let (_dir, infra) = infra_protector();
        let j = journal_file_with(Some(infra));
        let ov = SEAL_OVERHEAD + INFRA_OVERHEAD;
        assert_eq!(j.shared.ov, ov);
        model_check(j);
        let shared = SharedFile::temp("mem".into(), true).unwrap();
        assert_eq!(shared.ov, ov);
        let stats = Arc::new(Stats::default());
        let mut t = EncryptedFile::new(MemFile::default(), shared, Arc::clone(&stats));
        t.write(&[0xC5; 10_000], 0).unwrap();
        t.sync(0).unwrap();
        // Both layers sealed every block; each temp block is 4096 + 76 on disk.
        let units = stats.units_sealed.load(Ordering::Relaxed);
        assert_eq!(units, stats.infra_units_sealed.load(Ordering::Relaxed));
        assert_eq!(t.raw.0.len(), 2 * (4096 + ov) + (10_000 - 8192) + ov);
        let mut back = vec![0u8; 10_000];
        assert!(t.read(&mut back, 0).unwrap());
        assert!(back.iter().all(|&b| b == 0xC5));
    }

    /// A file whose header names other layers than the data directory
    /// uses is refused, in both directions (same data-layer key, so only
    /// the layers differ).
    #[test]
    fn a_file_with_other_layers_than_the_keyring_is_refused() {
        let (_dir, infra) = infra_protector();
        for (create_with, open_with) in [(Some(infra.clone()), None), (None, Some(infra))] {
            let (_k, f) = db_file_with(create_with);
            let mut raw = MemFile(f.raw.0.clone());
            let keyring = Keyring::new(
                Arc::new(TestProtector(SymmetricKek::new(&[9; 32]).unwrap())),
                open_with,
            );
            let fail = SharedFile::open(
                &mut raw,
                FileKind::MainDb,
                "m.db".into(),
                &keyring,
                None,
                true,
            )
            .err()
            .expect("layers differ");
            let msg = fail.detail.unwrap().to_string();
            assert!(msg.contains("layer") && msg.contains("m.db"), "{msg}");
        }
    }

    /// With the infrastructure layer, page 1 must reserve 76 bytes: 28 is
    /// refused (the data layer's trailer alone does not fit both), and so
    /// is the retired XChaCha20-Poly1305 reserve of 68.
    #[test]
    fn with_the_infrastructure_layer_a_page_needs_76_reserved_bytes() {
        let ov = SEAL_OVERHEAD + INFRA_OVERHEAD;
        let (_dir, infra) = infra_protector();
        let (_keyring, mut f) = db_file_with(Some(infra));
        let mut page = vec![0u8; 4096];
        page[16..18].copy_from_slice(&4096u16.to_be_bytes());
        for short in [SEAL_OVERHEAD as u8, 68] {
            page[20] = short;
            let msg = f.write(&page, 0).unwrap_err().detail.unwrap().to_string();
            assert!(msg.contains(&format!("atrest needs {ov}")), "{msg}");
        }
        page[20] = ov as u8;
        page[100..110].copy_from_slice(b"0123456789");
        f.write(&page, 0).unwrap();
        let disk = f.raw.0[HEADER_LEN as usize..].to_vec();
        assert!(!disk.windows(10).any(|w| w == b"0123456789"));
        let mut back = vec![0u8; 4096];
        f.read(&mut back, 0).unwrap();
        assert_eq!(back, page, "reads back with zeroed reserved bytes");
        assert_eq!(f.stats.infra_units_opened.load(Ordering::Relaxed), 1);
        assert_eq!(f.stats.units_opened.load(Ordering::Relaxed), 1);
    }

    /// Random writes, reads and truncations (write-back tail block for temp
    /// files, read-modify-write of sealed blocks for journals) always read
    /// back exactly what a plain byte vector holds, and nothing is stored
    /// in clear.
    fn model_check(mut f: EncryptedFile<MemFile>) {
        let mut model: Vec<u8> = vec![];
        let mut rng = 0x1234_5678_u64;
        let mut next = |m: u64| {
            rng = rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (rng >> 33) % m
        };
        for step in 0..3000 {
            match next(10) {
                0..=5 => {
                    let off = next(40_000);
                    let len = 1 + next(9000) as usize;
                    let data: Vec<u8> = (0..len).map(|i| (step as u8) ^ (i as u8) | 0x80).collect();
                    f.write(&data, off).unwrap();
                    let end = off as usize + len;
                    if model.len() < end {
                        model.resize(end, 0);
                    }
                    model[off as usize..end].copy_from_slice(&data);
                }
                6..=8 => {
                    let off = next(45_000);
                    let len = 1 + next(9000) as usize;
                    let mut buf = vec![0xAAu8; len];
                    let full = f.read(&mut buf, off).unwrap();
                    let mut want = vec![0u8; len];
                    let avail = model.len().saturating_sub(off as usize).min(len);
                    if avail > 0 {
                        want[..avail].copy_from_slice(&model[off as usize..off as usize + avail]);
                    }
                    assert_eq!(full, avail == len, "step {step}: short-read flag");
                    assert_eq!(buf, want, "step {step}: read {len} at {off}");
                }
                _ => {
                    let size = next(40_000);
                    f.truncate(size).unwrap();
                    model.truncate(size as usize);
                }
            }
            assert_eq!(
                f.file_size().unwrap(),
                model.len() as u64,
                "step {step}: size"
            );
        }
        f.sync(0).unwrap();
        let raw = &f.raw.0;
        // Writes used bytes with the top bit set; runs of them in the raw
        // file would mean plaintext reached the disk.
        let longest = raw
            .split(|b| b & 0x80 == 0)
            .map(|run| run.len())
            .max()
            .unwrap_or(0);
        assert!(
            longest < 64,
            "a {longest}-byte plaintext-like run reached the disk"
        );
    }
}
