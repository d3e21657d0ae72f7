//! The server resource: a directory that holds one server's configuration,
//! identity, TLS certificate, roles, state and databases.
//!
//! ```text
//! DIR/server.json      configuration, fixed at create except limits (no secrets)
//! DIR/state.json       machine-readable state, last change and its reason
//! DIR/activity.log     JSON lines: every state change and why
//! DIR/roles.json       SCRAM verifiers (0600; never passwords)
//! DIR/identity/        the server's identity for the key vault (key 0600)
//! DIR/tls/             server certificate chain, key (0600), local CA
//! DIR/data/            the encrypted engine: NAME.db per database
//! DIR/server.lock      held (flock) by the running server
//! ```
//!
//! The service key that wraps the databases' DEKs lives in a keystore
//! outside DIR (a copy of DIR does not carry its key).

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use atrest_keystore::{Keystore, ServiceKeyId};
use atrest_storage::{Engine, EngineOptions};
use aws_lc_rs::{digest, rand};
use serde::{Deserialize, Serialize};

use crate::config::{
    EncryptionConfig, EngineKind, IdentityInfo, Limits, MonitorConfig, PlaintextPolicy,
    ServerConfig, TlsConfig,
};
use crate::scram::{ScramVerifier, DEFAULT_ITERATIONS};

pub const CONFIG_FILE: &str = "server.json";
pub const STATE_FILE: &str = "state.json";
pub const ACTIVITY_LOG: &str = "activity.log";
pub const ROLES_FILE: &str = "roles.json";
pub const LOCK_FILE: &str = "server.lock";
pub const DATA_SUBDIR: &str = "data";
/// The postgres engine's ciphertext tree (atrest-fs; see `crate::postgres`).
pub const CIPHER_SUBDIR: &str = "pgfs";
pub const INITIAL_PASSWORD_FILE: &str = "initial-admin-password";
/// The database every server starts with.
pub const DEFAULT_DATABASE: &str = "postgres";

/// Everything that can go wrong managing a server resource.
#[derive(Debug, thiserror::Error)]
pub enum ResourceError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("{path} is not an atrest server directory (no {CONFIG_FILE}); create one with `atrest server create`")]
    NotAServer { path: PathBuf },
    #[error("the server in {path} is running (pid {pid}); stop it first (SIGTERM)")]
    Running { path: PathBuf, pid: String },
    #[error("{path}: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error(transparent)]
    Storage(#[from] atrest_storage::StorageError),
    #[error(transparent)]
    Keystore(#[from] atrest_keystore::KeystoreError),
    #[error("TLS: {0}")]
    Tls(String),
    /// An engine's own failure (PostgreSQL not installed, initdb, ...).
    #[error(transparent)]
    Engine(Box<dyn std::error::Error + Send + Sync>),
}

fn io(path: &Path, source: std::io::Error) -> ResourceError {
    ResourceError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl ServerConfig {
    pub fn save(&self, dir: &Path) -> Result<(), ResourceError> {
        write_atomic(
            &dir.join(CONFIG_FILE),
            &serde_json::to_vec_pretty(self).expect("serializable"),
            0o644,
        )
    }
}

/// A server's lifecycle state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum State {
    /// Created or cleanly shut down.
    Stopped,
    Starting,
    /// Serving connections.
    Ready,
    /// Shutting down: no new connections, open transactions finishing.
    Stopping,
    /// Being deleted.
    Dropping,
    /// The customer-managed key cannot be used: keys zeroized, every
    /// connection refused; only revalidation or delete.
    Inaccessible,
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self:?}")
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Transition {
    pub state: State,
    pub at: String,
    pub reason: String,
}

/// `state.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StateRecord {
    pub state: State,
    pub since: String,
    pub reason: String,
    pub pid: Option<u32>,
    /// Where the running server listens (PostgreSQL protocol).
    pub listen: Option<String>,
    /// Where it serves /metrics and /status.
    pub metrics: Option<String>,
    /// The last transitions, oldest first.
    pub history: Vec<Transition>,
}

const HISTORY_KEPT: usize = 50;

pub fn now_rfc3339() -> String {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    atrest_vault::timefmt::rfc3339(d.as_secs() as i64, d.subsec_millis())
}

fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    rand::fill(&mut b).expect("system RNG");
    hex::encode(b)
}

/// A random (version 4) UUID.
pub fn uuid() -> String {
    let mut b = [0u8; 16];
    rand::fill(&mut b).expect("system RNG");
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// Writes `bytes` to `path` atomically and durably with `mode`.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), ResourceError> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(|e| io(&tmp, e))?;
    f.write_all(bytes).map_err(|e| io(&tmp, e))?;
    f.sync_all().map_err(|e| io(&tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| io(path, e))?;
    if let Some(dir) = path.parent() {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io(dir, e))?;
    }
    Ok(())
}

fn private_dir(path: &Path) -> Result<(), ResourceError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(|e| io(path, e))
}

/// Server names follow Azure's rule: 3-63 lowercase letters, digits and
/// hyphens, not starting or ending with a hyphen.
pub fn validate_name(name: &str) -> Result<(), ResourceError> {
    let ok = (3..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(ResourceError::Invalid(format!(
            "invalid server name {name:?}: use 3-63 lowercase letters, digits and hyphens, not starting or ending with a hyphen"
        )))
    }
}

/// Database names: 1-63 letters, digits, '_' (PostgreSQL identifiers,
/// and safe as file names).
pub fn validate_database_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && !name.as_bytes()[0].is_ascii_digit();
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid database name {name:?}: use 1-63 letters, digits and '_', starting with a letter or '_'"
        ))
    }
}

/// Options of `atrest server create`.
#[derive(Debug, Clone, Default)]
pub struct CreateOptions {
    pub name: String,
    pub dir: PathBuf,
    pub admin_user: String,
    /// `None`: generate one and store it in `DIR/initial-admin-password`.
    pub admin_password: Option<zeroize::Zeroizing<String>>,
    pub keystore_dir: Option<PathBuf>,
    /// Operator-supplied certificate chain and key (PEM); generated if absent.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Extra host names for a generated certificate.
    pub hostnames: Vec<String>,
    pub allow_plaintext: PlaintextPolicy,
    pub limits: Limits,
    pub default_listen: Option<String>,
    pub infrastructure_encryption: bool,
    /// The infrastructure layer's keystore (default: next to the service
    /// keystore, never the same directory).
    pub infra_keystore_dir: Option<PathBuf>,
    pub engine: EngineKind,
    /// The postgres engine: its binaries and OS user (found by
    /// [`crate::config::PostgresConfig::find`]).
    pub postgres: Option<crate::config::PostgresConfig>,
}

/// What create made.
#[derive(Debug, Clone, Serialize)]
pub struct Created {
    pub config: ServerConfig,
    /// Where the generated admin password was stored, if one was generated.
    pub admin_password_file: Option<PathBuf>,
}

/// Creates a server resource in an empty or absent directory.
/// An engine's own step of a create, run once `server.json` is written:
/// `(dir, config, admin user, admin password)`. The postgres engine's is
/// `crate::postgres::initialize` (initdb on its mount); see
/// `crate::provision::create`, which picks it.
pub type EngineInit<'a> = &'a dyn Fn(&Path, &ServerConfig, &str, &str) -> Result<(), ResourceError>;

/// Creates the server directory; `engine_init` adds the engine's own part.
pub fn create(opts: &CreateOptions, engine_init: EngineInit) -> Result<Created, ResourceError> {
    validate_name(&opts.name)?;
    validate_database_name(&opts.admin_user).map_err(|_| {
        ResourceError::Invalid(format!(
            "invalid admin user name {:?}: use letters, digits and '_'",
            opts.admin_user
        ))
    })?;
    let dir = &opts.dir;
    if dir.exists() {
        let mut entries = fs::read_dir(dir).map_err(|e| io(dir, e))?;
        if entries.next().is_some() {
            return Err(ResourceError::Invalid(format!(
                "{} is not empty; a server is created in a new or empty directory",
                dir.display()
            )));
        }
    }
    private_dir(dir)?;
    let dir = dir.canonicalize().map_err(|e| io(dir, e))?;
    let result = create_in(&dir, opts, engine_init);
    if result.is_err() {
        // Leave nothing half-made behind (the directory was empty), and no
        // key made for it in the keystores.
        if let Ok(config) = load_config(&dir) {
            if let Err(e) = destroy_keys(&dir, &config) {
                tracing::warn!(error = %e, "removing the keys of a server whose create failed");
            }
        }
        let _ = fs::remove_dir_all(&dir);
    }
    result
}

fn create_in(
    dir: &Path,
    opts: &CreateOptions,
    engine_init: EngineInit,
) -> Result<Created, ResourceError> {
    let keystore_dir = match &opts.keystore_dir {
        Some(d) => d.clone(),
        None => Keystore::default_dir()?,
    };
    // An absolute, normalized path: the configuration must keep naming
    // the same keystore whatever the working directory of `start`.
    Keystore::open(&keystore_dir)?;
    let keystore_dir = keystore_dir
        .canonicalize()
        .map_err(|e| io(&keystore_dir, e))?;

    if keystore_dir.starts_with(dir) {
        return Err(ResourceError::Invalid(
            "the keystore must not be inside the server directory it protects (a copy of the directory would carry its key); use --keystore elsewhere".into(),
        ));
    }

    // TLS.
    let tls_dir = dir.join("tls");
    private_dir(&tls_dir)?;
    let tls =
        match (&opts.tls_cert, &opts.tls_key) {
            (Some(cert), Some(key)) => {
                let chain = fs::read(cert).map_err(|e| io(cert, e))?;
                let keypem = zeroize::Zeroizing::new(fs::read(key).map_err(|e| io(key, e))?);
                atrest_vault::tls::server_config_pem(&chain, &keypem)
                    .map_err(|e| ResourceError::Tls(e.to_string()))?;
                fs::copy(cert, tls_dir.join("server.crt")).map_err(|e| io(cert, e))?;
                write_atomic(&tls_dir.join("server.key"), &keypem, 0o600)?;
                TlsConfig {
                    cert: "tls/server.crt".into(),
                    key: "tls/server.key".into(),
                    ca: None,
                }
            }
            (None, None) => {
                let g = atrest_vault::tls::generate_named(
                    &format!("atrest server {}", opts.name),
                    &opts.hostnames,
                )
                .map_err(|e| ResourceError::Tls(e.to_string()))?;
                write_atomic(&tls_dir.join("server.crt"), g.chain_pem.as_bytes(), 0o644)?;
                write_atomic(&tls_dir.join("server.key"), g.key_pem.as_bytes(), 0o600)?;
                write_atomic(&tls_dir.join("ca.crt"), g.ca_pem.as_bytes(), 0o644)?;
                TlsConfig {
                    cert: "tls/server.crt".into(),
                    key: "tls/server.key".into(),
                    ca: Some("tls/ca.crt".into()),
                }
            }
            _ => return Err(ResourceError::Invalid(
                "give both --tls-cert and --tls-key, or neither (a certificate is then generated)"
                    .into(),
            )),
        };

    // Identity for the key vault: a key pair whose private half never
    // leaves DIR/identity, and a self-signed certificate for the vault
    // administrator to register.
    let id_dir = dir.join("identity");
    private_dir(&id_dir)?;
    let client_id = uuid();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| ResourceError::Tls(e.to_string()))?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())
        .map_err(|e| ResourceError::Tls(e.to_string()))?;
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(
        rcgen::DnType::CommonName,
        format!("atrest-server:{}", opts.name),
    );
    dn.push(rcgen::DnType::OrganizationalUnitName, client_id.clone());
    params.distinguished_name = dn;
    let cert = params
        .self_signed(&key)
        .map_err(|e| ResourceError::Tls(e.to_string()))?;
    write_atomic(
        &id_dir.join("identity.key"),
        key.serialize_pem().as_bytes(),
        0o600,
    )?;
    write_atomic(&id_dir.join("identity.crt"), cert.pem().as_bytes(), 0o644)?;
    let thumbprint = hex::encode(digest::digest(&digest::SHA256, cert.der()).as_ref());

    // Roles.
    let generated;
    let password = match &opts.admin_password {
        Some(p) => {
            if p.is_empty() {
                return Err(ResourceError::Invalid(
                    "the admin password file is empty".into(),
                ));
            }
            generated = false;
            p.clone()
        }
        None => {
            generated = true;
            zeroize::Zeroizing::new(random_hex(16))
        }
    };
    let mut roles = Roles {
        mock_key: random_hex(32),
        roles: BTreeMap::new(),
    };
    roles.roles.insert(
        opts.admin_user.clone(),
        Role {
            verifier: ScramVerifier::from_password(&password, DEFAULT_ITERATIONS).encode(),
            superuser: true,
        },
    );
    roles.save(dir)?;
    let admin_password_file = if generated {
        let p = dir.join(INITIAL_PASSWORD_FILE);
        write_atomic(&p, format!("{}\n", password.as_str()).as_bytes(), 0o600)?;
        Some(p)
    } else {
        None
    };

    // The encrypted engine: its service key, and the default database
    // (WAL mode is recorded in the database file).
    let infra_keystore_dir = if opts.infrastructure_encryption {
        let d = match &opts.infra_keystore_dir {
            Some(d) => d.clone(),
            None => atrest_keystore::InfraKeystore::default_dir()?,
        };
        if d.starts_with(dir) {
            return Err(ResourceError::Invalid(
                "the infrastructure keystore must not be inside the server directory".into(),
            ));
        }
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&d)
            .map_err(|e| io(&d, e))?;
        Some(d.canonicalize().map_err(|e| io(&d, e))?)
    } else {
        None
    };
    let service_key = match opts.engine {
        EngineKind::Sqlite => {
            let data_dir = dir.join(DATA_SUBDIR);
            let engine = Engine::open(&EngineOptions {
                data_dir: data_dir.clone(),
                keystore_dir: Some(keystore_dir.clone()),
                infrastructure_encryption: Some(opts.infrastructure_encryption),
                infra_keystore_dir: infra_keystore_dir.clone(),
            })?;
            let service_key = engine
                .info()
                .map(|i| i.service_key.clone())
                .ok_or_else(|| {
                    ResourceError::Invalid("the engine recorded no service key".into())
                })?;
            {
                let conn = engine.connect(DEFAULT_DATABASE)?;
                conn.pragma_update(None, "journal_mode", "wal")
                    .map_err(atrest_storage::StorageError::from_sqlite)?;
            }
            drop(engine);
            service_key
        }
        EngineKind::Postgres => {
            // The infrastructure layer (when on) gets its master key when
            // the filesystem's tree is created (postgres::initialize).
            let ks = Keystore::open(&keystore_dir)?;
            ks.create_service_key()?.kek_ref().key_id
        }
    };

    let config = ServerConfig {
        format: 1,
        name: opts.name.clone(),
        engine: opts.engine,
        postgres: opts.postgres.clone().map(|mut p| {
            p.admin_user = opts.admin_user.clone();
            p
        }),
        server_id: uuid(),
        created: now_rfc3339(),
        identity: IdentityInfo {
            client_id,
            certificate: "identity/identity.crt".into(),
            thumbprint_sha256: thumbprint,
        },
        encryption: EncryptionConfig {
            scenario: "service-managed".into(),
            service_key,
            keystore_dir,
            infrastructure_encryption: opts.infrastructure_encryption,
            infra_keystore_dir,
            customer_key: None,
            rewrap_from: vec![],
        },
        tls,
        allow_plaintext: opts.allow_plaintext,
        limits: opts.limits.clone(),
        default_listen: opts
            .default_listen
            .clone()
            .unwrap_or_else(|| "127.0.0.1:5432".into()),
        monitor: MonitorConfig::default(),
        webhooks: vec![],
        backup: Default::default(),
        dek_rotation: Default::default(),
        replica: None,
    };
    write_atomic(
        &dir.join(CONFIG_FILE),
        &serde_json::to_vec_pretty(&config).expect("serializable"),
        0o644,
    )?;
    engine_init(dir, &config, &opts.admin_user, &password)?;
    set_state(dir, State::Stopped, "created", None)?;
    Ok(Created {
        config,
        admin_password_file,
    })
}

/// The server's TLS certificate and key (`server.json`'s `tls`) as a
/// rustls server configuration with no ALPN yet, and the certificate chain
/// (PEM) it came from. Errors name the file.
pub fn tls_server_config(
    dir: &Path,
    config: &ServerConfig,
) -> Result<(rustls::ServerConfig, Vec<u8>), String> {
    let cert = resolve(dir, &config.tls.cert);
    let key = resolve(dir, &config.tls.key);
    let chain = fs::read(&cert).map_err(|e| format!("{}: {e}", cert.display()))?;
    let keypem =
        zeroize::Zeroizing::new(fs::read(&key).map_err(|e| format!("{}: {e}", key.display()))?);
    let cfg = atrest_vault::tls::server_config_pem(&chain, &keypem).map_err(|e| e.to_string())?;
    Ok((cfg, chain))
}

/// A role that may log in.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Role {
    /// `SCRAM-SHA-256$...` (PostgreSQL's verifier format).
    pub verifier: String,
    pub superuser: bool,
}

/// `roles.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Roles {
    /// Keys the fake SCRAM salts of unknown role names.
    pub mock_key: String,
    pub roles: BTreeMap<String, Role>,
}

impl Roles {
    pub fn load(dir: &Path) -> Result<Roles, ResourceError> {
        let path = dir.join(ROLES_FILE);
        let meta = fs::metadata(&path).map_err(|e| io(&path, e))?;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(ResourceError::Corrupt {
                path,
                reason: "readable by group or others; chmod 600 it".into(),
            });
        }
        let text = fs::read_to_string(&path).map_err(|e| io(&path, e))?;
        serde_json::from_str(&text).map_err(|e| ResourceError::Corrupt {
            path,
            reason: e.to_string(),
        })
    }

    pub fn save(&self, dir: &Path) -> Result<(), ResourceError> {
        write_atomic(
            &dir.join(ROLES_FILE),
            &serde_json::to_vec_pretty(self).expect("serializable"),
            0o600,
        )
    }

    pub fn set_password(&mut self, user: &str, password: &str) {
        let superuser = self.roles.get(user).map(|r| r.superuser).unwrap_or(false);
        self.roles.insert(
            user.to_string(),
            Role {
                verifier: ScramVerifier::from_password(password, DEFAULT_ITERATIONS).encode(),
                superuser,
            },
        );
    }
}

pub fn load_config(dir: &Path) -> Result<ServerConfig, ResourceError> {
    let path = dir.join(CONFIG_FILE);
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ResourceError::NotAServer {
                path: dir.to_path_buf(),
            })
        }
        Err(e) => return Err(io(&path, e)),
    };
    serde_json::from_str(&text).map_err(|e| ResourceError::Corrupt {
        path,
        reason: e.to_string(),
    })
}

/// Resolves a path from the configuration against the server directory.
pub fn resolve(dir: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        dir.join(p)
    }
}

pub fn load_state(dir: &Path) -> Result<StateRecord, ResourceError> {
    let path = dir.join(STATE_FILE);
    let text = fs::read_to_string(&path).map_err(|e| io(&path, e))?;
    serde_json::from_str(&text).map_err(|e| ResourceError::Corrupt {
        path,
        reason: e.to_string(),
    })
}

/// Where a running server can be reached (written into state.json).
#[derive(Debug, Clone, Default)]
pub struct Endpoints {
    pub pid: Option<u32>,
    pub listen: Option<String>,
    pub metrics: Option<String>,
}

/// Records a state change in state.json and the activity log.
pub fn set_state(
    dir: &Path,
    state: State,
    reason: &str,
    endpoints: Option<&Endpoints>,
) -> Result<StateRecord, ResourceError> {
    let at = now_rfc3339();
    let mut history = load_state(dir).map(|s| s.history).unwrap_or_default();
    history.push(Transition {
        state,
        at: at.clone(),
        reason: reason.to_string(),
    });
    if history.len() > HISTORY_KEPT {
        let drop_n = history.len() - HISTORY_KEPT;
        history.drain(..drop_n);
    }
    let ep = endpoints.cloned().unwrap_or_default();
    let record = StateRecord {
        state,
        since: at.clone(),
        reason: reason.to_string(),
        pid: ep.pid,
        listen: ep.listen,
        metrics: ep.metrics,
        history,
    };
    write_atomic(
        &dir.join(STATE_FILE),
        &serde_json::to_vec_pretty(&record).expect("serializable"),
        0o644,
    )?;
    log_activity(
        dir,
        &serde_json::json!({"time": at, "event": "state_change", "state": state, "reason": reason}),
    )?;
    tracing::info!(%state, reason, "server state changed");
    Ok(record)
}

/// Appends one JSON line to the activity log.
pub fn log_activity(dir: &Path, event: &serde_json::Value) -> Result<(), ResourceError> {
    let path = dir.join(ACTIVITY_LOG);
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(&path)
        .map_err(|e| io(&path, e))?;
    let mut line = serde_json::to_vec(event).expect("serializable");
    line.push(b'\n');
    f.write_all(&line).map_err(|e| io(&path, e))?;
    f.sync_data().map_err(|e| io(&path, e))
}

/// The running server's exclusive lock on its directory.
pub struct ServerLock {
    _file: File,
}

/// Takes the directory lock, or says which process holds it.
pub fn lock(dir: &Path) -> Result<ServerLock, ResourceError> {
    let path = dir.join(LOCK_FILE);
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(|e| io(&path, e))?;
    // flock(LOCK_EX | LOCK_NB): released when the process ends, however.
    if f.try_lock().is_err() {
        let pid = fs::read_to_string(&path)
            .unwrap_or_default()
            .trim()
            .to_string();
        return Err(ResourceError::Running {
            path: dir.to_path_buf(),
            pid: if pid.is_empty() {
                "unknown".into()
            } else {
                pid
            },
        });
    }
    f.set_len(0).map_err(|e| io(&path, e))?;
    write!(f, "{}", std::process::id()).map_err(|e| io(&path, e))?;
    Ok(ServerLock { _file: f })
}

/// Whether a server process holds the directory lock right now.
pub fn running_pid(dir: &Path) -> Option<String> {
    match lock(dir) {
        Ok(_released_on_drop) => None,
        Err(ResourceError::Running { pid, .. }) => Some(pid),
        Err(_) => None,
    }
}

/// The databases of a server (names).
pub fn databases(dir: &Path) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    if let Ok(rd) = fs::read_dir(dir.join(DATA_SUBDIR)) {
        for e in rd.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "db") {
                if let Some(stem) = p.file_stem().and_then(|s| s.to_str()) {
                    let size = e.metadata().map(|m| m.len()).unwrap_or(0);
                    out.push((stem.to_string(), size));
                }
            }
        }
    }
    out.sort();
    out
}

/// `atrest server status` as JSON.
pub fn status(dir: &Path) -> Result<serde_json::Value, ResourceError> {
    let config = load_config(dir)?;
    let mut state = load_state(dir)?;
    let pid = running_pid(dir);
    let mut note = None;
    if pid.is_none()
        && matches!(
            state.state,
            State::Ready | State::Starting | State::Stopping
        )
    {
        note = Some(format!(
            "state.json says {} but no server process holds the directory: the process ended without a clean shutdown; start it again",
            state.state
        ));
        state.listen = None;
        state.metrics = None;
    }
    // Resource health: the state with its reason, and the last failed key
    // check and key event from the activity log.
    let mut last_failed_check = serde_json::Value::Null;
    let mut last_key_event = serde_json::Value::Null;
    if let Ok(text) = fs::read_to_string(dir.join(ACTIVITY_LOG)) {
        for line in text.lines().rev() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            match v["event"].as_str() {
                Some("key_check_failed") if last_failed_check.is_null() => last_failed_check = v,
                Some("key_switched") if last_key_event.is_null() => last_key_event = v,
                _ => {}
            }
            if !last_failed_check.is_null() && !last_key_event.is_null() {
                break;
            }
        }
    }
    let effective = if note.is_some() {
        State::Stopped
    } else {
        state.state
    };
    let health = serde_json::json!({
        "available": effective == State::Ready,
        "summary": match effective {
            State::Ready => "Available".to_string(),
            State::Inaccessible => format!("Unavailable: the customer-managed key is inaccessible ({})", state.reason),
            other => format!("Unavailable: {other}"),
        },
        "last_failed_key_check": last_failed_check,
        "last_key_change": last_key_event,
    });
    // The running (or last) DEK rotation, as its worker recorded it.
    let dek_rotation = fs::read(dir.join("dek-rotation.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .map(|v| v["databases"].clone())
        .unwrap_or(serde_json::Value::Null);
    let dbs: Vec<_> = databases(dir)
        .into_iter()
        .map(|(n, size)| serde_json::json!({"name": n, "bytes": size}))
        .collect();
    Ok(serde_json::json!({
        "name": config.name,
        "server_id": config.server_id,
        "created": config.created,
        "state": if note.is_some() { State::Stopped } else { state.state },
        "since": state.since,
        "reason": state.reason,
        "note": note,
        "running_pid": pid,
        "listen": state.listen,
        "metrics": state.metrics,
        "encryption": {
            "scenario": config.encryption.scenario,
            "layers": if config.encryption.infrastructure_encryption {
                vec!["data: AES-256-GCM (AWS-LC), per-file DEK", "infrastructure: AEGIS-256X2 (libaegis), per-file key, own keystore"]
            } else {
                vec!["data: AES-256-GCM (AWS-LC), per-file DEK"]
            },
            "service_key": config.encryption.service_key,
            "keystore": config.encryption.keystore_dir,
            "infrastructure_encryption": config.encryption.infrastructure_encryption,
            "infra_keystore": config.encryption.infra_keystore_dir,
            "customer_key": config.encryption.customer_key.as_ref().map(|c| serde_json::json!({
                "key": c.key.kid(),
                "tenant": c.login.tenant,
                "since": c.since,
            })),
            "rewrap_in_progress_from": config.encryption.rewrap_from,
        },
        "identity": config.identity,
        "tls": {
            "certificate": resolve(dir, &config.tls.cert),
            "ca": config.tls.ca.as_ref().map(|c| resolve(dir, c)),
            "allow_plaintext": config.allow_plaintext,
        },
        "health": health,
        "databases": dbs,
        "dek_rotation": dek_rotation,
        "replica": config.replica.as_ref().map(|rc| serde_json::json!({
            "source": rc.source,
            "source_name": rc.source_name,
            "databases": load_lag(dir),
            "source_error": source_error(dir),
        })),
        "history": state.history,
    }))
}

/// A read replica's own files (`DIR/replica/`): positions, lag, and why it
/// cannot follow its source (`crate::replication` writes them; `status`
/// reads them).
pub const REPLICA_DIR: &str = "replica";

/// A JSON map of per-database entries in `DIR/replica/`.
pub(crate) fn load_map<T: serde::de::DeserializeOwned>(path: &Path) -> BTreeMap<String, T> {
    fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// Sets one database's entry of such a map. One writer per database but
/// several databases: read-modify-write under a process-wide lock.
pub(crate) fn save_entry<T: Serialize + serde::de::DeserializeOwned>(
    path: &Path,
    name: &str,
    value: &T,
) -> Result<(), String> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _g = LOCK.lock().expect("replica state lock");
    let mut all: BTreeMap<String, serde_json::Value> = load_map(path);
    all.insert(
        name.to_string(),
        serde_json::to_value(value).expect("serializable"),
    );
    write_atomic(
        path,
        &serde_json::to_vec_pretty(&all).expect("serializable"),
        0o600,
    )
    .map_err(|e| e.to_string())
}

/// What `status` shows of a replica, per database.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Lag {
    pub lag_bytes: u64,
    pub lag_seconds: f64,
    pub applied_commit_us: u64,
    pub transactions_applied: u64,
    pub last_error: Option<String>,
    pub updated_us: u64,
}

pub(crate) fn lag_path(dir: &Path) -> PathBuf {
    dir.join(REPLICA_DIR).join("lag.json")
}

pub fn load_lag(dir: &Path) -> BTreeMap<String, Lag> {
    load_map(&lag_path(dir))
}

pub(crate) fn save_lag(dir: &Path, name: &str, lag: &Lag) {
    // Only a report: a failed write is retried at the next round.
    let _ = save_entry(&lag_path(dir), name, lag);
}

pub(crate) fn source_error_path(dir: &Path) -> PathBuf {
    dir.join(REPLICA_DIR).join("source-error")
}

/// Why the replica is not (yet) under the source's customer key, or does
/// not have (or still has) a database the source created (or dropped).
pub fn source_error(dir: &Path) -> Option<String> {
    fs::read_to_string(source_error_path(dir)).ok()
}

/// Deletes a server: its databases, its service key (crypto-shredding
/// anything left, such as copies of the files), and its directory.
pub fn delete(dir: &Path) -> Result<(), ResourceError> {
    let config = load_config(dir)?;
    let _lock = lock(dir)?;
    set_state(dir, State::Dropping, "delete requested", None)?;
    destroy_keys(dir, &config)?;
    drop(_lock);
    fs::remove_dir_all(dir).map_err(|e| io(dir, e))
}

/// Destroys a server's keys: its infrastructure master key (every
/// version, overwritten first) and its service key, after removing its
/// data (crypto-shredding anything left, such as copies of the files).
fn destroy_keys(dir: &Path, config: &ServerConfig) -> Result<(), ResourceError> {
    let data = dir.join(DATA_SUBDIR);
    // The infrastructure master key (every version) goes with the server.
    let infra_key = match config.engine {
        EngineKind::Sqlite => fs::read_to_string(data.join("atrest.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v["infrastructure_key"].as_str().map(str::to_string)),
        EngineKind::Postgres => atrest_fs::infra_key_of(&dir.join(CIPHER_SUBDIR)),
    }
    .and_then(|k| atrest_keystore::InfraKeyId::parse(&k));
    if let (Some((id, _)), Some(ks_dir)) = (infra_key, &config.encryption.infra_keystore_dir) {
        let ks = atrest_keystore::InfraKeystore::open(ks_dir)?;
        for v in ks.versions(id)? {
            // Overwrite before unlinking, as for the service key.
            let path = ks.key_path(id, v);
            if let Ok(len) = fs::metadata(&path).map(|m| m.len()) {
                let _ = fs::write(&path, vec![0u8; len as usize]);
            }
            ks.remove_version(id, v)?;
        }
    }
    if data.exists() {
        fs::remove_dir_all(&data).map_err(|e| io(&data, e))?;
    }
    if let Some(id) = config
        .encryption
        .service_key
        .strip_prefix("service:")
        .and_then(ServiceKeyId::parse)
    {
        let ks = Keystore::open(&config.encryption.keystore_dir)?;
        ks.destroy_service_key(id)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sqlite-engine server (its files are made with the directory).
    fn create(o: &CreateOptions) -> Result<Created, ResourceError> {
        super::create(o, &|_, _, _, _| Ok(()))
    }

    fn opts(dir: &Path, ks: &Path) -> CreateOptions {
        CreateOptions {
            name: "test-server".into(),
            dir: dir.to_path_buf(),
            admin_user: "atrest".into(),
            keystore_dir: Some(ks.to_path_buf()),
            ..Default::default()
        }
    }

    #[test]
    fn create_status_delete() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("srv");
        let ks = t.path().join("ks");
        let created = create(&opts(&dir, &ks)).unwrap();
        let pw_file = created.admin_password_file.unwrap();
        assert_eq!(
            fs::metadata(&pw_file).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let pw = fs::read_to_string(&pw_file).unwrap();
        // The roles file holds a verifier, not the password.
        let roles_text = fs::read_to_string(dir.join(ROLES_FILE)).unwrap();
        assert!(!roles_text.contains(pw.trim()));
        assert!(roles_text.contains("SCRAM-SHA-256$4096:"));
        let st = status(&dir).unwrap();
        assert_eq!(st["state"], "Stopped");
        assert_eq!(st["reason"], "created");
        assert_eq!(st["databases"][0]["name"], "postgres");
        assert!(st["encryption"]["service_key"]
            .as_str()
            .unwrap()
            .starts_with("service:"));
        // A second create into the same directory is refused.
        assert!(matches!(
            create(&opts(&dir, &ks)),
            Err(ResourceError::Invalid(_))
        ));
        // While locked (running), delete is refused.
        let l = lock(&dir).unwrap();
        assert_eq!(
            running_pid(&dir).as_deref(),
            Some(std::process::id().to_string().as_str())
        );
        assert!(matches!(delete(&dir), Err(ResourceError::Running { .. })));
        drop(l);
        let key_files = || fs::read_dir(&ks).unwrap().count();
        assert_eq!(key_files(), 1);
        delete(&dir).unwrap();
        assert!(!dir.exists());
        assert_eq!(
            key_files(),
            0,
            "the service key is destroyed with the server"
        );
    }

    #[test]
    fn bad_names_and_half_made_servers() {
        for bad in ["ab", "Upper", "-x-", "a_b", &"x".repeat(64)] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
        assert!(validate_database_name("1db").is_err());
        assert!(validate_database_name("sales_2026").is_ok());
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("srv");
        let mut o = opts(&dir, &t.path().join("ks"));
        o.tls_cert = Some(t.path().join("missing.crt"));
        o.tls_key = Some(t.path().join("missing.key"));
        assert!(create(&o).is_err());
        assert!(!dir.exists(), "a failed create leaves nothing behind");
        // The keystore inside the server directory is refused (a copy of
        // the directory would carry its key).
        let mut o = opts(&dir, &dir.join("ks"));
        o.tls_cert = None;
        o.tls_key = None;
        let e = create(&o).unwrap_err();
        assert!(e.to_string().contains("keystore must not be inside"), "{e}");
    }

    #[test]
    fn state_history_is_kept_and_bounded() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("srv");
        create(&opts(&dir, &t.path().join("ks"))).unwrap();
        for i in 0..60 {
            set_state(&dir, State::Ready, &format!("r{i}"), None).unwrap();
        }
        let s = load_state(&dir).unwrap();
        assert_eq!(s.history.len(), HISTORY_KEPT);
        assert_eq!(s.history.last().unwrap().reason, "r59");
        let log = fs::read_to_string(dir.join(ACTIVITY_LOG)).unwrap();
        assert_eq!(log.lines().count(), 61);
        for line in log.lines() {
            serde_json::from_str::<serde_json::Value>(line).unwrap();
        }
    }
}
