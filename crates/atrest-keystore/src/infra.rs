//! The infrastructure keystore: infrastructure master keys, kept apart
//! from the service keystore (its own directory, its own file names).
//!
//! An infrastructure master key wraps the per-file infrastructure DEKs of
//! the second encryption layer with AEGIS-256 (libaegis), so that neither
//! the key nor the library is shared with the data layer.
//! A key has versions: rotation adds a version; files are rewrapped under
//! it; older versions stay readable until they are removed.
//!
//! ```text
//! INFRA_KEYSTORE/infra-<id hex>-v<version>.key   (0600, directory 0700)
//!   "ATRIKEY1" | id (16) | version (u32) | key (32) | SHA-256 checksum (16)
//! ```

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use atrest_crypto::{
    os_random, DekId, FileId, FileKind, InfraDek, InfraKek, KekRef, ProtectorError, ProtectorKind,
    WrapAlgorithm, WrappedDek,
};
use aws_lc_rs::digest;
use zeroize::Zeroizing;

use crate::{check_mode, io, KeystoreError};

const MAGIC: &[u8; 8] = b"ATRIKEY1";
const FILE_LEN: usize = 8 + 16 + 4 + 32 + 16;

/// Names one infrastructure master key (all its versions).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct InfraKeyId(pub [u8; 16]);

impl InfraKeyId {
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
    /// The reference written into headers and `atrest.json`:
    /// `infra:<hex>/v<version>`.
    pub fn kek_ref(&self, version: u32) -> KekRef {
        KekRef {
            kind: ProtectorKind::Infrastructure,
            key_id: format!("infra:{}/v{version}", self.to_hex()),
        }
    }
    /// Parses `infra:<hex>/v<version>`.
    pub fn parse(s: &str) -> Option<(Self, u32)> {
        let (id, version) = s.strip_prefix("infra:")?.split_once("/v")?;
        let id: [u8; 16] = hex::decode(id).ok()?.try_into().ok()?;
        Some((Self(id), version.parse().ok().filter(|&v| v >= 1)?))
    }
}

/// A directory of infrastructure master keys.
#[derive(Debug, Clone)]
pub struct InfraKeystore {
    dir: PathBuf,
}

impl InfraKeystore {
    /// `$ATREST_INFRA_KEYSTORE`, else `$XDG_DATA_HOME/atrest/infra-keystore`,
    /// else `~/.local/share/atrest/infra-keystore`: next to the service
    /// keystore, never the same directory.
    pub fn default_dir() -> Result<PathBuf, KeystoreError> {
        if let Some(p) = std::env::var_os("ATREST_INFRA_KEYSTORE") {
            return Ok(PathBuf::from(p));
        }
        if let Some(p) = std::env::var_os("XDG_DATA_HOME") {
            return Ok(PathBuf::from(p).join("atrest/infra-keystore"));
        }
        let home = std::env::var_os("HOME").ok_or(KeystoreError::InfraNoDefaultLocation)?;
        Ok(PathBuf::from(home).join(".local/share/atrest/infra-keystore"))
    }

    /// Opens (creating with mode 0700 if missing) the keystore at `dir`;
    /// refuses one readable by group or others.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, KeystoreError> {
        let dir = dir.into();
        if !dir.exists() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .map_err(|e| io(&dir, e))?;
        }
        check_mode(&dir, 0o700)?;
        Ok(Self { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn key_path(&self, id: InfraKeyId, version: u32) -> PathBuf {
        self.dir
            .join(format!("infra-{}-v{version}.key", id.to_hex()))
    }

    /// Creates a new infrastructure master key (version 1).
    pub fn create_master_key(&self) -> Result<InfraKeyId, KeystoreError> {
        let mut id = [0u8; 16];
        os_random(&mut id).map_err(|e| io(&self.dir, std::io::Error::other(e)))?;
        let id = InfraKeyId(id);
        self.write_version(id, 1)?;
        Ok(id)
    }

    /// Adds the next version of key `id` (one above the highest present)
    /// and returns it. Earlier versions stay for unwrapping.
    pub fn add_version(&self, id: InfraKeyId) -> Result<u32, KeystoreError> {
        let next = self.versions(id)?.into_iter().max().unwrap_or(0) + 1;
        self.write_version(id, next)?;
        Ok(next)
    }

    /// Versions of key `id` present in the keystore.
    pub fn versions(&self, id: InfraKeyId) -> Result<Vec<u32>, KeystoreError> {
        let prefix = format!("infra-{}-v", id.to_hex());
        let mut out = vec![];
        for e in fs::read_dir(&self.dir).map_err(|e| io(&self.dir, e))? {
            let name = e.map_err(|e| io(&self.dir, e))?.file_name();
            let name = name.to_string_lossy();
            if let Some(v) = name
                .strip_prefix(&prefix)
                .and_then(|r| r.strip_suffix(".key"))
                .and_then(|v| v.parse().ok())
            {
                out.push(v);
            }
        }
        out.sort_unstable();
        Ok(out)
    }

    /// Deletes version `version` of key `id` (after every file has been
    /// rewrapped away from it).
    pub fn remove_version(&self, id: InfraKeyId, version: u32) -> Result<(), KeystoreError> {
        let path = self.key_path(id, version);
        fs::remove_file(&path).map_err(|e| io(&path, e))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io(&self.dir, e))
    }

    fn write_version(&self, id: InfraKeyId, version: u32) -> Result<(), KeystoreError> {
        let mut key = Zeroizing::new([0u8; 32]);
        os_random(&mut key[..]).map_err(|e| io(&self.dir, std::io::Error::other(e)))?;
        let mut content = Zeroizing::new(Vec::with_capacity(FILE_LEN));
        content.extend_from_slice(MAGIC);
        content.extend_from_slice(&id.0);
        content.extend_from_slice(&version.to_be_bytes());
        content.extend_from_slice(&key[..]);
        let sum = digest::digest(&digest::SHA256, &content);
        content.extend_from_slice(&sum.as_ref()[..16]);

        let path = self.key_path(id, version);
        let tmp = path.with_extension("key.tmp");
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| io(&tmp, e))?;
        f.write_all(&content).map_err(|e| io(&tmp, e))?;
        f.sync_all().map_err(|e| io(&tmp, e))?;
        // Never replace an existing version (its files would be lost).
        fs::hard_link(&tmp, &path).map_err(|e| io(&path, e))?;
        fs::remove_file(&tmp).map_err(|e| io(&tmp, e))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io(&self.dir, e))?;
        tracing::info!(key = %id.to_hex(), version, keystore = %self.dir.display(),
            "created infrastructure master key version");
        Ok(())
    }

    fn load(&self, id: InfraKeyId, version: u32) -> Result<InfraKek, KeystoreError> {
        let path = self.key_path(id, version);
        let mut f = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(KeystoreError::InfraNotFound {
                    id: id.kek_ref(version).key_id,
                    dir: self.dir.clone(),
                })
            }
            Err(e) => return Err(io(&path, e)),
        };
        check_mode(&path, 0o600)?;
        let mut content = Zeroizing::new(Vec::with_capacity(FILE_LEN + 1));
        f.read_to_end(&mut content).map_err(|e| io(&path, e))?;
        if content.len() != FILE_LEN || &content[..8] != MAGIC {
            return Err(KeystoreError::InfraCorrupt { path });
        }
        let sum = digest::digest(&digest::SHA256, &content[..FILE_LEN - 16]);
        if sum.as_ref()[..16] != content[FILE_LEN - 16..]
            || content[8..24] != id.0
            || content[24..28] != version.to_be_bytes()
        {
            return Err(KeystoreError::InfraCorrupt { path });
        }
        let mut key = Zeroizing::new([0u8; 32]);
        key.copy_from_slice(&content[28..60]);
        Ok(InfraKek::new(&key))
    }

    /// A protector that wraps under version `current` of key `id` and
    /// unwraps under any version present. Loads `current` now, so a
    /// missing, damaged or exposed key file is reported at open.
    pub fn protector(&self, id: InfraKeyId, current: u32) -> Result<InfraProtector, KeystoreError> {
        let kek = self.load(id, current)?;
        let mut keks = HashMap::new();
        keks.insert(current, Arc::new(kek));
        Ok(InfraProtector {
            id,
            current,
            keystore: self.clone(),
            keks: Mutex::new(keks),
        })
    }
}

/// Wraps and unwraps infrastructure DEKs under one infrastructure master
/// key (AEGIS-256).
pub struct InfraProtector {
    id: InfraKeyId,
    current: u32,
    keystore: InfraKeystore,
    keks: Mutex<HashMap<u32, Arc<InfraKek>>>,
}

impl std::fmt::Debug for InfraProtector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "InfraProtector({})", self.current_kek().key_id)
    }
}

impl InfraProtector {
    pub fn id(&self) -> InfraKeyId {
        self.id
    }
    pub fn current_version(&self) -> u32 {
        self.current
    }
    pub fn keystore(&self) -> &InfraKeystore {
        &self.keystore
    }
    /// The master key version new infrastructure DEKs are wrapped under.
    pub fn current_kek(&self) -> KekRef {
        self.id.kek_ref(self.current)
    }

    fn kek(&self, version: u32) -> Result<Arc<InfraKek>, ProtectorError> {
        if let Some(k) = self.keks.lock().unwrap().get(&version) {
            return Ok(Arc::clone(k));
        }
        let kek_ref = self.id.kek_ref(version);
        let kek = Arc::new(self.keystore.load(self.id, version).map_err(|e| match e {
            KeystoreError::InfraNotFound { .. } => ProtectorError::KeyNotFound {
                kek: kek_ref,
                location: format!("infrastructure keystore {}", self.keystore.dir.display()),
                hint: "point --infra-keystore (or ATREST_INFRA_KEYSTORE) at the infrastructure keystore this data directory was created with".into(),
            },
            other => ProtectorError::Other(other.to_string()),
        })?);
        self.keks.lock().unwrap().insert(version, Arc::clone(&kek));
        Ok(kek)
    }

    /// Wraps `dek` of file `file_id` under the current version.
    pub fn wrap(
        &self,
        dek: &InfraDek,
        file_id: FileId,
        kind: FileKind,
    ) -> Result<WrappedDek, ProtectorError> {
        let kek_ref = self.current_kek();
        let bytes = self
            .kek(self.current)?
            .wrap(dek, file_id, kind, &kek_ref.key_id)
            .map_err(|e| ProtectorError::Other(e.to_string()))?;
        Ok(WrappedDek {
            kek: kek_ref,
            algorithm: WrapAlgorithm::Aegis256,
            bytes,
        })
    }

    /// Unwraps the infrastructure DEK `dek_id` of file `file_id`, under
    /// whichever version of this master key wrapped it.
    pub fn unwrap(
        &self,
        dek_id: DekId,
        wrapped: &WrappedDek,
        file_id: FileId,
        kind: FileKind,
    ) -> Result<InfraDek, ProtectorError> {
        let not_mine = || ProtectorError::NotMine {
            have: self.current_kek().to_string(),
            want: wrapped.kek.clone(),
        };
        let Some((id, version)) = InfraKeyId::parse(&wrapped.kek.key_id) else {
            return Err(not_mine());
        };
        if id != self.id
            || wrapped.kek.kind != ProtectorKind::Infrastructure
            || wrapped.algorithm != WrapAlgorithm::Aegis256
        {
            return Err(not_mine());
        }
        self.kek(version)?
            .unwrap(dek_id, &wrapped.bytes, file_id, kind, &wrapped.kek.key_id)
            .map_err(|_| ProtectorError::WrongKey {
                kek: wrapped.kek.clone(),
                hint: format!(
                    "the infrastructure master key file in {} was replaced or belongs to another server; restore the original infrastructure keystore",
                    self.keystore.dir.display()
                ),
            })
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn create_rotate_wrap_unwrap_and_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let ks = InfraKeystore::open(dir.path().join("iks")).unwrap();
        assert_eq!(
            fs::metadata(ks.dir()).unwrap().permissions().mode() & 0o777,
            0o700
        );
        let id = ks.create_master_key().unwrap();
        let path = ks.key_path(id, 1);
        assert!(path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("infra-"));
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let p1 = ks.protector(id, 1).unwrap();
        let dek = InfraDek::generate().unwrap();
        let f = FileId([1; 16]);
        let w1 = p1.wrap(&dek, f, FileKind::MainDb).unwrap();
        assert_eq!(w1.kek.key_id, format!("infra:{}/v1", id.to_hex()));
        assert_eq!(InfraKeyId::parse(&w1.kek.key_id), Some((id, 1)));

        // Rotation: v2 wraps, v1 still unwraps.
        assert_eq!(ks.add_version(id).unwrap(), 2);
        assert_eq!(ks.versions(id).unwrap(), vec![1, 2]);
        let p2 = ks.protector(id, 2).unwrap();
        let w2 = p2.wrap(&dek, f, FileKind::MainDb).unwrap();
        assert_ne!(w1.bytes, w2.bytes);
        for w in [&w1, &w2] {
            let back = p2.unwrap(dek.id(), w, f, FileKind::MainDb).unwrap();
            assert_eq!(back.expose_secret(), dek.expose_secret());
        }
        // A wrap under v2 relabelled as v1 fails: the version is bound.
        let mut relabel = w2.clone();
        relabel.kek.key_id = w1.kek.key_id.clone();
        assert!(matches!(
            p2.unwrap(dek.id(), &relabel, f, FileKind::MainDb),
            Err(ProtectorError::WrongKey { .. })
        ));

        // Removed version: not found, naming the infrastructure keystore.
        ks.remove_version(id, 1).unwrap();
        let p2b = ks.protector(id, 2).unwrap();
        let e = p2b.unwrap(dek.id(), &w1, f, FileKind::MainDb).unwrap_err();
        assert!(e.to_string().contains("ATREST_INFRA_KEYSTORE"), "{e}");

        // Damaged file.
        let mut content = fs::read(ks.key_path(id, 2)).unwrap();
        content[40] ^= 1;
        fs::write(ks.key_path(id, 2), &content).unwrap();
        let e = ks.protector(id, 2).unwrap_err();
        assert!(matches!(e, KeystoreError::InfraCorrupt { .. }), "{e}");
        assert!(e.to_string().contains("infrastructure keystore"));

        // Group-readable file and directory are refused.
        content[40] ^= 1;
        fs::write(ks.key_path(id, 2), &content).unwrap();
        fs::set_permissions(ks.key_path(id, 2), fs::Permissions::from_mode(0o640)).unwrap();
        let e = ks.protector(id, 2).unwrap_err();
        assert!(matches!(e, KeystoreError::Permissions { .. }), "{e}");
        fs::set_permissions(ks.key_path(id, 2), fs::Permissions::from_mode(0o600)).unwrap();
        assert!(ks.protector(id, 2).is_ok());
        fs::set_permissions(ks.dir(), fs::Permissions::from_mode(0o750)).unwrap();
        assert!(matches!(
            InfraKeystore::open(ks.dir()).unwrap_err(),
            KeystoreError::Permissions { .. }
        ));
        // Another master key's wrap is not ours.
        fs::set_permissions(ks.dir(), fs::Permissions::from_mode(0o700)).unwrap();
        let other = ks.create_master_key().unwrap();
        let po = ks.protector(other, 1).unwrap();
        assert!(matches!(
            po.unwrap(dek.id(), &w2, f, FileKind::MainDb),
            Err(ProtectorError::NotMine { .. })
        ));
    }
}
