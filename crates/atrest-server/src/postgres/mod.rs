//! The postgres engine: Debian's PostgreSQL running on an atrest-fs mount,
//! so every file it writes (data, WAL, pg_xact, temp files, the server
//! log) is sealed below the engine, as Azure does in its storage layer.
//!
//! ```text
//! DIR/pgfs/     the ciphertext tree (atrest-fs): .atrest-fs-root, pgdata/...
//! DIR/mnt/      its mount point; the plaintext view exists only in the
//!               server process's private mount namespace and its children
//! DIR/run/      PostgreSQL's Unix socket (sockets cannot live on the mount)
//! ```
//!
//! PostgreSQL runs as an unprivileged OS user (default `postgres`), with
//! data checksums, TLS from the server's certificate and SCRAM-SHA-256.

use std::fs;
use std::io::Read;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use thiserror::Error;

use crate::config::{Limits, PostgresConfig};
use crate::config::{PlaintextPolicy, ServerConfig};
use crate::resource;
use crate::resource::CIPHER_SUBDIR;

pub mod backup;
mod refuse;
pub mod rotate;
mod serve;
pub use serve::{serve, ServeError};

pub const MOUNT_SUBDIR: &str = "mnt";
pub const RUN_SUBDIR: &str = "run";
/// PostgreSQL's data directory, inside the mount.
pub const PGDATA: &str = "pgdata";

#[derive(Debug, Error)]
#[non_exhaustive]
pub enum PostgresError {
    #[error("PostgreSQL is not installed: no {0} (install the Debian package `postgresql`, or give --postgres-bin DIR)")]
    NotInstalled(String),
    #[error("the OS user {0:?} does not exist: PostgreSQL refuses to run as root, so atrest runs it as this user (install the `postgresql` package, which creates `postgres`, or `useradd --system {0}`)")]
    NoUser(String),
    #[error("{what} failed: {detail}")]
    Command { what: String, detail: String },
    #[error("{listen} is in use: another process listens there (choose another with --listen)")]
    PortInUse { listen: String },
    #[error(transparent)]
    Fs(#[from] atrest_fs::FsError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid listen address {0:?}: use HOST:PORT")]
    Listen(String),
}

impl From<PostgresError> for crate::resource::ResourceError {
    fn from(e: PostgresError) -> Self {
        crate::resource::ResourceError::Engine(Box::new(e))
    }
}

fn io(path: &Path, source: std::io::Error) -> PostgresError {
    PostgresError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl PostgresConfig {
    /// `explicit`, or the newest `/usr/lib/postgresql/N/bin`.
    pub fn find(explicit: Option<&Path>, os_user: &str) -> Result<Self, PostgresError> {
        let bin_dir = match explicit {
            Some(d) => d.to_path_buf(),
            None => {
                let base = Path::new("/usr/lib/postgresql");
                let mut versions: Vec<(u32, PathBuf)> = fs::read_dir(base)
                    .map_err(|_| PostgresError::NotInstalled(base.display().to_string()))?
                    .filter_map(|e| e.ok())
                    .filter_map(|e| {
                        let v = e.file_name().to_str()?.parse::<u32>().ok()?;
                        Some((v, e.path().join("bin")))
                    })
                    .filter(|(_, p)| p.join("postgres").exists())
                    .collect();
                versions.sort();
                versions.pop().map(|(_, p)| p).ok_or_else(|| {
                    PostgresError::NotInstalled(format!("{}/N/bin/postgres", base.display()))
                })?
            }
        };
        for tool in ["postgres", "initdb"] {
            if !bin_dir.join(tool).exists() {
                return Err(PostgresError::NotInstalled(
                    bin_dir.join(tool).display().to_string(),
                ));
            }
        }
        os_ids(os_user)?;
        Ok(PostgresConfig {
            bin_dir,
            os_user: os_user.to_string(),
            admin_user: "atrest".into(),
        })
    }
}

/// The uid and gid of `user`, from /etc/passwd.
fn os_ids(user: &str) -> Result<(u32, u32), PostgresError> {
    let text = fs::read_to_string("/etc/passwd").unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() >= 4 && f[0] == user)
                .then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))?
        })
        .next()
        .ok_or_else(|| PostgresError::NoUser(user.to_string()))
}

fn pg_of(config: &ServerConfig) -> Result<&PostgresConfig, PostgresError> {
    config
        .postgres
        .as_ref()
        .ok_or_else(|| PostgresError::Command {
            what: "reading server.json".into(),
            detail: "a postgres-engine server without its `postgres` section".into(),
        })
}

fn service_root(
    config: &ServerConfig,
) -> Result<Box<dyn atrest_crypto::KeyProtector>, crate::resource::ResourceError> {
    let ks = atrest_keystore::Keystore::open(&config.encryption.keystore_dir)?;
    let id = config
        .encryption
        .service_key
        .strip_prefix("service:")
        .and_then(atrest_keystore::ServiceKeyId::parse)
        .ok_or_else(|| {
            crate::resource::ResourceError::Invalid("server.json names no service key".into())
        })?;
    Ok(Box::new(ks.service_protector(id)?))
}

/// The infrastructure layer's keystore, when the server has that layer.
fn infra_keystore(
    config: &ServerConfig,
) -> Result<Option<atrest_keystore::InfraKeystore>, crate::resource::ResourceError> {
    if !config.encryption.infrastructure_encryption {
        return Ok(None);
    }
    let dir = config
        .encryption
        .infra_keystore_dir
        .as_ref()
        .ok_or_else(|| {
            crate::resource::ResourceError::Invalid(
                "server.json: infrastructure encryption is on but names no infrastructure keystore"
                    .into(),
            )
        })?;
    Ok(Some(atrest_keystore::InfraKeystore::open(dir)?))
}

fn mkdir_owned(path: &Path, uid: u32, gid: u32) -> Result<(), PostgresError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(|e| io(path, e))?;
    std::os::unix::fs::chown(path, Some(uid), Some(gid)).map_err(|e| io(path, e))
}

fn write_owned(
    path: &Path,
    bytes: &[u8],
    mode: u32,
    uid: u32,
    gid: u32,
) -> Result<(), PostgresError> {
    fs::write(path, bytes).map_err(|e| io(path, e))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(|e| io(path, e))?;
    std::os::unix::fs::chown(path, Some(uid), Some(gid)).map_err(|e| io(path, e))
}

/// Mounts the tree, its root DEK unwrapped by `protector` (the service
/// key, or the customer key and, during a rewrap, the keys it came from).
fn mount(
    dir: &Path,
    protector: &dyn atrest_crypto::KeyProtector,
) -> Result<atrest_fs::Mounted, crate::resource::ResourceError> {
    let config = resource::load_config(dir)?;
    let cipher = dir.join(CIPHER_SUBDIR);
    let infra = infra_keystore(&config)?;
    let root =
        atrest_fs::RootKey::open(&cipher, protector, infra.as_ref()).map_err(PostgresError::Fs)?;
    Ok(atrest_fs::mount(
        &cipher,
        &dir.join(MOUNT_SUBDIR),
        root,
        &atrest_fs::MountOptions::default(),
    )
    .map_err(PostgresError::Fs)?)
}

/// Runs `cmd` as the PostgreSQL OS user; its output becomes the error.
fn run_as(
    pg: &PostgresConfig,
    mut cmd: Command,
    what: &str,
    tmp: &Path,
) -> Result<(), PostgresError> {
    let (uid, gid) = os_ids(&pg.os_user)?;
    let out = cmd
        .uid(uid)
        .gid(gid)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("TMPDIR", tmp)
        .env("LANG", "C.UTF-8")
        .current_dir(tmp)
        .output()
        .map_err(|e| PostgresError::Command {
            what: what.into(),
            detail: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(PostgresError::Command {
            what: what.into(),
            detail: format!(
                "{}{}",
                String::from_utf8_lossy(&out.stderr),
                String::from_utf8_lossy(&out.stdout)
            ),
        });
    }
    Ok(())
}

/// The settings every side of a comparison uses: sized for this machine as
/// an operator would, checksums on (initdb), durable.
pub fn tuned_settings() -> String {
    let mem_mb = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map(|kb| kb / 1024)
        .unwrap_or(4096);
    let shared = (mem_mb / 4).clamp(128, 8192);
    let cache = (mem_mb * 3 / 4).max(256);
    format!(
        "# Written by atrest at create. The same settings serve every side of\n\
         # `atrest bench postgres`.\n\
         shared_buffers = {shared}MB\n\
         effective_cache_size = {cache}MB\n\
         maintenance_work_mem = 256MB\n\
         wal_buffers = 16MB\n\
         max_wal_size = 4GB\n\
         min_wal_size = 256MB\n\
         checkpoint_completion_target = 0.9\n\
         wal_level = replica\n\
         full_page_writes = on\n\
         fsync = on\n\
         synchronous_commit = on\n\
         password_encryption = 'scram-sha-256'\n\
         logging_collector = on\n\
         log_directory = 'log'\n\
         log_filename = 'postgresql-%Y-%m-%d.log'\n\
         dynamic_shared_memory_type = posix\n"
    )
}

/// Whether the OS user `user` can reach `path` through every ancestor;
/// if not, says which one to open up.
fn reachable_by(path: &Path, user: &str, uid: u32, gid: u32) -> Result<(), PostgresError> {
    for a in path.ancestors().skip(1) {
        if let Ok(md) = fs::metadata(a) {
            use std::os::unix::fs::MetadataExt;
            let m = md.mode();
            let can = m & 0o001 != 0
                || (md.uid() == uid && m & 0o100 != 0)
                || (md.gid() == gid && m & 0o010 != 0);
            if !can {
                return Err(PostgresError::Command {
                    what: "checking the server directory".into(),
                    detail: format!(
                        "the OS user {user} cannot reach {} because {} is not searchable by it; \
                         allow it with `chmod o+x {}` or choose another place",
                        path.display(),
                        a.display(),
                        a.display()
                    ),
                });
            }
        }
    }
    Ok(())
}

/// Makes the PostgreSQL cluster of a new server: the ciphertext tree and
/// its root key, then initdb inside the mount (checksums, SCRAM admin),
/// TLS and client authentication. Runs in a private mount namespace
/// (the caller entered it).
pub fn initialize(
    dir: &Path,
    config: &ServerConfig,
    admin_user: &str,
    password: &str,
) -> Result<(), crate::resource::ResourceError> {
    let pg = pg_of(config)?;
    let (uid, gid) = os_ids(&pg.os_user)?;
    // The OS user must reach the mount point through every ancestor.
    reachable_by(dir, &pg.os_user, uid, gid)?;
    let cipher = dir.join(CIPHER_SUBDIR);
    let mnt = dir.join(MOUNT_SUBDIR);
    let run = dir.join(RUN_SUBDIR);
    for d in [&cipher, &mnt, &run] {
        mkdir_owned(d, uid, gid)?;
    }
    // The server directory is 0700 root: let the OS user reach the mount
    // point and the socket directory through it, and nothing else.
    fs::set_permissions(dir, fs::Permissions::from_mode(0o711)).map_err(|e| PostgresError::Io {
        path: dir.to_path_buf(),
        source: e,
    })?;
    let protector = service_root(config)?;
    let infra = infra_keystore(config)?;
    atrest_fs::RootKey::create(&cipher, protector.as_ref(), infra.as_ref())
        .map_err(PostgresError::Fs)?;
    let mounted = mount(dir, protector.as_ref())?;
    let result = (|| {
        let tmp = mnt.join("tmp");
        mkdir_owned(&tmp, uid, gid)?;
        let pw = tmp.join("initdb-password");
        write_owned(&pw, format!("{password}\n").as_bytes(), 0o600, uid, gid)?;
        let pgdata = mnt.join(PGDATA);
        let mut cmd = Command::new(pg.bin_dir.join("initdb"));
        cmd.arg("-D")
            .arg(&pgdata)
            .arg("--data-checksums")
            .arg("-U")
            .arg(admin_user)
            .arg(format!("--pwfile={}", pw.display()))
            .arg("--auth-host=scram-sha-256")
            .arg("--auth-local=scram-sha-256")
            .arg("--encoding=UTF8")
            .arg("--locale=C.UTF-8");
        let r = run_as(pg, cmd, "initdb", &tmp);
        let _ = fs::remove_file(&pw);
        r?;
        // TLS from the server's certificate.
        let cert = fs::read(resource::resolve(dir, &config.tls.cert))
            .map_err(|e| io(&config.tls.cert, e))?;
        let key = zeroize::Zeroizing::new(
            fs::read(resource::resolve(dir, &config.tls.key))
                .map_err(|e| io(&config.tls.key, e))?,
        );
        write_owned(&pgdata.join("server.crt"), &cert, 0o644, uid, gid)?;
        write_owned(&pgdata.join("server.key"), &key, 0o600, uid, gid)?;
        let mut conf = tuned_settings();
        conf.push_str("ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n");
        conf.push_str(&format!(
            "max_connections = {}\n",
            config.limits.max_connections.max(10)
        ));
        write_owned(
            &pgdata.join("atrest.conf"),
            conf.as_bytes(),
            0o600,
            uid,
            gid,
        )?;
        let main_conf = pgdata.join("postgresql.conf");
        let mut text = fs::read_to_string(&main_conf).map_err(|e| io(&main_conf, e))?;
        text.push_str("\ninclude 'atrest.conf'\n");
        write_owned(&main_conf, text.as_bytes(), 0o600, uid, gid)?;
        write_auth(&pgdata, config, pg, admin_user)?;
        Ok::<(), PostgresError>(())
    })();
    drop(mounted);
    result.map_err(Into::into)
}

/// Client authentication (`pg_hba.conf`, `pg_ident.conf`), written at
/// create and again at every start: TLS and SCRAM-SHA-256 for every
/// client, and the admin role over the local socket for the server
/// process only (peer authentication of root, for backups).
fn write_auth(
    pgdata: &Path,
    config: &ServerConfig,
    pg: &PostgresConfig,
    admin_user: &str,
) -> Result<(), PostgresError> {
    let (uid, gid) = os_ids(&pg.os_user)?;
    let mut hba = format!(
        "# Written by atrest at every start: TLS and SCRAM-SHA-256 for every client;\n\
         # the admin role over the local socket only for the atrest server (root).\n\
         local all {admin_user} peer map=atrest_server\n\
         local all all scram-sha-256\n\
         hostssl all all 0.0.0.0/0 scram-sha-256\n\
         hostssl all all ::/0 scram-sha-256\n"
    );
    match config.allow_plaintext {
        PlaintextPolicy::Never => {}
        PlaintextPolicy::Loopback => hba.push_str(
            "hostnossl all all 127.0.0.1/32 scram-sha-256\nhostnossl all all ::1/128 scram-sha-256\n",
        ),
        PlaintextPolicy::Always => hba.push_str(
            "hostnossl all all 0.0.0.0/0 scram-sha-256\nhostnossl all all ::/0 scram-sha-256\n",
        ),
    }
    write_owned(&pgdata.join("pg_hba.conf"), hba.as_bytes(), 0o600, uid, gid)?;
    let ident = format!("# Written by atrest.\natrest_server root {admin_user}\n");
    write_owned(
        &pgdata.join("pg_ident.conf"),
        ident.as_bytes(),
        0o600,
        uid,
        gid,
    )
}

/// The running PostgreSQL of a started server, on its mount.
pub struct Running {
    child: Child,
    session: Option<fuser::BackgroundSession>,
    /// The mounted tree (holds its root key: dropped at unmount).
    tree: Option<atrest_fs::Tree>,
    fs_stats: std::sync::Arc<atrest_fs::Stats>,
    pg: PostgresConfig,
    dir: PathBuf,
    pub listen: String,
    limits: Limits,
    /// Settings beside the limits (the WAL archive's).
    settings: Vec<String>,
}

impl Running {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The filesystem's counters (for `/metrics`).
    pub fn fs_stats(&self) -> std::sync::Arc<atrest_fs::Stats> {
        std::sync::Arc::clone(&self.fs_stats)
    }

    /// The mounted tree, for rewraps.
    pub fn tree(&self) -> Option<&atrest_fs::Tree> {
        self.tree.as_ref()
    }

    fn pgdata(&self) -> PathBuf {
        self.dir.join(MOUNT_SUBDIR).join(PGDATA)
    }

    /// `Some(status)` once PostgreSQL has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Starts PostgreSQL again on the same mount after it died (its crash
    /// recovery replays the WAL); the processes it left are stopped first.
    pub fn restart(&mut self, limit: Duration) -> Result<(), crate::resource::ResourceError> {
        let _ = self.child.wait();
        let _ = stop_stale_postgres(&self.pgdata(), &self.pg);
        self.child = spawn_postgres(
            &self.dir,
            &self.pg,
            &self.listen,
            &self.limits,
            &self.settings,
        )?;
        self.wait_ready(limit)
    }

    fn wait_ready(&mut self, limit: Duration) -> Result<(), crate::resource::ResourceError> {
        let deadline = Instant::now() + limit;
        let pid_file = self.pgdata().join("postmaster.pid");
        loop {
            if let Some(status) = self.exited() {
                let mut err = String::new();
                if let Some(mut e) = self.child.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                // Its own words are in its log, inside the tree: the last
                // lines of the newest file, read through the mount.
                let log_dir = self.pgdata().join("log");
                let newest = fs::read_dir(&log_dir)
                    .into_iter()
                    .flatten()
                    .flatten()
                    .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok());
                let tail = newest
                    .and_then(|e| fs::read_to_string(e.path()).ok())
                    .map(|t| {
                        let lines: Vec<&str> = t.lines().collect();
                        lines[lines.len().saturating_sub(10)..].join("\n")
                    })
                    .unwrap_or_default();
                return Err(PostgresError::Command {
                    what: "starting postgres".into(),
                    detail: format!("it exited ({status}): {}\n{tail}", err.trim()),
                }
                .into());
            }
            let ready = fs::read_to_string(&pid_file)
                .ok()
                .and_then(|t| t.lines().nth(7).map(|l| l.trim() == "ready"))
                .unwrap_or(false);
            if ready {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(PostgresError::Command {
                    what: "starting postgres".into(),
                    detail: format!(
                        "not ready after {limit:?} (its log is in the encrypted tree: pgdata/log)"
                    ),
                }
                .into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Fast shutdown (SIGINT: open transactions roll back, a checkpoint is
    /// written), then the unmount, which writes back every file's state
    /// and zeroizes the keys.
    pub fn stop(self, limit: Duration) -> Result<(), PostgresError> {
        self.stop_with(rustix::process::Signal::INT, limit)
    }

    /// Immediate shutdown (SIGQUIT: every backend exits at once, no
    /// checkpoint; the next start runs crash recovery), then the unmount,
    /// which zeroizes the keys: the key has become inaccessible.
    pub fn stop_immediately(self) -> Result<(), PostgresError> {
        self.stop_with(rustix::process::Signal::QUIT, Duration::from_secs(10))
    }

    fn stop_with(
        mut self,
        signal: rustix::process::Signal,
        limit: Duration,
    ) -> Result<(), PostgresError> {
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32);
        if self.exited().is_none() {
            if let Some(pid) = pid {
                let _ = rustix::process::kill_process(pid, signal);
            }
            let deadline = Instant::now() + limit;
            while self.exited().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            if self.exited().is_none() {
                if let Some(pid) = pid {
                    let _ = rustix::process::kill_process(pid, rustix::process::Signal::QUIT);
                }
                let _ = self.child.wait();
            }
        }
        // Backends of a postmaster that died may still hold files open.
        let _ = stop_stale_postgres(&self.pgdata(), &self.pg);
        // A process on its way out loses its executable before its files
        // and working directory: wait until nothing holds the mount, or
        // the unmount fails with EBUSY.
        let mnt = self.dir.join(MOUNT_SUBDIR);
        let deadline = Instant::now() + Duration::from_secs(10);
        while mount_in_use(&mnt) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let unmounted = match self.session.take() {
            Some(s) => s.umount_and_join().map_err(|e| PostgresError::Command {
                what: "unmounting".into(),
                detail: e.to_string(),
            }),
            None => Ok(()),
        };
        self.tree = None;
        unmounted
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if self.session.is_some() && self.exited().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn split_listen(listen: &str) -> Result<(String, u16), PostgresError> {
    let (host, port) = listen
        .rsplit_once(':')
        .ok_or_else(|| PostgresError::Listen(listen.into()))?;
    let port = port
        .parse()
        .map_err(|_| PostgresError::Listen(listen.into()))?;
    Ok((host.trim_matches(['[', ']']).to_string(), port))
}

/// PostgreSQL processes of this data directory left by an earlier
/// process of this server (it was killed, or PostgreSQL's postmaster was):
/// they hold the port and the shared memory, and must go first. They are
/// the `postgres` binary with the data directory as working directory.
fn stop_stale_postgres(pgdata: &Path, pg: &PostgresConfig) -> bool {
    let exe = pg.bin_dir.join("postgres");
    let dash_d = format!("-D\0{}\0", pgdata.display());
    // A postmaster shows `-D PGDATA` in its command line; its children
    // are found by parent; orphans whose postmaster died by their working
    // directory (the mount is still attached in this namespace).
    let stale = || -> Vec<i32> {
        let procs: Vec<(i32, i32, bool)> = fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .filter(|pid| {
                fs::read_link(format!("/proc/{pid}/exe")).ok().as_deref() == Some(exe.as_path())
            })
            .filter_map(|pid| {
                let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
                let ppid = status
                    .lines()
                    .find(|l| l.starts_with("PPid:"))?
                    .split_whitespace()
                    .nth(1)?
                    .parse()
                    .ok()?;
                let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let mine = String::from_utf8_lossy(&cmdline).contains(&dash_d)
                    || fs::read_link(format!("/proc/{pid}/cwd")).ok().as_deref() == Some(pgdata);
                Some((pid, ppid, mine))
            })
            .collect();
        let roots: Vec<i32> = procs.iter().filter(|p| p.2).map(|p| p.0).collect();
        procs
            .iter()
            .filter(|p| p.2 || roots.contains(&p.1))
            .map(|p| p.0)
            .collect()
    };
    let pids = stale();
    if pids.is_empty() {
        return false;
    }
    tracing::warn!(
        ?pids,
        "stopping PostgreSQL processes left running by an earlier server process"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = stale();
        if left.is_empty() || Instant::now() > deadline {
            break;
        }
        for pid in left {
            if let Some(p) = rustix::process::Pid::from_raw(pid) {
                let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// Whether another process has a file or its working directory under
/// `mnt` (from /proc; this process's own FUSE device is not under it).
fn mount_in_use(mnt: &Path) -> bool {
    let me = std::process::id().to_string();
    fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            let n = e.file_name();
            let n = n.to_string_lossy();
            n.bytes().all(|b| b.is_ascii_digit()) && n != me.as_str()
        })
        .any(|e| {
            let p = e.path();
            let under = |l: PathBuf| l.starts_with(mnt);
            fs::read_link(p.join("cwd")).is_ok_and(under)
                || fs::read_dir(p.join("fd"))
                    .into_iter()
                    .flatten()
                    .flatten()
                    .any(|f| fs::read_link(f.path()).is_ok_and(under))
        })
}

/// Mounts the tree and starts PostgreSQL; returns once it accepts
/// connections. The caller is in a private mount namespace.
pub fn start(
    dir: &Path,
    listen: &str,
    limit: Duration,
    protector: &dyn atrest_crypto::KeyProtector,
    limits: &Limits,
) -> Result<Running, crate::resource::ResourceError> {
    let config = resource::load_config(dir)?;
    let pg = pg_of(&config)?.clone();
    split_listen(listen)?;
    // Before the port check: a killed predecessor's PostgreSQL holds it.
    let killed = stop_stale_postgres(&dir.join(MOUNT_SUBDIR).join(PGDATA), &pg);
    // A killed process closes its sockets on its way out: give it time.
    let wait = Instant::now() + Duration::from_secs(if killed { 15 } else { 0 });
    while std::net::TcpListener::bind(listen).is_err() && Instant::now() < wait {
        std::thread::sleep(Duration::from_millis(50));
    }
    if std::net::TcpListener::bind(listen).is_err() {
        return Err(PostgresError::PortInUse {
            listen: listen.into(),
        }
        .into());
    }
    let settings = backup::archive_settings(dir, &config)?;
    let mounted = mount(dir, protector)?;
    let pgdata = dir.join(MOUNT_SUBDIR).join(PGDATA);
    if let Err(e) = write_auth(&pgdata, &config, &pg, &pg.admin_user) {
        let _ = mounted.session.umount_and_join();
        return Err(e.into());
    }
    let child = match spawn_postgres(dir, &pg, listen, limits, &settings) {
        Ok(c) => c,
        Err(e) => {
            let _ = mounted.session.umount_and_join();
            return Err(e);
        }
    };
    let mut running = Running {
        child,
        session: Some(mounted.session),
        tree: Some(mounted.tree),
        fs_stats: mounted.stats,
        pg,
        dir: dir.to_path_buf(),
        listen: listen.to_string(),
        limits: limits.clone(),
        settings,
    };
    if let Err(e) = running.wait_ready(limit) {
        let _ = running.stop(Duration::from_secs(5));
        return Err(e);
    }
    Ok(running)
}

/// The server's limits as PostgreSQL settings (`-c`, over postgresql.conf;
/// a session's own `SET` still wins). `shutdown_grace_ms` and
/// `max_message_bytes` are the sqlite engine's: PostgreSQL has no such
/// setting (its stop is a fast shutdown).
pub fn limit_settings(l: &Limits) -> Vec<String> {
    vec![
        format!("max_connections={}", l.max_connections),
        format!("statement_timeout={}", l.statement_timeout_ms),
        format!(
            "idle_in_transaction_session_timeout={}",
            l.idle_in_transaction_session_timeout_ms
        ),
        format!("idle_session_timeout={}", l.idle_session_timeout_ms),
        format!("lock_timeout={}", l.lock_timeout_ms),
        // PostgreSQL takes 1 to 600 seconds.
        format!(
            "authentication_timeout={}s",
            (l.authentication_timeout_ms / 1000).clamp(1, 600)
        ),
    ]
}

fn spawn_postgres(
    dir: &Path,
    pg: &PostgresConfig,
    listen: &str,
    limits: &Limits,
    settings: &[String],
) -> Result<Child, crate::resource::ResourceError> {
    let (uid, gid) = os_ids(&pg.os_user)?;
    let (host, port) = split_listen(listen)?;
    let mnt = dir.join(MOUNT_SUBDIR);
    let pgdata = mnt.join(PGDATA);
    let _ = fs::remove_file(pgdata.join("postmaster.pid"));
    let run = dir.join(RUN_SUBDIR);
    mkdir_owned(&run, uid, gid)?;
    // The socket and its lock file of a postmaster that was killed (every
    // process of this server's PostgreSQL is gone by now): PostgreSQL
    // refuses to start over a lock file whose PID was reused.
    for e in fs::read_dir(&run).into_iter().flatten().flatten() {
        if e.file_name().to_string_lossy().starts_with(".s.PGSQL.") {
            let _ = fs::remove_file(e.path());
        }
    }
    let tmp = mnt.join("tmp");
    mkdir_owned(&tmp, uid, gid)?;
    let mut cmd = Command::new(pg.bin_dir.join("postgres"));
    cmd.arg("-D")
        .arg(&pgdata)
        .arg("-c")
        .arg(format!("listen_addresses={host}"))
        .arg("-c")
        .arg(format!("port={port}"))
        .arg("-c")
        .arg(format!("unix_socket_directories={}", run.display()));
    for setting in limit_settings(limits).iter().chain(settings) {
        cmd.arg("-c").arg(setting);
    }
    cmd.uid(uid)
        .gid(gid)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("TMPDIR", &tmp)
        .env("LANG", "C.UTF-8")
        .current_dir(&tmp)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    Ok(cmd.spawn().map_err(|e| PostgresError::Command {
        what: "starting postgres".into(),
        detail: e.to_string(),
    })?)
}

/// A stopped postgres-engine server's tree, for a key switch made while it
/// does not run: the same rewrap as a running one, without a mount.
pub struct StoppedTree {
    dir: PathBuf,
    protector: std::sync::Mutex<Option<std::sync::Arc<dyn atrest_crypto::KeyProtector>>>,
}

impl StoppedTree {
    /// Proves the tree opens with the keys `config` names now (as opening
    /// the sqlite engine's databases does) before anything is recorded:
    /// a switch away from a key that is lost (purged) fails here, saying
    /// why, and changes nothing.
    pub fn open(dir: &Path, config: &ServerConfig) -> Result<Self, String> {
        let access = match &config.encryption.customer_key {
            Some(ck) => Some(crate::keys::vault_access(dir, config, &ck.login, &ck.key)?),
            None => None,
        };
        let protector = crate::keys::engine_protector(config, access.as_ref())?;
        let infra = infra_keystore(config).map_err(|e| e.to_string())?;
        atrest_fs::RootKey::open(&dir.join(CIPHER_SUBDIR), protector.as_ref(), infra.as_ref())
            .map_err(|e| format!("the tree's keys do not open: {e}"))?;
        Ok(StoppedTree {
            dir: dir.to_path_buf(),
            protector: std::sync::Mutex::new(Some(protector)),
        })
    }
}

/// The tree of a stopped server, opened with the keys its configuration
/// names (for what works without a mount: verifying backups).
pub fn offline_tree(dir: &Path, config: &ServerConfig) -> Result<atrest_fs::Tree, String> {
    let access = match &config.encryption.customer_key {
        Some(ck) => Some(crate::keys::vault_access(dir, config, &ck.login, &ck.key)?),
        None => None,
    };
    let protector = crate::keys::engine_protector(config, access.as_ref())?;
    let infra = infra_keystore(config).map_err(|e| e.to_string())?;
    let cipher = dir.join(CIPHER_SUBDIR);
    let root = atrest_fs::RootKey::open(&cipher, protector.as_ref(), infra.as_ref())
        .map_err(|e| format!("the tree's keys do not open: {e}"))?;
    Ok(atrest_fs::AtrestFs::new(cipher, root, atrest_fs::SlotPolicy::Postgres).tree())
}

impl crate::keys::Rewrap for StoppedTree {
    fn set_protector(
        &self,
        protector: std::sync::Arc<dyn atrest_crypto::KeyProtector>,
    ) -> Result<(), String> {
        *self.protector.lock().expect("protector") = Some(protector);
        Ok(())
    }

    fn rewrap_every(&self, _dir: &Path, config: &ServerConfig) -> Result<usize, String> {
        let protector = self
            .protector
            .lock()
            .expect("protector")
            .clone()
            .ok_or("no protector set")?;
        let cipher = self.dir.join(CIPHER_SUBDIR);
        let infra = infra_keystore(config).map_err(|e| e.to_string())?;
        let root = atrest_fs::RootKey::open(&cipher, protector.as_ref(), infra.as_ref())
            .map_err(|e| e.to_string())?;
        let tree = atrest_fs::AtrestFs::new(cipher, root, atrest_fs::SlotPolicy::Postgres).tree();
        tree.rewrap(protector.as_ref()).map_err(|e| e.to_string())?;
        backup::rewrap_repository(&self.dir, config, &tree)?;
        Ok(1)
    }
}
