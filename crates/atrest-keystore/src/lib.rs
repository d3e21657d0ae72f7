//! The service-managed key protector.
//!
//! A keystore is a directory, kept apart from the data directories it
//! protects, that holds service key-encryption keys: one random AES-256
//! key per server, created on first use, in a file of mode 0600 inside a
//! directory of mode 0700. [`ServiceProtector`] wraps and unwraps DEKs under
//! such a key; it is the default, always-on layer of atrest.
//!
//! The infrastructure keystore ([`InfraKeystore`], module `infra`) is a
//! second, separate directory of the same kind holding the infrastructure
//! master keys of the second encryption layer.
//!
//! What it is not: a vault. Service keys never leave this machine's keystore
//! and have no access policy beyond file permissions; customer-managed keys
//! live in `atrest vault`.

#![forbid(unsafe_code)]

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use atrest_crypto::{
    random_id, Dek, DekId, KekRef, KeyProtector, ProtectorError, ProtectorKind, SymmetricKek,
    WrapAlgorithm, WrappedDek,
};
use aws_lc_rs::digest;
use thiserror::Error;
use zeroize::Zeroizing;

const MAGIC: &[u8; 8] = b"ATRKEY01";
const FILE_LEN: usize = 8 + 16 + 32 + 16;

/// Errors opening a keystore or a key in it.
#[derive(Debug, Error)]
pub enum KeystoreError {
    #[error("keystore {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "keystore {path} is readable by other users (mode {mode:o}); run `chmod {want:o} {path}`"
    )]
    Permissions { path: PathBuf, mode: u32, want: u32 },
    #[error("service key file {path} is damaged (checksum mismatch); restore it from a backup of the keystore")]
    Corrupt { path: PathBuf },
    #[error("service key {id} was not found in keystore {dir}; point --keystore (or ATREST_KEYSTORE) at the keystore this data directory was created with")]
    NotFound { id: String, dir: PathBuf },
    #[error(
        "no home directory to put the default keystore in; set ATREST_KEYSTORE or pass --keystore"
    )]
    NoDefaultLocation,
    #[error("infrastructure master key file {path} is damaged (checksum mismatch); restore it from a backup of the infrastructure keystore")]
    InfraCorrupt { path: PathBuf },
    #[error("infrastructure master key {id} was not found in infrastructure keystore {dir}; point --infra-keystore (or ATREST_INFRA_KEYSTORE) at the infrastructure keystore this data directory was created with")]
    InfraNotFound { id: String, dir: PathBuf },
    #[error("no home directory to put the default infrastructure keystore in; set ATREST_INFRA_KEYSTORE or pass --infra-keystore")]
    InfraNoDefaultLocation,
}

/// The identifier of one service key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ServiceKeyId(pub [u8; 16]);

impl ServiceKeyId {
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
    pub fn parse(s: &str) -> Option<Self> {
        let s = s.strip_prefix("service:").unwrap_or(s);
        let v = hex::decode(s).ok()?;
        Some(Self(v.try_into().ok()?))
    }
    /// The KEK reference written into file headers.
    pub fn kek_ref(&self) -> KekRef {
        KekRef {
            kind: ProtectorKind::Service,
            key_id: format!("service:{}", self.to_hex()),
        }
    }
}

/// A directory of service keys.
#[derive(Debug, Clone)]
pub struct Keystore {
    dir: PathBuf,
}

impl Keystore {
    /// The keystore location used when none is given: `$ATREST_KEYSTORE`,
    /// else `$XDG_DATA_HOME/atrest/keystore`, else `~/.local/share/atrest/keystore`.
    pub fn default_dir() -> Result<PathBuf, KeystoreError> {
        if let Some(p) = std::env::var_os("ATREST_KEYSTORE") {
            return Ok(PathBuf::from(p));
        }
        if let Some(p) = std::env::var_os("XDG_DATA_HOME") {
            return Ok(PathBuf::from(p).join("atrest/keystore"));
        }
        let home = std::env::var_os("HOME").ok_or(KeystoreError::NoDefaultLocation)?;
        Ok(PathBuf::from(home).join(".local/share/atrest/keystore"))
    }

    /// Opens (creating with mode 0700 if missing) the keystore at `dir`.
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

    fn key_path(&self, id: ServiceKeyId) -> PathBuf {
        self.dir.join(format!("service-{}.key", id.to_hex()))
    }

    /// Creates a new random service key, durably, and returns its id.
    pub fn create_service_key(&self) -> Result<ServiceKeyId, KeystoreError> {
        let id = ServiceKeyId(random_id().map_err(|e| io(&self.dir, std::io::Error::other(e)))?);
        let key = Dek::generate().map_err(|e| io(&self.dir, std::io::Error::other(e)))?;
        let mut content = Zeroizing::new(Vec::with_capacity(FILE_LEN));
        content.extend_from_slice(MAGIC);
        content.extend_from_slice(&id.0);
        content.extend_from_slice(key.expose_secret());
        let sum = digest::digest(&digest::SHA256, &content);
        content.extend_from_slice(&sum.as_ref()[..16]);

        let path = self.key_path(id);
        let tmp = path.with_extension("key.tmp");
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| io(&tmp, e))?;
        f.write_all(&content).map_err(|e| io(&tmp, e))?;
        f.sync_all().map_err(|e| io(&tmp, e))?;
        fs::rename(&tmp, &path).map_err(|e| io(&path, e))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io(&self.dir, e))?;
        tracing::info!(key = %id.to_hex(), keystore = %self.dir.display(), "created service key");
        Ok(id)
    }

    /// Loads the service key `id` as a protector.
    pub fn service_protector(&self, id: ServiceKeyId) -> Result<ServiceProtector, KeystoreError> {
        let path = self.key_path(id);
        let mut f = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(KeystoreError::NotFound {
                    id: id.to_hex(),
                    dir: self.dir.clone(),
                })
            }
            Err(e) => return Err(io(&path, e)),
        };
        check_mode(&path, 0o600)?;
        let mut content = Zeroizing::new(Vec::with_capacity(FILE_LEN + 1));
        f.read_to_end(&mut content).map_err(|e| io(&path, e))?;
        if content.len() != FILE_LEN || &content[..8] != MAGIC {
            return Err(KeystoreError::Corrupt { path });
        }
        let sum = digest::digest(&digest::SHA256, &content[..FILE_LEN - 16]);
        if sum.as_ref()[..16] != content[FILE_LEN - 16..] || content[8..24] != id.0 {
            return Err(KeystoreError::Corrupt { path });
        }
        let mut key = Zeroizing::new([0u8; 32]);
        key.copy_from_slice(&content[24..56]);
        let kek = SymmetricKek::new(&key).map_err(|e| io(&path, std::io::Error::other(e)))?;
        Ok(ServiceProtector {
            id,
            kek,
            keystore: self.dir.clone(),
        })
    }

    /// Destroys service key `id` (crypto-shredding: every DEK it wrapped
    /// becomes unrecoverable). The file is overwritten before it is
    /// unlinked; on flash or copy-on-write file systems old blocks may
    /// survive, which is why the keystore belongs on its own volume.
    pub fn destroy_service_key(&self, id: ServiceKeyId) -> Result<(), KeystoreError> {
        let path = self.key_path(id);
        match OpenOptions::new().write(true).open(&path) {
            Ok(mut f) => {
                f.write_all(&[0u8; FILE_LEN]).map_err(|e| io(&path, e))?;
                f.sync_all().map_err(|e| io(&path, e))?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io(&path, e)),
        }
        fs::remove_file(&path).map_err(|e| io(&path, e))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io(&self.dir, e))?;
        tracing::info!(key = %id.to_hex(), keystore = %self.dir.display(), "destroyed service key");
        Ok(())
    }
}

/// Wraps DEKs under one service key with AES-256-GCM.
pub struct ServiceProtector {
    id: ServiceKeyId,
    kek: SymmetricKek,
    keystore: PathBuf,
}

impl std::fmt::Debug for ServiceProtector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ServiceProtector(service:{})", self.id.to_hex())
    }
}

impl ServiceProtector {
    pub fn id(&self) -> ServiceKeyId {
        self.id
    }
}

impl KeyProtector for ServiceProtector {
    fn current_kek(&self) -> KekRef {
        self.id.kek_ref()
    }

    fn wrap(&self, dek: &Dek) -> Result<WrappedDek, ProtectorError> {
        let kek = self.current_kek();
        let bytes = self
            .kek
            .wrap(dek, kek.key_id.as_bytes())
            .map_err(|e| ProtectorError::Other(e.to_string()))?;
        Ok(WrappedDek {
            kek,
            algorithm: WrapAlgorithm::A256Gcm,
            bytes,
        })
    }

    fn unwrap(&self, dek_id: DekId, wrapped: &WrappedDek) -> Result<Dek, ProtectorError> {
        let mine = self.current_kek();
        if wrapped.kek != mine {
            return Err(ProtectorError::NotMine {
                have: mine.to_string(),
                want: wrapped.kek.clone(),
            });
        }
        if wrapped.algorithm != WrapAlgorithm::A256Gcm {
            return Err(ProtectorError::Other(format!(
                "service keys wrap with A256GCM, not {}",
                wrapped.algorithm.name()
            )));
        }
        self.kek
            .unwrap(dek_id, &wrapped.bytes, mine.key_id.as_bytes())
            .map_err(|_| ProtectorError::WrongKey {
                kek: mine,
                hint: format!(
                    "the key file in {} was replaced or belongs to another server; restore the original keystore",
                    self.keystore.display()
                ),
            })
    }
}

pub use infra::{InfraKeyId, InfraKeystore, InfraProtector};

mod infra;

pub(crate) fn io(path: &Path, source: std::io::Error) -> KeystoreError {
    KeystoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

pub(crate) fn check_mode(path: &Path, want: u32) -> Result<(), KeystoreError> {
    let mode = fs::metadata(path)
        .map_err(|e| io(path, e))?
        .permissions()
        .mode()
        & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeystoreError::Permissions {
            path: path.to_path_buf(),
            mode,
            want,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destroyed_key_is_gone_and_its_wraps_unrecoverable() {
        let dir = tempfile::tempdir().unwrap();
        let ks = Keystore::open(dir.path().join("ks")).unwrap();
        let id = ks.create_service_key().unwrap();
        let other = ks.create_service_key().unwrap();
        ks.destroy_service_key(id).unwrap();
        assert!(!ks.key_path(id).exists());
        assert!(matches!(
            ks.service_protector(id),
            Err(KeystoreError::NotFound { .. })
        ));
        // Other keys are untouched; destroying twice is not an error.
        ks.service_protector(other).unwrap();
        ks.destroy_service_key(id).unwrap();
    }

    #[test]
    fn create_load_wrap_unwrap() {
        let dir = tempfile::tempdir().unwrap();
        let ks = Keystore::open(dir.path().join("ks")).unwrap();
        let id = ks.create_service_key().unwrap();
        let path = ks.key_path(id);
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(
            fs::metadata(ks.dir()).unwrap().permissions().mode() & 0o777,
            0o700
        );

        let p = ks.service_protector(id).unwrap();
        let dek = Dek::generate().unwrap();
        let w = p.wrap(&dek).unwrap();
        assert_eq!(w.kek.key_id, format!("service:{}", id.to_hex()));
        let back = p.unwrap(dek.id(), &w).unwrap();
        assert_eq!(back.expose_secret(), dek.expose_secret());
        // Reloading gives the same key.
        let again = ks.service_protector(id).unwrap();
        assert!(again.unwrap(dek.id(), &w).is_ok());
    }

    #[test]
    fn missing_wrong_and_exposed_keys_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let ks = Keystore::open(dir.path().join("ks")).unwrap();
        let id = ks.create_service_key().unwrap();
        let p = ks.service_protector(id).unwrap();
        let dek = Dek::generate().unwrap();
        let w = p.wrap(&dek).unwrap();

        // Missing.
        let other = ServiceKeyId([3; 16]);
        let e = ks.service_protector(other).unwrap_err();
        assert!(matches!(e, KeystoreError::NotFound { .. }));
        assert!(e.to_string().contains("--keystore"));

        // Replaced by another key with the same name: unwrap says wrong key.
        let ks2 = Keystore::open(dir.path().join("ks2")).unwrap();
        let id2 = ks2.create_service_key().unwrap();
        let mut content = fs::read(ks2.key_path(id2)).unwrap();
        content[8..24].copy_from_slice(&id.0);
        let sum = digest::digest(&digest::SHA256, &content[..FILE_LEN - 16]);
        content[FILE_LEN - 16..].copy_from_slice(&sum.as_ref()[..16]);
        fs::write(ks.key_path(id), &content).unwrap();
        let swapped = ks.service_protector(id).unwrap();
        let e = swapped.unwrap(dek.id(), &w).unwrap_err();
        assert!(matches!(e, ProtectorError::WrongKey { .. }), "{e}");

        // Damaged file.
        let mut damaged = content.clone();
        damaged[30] ^= 1;
        fs::write(ks.key_path(id), &damaged).unwrap();
        assert!(matches!(
            ks.service_protector(id).unwrap_err(),
            KeystoreError::Corrupt { .. }
        ));

        // World-readable file is refused.
        fs::set_permissions(ks.key_path(id), fs::Permissions::from_mode(0o644)).unwrap();
        let e = ks.service_protector(id).unwrap_err();
        assert!(matches!(e, KeystoreError::Permissions { .. }), "{e}");
        assert!(e.to_string().contains("chmod 600"));

        // A wrapped key naming another KEK is refused before any crypto.
        let p2 = ks2.service_protector(id2).unwrap();
        assert!(matches!(
            p2.unwrap(dek.id(), &w).unwrap_err(),
            ProtectorError::NotMine { .. }
        ));
    }
}
