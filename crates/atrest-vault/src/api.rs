//! The data plane: Azure Key Vault keys REST API (api-version 7.x and
//! 2025-07-01) for RSA keys. Every operation authenticates, passes the
//! firewall, checks its access-policy permission, and only then acts.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::{json, Map, Value};

use crate::b64;
use crate::error::ApiError;
use crate::keys::{EncAlg, RsaKey, SignAlg};
use crate::server::{App, AuditInfo, Req, Resp};
use crate::store::{
    new_version, Dependent, Dependents, Identity, KeyEntry, KeyStateMeta, KeyVersion, State,
    VaultProps, VersionMeta,
};

pub const ALL_KEY_OPS: &[&str] = &[
    "encrypt",
    "decrypt",
    "sign",
    "verify",
    "wrapKey",
    "unwrapKey",
];
const MAX_PAGE: usize = 25;
const MAX_TAGS: usize = 15;

/// One routed operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Create,
    Import,
    Get,
    List,
    ListVersions,
    Update,
    Rotate,
    Delete,
    GetDeleted,
    ListDeleted,
    Recover,
    Purge,
    Backup,
    Restore,
    Encrypt,
    Decrypt,
    Wrap,
    Unwrap,
    Sign,
    Verify,
    GetRotationPolicy,
    SetRotationPolicy,
    RegisterDependent,
    UnregisterDependent,
    ListDependents,
}

impl Op {
    /// The access-policy permission the operation needs.
    pub fn permission(self) -> &'static str {
        match self {
            Op::Create => "create",
            Op::Import => "import",
            Op::Get | Op::GetDeleted => "get",
            Op::List | Op::ListVersions | Op::ListDeleted => "list",
            Op::Update => "update",
            Op::Rotate => "rotate",
            Op::Delete => "delete",
            Op::Recover => "recover",
            Op::Purge => "purge",
            Op::Backup => "backup",
            Op::Restore => "restore",
            Op::Encrypt => "encrypt",
            Op::Decrypt => "decrypt",
            Op::Wrap => "wrapKey",
            Op::Unwrap => "unwrapKey",
            Op::Sign => "sign",
            Op::Verify => "verify",
            Op::GetRotationPolicy => "getrotationpolicy",
            Op::SetRotationPolicy => "setrotationpolicy",
            // Depending on a key needs only the right to read it.
            Op::RegisterDependent | Op::UnregisterDependent | Op::ListDependents => "get",
        }
    }
    /// Azure's AuditEvent operationName.
    pub fn audit_name(self) -> &'static str {
        match self {
            Op::Create => "KeyCreate",
            Op::Import => "KeyImport",
            Op::Get => "KeyGet",
            Op::List => "KeyList",
            Op::ListVersions => "KeyListVersions",
            Op::Update => "KeyUpdate",
            Op::Rotate => "KeyRotate",
            Op::Delete => "KeyDelete",
            Op::GetDeleted => "KeyGetDeleted",
            Op::ListDeleted => "KeyListDeleted",
            Op::Recover => "KeyRecover",
            Op::Purge => "KeyPurge",
            Op::Backup => "KeyBackup",
            Op::Restore => "KeyRestore",
            Op::Encrypt => "KeyEncrypt",
            Op::Decrypt => "KeyDecrypt",
            Op::Wrap => "KeyWrap",
            Op::Unwrap => "KeyUnwrap",
            Op::Sign => "KeySign",
            Op::Verify => "KeyVerify",
            Op::GetRotationPolicy => "KeyRotationPolicyGet",
            Op::SetRotationPolicy => "KeyRotationPolicySet",
            Op::RegisterDependent => "KeyDependentRegister",
            Op::UnregisterDependent => "KeyDependentUnregister",
            Op::ListDependents => "KeyDependentList",
        }
    }
    /// The key operation (`key_ops` entry) a cryptographic op needs.
    fn key_op(self) -> Option<&'static str> {
        match self {
            Op::Encrypt => Some("encrypt"),
            Op::Decrypt => Some("decrypt"),
            Op::Wrap => Some("wrapKey"),
            Op::Unwrap => Some("unwrapKey"),
            Op::Sign => Some("sign"),
            Op::Verify => Some("verify"),
            _ => None,
        }
    }
}

/// Maps method and path to an operation, key name and version.
pub fn route(req: &Req) -> Result<(Op, Option<String>, Option<String>), ApiError> {
    let s: Vec<&str> = req.segments.iter().map(String::as_str).collect();
    let m = req.method.as_str();
    let name = |i: usize| Some(s[i].to_string());
    let r = match (s.as_slice(), m) {
        (["keys"], "GET") | (["keys", ""], "GET") => (Op::List, None, None),
        (["keys", "restore"], "POST") => (Op::Restore, None, None),
        (["keys", _], "GET") => (Op::Get, name(1), Some(String::new())),
        (["keys", _], "PUT") => (Op::Import, name(1), None),
        (["keys", _], "DELETE") => (Op::Delete, name(1), None),
        (["keys", _], "PATCH") => (Op::Update, name(1), Some(String::new())),
        (["keys", _, "create"], "POST") => (Op::Create, name(1), None),
        (["keys", _, "versions"], "GET") => (Op::ListVersions, name(1), None),
        (["keys", _, "rotate"], "POST") => (Op::Rotate, name(1), None),
        (["keys", _, "backup"], "POST") => (Op::Backup, name(1), None),
        (["keys", _, "rotationpolicy"], "GET") => (Op::GetRotationPolicy, name(1), None),
        (["keys", _, "rotationpolicy"], "PUT") => (Op::SetRotationPolicy, name(1), None),
        (["keys", _, "dependents"], "GET") => (Op::ListDependents, name(1), None),
        (["keys", _, _, "dependents"], "GET") => (Op::ListDependents, name(1), name(2)),
        (["keys", _, _, "dependents", _], "PUT") => (Op::RegisterDependent, name(1), name(2)),
        (["keys", _, _, "dependents", _], "DELETE") => (Op::UnregisterDependent, name(1), name(2)),
        (["keys", _, _], "GET") => (Op::Get, name(1), name(2)),
        (["keys", _, _], "PATCH") => (Op::Update, name(1), name(2)),
        (["keys", _, _, op], "POST") => {
            let op = match op.to_ascii_lowercase().as_str() {
                "wrapkey" => Op::Wrap,
                "unwrapkey" => Op::Unwrap,
                "encrypt" => Op::Encrypt,
                "decrypt" => Op::Decrypt,
                "sign" => Op::Sign,
                "verify" => Op::Verify,
                _ => return Err(not_found(req)),
            };
            (op, name(1), name(2))
        }
        (["deletedkeys"], "GET") => (Op::ListDeleted, None, None),
        (["deletedkeys", _], "GET") => (Op::GetDeleted, name(1), None),
        (["deletedkeys", _], "DELETE") => (Op::Purge, name(1), None),
        (["deletedkeys", _, "recover"], "POST") => (Op::Recover, name(1), None),
        _ => return Err(not_found(req)),
    };
    if let Some(n) = &r.1 {
        validate_name(n)?;
    }
    Ok(r)
}

fn not_found(req: &Req) -> ApiError {
    ApiError::new(
        404,
        "NotFound",
        format!(
            "{} /{} is not an operation of this vault",
            req.method,
            req.segments.join("/")
        ),
    )
}

fn validate_name(n: &str) -> Result<(), ApiError> {
    if n.is_empty() || n.len() > 127 || !n.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
        return Err(ApiError::bad_parameter(
            "key names are 1-127 characters from 0-9, a-z, A-Z and '-'",
        ));
    }
    Ok(())
}

fn denied(id: &Identity, perm: &str, req: &Req) -> ApiError {
    ApiError::forbidden(
        format!(
            "The user, group or application 'appid={};oid={}' does not have keys {perm} permission on key vault '{}'. Grant it with: atrest vault policy set {} --add {perm}",
            id.client_id, id.client_id, req.host, id.client_id
        ),
        "AccessDenied",
    )
}

pub fn dispatch(app: &App, req: &Req, info: &mut AuditInfo) -> Result<Resp, ApiError> {
    info.operation = "Authentication".into();
    // Route first only for the audit name; authentication comes before
    // anything is revealed about the path.
    let routed = route(req);
    if let Ok((op, name, version)) = &routed {
        info.operation = op.audit_name().into();
        info.key_name = name.clone();
        info.key_version = version.clone().filter(|v| !v.is_empty());
    }
    let id = app.authenticate(req, info)?;
    if !req.query.contains_key("api-version") {
        return Err(ApiError::bad_parameter(
            "the api-version query parameter is required",
        ));
    }
    let (op, name, version) = routed?;
    if !id.key_permissions.contains(op.permission()) {
        return Err(denied(&id, op.permission(), req));
    }
    let name = name.unwrap_or_default();
    let version = version.unwrap_or_default();
    match op {
        Op::Create => create(app, req, info, &name),
        Op::Import => import(app, req, info, &name),
        Op::Get => {
            let snap = app.store.snapshot();
            let e = live_key(&snap, &name)?;
            let v = e
                .version(&version)
                .ok_or_else(|| version_not_found(&name, &version))?;
            Ok(Resp::ok(key_bundle(req, &snap.props, e, v)))
        }
        Op::List => list_keys(app, req, false),
        Op::ListDeleted => list_keys(app, req, true),
        Op::ListVersions => list_versions(app, req, &name),
        Op::Update => update(app, req, info, &name, &version),
        Op::Rotate => rotate(app, req, &name, info),
        Op::Delete => delete(app, req, info, &name),
        Op::GetDeleted => {
            let snap = app.store.snapshot();
            let e = deleted_key(&snap, &name)?;
            Ok(Resp::ok(deleted_bundle(req, &snap.props, e)))
        }
        Op::Recover => recover(app, req, info, &name),
        Op::Purge => purge(app, req, info, &name),
        Op::Backup => crate::backup::backup(app, &name),
        Op::Restore => crate::backup::restore(app, req, info),
        Op::GetRotationPolicy => {
            let snap = app.store.snapshot();
            let e = live_key(&snap, &name)?;
            let mut p = e
                .state
                .rotation_policy
                .clone()
                .unwrap_or_else(|| json!({"lifetimeActions": [], "attributes": {}}));
            p["id"] = json!(format!("{}/keys/{name}/rotationpolicy", req.base()));
            Ok(Resp::ok(p))
        }
        Op::SetRotationPolicy => set_rotation_policy(app, req, info, &name),
        Op::RegisterDependent => register_dependent(app, req, info, &id, &name, &version),
        Op::UnregisterDependent => {
            let dep = req.segments.get(4).cloned().unwrap_or_default();
            unregister_dependent(app, req, info, Some(&id), &name, &version, &dep)
        }
        Op::ListDependents => list_dependents(app, &name, &version),
        Op::Encrypt | Op::Decrypt | Op::Wrap | Op::Unwrap | Op::Sign | Op::Verify => {
            crypto_op(app, req, op, &name, &version, info)
        }
    }
}

pub fn live_key<'a>(st: &'a State, name: &str) -> Result<&'a KeyEntry, ApiError> {
    match st.keys.get(name) {
        Some(e) if !e.is_deleted() => Ok(e),
        _ => Err(ApiError::key_not_found(name)),
    }
}

fn deleted_key<'a>(st: &'a State, name: &str) -> Result<&'a KeyEntry, ApiError> {
    match st.keys.get(name) {
        Some(e) if e.is_deleted() => Ok(e),
        _ => Err(ApiError::new(
            404,
            "KeyNotFound",
            format!("Deleted Key not found: {name}"),
        )),
    }
}

fn version_not_found(name: &str, version: &str) -> ApiError {
    ApiError::new(
        404,
        "KeyNotFound",
        format!("A key with (name/id) {name}/{version} was not found in this key vault."),
    )
}

fn deleted_conflict(name: &str) -> ApiError {
    ApiError::conflict(format!(
        "Key {name} is currently in a deleted but recoverable state, and its name cannot be reused; in this state, the key can only be recovered or purged."
    ))
    .inner("ObjectIsDeletedButRecoverable")
}

pub fn recovery_level(p: &VaultProps) -> &'static str {
    if p.purge_protection {
        "Recoverable"
    } else {
        "Recoverable+Purgeable"
    }
}

pub fn attributes_json(p: &VaultProps, m: &VersionMeta) -> Value {
    let mut a = json!({
        "enabled": m.enabled,
        "created": m.created,
        "updated": m.updated,
        "recoveryLevel": recovery_level(p),
        "recoverableDays": p.soft_delete_retention_days,
        "exportable": false,
    });
    if let Some(n) = m.nbf {
        a["nbf"] = json!(n);
    }
    if let Some(x) = m.exp {
        a["exp"] = json!(x);
    }
    a
}

pub fn kid(req: &Req, name: &str, version: &str) -> String {
    format!("{}/keys/{name}/{version}", req.base())
}

pub fn key_bundle(req: &Req, p: &VaultProps, e: &KeyEntry, v: &KeyVersion) -> Value {
    let mut b = json!({
        "key": v.key.public_jwk(&kid(req, &e.name, &v.meta.version), &v.meta.key_ops),
        "attributes": attributes_json(p, &v.meta),
    });
    if !v.meta.tags.is_empty() {
        b["tags"] = json!(v.meta.tags);
    }
    b
}

fn deleted_bundle(req: &Req, p: &VaultProps, e: &KeyEntry) -> Value {
    let mut b = key_bundle(req, p, e, e.current());
    b["recoveryId"] = json!(format!("{}/deletedkeys/{}", req.base(), e.name));
    b["deletedDate"] = json!(e.state.deleted_date);
    b["scheduledPurgeDate"] = json!(e.state.scheduled_purge_date);
    b
}

/// Parsed `attributes`, `tags` and `key_ops` of a create/import/update body.
#[derive(Default)]
struct Settings {
    enabled: Option<bool>,
    nbf: Option<Option<i64>>,
    exp: Option<Option<i64>>,
    tags: Option<BTreeMap<String, String>>,
    key_ops: Option<Vec<String>>,
}

fn opt_time(a: &Map<String, Value>, k: &str) -> Result<Option<Option<i64>>, ApiError> {
    match a.get(k) {
        None => Ok(None),
        Some(Value::Null) => Ok(Some(None)),
        Some(v) => v.as_i64().map(|t| Some(Some(t))).ok_or_else(|| {
            ApiError::bad_parameter(format!("attributes.{k} must be a Unix time in seconds"))
        }),
    }
}

fn settings(body: &Value) -> Result<Settings, ApiError> {
    let mut s = Settings::default();
    match body.get("attributes") {
        None | Some(Value::Null) => {}
        Some(Value::Object(a)) => {
            s.enabled = match a.get("enabled") {
                None | Some(Value::Null) => None,
                Some(Value::Bool(b)) => Some(*b),
                Some(_) => {
                    return Err(ApiError::bad_parameter(
                        "attributes.enabled must be true or false",
                    ))
                }
            };
            s.nbf = opt_time(a, "nbf")?;
            s.exp = opt_time(a, "exp")?;
        }
        Some(_) => return Err(ApiError::bad_parameter("attributes must be an object")),
    }
    match body.get("tags") {
        None | Some(Value::Null) => {}
        Some(Value::Object(t)) => {
            if t.len() > MAX_TAGS {
                return Err(ApiError::bad_parameter(format!(
                    "at most {MAX_TAGS} tags are allowed"
                )));
            }
            let mut tags = BTreeMap::new();
            for (k, v) in t {
                let v = v.as_str().ok_or_else(|| {
                    ApiError::bad_parameter(format!("tag '{k}' must have a string value"))
                })?;
                if k.len() > 512 || v.len() > 256 {
                    return Err(ApiError::bad_parameter(
                        "tag names are at most 512 and values 256 characters",
                    ));
                }
                tags.insert(k.clone(), v.to_string());
            }
            s.tags = Some(tags);
        }
        Some(_) => return Err(ApiError::bad_parameter("tags must be an object of strings")),
    }
    match body.get("key_ops") {
        None | Some(Value::Null) => {}
        Some(Value::Array(ops)) => {
            let mut out = Vec::new();
            for o in ops {
                let o = o.as_str().unwrap_or("");
                let canon = ALL_KEY_OPS
                    .iter()
                    .find(|k| k.eq_ignore_ascii_case(o))
                    .ok_or_else(|| {
                        ApiError::bad_parameter(format!(
                            "key operation '{o}' is not valid for RSA keys; use {}",
                            ALL_KEY_OPS.join(", ")
                        ))
                    })?;
                if !out.iter().any(|x: &String| x == canon) {
                    out.push(canon.to_string());
                }
            }
            s.key_ops = Some(out);
        }
        Some(_) => {
            return Err(ApiError::bad_parameter(
                "key_ops must be an array of strings",
            ))
        }
    }
    if let (Some(Some(n)), Some(Some(x))) = (s.nbf, s.exp) {
        if x <= n {
            return Err(ApiError::bad_parameter(
                "attributes.exp must be after attributes.nbf",
            ));
        }
    }
    Ok(s)
}

fn new_meta(st: &mut State, now: i64, s: &Settings, kty: &str) -> VersionMeta {
    VersionMeta {
        version: new_version(),
        seq: st.next_seq(),
        created: now,
        updated: now,
        enabled: s.enabled.unwrap_or(true),
        nbf: s.nbf.flatten(),
        exp: s.exp.flatten(),
        key_ops: s
            .key_ops
            .clone()
            .unwrap_or_else(|| ALL_KEY_OPS.iter().map(|s| s.to_string()).collect()),
        tags: s.tags.clone().unwrap_or_default(),
        kty: kty.to_string(),
    }
}

/// Adds a new version to a key (creating the key if needed).
fn add_version(
    app: &App,
    req: &Req,
    info: &mut AuditInfo,
    name: &str,
    key: RsaKey,
    s: &Settings,
) -> Result<Resp, ApiError> {
    let now = app.clock.now();
    let key = Arc::new(key);
    app.mutate(req, info, |st, tx| {
        if st.keys.get(name).is_some_and(KeyEntry::is_deleted) {
            return Err(deleted_conflict(name));
        }
        let meta = new_meta(st, now, s, "RSA");
        let v = KeyVersion {
            meta,
            key: key.clone(),
        };
        tx.put_version(name, &v)?;
        let e = st.keys.entry(name.to_string()).or_insert_with(|| KeyEntry {
            name: name.to_string(),
            versions: vec![],
            state: KeyStateMeta::default(),
        });
        if e.versions.is_empty() {
            tx.put_state(name, &e.state)?;
        }
        e.versions.push(v);
        Ok(Resp::ok(key_bundle(req, &st.props, e, e.current())))
    })
}

fn create(app: &App, req: &Req, info: &mut AuditInfo, name: &str) -> Result<Resp, ApiError> {
    let body = req.json()?;
    let kty = body.get("kty").and_then(Value::as_str).unwrap_or("");
    match kty {
        "RSA" => {}
        "RSA-HSM" => {
            return Err(ApiError::bad_parameter(
                "kty RSA-HSM is not available: this vault keeps keys in software; use kty RSA",
            ))
        }
        "" => {
            return Err(ApiError::bad_parameter(
                "kty is required; this vault creates RSA keys",
            ))
        }
        other => {
            return Err(ApiError::bad_parameter(format!(
                "kty '{other}' is not supported; this vault creates RSA keys"
            )))
        }
    }
    let bits = match body.get("key_size") {
        None | Some(Value::Null) => 2048,
        Some(v) => v
            .as_u64()
            .ok_or_else(|| ApiError::bad_parameter("key_size must be 2048, 3072 or 4096"))?
            as u32,
    };
    if let Some(e) = body.get("public_exponent").filter(|v| !v.is_null()) {
        if e.as_u64() != Some(65537) {
            return Err(ApiError::bad_parameter("public_exponent must be 65537"));
        }
    }
    let s = settings(&body)?;
    if app
        .store
        .snapshot()
        .keys
        .get(name)
        .is_some_and(KeyEntry::is_deleted)
    {
        return Err(deleted_conflict(name));
    }
    let key = RsaKey::generate(bits)?;
    add_version(app, req, info, name, key, &s)
}

fn import(app: &App, req: &Req, info: &mut AuditInfo, name: &str) -> Result<Resp, ApiError> {
    let body = req.json()?;
    let key = match body.get("key") {
        Some(jwk @ Value::Object(_)) => RsaKey::from_jwk(jwk)?,
        _ => {
            return Err(ApiError::bad_parameter(
                "'key' (a JSON web key with private components) is required",
            ))
        }
    };
    let s = settings(&body)?;
    add_version(app, req, info, name, key, &s)
}

fn update(
    app: &App,
    req: &Req,
    info: &mut AuditInfo,
    name: &str,
    version: &str,
) -> Result<Resp, ApiError> {
    let body = req.json()?;
    let s = settings(&body)?;
    let now = app.clock.now();
    let force = forced(req)?;
    if force && s.enabled == Some(false) {
        // Audited as forced when it overrides registered dependents.
        let snap = app.store.snapshot();
        let target = snap.keys.get(name).and_then(|e| e.version(version));
        if let Some(t) = target {
            let deps = dependents_json(
                snap.key_dependents(name)
                    .into_iter()
                    .filter(|(v, _)| *v == t.meta.version),
            );
            if !deps.is_empty() && t.meta.enabled {
                info.forced = true;
                info.extra = Some(json!({"overriddenDependents": deps}));
            }
        }
    }
    app.mutate(req, info, |st, tx| {
        let props = st.props.clone();
        let e = match st.keys.get_mut(name) {
            Some(e) if !e.is_deleted() => e,
            _ => return Err(ApiError::key_not_found(name)),
        };
        let idx = if version.is_empty() {
            e.versions.len() - 1
        } else {
            e.versions
                .iter()
                .position(|v| v.meta.version == version)
                .ok_or_else(|| version_not_found(name, version))?
        };
        if s.enabled == Some(false) && e.versions[idx].meta.enabled {
            let deps: Vec<(&str, &Dependent)> = dependents_of(&st.dependents, name)
                .into_iter()
                .filter(|(v, _)| *v == e.versions[idx].meta.version)
                .collect();
            if !deps.is_empty() && !force {
                return Err(key_in_use(name, "disabled", &deps));
            }
        }
        let v = &mut e.versions[idx];
        let m = &mut v.meta;
        if let Some(b) = s.enabled {
            m.enabled = b;
        }
        if let Some(n) = s.nbf {
            m.nbf = n;
        }
        if let Some(x) = s.exp {
            m.exp = x;
        }
        if let (Some(n), Some(x)) = (m.nbf, m.exp) {
            if x <= n {
                return Err(ApiError::bad_parameter(
                    "attributes.exp must be after attributes.nbf",
                ));
            }
        }
        if let Some(t) = &s.tags {
            m.tags = t.clone();
        }
        if let Some(o) = &s.key_ops {
            m.key_ops = o.clone();
        }
        m.updated = now;
        tx.put_version(name, v)?;
        let e = &st.keys[name];
        Ok(Resp::ok(key_bundle(req, &props, e, &e.versions[idx])))
    })
}

fn rotate(app: &App, req: &Req, name: &str, info: &mut AuditInfo) -> Result<Resp, ApiError> {
    let snap = app.store.snapshot();
    let cur = live_key(&snap, name)?.current();
    let bits = cur.key.bits() as u32;
    let policy = live_key(&snap, name)?.state.rotation_policy.clone();
    let s = Settings {
        tags: Some(cur.meta.tags.clone()),
        key_ops: Some(cur.meta.key_ops.clone()),
        exp: crate::lifecycle::policy_exp(policy.as_ref(), app.clock.now()).map(Some),
        ..Default::default()
    };
    drop(snap);
    let key = RsaKey::generate(bits)?;
    let r = add_version(app, req, info, name, key, &s)?;
    if let Some(k) = r.body.as_ref().and_then(|b| b["key"]["kid"].as_str()) {
        info.key_version = k.rsplit('/').next().map(str::to_string);
    }
    Ok(r)
}

fn delete(app: &App, req: &Req, info: &mut AuditInfo, name: &str) -> Result<Resp, ApiError> {
    let now = app.clock.now();
    app.mutate(req, info, |st, tx| {
        let days = st.props.soft_delete_retention_days as i64;
        let props = st.props.clone();
        let e = match st.keys.get_mut(name) {
            Some(e) if !e.is_deleted() => e,
            _ => return Err(ApiError::key_not_found(name)),
        };
        if e.state.locked {
            return Err(ApiError::conflict(format!(
                "Key {name} has a delete lock and cannot be deleted; an administrator must remove it first (atrest vault lock remove {name})."
            ))
            .inner("KeyDeleteLocked"));
        }
        e.state.deleted_date = Some(now);
        e.state.scheduled_purge_date = Some(now + days * 86_400);
        tx.put_state(name, &e.state)?;
        Ok(Resp::ok(deleted_bundle(req, &props, e)))
    })
}

fn recover(app: &App, req: &Req, info: &mut AuditInfo, name: &str) -> Result<Resp, ApiError> {
    app.mutate(req, info, |st, tx| {
        let props = st.props.clone();
        let e = match st.keys.get_mut(name) {
            Some(e) if e.is_deleted() => e,
            _ => {
                return Err(ApiError::new(
                    404,
                    "KeyNotFound",
                    format!("Deleted Key not found: {name}"),
                ))
            }
        };
        e.state.deleted_date = None;
        e.state.scheduled_purge_date = None;
        tx.put_state(name, &e.state)?;
        Ok(Resp::ok(key_bundle(req, &props, e, e.current())))
    })
}

fn purge(app: &App, req: &Req, info: &mut AuditInfo, name: &str) -> Result<Resp, ApiError> {
    let force = forced(req)?;
    if force {
        let snap = app.store.snapshot();
        let deps = dependents_json(snap.key_dependents(name));
        if !deps.is_empty() && snap.keys.get(name).is_some_and(KeyEntry::is_deleted) {
            info.forced = true;
            info.extra = Some(json!({"overriddenDependents": deps}));
        }
    }
    app.mutate(req, info, |st, tx| {
        match st.keys.get(name) {
            Some(e) if e.is_deleted() => {}
            _ => return Err(ApiError::new(404, "KeyNotFound", format!("Deleted Key not found: {name}"))),
        }
        if st.props.purge_protection {
            return Err(ApiError::forbidden(
                format!("Operation \"purge\" is not allowed because purge protection is enabled for this vault. Key {name} will be purged automatically after its retention period."),
                "PurgeProtectionEnabled",
            ));
        }
        let deps = st.key_dependents(name);
        if !deps.is_empty() && !force {
            return Err(key_in_use(name, "purged", &deps));
        }
        tx.delete_key(name)?;
        tx.delete_key_dependents(name)?;
        st.keys.remove(name);
        st.dependents.remove(name);
        Ok(Resp { status: 204, body: None })
    })
}

fn set_rotation_policy(
    app: &App,
    req: &Req,
    info: &mut AuditInfo,
    name: &str,
) -> Result<Resp, ApiError> {
    let body = req.json()?;
    crate::lifecycle::validate_policy(&body)?;
    app.mutate(req, info, |st, tx| {
        let e = match st.keys.get_mut(name) {
            Some(e) if !e.is_deleted() => e,
            _ => return Err(ApiError::key_not_found(name)),
        };
        let mut p = body.clone();
        p.as_object_mut().map(|o| o.remove("id"));
        e.state.rotation_policy = Some(p.clone());
        tx.put_state(name, &e.state)?;
        p["id"] = json!(format!("{}/keys/{name}/rotationpolicy", req.base()));
        Ok(Resp::ok(p))
    })
}

/// `force=true` (or `false`/absent) in the query.
fn forced(req: &Req) -> Result<bool, ApiError> {
    match req.query.get("force").map(String::as_str) {
        None | Some("false") => Ok(false),
        Some("true") => Ok(true),
        Some(other) => Err(ApiError::bad_parameter(format!(
            "force must be true or false, not '{other}'"
        ))),
    }
}

fn dependents_of<'a>(d: &'a Dependents, name: &str) -> Vec<(&'a str, &'a Dependent)> {
    d.get(name)
        .into_iter()
        .flat_map(|vs| {
            vs.iter()
                .flat_map(|(v, ds)| ds.values().map(move |d| (v.as_str(), d)))
        })
        .collect()
}

/// The dependent's JSON (`{"id","name","description","clientId","registered"}`).
pub fn dependent_json(d: &Dependent) -> Value {
    json!({
        "id": d.id,
        "name": d.name,
        "description": d.description,
        "clientId": d.client_id,
        "registered": d.registered,
    })
}

fn dependents_json<'a>(deps: impl IntoIterator<Item = (&'a str, &'a Dependent)>) -> Vec<Value> {
    deps.into_iter()
        .map(|(v, d)| {
            let mut j = dependent_json(d);
            j["version"] = json!(v);
            j
        })
        .collect()
}

/// 409 `Conflict` / `KeyInUse`, naming every dependent and the way out.
pub fn key_in_use(name: &str, what: &str, deps: &[(&str, &Dependent)]) -> ApiError {
    let list: Vec<String> = deps
        .iter()
        .map(|(v, d)| {
            format!(
                "server '{}' (id {}, key version {v}, registered by client {})",
                d.name, d.id, d.client_id
            )
        })
        .collect();
    ApiError::conflict(format!(
        "Key {name} cannot be {what}: {} dependent(s) still use it: {}. Rewrap those servers to another key first (each then unregisters its dependency), or repeat the request with force=true to accept that they become inaccessible.",
        deps.len(),
        list.join("; ")
    ))
    .inner("KeyInUse")
}

fn guid(s: &str, what: &str) -> Result<String, ApiError> {
    crate::admin::parse_client_id(s)
        .map_err(|_| ApiError::bad_parameter(format!("{what} '{s}' is not a GUID")))
}

fn register_dependent(
    app: &App,
    req: &Req,
    info: &mut AuditInfo,
    caller: &Identity,
    name: &str,
    version: &str,
) -> Result<Resp, ApiError> {
    if version.is_empty() {
        return Err(ApiError::bad_parameter(
            "a dependent depends on one key version: /keys/{name}/{version}/dependents/{id}",
        ));
    }
    let dep_id = guid(
        req.segments.get(4).map(String::as_str).unwrap_or(""),
        "the dependent id",
    )?;
    let body = req.json()?;
    let dname = body
        .get("name")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty() && n.len() <= 256)
        .ok_or_else(|| ApiError::bad_parameter("'name' (1-256 characters) is required"))?
        .to_string();
    let description = match body.get("description") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(d)) if d.len() <= 1024 => d.clone(),
        Some(_) => {
            return Err(ApiError::bad_parameter(
                "'description' must be a string of at most 1024 characters",
            ))
        }
    };
    let now = app.clock.now();
    let caller_id = caller.client_id.clone();
    app.mutate(req, info, |st, tx| {
        let e = live_key(st, name)?;
        if e.version(version).is_none() || version.is_empty() {
            return Err(version_not_found(name, version));
        }
        let slot = st
            .dependents
            .entry(name.to_string())
            .or_default()
            .entry(version.to_string())
            .or_default();
        let registered = match slot.get(&dep_id) {
            Some(old) if old.client_id != caller_id => {
                return Err(ApiError::conflict(format!(
                    "dependent {dep_id} on key {name}/{version} was registered by another identity ({}); only it or an administrator can change it",
                    old.client_id
                ))
                .inner("DependentOwnedByAnother"))
            }
            Some(old) => old.registered,
            None => now,
        };
        let d = Dependent {
            id: dep_id.clone(),
            name: dname.clone(),
            description: description.clone(),
            client_id: caller_id.clone(),
            registered,
        };
        tx.put_dependent(name, version, &d)?;
        slot.insert(dep_id.clone(), d.clone());
        Ok(Resp::ok(dependent_json(&d)))
    })
}

/// Removes a registration: by the identity that made it (`caller`), or by
/// an administrator (`caller` None).
pub fn unregister_dependent(
    app: &App,
    req: &Req,
    info: &mut AuditInfo,
    caller: Option<&Identity>,
    name: &str,
    version: &str,
    dep_id: &str,
) -> Result<Resp, ApiError> {
    let dep_id = guid(dep_id, "the dependent id")?;
    app.mutate(req, info, |st, tx| {
        if !st.keys.contains_key(name) {
            return Err(ApiError::key_not_found(name));
        }
        // Idempotent: removing a registration that is not there (already
        // removed, or a retry) is 204 as well.
        let done = || Resp {
            status: 204,
            body: None,
        };
        let Some(versions) = st.dependents.get_mut(name) else {
            return Ok(done());
        };
        let Some(ds) = versions.get_mut(version) else {
            return Ok(done());
        };
        let Some(d) = ds.get(&dep_id) else {
            return Ok(done());
        };
        if let Some(c) = caller {
            if c.client_id != d.client_id {
                return Err(ApiError::forbidden(
                    format!(
                        "dependent {dep_id} on key {name}/{version} was registered by another identity ({}); only it or an administrator can remove it",
                        d.client_id
                    ),
                    "DependentOwnedByAnother",
                ));
            }
        }
        ds.remove(&dep_id);
        if ds.is_empty() {
            versions.remove(version);
        }
        if versions.is_empty() {
            st.dependents.remove(name);
        }
        tx.delete_dependent(name, version, &dep_id)?;
        Ok(Resp {
            status: 204,
            body: None,
        })
    })
}

/// `GET /keys/{name}/{version}/dependents` (or every version's, each item
/// with its `version`, when `version` is empty).
pub fn list_dependents(app: &App, name: &str, version: &str) -> Result<Resp, ApiError> {
    let snap = app.store.snapshot();
    let e = snap
        .keys
        .get(name)
        .ok_or_else(|| ApiError::key_not_found(name))?;
    if version.is_empty() {
        return Ok(Resp::ok(
            json!({"value": dependents_json(snap.key_dependents(name))}),
        ));
    }
    if !e.versions.iter().any(|v| v.meta.version == version) {
        return Err(version_not_found(name, version));
    }
    let items: Vec<Value> = snap
        .dependents
        .get(name)
        .and_then(|vs| vs.get(version))
        .map(|ds| ds.values().map(dependent_json).collect())
        .unwrap_or_default();
    Ok(Resp::ok(json!({"value": items})))
}

fn page_params(req: &Req) -> Result<(usize, usize), ApiError> {
    let max = match req.query.get("maxresults") {
        None => MAX_PAGE,
        Some(m) => m
            .parse::<usize>()
            .ok()
            .filter(|m| (1..=MAX_PAGE).contains(m))
            .ok_or_else(|| {
                ApiError::bad_parameter(format!("maxresults must be 1 to {MAX_PAGE}"))
            })?,
    };
    let skip = match req.query.get("$skiptoken") {
        None => 0,
        Some(t) => t
            .parse::<usize>()
            .map_err(|_| ApiError::bad_parameter("$skiptoken is not a token this vault issued"))?,
    };
    Ok((max, skip))
}

fn next_link(req: &Req, path: &str, skip: usize, max: usize, total: usize) -> Value {
    if skip + max >= total {
        return Value::Null;
    }
    let api = req
        .query
        .get("api-version")
        .map(String::as_str)
        .unwrap_or("7.4");
    json!(format!(
        "{}/{path}?api-version={api}&$skiptoken={}&maxresults={max}",
        req.base(),
        skip + max
    ))
}

fn list_keys(app: &App, req: &Req, deleted: bool) -> Result<Resp, ApiError> {
    let (max, skip) = page_params(req)?;
    let snap = app.store.snapshot();
    let all: Vec<&KeyEntry> = snap
        .keys
        .values()
        .filter(|e| e.is_deleted() == deleted)
        .collect();
    let items: Vec<Value> = all
        .iter()
        .skip(skip)
        .take(max)
        .map(|e| {
            let v = e.current();
            let mut item = json!({
                "kid": format!("{}/keys/{}", req.base(), e.name),
                "attributes": attributes_json(&snap.props, &v.meta),
            });
            if !v.meta.tags.is_empty() {
                item["tags"] = json!(v.meta.tags);
            }
            if deleted {
                item["recoveryId"] = json!(format!("{}/deletedkeys/{}", req.base(), e.name));
                item["deletedDate"] = json!(e.state.deleted_date);
                item["scheduledPurgeDate"] = json!(e.state.scheduled_purge_date);
            }
            item
        })
        .collect();
    let path = if deleted { "deletedkeys" } else { "keys" };
    Ok(Resp::ok(
        json!({"value": items, "nextLink": next_link(req, path, skip, max, all.len())}),
    ))
}

fn list_versions(app: &App, req: &Req, name: &str) -> Result<Resp, ApiError> {
    let (max, skip) = page_params(req)?;
    let snap = app.store.snapshot();
    let e = live_key(&snap, name)?;
    let items: Vec<Value> = e
        .versions
        .iter()
        .skip(skip)
        .take(max)
        .map(|v| {
            let mut item = json!({
                "kid": kid(req, name, &v.meta.version),
                "attributes": attributes_json(&snap.props, &v.meta),
            });
            if !v.meta.tags.is_empty() {
                item["tags"] = json!(v.meta.tags);
            }
            item
        })
        .collect();
    Ok(Resp::ok(json!({
        "value": items,
        "nextLink": next_link(req, &format!("keys/{name}/versions"), skip, max, e.versions.len()),
    })))
}

fn b64_field(body: &Value, field: &str) -> Result<Vec<u8>, ApiError> {
    let s = body
        .get(field)
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::bad_parameter(format!("'{field}' is required (base64url)")))?;
    b64::decode(s)
        .ok_or_else(|| ApiError::bad_parameter(format!("'{field}' is not valid base64url")))
}

/// Refuses cryptographic use of disabled, not-yet-valid or expired keys
/// and of operations outside the key's `key_ops`.
pub fn check_usable(m: &VersionMeta, now: i64, op: &str) -> Result<(), ApiError> {
    if !m.enabled {
        return Err(ApiError::forbidden(
            format!("Operation {op} is not allowed on a disabled key."),
            "KeyDisabled",
        ));
    }
    if let Some(n) = m.nbf {
        if now < n {
            return Err(ApiError::forbidden(
                format!("Operation {op} is not allowed on a key that is not yet valid (nbf {n})."),
                "KeyNotYetValid",
            ));
        }
    }
    if let Some(x) = m.exp {
        if now >= x {
            return Err(ApiError::forbidden(
                format!("Operation {op} is not allowed on an expired key (exp {x})."),
                "KeyExpired",
            ));
        }
    }
    if !m.key_ops.iter().any(|o| o == op) {
        return Err(ApiError::forbidden(
            format!(
                "Operation {op} is not allowed by this key's key_ops ({}).",
                m.key_ops.join(", ")
            ),
            "KeyOperationForbidden",
        ));
    }
    Ok(())
}

fn crypto_op(
    app: &App,
    req: &Req,
    op: Op,
    name: &str,
    version: &str,
    info: &mut AuditInfo,
) -> Result<Resp, ApiError> {
    let body = req.json()?;
    let snap = app.store.snapshot();
    let e = live_key(&snap, name)?;
    let v = e
        .version(version)
        .ok_or_else(|| version_not_found(name, version))?;
    info.key_version = Some(v.meta.version.clone());
    let key_op = op.key_op().expect("crypto op");
    check_usable(&v.meta, app.clock.now(), key_op)?;
    let alg_s = body
        .get("alg")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::bad_parameter("'alg' is required"))?;
    let id = kid(req, name, &v.meta.version);
    match op {
        Op::Encrypt | Op::Decrypt | Op::Wrap | Op::Unwrap => {
            let alg = EncAlg::parse(alg_s)?;
            if alg == EncAlg::Rsa15 && !snap.props.allow_rsa15 {
                return Err(ApiError::bad_parameter(
                    "RSA1_5 is disabled on this vault: PKCS#1 v1.5 encryption is open to padding-oracle attacks (Bleichenbacher). Use RSA-OAEP-256, or have an administrator enable it (atrest vault props set --allow-rsa15).",
                ));
            }
            let value = b64_field(&body, "value")?;
            let out = match op {
                Op::Encrypt | Op::Wrap => v.key.encrypt(alg, &value)?,
                _ => v.key.decrypt(alg, &value)?.to_vec(),
            };
            // The plaintext leaves only in the response body.
            let encoded = b64::encode(&out);
            let mut out = out;
            zeroize::Zeroize::zeroize(&mut out);
            Ok(Resp::ok(json!({"kid": id, "value": encoded, "alg": alg_s})))
        }
        Op::Sign => {
            let alg = SignAlg::parse(alg_s)?;
            let digest = b64_field(&body, "value")?;
            let sig = v.key.sign(alg, &digest)?;
            Ok(Resp::ok(json!({"kid": id, "value": b64::encode(&sig)})))
        }
        Op::Verify => {
            let alg = SignAlg::parse(alg_s)?;
            let digest = b64_field(&body, "digest")?;
            let sig = b64_field(&body, "value")?;
            Ok(Resp::ok(
                json!({"value": v.key.verify(alg, &digest, &sig)?}),
            ))
        }
        _ => unreachable!("not a crypto op"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usability_checks() {
        let mut m = VersionMeta {
            version: "v".into(),
            seq: 1,
            created: 0,
            updated: 0,
            enabled: true,
            nbf: Some(100),
            exp: Some(200),
            key_ops: vec!["wrapKey".into()],
            tags: Default::default(),
            kty: "RSA".into(),
        };
        assert!(check_usable(&m, 150, "wrapKey").is_ok());
        assert_eq!(
            check_usable(&m, 50, "wrapKey")
                .unwrap_err()
                .inner
                .as_deref(),
            Some("KeyNotYetValid")
        );
        assert_eq!(
            check_usable(&m, 200, "wrapKey")
                .unwrap_err()
                .inner
                .as_deref(),
            Some("KeyExpired")
        );
        assert_eq!(
            check_usable(&m, 150, "sign").unwrap_err().inner.as_deref(),
            Some("KeyOperationForbidden")
        );
        m.enabled = false;
        assert_eq!(
            check_usable(&m, 150, "wrapKey")
                .unwrap_err()
                .inner
                .as_deref(),
            Some("KeyDisabled")
        );
    }

    #[test]
    fn settings_validation() {
        assert!(settings(&json!({"attributes": {"enabled": "yes"}})).is_err());
        assert!(settings(&json!({"attributes": {"nbf": 10, "exp": 5}})).is_err());
        assert!(settings(&json!({"key_ops": ["fly"]})).is_err());
        assert!(settings(&json!({"tags": {"a": 1}})).is_err());
        let s =
            settings(&json!({"key_ops": ["WRAPKEY", "unwrapKey"], "tags": {"a": "b"}})).unwrap();
        assert_eq!(s.key_ops.unwrap(), vec!["wrapKey", "unwrapKey"]);
        assert!(validate_name("ok-name-1").is_ok());
        assert!(validate_name("bad_name").is_err());
        assert!(validate_name("").is_err());
    }
}
