//! Backups and the WAL archive of the postgres engine, at the ciphertext
//! level: nothing on this path decrypts a unit.
//!
//! * **WAL archive.** PostgreSQL's `archive_command` copies each completed
//!   segment's *sealed* file from the tree (`DIR/pgfs/pgdata/pg_wal/...`)
//!   to `REPO/pgwal/`, synced, then renamed into place and the directory
//!   synced. The segment is complete and synced (PostgreSQL archives only
//!   then) and nothing writes it until the archive succeeds, so the copy is
//!   the file as a crash would leave it, which opens.
//! * **Base backup.** `pg_backup_start` (a checkpoint), then every file of
//!   the cluster but those PostgreSQL's own base backup leaves out, each
//!   copied as it is ([`atrest_fs::Tree::copy_out`]: the file's reads and
//!   writes wait for its copy), then `pg_backup_stop`, which waits for the
//!   WAL up to the backup's end to be archived. The backup label is
//!   written as a sealed file of its own. Pages written during the copy
//!   are restored by replaying the WAL from the backup's start, as in any
//!   PostgreSQL base backup (every page changed after its checkpoint has a
//!   full-page image in that WAL).
//! * Every copy stays wrapped under the tree's root key (each header keeps
//!   the root's KEK-wrapped DEK): a key change rewraps their headers with
//!   the tree's; `backup verify` authenticates every unit.

use std::fs;
use std::path::{Path, PathBuf};

use super::{os_ids, pg_of, PostgresError, CIPHER_SUBDIR, PGDATA, RUN_SUBDIR};
use crate::backup::{
    self as sqlite_backup, BackupEntry, PgBackupPoint, VerifyReport, ARCHIVE_SUBDIR,
};
use crate::config::ServerConfig;
use crate::resource;

/// A backup's copy of the cluster's sealed files, under the backup.
const TREE: &str = "tree";
/// A backup's own sealed files (the backup label), under the backup.
const SEALED: &str = "sealed";

fn err(what: &str, path: &Path, e: impl std::fmt::Display) -> String {
    format!("{what} {}: {e}", path.display())
}

/// The WAL archive of the server in `dir`.
pub fn archive_dir(dir: &Path, config: &ServerConfig) -> PathBuf {
    sqlite_backup::repository(dir, config).join(ARCHIVE_SUBDIR)
}

/// Makes the archive directory PostgreSQL's OS user writes (0700, its
/// own) inside the repository (root's; searchable so the OS user reaches
/// its directory), and returns PostgreSQL's archive settings (`-c`).
pub fn archive_settings(dir: &Path, config: &ServerConfig) -> Result<Vec<String>, PostgresError> {
    let pg = pg_of(config)?;
    let (uid, gid) = os_ids(&pg.os_user)?;
    let repo = sqlite_backup::repository(dir, config);
    let archive = repo.join(ARCHIVE_SUBDIR);
    fs::create_dir_all(&repo).map_err(|e| super::io(&repo, e))?;
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&repo, fs::Permissions::from_mode(0o711))
        .map_err(|e| super::io(&repo, e))?;
    super::mkdir_owned(&archive, uid, gid)?;
    super::reachable_by(&archive, &pg.os_user, uid, gid)?;
    let src = dir.join(CIPHER_SUBDIR).join(PGDATA);
    for p in [&src, &archive] {
        if p.to_string_lossy().contains('\'') {
            return Err(PostgresError::Command {
                what: "setting up the WAL archive".into(),
                detail: format!("{} contains a quote; choose another path", p.display()),
            });
        }
    }
    let (src, dst) = (src.display(), archive.display());
    // %p is relative to the data directory, %f the segment's name. The
    // copy is synced before it takes its name, and the name before
    // PostgreSQL may recycle the segment.
    let command = format!(
        "cp '{src}/%p' '{dst}/%f.tmp' && sync '{dst}/%f.tmp' && mv -f '{dst}/%f.tmp' '{dst}/%f' && sync '{dst}'"
    );
    Ok(vec![
        "archive_mode=on".into(),
        format!("archive_command={command}"),
    ])
}

/// Files and directories PostgreSQL's own base backup leaves out (their
/// directories are kept, empty).
fn excluded(rel: &Path) -> bool {
    let s = rel.to_string_lossy();
    let name = rel
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    const DIRS: [&str; 9] = [
        "pg_wal/",
        "pg_replslot/",
        "pg_dynshmem/",
        "pg_notify/",
        "pg_serial/",
        "pg_snapshots/",
        "pg_stat_tmp/",
        "pg_subtrans/",
        "pgsql_tmp",
    ];
    DIRS.iter()
        .any(|d| s.starts_with(d) || s.contains(&format!("/{d}")))
        || name.starts_with("pgsql_tmp")
        || name == "pg_internal.init"
        || [
            "postmaster.pid",
            "postmaster.opts",
            "backup_label",
            "tablespace_map",
        ]
        .contains(&s.as_ref())
}

/// Every directory and regular file under `dir`, relative to it.
fn walk(dir: &Path) -> (Vec<PathBuf>, Vec<PathBuf>) {
    let (mut dirs, mut files) = (vec![], vec![]);
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for e in fs::read_dir(dir.join(&rel)).into_iter().flatten().flatten() {
            let Ok(t) = e.file_type() else { continue };
            let p = rel.join(e.file_name());
            if t.is_dir() {
                dirs.push(p.clone());
                stack.push(p);
            } else if t.is_file() {
                files.push(p);
            }
        }
    }
    (dirs, files)
}

fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

fn private_dir(p: &Path) -> Result<(), String> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(p)
        .map_err(|e| err("creating", p, e))
}

fn sync_dir(p: &Path) {
    if let Ok(d) = fs::File::open(p) {
        let _ = d.sync_all();
    }
}

/// The server process's own connection to its PostgreSQL: the admin role
/// over the local socket (peer authentication, root only).
async fn connect(
    dir: &Path,
    config: &ServerConfig,
    listen: &str,
) -> Result<tokio_postgres::Client, String> {
    let pg = pg_of(config).map_err(|e| e.to_string())?;
    let port: u16 = listen
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| format!("no port in {listen}"))?;
    let (client, conn) = tokio_postgres::Config::new()
        .host_path(dir.join(RUN_SUBDIR))
        .port(port)
        .user(&pg.admin_user)
        .dbname("postgres")
        .application_name("atrest backup")
        .connect(tokio_postgres::NoTls)
        .await
        .map_err(|e| format!("connecting to PostgreSQL over its local socket: {e}"))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::warn!(error = %e, "the backup's PostgreSQL connection ended");
        }
    });
    Ok(client)
}

/// Takes an online base backup of the running cluster (see the module
/// documentation). `ready` is asked between files: a server leaving Ready
/// (Inaccessible) ends the backup, which leaves nothing behind.
pub fn take_backup(
    dir: &Path,
    config: &ServerConfig,
    tree: &atrest_fs::Tree,
    listen: &str,
    rt: &tokio::runtime::Handle,
    ready: &dyn Fn() -> bool,
) -> Result<BackupEntry, String> {
    let repo = sqlite_backup::repository(dir, config);
    let backups = repo.join("backups");
    private_dir(&backups)?;
    if !sqlite_backup::catalog_exists(&repo) {
        sqlite_backup::save_catalog(&repo, &[])?;
    }
    let time = resource::now_rfc3339();
    let id = format!(
        "{}-{}",
        time.replace([':', '-'], "").trim_end_matches('Z'),
        &resource::uuid()[..8]
    );
    let partial = backups.join(format!(".{id}.partial"));
    private_dir(&partial)?;
    let client = rt.block_on(connect(dir, config, listen))?;
    let q = |sql: &str, params: &[&(dyn tokio_postgres::types::ToSql + Sync)]| {
        rt.block_on(client.query_one(sql, params))
            .map_err(|e| format!("PostgreSQL: {sql}: {e}"))
    };
    let label = format!("atrest backup {id}");
    let started = q(
        "select lsn::text, pg_walfile_name(lsn) from pg_backup_start($1, true) as lsn",
        &[&label],
    )?;
    let (start_lsn, start_wal): (String, String) = (started.get(0), started.get(1));
    let copied = (|| {
        let data = dir.join(CIPHER_SUBDIR).join(PGDATA);
        let (dirs, files) = walk(&data);
        let out = partial.join(TREE);
        private_dir(&out)?;
        for d in dirs {
            private_dir(&out.join(d))?;
        }
        let mut size = 0;
        for rel in files {
            if excluded(&rel) {
                continue;
            }
            if !ready() {
                return Err("the server left Ready during the backup".to_string());
            }
            let dst = out.join(&rel);
            if let Some(n) = tree
                .copy_out(&Path::new(PGDATA).join(&rel), &dst)
                .map_err(|e| format!("copying {}: {e}", rel.display()))?
            {
                size += n;
            }
        }
        Ok(size)
    })();
    // Ended either way: a backup left started holds full-page writes on.
    let stopped = q(
        "select labelfile, coalesce(spcmapfile, ''), lsn::text from pg_backup_stop(true)",
        &[],
    );
    let result = (|| {
        let size = copied?;
        let stopped = stopped?;
        let (labelfile, spcmap, stop_lsn): (String, String, String) =
            (stopped.get(0), stopped.get(1), stopped.get(2));
        let sealed = partial.join(SEALED);
        private_dir(&sealed)?;
        tree.seal_out(&sealed.join("backup_label"), labelfile.as_bytes())
            .map_err(|e| format!("sealing the backup label: {e}"))?;
        if !spcmap.is_empty() {
            tree.seal_out(&sealed.join("tablespace_map"), spcmap.as_bytes())
                .map_err(|e| format!("sealing the tablespace map: {e}"))?;
        }
        let entry = BackupEntry {
            id: id.clone(),
            time: time.clone(),
            time_unix_us: now_us(),
            server_name: config.name.clone(),
            server_id: config.server_id.clone(),
            scenario: sqlite_backup::scenario_name(config),
            infrastructure_encryption: config.encryption.infrastructure_encryption,
            data_key: tree.kek().to_string(),
            infrastructure_key: None,
            size_bytes: size,
            databases: vec![],
            postgres: Some(PgBackupPoint {
                start_lsn: start_lsn.clone(),
                start_wal: start_wal.clone(),
                stop_lsn,
            }),
        };
        sqlite_backup::write_manifest(&partial, &entry, config, serde_json::json!({}))?;
        sync_dir(&partial);
        Ok::<_, String>(entry)
    })();
    sqlite_backup::publish(dir, config, &repo, &partial, result)
}

/// The archived segments a restore from a backup starting at `start_wal`
/// replays, oldest first (timeline history files too).
fn archive_files_from(archive: &Path, start_wal: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(archive)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let n = p.file_name().map(|n| n.to_string_lossy().to_string());
            n.is_some_and(|n| {
                !n.ends_with(".tmp") && (n.ends_with(".history") || n.as_str() >= start_wal)
            })
        })
        .collect();
    v.sort();
    v
}

/// Authenticates every unit of backup `id` (its copy of the cluster and
/// its label) and of the archived WAL a restore from it would replay,
/// with the tree's keys. The first failure names file and unit.
pub fn verify_backup(
    tree: &atrest_fs::Tree,
    repo: &Path,
    id: &str,
) -> Result<VerifyReport, String> {
    let dir = sqlite_backup::backup_dir(repo, id)?;
    let manifest = sqlite_backup::read_manifest(&dir)?;
    let point = manifest
        .entry
        .postgres
        .as_ref()
        .ok_or_else(|| format!("backup {id} is not a postgres-engine backup"))?;
    let mut report = VerifyReport {
        backup: id.to_string(),
        files: 0,
        pages_and_frames: 0,
        archive_segments: 0,
    };
    let mut files: Vec<PathBuf> = vec![];
    for sub in [TREE, SEALED] {
        let (_, fs_) = walk(&dir.join(sub));
        files.extend(fs_.into_iter().map(|r| dir.join(sub).join(r)));
    }
    if !files.iter().any(|f| f.ends_with("backup_label")) {
        return Err(format!("backup {id} has no backup label"));
    }
    let segments = archive_files_from(&repo.join(ARCHIVE_SUBDIR), &point.start_wal);
    if !segments.iter().any(|p| {
        p.file_name()
            .is_some_and(|n| n.to_string_lossy() == point.start_wal)
    }) {
        return Err(format!(
            "backup {id}: the archive lacks its first WAL segment {}",
            point.start_wal
        ));
    }
    report.archive_segments = segments.len();
    files.extend(segments);
    for f in files {
        let units = tree.verify_outside(&f).map_err(|e| e.to_string())?;
        report.files += 1;
        report.pages_and_frames += units;
    }
    Ok(report)
}

/// Verifies backup `id`, or every backup in the catalog.
pub fn verify_all(
    tree: &atrest_fs::Tree,
    repo: &Path,
    id: Option<&str>,
) -> Result<Vec<VerifyReport>, String> {
    sqlite_backup::verify_each(repo, id, |i| verify_backup(tree, repo, i))
}

/// Rewraps every backup and archived segment with the tree's current
/// wrapping (after the tree's own rewrap): headers only.
pub fn rewrap_repository(
    dir: &Path,
    config: &ServerConfig,
    tree: &atrest_fs::Tree,
) -> Result<usize, String> {
    let repo = sqlite_backup::repository(dir, config);
    let mut n = 0;
    let archive = repo.join(ARCHIVE_SUBDIR);
    if archive.exists() {
        n += tree.rewrap_outside(&archive).map_err(|e| e.to_string())?;
    }
    for e in sqlite_backup::load_catalog(&repo)? {
        if e.postgres.is_none() {
            continue;
        }
        for sub in [TREE, SEALED] {
            let d = repo.join("backups").join(&e.id).join(sub);
            if d.exists() {
                n += tree
                    .rewrap_outside(&d)
                    .map_err(|e| format!("rewrapping {}: {e}", d.display()))?;
            }
        }
    }
    Ok(n)
}
