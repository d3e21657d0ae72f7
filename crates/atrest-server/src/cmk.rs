//! Customer-managed keys: the server's DEKs wrapped by an RSA key in the
//! key vault, reached with the server's own identity.
//!
//! [`VaultAccess`] is the server's connection to the vault (a dedicated
//! thread with its own async runtime, so storage code on any thread can
//! make a blocking call). [`VaultProtector`] is the [`KeyProtector`] the
//! engine uses: wrapKey/unwrapKey with RSA-OAEP-256, the DEK id bound
//! inside the wrapped value. [`validate`] checks a key the way the Azure
//! documents require before anything is switched to it.

use std::sync::mpsc;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use atrest_crypto::{
    Dek, DekId, KekRef, KeyProtector, ProtectorError, ProtectorKind, WrapAlgorithm, WrappedDek,
};
use atrest_vault::client::{ClientError, VaultClient};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use zeroize::Zeroizing;

pub const WRAP_ALG: &str = "RSA-OAEP-256";

/// `https://VAULT/keys/NAME[/VERSION]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyUrl {
    /// `https://host[:port]`
    pub vault: String,
    pub name: String,
    pub version: Option<String>,
}

impl KeyUrl {
    pub fn parse(url: &str) -> Result<KeyUrl, String> {
        let bad =
            || format!("{url:?} is not a key URL; expected https://VAULT/keys/NAME[/VERSION]");
        let rest = url.strip_prefix("https://").ok_or_else(bad)?;
        let (host, path) = rest.split_once('/').ok_or_else(bad)?;
        let mut parts = path.trim_end_matches('/').split('/');
        if parts.next() != Some("keys") || host.is_empty() {
            return Err(bad());
        }
        let name = parts.next().filter(|n| !n.is_empty()).ok_or_else(bad)?;
        let version = parts.next().filter(|v| !v.is_empty()).map(str::to_string);
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(KeyUrl {
            vault: format!("https://{host}"),
            name: name.to_string(),
            version,
        })
    }

    pub fn with_version(&self, version: &str) -> KeyUrl {
        KeyUrl {
            version: Some(version.to_string()),
            ..self.clone()
        }
    }

    /// The key id as the vault writes it (`.../keys/NAME/VERSION`).
    pub fn kid(&self) -> String {
        match &self.version {
            Some(v) => format!("{}/keys/{}/{v}", self.vault, self.name),
            None => format!("{}/keys/{}", self.vault, self.name),
        }
    }
}

impl std::fmt::Display for KeyUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.kid())
    }
}

/// How the server reaches the vault (recorded in server.json; no secrets:
/// the credential is the identity's private key in DIR/identity).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VaultLogin {
    pub tenant: String,
    /// The vault's CA certificate (PEM), relative to the server directory.
    pub ca: std::path::PathBuf,
}

type Job = Box<dyn FnOnce(&tokio::runtime::Runtime) + Send>;

/// The server's connection to the vault, usable from any thread.
pub struct VaultAccess {
    client: Arc<VaultClient>,
    jobs: std::sync::Mutex<mpsc::Sender<Job>>,
    pub client_id: String,
}

impl std::fmt::Debug for VaultAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VaultAccess")
            .field("client_id", &self.client_id)
            .finish()
    }
}

impl VaultAccess {
    pub fn new(client: VaultClient, client_id: &str) -> std::io::Result<Arc<VaultAccess>> {
        let (tx, rx) = mpsc::channel::<Job>();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        std::thread::Builder::new()
            .name("vault-access".into())
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    job(&rt);
                }
            })?;
        Ok(Arc::new(VaultAccess {
            client: Arc::new(client),
            jobs: std::sync::Mutex::new(tx),
            client_id: client_id.to_string(),
        }))
    }

    /// Runs an async call against the vault and waits for it.
    fn call<T, F, Fut>(&self, f: F) -> Result<T, ClientError>
    where
        T: Send + 'static,
        F: FnOnce(Arc<VaultClient>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<T, ClientError>>,
    {
        let (tx, rx) = mpsc::channel();
        let client = Arc::clone(&self.client);
        let job: Job = Box::new(move |rt| {
            let r = rt.block_on(async move {
                // A vault that does not answer is an outage, reported
                // quickly enough for the monitor's grace period to count.
                tokio::time::timeout(std::time::Duration::from_secs(5), f(client))
                    .await
                    .unwrap_or_else(|_| Err(ClientError::Transport("no answer within 5 s".into())))
            });
            let _ = tx.send(r);
        });
        self.jobs
            .lock()
            .expect("vault jobs")
            .send(job)
            .map_err(|_| ClientError::Transport("the vault client thread stopped".into()))?;
        rx.recv()
            .map_err(|_| ClientError::Transport("the vault client thread stopped".into()))?
    }

    pub fn get_key(&self, key: &KeyUrl) -> Result<Value, ClientError> {
        let (name, version) = (key.name.clone(), key.version.clone());
        self.call(move |c| async move { c.get_key(&name, version.as_deref()).await })
    }

    pub fn wrap(
        &self,
        key: &KeyUrl,
        plaintext: Zeroizing<Vec<u8>>,
    ) -> Result<(String, Vec<u8>), ClientError> {
        let (name, version) = (key.name.clone(), key.version.clone());
        self.call(move |c| async move {
            c.wrap_key(&name, version.as_deref(), WRAP_ALG, &plaintext)
                .await
        })
    }

    pub fn unwrap(
        &self,
        key: &KeyUrl,
        wrapped: Vec<u8>,
    ) -> Result<Zeroizing<Vec<u8>>, ClientError> {
        let name = key.name.clone();
        let version = key.version.clone().unwrap_or_default();
        self.call(move |c| async move { c.unwrap_key(&name, &version, WRAP_ALG, &wrapped).await })
    }

    /// Registers (or removes) this server as depending on a key version,
    /// so the vault refuses to purge or disable it without force.
    pub fn set_dependent(
        &self,
        key: &KeyUrl,
        server_id: &str,
        server_name: &str,
        on: bool,
    ) -> Result<(), ClientError> {
        let path = format!(
            "/keys/{}/{}/dependents/{server_id}",
            key.name,
            key.version.clone().unwrap_or_default()
        );
        let body = serde_json::json!({"name": server_name, "description": "atrest server: its data encryption keys are wrapped by this key version"});
        self.call(move |c| async move {
            let method = if on {
                reqwest::Method::PUT
            } else {
                reqwest::Method::DELETE
            };
            c.call(method, &path, if on { Some(body) } else { None })
                .await
                .map(|_| ())
        })
    }
}

/// The vault's token endpoint refused the server's identity.
fn token_refused(code: &str, message: &str) -> bool {
    message.starts_with("AADSTS")
        || matches!(
            code,
            "invalid_client" | "unauthorized_client" | "invalid_grant"
        )
}

/// What went wrong with a customer key, in words that say what to fix.
pub fn describe(e: &ClientError, key: &KeyUrl, client_id: &str) -> String {
    match e {
        ClientError::Api {
            status,
            code,
            inner,
            message,
        } => {
            let inner = inner.as_deref().unwrap_or("");
            if token_refused(code, message) {
                return format!(
                    "the vault does not accept the server's identity {client_id} (deleted, or its certificate is not registered); register it and grant get, wrapKey and unwrapKey: {message}"
                );
            }
            let what = match (*status, code.as_str(), inner) {
                (403, _, "ForbiddenByFirewall") => format!(
                    "the vault's firewall denies this server's address; add it to the firewall rules or let the server's identity through as a trusted service ({message})"
                ),
                (403, _, _) if message.contains("disabled") => format!(
                    "key {key} is disabled in the vault; enable it, or move the server to an enabled version ({message})"
                ),
                (403, _, _) if message.contains("expired") || message.contains("not yet valid") => format!(
                    "key {key} is outside its validity period (expired or not yet active); change its dates in the vault or move the server to a valid version ({message})"
                ),
                (403, _, _) => format!(
                    "the identity {client_id} lacks a permission on key {key}; grant it get, wrapKey and unwrapKey ({message})"
                ),
                (401, _, _) => format!(
                    "the vault does not accept the identity {client_id} (deleted, or its certificate is not registered): {message}"
                ),
                (404, _, _) => format!("key {key} does not exist in the vault (deleted or purged): {message}"),
                (400, _, _) | (409, _, _) => format!("the vault refused the operation on key {key}: {message}"),
                _ => format!("the vault answered {status} {code}: {message}"),
            };
            what
        }
        ClientError::Transport(t) => format!("the vault is unreachable: {t}"),
        other => other.to_string(),
    }
}

/// Why the key cannot be used, in the words a client may see before it
/// authenticates: no key URL, identity or vault address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    Disabled,
    Expired,
    Deleted,
    PermissionRevoked,
    IdentityRejected,
    Firewall,
    Unreachable,
    /// Restored from a backup; the identity has not been granted the key.
    Restored,
    /// Something else the vault refused, or a failure at start.
    Other,
}

impl Cause {
    pub fn public(self) -> &'static str {
        match self {
            Cause::Disabled => "the key is disabled",
            Cause::Expired => "the key has expired or is not active yet",
            Cause::Deleted => "the key was deleted",
            Cause::PermissionRevoked => "the server's identity lacks a permission on the key",
            Cause::IdentityRejected => "the key vault does not accept the server's identity",
            Cause::Firewall => "the key vault's firewall denies the server",
            Cause::Unreachable => "the key vault is unreachable",
            Cause::Restored => {
                "restored from a backup, its identity has not been granted the key yet"
            }
            Cause::Other => "the key could not be used",
        }
    }
}

/// The public cause of a vault failure (see [`Cause`]): the
/// same classification as [`describe`], without names.
pub fn cause(e: &ClientError) -> Cause {
    match e {
        ClientError::Api {
            status,
            code,
            inner,
            message,
        } => {
            if token_refused(code, message) {
                return Cause::IdentityRejected;
            }
            match (*status, inner.as_deref().unwrap_or("")) {
                (403, "ForbiddenByFirewall") => Cause::Firewall,
                (403, _) if message.contains("disabled") => Cause::Disabled,
                (403, _) if message.contains("expired") || message.contains("not yet valid") => {
                    Cause::Expired
                }
                (403, _) => Cause::PermissionRevoked,
                (401, _) => Cause::IdentityRejected,
                (404, _) => Cause::Deleted,
                _ => Cause::Other,
            }
        }
        ClientError::Transport(_) => Cause::Unreachable,
        _ => Cause::Other,
    }
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// What validation learned about a key.
#[derive(Debug, Clone)]
pub struct ValidKey {
    /// The key pinned to the version validated.
    pub key: KeyUrl,
    pub bits: usize,
}

/// Why a key cannot be used; each says what to fix.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

/// The checks the Azure documents require before a key protects data:
/// the identity holds get, wrapKey and unwrapKey; the key is RSA 2048 or
/// 3072, enabled, active (not-before in the past, expiry in the future);
/// the vault has soft-delete and purge protection. Nothing is changed.
pub fn validate(access: &VaultAccess, key: &KeyUrl) -> Result<ValidKey, Invalid> {
    let client_id = access.client_id.clone();
    let bundle = access.get_key(key).map_err(|e| {
        Invalid(match e.status() {
            Some(403) => format!(
                "the identity {client_id} lacks the get permission on key {key}; grant it get, wrapKey and unwrapKey"
            ),
            _ => describe(&e, key, &client_id),
        })
    })?;
    let kid = bundle["key"]["kid"].as_str().unwrap_or_default();
    let version = kid.rsplit('/').next().unwrap_or_default().to_string();
    if version.is_empty() {
        return Err(Invalid(format!("the vault returned no key id for {key}")));
    }
    let pinned = key.with_version(&version);
    let kty = bundle["key"]["kty"].as_str().unwrap_or_default();
    if kty != "RSA" && kty != "RSA-HSM" {
        return Err(Invalid(format!(
            "key {pinned} is {kty}; a customer-managed key must be RSA 2048 or 3072"
        )));
    }
    let n = bundle["key"]["n"]
        .as_str()
        .and_then(atrest_vault::b64::decode)
        .unwrap_or_default();
    let bits = n.iter().skip_while(|b| **b == 0).count() * 8;
    if bits != 2048 && bits != 3072 {
        return Err(Invalid(format!(
            "key {pinned} is RSA {bits}; a customer-managed key must be RSA 2048 or 3072"
        )));
    }
    let attrs = &bundle["attributes"];
    if attrs["enabled"].as_bool() != Some(true) {
        return Err(Invalid(format!(
            "key {pinned} is disabled; enable it in the vault"
        )));
    }
    let now = now_secs();
    if let Some(nbf) = attrs["nbf"].as_i64() {
        if nbf > now {
            return Err(Invalid(format!(
                "key {pinned} is not active yet (activation date {nbf} is in the future); use an active key or wait"
            )));
        }
    }
    if let Some(exp) = attrs["exp"].as_i64() {
        if exp <= now {
            return Err(Invalid(format!(
                "key {pinned} has expired (expiry {exp}); set a future expiry date or use another key"
            )));
        }
    }
    let level = attrs["recoveryLevel"].as_str().unwrap_or_default();
    if !level.starts_with("Recoverable") || level.contains("Purgeable") {
        return Err(Invalid(format!(
            "the vault holding {pinned} must have soft-delete and purge protection on (its recovery level is {level:?}); turn purge protection on"
        )));
    }
    let ops: Vec<&str> = bundle["key"]["key_ops"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    for op in ["wrapKey", "unwrapKey"] {
        if !ops.contains(&op) {
            return Err(Invalid(format!(
                "key {pinned} does not allow {op} (its operations are {ops:?}); create it with wrapKey and unwrapKey"
            )));
        }
    }
    // A round trip proves the wrapKey and unwrapKey permissions.
    let mut probe = Zeroizing::new(vec![0u8; 32]);
    aws_lc_rs::rand::fill(&mut probe).map_err(|_| Invalid("system RNG failure".into()))?;
    let (_, wrapped) = access.wrap(&pinned, probe.clone()).map_err(|e| {
        Invalid(match e.status() {
            Some(403) => format!(
                "the identity {client_id} lacks the wrapKey permission on key {pinned}; grant it"
            ),
            _ => describe(&e, &pinned, &client_id),
        })
    })?;
    let back = access.unwrap(&pinned, wrapped).map_err(|e| {
        Invalid(match e.status() {
            Some(403) => format!(
                "the identity {client_id} lacks the unwrapKey permission on key {pinned}; grant it"
            ),
            _ => describe(&e, &pinned, &client_id),
        })
    })?;
    if *back != *probe {
        return Err(Invalid(format!(
            "key {pinned} unwrapped a test value to something else"
        )));
    }
    Ok(ValidKey { key: pinned, bits })
}

/// Wraps DEKs under one version of a customer key; unwraps any version of
/// that key (files not yet rewrapped after a rotation).
#[derive(Debug)]
pub struct VaultProtector {
    access: Arc<VaultAccess>,
    key: KeyUrl,
}

impl VaultProtector {
    /// `key` must carry a version (see [`validate`]).
    pub fn new(access: Arc<VaultAccess>, key: KeyUrl) -> Self {
        VaultProtector { access, key }
    }

    pub fn key(&self) -> &KeyUrl {
        &self.key
    }

    fn to_protector_error(&self, e: ClientError, key: &KeyUrl) -> ProtectorError {
        let kek = KekRef {
            kind: ProtectorKind::CustomerVault,
            key_id: key.kid(),
        };
        let reason = describe(&e, key, &self.access.client_id);
        if e.is_outage() {
            ProtectorError::Unavailable { kek, reason }
        } else if e.status() == Some(404) {
            ProtectorError::KeyNotFound {
                kek,
                location: self.key.vault.clone(),
                hint: reason,
            }
        } else {
            ProtectorError::Denied { kek, reason }
        }
    }
}

impl KeyProtector for VaultProtector {
    fn current_kek(&self) -> KekRef {
        KekRef {
            kind: ProtectorKind::CustomerVault,
            key_id: self.key.kid(),
        }
    }

    fn wrap(&self, dek: &Dek) -> Result<WrappedDek, ProtectorError> {
        // The DEK id travels inside the wrapped value, so a wrapped key
        // moved to another file's header does not unwrap as that file's.
        let mut plain = Zeroizing::new(Vec::with_capacity(48));
        plain.extend_from_slice(&dek.id().0);
        plain.extend_from_slice(dek.expose_secret());
        let (_, bytes) = self
            .access
            .wrap(&self.key, plain)
            .map_err(|e| self.to_protector_error(e, &self.key))?;
        Ok(WrappedDek {
            kek: self.current_kek(),
            algorithm: WrapAlgorithm::RsaOaep256,
            bytes,
        })
    }

    fn unwrap(&self, dek_id: DekId, wrapped: &WrappedDek) -> Result<Dek, ProtectorError> {
        let theirs = KeyUrl::parse(&wrapped.kek.key_id).ok();
        let mine = theirs.as_ref().filter(|k| {
            k.vault == self.key.vault && k.name == self.key.name && k.version.is_some()
        });
        let (Some(key), ProtectorKind::CustomerVault, WrapAlgorithm::RsaOaep256) =
            (mine, wrapped.kek.kind, wrapped.algorithm)
        else {
            return Err(ProtectorError::NotMine {
                have: self.current_kek().to_string(),
                want: wrapped.kek.clone(),
            });
        };
        let plain = self
            .access
            .unwrap(key, wrapped.bytes.clone())
            .map_err(|e| self.to_protector_error(e, key))?;
        if plain.len() != 48 || plain[..16] != dek_id.0 {
            return Err(ProtectorError::WrongKey {
                kek: wrapped.kek.clone(),
                hint: "the wrapped key belongs to another file (header altered or copied)".into(),
            });
        }
        let mut bytes = Zeroizing::new([0u8; 32]);
        bytes.copy_from_slice(&plain[16..]);
        Ok(Dek::from_parts(dek_id, &bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_urls_parse_strictly() {
        let k = KeyUrl::parse("https://vault.local:8443/keys/tde/abc123").unwrap();
        assert_eq!(k.vault, "https://vault.local:8443");
        assert_eq!(k.name, "tde");
        assert_eq!(k.version.as_deref(), Some("abc123"));
        assert_eq!(k.kid(), "https://vault.local:8443/keys/tde/abc123");
        let k = KeyUrl::parse("https://v/keys/tde/").unwrap();
        assert_eq!(k.version, None);
        for bad in [
            "http://v/keys/k",
            "https://v/secrets/k",
            "https://v/keys/",
            "https://v/keys/k/v/x",
            "tde",
        ] {
            assert!(KeyUrl::parse(bad).is_err(), "{bad}");
        }
    }
}
