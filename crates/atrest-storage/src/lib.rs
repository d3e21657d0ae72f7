//! The encrypted SQLite storage engine of atrest.
//!
//! An [`Engine`] owns a data directory: its databases, their journals and
//! WALs, and a temp directory. It registers a SQLite VFS shim (see
//! [`vfs`]) through which every byte SQLite reads or writes passes, so
//! nothing reaches the disk unsealed: pages, WAL frames (headers included),
//! journals, super-journals, sorter spills, temp tables. Each file carries
//! its own DEK, wrapped in its own authenticated header.
//!
//! What it is not: a server (see the `atrest` binary), or a key store; the
//! KEK comes from a [`atrest_crypto::KeyProtector`] (the service keystore by
//! default).

mod error;
mod file;
mod keyring;
mod layout;
mod offline;
mod vfs;

use std::cell::RefCell;
use std::fs;
use std::ops::Deref;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use atrest_crypto::{FileHeader, KeyProtector, KeySource, INFRA_OVERHEAD, SEAL_OVERHEAD};
use atrest_keystore::{InfraProtector, Keystore, ServiceKeyId};
use rusqlite::OpenFlags;
use serde::{Deserialize, Serialize};

pub use atrest_keystore::{InfraKeyId, InfraKeystore};
pub use error::StorageError;
pub use file::RotationStatus;
pub use layout::HEADER_LEN;
pub use offline::{Verified, WalCommit, WalCommits};

use file::Stats;
use keyring::Keyring;
use vfs::{RegisteredVfs, RotateOp};

/// Reserved bytes per page that atrest asks SQLite for: AES-GCM tag and nonce.
pub const RESERVED_BYTES: usize = SEAL_OVERHEAD;
/// Reserved bytes per page with the infrastructure layer on: the data
/// layer's 28 plus AEGIS-256's tag (16) and nonce (32): 76.
pub const RESERVED_BYTES_INFRA: usize = SEAL_OVERHEAD + INFRA_OVERHEAD;

const DATA_DIR_META: &str = "atrest.json";

thread_local! {
    /// The last failure the VFS reported on this thread, with its SQLite code.
    static LAST_ERROR: RefCell<Option<(i32, StorageError)>> = const { RefCell::new(None) };
}

pub(crate) fn set_last_error(rc: i32, e: StorageError) {
    LAST_ERROR.with(|slot| *slot.borrow_mut() = Some((rc, e)));
}

/// The detailed error the VFS recorded on this thread for SQLite code
/// `rc`, if any. Taking it clears it; a detail for another code (a failure
/// SQLite handled itself) is dropped rather than attached to this one.
pub fn take_last_error(rc: i32) -> Option<StorageError> {
    LAST_ERROR.with(|slot| match slot.borrow_mut().take() {
        Some((code, e)) if code == rc => Some(e),
        _ => None,
    })
}

/// What a data directory records about itself (no secrets).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DataDirInfo {
    pub format: u32,
    /// `service:<hex>`: the service KEK in the keystore.
    pub service_key: String,
    pub created_unix: u64,
    /// Infrastructure double encryption: a second layer under the data
    /// layer, chosen when the data directory is created and fixed for its
    /// life. Absent in older data directories: off.
    #[serde(default)]
    pub infrastructure_encryption: bool,
    /// `infra:<hex>/v<version>`: the infrastructure master key version
    /// new files are wrapped under (in the infrastructure keystore).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub infrastructure_key: Option<String>,
}

/// How to open an engine. Build with `..Default::default()` so that new
/// fields keep their defaults.
#[derive(Debug, Clone, Default)]
pub struct EngineOptions {
    pub data_dir: PathBuf,
    /// Where service keys live; `None` for [`Keystore::default_dir`].
    pub keystore_dir: Option<PathBuf>,
    /// Infrastructure double encryption. `Some(true)` creates a new data
    /// directory with the second layer; `Some(false)` without. It is fixed
    /// at create: opening an existing data directory with the other value
    /// is refused ([`StorageError::InfraFixedAtCreate`]). `None` takes
    /// whatever the data directory has (off for a new one).
    pub infrastructure_encryption: Option<bool>,
    /// Where infrastructure master keys live; `None` for
    /// [`InfraKeystore::default_dir`]. Must differ from the service keystore.
    pub infra_keystore_dir: Option<PathBuf>,
}

impl EngineOptions {
    /// Options for `data_dir` with default keystores and settings.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            ..Default::default()
        }
    }
}

/// What [`Engine::rotate_infrastructure_key`] did.
#[derive(Debug, Clone, Serialize)]
pub struct InfraRotation {
    /// The master key version files were wrapped under, and the new one.
    pub from: String,
    pub to: String,
    /// Files whose header now wraps their infrastructure DEK under `to`
    /// (durably: written to the other header slot and synced).
    pub rewrapped: Vec<String>,
    /// Files open in this process: rewrapped in memory, written with their
    /// next sync or close.
    pub pending: Vec<String>,
}

/// Counters of the VFS, for benchmarks and metrics.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub units_sealed: u64,
    pub units_opened: u64,
    pub bytes_sealed: u64,
    pub bytes_opened: u64,
    /// The infrastructure layer's seals and opens (0 without that layer).
    /// Units of the data layer above count the same units once more.
    pub infra_units_sealed: u64,
    pub infra_units_opened: u64,
    pub infra_bytes_sealed: u64,
    pub infra_bytes_opened: u64,
    /// Files opened, by SQLite file type (main_db, wal, subjournal, ...).
    pub files_opened: std::collections::BTreeMap<&'static str, u64>,
}

impl StatsSnapshot {
    pub fn since(&self, earlier: &StatsSnapshot) -> StatsSnapshot {
        StatsSnapshot {
            units_sealed: self.units_sealed - earlier.units_sealed,
            units_opened: self.units_opened - earlier.units_opened,
            bytes_sealed: self.bytes_sealed - earlier.bytes_sealed,
            bytes_opened: self.bytes_opened - earlier.bytes_opened,
            infra_units_sealed: self.infra_units_sealed - earlier.infra_units_sealed,
            infra_units_opened: self.infra_units_opened - earlier.infra_units_opened,
            infra_bytes_sealed: self.infra_bytes_sealed - earlier.infra_bytes_sealed,
            infra_bytes_opened: self.infra_bytes_opened - earlier.infra_bytes_opened,
            files_opened: self
                .files_opened
                .iter()
                .map(|(k, v)| (*k, v - earlier.files_opened.get(k).copied().unwrap_or(0)))
                .collect(),
        }
    }
}

struct EngineInner {
    // Dropped last (after every Connection, which holds an Arc to us).
    _vfs: RegisteredVfs,
    vfs_name: String,
    data_dir: PathBuf,
    temp_dir: PathBuf,
    stats: Arc<Stats>,
    keyring: Arc<Keyring>,
    info: RwLock<Option<DataDirInfo>>,
    /// SQLite's reserved bytes per page: 28, or 76 with the infrastructure layer.
    reserve: usize,
    /// BENCHMARK ONLY (feature `plaintext-baseline`): databases are opened
    /// with plain SQLite, unencrypted. See [`Engine::enable_plaintext_baseline`].
    #[cfg(feature = "plaintext-baseline")]
    plaintext_baseline: std::sync::atomic::AtomicBool,
}

/// Where a database's WAL stands, as this process wrote it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalStatus {
    /// The current generation's salts (they change when SQLite restarts
    /// the WAL after a complete checkpoint).
    pub salts: u64,
    /// Frames of this generation that end in complete commits.
    pub committed_frames: u64,
    /// Bytes of the WAL file, header included, that hold those frames: a
    /// copy of this prefix is the WAL at its last commit.
    pub committed_len: u64,
}

/// An open data directory.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<EngineInner>,
}

static VFS_COUNTER: AtomicU64 = AtomicU64::new(0);

fn dir_error(path: &Path, reason: impl ToString) -> StorageError {
    StorageError::DataDir {
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

/// Writes `atrest.json` atomically (temp file, sync, rename, sync dir).
fn write_info(dir: &Path, info: &DataDirInfo) -> Result<(), StorageError> {
    let meta_path = dir.join(DATA_DIR_META);
    let tmp = meta_path.with_extension("json.tmp");
    fs::write(&tmp, serde_json::to_vec_pretty(info).expect("serializable"))
        .and_then(|_| fs::File::open(&tmp)?.sync_all())
        .and_then(|_| fs::rename(&tmp, &meta_path))
        .and_then(|_| fs::File::open(dir)?.sync_all())
        .map_err(|e| dir_error(&meta_path, e))
}

/// The infrastructure keystore is kept apart: not inside the data
/// directory, and neither inside nor around the service keystore.
fn check_infra_dir(data: &Path, service: &Path, infra: &Path) -> Result<(), StorageError> {
    let abs = |p: &Path| {
        let p = std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
        p.canonicalize().unwrap_or(p)
    };
    let (data, service, infra) = (abs(data), abs(service), abs(infra));
    if infra.starts_with(&data) {
        return Err(dir_error(
            &data,
            "the infrastructure keystore must not be inside the data directory it protects",
        ));
    }
    if infra.starts_with(&service) || service.starts_with(&infra) {
        return Err(dir_error(
            &infra,
            format!(
                "the infrastructure keystore must be kept apart from the service keystore {}; set --infra-keystore (ATREST_INFRA_KEYSTORE) to another directory",
                service.display()
            ),
        ));
    }
    Ok(())
}

fn create_private_dir(path: &Path) -> Result<(), StorageError> {
    if !path.exists() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(path)
            .map_err(|e| dir_error(path, e))?;
    }
    Ok(())
}

impl Engine {
    /// Opens (creating on first use) the data directory and its service key.
    pub fn open(opts: &EngineOptions) -> Result<Engine, StorageError> {
        let dir = &opts.data_dir;
        create_private_dir(dir)?;
        let keystore_dir = match &opts.keystore_dir {
            Some(d) => d.clone(),
            None => Keystore::default_dir()?,
        };
        if keystore_dir.starts_with(dir) {
            return Err(dir_error(
                dir,
                "the keystore must not be inside the data directory it protects (a copy of the directory would carry its key)",
            ));
        }
        let infra_dir = match &opts.infra_keystore_dir {
            Some(d) => d.clone(),
            None => InfraKeystore::default_dir()?,
        };
        let meta_path = dir.join(DATA_DIR_META);
        let info = if meta_path.exists() {
            let text = fs::read_to_string(&meta_path).map_err(|e| dir_error(&meta_path, e))?;
            let info = serde_json::from_str::<DataDirInfo>(&text)
                .map_err(|e| dir_error(&meta_path, format!("unreadable: {e}")))?;
            if let Some(requested) = opts.infrastructure_encryption {
                if requested != info.infrastructure_encryption {
                    let word = |on: bool| if on { "on" } else { "off" };
                    return Err(StorageError::InfraFixedAtCreate {
                        path: dir.display().to_string(),
                        recorded: word(info.infrastructure_encryption),
                        requested: word(requested),
                    });
                }
            }
            info
        } else {
            let has_data = fs::read_dir(dir)
                .map_err(|e| dir_error(dir, e))?
                .filter_map(Result::ok)
                .any(|e| e.path().extension().is_some_and(|x| x == "db"));
            if has_data {
                return Err(dir_error(
                    dir,
                    format!("holds databases but no {DATA_DIR_META}; restore that file (it names the service key)"),
                ));
            }
            let infra_on = opts.infrastructure_encryption.unwrap_or(false);
            if infra_on {
                check_infra_dir(dir, &keystore_dir, &infra_dir)?;
            }
            let keystore = Keystore::open(&keystore_dir)?;
            let id = keystore.create_service_key()?;
            let infrastructure_key = if infra_on {
                let iks = InfraKeystore::open(&infra_dir)?;
                Some(iks.create_master_key()?.kek_ref(1).key_id)
            } else {
                None
            };
            let info = DataDirInfo {
                format: 1,
                service_key: id.kek_ref().key_id,
                created_unix: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0),
                infrastructure_encryption: infra_on,
                infrastructure_key,
            };
            write_info(dir, &info)?;
            info
        };
        let id = ServiceKeyId::parse(&info.service_key)
            .ok_or_else(|| dir_error(&meta_path, "service_key is not a service key id"))?;
        let protector = Keystore::open(&keystore_dir)?.service_protector(id)?;
        let infra = if info.infrastructure_encryption {
            check_infra_dir(dir, &keystore_dir, &infra_dir)?;
            let (iid, version) = info
                .infrastructure_key
                .as_deref()
                .and_then(InfraKeyId::parse)
                .ok_or_else(|| {
                    dir_error(
                        &meta_path,
                        "infrastructure_encryption is on but infrastructure_key names no infrastructure master key",
                    )
                })?;
            Some(Arc::new(
                InfraKeystore::open(&infra_dir)?.protector(iid, version)?,
            ))
        } else {
            None
        };
        Self::open_with_protectors(dir, Arc::new(protector), infra, Some(info))
    }

    /// Opens a data directory with a given protector (the vault, or tests),
    /// without the infrastructure layer.
    pub fn open_with_protector(
        data_dir: &Path,
        protector: Arc<dyn KeyProtector>,
        info: Option<DataDirInfo>,
    ) -> Result<Engine, StorageError> {
        Self::open_with_protectors(data_dir, protector, None, info)
    }

    /// Opens a data directory with a given data-layer protector and, when
    /// the data directory has the infrastructure layer, its protector.
    pub fn open_with_protectors(
        data_dir: &Path,
        protector: Arc<dyn KeyProtector>,
        infra: Option<Arc<InfraProtector>>,
        info: Option<DataDirInfo>,
    ) -> Result<Engine, StorageError> {
        if info
            .as_ref()
            .is_some_and(|i| i.infrastructure_encryption != infra.is_some())
        {
            return Err(dir_error(
                data_dir,
                "the infrastructure layer's protector does not match the data directory's setting",
            ));
        }
        create_private_dir(data_dir)?;
        let data_dir = data_dir
            .canonicalize()
            .map_err(|e| dir_error(data_dir, e))?;
        let temp_dir = data_dir.join("tmp");
        create_private_dir(&temp_dir)?;
        let reserve = if infra.is_some() {
            RESERVED_BYTES_INFRA
        } else {
            RESERVED_BYTES
        };
        let keyring = Arc::new(Keyring::new(protector, infra));
        let stats = Arc::new(Stats::default());
        let vfs_name = format!(
            "atrest-{}-{}",
            std::process::id(),
            VFS_COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let vfs = RegisteredVfs::register(
            vfs_name.clone(),
            Arc::clone(&keyring),
            Arc::clone(&stats),
            temp_dir.clone(),
        )?;
        Ok(Engine {
            inner: Arc::new(EngineInner {
                _vfs: vfs,
                vfs_name,
                data_dir,
                temp_dir,
                stats,
                keyring,
                info: RwLock::new(info),
                reserve,
                #[cfg(feature = "plaintext-baseline")]
                plaintext_baseline: std::sync::atomic::AtomicBool::new(false),
            }),
        })
    }

    /// BENCHMARK ONLY, and only in builds with the non-default cargo
    /// feature `plaintext-baseline`: from now on this engine opens databases
    /// with plain SQLite on the `unix-excl` VFS, with no encryption at all
    /// (no header, no reserved bytes, pages in clear), so that `atrest bench
    /// pgbench` can measure the same server without atrest's storage layer.
    /// Files made this way are plain SQLite files that an encrypting engine
    /// refuses ("not an atrest file"). A build without the feature has no
    /// way to do this.
    #[cfg(feature = "plaintext-baseline")]
    pub fn enable_plaintext_baseline(&self) {
        tracing::warn!(
            data_dir = %self.inner.data_dir.display(),
            "PLAINTEXT BASELINE (benchmark-only build feature): databases are opened WITHOUT encryption"
        );
        self.inner.plaintext_baseline.store(true, Ordering::SeqCst);
    }

    /// Whether this engine runs as the unencrypted benchmark baseline
    /// (always false without the `plaintext-baseline` feature).
    pub fn plaintext_baseline(&self) -> bool {
        #[cfg(feature = "plaintext-baseline")]
        {
            self.inner.plaintext_baseline.load(Ordering::SeqCst)
        }
        #[cfg(not(feature = "plaintext-baseline"))]
        {
            false
        }
    }

    pub fn data_dir(&self) -> &Path {
        &self.inner.data_dir
    }

    /// New files, and [`Connection::rewrap`], use `p` from now on; files
    /// wrapped under another KEK still open while their DEKs are cached.
    pub fn set_protector(&self, p: Arc<dyn KeyProtector>) {
        self.inner.keyring.set_protector(p);
    }

    pub fn protector(&self) -> Arc<dyn KeyProtector> {
        self.inner.keyring.protector()
    }

    /// Forgets every unwrapped DEK (zeroized). Files opened afterwards
    /// need the protector again; close connections first, since open
    /// files keep their derived page keys until closed.
    pub fn forget_keys(&self) -> usize {
        self.inner.keyring.forget_keys()
    }

    /// How many DEKs are held unwrapped in memory.
    pub fn cached_keys(&self) -> usize {
        self.inner.keyring.cached_keys()
    }

    /// Where temp files (sorts, temp tables) are made; they are unlinked
    /// as soon as they are opened.
    pub fn temp_dir(&self) -> &Path {
        &self.inner.temp_dir
    }

    /// What `atrest.json` records (as of the last rotation by this engine).
    pub fn info(&self) -> Option<DataDirInfo> {
        self.inner.info.read().unwrap().clone()
    }

    /// Whether the infrastructure layer protects this data directory.
    pub fn infrastructure_encryption(&self) -> bool {
        self.inner.keyring.infra().is_some()
    }

    /// SQLite's reserved bytes per page in this data directory.
    pub fn reserved_bytes(&self) -> usize {
        self.inner.reserve
    }

    /// Rotates the infrastructure master key: adds a new version to the
    /// infrastructure keystore, records it in `atrest.json`, and rewraps
    /// every file's infrastructure DEK under it. The data layer's keys
    /// (service or customer KEK, DEKs) are not touched, nor is any page.
    ///
    /// Crash-safe: each header is rewritten into its *other* slot, after
    /// the current one has been synced, so a crash leaves one valid slot
    /// wrapping under the old or the new version; older versions stay in
    /// the keystore until removed with [`InfraKeystore::remove_version`].
    /// Files open in this process are rewrapped in memory and written with
    /// their next sync or close. Another process must not have the data
    /// directory open meanwhile (one process owns a data directory).
    pub fn rotate_infrastructure_key(&self) -> Result<InfraRotation, StorageError> {
        let keyring = &self.inner.keyring;
        let dir = &self.inner.data_dir;
        let old = keyring.infra().ok_or_else(|| {
            dir_error(
                dir,
                "has no infrastructure layer (it is chosen when a data directory is created)",
            )
        })?;
        let ks = old.keystore().clone();
        let version = ks.add_version(old.id())?;
        let new = Arc::new(ks.protector(old.id(), version)?);
        let to = new.current_kek().key_id;
        {
            let mut info = self.inner.info.write().unwrap();
            if let Some(info) = info.as_mut() {
                info.infrastructure_key = Some(to.clone());
                write_info(dir, info)?;
            }
        }
        keyring.set_infra(Arc::clone(&new));
        let mut report = InfraRotation {
            from: old.current_kek().key_id,
            to,
            rewrapped: vec![],
            pending: vec![],
        };
        let mut paths: Vec<PathBuf> = fs::read_dir(dir)
            .map_err(|e| dir_error(dir, e))?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.is_file() && p.file_name().is_some_and(|n| n != DATA_DIR_META))
            .collect();
        paths.sort();
        for path in paths {
            let name = path.display().to_string();
            if let Some(shared) = keyring.find_open(&name) {
                if shared.rewrap_infra(keyring).map_err(|f| {
                    f.detail
                        .unwrap_or_else(|| dir_error(&path, "rewrap failed"))
                })? || shared.header_dirty()
                {
                    report.pending.push(name);
                }
            } else if file::rewrap_infra_at_rest(&path, keyring)? {
                report.rewrapped.push(name);
            }
        }
        tracing::info!(from = %report.from, to = %report.to, rewrapped = report.rewrapped.len(),
            pending = report.pending.len(), "rotated the infrastructure master key");
        Ok(report)
    }

    /// The path of database `name` in this data directory.
    pub fn database_path(&self, name: &str) -> Result<PathBuf, StorageError> {
        let ok = !name.is_empty()
            && name.len() <= 63
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            && !name.starts_with('-');
        if !ok {
            return Err(dir_error(
                &self.inner.data_dir,
                format!("invalid database name {name:?}: use 1-63 letters, digits, '_' or '-'"),
            ));
        }
        Ok(self.inner.data_dir.join(format!("{name}.db")))
    }

    /// Opens a connection to database `name`, creating it if missing.
    pub fn connect(&self, name: &str) -> Result<Connection, StorageError> {
        let path = self.database_path(name)?;
        self.connect_path(&path)
    }

    /// Opens a connection to the database file at `path` (which should be
    /// inside the data directory).
    pub fn connect_path(&self, path: &Path) -> Result<Connection, StorageError> {
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let (vfs, mut reserve) = if self.plaintext_baseline() {
            ("unix-excl", 0)
        } else {
            (
                self.inner.vfs_name.as_str(),
                self.inner.reserve as std::ffi::c_int,
            )
        };
        let mut conn = rusqlite::Connection::open_with_flags_and_vfs(path, flags, vfs)
            .map_err(StorageError::from_sqlite)?;
        // SQLite (built with SQLITE_USE_URI) would let `ATTACH 'file:x?vfs=unix'`
        // or `VACUUM INTO` such a URI write a plaintext file through another
        // VFS. ATTACH from SQL is refused (SQLite does not show the
        // authorizer its file name); `Connection::attach` opens the door for
        // its own statement. URI targets of VACUUM INTO are refused.
        //
        // `sqlite_dbpage` (raw pages, decrypted, free pages included, and
        // writable) is refused too, except to `apply_wal_commits`.
        let attach_allowed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let allowed = Arc::clone(&attach_allowed);
        let raw_pages_allowed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let raw_allowed = Arc::clone(&raw_pages_allowed);
        conn.authorizer(Some(move |ctx: rusqlite::hooks::AuthContext<'_>| {
            use rusqlite::hooks::{AuthAction, Authorization};
            let is_uri = |f: &str| f.trim_start().to_ascii_lowercase().starts_with("file:");
            let raw = |t: &str| t.eq_ignore_ascii_case("sqlite_dbpage");
            match ctx.action {
                AuthAction::Read { table_name, .. }
                | AuthAction::Insert { table_name }
                | AuthAction::Update { table_name, .. }
                | AuthAction::Delete { table_name }
                    if raw(table_name) =>
                {
                    if raw_allowed.load(Ordering::Relaxed) {
                        Authorization::Allow
                    } else {
                        Authorization::Deny
                    }
                }
                AuthAction::Attach { filename } if is_uri(filename) => Authorization::Deny,
                AuthAction::Attach { .. } => Authorization::Allow,
                AuthAction::Unknown { code, .. } if code == rusqlite::ffi::SQLITE_ATTACH => {
                    if allowed.load(Ordering::Relaxed) {
                        Authorization::Allow
                    } else {
                        Authorization::Deny
                    }
                }
                _ => Authorization::Allow,
            }
        }))
        .map_err(StorageError::from_sqlite)?;
        // Reserve room for tags and nonces in every page before the first write.
        conn.file_control(
            Some(rusqlite::MAIN_DB),
            rusqlite::FileControl::ReserveBytes(&mut reserve),
        )
        .map_err(StorageError::from_sqlite)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        Ok(Connection {
            conn,
            attach_allowed,
            raw_pages_allowed,
            _engine: Arc::clone(&self.inner),
        })
    }

    pub fn stats(&self) -> StatsSnapshot {
        let s = &self.inner.stats;
        StatsSnapshot {
            units_sealed: s.units_sealed.load(Ordering::Relaxed),
            units_opened: s.units_opened.load(Ordering::Relaxed),
            bytes_sealed: s.bytes_sealed.load(Ordering::Relaxed),
            bytes_opened: s.bytes_opened.load(Ordering::Relaxed),
            infra_units_sealed: s.infra_units_sealed.load(Ordering::Relaxed),
            infra_units_opened: s.infra_units_opened.load(Ordering::Relaxed),
            infra_bytes_sealed: s.infra_bytes_sealed.load(Ordering::Relaxed),
            infra_bytes_opened: s.infra_bytes_opened.load(Ordering::Relaxed),
            files_opened: file::OPEN_TYPES
                .iter()
                .zip(&s.opened_by_type)
                .map(|((name, _), n)| (*name, n.load(Ordering::Relaxed)))
                .collect(),
        }
    }

    /// The WAL of database file `db_path` as far as this process knows it:
    /// `None` if no handle has it open or its header is not known yet.
    pub fn wal_status(&self, db_path: &Path) -> Option<WalStatus> {
        let wal = format!("{}-wal", db_path.display());
        let shared = self.inner.keyring.find_open(&wal)?;
        let (salts, committed_frames) = shared.wal_committed()?;
        let page_size = shared.known_page_size();
        if page_size == 0 {
            return None;
        }
        let geo = layout::Geometry::Wal {
            page_size,
            base: shared.base,
            ov: shared.ov,
        };
        let logical = layout::WAL_HEADER as u64
            + committed_frames * (layout::WAL_FRAME_HEADER + page_size) as u64;
        Some(WalStatus {
            salts,
            committed_frames,
            committed_len: geo.physical_size(logical),
        })
    }

    /// The most seals made under the current DEK of database file
    /// `db_path` or of its WAL: what the usage limit of docs/CRYPTO.md
    /// counts. For a file no handle has open, the count its header has
    /// reserved (an upper bound). `None`: neither file has a header.
    pub fn seals_used(&self, db_path: &Path) -> Option<u64> {
        let wal = PathBuf::from(format!("{}-wal", db_path.display()));
        [db_path.to_path_buf(), wal]
            .iter()
            .filter_map(
                |p| match self.inner.keyring.find_open(&p.display().to_string()) {
                    Some(open) => Some(open.seals_used()),
                    None => inspect_file(p, None)
                        .ok()
                        .and_then(|h| h["seals_reserved"].as_u64()),
                },
            )
            .max()
    }

    /// Rewraps a closed file (a backup copy, an archived WAL segment) under
    /// this engine's current KEK and infrastructure master key; see
    /// [`offline::rewrap_at_rest`]. Returns whether it changed.
    pub fn rewrap_at_rest(&self, path: &Path) -> Result<bool, StorageError> {
        offline::rewrap_at_rest(path, &self.inner.keyring)
    }

    /// Authenticates every page or frame of a closed database or WAL copy.
    pub fn verify_at_rest(&self, path: &Path) -> Result<Verified, StorageError> {
        offline::verify_at_rest(path, &self.inner.keyring)
    }

    /// Reads the complete transactions of a closed WAL copy from physical
    /// offset `from`; see [`offline::read_wal_commits`]. The pages come
    /// back decrypted, in memory only: what a read replica applies with
    /// [`Connection::apply_wal_commits`].
    pub fn read_wal_commits(
        &self,
        path: &Path,
        from: u64,
        max_frames: usize,
    ) -> Result<WalCommits, StorageError> {
        offline::read_wal_commits(path, &self.inner.keyring, from, max_frames)
    }

    /// Lets files wrapped under another infrastructure master key (a
    /// restore's source server) still open, so they can be rewrapped.
    pub fn set_infra_previous(&self, p: Option<Arc<InfraProtector>>) {
        self.inner.keyring.set_infra_previous(p);
    }

    /// Reads a file's header with this engine's keys and reports whether
    /// its MAC verifies.
    pub fn inspect(&self, path: &Path) -> Result<serde_json::Value, StorageError> {
        inspect_file(path, Some(&self.inner.keyring))
    }
}

/// A SQLite connection through the atrest VFS. Derefs to
/// [`rusqlite::Connection`]; the engine stays alive while it is open.
pub struct Connection {
    // Declared first: closed before the engine (and its VFS) can go.
    conn: rusqlite::Connection,
    /// Lets `attach` past the authorizer for its own ATTACH statement.
    attach_allowed: Arc<std::sync::atomic::AtomicBool>,
    /// Lets `apply_wal_commits` past the authorizer for `sqlite_dbpage`.
    raw_pages_allowed: Arc<std::sync::atomic::AtomicBool>,
    _engine: Arc<EngineInner>,
}

impl Connection {
    /// Rewraps this database's DEK under the engine's current KEK (see
    /// [`Engine::set_protector`]), in its header and its WAL's: online,
    /// crash-safe (some header slot is valid at every moment), and no page
    /// is re-encrypted. Returns the KEK now recorded.
    pub fn rewrap(&self) -> Result<atrest_crypto::KekRef, StorageError> {
        // Open the WAL (if any) so its header is rewrapped too.
        self.conn
            .query_row("SELECT count(*) FROM sqlite_schema", [], |_| Ok(()))
            .map_err(StorageError::from_sqlite)?;
        let w = crate::vfs::rewrap_database(&self.conn, &self._engine.keyring)?;
        Ok(w.kek)
    }

    /// Where this database's DEK rotation stands; `None` if none runs.
    pub fn dek_rotation(&self) -> Result<Option<RotationStatus>, StorageError> {
        crate::vfs::rotate_database(&self.conn, &self._engine.keyring, RotateOp::Status)
    }

    /// Begins a DEK rotation of this database (or returns the one under
    /// way): new DEKs, in both layers, seal everything from now on; the
    /// old ones stay in the header until [`Self::step_dek_rotation`] has
    /// re-sealed every page and [`Self::finish_dek_rotation`] retires them.
    /// Readers and writers carry on meanwhile. The database must be in WAL
    /// mode (a rollback journal would carry the old key across the end).
    pub fn begin_dek_rotation(&self) -> Result<RotationStatus, StorageError> {
        let mode: String = self
            .conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .map_err(StorageError::from_sqlite)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StorageError::Unsupported {
                path: "main database".into(),
                what: format!(
                    "DEK rotation in journal mode {mode}; switch to WAL (PRAGMA journal_mode=wal)"
                ),
            });
        }
        crate::vfs::rotate_database(&self.conn, &self._engine.keyring, RotateOp::Begin)?.ok_or(
            StorageError::Unsupported {
                path: "main database".into(),
                what: "DEK rotation did not begin".into(),
            },
        )
    }

    /// Re-seals up to `max_pages` more pages under the new DEKs; `None` if
    /// no rotation runs. Crash-safe: the progress recorded is durable.
    pub fn step_dek_rotation(
        &self,
        max_pages: u64,
    ) -> Result<Option<RotationStatus>, StorageError> {
        crate::vfs::rotate_database(&self.conn, &self._engine.keyring, RotateOp::Step(max_pages))
    }

    /// Ends a rotation whose pages are all re-sealed: checkpoints the WAL
    /// into the database and truncates it, gives the empty WAL new keys
    /// under the new DEK, and removes the old DEKs from every header.
    /// `Ok(false)`: readers or a writer kept the WAL from being emptied;
    /// try again later. Everything the WAL holds is checkpointed, so a
    /// server that archives its WAL archives it first.
    pub fn finish_dek_rotation(&self) -> Result<bool, StorageError> {
        let sql = StorageError::from_sqlite;
        let (busy, frames): (i64, i64) = self
            .conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .map_err(sql)?;
        if busy != 0 || frames > 0 {
            return Ok(false);
        }
        // Holds SQLite's WAL write lock: no frame can be appended while the
        // WAL gets its new keys.
        self.conn.execute_batch("BEGIN IMMEDIATE").map_err(sql)?;
        // The checkpoint may have grown the file: those pages are under
        // the new keys already, but are checked like any other.
        let done = crate::vfs::rotate_database(
            &self.conn,
            &self._engine.keyring,
            RotateOp::Step(u64::MAX),
        )
        .and_then(|_| {
            crate::vfs::rotate_database(&self.conn, &self._engine.keyring, RotateOp::Finish)
        });
        let ended = self.conn.execute_batch("COMMIT").map_err(sql);
        match done {
            Ok(_) => ended.map(|()| true),
            // Someone wrote between the checkpoint and BEGIN: not empty.
            Err(StorageError::Unsupported { what, .. })
                if what.starts_with("rekeying a WAL that holds frames") =>
            {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// Applies transactions read from another database's WAL (see
    /// [`Engine::read_wal_commits`]) to this database, as one transaction
    /// of its own: readers see all of them or none. Each page is written
    /// whole (through `sqlite_dbpage`, so it is sealed under this
    /// database's own keys like any page), then the file is cut to the
    /// last transaction's size. The same transactions applied twice give
    /// the same database (pages are images, not changes), so after a
    /// crash a replica may start again from any earlier boundary as long
    /// as one call takes it past the point it had reached.
    ///
    /// Use a connection that does nothing else: having written the schema
    /// raw, it may go on with the schema it had loaded; every other
    /// connection sees the new one.
    pub fn apply_wal_commits(&self, commits: &[WalCommit]) -> Result<(), StorageError> {
        let Some(last) = commits.last() else {
            return Ok(());
        };
        let sql = StorageError::from_sqlite;
        self.raw_pages_allowed.store(true, Ordering::Relaxed);
        let applied = (|| {
            self.conn.execute_batch("BEGIN IMMEDIATE").map_err(sql)?;
            let written = (|| {
                let mut put = self
                    .conn
                    .prepare_cached("INSERT INTO sqlite_dbpage(pgno, data) VALUES (?1, ?2)")
                    .map_err(sql)?;
                for (pgno, data) in commits.iter().flat_map(|c| &c.pages) {
                    put.execute((pgno, &data[..])).map_err(sql)?;
                }
                // A NULL page cuts the file before it, at commit, if it is
                // longer (sqlite_dbpage); the btree's own page count is
                // not told about raw writes, so it is not asked.
                put.execute((last.db_pages + 1, rusqlite::types::Null))
                    .map_err(sql)?;
                Ok::<_, StorageError>(())
            })();
            match written {
                Ok(()) => self.conn.execute_batch("COMMIT").map_err(sql),
                Err(e) => {
                    let _ = self.conn.execute_batch("ROLLBACK");
                    Err(e)
                }
            }
        })();
        self.raw_pages_allowed.store(false, Ordering::Relaxed);
        applied
    }

    /// Attaches database `name` of the same data directory as `schema`,
    /// creating it if missing, with room for tag and nonce in its pages.
    pub fn attach(&self, engine: &Engine, name: &str, schema: &str) -> Result<(), StorageError> {
        let path = engine.database_path(name)?;
        self.attach_allowed.store(true, Ordering::Relaxed);
        let attached = self
            .conn
            .execute("ATTACH DATABASE ?1 AS ?2", (path.to_string_lossy(), schema));
        self.attach_allowed.store(false, Ordering::Relaxed);
        attached.map_err(StorageError::from_sqlite)?;
        let mut reserve = engine.inner.reserve as std::ffi::c_int;
        self.conn
            .file_control(
                Some(schema),
                rusqlite::FileControl::ReserveBytes(&mut reserve),
            )
            .map_err(StorageError::from_sqlite)
    }
}

impl Deref for Connection {
    type Target = rusqlite::Connection;
    fn deref(&self) -> &rusqlite::Connection {
        &self.conn
    }
}

impl std::ops::DerefMut for Connection {
    fn deref_mut(&mut self) -> &mut rusqlite::Connection {
        &mut self.conn
    }
}

/// Describes a file's header as JSON, without keys: never key material.
pub fn inspect(path: &Path) -> Result<serde_json::Value, StorageError> {
    inspect_file(path, None)
}

/// As [`inspect`]; with a keyring, also checks the header MAC.
fn inspect_file(path: &Path, keyring: Option<&Keyring>) -> Result<serde_json::Value, StorageError> {
    use std::io::Read;
    let mut f = fs::File::open(path).map_err(|e| dir_error(path, e))?;
    let len = f.metadata().map_err(|e| dir_error(path, e))?.len();
    let mut slots = vec![0u8; HEADER_LEN as usize];
    // A short file leaves the rest zero, which reads as an empty slot.
    let _ = f.read(&mut slots).map_err(|e| dir_error(path, e))?;
    let mut best: Option<atrest_crypto::UnverifiedHeader> = None;
    let mut errors = vec![];
    for slot in slots.chunks(atrest_crypto::HEADER_SLOT_SIZE) {
        match FileHeader::decode_unverified(slot) {
            Ok(Some(u)) => {
                if best
                    .as_ref()
                    .is_none_or(|b| b.claims().sequence < u.claims().sequence)
                {
                    best = Some(u);
                }
            }
            Ok(None) => {}
            Err(e) => errors.push(e.to_string()),
        }
    }
    let Some(best) = best else {
        return Err(StorageError::Header {
            path: path.display().to_string(),
            reason: errors
                .first()
                .cloned()
                .unwrap_or_else(|| "no header written".into()),
        });
    };
    let h = best.claims().clone();
    let verified = keyring.map(|k| {
        file::unwrap_file_dek(k, &h, &path.display().to_string())
            .and_then(|dek| {
                best.clone().verify(&dek).map_err(|e| StorageError::Header {
                    path: path.display().to_string(),
                    reason: e.to_string(),
                })
            })
            .map(|_| true)
            .unwrap_or(false)
    });
    let infra_unwraps = match (keyring, &h.infra) {
        (Some(k), Some(_)) => Some(
            file::unwrap_infra_dek(k, &h, &path.display().to_string())
                .map(|d| d.is_some())
                .unwrap_or(false),
        ),
        _ => None,
    };
    let wrapped_json = |w: &atrest_crypto::WrappedDek| {
        serde_json::json!({
            "kek_kind": w.kek.kind.name(),
            "kek_id": w.kek.key_id,
            "algorithm": w.algorithm.name(),
            "wrapped_length": w.bytes.len(),
        })
    };
    let key = match &h.key_source {
        KeySource::Kek(w) => {
            serde_json::json!({ "protected_by": "kek", "wrapped_dek": wrapped_json(w) })
        }
        KeySource::Parent {
            parent_file_id,
            parent_dek_id,
            parent_wrapped,
            wrapped,
        } => serde_json::json!({
            "protected_by": "parent",
            "parent_file_id": parent_file_id.to_hex(),
            "parent_dek_id": parent_dek_id.to_hex(),
            "parent_wrapped_dek": wrapped_json(parent_wrapped),
            "wrapped_dek": { "algorithm": "A256GCM", "wrapped_length": wrapped.len() },
        }),
    };
    Ok(serde_json::json!({
        "path": path.display().to_string(),
        "format_version": h.format_version(),
        "kind": h.kind.name(),
        "cipher": h.cipher.name(),
        "layers": h.layers().names(),
        "infrastructure_layer": h.infra.as_ref().map(|i| serde_json::json!({
            "cipher": i.unit_cipher.name(),
            "implementation": atrest_crypto::INFRA_IMPLEMENTATION,
            "dek_id": i.dek_id.to_hex(),
            "wrapped_dek": wrapped_json(&i.wrapped),
            "unwraps": infra_unwraps,
        })),
        "file_id": h.file_id.to_hex(),
        "dek_id": h.dek_id.to_hex(),
        "unit_size": h.unit_size,
        "header_sequence": h.sequence,
        "created_unix": h.created_unix,
        "key": key,
        "seals_reserved": h.seals_reserved,
        "wal_durable_frames": h.wal_durable_frames,
        "dek_rotation": h.rotation.as_ref().map(|r| serde_json::json!({
            "previous_dek_id": r.previous_dek_id.to_hex(),
            "previous_wrapped_dek": wrapped_json(&r.previous_wrapped),
            "previous_infrastructure_dek_id": r.previous_infra.as_ref().map(|i| i.dek_id.to_hex()),
            "pages_done": r.watermark,
            "started_unix": r.started_unix,
        })),
        "file_bytes": len,
        "header_verified": verified,
    }))
}
