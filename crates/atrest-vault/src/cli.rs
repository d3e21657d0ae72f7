//! `atrest vault ...`: run the server, administer it, verify its audit log,
//! benchmark it. Admin commands talk to a running vault over HTTPS with the
//! admin credential; `--data DIR` finds the URL, CA and credential there.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Subcommand};
use reqwest::Method;
use serde_json::{json, Value};

use crate::client::{AdminClient, ClientError};
use crate::error::VaultError;
use crate::store::Unseal;

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Vault(#[from] VaultError),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Usage(String),
}

#[derive(Debug, Args)]
pub struct VaultArgs {
    #[command(subcommand)]
    pub command: VaultCommand,
}

#[derive(Debug, Subcommand)]
pub enum VaultCommand {
    /// Run the vault server (HTTPS).
    Serve(ServeArgs),
    /// Re-seal the vault under a new unseal key or passphrase (vault stopped).
    Rekey {
        #[arg(long)]
        data: PathBuf,
        #[arg(long, conflicts_with = "passphrase_env")]
        unseal_key_file: Option<PathBuf>,
        #[arg(long)]
        passphrase_env: Option<String>,
        #[arg(long, conflicts_with = "new_passphrase_env")]
        new_unseal_key_file: Option<PathBuf>,
        #[arg(long)]
        new_passphrase_env: Option<String>,
    },
    /// Write a new random unseal key file (keep it outside the data directory).
    InitKey {
        #[arg(long)]
        out: PathBuf,
    },
    /// Manage identities (service principals, managed identities).
    #[command(subcommand)]
    Identity(IdentityCommand),
    /// Set an identity's key permissions (its access policy).
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Show or change the network firewall.
    #[command(subcommand)]
    Firewall(FirewallCommand),
    /// Delete locks on keys.
    #[command(subcommand)]
    Lock(LockCommand),
    /// Show or change vault properties (soft-delete retention, purge protection, RSA1_5).
    #[command(subcommand)]
    Props(PropsCommand),
    /// Audit log tools.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Key commands: import (as an identity), dependents (as admin).
    #[command(subcommand)]
    Key(KeyCommand),
    /// Move a --test-clock vault's clock forward.
    Clock {
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        advance_secs: i64,
    },
    /// Benchmark unwrapKey (RSA-OAEP-256) over HTTPS with concurrent clients.
    Bench(BenchArgs),
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Data directory (database, audit log, TLS files, admin credential).
    #[arg(long)]
    pub data: PathBuf,
    /// Address to listen on (loopback by default).
    #[arg(long, default_value = "127.0.0.1:8443")]
    pub listen: SocketAddr,
    /// File holding the 256-bit unseal key (hex), outside the data directory.
    #[arg(long, conflicts_with = "passphrase_env")]
    pub unseal_key_file: Option<PathBuf>,
    /// Environment variable holding an unseal passphrase instead.
    #[arg(long)]
    pub passphrase_env: Option<String>,
    /// Tenant id of a new vault (a random GUID if not given).
    #[arg(long)]
    pub tenant: Option<String>,
    /// Extra host names/IPs for the generated server certificate.
    #[arg(long = "hostname")]
    pub hostnames: Vec<String>,
    /// Operator-supplied certificate chain (PEM) instead of the generated one.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Let the admin API move the clock (tests only).
    #[arg(long)]
    pub test_clock: bool,
    /// Access token lifetime in seconds.
    #[arg(long, default_value_t = 3600)]
    pub token_lifetime_secs: i64,
    /// Admin credential file (created if missing); default DATA/admin-token.
    /// Keep it outside the data directory in production.
    #[arg(long)]
    pub admin_token_file: Option<PathBuf>,
}

/// Where the running vault is and how to authenticate as admin.
#[derive(Debug, Args, Clone)]
pub struct Conn {
    /// Data directory of the vault (reads vault.url, tls/ca.pem, admin-token).
    #[arg(long)]
    pub data: Option<PathBuf>,
    #[arg(long)]
    pub url: Option<String>,
    #[arg(long)]
    pub ca: Option<PathBuf>,
    #[arg(long)]
    pub admin_token_file: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum IdentityCommand {
    /// Create an identity; prints its client id and secret (shown once), or
    /// with --certificate only its client id and certificate thumbprint.
    Create {
        #[command(flatten)]
        conn: Conn,
        name: String,
        /// A managed identity (for a database server) instead of a service principal.
        #[arg(long)]
        managed: bool,
        /// Authenticate with this public certificate (PEM, EC P-256) instead
        /// of a generated secret; the private key stays with its owner.
        #[arg(long)]
        certificate: Option<PathBuf>,
        /// Use this client id (a GUID) instead of a generated one.
        #[arg(long)]
        client_id: Option<String>,
        /// Comma-separated key permissions, e.g. get,wrapKey,unwrapKey (or all).
        #[arg(long, value_delimiter = ',')]
        permissions: Vec<String>,
        /// Let this identity through the firewall (trusted service).
        #[arg(long)]
        bypass_firewall: bool,
    },
    List {
        #[command(flatten)]
        conn: Conn,
    },
    /// Delete an identity; its tokens stop working at once.
    Delete {
        #[command(flatten)]
        conn: Conn,
        client_id: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Replace an identity's key permissions.
    Set {
        #[command(flatten)]
        conn: Conn,
        client_id: String,
        #[arg(long, value_delimiter = ',')]
        permissions: Vec<String>,
        #[arg(long)]
        bypass_firewall: Option<bool>,
    },
}

#[derive(Debug, Subcommand)]
pub enum FirewallCommand {
    Show {
        #[command(flatten)]
        conn: Conn,
    },
    /// Set the default action and the allowed IP/CIDR rules.
    Set {
        #[command(flatten)]
        conn: Conn,
        /// allow or deny
        #[arg(long)]
        default: String,
        #[arg(long = "allow", value_delimiter = ',')]
        allow: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum LockCommand {
    /// Refuse deletion of a key until the lock is removed.
    Set {
        #[command(flatten)]
        conn: Conn,
        key: String,
    },
    Remove {
        #[command(flatten)]
        conn: Conn,
        key: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum PropsCommand {
    Show {
        #[command(flatten)]
        conn: Conn,
    },
    Set {
        #[command(flatten)]
        conn: Conn,
        #[arg(long)]
        retention_days: Option<u32>,
        /// Turn on purge protection (cannot be turned off).
        #[arg(long)]
        purge_protection: bool,
        #[arg(long)]
        allow_rsa15: Option<bool>,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// List the servers that depend on a key (all versions, or one), as admin.
    Dependents {
        #[command(flatten)]
        conn: Conn,
        name: String,
        #[arg(long)]
        version: Option<String>,
    },
    /// Remove a dependent registration as admin (the server will no longer
    /// hold back purge or disable of that key version).
    DependentRemove {
        #[command(flatten)]
        conn: Conn,
        name: String,
        version: String,
        dependent_id: String,
    },
    /// Import (BYOK) an RSA key from PKCS#8 PEM/DER or PKCS#12 (.pfx) as a
    /// new version of NAME, using an identity with the 'import' permission.
    Import {
        #[command(flatten)]
        conn: Conn,
        name: String,
        #[arg(long)]
        file: PathBuf,
        /// Environment variable holding the PKCS#12 password.
        #[arg(long)]
        password_env: Option<String>,
        #[arg(long)]
        client_id: String,
        /// Environment variable holding the identity's client secret.
        #[arg(long)]
        client_secret_env: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Check the hash chain (and, given the unseal key or passphrase, every
    /// line's MAC); exits 1 and names the first broken line.
    Verify {
        #[arg(long)]
        file: Option<PathBuf>,
        #[arg(long)]
        data: Option<PathBuf>,
        /// Check MACs with the vault's key file (needs --data for the check value).
        #[arg(long, requires = "data", conflicts_with = "passphrase_env")]
        unseal_key_file: Option<PathBuf>,
        #[arg(long, requires = "data")]
        passphrase_env: Option<String>,
    },
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub conn: Conn,
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    #[arg(long, default_value_t = 2048)]
    pub key_size: u32,
}

fn read_trim(p: &Path) -> Result<String, CliError> {
    Ok(std::fs::read_to_string(p)
        .map_err(|e| CliError::Usage(format!("cannot read {}: {e}", p.display())))?
        .trim()
        .to_string())
}

impl Conn {
    /// `(url, ca_pem, admin_token)`.
    pub fn resolve(&self) -> Result<(String, Vec<u8>, String), CliError> {
        let url = match (&self.url, &self.data) {
            (Some(u), _) => u.clone(),
            (None, Some(d)) => read_trim(&d.join("vault.url")).map_err(|_| {
                CliError::Usage(format!(
                    "no running vault found ({} missing); start it or pass --url",
                    d.join("vault.url").display()
                ))
            })?,
            _ => return Err(CliError::Usage("pass --data DIR or --url URL".into())),
        };
        let ca = match (&self.ca, &self.data) {
            (Some(c), _) => std::fs::read(c)?,
            (None, Some(d)) => std::fs::read(d.join("tls").join("ca.pem"))?,
            _ => return Err(CliError::Usage("pass --ca FILE".into())),
        };
        let tok = match (&self.admin_token_file, &self.data) {
            (Some(f), _) => read_trim(f)?,
            (None, Some(d)) => read_trim(&d.join("admin-token"))?,
            _ => return Err(CliError::Usage("pass --admin-token-file FILE".into())),
        };
        Ok((url, ca, tok))
    }
    /// `(url, ca_pem)` for data-plane use (no admin credential needed).
    pub fn resolve_data_plane(&self) -> Result<(String, Vec<u8>), CliError> {
        let url = match (&self.url, &self.data) {
            (Some(u), _) => u.clone(),
            (None, Some(d)) => read_trim(&d.join("vault.url"))?,
            _ => return Err(CliError::Usage("pass --data DIR or --url URL".into())),
        };
        let ca = match (&self.ca, &self.data) {
            (Some(c), _) => std::fs::read(c)?,
            (None, Some(d)) => std::fs::read(d.join("tls").join("ca.pem"))?,
            _ => return Err(CliError::Usage("pass --ca FILE".into())),
        };
        Ok((url, ca))
    }
    fn admin(&self) -> Result<AdminClient, CliError> {
        let (u, ca, t) = self.resolve()?;
        Ok(AdminClient::new(&u, &ca, &t)?)
    }
}

fn print(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

fn runtime() -> Result<tokio::runtime::Runtime, CliError> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// Takes SIGTERM and SIGINT now, and resolves when one arrives. Installed
/// before the vault writes its URL file: a supervisor may stop it the moment
/// that file appears, and an uncaught signal would kill the process without
/// removing the file.
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}

/// Entry point for `atrest vault`.
pub fn run(args: VaultArgs) -> Result<ExitCode, CliError> {
    match args.command {
        VaultCommand::Serve(a) => {
            let unseal = match (&a.unseal_key_file, &a.passphrase_env) {
                (Some(f), None) => Unseal::KeyFile(f.clone()),
                (None, Some(var)) => Unseal::Passphrase(zeroize::Zeroizing::new(
                    std::env::var(var).map_err(|_| CliError::Usage(format!("environment variable {var} is not set")))?,
                )),
                _ => {
                    return Err(CliError::Usage(
                        "pass --unseal-key-file FILE (see `atrest vault init-key`) or --passphrase-env VAR".into(),
                    ))
                }
            };
            let opts = crate::ServeOptions {
                data: a.data,
                listen: a.listen,
                unseal,
                tenant: a.tenant,
                hostnames: a.hostnames,
                tls_cert: a.tls_cert,
                tls_key: a.tls_key,
                test_clock: a.test_clock,
                token_lifetime_secs: a.token_lifetime_secs,
                admin_token_file: a.admin_token_file,
            };
            runtime()?.block_on(async { crate::serve(opts, shutdown_signal()?).await })?;
            Ok(ExitCode::SUCCESS)
        }
        VaultCommand::Rekey {
            data,
            unseal_key_file,
            passphrase_env,
            new_unseal_key_file,
            new_passphrase_env,
        } => {
            let pick = |file: Option<PathBuf>,
                        env: Option<String>,
                        what: &str|
             -> Result<Unseal, CliError> {
                match (file, env) {
                    (Some(f), None) => Ok(Unseal::KeyFile(f)),
                    (None, Some(v)) => Ok(Unseal::Passphrase(zeroize::Zeroizing::new(
                        std::env::var(&v).map_err(|_| {
                            CliError::Usage(format!("environment variable {v} is not set"))
                        })?,
                    ))),
                    _ => Err(CliError::Usage(format!(
                        "pass the {what} key file or passphrase variable"
                    ))),
                }
            };
            let old = pick(unseal_key_file, passphrase_env, "current")?;
            let new = pick(new_unseal_key_file, new_passphrase_env, "new")?;
            let n = crate::store::rekey(&data, &old, &new)?;
            eprintln!("re-sealed {n} key versions and the vault's secrets under the new key; take new backups (old ones no longer restore)");
            Ok(ExitCode::SUCCESS)
        }
        VaultCommand::InitKey { out } => {
            crate::seal::MasterKey::create_key_file(&out)?;
            eprintln!(
                "wrote a new unseal key to {} (mode 0600); keep it away from the data directory",
                out.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        VaultCommand::Audit(AuditCommand::Verify {
            file,
            data,
            unseal_key_file,
            passphrase_env,
        }) => {
            let path = match (file, &data) {
                (Some(f), _) => f,
                (None, Some(d)) => d.join("audit.log"),
                _ => return Err(CliError::Usage("pass --file FILE or --data DIR".into())),
            };
            let unseal = match (unseal_key_file, passphrase_env) {
                (Some(k), _) => Some(Unseal::KeyFile(k)),
                (None, Some(v)) => Some(Unseal::Passphrase(zeroize::Zeroizing::new(
                    std::env::var(&v).map_err(|_| {
                        CliError::Usage(format!("environment variable {v} is not set"))
                    })?,
                ))),
                _ => None,
            };
            let key = match (&unseal, &data) {
                (Some(u), Some(d)) => Some(crate::store::audit_mac_key_existing(d, u)?),
                _ => None,
            };
            let head = match (&unseal, &data) {
                (Some(u), Some(d)) => crate::store::audit_head_existing(d, u)?,
                _ => None,
            };
            let r = crate::audit::verify_with_head(&path, key.as_ref(), head.as_ref())?;
            match r.error {
                None => {
                    let macs = if key.is_some() {
                        "MACs verified"
                    } else {
                        "MACs not checked (pass --unseal-key-file or --passphrase-env)"
                    };
                    println!("ok: {} lines, hash chain intact, {macs}", r.lines);
                    Ok(ExitCode::SUCCESS)
                }
                Some((line, why)) => {
                    println!(
                        "audit log {} is broken at line {line}: {why}",
                        path.display()
                    );
                    Ok(ExitCode::from(1))
                }
            }
        }
        VaultCommand::Bench(b) => {
            let rt = runtime()?;
            let out = rt.block_on(crate::testkit::bench_unwrap(
                &b.conn,
                b.concurrency,
                b.seconds,
                b.key_size,
            ))?;
            println!("{}", serde_json::to_string(&out).unwrap_or_default());
            println!(
                "unwrapKey RSA-{} over HTTPS: {:.0} ops/s with {} clients, p50 {:.2} ms, p99 {:.2} ms, {} errors",
                b.key_size,
                out["ops_per_sec"].as_f64().unwrap_or(0.0),
                b.concurrency,
                out["p50_ms"].as_f64().unwrap_or(0.0),
                out["p99_ms"].as_f64().unwrap_or(0.0),
                out["errors"]
            );
            Ok(ExitCode::SUCCESS)
        }
        cmd => {
            let rt = runtime()?;
            let v = rt.block_on(admin_command(cmd))?;
            if !v.is_null() {
                print(&v);
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn admin_command(cmd: VaultCommand) -> Result<Value, CliError> {
    Ok(match cmd {
        VaultCommand::Identity(IdentityCommand::Create {
            conn,
            name,
            managed,
            certificate,
            client_id,
            permissions,
            bypass_firewall,
        }) => {
            let mut body = json!({
                "name": name,
                "kind": if managed { "managedIdentity" } else { "servicePrincipal" },
                "permissions": {"keys": permissions},
                "bypassFirewall": bypass_firewall,
            });
            if let Some(f) = certificate {
                let pem = std::fs::read_to_string(&f)
                    .map_err(|e| CliError::Usage(format!("cannot read {}: {e}", f.display())))?;
                body["certificate"] = json!(pem);
            }
            if let Some(c) = client_id {
                body["clientId"] = json!(c);
            }
            conn.admin()?
                .call(Method::POST, "/identities", Some(body))
                .await?
        }
        VaultCommand::Identity(IdentityCommand::List { conn }) => {
            conn.admin()?.call(Method::GET, "/identities", None).await?
        }
        VaultCommand::Identity(IdentityCommand::Delete { conn, client_id }) => {
            conn.admin()?
                .call(Method::DELETE, &format!("/identities/{client_id}"), None)
                .await?;
            json!({"deleted": client_id})
        }
        VaultCommand::Policy(PolicyCommand::Set {
            conn,
            client_id,
            permissions,
            bypass_firewall,
        }) => {
            let mut body = json!({"permissions": {"keys": permissions}});
            if let Some(b) = bypass_firewall {
                body["bypassFirewall"] = json!(b);
            }
            conn.admin()?
                .call(
                    Method::PUT,
                    &format!("/identities/{client_id}/policy"),
                    Some(body),
                )
                .await?
        }
        VaultCommand::Firewall(FirewallCommand::Show { conn }) => {
            conn.admin()?.call(Method::GET, "/firewall", None).await?
        }
        VaultCommand::Firewall(FirewallCommand::Set {
            conn,
            default,
            allow,
        }) => {
            conn.admin()?
                .call(
                    Method::PUT,
                    "/firewall",
                    Some(json!({"defaultAction": default, "ipRules": allow})),
                )
                .await?
        }
        VaultCommand::Lock(LockCommand::Set { conn, key }) => {
            conn.admin()?
                .call(Method::PUT, &format!("/locks/{key}"), None)
                .await?
        }
        VaultCommand::Lock(LockCommand::Remove { conn, key }) => {
            conn.admin()?
                .call(Method::DELETE, &format!("/locks/{key}"), None)
                .await?
        }
        VaultCommand::Props(PropsCommand::Show { conn }) => {
            conn.admin()?.call(Method::GET, "/vault", None).await?
        }
        VaultCommand::Props(PropsCommand::Set {
            conn,
            retention_days,
            purge_protection,
            allow_rsa15,
        }) => {
            let mut body = json!({});
            if let Some(d) = retention_days {
                body["softDeleteRetentionDays"] = json!(d);
            }
            if purge_protection {
                body["purgeProtection"] = json!(true);
            }
            if let Some(b) = allow_rsa15 {
                body["allowRsa15"] = json!(b);
            }
            conn.admin()?
                .call(Method::PATCH, "/vault", Some(body))
                .await?
        }
        VaultCommand::Key(KeyCommand::Import {
            conn,
            name,
            file,
            password_env,
            client_id,
            client_secret_env,
        }) => {
            let (url, ca) = conn.resolve_data_plane()?;
            let env = |v: &str| {
                std::env::var(v)
                    .map(zeroize::Zeroizing::new)
                    .map_err(|_| CliError::Usage(format!("environment variable {v} is not set")))
            };
            let password = password_env.as_deref().map(env).transpose()?;
            let secret = env(&client_secret_env)?;
            let bytes = zeroize::Zeroizing::new(std::fs::read(&file)?);
            let jwk = crate::import::file_to_jwk(&bytes, password.as_ref().map(|p| p.as_str()))
                .map_err(|e| CliError::Usage(format!("{}: {}", file.display(), e.message)))?;
            let tenant = discover_tenant(&url, &ca).await?;
            let client = crate::VaultClient::new(&url, &ca, &tenant, &client_id, &secret)?;
            let mut out = client
                .call(
                    Method::PUT,
                    &format!("/keys/{name}"),
                    Some(json!({"key": jwk})),
                )
                .await?;
            // Only the public JWK comes back; print it.
            out.as_object_mut().map(|o| o.remove("tags"));
            out
        }
        VaultCommand::Key(KeyCommand::Dependents {
            conn,
            name,
            version,
        }) => {
            let path = match version {
                Some(v) => format!("/keys/{name}/{v}/dependents"),
                None => format!("/keys/{name}/dependents"),
            };
            conn.admin()?.call(Method::GET, &path, None).await?
        }
        VaultCommand::Key(KeyCommand::DependentRemove {
            conn,
            name,
            version,
            dependent_id,
        }) => {
            conn.admin()?
                .call(
                    Method::DELETE,
                    &format!("/keys/{name}/{version}/dependents/{dependent_id}"),
                    None,
                )
                .await?;
            json!({"removed": dependent_id})
        }
        VaultCommand::Clock { conn, advance_secs } => {
            conn.admin()?
                .call(
                    Method::POST,
                    "/clock",
                    Some(json!({"advanceSeconds": advance_secs})),
                )
                .await?
        }
        _ => Value::Null,
    })
}

/// The tenant, read from the vault's 401 challenge as Azure SDKs do.
pub async fn discover_tenant(url: &str, ca: &[u8]) -> Result<String, CliError> {
    let http = crate::client::http_client(ca, None)?;
    let r = crate::client::send(
        &http,
        Method::GET,
        &format!("{url}/keys?api-version={}", crate::client::API_VERSION),
        None,
        None,
    )
    .await?;
    let h = r
        .headers
        .get("www-authenticate")
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| CliError::Usage("the vault sent no authentication challenge".into()))?;
    let auth = h
        .split("authorization=\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .ok_or_else(|| CliError::Usage("malformed authentication challenge".into()))?;
    Ok(auth
        .trim_end_matches('/')
        .rsplit('/')
        .next()
        .unwrap_or_default()
        .to_string())
}
