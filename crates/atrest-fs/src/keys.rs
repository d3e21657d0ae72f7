//! The root key of a tree and the per-file DEKs it wraps.
//!
//! A tree has one root file (`.atrest-fs-root`, a header only) whose DEK is
//! wrapped by the KEK (the service key, or a customer key in the vault).
//! Every file's DEK is wrapped by a key derived from the root DEK, and its
//! header carries a copy of the root's KEK-wrapped DEK, so one protector
//! call opens a whole tree and any file can be read with the KEK alone.
//!
//! With the infrastructure layer (scenario 2), the tree has its own
//! infrastructure master key in a separate keystore: the root header names
//! it (a root infrastructure DEK wrapped under it, which proves at open
//! that the keystore holds the right key), and every file gets a random
//! infrastructure DEK wrapped under it, recorded in its header.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::{Arc, RwLock};

use atrest_crypto::{
    CipherId, Dek, DekId, FileHeader, FileId, FileKind, FsLayout, InfraDek, InfraKeyRecord,
    InfraUnitCipher, KeyProtector, KeySource, SymmetricKek, WrappedDek, HEADER_SLOT_SIZE,
};
use atrest_keystore::{InfraKeyId, InfraKeystore, InfraProtector};
use zeroize::Zeroizing;

use crate::FsError;

/// The root file's name inside the ciphertext directory (hidden from the
/// plaintext view).
pub const ROOT_FILE: &str = ".atrest-fs-root";

/// An unwrapped root key. Its DEK zeroizes on drop.
pub struct RootKey {
    pub(crate) file_id: FileId,
    pub(crate) dek: Dek,
    /// The root DEK wrapped by the KEK (changed by a rewrap while mounted).
    wrapped: RwLock<WrappedDek>,
    wrap_key: SymmetricKek,
    /// The infrastructure layer: the master key's protector and the root's
    /// own record (kept through rewraps).
    infra: Option<(InfraProtector, InfraKeyRecord)>,
}

impl std::fmt::Debug for RootKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RootKey")
            .field("file_id", &self.file_id.to_hex())
            .field("kek", &self.kek())
            .field("infrastructure", &self.infra.as_ref().map(|(p, _)| p))
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
    fn from_dek(
        file_id: FileId,
        dek: Dek,
        wrapped: WrappedDek,
        infra: Option<(InfraProtector, InfraKeyRecord)>,
    ) -> Result<Self, FsError> {
        let k = Zeroizing::new(dek.derive(b"atrest fs file wrap v1")?);
        let wrap_key = SymmetricKek::new(&k)?;
        Ok(RootKey {
            file_id,
            dek,
            wrapped: RwLock::new(wrapped),
            wrap_key,
            infra,
        })
    }

    /// Creates the root file of a new, empty tree in `dir`. With `infra`,
    /// every file of the tree gets the infrastructure layer, under a new
    /// master key created in that keystore.
    pub fn create(
        dir: &Path,
        protector: &dyn KeyProtector,
        infra: Option<&InfraKeystore>,
    ) -> Result<Self, FsError> {
        let dek = Dek::generate()?;
        let wrapped = protector.wrap(&dek).map_err(FsError::Key)?;
        let file_id = FileId::random()?;
        let infra = match infra {
            None => None,
            Some(ks) => {
                let id = ks.create_master_key()?;
                let p = ks.protector(id, 1)?;
                let (_, record) = new_infra_key(&p, file_id, FileKind::FsRoot)?;
                Some((p, record))
            }
        };
        let header = root_header(
            file_id,
            &dek,
            wrapped.clone(),
            1,
            infra.as_ref().map(|(_, r)| r.clone()),
        );
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
        Self::from_dek(file_id, dek, wrapped, infra)
    }

    /// Opens the root file of `dir`, unwrapping its DEK with `protector`.
    /// A tree with the infrastructure layer needs that layer's keystore
    /// (`infra`), and one without refuses it: the layers are fixed at create.
    pub fn open(
        dir: &Path,
        protector: &dyn KeyProtector,
        infra: Option<&InfraKeystore>,
    ) -> Result<Self, FsError> {
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
            // A slot under a key the protector no longer opens (the older
            // slot during a rewrap) gives way to the other one.
            let dek = match protector.unwrap(claims.dek_id, w) {
                Ok(d) => d,
                Err(e) => {
                    last_err = Some(FsError::Key(e));
                    continue;
                }
            };
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
        let infra = match (h.infra, infra) {
            (None, None) => None,
            (Some(record), Some(ks)) => {
                let (id, version) = InfraKeyId::parse(&record.wrapped.kek.key_id)
                    .ok_or_else(|| {
                        FsError::Header(format!(
                            "{} names no infrastructure master key",
                            path.display()
                        ))
                    })?;
                let p = ks.protector(id, version)?;
                // Proves the keystore holds this tree's master key.
                p.unwrap(record.dek_id, &record.wrapped, h.file_id, FileKind::FsRoot)
                    .map_err(FsError::InfraKey)?;
                Some((p, record))
            }
            (Some(_), None) => {
                return Err(FsError::Layers(
                    "this tree was created with the infrastructure layer: open it with its infrastructure keystore".into(),
                ))
            }
            (None, Some(_)) => {
                return Err(FsError::Layers(
                    "this tree was created without the infrastructure layer (it cannot be added later), but an infrastructure keystore was given".into(),
                ))
            }
        };
        let KeySource::Kek(w) = h.key_source else {
            unreachable!("checked above")
        };
        Self::from_dek(h.file_id, dek, w, infra)
    }

    /// Whether the tree's files carry the infrastructure layer.
    pub fn has_infra(&self) -> bool {
        self.infra.is_some()
    }

    /// Rewraps the root DEK under `protector`'s current KEK (a key change):
    /// only the root file's header changes, never a unit. Both header
    /// slots get the new wrapping, one after the other (each synced), so no
    /// copy under the old KEK is left; a crash in between leaves one slot
    /// under each key, and the open takes the newest it can unwrap.
    pub fn rewrap(&self, dir: &Path, protector: &dyn KeyProtector) -> Result<(), FsError> {
        // Already under that key (a switch finished after a crash): keep
        // the wrapping, so files that have it are not written again.
        let wrapped = match self.wrapped() {
            w if w.kek == protector.current_kek() => w,
            _ => protector.wrap(&self.dek).map_err(FsError::Key)?,
        };
        let path = dir.join(ROOT_FILE);
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| FsError::io(format!("open {}", path.display()), e))?;
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
        // The slot not holding the newest header first, then the other.
        let first = if seqs[0] >= seqs[1] { 1 } else { 0 };
        let mut seq = seqs[0].max(seqs[1]);
        for target in [first, 1 - first] {
            seq += 1;
            let header = root_header(
                self.file_id,
                &self.dek,
                wrapped.clone(),
                seq,
                self.infra.as_ref().map(|(_, r)| r.clone()),
            );
            f.write_all_at(
                &header.encode(&self.dek)?,
                (target * HEADER_SLOT_SIZE) as u64,
            )
            .and_then(|_| f.sync_data())
            .map_err(|e| FsError::io(format!("write {}", path.display()), e))?;
        }
        *self.wrapped.write().expect("root wrapping") = wrapped;
        Ok(())
    }

    /// The root DEK as the KEK wraps it now.
    pub fn wrapped(&self) -> WrappedDek {
        self.wrapped.read().expect("root wrapping").clone()
    }

    /// The KEK the root DEK is wrapped with now.
    pub fn kek(&self) -> atrest_crypto::KekRef {
        self.wrapped().kek
    }

    /// A new file's DEK and its key source, and its infrastructure DEK
    /// with the record for its header when the tree has that layer.
    #[allow(clippy::type_complexity)]
    pub(crate) fn new_file_key(
        &self,
        file_id: FileId,
    ) -> Result<(Dek, KeySource, Option<(InfraDek, InfraKeyRecord)>), FsError> {
        let dek = Dek::generate()?;
        let wrapped = self.wrap_key.wrap(&dek, &binding(self.file_id, file_id))?;
        let infra = match &self.infra {
            Some((p, _)) => Some(new_infra_key(p, file_id, FileKind::FsFile)?),
            None => None,
        };
        Ok((
            dek,
            KeySource::Parent {
                parent_file_id: self.file_id,
                parent_dek_id: self.dek.id(),
                parent_wrapped: self.wrapped(),
                wrapped,
            },
            infra,
        ))
    }

    /// The infrastructure DEK of a file whose header has `record`; refuses
    /// a file whose layers differ from the tree's.
    pub(crate) fn file_infra(
        &self,
        file_id: FileId,
        record: Option<&InfraKeyRecord>,
    ) -> Result<Option<InfraDek>, FsError> {
        match (record, &self.infra) {
            (None, None) => Ok(None),
            (Some(r), Some((p, _))) => p
                .unwrap(r.dek_id, &r.wrapped, file_id, FileKind::FsFile)
                .map(Some)
                .map_err(FsError::InfraKey),
            (Some(_), None) => Err(FsError::Layers(
                "the file has the infrastructure layer but its tree does not".into(),
            )),
            (None, Some(_)) => Err(FsError::Layers(
                "the file lacks the infrastructure layer its tree has".into(),
            )),
        }
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

/// The infrastructure master key a tree's root file names (`infra:<id>:v<n>`
/// style key id), read without unwrapping anything: for deleting that key
/// with the server. `None` when the tree has no such layer or no root.
pub fn infra_key_of(dir: &Path) -> Option<String> {
    let f = File::open(dir.join(ROOT_FILE)).ok()?;
    (0..2u64).find_map(|k| {
        let mut slot = vec![0u8; HEADER_SLOT_SIZE];
        f.read_exact_at(&mut slot, k * HEADER_SLOT_SIZE as u64)
            .ok()?;
        let u = FileHeader::decode_unverified(&slot).ok()??;
        u.claims()
            .infra
            .as_ref()
            .map(|r| r.wrapped.kek.key_id.clone())
    })
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

fn new_infra_key(
    p: &InfraProtector,
    file_id: FileId,
    kind: FileKind,
) -> Result<(InfraDek, InfraKeyRecord), FsError> {
    let idek = InfraDek::generate()?;
    let wrapped = p.wrap(&idek, file_id, kind).map_err(FsError::InfraKey)?;
    let record = InfraKeyRecord {
        dek_id: idek.id(),
        wrapped,
        unit_cipher: InfraUnitCipher::NEW_FILES,
    };
    Ok((idek, record))
}

fn root_header(
    file_id: FileId,
    dek: &Dek,
    wrapped: WrappedDek,
    sequence: u64,
    infra: Option<InfraKeyRecord>,
) -> FileHeader {
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
        infra,
        rotation: None,
        fs: Some(FsLayout {
            slots: 1,
            durable_units: 0,
            map_groups: 0,
        }),
        db_name: None,
    }
}

pub(crate) fn file_header(
    file_id: FileId,
    dek: &Dek,
    source: KeySource,
    slots: u8,
    infra: Option<InfraKeyRecord>,
) -> FileHeader {
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
        infra,
        rotation: None,
        fs: Some(FsLayout {
            slots,
            durable_units: 0,
            map_groups: 0,
        }),
        db_name: None,
    }
}
