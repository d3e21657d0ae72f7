//! Backups and the WAL archive: ciphertext copies only.
//!
//! ```text
//! REPO/catalog.json                 every backup: time, size, scenario, keys
//! REPO/backups/ID/manifest.json     the same entry, with the source's config
//! REPO/backups/ID/NAME.db           a database file, as on disk (sealed)
//! REPO/backups/ID/NAME.db-wal       its WAL's committed prefix at the backup point
//! REPO/backups/ID/roles.json        the logins (SCRAM verifiers) to restore
//! REPO/wal/NAME/SEQ.wal             one WAL generation, as on disk, up to its last archived commit
//! REPO/wal/NAME/SEQ.commits         "<bytes of SEQ.wal> <unix µs>" per commit, for point-in-time restore
//! ```
//!
//! Why this is consistent without decrypting anything. The server runs
//! every checkpoint itself (sessions have SQLite's automatic checkpoints
//! and the checkpoint-on-close turned off), and only with a database's
//! write gate held, after the [`WalArchiver`] has copied every committed
//! frame. So (1) no frame leaves the WAL before it is archived: a WAL
//! generation is only overwritten after a complete checkpoint; and (2) the
//! database file changes only in those checkpoints. A backup takes the
//! gate, copies the WAL's committed prefix, pauses checkpoints, gives the
//! gate back (writers go on appending to the WAL), copies the database
//! file, and resumes checkpoints: the two copies together are the database
//! at the moment the gate was taken. Restore then lets SQLite recover the
//! copied WAL, then each archived generation in order, cut at the last
//! commit at or before the requested time.
//!
//! Every copied file keeps its own header with its wrapped DEKs, so a
//! backup directory can be shipped without any key; when the server's key
//! changes, [`rewrap_repository`] moves every header to the new key.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use atrest_storage::{Engine, HEADER_LEN};
use serde::{Deserialize, Serialize};

use crate::archive::{
    catalog_path, copy_range, create_private, err, now_us, private_dir, read_commits,
    rewrap_segments, segment_path, segments_in, sync_dir, WalArchiver,
};
use crate::config::BackupConfig;
use crate::config::ServerConfig;
use crate::databases::Databases;
use crate::resource;

/// The session id the backup uses when it takes a write gate.
const BACKUP_PID: i32 = -2;

/// Opens a stopped server's databases with whatever protects them now
/// (its key, and the keys of an unfinished move). For tools that work on
/// a server directory without starting it.
pub fn open_databases(dir: &Path, config: &ServerConfig) -> Result<Databases, String> {
    let engine = atrest_storage::Engine::open(&atrest_storage::EngineOptions {
        data_dir: dir.join(resource::DATA_SUBDIR),
        keystore_dir: Some(config.encryption.keystore_dir.clone()),
        infrastructure_encryption: Some(config.encryption.infrastructure_encryption),
        infra_keystore_dir: config.encryption.infra_keystore_dir.clone(),
    })
    .map_err(|e| e.to_string())?;
    let access = match &config.encryption.customer_key {
        Some(ck) => Some(crate::keys::vault_access(dir, config, &ck.login, &ck.key)?),
        None => None,
    };
    engine.set_protector(crate::keys::engine_protector(config, access.as_ref())?);
    if let Some(plan) = pending_plan(dir) {
        prepare_engine(&engine, &plan)?;
    }
    let databases = Databases::new(engine);
    databases.set_archive(repository(dir, config));
    Ok(databases)
}

/// The sqlite engine: every database, then its backups and WAL archive.
impl crate::keys::Rewrap for Databases {
    fn set_protector(&self, protector: Arc<dyn atrest_crypto::KeyProtector>) -> Result<(), String> {
        self.engine().set_protector(protector);
        Ok(())
    }

    fn rewrap_every(&self, dir: &Path, config: &ServerConfig) -> Result<usize, String> {
        let names = self.names();
        for name in &names {
            let (_lease, conn) = self
                .connect(name)
                .map_err(|e| format!("database {name}: {}", e.message))?;
            conn.rewrap().map_err(|e| format!("database {name}: {e}"))?;
        }
        // Backups and the WAL archive follow the key, so that the old key
        // can be disabled or deleted without losing a backup.
        let n = rewrap_repository(dir, config, self.engine(), &self.archivers()).map_err(|e| {
            format!(
                "rewrapping backups in {}: {e}",
                repository(dir, config).display()
            )
        })?;
        if n > 0 {
            tracing::info!(files = n, "rewrapped backup and archive files");
        }
        Ok(names.len())
    }
}

/// The repository of a server.
pub fn repository(dir: &Path, config: &ServerConfig) -> PathBuf {
    match &config.backup.dir {
        Some(d) => resource::resolve(dir, d),
        None => dir.join("backups"),
    }
}

// ---------------------------------------------------------------------------
// Backups

/// One database in a backup.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BackedUpDatabase {
    pub name: String,
    pub db_bytes: u64,
    pub wal_bytes: u64,
    /// The first archive segment to replay after this backup.
    pub archive_from: u64,
    /// The backup point: every commit before it is in the copy.
    pub point_unix_us: u64,
}

/// What a postgres-engine backup records beside the catalog's fields.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PgBackupPoint {
    /// `pg_backup_start`'s WAL location, and the segment it is in (the
    /// first one a restore replays).
    pub start_lsn: String,
    pub start_wal: String,
    /// `pg_backup_stop`'s: a restore is consistent from here on.
    pub stop_lsn: String,
}

/// The postgres engine's WAL archive, in the repository (its segments are
/// kept for the backups in the catalog: see [`apply_retention`]).
pub const ARCHIVE_SUBDIR: &str = "pgwal";

/// Removes the archived segments older than `oldest_start_wal` (the
/// oldest kept backup's first segment); history files stay.
pub fn prune_archive(repo: &Path, oldest_start_wal: &str) {
    for e in fs::read_dir(repo.join(ARCHIVE_SUBDIR))
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = e.file_name().to_string_lossy().to_string();
        if name.len() >= 24 && !name.ends_with(".history") && name[..24] < *oldest_start_wal {
            let _ = fs::remove_file(e.path());
        }
    }
}

/// A catalog entry (and a backup's manifest).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BackupEntry {
    pub id: String,
    pub time: String,
    /// The latest backup point of its databases: a point-in-time restore
    /// from this backup can go back no further.
    pub time_unix_us: u64,
    pub server_name: String,
    pub server_id: String,
    pub scenario: String,
    pub infrastructure_encryption: bool,
    /// The KEK the DEKs were wrapped under when the backup was taken (the
    /// files are rewrapped when the server's key changes).
    pub data_key: String,
    pub infrastructure_key: Option<String>,
    pub size_bytes: u64,
    /// The sqlite engine's databases (empty for the postgres engine).
    pub databases: Vec<BackedUpDatabase>,
    /// The postgres engine's backup: its WAL locations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postgres: Option<PgBackupPoint>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Manifest {
    pub(crate) entry: BackupEntry,
    /// The source's configuration: where its keys are, what it protects with.
    pub(crate) source: ServerConfig,
    /// The source data directory's metadata (`atrest.json`).
    pub(crate) data_dir_info: serde_json::Value,
}

pub fn load_catalog(repo: &Path) -> Result<Vec<BackupEntry>, String> {
    match fs::read(catalog_path(repo)) {
        Ok(b) => serde_json::from_slice(&b).map_err(|e| err("reading", &catalog_path(repo), e)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(vec![]),
        Err(e) => Err(err("reading", &catalog_path(repo), e)),
    }
}

pub(crate) fn catalog_exists(repo: &Path) -> bool {
    catalog_path(repo).exists()
}

pub(crate) fn save_catalog(repo: &Path, entries: &[BackupEntry]) -> Result<(), String> {
    resource::write_atomic(
        &catalog_path(repo),
        &serde_json::to_vec_pretty(entries).expect("serializable"),
        0o600,
    )
    .map_err(|e| e.to_string())
}

fn copy_file_prefix(src: &Path, dst: &Path, len: Option<u64>) -> Result<u64, String> {
    let s = File::open(src).map_err(|e| err("opening", src, e))?;
    let len = match len {
        Some(l) => l,
        None => s.metadata().map_err(|e| err("reading", src, e))?.len(),
    };
    let d = create_private(dst)?;
    copy_range(&s, &d, 0, len).map_err(|e| err("copying", src, e))?;
    d.sync_all().map_err(|e| err("syncing", dst, e))?;
    Ok(len)
}

/// Takes an online, consistent backup of every database.
pub fn take_backup(
    dir: &Path,
    config: &ServerConfig,
    databases: &Databases,
) -> Result<BackupEntry, String> {
    let repo = repository(dir, config);
    private_dir(&repo.join("backups"))?;
    if !catalog_path(&repo).exists() {
        // From now on the archive keeps its segments (see open_segment).
        save_catalog(&repo, &[])?;
    }
    let started = now_us();
    let time = resource::now_rfc3339();
    let id = format!(
        "{}-{}",
        time.replace([':', '-'], "").trim_end_matches('Z'),
        &resource::uuid()[..8]
    );
    let partial = repo.join("backups").join(format!(".{id}.partial"));
    private_dir(&partial)?;
    let result = (|| {
        let mut dbs = vec![];
        let mut size = 0;
        let mut latest_point = started;
        for name in databases.names() {
            let (lease, conn) = databases
                .connect(&name)
                .map_err(|e| format!("database {name}: {}", e.message))?;
            let db_path = databases
                .engine()
                .database_path(&name)
                .map_err(|e| e.to_string())?;
            let archiver = lease.db.archiver.as_ref().ok_or("the WAL archive is off")?;
            lease
                .db
                .gate
                .acquire(BACKUP_PID, Some(Duration::from_secs(60)), &|| None)
                .map_err(|e| format!("database {name}: {}", e.message))?;
            let copied_wal = (|| {
                conn.query_row("SELECT count(*) FROM sqlite_schema", [], |_| Ok(()))
                    .map_err(|e| format!("database {name}: {e}"))?;
                archiver.after_write(&conn)?;
                let wal_bytes = match databases.engine().wal_status(&db_path) {
                    Some(s) => copy_file_prefix(
                        &archiver.wal_path,
                        &partial.join(format!("{name}.db-wal")),
                        Some(s.committed_len),
                    )?,
                    None => 0,
                };
                archiver.pause();
                Ok::<_, String>((wal_bytes, now_us()))
            })();
            lease.db.gate.release(BACKUP_PID);
            let (wal_bytes, point_unix_us) = copied_wal?;
            latest_point = latest_point.max(point_unix_us);
            let archive_from = archiver.point();
            let db_bytes = {
                let _no_rotation_batch = archiver.db_copy.write().expect("db copy lock");
                copy_file_prefix(&db_path, &partial.join(format!("{name}.db")), None)
            };
            archiver.resume();
            let db_bytes = db_bytes?;
            size += db_bytes + wal_bytes;
            dbs.push(BackedUpDatabase {
                name,
                db_bytes,
                wal_bytes,
                archive_from,
                point_unix_us,
            });
        }
        let roles = dir.join(resource::ROLES_FILE);
        copy_file_prefix(&roles, &partial.join(resource::ROLES_FILE), None)?;
        if let Some(ck) = &config.encryption.customer_key {
            // A restore reaches the same vault: keep its CA (public).
            copy_file_prefix(
                &resource::resolve(dir, &ck.login.ca),
                &partial.join(VAULT_CA),
                None,
            )?;
        }
        let info_path = dir.join(resource::DATA_SUBDIR).join("atrest.json");
        let data_dir_info: serde_json::Value = serde_json::from_slice(
            &fs::read(&info_path).map_err(|e| err("reading", &info_path, e))?,
        )
        .map_err(|e| err("reading", &info_path, e))?;
        let entry = BackupEntry {
            id: id.clone(),
            time: time.clone(),
            time_unix_us: latest_point,
            server_name: config.name.clone(),
            server_id: config.server_id.clone(),
            scenario: scenario_name(config),
            infrastructure_encryption: config.encryption.infrastructure_encryption,
            data_key: databases.engine().protector().current_kek().to_string(),
            infrastructure_key: data_dir_info["infrastructure_key"]
                .as_str()
                .map(str::to_string),
            size_bytes: size,
            databases: dbs,
            postgres: None,
        };
        write_manifest(&partial, &entry, config, data_dir_info)?;
        sync_dir(&partial);
        Ok::<_, String>(entry)
    })();
    publish(dir, config, &repo, &partial, result)
}

/// A backup made in `partial` takes its final name (its id) and joins
/// the catalog; a failed one leaves nothing. The same for both engines.
pub(crate) fn publish(
    dir: &Path,
    config: &ServerConfig,
    repo: &Path,
    partial: &Path,
    made: Result<BackupEntry, String>,
) -> Result<BackupEntry, String> {
    let entry = match made {
        Ok(e) => e,
        Err(e) => {
            let _ = fs::remove_dir_all(partial);
            return Err(e);
        }
    };
    let backups = repo.join("backups");
    fs::rename(partial, backups.join(&entry.id)).map_err(|e| err("renaming", partial, e))?;
    sync_dir(&backups);
    add_to_catalog(dir, config, repo, &entry)?;
    Ok(entry)
}

/// A backup's manifest: its catalog entry, the source's configuration
/// (where its keys are) and the engine's own facts.
pub(crate) fn write_manifest(
    backup: &Path,
    entry: &BackupEntry,
    config: &ServerConfig,
    data_dir_info: serde_json::Value,
) -> Result<(), String> {
    let manifest = Manifest {
        entry: entry.clone(),
        source: config.clone(),
        data_dir_info,
    };
    resource::write_atomic(
        &backup.join("manifest.json"),
        &serde_json::to_vec_pretty(&manifest).expect("serializable"),
        0o600,
    )
    .map_err(|e| e.to_string())
}

/// A backup in its final place joins the catalog; retention runs; the
/// activity log records it. The same for both engines.
fn add_to_catalog(
    dir: &Path,
    config: &ServerConfig,
    repo: &Path,
    entry: &BackupEntry,
) -> Result<(), String> {
    let mut catalog = load_catalog(repo)?;
    catalog.push(entry.clone());
    save_catalog(repo, &catalog)?;
    apply_retention(repo, &config.backup, &crate::replicas::retention_floor(dir))?;
    let _ = resource::log_activity(
        dir,
        &serde_json::json!({"time": resource::now_rfc3339(), "event": "backup",
            "id": entry.id, "bytes": entry.size_bytes, "databases": entry.databases.len()}),
    );
    Ok(())
}

/// `scenario N` of the seeds' table, for the catalog.
pub fn scenario_name(config: &ServerConfig) -> String {
    let n = match (
        config.encryption.customer_key.is_some(),
        config.encryption.infrastructure_encryption,
    ) {
        (false, false) => 1,
        (false, true) => 2,
        (true, false) => 3,
        (true, true) => 4,
    };
    format!(
        "{n} ({}{})",
        config.encryption.scenario,
        if config.encryption.infrastructure_encryption {
            " + infrastructure layer"
        } else {
            ""
        }
    )
}

/// Deletes backups beyond the retention limits (never the newest), then
/// archive segments no remaining backup needs and no replica has still to
/// read (`replica_floor`: per database, the oldest segment a replica is
/// reading).
pub fn apply_retention(
    repo: &Path,
    policy: &BackupConfig,
    replica_floor: &BTreeMap<String, u64>,
) -> Result<Vec<String>, String> {
    let mut catalog = load_catalog(repo)?;
    catalog.sort_by_key(|e| e.time_unix_us);
    let now = now_us();
    let n = catalog.len();
    let mut removed = vec![];
    let keep: Vec<BackupEntry> = catalog
        .into_iter()
        .enumerate()
        .filter_map(|(i, e)| {
            let newest = i + 1 == n;
            let too_many = policy.retain_count.is_some_and(|c| n - i > c.max(1));
            let too_old = policy
                .retain_days
                .is_some_and(|d| now.saturating_sub(e.time_unix_us) > d * 86_400_000_000);
            if !newest && (too_many || too_old) {
                removed.push(e.id);
                None
            } else {
                Some(e)
            }
        })
        .collect();
    if removed.is_empty() {
        return Ok(removed);
    }
    save_catalog(repo, &keep)?;
    for id in &removed {
        let _ = fs::remove_dir_all(repo.join("backups").join(id));
    }
    // The postgres engine's archive: segments before the oldest kept
    // backup's first one.
    if let Some(oldest) = keep
        .iter()
        .filter_map(|e| e.postgres.as_ref().map(|p| p.start_wal.clone()))
        .min()
    {
        prune_archive(repo, &oldest);
    }
    // Archive segments older than every remaining backup's start point.
    let mut oldest: BTreeMap<String, u64> = BTreeMap::new();
    for e in &keep {
        for d in &e.databases {
            let v = oldest.entry(d.name.clone()).or_insert(u64::MAX);
            *v = (*v).min(d.archive_from);
        }
    }
    for (name, from) in oldest {
        let from = replica_floor.get(&name).map_or(from, |f| from.min(*f));
        let wdir = repo.join("wal").join(&name);
        for seq in segments_in(&wdir).into_iter().filter(|s| *s < from) {
            let _ = fs::remove_file(segment_path(&wdir, seq, "wal"));
            let _ = fs::remove_file(segment_path(&wdir, seq, "commits"));
        }
    }
    Ok(removed)
}

/// Runs [`WalArchiver::recover`] for every database: at server start, and
/// before an offline backup (the WAL may hold commits of the last run that
/// this process has not seen written).
pub fn recover_all(databases: &Databases) -> Result<(), String> {
    for name in databases.names() {
        let (lease, conn) = databases
            .connect(&name)
            .map_err(|e| format!("database {name}: {}", e.message))?;
        if let Some(a) = &lease.db.archiver {
            a.recover(&conn)
                .map_err(|e| format!("database {name}: {e}"))?;
        }
    }
    Ok(())
}

/// The files of backup `id`.
pub(crate) fn backup_dir(repo: &Path, id: &str) -> Result<PathBuf, String> {
    if id.is_empty() || id.contains('/') || id.starts_with('.') {
        return Err(format!("invalid backup id {id:?}"));
    }
    let d = repo.join("backups").join(id);
    if !d.join("manifest.json").exists() {
        return Err(format!(
            "no backup {id} in {} (see `atrest server backup list`)",
            repo.display()
        ));
    }
    Ok(d)
}

pub(crate) fn read_manifest(backup: &Path) -> Result<Manifest, String> {
    let p = backup.join("manifest.json");
    serde_json::from_slice(&fs::read(&p).map_err(|e| err("reading", &p, e))?)
        .map_err(|e| err("reading", &p, e))
}

/// What `verify` checked.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    pub backup: String,
    pub files: usize,
    pub pages_and_frames: u64,
    pub archive_segments: usize,
}

/// Authenticates every page and frame of backup `id` and of the archive
/// segments a restore from it would replay, with the engine's keys,
/// without restoring anything. The first failure names file and unit.
pub fn verify_backup(engine: &Engine, repo: &Path, id: &str) -> Result<VerifyReport, String> {
    let dir = backup_dir(repo, id)?;
    let manifest = read_manifest(&dir)?;
    let mut report = VerifyReport {
        backup: id.to_string(),
        files: 0,
        pages_and_frames: 0,
        archive_segments: 0,
    };
    for d in &manifest.entry.databases {
        let mut files = vec![dir.join(format!("{}.db", d.name))];
        if d.wal_bytes > 0 {
            files.push(dir.join(format!("{}.db-wal", d.name)));
        }
        let wdir = repo.join("wal").join(&d.name);
        for seq in segments_in(&wdir)
            .into_iter()
            .filter(|s| *s >= d.archive_from)
        {
            let p = segment_path(&wdir, seq, "wal");
            if fs::metadata(&p).map(|m| m.len()).unwrap_or(0) >= HEADER_LEN {
                files.push(p);
                report.archive_segments += 1;
            }
        }
        for f in files {
            let v = engine.verify_at_rest(&f).map_err(|e| e.to_string())?;
            report.files += 1;
            report.pages_and_frames += v.units;
        }
    }
    Ok(report)
}

/// Verifies backup `id`, or every backup in the catalog.
pub fn verify_all(
    engine: &Engine,
    repo: &Path,
    id: Option<&str>,
) -> Result<Vec<VerifyReport>, String> {
    verify_each(repo, id, |i| verify_backup(engine, repo, i))
}

/// Runs `verify` on backup `id`, or on every backup in the catalog (both
/// engines: a repository holds one engine's backups).
pub(crate) fn verify_each(
    repo: &Path,
    id: Option<&str>,
    verify: impl Fn(&str) -> Result<VerifyReport, String>,
) -> Result<Vec<VerifyReport>, String> {
    let ids: Vec<String> = match id {
        Some(i) => vec![i.to_string()],
        None => load_catalog(repo)?.into_iter().map(|e| e.id).collect(),
    };
    if ids.is_empty() {
        return Err(format!("no backups in {}", repo.display()));
    }
    ids.iter()
        .map(|i| verify(i).map_err(|e| format!("backup {i}: {e}")))
        .collect()
}

/// Rewraps every backup and archive segment under the engine's current
/// keys (call while the engine's protector still routes the old key).
pub fn rewrap_repository(
    dir: &Path,
    config: &ServerConfig,
    engine: &Engine,
    archivers: &[Arc<WalArchiver>],
) -> Result<usize, String> {
    let repo = &repository(dir, config);
    if !repo.exists() {
        return Ok(0);
    }
    let mut n = 0;
    let data_key = engine.protector().current_kek().to_string();
    let mut catalog = load_catalog(repo)?;
    for e in catalog.iter_mut() {
        let bdir = repo.join("backups").join(&e.id);
        for d in &e.databases {
            for f in [format!("{}.db", d.name), format!("{}.db-wal", d.name)] {
                let p = bdir.join(f);
                if p.exists() && engine.rewrap_at_rest(&p).map_err(|e| e.to_string())? {
                    n += 1;
                }
            }
        }
        // A restore uses the key the files are wrapped under now.
        let mut manifest = read_manifest(&bdir)?;
        manifest.source.encryption.customer_key = config.encryption.customer_key.clone();
        manifest.source.encryption.scenario = config.encryption.scenario.clone();
        manifest.entry.data_key = data_key.clone();
        manifest.entry.scenario = scenario_name(config);
        if let Some(ck) = &config.encryption.customer_key {
            copy_file_prefix(
                &resource::resolve(dir, &ck.login.ca),
                &bdir.join(VAULT_CA),
                None,
            )?;
        }
        resource::write_atomic(
            &bdir.join("manifest.json"),
            &serde_json::to_vec_pretty(&manifest).expect("serializable"),
            0o600,
        )
        .map_err(|e| e.to_string())?;
        e.data_key = data_key.clone();
        e.scenario = scenario_name(config);
    }
    if !catalog.is_empty() {
        save_catalog(repo, &catalog)?;
    }
    let mut seen = std::collections::HashSet::new();
    for a in archivers {
        seen.insert(a.dir.clone());
        n += a.rewrap(engine)?;
    }
    // Databases not open in this process (dropped, or not yet used).
    if let Ok(rd) = fs::read_dir(repo.join("wal")) {
        for e in rd.flatten() {
            let wdir = e.path();
            if seen.contains(&wdir) {
                continue;
            }
            n += rewrap_segments(&wdir, engine)?;
        }
    }
    Ok(n)
}

// ---------------------------------------------------------------------------
// Restore

/// What a restore still has to do once the keys can be used: written by
/// `restore` into the new server's directory, carried out by
/// [`finish_restore`] (at once with a service key; with a customer key at
/// the first successful revalidation).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RestorePlan {
    pub backup: String,
    pub to_time_unix_us: Option<u64>,
    /// The source's service key (to rewrap from), if it used one.
    pub source_service_key: Option<String>,
    pub source_keystore_dir: PathBuf,
    pub source_infra_key: Option<String>,
    pub source_infra_keystore_dir: Option<PathBuf>,
    /// Per database, the archive segments to replay in order (files in
    /// `DIR/restore/NAME/`).
    pub replay: BTreeMap<String, Vec<String>>,
}

pub const RESTORE_DIR: &str = "restore";
const VAULT_CA: &str = "vault-ca.pem";

/// What `atrest server restore` is asked for.
pub struct RestoreOptions {
    /// A backup directory, `REPO/backups/ID`.
    pub from: PathBuf,
    pub to_time_us: Option<u64>,
    pub name: String,
    pub dir: PathBuf,
    pub listen: Option<String>,
}

/// What a restore made.
#[derive(Debug, Clone, Serialize)]
pub struct Restored {
    pub config: ServerConfig,
    /// Ready to start, or waiting for the customer key (Inaccessible).
    pub state: resource::State,
    pub next_step: Option<String>,
}

/// Makes a new server from a backup: a new identity, TLS certificate and
/// service key, the source's logins, encryption scenario and (if any)
/// customer key. With the service key the data is moved to the new
/// server's keys at once; with a customer key the server is Inaccessible
/// until its new identity is granted the key and it is revalidated.
pub fn restore(opts: &RestoreOptions) -> Result<Restored, String> {
    let from = opts
        .from
        .canonicalize()
        .map_err(|e| err("opening", &opts.from, e))?;
    let manifest = read_manifest(&from)?;
    let src = manifest.source.clone();
    let created = resource::create(
        &resource::CreateOptions {
            name: opts.name.clone(),
            dir: opts.dir.clone(),
            admin_user: "atrest".into(),
            admin_password: None,
            keystore_dir: Some(src.encryption.keystore_dir.clone()),
            tls_cert: None,
            tls_key: None,
            hostnames: vec![],
            allow_plaintext: src.allow_plaintext,
            limits: src.limits.clone(),
            default_listen: opts.listen.clone().or(Some(src.default_listen.clone())),
            infrastructure_encryption: src.encryption.infrastructure_encryption,
            infra_keystore_dir: src.encryption.infra_keystore_dir.clone(),
            engine: Default::default(),
            postgres: None,
        },
        &|_, _, _, _| Ok(()),
    )
    .map_err(|e| e.to_string())?;
    let dir = opts
        .dir
        .canonicalize()
        .map_err(|e| err("opening", &opts.dir, e))?;
    let made = (|| {
        // The logins come from the backup.
        let _ = fs::remove_file(dir.join(resource::INITIAL_PASSWORD_FILE));
        stage_restore(&from, opts.to_time_us, &dir)?;
        let mut config = created.config.clone();
        config.monitor = src.monitor.clone();
        config.webhooks = src.webhooks.clone();
        if let Some(ck) = &src.encryption.customer_key {
            copy_file_prefix(&from.join(VAULT_CA), &dir.join(VAULT_CA), None)?;
            let mut ck = ck.clone();
            ck.login.ca = VAULT_CA.into();
            ck.since = resource::now_rfc3339();
            config.encryption.customer_key = Some(ck.clone());
            config.encryption.scenario = src.encryption.scenario.clone();
            config.save(&dir).map_err(|e| e.to_string())?;
            let step = format!(
                "grant identity {} (certificate {}) get, wrapKey and unwrapKey on {}, start the server, then run `atrest server revalidate`",
                config.identity.client_id,
                dir.join(&config.identity.certificate).display(),
                ck.key
            );
            let reason = format!("restored from backup {}: {step}", manifest.entry.id);
            resource::set_state(&dir, resource::State::Inaccessible, &reason, None)
                .map_err(|e| e.to_string())?;
            return Ok(Restored {
                config,
                state: resource::State::Inaccessible,
                next_step: Some(step),
            });
        }
        config.save(&dir).map_err(|e| e.to_string())?;
        let databases = open_databases(&dir, &config)?;
        finish_restore(&dir, databases.engine())?;
        resource::set_state(
            &dir,
            resource::State::Stopped,
            &format!("restored from backup {}", manifest.entry.id),
            None,
        )
        .map_err(|e| e.to_string())?;
        Ok(Restored {
            config,
            state: resource::State::Stopped,
            next_step: None,
        })
    })();
    if made.is_err() {
        // Nothing half-made: the service key and the directory go again.
        let _ = resource::delete(&dir);
        let _ = fs::remove_dir_all(&dir);
    }
    made
}

pub fn pending_plan(dir: &Path) -> Option<RestorePlan> {
    let p = dir.join(RESTORE_DIR).join("plan.json");
    serde_json::from_slice(&fs::read(p).ok()?).ok()
}

/// Reads `SEQ.commits`: (bytes, time) per archived commit.
/// Parses `--to-time`: RFC 3339 (`2026-11-22T13:05:01.250Z`, or with an
/// offset like `+01:00`) or unix seconds with a fraction. Microseconds.
pub fn parse_time(s: &str) -> Result<u64, String> {
    let bad = || {
        format!("cannot read time {s:?}; use RFC 3339 (2026-11-22T13:05:01.25Z) or unix seconds (1795698301.25)")
    };
    if let Ok(secs) = s.parse::<f64>() {
        return (secs >= 0.0)
            .then(|| (secs * 1e6).round() as u64)
            .ok_or_else(bad);
    }
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Result<i64, String> {
        s.get(r).and_then(|x| x.parse().ok()).ok_or_else(bad)
    };
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't' | b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return Err(bad());
    }
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return Err(bad());
    }
    let mut i = 19;
    let mut micros = 0i64;
    if b[i] == b'.' {
        let start = i + 1;
        i = start;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        let frac = &s[start..i];
        if frac.is_empty() {
            return Err(bad());
        }
        let digits: String = frac.chars().chain(std::iter::repeat('0')).take(6).collect();
        micros = digits.parse().map_err(|_| bad())?;
    }
    let offset = match s.get(i..) {
        Some("Z") | Some("z") => 0,
        Some(o)
            if o.len() == 6 && (o.starts_with('+') || o.starts_with('-')) && &o[3..4] == ":" =>
        {
            let m = num(i + 1..i + 3)? * 60 + num(i + 4..i + 6)?;
            if o.starts_with('-') {
                -m
            } else {
                m
            }
        }
        _ => return Err(bad()),
    };
    // Days since 1970-01-01 of a civil date (proleptic Gregorian).
    let (yy, mm) = if mo <= 2 {
        (y - 1, mo + 9)
    } else {
        (y, mo - 3)
    };
    let era = yy.div_euclid(400);
    let yoe = yy - era * 400;
    let doy = (153 * mm + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + h * 3600 + mi * 60 + sec - offset * 60;
    u64::try_from(secs * 1_000_000 + micros).map_err(|_| bad())
}

/// Lays out a restore of `backup` (a directory `REPO/backups/ID`) in the
/// new server directory `dir`, already created: its databases replaced by
/// the backup's files, the archive segments up to `to_time` staged, and
/// the plan written. Returns the plan.
pub fn stage_restore(
    backup: &Path,
    to_time_us: Option<u64>,
    dir: &Path,
) -> Result<(RestorePlan, ServerConfig), String> {
    let manifest = read_manifest(backup)?;
    let repo = backup
        .parent()
        .and_then(Path::parent)
        .ok_or("the backup is not inside a repository (REPO/backups/ID)")?;
    if let Some(t) = to_time_us {
        if t < manifest.entry.time_unix_us {
            return Err(format!(
                "--to-time is before the point of backup {} ({} µs after the epoch, taken {}); restore from an older backup",
                manifest.entry.id, manifest.entry.time_unix_us, manifest.entry.time
            ));
        }
    }
    let data = dir.join(resource::DATA_SUBDIR);
    for e in fs::read_dir(&data)
        .map_err(|e| err("reading", &data, e))?
        .flatten()
    {
        let n = e.file_name().to_string_lossy().to_string();
        if n.ends_with(".db") || n.ends_with(".db-wal") || n.ends_with(".db-journal") {
            fs::remove_file(e.path()).map_err(|er| err("removing", &e.path(), er))?;
        }
    }
    let staging = dir.join(RESTORE_DIR);
    private_dir(&staging)?;
    let mut replay = BTreeMap::new();
    for d in &manifest.entry.databases {
        copy_file_prefix(
            &backup.join(format!("{}.db", d.name)),
            &data.join(format!("{}.db", d.name)),
            None,
        )?;
        if d.wal_bytes > 0 {
            copy_file_prefix(
                &backup.join(format!("{}.db-wal", d.name)),
                &data.join(format!("{}.db-wal", d.name)),
                None,
            )?;
        }
        let wdir = repo.join("wal").join(&d.name);
        let sdir = staging.join(&d.name);
        private_dir(&sdir)?;
        let mut files = vec![];
        'segments: for seq in segments_in(&wdir)
            .into_iter()
            .filter(|s| *s >= d.archive_from)
        {
            let commits = read_commits(&segment_path(&wdir, seq, "commits"));
            let mut cut = None;
            let mut stop = false;
            for (len, t) in &commits {
                if to_time_us.is_some_and(|limit| *t > limit) {
                    stop = true;
                    break;
                }
                cut = Some(*len);
            }
            if let Some(len) = cut {
                let name = format!("{seq:020}.wal");
                copy_file_prefix(
                    &segment_path(&wdir, seq, "wal"),
                    &sdir.join(&name),
                    Some(len),
                )?;
                files.push(name);
            }
            if stop {
                break 'segments;
            }
        }
        replay.insert(d.name.clone(), files);
    }
    let roles = backup.join(resource::ROLES_FILE);
    copy_file_prefix(&roles, &dir.join(resource::ROLES_FILE), None)?;
    let src = &manifest.source;
    let plan = RestorePlan {
        backup: manifest.entry.id.clone(),
        to_time_unix_us: to_time_us,
        source_service_key: Some(
            manifest.data_dir_info["service_key"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        )
        .filter(|s| !s.is_empty()),
        source_keystore_dir: src.encryption.keystore_dir.clone(),
        source_infra_key: manifest.entry.infrastructure_key.clone(),
        source_infra_keystore_dir: src.encryption.infra_keystore_dir.clone(),
        replay,
    };
    resource::write_atomic(
        &staging.join("plan.json"),
        &serde_json::to_vec_pretty(&plan).expect("serializable"),
        0o600,
    )
    .map_err(|e| e.to_string())?;
    Ok((plan, manifest.source))
}

/// Lets the engine open files still wrapped under the restore's source
/// keys: the source's service key (routing) and infrastructure master key.
pub fn prepare_engine(engine: &Engine, plan: &RestorePlan) -> Result<(), String> {
    if let Some(sk) = &plan.source_service_key {
        let id = sk
            .strip_prefix("service:")
            .and_then(atrest_keystore::ServiceKeyId::parse)
            .ok_or_else(|| format!("{sk} is not a service key id"))?;
        let ks = atrest_keystore::Keystore::open(&plan.source_keystore_dir)
            .map_err(|e| e.to_string())?;
        let old: Arc<dyn atrest_crypto::KeyProtector> = Arc::new(
            ks.service_protector(id)
                .map_err(|e| format!("the source server's service key: {e}"))?,
        );
        let current = engine.protector();
        if current.current_kek() != old.current_kek() {
            engine.set_protector(Arc::new(atrest_crypto::RoutingProtector::new(
                current,
                vec![old],
            )));
        }
    }
    if let (Some(ik), Some(ikdir)) = (&plan.source_infra_key, &plan.source_infra_keystore_dir) {
        let (id, version) = atrest_storage::InfraKeyId::parse(ik)
            .ok_or_else(|| format!("{ik} is not an infrastructure key id"))?;
        let ks = atrest_storage::InfraKeystore::open(ikdir).map_err(|e| e.to_string())?;
        let p = ks
            .protector(id, version)
            .map_err(|e| format!("the source server's infrastructure key: {e}"))?;
        engine.set_infra_previous(Some(Arc::new(p)));
    }
    Ok(())
}

/// Carries out a staged restore with keys that work: every file is
/// rewrapped under this server's keys, then each database's WAL and
/// archive segments are recovered by SQLite and checkpointed in order.
pub fn finish_restore(dir: &Path, engine: &Engine) -> Result<(), String> {
    let Some(plan) = pending_plan(dir) else {
        return Ok(());
    };
    let target = engine.protector();
    prepare_engine(engine, &plan)?;
    let data = dir.join(resource::DATA_SUBDIR);
    let staging = dir.join(RESTORE_DIR);
    for (name, segments) in &plan.replay {
        let db = data.join(format!("{name}.db"));
        let wal = data.join(format!("{name}.db-wal"));
        let mut files = vec![db.clone()];
        if wal.exists() {
            files.push(wal.clone());
        }
        files.extend(segments.iter().map(|s| staging.join(name).join(s)));
        // Every page and frame must authenticate before any is used: SQLite
        // would never read a page the WAL replaces, and a damaged backup
        // must not restore quietly.
        for f in &files {
            engine
                .verify_at_rest(f)
                .map_err(|e| format!("restoring {name}: the backup is damaged: {e}"))?;
        }
        for f in &files {
            engine
                .rewrap_at_rest(f)
                .map_err(|e| format!("restoring {name}: {e}"))?;
        }
        let replay_one = |label: &str| -> Result<(), String> {
            let conn = engine
                .connect(name)
                .map_err(|e| format!("restoring {name} ({label}): {e}"))?;
            conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
                r.get::<_, i64>(0)
            })
            .map_err(|e| format!("restoring {name} ({label}): {e}"))?;
            Ok(())
        };
        replay_one("the backup's WAL")?;
        for s in segments {
            fs::copy(staging.join(name).join(s), &wal).map_err(|e| err("staging", &wal, e))?;
            replay_one(&format!("archive segment {s}"))?;
        }
        let conn = engine.connect(name).map_err(|e| e.to_string())?;
        let ok: String = conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .map_err(|e| format!("restoring {name}: {e}"))?;
        if ok != "ok" {
            return Err(format!(
                "restored database {name} fails integrity_check: {ok}"
            ));
        }
        // The restored server must not go on sealing under its source's
        // DEKs: new ones seal from now on, and the server's DEK rotation
        // re-seals the restored pages in the background once it is Ready.
        conn.begin_dek_rotation()
            .map_err(|e| format!("restoring {name}: new DEKs: {e}"))?;
    }
    engine.set_protector(target);
    engine.set_infra_previous(None);
    fs::remove_dir_all(&staging).map_err(|e| err("removing", &staging, e))?;
    let _ = resource::log_activity(
        dir,
        &serde_json::json!({"time": resource::now_rfc3339(), "event": "restore_finished",
            "backup": plan.backup, "to_time_unix_us": plan.to_time_unix_us}),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_parse_as_rfc3339_or_unix_seconds() {
        assert_eq!(parse_time("1970-01-01T00:00:00Z").unwrap(), 0);
        assert_eq!(
            parse_time("2000-03-01T00:00:00Z").unwrap(),
            951_868_800_000_000
        );
        assert_eq!(
            parse_time("2026-11-22T13:05:01.25Z").unwrap(),
            parse_time("2026-11-22T14:05:01.250+01:00").unwrap()
        );
        assert_eq!(parse_time("1795698301.5").unwrap(), 1_795_698_301_500_000);
        // Round trip with the formatter the server writes times with.
        let t = atrest_vault::timefmt::rfc3339(1_795_698_301, 123);
        assert_eq!(parse_time(&t).unwrap(), 1_795_698_301_123_000);
        for bad in [
            "",
            "yesterday",
            "2026-13-01T00:00:00Z",
            "2026-11-22T13:05:01",
            "-5",
        ] {
            let e = parse_time(bad).unwrap_err();
            assert!(e.contains("RFC 3339"), "{e}");
        }
    }
}
