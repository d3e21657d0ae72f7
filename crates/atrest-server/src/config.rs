//! `server.json`: every setting of a server, as data only (serde). The
//! modules that act on a setting import it from here; nothing here calls
//! them.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::cmk::{KeyUrl, VaultLogin};

/// Who may connect without TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum PlaintextPolicy {
    /// Plaintext only from loopback addresses (the default).
    #[default]
    Loopback,
    /// TLS is required from everyone.
    Never,
    /// Plaintext from anywhere (not recommended: passwords are SCRAM, but
    /// data is not protected in transit).
    Always,
}

/// Limits and timeouts; all can be overridden at start.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct Limits {
    pub max_connections: usize,
    /// 0: none. Per session, `SET statement_timeout` overrides it.
    pub statement_timeout_ms: u64,
    /// Sessions idle inside a transaction longer than this are ended (0: never).
    pub idle_in_transaction_session_timeout_ms: u64,
    /// Sessions idle outside a transaction longer than this are ended (0: never).
    pub idle_session_timeout_ms: u64,
    /// How long a writer waits for the write lock before failing with 55P03.
    pub lock_timeout_ms: u64,
    /// On SIGTERM: how long open transactions get to finish before they
    /// are rolled back.
    pub shutdown_grace_ms: u64,
    /// Largest message a client may send (a query string, a Bind).
    pub max_message_bytes: usize,
    /// Time allowed from connect to authenticated.
    pub authentication_timeout_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 100,
            statement_timeout_ms: 0,
            idle_in_transaction_session_timeout_ms: 600_000,
            idle_session_timeout_ms: 0,
            lock_timeout_ms: 30_000,
            shutdown_grace_ms: 10_000,
            max_message_bytes: 64 << 20,
            authentication_timeout_ms: 60_000,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IdentityInfo {
    /// The identity's id, to be granted key permissions in the vault.
    pub client_id: String,
    /// Its certificate (public), relative to the server directory.
    pub certificate: PathBuf,
    /// SHA-256 of the certificate (DER), hex.
    pub thumbprint_sha256: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EncryptionConfig {
    /// `service-managed` (issue: customer-managed comes with the vault).
    pub scenario: String,
    /// The service KEK reference (`service:<hex>`) in `keystore_dir`.
    pub service_key: String,
    pub keystore_dir: PathBuf,
    /// Infrastructure double encryption; fixed at create.
    pub infrastructure_encryption: bool,
    /// The infrastructure layer's own keystore (when the layer is on).
    #[serde(default)]
    pub infra_keystore_dir: Option<PathBuf>,
    /// The customer-managed key protecting the DEKs, if one is set.
    #[serde(default)]
    pub customer_key: Option<CustomerKeyConfig>,
    /// Protectors whose wrappings may still be on disk: set while a
    /// rewrap (key switch or rotation) runs; empty once it completed.
    #[serde(default)]
    pub rewrap_from: Vec<String>,
}

/// A customer-managed key and how the server reaches it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CustomerKeyConfig {
    /// The key, pinned to a version.
    pub key: KeyUrl,
    pub login: VaultLogin,
    pub since: String,
}

/// The key monitor of a server with a customer-managed key.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct MonitorConfig {
    /// How often access to the key is checked (at most 600 s).
    pub interval_ms: u64,
    /// How long the vault may be unreachable before the server goes
    /// Inaccessible. A refusal has no grace.
    pub outage_grace_ms: u64,
    /// Return to Ready by itself once the key is accessible again.
    pub auto_revalidate: bool,
}

impl Default for MonitorConfig {
    fn default() -> Self {
        MonitorConfig {
            interval_ms: 30_000,
            outage_grace_ms: 120_000,
            auto_revalidate: false,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TlsConfig {
    /// Certificate chain (PEM), relative to the server directory or absolute.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The local CA that signed a generated certificate (give it to clients
    /// as `sslrootcert`); absent for operator-supplied certificates.
    pub ca: Option<PathBuf>,
}

/// The database engine beneath a server.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    /// atrest's own encrypted SQLite engine behind the PostgreSQL protocol.
    #[default]
    Sqlite,
    /// Real PostgreSQL on an atrest-fs mount (`crate::postgres`).
    Postgres,
}

impl std::fmt::Display for EngineKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            EngineKind::Sqlite => "sqlite",
            EngineKind::Postgres => "postgres",
        })
    }
}

/// `server.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServerConfig {
    pub format: u32,
    pub name: String,
    #[serde(default)]
    pub engine: EngineKind,
    /// The postgres engine's binaries and OS user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postgres: Option<PostgresConfig>,
    pub server_id: String,
    pub created: String,
    pub identity: IdentityInfo,
    pub encryption: EncryptionConfig,
    pub tls: TlsConfig,
    pub allow_plaintext: PlaintextPolicy,
    pub limits: Limits,
    pub default_listen: String,
    #[serde(default)]
    pub monitor: MonitorConfig,
    /// URLs that get an HTTP POST (JSON) on every state change.
    #[serde(default)]
    pub webhooks: Vec<String>,
    /// Where backups and the WAL archive go, and how long they are kept.
    #[serde(default)]
    pub backup: BackupConfig,
    /// The online DEK rotation's throttle and automatic trigger.
    #[serde(default)]
    pub dek_rotation: DekRotationConfig,
    /// Set on a read replica: the server it follows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica: Option<ReplicaConfig>,
}

/// `server.json`'s `replica`: what this server follows.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReplicaConfig {
    /// The source's PostgreSQL address, HOST:PORT.
    pub source: String,
    pub source_name: String,
    pub source_server_id: String,
    /// The source server's directory, when it is on this machine (its
    /// address is read from its state at each reconnect).
    pub source_dir: Option<PathBuf>,
    /// The CA that signed the source's TLS certificate (PEM), relative to
    /// the server directory.
    pub source_ca: PathBuf,
    /// The replication token (0600), relative to the server directory.
    pub token_file: PathBuf,
    /// The keys the source's segments are wrapped under, besides ours.
    pub source_service_key: Option<String>,
    pub source_keystore_dir: PathBuf,
    pub source_infra_key: Option<String>,
    pub source_infra_keystore_dir: Option<PathBuf>,
}

/// `dek_rotation` in server.json.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct DekRotationConfig {
    /// The most pages re-sealed per second (the rotation's throttle).
    pub pages_per_second: u64,
    /// A database whose DEK (or its WAL's) has sealed this many units is
    /// rotated on its own; see docs/CRYPTO.md for the limit it keeps under.
    pub auto_at_seals: u64,
}

impl Default for DekRotationConfig {
    fn default() -> Self {
        DekRotationConfig {
            pages_per_second: 2000,
            auto_at_seals: atrest_crypto::SEAL_USAGE_WARN,
        }
    }
}

/// Backup settings in `server.json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct BackupConfig {
    /// The repository (default `DIR/backups`).
    pub dir: Option<PathBuf>,
    /// Keep at most this many backups (the newest).
    pub retain_count: Option<usize>,
    /// Delete backups older than this many days (the newest is always kept).
    pub retain_days: Option<u64>,
}

/// Where PostgreSQL is and who runs it (in `server.json`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PostgresConfig {
    pub bin_dir: PathBuf,
    pub os_user: String,
    /// The cluster's superuser (the server's admin), which the server
    /// itself connects as over the local socket (peer authentication of
    /// root only) for backups.
    #[serde(default = "default_admin_user")]
    pub admin_user: String,
}

fn default_admin_user() -> String {
    "atrest".into()
}
