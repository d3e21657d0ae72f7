//! # atrest-vault: the key vault service
//!
//! Holds customer-managed key-encryption keys (RSA 2048/3072/4096) and lets
//! authorized identities use them (wrapKey/unwrapKey, encrypt/decrypt,
//! sign/verify) without ever seeing the private key. The data plane follows
//! the Azure Key Vault keys REST API so the official Azure SDKs work
//! against it; identities get tokens from an Azure AD look-alike
//! client-credentials endpoint served by the vault itself.
//!
//! What it is: an HTTPS service (`atrest vault serve`), its admin API and
//! CLI, a hash-chained fail-closed audit log, and embedded crash-safe
//! storage whose private keys are sealed under a master key kept outside
//! the data directory. `VaultClient` is the small client the database
//! server uses.
//!
//! What it is not: an HSM (keys live in process memory while in use), a
//! secrets or certificates store (keys only, RSA only), a clustered
//! service, or a full Azure AD (client credentials only). See
//! `docs/VAULT.md`.

#![forbid(unsafe_code)]

pub mod admin;
pub mod api;
pub mod audit;
pub mod auth;
pub mod b64;
pub mod backup;
pub mod certauth;
pub mod cli;
pub mod client;
pub mod clock;
pub mod der;
pub mod error;
pub mod firewall;
pub mod import;
pub mod keys;
pub mod lifecycle;
pub mod metrics;
pub mod seal;
pub mod server;
pub mod store;
pub mod testkit;
pub mod timefmt;
pub mod tls;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use client::{token_endpoint, AdminClient, ClientError, VaultClient};
pub use error::{ApiError, VaultError};
pub use store::Unseal;

/// Name of the audit log's MAC key, a random secret sealed in the database
/// (not derived from the master key, so a rekey keeps old lines verifiable).
pub const AUDIT_MAC_SECRET: &str = "audit_mac_key";

/// How to run a vault.
pub struct ServeOptions {
    pub data: PathBuf,
    pub listen: SocketAddr,
    pub unseal: Unseal,
    /// Tenant id for a new vault (random GUID if None); ignored afterwards.
    pub tenant: Option<String>,
    /// Extra DNS names / IPs for the generated certificate.
    pub hostnames: Vec<String>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub test_clock: bool,
    pub token_lifetime_secs: i64,
    /// Where the admin credential is kept (default `DATA/admin-token`).
    pub admin_token_file: Option<PathBuf>,
}

fn write_atomic(path: &Path, contents: &[u8], private: bool) -> Result<(), VaultError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(&tmp)?;
    f.write_all(contents)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Starts the vault and serves until `shutdown` resolves.
pub async fn serve(
    opts: ServeOptions,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), VaultError> {
    std::fs::create_dir_all(&opts.data)?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&opts.data, std::fs::Permissions::from_mode(0o700))?;
    }
    let data = std::fs::canonicalize(&opts.data)?;
    if let Unseal::KeyFile(k) = &opts.unseal {
        let k = std::fs::canonicalize(k).map_err(|e| {
            VaultError::Unseal(format!("cannot read unseal key file {}: {e}", k.display()))
        })?;
        if k.starts_with(&data) {
            return Err(VaultError::Unseal(
                "the unseal key file must not be inside the data directory: whoever copies the data would have the key".into(),
            ));
        }
    }
    // One process per data directory (and no rekey under a running vault):
    // an advisory lock held for the server's lifetime.
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(data.join("vault.lock"))?;
    lock.try_lock().map_err(|_| {
        VaultError::Unseal("another atrest vault process is using this data directory".into())
    })?;
    let url_file = data.join("vault.url");
    let _ = std::fs::remove_file(&url_file);

    let store = store::Store::open(&data, &opts.unseal, opts.tenant.as_deref())?;
    let signer_key = store.sealed_secret("jwt_signing_key", auth::TokenSigner::generate_pkcs8)?;
    let signer = auth::TokenSigner::from_pkcs8(&signer_key)
        .ok_or_else(|| VaultError::Unseal("stored token signing key is invalid".into()))?;
    drop(signer_key);

    // The admin credential: by default beside the data (convenient), or
    // elsewhere with --admin-token-file (then a copy of the data directory
    // carries no way to administer the vault).
    let admin_file = opts
        .admin_token_file
        .clone()
        .unwrap_or_else(|| data.join("admin-token"));
    if !admin_file.exists() {
        let tok = zeroize::Zeroizing::new(b64::encode(&seal::random_bytes::<32>()));
        write_atomic(&admin_file, tok.as_bytes(), true)?;
    }
    let admin_token = zeroize::Zeroizing::new(std::fs::read_to_string(&admin_file)?);

    let tls_cfg = match (&opts.tls_cert, &opts.tls_key) {
        (Some(c), Some(k)) => tls::server_config(c, k)?,
        (None, None) => {
            // Certificates are public files; the server's private key lives
            // only sealed in the database, so a copy of the data directory
            // cannot impersonate the vault.
            let dir = data.join("tls");
            let chain_path = dir.join("server.pem");
            let (chain, key) = match (
                store.sealed_get("tls_server_key")?,
                std::fs::read(&chain_path),
            ) {
                (Some(k), Ok(c)) => (c, k),
                _ => {
                    let g = tls::generate(&opts.hostnames)?;
                    std::fs::create_dir_all(&dir)?;
                    write_atomic(&dir.join("ca.pem"), g.ca_pem.as_bytes(), false)?;
                    write_atomic(&chain_path, g.chain_pem.as_bytes(), false)?;
                    store.sealed_put("tls_server_key", g.key_pem.as_bytes())?;
                    (
                        g.chain_pem.into_bytes(),
                        zeroize::Zeroizing::new(g.key_pem.as_bytes().to_vec()),
                    )
                }
            };
            tls::server_config_pem(&chain, &key)?
        }
        _ => {
            return Err(VaultError::Tls(
                "--tls-cert and --tls-key go together".into(),
            ))
        }
    };
    let audit = audit::AuditLog::open(
        &data.join("audit.log"),
        Some(aws_lc_rs::hmac::Key::new(
            aws_lc_rs::hmac::HMAC_SHA256,
            &store.sealed_secret(AUDIT_MAC_SECRET, || seal::random_bytes::<32>().to_vec())?,
        )),
    )?;
    audit.probe()?;

    let listener = tokio::net::TcpListener::bind(opts.listen).await?;
    let local = listener.local_addr()?;
    let tenant = store.snapshot().props.tenant_id.clone();
    let app = Arc::new(server::App {
        tenant,
        store,
        audit,
        signer,
        verified_tokens: Default::default(),
        assertion_replay: Default::default(),
        clock: clock::Clock::new(),
        admin_token_hash: auth::secret_hash(admin_token.trim()),
        test_clock: opts.test_clock,
        token_lifetime: opts.token_lifetime_secs,
        metrics: metrics::Metrics::default(),
        listen: local,
    });
    let host = if local.ip().is_unspecified() {
        format!("127.0.0.1:{}", local.port())
    } else {
        local.to_string()
    };
    write_atomic(&url_file, format!("https://{host}\n").as_bytes(), false)?;
    tracing::info!(%local, tenant = %app.store.snapshot().props.tenant_id, "vault listening");
    eprintln!(
        "atrest vault listening on https://{host} (tenant {})",
        app.store.snapshot().props.tenant_id
    );
    server::serve(app, listener, tls_cfg, shutdown).await;
    let _ = std::fs::remove_file(&url_file);
    drop(lock);
    Ok(())
}
