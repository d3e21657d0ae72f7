//! Which key protects a server's DEKs, and moving them from one key to
//! another (service key to customer key, a key to its new version, back to
//! the service key): validate first, record the move, rewrap every
//! database online, then record that it is done. A crash in between is
//! finished at the next start: until then the old key still opens what was
//! not rewrapped yet.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use atrest_crypto::{KeyProtector, RoutingProtector};
use atrest_keystore::{Keystore, ServiceKeyId};
use atrest_vault::client::{ClientError, VaultClient};
use zeroize::Zeroizing;

use crate::cmk::{self, Cause, KeyUrl, VaultAccess, VaultLogin, VaultProtector};
use crate::config::{CustomerKeyConfig, ServerConfig};
use crate::resource;

/// What the DEKs should be wrapped by.
#[derive(Debug, Clone)]
pub enum Target {
    Service,
    Customer { key: KeyUrl, login: VaultLogin },
}

/// The name a protector goes by in `rewrap_from`.
pub const SERVICE: &str = "service";

/// Opens the vault as this server's identity (its certificate credential).
pub fn vault_access(
    dir: &Path,
    config: &ServerConfig,
    login: &VaultLogin,
    key: &KeyUrl,
) -> Result<Arc<VaultAccess>, String> {
    let ca_path = resource::resolve(dir, &login.ca);
    let ca = std::fs::read(&ca_path)
        .map_err(|e| format!("reading the vault CA {}: {e}", ca_path.display()))?;
    let http = atrest_vault::client::http_client(&ca, None).map_err(|e| e.to_string())?;
    let key_path = dir.join("identity/identity.key");
    let pem = Zeroizing::new(
        std::fs::read(&key_path)
            .map_err(|e| format!("reading the server identity {}: {e}", key_path.display()))?,
    );
    let client = VaultClient::with_certificate(
        http,
        &key.vault,
        &login.tenant,
        &config.identity.client_id,
        &pem,
    )
    .map_err(|e| e.to_string())?;
    VaultAccess::new(client, &config.identity.client_id).map_err(|e| e.to_string())
}

pub fn service_protector(config: &ServerConfig) -> Result<Arc<dyn KeyProtector>, String> {
    let id = config
        .encryption
        .service_key
        .strip_prefix("service:")
        .and_then(ServiceKeyId::parse)
        .ok_or_else(|| format!("{} is not a service key id", config.encryption.service_key))?;
    let ks = Keystore::open(&config.encryption.keystore_dir).map_err(|e| e.to_string())?;
    Ok(Arc::new(
        ks.service_protector(id).map_err(|e| e.to_string())?,
    ))
}

/// The protector the engine uses for `config`: its key, plus those in
/// `rewrap_from` while a rewrap is unfinished.
pub fn engine_protector(
    config: &ServerConfig,
    access: Option<&Arc<VaultAccess>>,
) -> Result<Arc<dyn KeyProtector>, String> {
    let build = |name: &str| -> Result<Arc<dyn KeyProtector>, String> {
        if name == SERVICE {
            return service_protector(config);
        }
        let key = KeyUrl::parse(name)?;
        let access = access.ok_or("a customer key needs the vault")?;
        Ok(Arc::new(VaultProtector::new(Arc::clone(access), key)))
    };
    let current = match &config.encryption.customer_key {
        Some(c) => build(&c.key.kid())?,
        None => build(SERVICE)?,
    };
    if config.encryption.rewrap_from.is_empty() {
        return Ok(current);
    }
    let previous = config
        .encryption
        .rewrap_from
        .iter()
        .map(|n| build(n))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Arc::new(RoutingProtector::new(current, previous)))
}

/// What a key switch did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SwitchReport {
    pub key: String,
    pub databases: usize,
    pub millis: u128,
}

/// An engine's DEKs as a key switch sees them: the one switch below serves
/// every engine.
pub trait Rewrap {
    /// Makes `protector` the one the engine wraps new DEKs with and
    /// unwraps its DEKs by.
    fn set_protector(&self, protector: Arc<dyn KeyProtector>) -> Result<(), String>;
    /// Rewraps every DEK under the protector's current key, touching
    /// headers only; returns how many databases or trees it rewrapped.
    fn rewrap_every(&self, dir: &Path, config: &ServerConfig) -> Result<usize, String>;
}

/// Rewraps every DEK under the engine's current protector, then records
/// the rewrap as complete and tells the vault: this server now depends on
/// its current key version, and no longer on the customer keys it moved
/// away from (also when an earlier, interrupted run started the move).
pub fn rewrap_all(
    dir: &Path,
    config: &mut ServerConfig,
    engine: &dyn Rewrap,
    access: Option<&Arc<VaultAccess>>,
) -> Result<usize, String> {
    let n = engine.rewrap_every(dir, config)?;
    let moved_from = std::mem::take(&mut config.encryption.rewrap_from);
    config.save(dir).map_err(|e| e.to_string())?;
    if let Some(a) = access {
        let current = config
            .encryption
            .customer_key
            .as_ref()
            .map(|c| c.key.clone());
        if let Some(k) = &current {
            if let Err(e) = a.set_dependent(k, &config.server_id, &config.name, true) {
                tracing::warn!(error = %e, key = %k, "could not register this server as a dependent of its key");
            }
        }
        for old in moved_from.iter().filter_map(|n| KeyUrl::parse(n).ok()) {
            if Some(&old) != current.as_ref() && old.version.is_some() {
                if let Err(e) = a.set_dependent(&old, &config.server_id, &config.name, false) {
                    tracing::warn!(error = %e, key = %old, "could not unregister this server from a key it no longer uses");
                }
            }
        }
    }
    Ok(n)
}

/// Switches the DEKs to `target`. Validation comes first; on a failed
/// check nothing changes. Returns the vault access for a customer key.
pub fn switch(
    dir: &Path,
    config: &mut ServerConfig,
    engine: &dyn Rewrap,
    target: Target,
) -> Result<(SwitchReport, Option<Arc<VaultAccess>>), String> {
    let started = Instant::now();
    let (new_ck, access) = match &target {
        Target::Service => (None, None),
        Target::Customer { key, login } => {
            let access = vault_access(dir, config, login, key)?;
            let valid = cmk::validate(&access, key).map_err(|e| e.0)?;
            (
                Some(CustomerKeyConfig {
                    key: valid.key,
                    login: login.clone(),
                    since: resource::now_rfc3339(),
                }),
                Some(access),
            )
        }
    };
    let old_name = match &config.encryption.customer_key {
        Some(c) => c.key.kid(),
        None => SERVICE.to_string(),
    };
    let new_name = new_ck
        .as_ref()
        .map(|c| c.key.kid())
        .unwrap_or_else(|| SERVICE.into());
    let old_ck = config.encryption.customer_key.clone();
    if old_name != new_name && !config.encryption.rewrap_from.contains(&old_name) {
        config.encryption.rewrap_from.push(old_name.clone());
    }
    config.encryption.customer_key = new_ck.clone();
    config.encryption.scenario = if new_ck.is_some() {
        "customer-managed"
    } else {
        "service-managed"
    }
    .into();
    // The old key may live in the same vault (rotation): one access serves both.
    let access_for_old = access.clone().or_else(|| {
        old_ck
            .as_ref()
            .and_then(|c| vault_access(dir, config, &c.login, &c.key).ok())
    });
    let protector = engine_protector(config, access_for_old.as_ref())?;
    config.save(dir).map_err(|e| e.to_string())?;
    engine.set_protector(protector)?;
    // The old key's registration is removed with the same vault access
    // (a rotation, or a move between keys of one vault).
    let n = rewrap_all(
        dir,
        config,
        engine,
        access.as_ref().or(access_for_old.as_ref()),
    )?;
    engine.set_protector(engine_protector(config, access.as_ref())?)?;
    let _ = resource::log_activity(
        dir,
        &serde_json::json!({
            "time": resource::now_rfc3339(), "event": "key_switched",
            "from": old_name, "to": new_name, "databases": n,
        }),
    );
    Ok((
        SwitchReport {
            key: new_name,
            databases: n,
            millis: started.elapsed().as_millis(),
        },
        access,
    ))
}

/// Why the key cannot be used right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loss {
    /// The vault could not be asked (a grace period applies), rather than
    /// answering no (no grace).
    pub outage: bool,
    pub cause: Cause,
    /// The whole story for the administrator (names the key and identity).
    pub reason: String,
}

impl Loss {
    pub fn refused(cause: Cause, reason: impl Into<String>) -> Loss {
        Loss {
            outage: false,
            cause,
            reason: reason.into(),
        }
    }

    pub fn outage(reason: impl Into<String>) -> Loss {
        Loss {
            outage: true,
            cause: Cause::Unreachable,
            reason: reason.into(),
        }
    }

    pub fn reason(&self) -> &str {
        &self.reason
    }
}

fn loss(e: ClientError, key: &KeyUrl, client_id: &str) -> Loss {
    Loss {
        outage: e.is_outage(),
        cause: cmk::cause(&e),
        reason: cmk::describe(&e, key, client_id),
    }
}

/// A value wrapped under the key, unwrapped by every check: proves the
/// unwrapKey permission and the key's usability without touching a file.
pub struct Probe {
    wrapped: Vec<u8>,
    plain: Zeroizing<Vec<u8>>,
}

impl Probe {
    pub fn make(access: &VaultAccess, key: &KeyUrl) -> Result<Probe, Loss> {
        let mut plain = Zeroizing::new(vec![0u8; 32]);
        aws_lc_rs::rand::fill(&mut plain).map_err(|_| Loss::outage("system RNG failure"))?;
        let (_, wrapped) = access
            .wrap(key, plain.clone())
            .map_err(|e| loss(e, key, &access.client_id))?;
        Ok(Probe { wrapped, plain })
    }
}

/// One check of the key: get (enabled, active, not expired) and an unwrap.
pub fn check(access: &VaultAccess, key: &KeyUrl, probe: &Probe) -> Result<(), Loss> {
    let bundle = access
        .get_key(key)
        .map_err(|e| loss(e, key, &access.client_id))?;
    let attrs = &bundle["attributes"];
    if attrs["enabled"].as_bool() != Some(true) {
        return Err(Loss::refused(
            Cause::Disabled,
            format!("key {key} is disabled; enable it in the vault"),
        ));
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    if attrs["exp"].as_i64().is_some_and(|exp| exp <= now) {
        return Err(Loss::refused(
            Cause::Expired,
            format!("key {key} has expired; set a future expiry date in the vault"),
        ));
    }
    if attrs["nbf"].as_i64().is_some_and(|nbf| nbf > now) {
        return Err(Loss::refused(
            Cause::Expired,
            format!("key {key} is not active yet (activation date in the future)"),
        ));
    }
    let back = access
        .unwrap(key, probe.wrapped.clone())
        .map_err(|e| loss(e, key, &access.client_id))?;
    if *back != *probe.plain {
        return Err(Loss::refused(
            Cause::Other,
            format!("key {key} no longer unwraps what it wrapped"),
        ));
    }
    Ok(())
}
