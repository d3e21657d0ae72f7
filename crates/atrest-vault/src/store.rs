//! Embedded, crash-safe storage: SQLite in WAL mode with `synchronous=FULL`,
//! so a mutation is on disk before it is acknowledged. Private keys are
//! stored only sealed under the master key. The whole (small) state is
//! mirrored in memory; a mutation works on a copy, commits it to SQLite and
//! only then replaces the in-memory state, so memory never runs ahead of
//! disk.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};

use rusqlite::{params, Connection, OptionalExtension, Transaction};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::VaultError;
use crate::keys::RsaKey;
use crate::seal::{random_bytes, MasterKey, SealKey};

/// Azure's key permissions (access policy vocabulary).
pub const KEY_PERMISSIONS: &[&str] = &[
    "get",
    "list",
    "update",
    "create",
    "import",
    "delete",
    "recover",
    "backup",
    "restore",
    "purge",
    "encrypt",
    "decrypt",
    "wrapKey",
    "unwrapKey",
    "sign",
    "verify",
    "rotate",
    "getrotationpolicy",
    "setrotationpolicy",
];

/// Normalises a permission name as Azure does (case-insensitive), or None.
pub fn canonical_permission(p: &str) -> Option<&'static str> {
    KEY_PERMISSIONS
        .iter()
        .find(|k| k.eq_ignore_ascii_case(p))
        .copied()
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Firewall {
    /// "Allow" or "Deny".
    pub default_action: String,
    pub ip_rules: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VaultProps {
    pub tenant_id: String,
    pub soft_delete_retention_days: u32,
    pub purge_protection: bool,
    /// RSA1_5 is refused unless an operator turns this on: PKCS#1 v1.5
    /// encryption is open to padding-oracle attacks (Bleichenbacher).
    pub allow_rsa15: bool,
    pub firewall: Firewall,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Identity {
    pub client_id: String,
    pub name: String,
    /// "servicePrincipal" or "managedIdentity".
    pub kind: String,
    /// SHA-256 of the client secret (the secret is 256 random bits, so a
    /// fast hash is enough). Empty for an identity with a certificate.
    #[serde(default)]
    pub secret_sha256: String,
    /// The registered certificate (no secret then): the identity proves
    /// itself with a signed client assertion.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<crate::certauth::CertificateCredential>,
    pub created: i64,
    pub bypass_firewall: bool,
    pub key_permissions: BTreeSet<String>,
}

/// A server that depends on a key version (it has data wrapped under it):
/// while registered, the version cannot be disabled nor its key purged
/// without `force=true`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Dependent {
    /// The dependent's id (a GUID: the server's id).
    pub id: String,
    /// The server's name.
    pub name: String,
    pub description: String,
    /// The identity that registered it.
    pub client_id: String,
    /// When it was (last) registered, Unix seconds.
    pub registered: i64,
}

/// Dependents by key name, then version, then dependent id.
pub type Dependents = BTreeMap<String, BTreeMap<String, BTreeMap<String, Dependent>>>;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VersionMeta {
    pub version: String,
    pub seq: i64,
    pub created: i64,
    pub updated: i64,
    pub enabled: bool,
    pub nbf: Option<i64>,
    pub exp: Option<i64>,
    pub key_ops: Vec<String>,
    pub tags: BTreeMap<String, String>,
    pub kty: String,
}

#[derive(Debug, Clone)]
pub struct KeyVersion {
    pub meta: VersionMeta,
    pub key: Arc<RsaKey>,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct KeyStateMeta {
    pub deleted_date: Option<i64>,
    pub scheduled_purge_date: Option<i64>,
    pub locked: bool,
    pub rotation_policy: Option<Value>,
}

#[derive(Debug, Clone)]
pub struct KeyEntry {
    pub name: String,
    /// Ordered by `seq`; the last is the current version.
    pub versions: Vec<KeyVersion>,
    pub state: KeyStateMeta,
}

impl KeyEntry {
    pub fn current(&self) -> &KeyVersion {
        self.versions
            .last()
            .expect("a key has at least one version")
    }
    pub fn version(&self, v: &str) -> Option<&KeyVersion> {
        if v.is_empty() {
            return self.versions.last();
        }
        self.versions.iter().find(|k| k.meta.version == v)
    }
    pub fn is_deleted(&self) -> bool {
        self.state.deleted_date.is_some()
    }
}

#[derive(Debug, Clone)]
pub struct State {
    pub props: VaultProps,
    pub identities: BTreeMap<String, Identity>,
    pub keys: BTreeMap<String, KeyEntry>,
    /// Key dependents (servers depending on key versions).
    pub dependents: Dependents,
    next_seq: i64,
}

impl State {
    /// The dependents of one key (all versions), in version then id order.
    pub fn key_dependents(&self, name: &str) -> Vec<(&str, &Dependent)> {
        self.dependents
            .get(name)
            .into_iter()
            .flat_map(|vs| {
                vs.iter()
                    .flat_map(|(v, ds)| ds.values().map(move |d| (v.as_str(), d)))
            })
            .collect()
    }

    pub fn next_seq(&mut self) -> i64 {
        self.next_seq += 1;
        self.next_seq
    }
}

/// A pending change, applied to SQLite and then to memory.
pub struct Tx<'a> {
    tx: &'a Transaction<'a>,
    seal: &'a SealKey,
}

fn seal_aad(name: &str, version: &str) -> Vec<u8> {
    format!("atrest-vault/key/{name}/{version}").into_bytes()
}

impl Tx<'_> {
    /// Records the audit log position of this change, sealed (so it cannot
    /// be moved back to hide a truncated log), in the same transaction.
    pub fn put_audit_head(&self, seq: u64, hash: &str) -> Result<(), VaultError> {
        let v = serde_json::to_vec(&serde_json::json!({"seq": seq, "hash": hash}))?;
        let aad = "atrest-vault/meta/audit_head";
        put_meta(self.tx, "audit_head", &self.seal.seal(aad.as_bytes(), &v))
    }

    pub fn put_version(&self, name: &str, v: &KeyVersion) -> Result<(), VaultError> {
        let sealed = self
            .seal
            .seal(&seal_aad(name, &v.meta.version), v.key.pkcs8());
        self.tx.execute(
            "INSERT OR REPLACE INTO key_versions(name, version, seq, meta, sealed) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![name, v.meta.version, v.meta.seq, serde_json::to_string(&v.meta)?, sealed],
        )?;
        Ok(())
    }
    pub fn put_state(&self, name: &str, s: &KeyStateMeta) -> Result<(), VaultError> {
        self.tx.execute(
            "INSERT OR REPLACE INTO key_state(name, meta) VALUES (?1, ?2)",
            params![name, serde_json::to_string(s)?],
        )?;
        Ok(())
    }
    pub fn delete_key(&self, name: &str) -> Result<(), VaultError> {
        self.tx
            .execute("DELETE FROM key_versions WHERE name = ?1", params![name])?;
        self.tx
            .execute("DELETE FROM key_state WHERE name = ?1", params![name])?;
        Ok(())
    }
    pub fn put_identity(&self, id: &Identity) -> Result<(), VaultError> {
        self.tx.execute(
            "INSERT OR REPLACE INTO identities(client_id, meta) VALUES (?1, ?2)",
            params![id.client_id, serde_json::to_string(id)?],
        )?;
        Ok(())
    }
    pub fn delete_identity(&self, client_id: &str) -> Result<(), VaultError> {
        self.tx.execute(
            "DELETE FROM identities WHERE client_id = ?1",
            params![client_id],
        )?;
        Ok(())
    }
    pub fn put_dependent(&self, key: &str, version: &str, d: &Dependent) -> Result<(), VaultError> {
        self.tx.execute(
            "INSERT OR REPLACE INTO dependents(key_name, version, id, meta) VALUES (?1, ?2, ?3, ?4)",
            params![key, version, d.id, serde_json::to_string(d)?],
        )?;
        Ok(())
    }
    pub fn delete_dependent(&self, key: &str, version: &str, id: &str) -> Result<(), VaultError> {
        self.tx.execute(
            "DELETE FROM dependents WHERE key_name = ?1 AND version = ?2 AND id = ?3",
            params![key, version, id],
        )?;
        Ok(())
    }
    /// Forgets every dependent of a key (when it is purged).
    pub fn delete_key_dependents(&self, key: &str) -> Result<(), VaultError> {
        self.tx
            .execute("DELETE FROM dependents WHERE key_name = ?1", params![key])?;
        Ok(())
    }
    pub fn put_props(&self, p: &VaultProps) -> Result<(), VaultError> {
        put_meta(self.tx, "props", serde_json::to_string(p)?.as_bytes())
    }
    /// Writes a whole key entry (all versions and state).
    pub fn put_entry(&self, e: &KeyEntry) -> Result<(), VaultError> {
        self.delete_key(&e.name)?;
        for v in &e.versions {
            self.put_version(&e.name, v)?;
        }
        self.put_state(&e.name, &e.state)
    }
}

fn put_meta(conn: &Connection, k: &str, v: &[u8]) -> Result<(), VaultError> {
    conn.execute(
        "INSERT OR REPLACE INTO meta(k, v) VALUES (?1, ?2)",
        params![k, v],
    )?;
    Ok(())
}

fn get_meta(conn: &Connection, k: &str) -> Result<Option<Vec<u8>>, VaultError> {
    Ok(conn
        .query_row("SELECT v FROM meta WHERE k = ?1", params![k], |r| r.get(0))
        .optional()?)
}

/// How the master key is supplied at start.
pub enum Unseal {
    KeyFile(std::path::PathBuf),
    Passphrase(zeroize::Zeroizing<String>),
}

pub struct Store {
    conn: Mutex<Connection>,
    state: RwLock<Arc<State>>,
    seal: SealKey,
    master: MasterKey,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Store")
    }
}

const CANARY: &[u8] = b"atrest-vault unseal check v1";

/// Sealed named secrets kept in `meta` (re-sealed by `rekey`).
const META_SECRETS: &[&str] = &[
    "jwt_signing_key",
    "tls_server_key",
    "audit_mac_key",
    "audit_head",
];

/// The audit MAC key of an existing vault (for `audit verify`).
pub fn audit_mac_key_existing(
    dir: &Path,
    unseal: &Unseal,
) -> Result<aws_lc_rs::hmac::Key, VaultError> {
    let master = unseal_existing(dir, unseal)?;
    let conn = Connection::open_with_flags(
        dir.join("vault.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )?;
    let sealed = get_meta(&conn, crate::AUDIT_MAC_SECRET)?
        .ok_or_else(|| VaultError::Unseal("this vault has no audit MAC key".into()))?;
    let key = master.derive("atrest-vault seal v1").open(
        format!("atrest-vault/meta/{}", crate::AUDIT_MAC_SECRET).as_bytes(),
        &sealed,
    )?;
    Ok(aws_lc_rs::hmac::Key::new(
        aws_lc_rs::hmac::HMAC_SHA256,
        &key,
    ))
}

/// The audit position recorded with the last state change, if any.
pub fn audit_head_existing(
    dir: &Path,
    unseal: &Unseal,
) -> Result<Option<(u64, String)>, VaultError> {
    let master = unseal_existing(dir, unseal)?;
    let conn = Connection::open_with_flags(
        dir.join("vault.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )?;
    let Some(sealed) = get_meta(&conn, "audit_head")? else {
        return Ok(None);
    };
    let v = master
        .derive("atrest-vault seal v1")
        .open(b"atrest-vault/meta/audit_head", &sealed)?;
    let v: serde_json::Value = serde_json::from_slice(&v)?;
    Ok(v["seq"]
        .as_u64()
        .zip(v["hash"].as_str().map(str::to_string)))
}

/// Re-seals everything under a new master key, in one transaction, with
/// the vault stopped (refused while a server holds the directory's lock).
/// Returns how many key versions were re-sealed. Backups made before the
/// rekey cannot be restored afterwards (their key derives from the master
/// key): take new ones.
pub fn rekey(dir: &Path, old: &Unseal, new: &Unseal) -> Result<usize, VaultError> {
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("vault.lock"))?;
    lock.try_lock()
        .map_err(|_| VaultError::Unseal("the vault is running; stop it before rekeying".into()))?;
    let old_master = unseal_existing(dir, old)?;
    let old_seal = old_master.derive("atrest-vault seal v1");
    let mut conn = Connection::open(dir.join("vault.db"))?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Exclusive)?;
    let new_master = match new {
        Unseal::KeyFile(p) => MasterKey::from_key_file(p)?,
        Unseal::Passphrase(pw) => {
            let salt = random_bytes::<16>().to_vec();
            put_meta(&tx, "kdf_salt", &salt)?;
            MasterKey::from_passphrase(pw.as_bytes(), &salt)
        }
    };
    let new_seal = new_master.derive("atrest-vault seal v1");
    let rows: Vec<(String, String, Vec<u8>)> = {
        let mut stmt = tx.prepare("SELECT name, version, sealed FROM key_versions")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
        rows.collect::<Result<_, _>>()?
    };
    for (name, version, sealed) in &rows {
        let aad = seal_aad(name, version);
        let plain = old_seal.open(&aad, sealed)?;
        tx.execute(
            "UPDATE key_versions SET sealed = ?1 WHERE name = ?2 AND version = ?3",
            params![new_seal.seal(&aad, &plain), name, version],
        )?;
    }
    for name in META_SECRETS {
        let aad = format!("atrest-vault/meta/{name}");
        if let Some(b) = get_meta(&tx, name)? {
            let plain = old_seal.open(aad.as_bytes(), &b)?;
            put_meta(&tx, name, &new_seal.seal(aad.as_bytes(), &plain))?;
        }
    }
    put_meta(&tx, "canary", &new_seal.seal(b"canary", CANARY))?;
    tx.commit()?;
    drop(lock);
    Ok(rows.len())
}

/// The master key of an existing vault, checked against its database,
/// without loading the vault (for offline tools such as `audit verify`).
pub fn unseal_existing(dir: &Path, unseal: &Unseal) -> Result<MasterKey, VaultError> {
    let conn = Connection::open_with_flags(
        dir.join("vault.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )?;
    let salt = get_meta(&conn, "kdf_salt")?
        .ok_or_else(|| VaultError::Unseal("not a vault database".into()))?;
    let master = match unseal {
        Unseal::KeyFile(p) => MasterKey::from_key_file(p)?,
        Unseal::Passphrase(pw) => MasterKey::from_passphrase(pw.as_bytes(), &salt),
    };
    let canary = get_meta(&conn, "canary")?
        .ok_or_else(|| VaultError::Unseal("not a vault database".into()))?;
    master
        .derive("atrest-vault seal v1")
        .open(b"canary", &canary)
        .map_err(|_| {
            VaultError::Unseal("the unseal key or passphrase does not match this vault".into())
        })?;
    Ok(master)
}

impl Store {
    /// Opens (or creates) `vault.db` in `dir` and unseals it.
    pub fn open(
        dir: &Path,
        unseal: &Unseal,
        tenant_for_new: Option<&str>,
    ) -> Result<Self, VaultError> {
        let conn = Connection::open(dir.join("vault.db"))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS meta(k TEXT PRIMARY KEY, v BLOB NOT NULL);
             CREATE TABLE IF NOT EXISTS identities(client_id TEXT PRIMARY KEY, meta TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS key_versions(name TEXT NOT NULL, version TEXT NOT NULL,
                 seq INTEGER NOT NULL, meta TEXT NOT NULL, sealed BLOB NOT NULL,
                 PRIMARY KEY(name, version));
             CREATE TABLE IF NOT EXISTS key_state(name TEXT PRIMARY KEY, meta TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS dependents(key_name TEXT NOT NULL, version TEXT NOT NULL,
                 id TEXT NOT NULL, meta TEXT NOT NULL, PRIMARY KEY(key_name, version, id));",
        )?;
        let salt = match get_meta(&conn, "kdf_salt")? {
            Some(s) => s,
            None => {
                let s = random_bytes::<16>().to_vec();
                put_meta(&conn, "kdf_salt", &s)?;
                s
            }
        };
        let master = match unseal {
            Unseal::KeyFile(p) => MasterKey::from_key_file(p)?,
            Unseal::Passphrase(pw) => MasterKey::from_passphrase(pw.as_bytes(), &salt),
        };
        let seal = master.derive("atrest-vault seal v1");
        match get_meta(&conn, "canary")? {
            Some(c) => {
                seal.open(b"canary", &c).map_err(|_| {
                    VaultError::Unseal(
                        "the unseal key or passphrase does not match this vault".to_string(),
                    )
                })?;
            }
            None => {
                let tx = conn.unchecked_transaction()?;
                put_meta(&tx, "canary", &seal.seal(b"canary", CANARY))?;
                let props = VaultProps {
                    tenant_id: tenant_for_new.map(str::to_string).unwrap_or_else(new_guid),
                    soft_delete_retention_days: 90,
                    purge_protection: false,
                    allow_rsa15: false,
                    firewall: Firewall {
                        default_action: "Allow".into(),
                        ip_rules: vec![],
                    },
                };
                put_meta(&tx, "props", serde_json::to_string(&props)?.as_bytes())?;
                tx.commit()?;
            }
        }
        let state = load_state(&conn, &seal)?;
        Ok(Store {
            conn: Mutex::new(conn),
            state: RwLock::new(Arc::new(state)),
            seal,
            master,
        })
    }

    /// A consistent snapshot; cheap (an `Arc` clone).
    pub fn snapshot(&self) -> Arc<State> {
        self.state.read().expect("state lock").clone()
    }

    pub fn master(&self) -> &MasterKey {
        &self.master
    }

    /// Loads or creates a sealed named secret in `meta` (JWT signing key).
    pub fn sealed_secret(
        &self,
        name: &str,
        create: impl FnOnce() -> Vec<u8>,
    ) -> Result<zeroize::Zeroizing<Vec<u8>>, VaultError> {
        let conn = self.conn.lock().expect("conn lock");
        let aad = format!("atrest-vault/meta/{name}");
        if let Some(b) = get_meta(&conn, name)? {
            return self.seal.open(aad.as_bytes(), &b);
        }
        let v = zeroize::Zeroizing::new(create());
        put_meta(&conn, name, &self.seal.seal(aad.as_bytes(), &v))?;
        Ok(v)
    }

    /// Reads a sealed named secret, if present.
    pub fn sealed_get(
        &self,
        name: &str,
    ) -> Result<Option<zeroize::Zeroizing<Vec<u8>>>, VaultError> {
        let conn = self.conn.lock().expect("conn lock");
        let aad = format!("atrest-vault/meta/{name}");
        get_meta(&conn, name)?
            .map(|b| self.seal.open(aad.as_bytes(), &b))
            .transpose()
    }

    /// Stores (replaces) a sealed named secret.
    pub fn sealed_put(&self, name: &str, value: &[u8]) -> Result<(), VaultError> {
        let conn = self.conn.lock().expect("conn lock");
        let aad = format!("atrest-vault/meta/{name}");
        put_meta(&conn, name, &self.seal.seal(aad.as_bytes(), value))
    }

    /// Runs `f` on a copy of the state inside one SQLite transaction; on
    /// success commits and publishes the copy. On error nothing changes.
    pub fn mutate<T, E>(&self, f: impl FnOnce(&mut State, &Tx<'_>) -> Result<T, E>) -> Result<T, E>
    where
        E: From<VaultError>,
    {
        self.mutate_hooked(f, |_, _| Ok(()))
    }

    /// Like `mutate`, with `before_commit` run after `f` succeeded and
    /// before the transaction commits: if it fails, nothing is committed.
    /// The server writes the audit record there, so a change whose audit
    /// record cannot be written never happens.
    pub fn mutate_hooked<T, E>(
        &self,
        f: impl FnOnce(&mut State, &Tx<'_>) -> Result<T, E>,
        before_commit: impl FnOnce(&T, &Tx<'_>) -> Result<(), E>,
    ) -> Result<T, E>
    where
        E: From<VaultError>,
    {
        // The connection mutex serialises mutations; readers keep using the
        // published snapshot meanwhile and are never blocked by a commit
        // (or by the audit sync before it). The write lock is held only to
        // swap in the new state.
        let mut conn = self.conn.lock().expect("conn lock");
        let mut next: State = (*self.snapshot()).clone();
        let tx = conn
            .transaction()
            .map_err(|e| E::from(VaultError::from(e)))?;
        let out = {
            let t = Tx {
                tx: &tx,
                seal: &self.seal,
            };
            let out = f(&mut next, &t)?;
            before_commit(&out, &t)?;
            out
        };
        tx.commit().map_err(|e| E::from(VaultError::from(e)))?;
        *self.state.write().expect("state lock") = Arc::new(next);
        Ok(out)
    }
}

fn load_state(conn: &Connection, seal: &SealKey) -> Result<State, VaultError> {
    let props: VaultProps = serde_json::from_slice(
        &get_meta(conn, "props")?
            .ok_or_else(|| VaultError::Unseal("vault properties missing".into()))?,
    )?;
    let mut identities = BTreeMap::new();
    let mut stmt = conn.prepare("SELECT meta FROM identities")?;
    for row in stmt.query_map([], |r| r.get::<_, String>(0))? {
        let id: Identity = serde_json::from_str(&row?)?;
        identities.insert(id.client_id.clone(), id);
    }
    let mut keys: BTreeMap<String, KeyEntry> = BTreeMap::new();
    let mut next_seq = 0;
    let mut stmt =
        conn.prepare("SELECT name, version, meta, sealed FROM key_versions ORDER BY seq")?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, String>(2)?,
            r.get::<_, Vec<u8>>(3)?,
        ))
    })?;
    for row in rows {
        let (name, version, meta, sealed) = row?;
        let meta: VersionMeta = serde_json::from_str(&meta)?;
        next_seq = next_seq.max(meta.seq);
        let pkcs8 = seal.open(&seal_aad(&name, &version), &sealed)?;
        let key = RsaKey::from_pkcs8(&pkcs8).map_err(|e| {
            VaultError::Invalid(format!("stored key {name}/{version}: {}", e.message))
        })?;
        keys.entry(name.clone())
            .or_insert_with(|| KeyEntry {
                name: name.clone(),
                versions: vec![],
                state: KeyStateMeta::default(),
            })
            .versions
            .push(KeyVersion {
                meta,
                key: Arc::new(key),
            });
    }
    let mut stmt = conn.prepare("SELECT name, meta FROM key_state")?;
    for row in stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))? {
        let (name, meta) = row?;
        if let Some(e) = keys.get_mut(&name) {
            e.state = serde_json::from_str(&meta)?;
        }
    }
    let mut dependents = Dependents::new();
    let mut stmt = conn.prepare("SELECT key_name, version, meta FROM dependents")?;
    for row in stmt.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, String>(2)?,
        ))
    })? {
        let (key, version, meta) = row?;
        let d: Dependent = serde_json::from_str(&meta)?;
        dependents
            .entry(key)
            .or_default()
            .entry(version)
            .or_default()
            .insert(d.id.clone(), d);
    }
    Ok(State {
        props,
        identities,
        keys,
        dependents,
        next_seq,
    })
}

/// A random identifier shaped like a GUID (tenants, client ids).
pub fn new_guid() -> String {
    let b = random_bytes::<16>();
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

/// A key version id: 32 hex characters, as Azure's.
pub fn new_version() -> String {
    hex::encode(random_bytes::<16>())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unseal(dir: &Path) -> Unseal {
        let p = dir.join("k");
        if !p.exists() {
            MasterKey::create_key_file(&p).unwrap();
        }
        Unseal::KeyFile(p)
    }

    #[test]
    fn persists_and_refuses_wrong_key() {
        let data = tempfile::tempdir().unwrap();
        let keydir = tempfile::tempdir().unwrap();
        let u = unseal(keydir.path());
        let s = Store::open(data.path(), &u, Some("t1")).unwrap();
        let key = Arc::new(RsaKey::generate(2048).unwrap());
        s.mutate(|st, tx| -> Result<(), VaultError> {
            let seq = st.next_seq();
            let v = KeyVersion {
                meta: VersionMeta {
                    version: new_version(),
                    seq,
                    created: 1,
                    updated: 1,
                    enabled: true,
                    nbf: None,
                    exp: None,
                    key_ops: vec![],
                    tags: Default::default(),
                    kty: "RSA".into(),
                },
                key: key.clone(),
            };
            let e = KeyEntry {
                name: "k1".into(),
                versions: vec![v],
                state: KeyStateMeta::default(),
            };
            tx.put_entry(&e)?;
            st.keys.insert("k1".into(), e);
            Ok(())
        })
        .unwrap();
        // A failing mutation leaves no trace.
        let r: Result<(), VaultError> = s.mutate(|st, tx| {
            tx.delete_key("k1")?;
            st.keys.clear();
            Err(VaultError::Invalid("nope".into()))
        });
        assert!(r.is_err());
        assert!(s.snapshot().keys.contains_key("k1"));
        drop(s);
        let s = Store::open(data.path(), &u, None).unwrap();
        assert_eq!(s.snapshot().props.tenant_id, "t1");
        assert_eq!(s.snapshot().keys["k1"].versions.len(), 1);
        // The database file does not contain the private key in clear.
        drop(s);
        let raw = std::fs::read(data.path().join("vault.db")).unwrap();
        let wal = std::fs::read(data.path().join("vault.db-wal")).unwrap_or_default();
        let needle = &key.pkcs8()[40..72];
        assert!(!raw.windows(32).any(|w| w == needle));
        assert!(!wal.windows(32).any(|w| w == needle));
        let other = tempfile::tempdir().unwrap();
        let err = Store::open(data.path(), &unseal(other.path()), None).unwrap_err();
        assert!(err.to_string().contains("does not match"), "{err}");
    }

    #[test]
    fn permissions_are_canonical() {
        assert_eq!(canonical_permission("WRAPKEY"), Some("wrapKey"));
        assert_eq!(canonical_permission("fly"), None);
    }
}
