//! The root key of a tree and the per-file DEKs it wraps.
//!
//! A tree has one root file (`.atrest-fs-root`, a header only) whose DEK is
//! wrapped by the KEK (the service key, or a customer key in the vault).
//! Every file's DEK is wrapped by a key derived from the root DEK, and its
//! header carries a copy of the root's KEK-wrapped DEK, so one protector
//! call opens a whole tree and any file can be read with the KEK alone.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;

use atrest_crypto::{
    CipherId, Dek, DekId, FileHeader, FileId, FileKind, FsLayout, KeyProtector, KeySource,
    SymmetricKek, WrappedDek, HEADER_SLOT_SIZE,
};
use zeroize::Zeroizing;

use crate::FsError;

/// The root file's name inside the ciphertext directory (hidden from the
/// plaintext view).
pub const ROOT_FILE: &str = ".atrest-fs-root";

/// An unwrapped root key. Its DEK zeroizes on drop.
pub struct RootKey {
    pub(crate) file_id: FileId,
    pub(crate) dek: Dek,
    pub(crate) wrapped: WrappedDek,
    wrap_key: SymmetricKek,
}

impl std::fmt::Debug for RootKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RootKey")
            .field("file_id", &self.file_id.to_hex())
            .field("kek", &self.wrapped.kek)
            .finish_non_exhaustive()
    }
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl RootKey {
    fn from_dek(file_id: FileId, dek: Dek, wrapped: WrappedDek) -> Result<Self, FsError> {
        let k = Zeroizing::new(dek.derive(b"atrest fs file wrap v1")?);
        let wrap_key = SymmetricKek::new(&k)?;
        Ok(RootKey {
            file_id,
            dek,
            wrapped,
            wrap_key,
        })
    }

    /// Creates the root file of a new, empty tree in `dir`.
    pub fn create(dir: &Path, protector: &dyn KeyProtector) -> Result<Self, FsError> {
        let dek = Dek::generate()?;
        let wrapped = protector.wrap(&dek).map_err(FsError::Key)?;
        let file_id = FileId::random()?;
        let header = root_header(file_id, &dek, wrapped.clone(), 1);
        let slot = header.encode(&dek)?;
        let path = dir.join(ROOT_FILE);
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| FsError::io(format!("create {}", path.display()), e))?;
        f.write_all(&slot)
            .and_then(|_| f.write_all(&vec![0u8; HEADER_SLOT_SIZE]))
            .and_then(|_| f.sync_all())
            .map_err(|e| FsError::io(format!("write {}", path.display()), e))?;
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| FsError::io(format!("sync {}", dir.display()), e))?;
        Self::from_dek(file_id, dek, wrapped)
    }

    /// Opens the root file of `dir`, unwrapping its DEK with `protector`.
    pub fn open(dir: &Path, protector: &dyn KeyProtector) -> Result<Self, FsError> {
        let path = dir.join(ROOT_FILE);
        let f = File::open(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                FsError::NotATree(dir.display().to_string())
            } else {
                FsError::io(format!("open {}", path.display()), e)
            }
        })?;
        let mut last_err = None;
        let mut best: Option<(FileHeader, Dek)> = None;
        for k in 0..2u64 {
            let mut slot = vec![0u8; HEADER_SLOT_SIZE];
            if f.read_exact_at(&mut slot, k * HEADER_SLOT_SIZE as u64)
                .is_err()
            {
                continue;
            }
            let unverified = match FileHeader::decode_unverified(&slot) {
                Ok(Some(u)) => u,
                Ok(None) => continue,
                Err(e) => {
                    last_err = Some(FsError::Crypto(e));
                    continue;
                }
            };
            let claims = unverified.claims().clone();
            let KeySource::Kek(w) = &claims.key_source else {
                last_err = Some(FsError::Header(format!(
                    "{} is not a root key file",
                    path.display()
                )));
                continue;
            };
            if claims.kind != FileKind::FsRoot {
                last_err = Some(FsError::Header(format!(
                    "{} is not a root key file",
                    path.display()
                )));
                continue;
            }
            let dek = protector.unwrap(claims.dek_id, w).map_err(FsError::Key)?;
            match unverified.verify(&dek) {
                Ok(h) => {
                    if best.as_ref().is_none_or(|(b, _)| h.sequence > b.sequence) {
                        best = Some((h, dek));
                    }
                }
                Err(e) => last_err = Some(FsError::Crypto(e)),
            }
        }
        let Some((h, dek)) = best else {
            return Err(last_err.unwrap_or_else(|| {
                FsError::Header(format!("{} has no valid header", path.display()))
            }));
        };
        let KeySource::Kek(w) = h.key_source else {
            unreachable!("checked above")
        };
        Self::from_dek(h.file_id, dek, w)
    }

    /// Rewraps the root DEK under `protector`'s current KEK (a key change):
    /// only the root file's header changes, never a unit.
    pub fn rewrap(&mut self, dir: &Path, protector: &dyn KeyProtector) -> Result<(), FsError> {
        let wrapped = protector.wrap(&self.dek).map_err(FsError::Key)?;
        let path = dir.join(ROOT_FILE);
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| FsError::io(format!("open {}", path.display()), e))?;
        // The new header goes to the slot not holding the current one.
        let mut seqs = [0u64; 2];
        for (k, s) in seqs.iter_mut().enumerate() {
            let mut slot = vec![0u8; HEADER_SLOT_SIZE];
            if f.read_exact_at(&mut slot, (k * HEADER_SLOT_SIZE) as u64)
                .is_ok()
            {
                if let Ok(Some(u)) = FileHeader::decode_unverified(&slot) {
                    if let Ok(h) = u.verify(&self.dek) {
                        *s = h.sequence;
                    }
                }
            }
        }
        let (target, seq) = if seqs[0] >= seqs[1] {
            (1, seqs[0] + 1)
        } else {
            (0, seqs[1] + 1)
        };
        let header = root_header(self.file_id, &self.dek, wrapped.clone(), seq);
        f.write_all_at(&header.encode(&self.dek)?, target * HEADER_SLOT_SIZE as u64)
            .and_then(|_| f.sync_data())
            .map_err(|e| FsError::io(format!("write {}", path.display()), e))?;
        self.wrapped = wrapped;
        Ok(())
    }

    /// The KEK the root DEK is wrapped with now.
    pub fn kek(&self) -> &atrest_crypto::KekRef {
        &self.wrapped.kek
    }

    /// A new file's DEK and its key source.
    pub(crate) fn new_file_key(&self, file_id: FileId) -> Result<(Dek, KeySource), FsError> {
        let dek = Dek::generate()?;
        let wrapped = self.wrap_key.wrap(&dek, &binding(self.file_id, file_id))?;
        Ok((
            dek,
            KeySource::Parent {
                parent_file_id: self.file_id,
                parent_dek_id: self.dek.id(),
                parent_wrapped: self.wrapped.clone(),
                wrapped,
            },
        ))
    }

    /// The DEK of a file whose header names `source`.
    pub(crate) fn file_dek(
        &self,
        file_id: FileId,
        dek_id: DekId,
        source: &KeySource,
    ) -> Result<Dek, FsError> {
        let KeySource::Parent {
            parent_file_id,
            parent_dek_id,
            wrapped,
            ..
        } = source
        else {
            return Err(FsError::Header(
                "a file's DEK must be wrapped by its tree's root key".into(),
            ));
        };
        if *parent_file_id != self.file_id || *parent_dek_id != self.dek.id() {
            return Err(FsError::ForeignFile);
        }
        Ok(self
            .wrap_key
            .unwrap(dek_id, wrapped, &binding(self.file_id, file_id))?)
    }
}

/// Shared by every file of a mount.
pub type SharedRoot = Arc<RootKey>;

fn binding(root: FileId, file: FileId) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + 32 + 1);
    v.extend_from_slice(b"ATRFSWR1");
    v.extend_from_slice(&root.0);
    v.extend_from_slice(&file.0);
    v.push(FileKind::FsFile as u8);
    v
}

fn root_header(file_id: FileId, dek: &Dek, wrapped: WrappedDek, sequence: u64) -> FileHeader {
    FileHeader {
        sequence,
        kind: FileKind::FsRoot,
        cipher: CipherId::Aes256GcmRandomNonce,
        file_id,
        dek_id: dek.id(),
        unit_size: crate::layout::UNIT as u32,
        created_unix: now_unix(),
        key_source: KeySource::Kek(wrapped),
        seals_reserved: 0,
        wal_salts: 0,
        wal_durable_frames: 0,
        infra: None,
        rotation: None,
        fs: Some(FsLayout {
            slots: 1,
            durable_units: 0,
            map_groups: 0,
        }),
    }
}

pub(crate) fn file_header(file_id: FileId, dek: &Dek, source: KeySource, slots: u8) -> FileHeader {
    FileHeader {
        sequence: 1,
        kind: FileKind::FsFile,
        cipher: CipherId::Aes256GcmRandomNonce,
        file_id,
        dek_id: dek.id(),
        unit_size: crate::layout::UNIT as u32,
        created_unix: now_unix(),
        key_source: source,
        seals_reserved: 0,
        wal_salts: 0,
        wal_durable_frames: 0,
        infra: None,
        rotation: None,
        fs: Some(FsLayout {
            slots,
            durable_units: 0,
            map_groups: 0,
        }),
    }
}
