//! Work on files that no SQLite handle has open: copies in a backup, WAL
//! archive segments, files being restored. Two operations, both on
//! ciphertext and headers only:
//!
//! * [`rewrap_at_rest`]: records a file's keys under the keyring's current
//!   KEK and infrastructure master key, rewriting only the header (both
//!   slots, each made durable before the other is touched);
//! * [`verify_at_rest`]: authenticates every unit of a database or WAL
//!   copy, strictly (a copy is taken at a commit boundary, so a unit that
//!   does not authenticate is damage, never a torn tail).
//!
//! Neither writes plaintext or an unwrapped key anywhere.

use std::os::unix::fs::FileExt;
use std::path::Path;

use atrest_crypto::{CryptoError, FileHeader, FileKind, KeySource, HEADER_SLOT_SIZE};
use rusqlite::ffi;

use crate::file::{self, EncryptedFile, Fail, RawFile, SharedFile, Stats};
use crate::keyring::Keyring;
use crate::layout::{HEADER_LEN, WAL_FRAME_HEADER, WAL_HEADER};
use crate::StorageError;

/// A plain OS file under the [`RawFile`] interface.
pub(crate) struct OsFile(pub std::fs::File);

impl RawFile for OsFile {
    fn read_at(&mut self, buf: &mut [u8], off: u64) -> Result<bool, i32> {
        let mut done = 0;
        while done < buf.len() {
            match self.0.read_at(&mut buf[done..], off + done as u64) {
                Ok(0) => {
                    buf[done..].fill(0);
                    return Ok(false);
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return Err(ffi::SQLITE_IOERR_READ),
            }
        }
        Ok(true)
    }
    fn write_at(&mut self, buf: &[u8], off: u64) -> Result<(), i32> {
        self.0
            .write_all_at(buf, off)
            .map_err(|_| ffi::SQLITE_IOERR_WRITE)
    }
    fn truncate(&mut self, size: u64) -> Result<(), i32> {
        self.0.set_len(size).map_err(|_| ffi::SQLITE_IOERR_TRUNCATE)
    }
    fn size(&mut self) -> Result<u64, i32> {
        self.0
            .metadata()
            .map(|m| m.len())
            .map_err(|_| ffi::SQLITE_IOERR_FSTAT)
    }
    fn sync(&mut self, _flags: i32) -> Result<(), i32> {
        self.0.sync_all().map_err(|_| ffi::SQLITE_IOERR_FSYNC)
    }
}

fn io_err(path: &str) -> impl Fn(std::io::Error) -> StorageError + '_ {
    move |e| StorageError::DataDir {
        path: path.to_string(),
        reason: e.to_string(),
    }
}

fn fail_err(path: &str, f: Fail) -> StorageError {
    f.detail.unwrap_or_else(|| StorageError::Io {
        path: path.to_string(),
        code: f.rc,
    })
}

/// The newest header slot of `f` that verifies under the keyring, with
/// its slot number and the file's DEK.
pub(crate) fn best_header(
    f: &std::fs::File,
    keyring: &Keyring,
    name: &str,
) -> Result<(u64, FileHeader, atrest_crypto::Dek), StorageError> {
    let mut slots = vec![0u8; HEADER_LEN as usize];
    let mut raw = OsFile(f.try_clone().map_err(io_err(name))?);
    raw.read_at(&mut slots, 0)
        .map_err(|code| StorageError::Io {
            path: name.to_string(),
            code,
        })?;
    let mut best: Option<(u64, FileHeader, atrest_crypto::Dek)> = None;
    let mut last_err = None;
    for (i, slot) in slots.chunks(HEADER_SLOT_SIZE).enumerate() {
        let cand = match FileHeader::decode_unverified(slot) {
            Ok(Some(cand)) => cand,
            Err(e @ CryptoError::UnsupportedFormat(_)) => {
                last_err.get_or_insert(StorageError::Header {
                    path: name.to_string(),
                    reason: e.to_string(),
                });
                continue;
            }
            _ => continue,
        };
        let claims = cand.claims().clone();
        if best
            .as_ref()
            .is_some_and(|(_, b, _)| b.sequence >= claims.sequence)
        {
            continue;
        }
        match file::unwrap_file_dek(keyring, &claims, name).and_then(|dek| {
            cand.verify(&dek)
                .map(|h| (h, dek))
                .map_err(|e| StorageError::Header {
                    path: name.to_string(),
                    reason: e.to_string(),
                })
        }) {
            Ok((h, dek)) => best = Some((i as u64, h, dek)),
            Err(e) => last_err = Some(e),
        }
    }
    best.ok_or_else(|| {
        last_err.unwrap_or_else(|| StorageError::Header {
            path: name.to_string(),
            reason: "not an atrest file (no header slot parses)".into(),
        })
    })
}

/// Rewraps the keys of a closed file under the keyring's current KEK (the
/// data layer's DEK, or for a WAL or journal its parent database's DEK
/// copy) and current infrastructure master key version. Returns whether
/// anything changed. The keyring's protector must still be able to unwrap
/// the old wrapping (a routing protector during a key change).
///
/// Crash safety: the file is synced, the new header goes to the other
/// slot with a higher sequence and is synced, then to the first slot and
/// is synced. At every moment some slot verifies; afterwards none holds
/// the old wrapping.
pub fn rewrap_at_rest(path: &Path, keyring: &Keyring) -> Result<bool, StorageError> {
    rewrap_layers_at_rest(path, keyring, true)
}

/// [`rewrap_at_rest`], of the infrastructure layer's keys alone when
/// `data` is false.
pub(crate) fn rewrap_layers_at_rest(
    path: &Path,
    keyring: &Keyring,
    data: bool,
) -> Result<bool, StorageError> {
    let name = path.display().to_string();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(io_err(&name))?;
    let (slot, mut header, dek) = best_header(&f, keyring, &name)?;
    let mut changed = false;
    if data {
        changed |= rewrap_data_keys(&mut header, &dek, keyring, &name)?;
    }
    changed |= rewrap_infra_keys(&mut header, keyring, &name)?;
    if !changed {
        return Ok(false);
    }
    f.sync_all().map_err(io_err(&name))?;
    for target in [1 - slot, slot] {
        header.sequence += 1;
        let bytes = header.encode(&dek).map_err(|source| StorageError::Crypto {
            path: name.clone(),
            source,
        })?;
        f.write_all_at(&bytes, target * HEADER_SLOT_SIZE as u64)
            .map_err(io_err(&name))?;
        f.sync_all().map_err(io_err(&name))?;
    }
    Ok(true)
}

/// Rewraps, in `header`, the data layer's DEKs that are not under the
/// keyring's current KEK: the file's (a companion's copy of its parent's)
/// and, mid-rotation, the previous one.
fn rewrap_data_keys(
    header: &mut FileHeader,
    dek: &atrest_crypto::Dek,
    keyring: &Keyring,
    name: &str,
) -> Result<bool, StorageError> {
    let key_err = |source| StorageError::Key {
        path: name.to_string(),
        source,
    };
    let current = keyring.protector().current_kek();
    let mut changed = false;
    match &mut header.key_source {
        KeySource::Kek(w) if w.kek != current => {
            *w = keyring.wrap(dek).map_err(key_err)?;
            changed = true;
        }
        KeySource::Parent {
            parent_dek_id,
            parent_wrapped,
            ..
        } if parent_wrapped.kek != current => {
            let parent = keyring
                .unwrap(*parent_dek_id, parent_wrapped)
                .map_err(key_err)?;
            *parent_wrapped = keyring.wrap(&parent).map_err(key_err)?;
            changed = true;
        }
        _ => {}
    }
    if let Some(r) = header.rotation.as_mut() {
        if r.previous_wrapped.kek != current {
            let previous = keyring
                .unwrap(r.previous_dek_id, &r.previous_wrapped)
                .map_err(key_err)?;
            r.previous_wrapped = keyring.wrap(&previous).map_err(key_err)?;
            changed = true;
        }
    }
    Ok(changed)
}

/// Rewraps, in `header`, the infrastructure DEKs (the file's and,
/// mid-rotation, the previous one) not under the current master key
/// version. The layer's unit cipher is the file's for life: only the
/// wrapping of its keys changes.
fn rewrap_infra_keys(
    header: &mut FileHeader,
    keyring: &Keyring,
    name: &str,
) -> Result<bool, StorageError> {
    let Some(protector) = keyring.infra() else {
        return Ok(false);
    };
    let current = protector.current_kek();
    let (file_id, kind) = (header.file_id, header.kind);
    let snapshot = header.clone();
    let previous = header
        .rotation
        .as_mut()
        .and_then(|r| r.previous_infra.as_mut());
    let mut changed = false;
    for record in header.infra.as_mut().into_iter().chain(previous) {
        if record.wrapped.kek == current {
            continue;
        }
        let idek = file::unwrap_infra_record(keyring, &snapshot, record, name)?;
        record.wrapped =
            protector
                .wrap(&idek, file_id, kind)
                .map_err(|source| StorageError::InfraKey {
                    path: name.to_string(),
                    source,
                })?;
        changed = true;
    }
    Ok(changed)
}

/// What [`verify_at_rest`] checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub kind: FileKind,
    /// Pages (database) or frames (WAL) authenticated.
    pub units: u64,
    pub bytes: u64,
}

/// A closed copy opened for strict reading: its name, the file, its kind
/// and logical size, and its unit geometry (base, overhead).
struct Copy {
    name: String,
    file: EncryptedFile<OsFile>,
    kind: FileKind,
    logical: u64,
    base: u64,
    ov: usize,
}

fn open_copy(path: &Path, keyring: &Keyring) -> Result<Copy, StorageError> {
    let name = path.display().to_string();
    let f = std::fs::File::open(path).map_err(io_err(&name))?;
    let (_, header, _) = best_header(&f, keyring, &name)?;
    let kind = header.kind;
    let mut raw = OsFile(f);
    let shared = SharedFile::open(&mut raw, kind, name.clone(), keyring, None, false)
        .map_err(|e| fail_err(&name, e))?;
    let (base, ov) = (shared.base, shared.ov);
    let stats = std::sync::Arc::new(Stats::default());
    let mut file = EncryptedFile::new(raw, shared, stats).strict();
    let logical = file.file_size().map_err(|e| fail_err(&name, e))?;
    Ok(Copy {
        name,
        file,
        kind,
        logical,
        base,
        ov,
    })
}

impl Copy {
    /// SQLite's WAL header (authenticated) and the page size it names.
    fn wal_header(&mut self) -> Result<([u8; WAL_HEADER], usize), StorageError> {
        let mut hdr = [0u8; WAL_HEADER];
        self.file
            .read(&mut hdr, 0)
            .map_err(|e| fail_err(&self.name, e))?;
        let ps = u32::from_be_bytes(hdr[8..12].try_into().unwrap()) as usize;
        if !(ps.is_power_of_two() && (512..=65536).contains(&ps)) {
            return Err(StorageError::Header {
                path: self.name.clone(),
                reason: format!("the WAL header names page size {ps}"),
            });
        }
        Ok((hdr, ps))
    }
}

/// Authenticates every unit of a closed database or WAL copy under the
/// keyring's keys, reading but never writing. A WAL is checked up to its
/// physical end: every frame header and page must authenticate. Errors
/// name the file and the unit (page or frame).
pub fn verify_at_rest(path: &Path, keyring: &Keyring) -> Result<Verified, StorageError> {
    let bytes = std::fs::metadata(path)
        .map_err(io_err(&path.display().to_string()))?
        .len();
    let mut copy = open_copy(path, keyring)?;
    let (kind, logical) = (copy.kind, copy.logical);
    let mut units = 0u64;
    match kind {
        FileKind::MainDb => {
            let ps = copy.file.shared().known_page_size().max(512);
            let mut page = vec![0u8; ps];
            let mut off = 0u64;
            while off < logical {
                copy.file
                    .read(&mut page, off)
                    .map_err(|e| fail_err(&copy.name, e))?;
                units += 1;
                off += ps as u64;
            }
        }
        FileKind::Wal => {
            if logical >= WAL_HEADER as u64 {
                let (_, ps) = copy.wal_header()?;
                let mut frame = vec![0u8; WAL_FRAME_HEADER + ps];
                let mut off = WAL_HEADER as u64;
                while off + frame.len() as u64 <= logical {
                    // One read for header and page: the page is bound to
                    // the salts in its own frame header.
                    copy.file
                        .read(&mut frame, off)
                        .map_err(|e| fail_err(&copy.name, e))?;
                    units += 1;
                    off += frame.len() as u64;
                }
            }
        }
        other => {
            return Err(StorageError::Unsupported {
                path: copy.name,
                what: format!("verifying a {} copy", other.name()),
            })
        }
    }
    Ok(Verified { kind, units, bytes })
}

/// One transaction read from a WAL copy: its pages in the order they were
/// written (decrypted: kept in memory only, zeroized on drop) and the
/// database size in pages after it.
pub struct WalCommit {
    pub pages: Vec<(u32, zeroize::Zeroizing<Vec<u8>>)>,
    pub db_pages: u32,
    /// The physical offset just past this transaction's commit frame: where
    /// the next read of the same copy starts.
    pub end: u64,
}

/// What [`read_wal_commits`] found.
pub struct WalCommits {
    /// The WAL generation's salts (SQLite's WAL header): two copies of one
    /// WAL generation hold the same frames at the same offsets.
    pub salts: [u8; 8],
    pub page_size: usize,
    pub commits: Vec<WalCommit>,
}

/// Reads the complete transactions of a closed WAL copy (an archive
/// segment) from physical offset `from` (a transaction boundary, as
/// returned in [`WalCommit::end`], or 0 for the start), stopping at the
/// first transaction that ends after `max_frames` frames, and at the end
/// of the copy: frames after the last commit frame are left for later.
/// Every frame must authenticate (strict), so a damaged copy is an error
/// naming the frame, never a short read.
pub fn read_wal_commits(
    path: &Path,
    keyring: &Keyring,
    from: u64,
    max_frames: usize,
) -> Result<WalCommits, StorageError> {
    let mut copy = open_copy(path, keyring)?;
    if copy.kind != FileKind::Wal {
        return Err(StorageError::Unsupported {
            path: copy.name,
            what: format!("reading transactions from a {} file", copy.kind.name()),
        });
    }
    let (base, ov, logical) = (copy.base, copy.ov, copy.logical);
    let mut out = WalCommits {
        salts: [0; 8],
        page_size: 0,
        commits: vec![],
    };
    if logical < WAL_HEADER as u64 {
        return Ok(out);
    }
    let (hdr, ps) = copy.wal_header()?;
    out.page_size = ps;
    out.salts.copy_from_slice(&hdr[16..24]);
    let geo = crate::layout::Geometry::Wal {
        page_size: ps,
        base,
        ov,
    };
    let lframe = (WAL_FRAME_HEADER + ps) as u64;
    let first = geo
        .logical_size(from)
        .saturating_sub(WAL_HEADER as u64)
        .div_ceil(lframe);
    let mut off = WAL_HEADER as u64 + first * lframe;
    let mut frame = zeroize::Zeroizing::new(vec![0u8; WAL_FRAME_HEADER + ps]);
    let mut pending: Vec<(u32, zeroize::Zeroizing<Vec<u8>>)> = vec![];
    let mut frames = 0usize;
    while off + lframe <= logical {
        copy.file
            .read(&mut frame, off)
            .map_err(|e| fail_err(&copy.name, e))?;
        off += lframe;
        if frame[8..16] != out.salts {
            // Not of this generation: nothing after it is either.
            break;
        }
        let pgno = u32::from_be_bytes(frame[0..4].try_into().unwrap());
        let commit = u32::from_be_bytes(frame[4..8].try_into().unwrap());
        pending.push((
            pgno,
            zeroize::Zeroizing::new(frame[WAL_FRAME_HEADER..].to_vec()),
        ));
        frames += 1;
        if commit != 0 {
            out.commits.push(WalCommit {
                pages: std::mem::take(&mut pending),
                db_pages: commit,
                end: geo.physical_size(off),
            });
            if frames >= max_frames {
                break;
            }
        }
    }
    Ok(out)
}
