//! Key backup and restore: a key with all its versions as one opaque blob,
//! `"ATRVB1" || u16 tenant length || tenant || AES-256-GCM(JSON)`, sealed
//! with a key derived from the master key and the tenant, with the header
//! as AAD. It restores only into a vault of the same tenant that holds the
//! same unseal key (the vault itself after a purge, or a replica).

use std::sync::Arc;

use serde_json::{json, Value};
use zeroize::Zeroizing;

use crate::api::{key_bundle, live_key};
use crate::b64;
use crate::error::ApiError;
use crate::keys::RsaKey;
use crate::server::{App, AuditInfo, Req, Resp};
use crate::store::{KeyEntry, KeyStateMeta, KeyVersion, VersionMeta};

const MAGIC: &[u8] = b"ATRVB1";

fn header(tenant: &str) -> Vec<u8> {
    let mut h = MAGIC.to_vec();
    h.extend_from_slice(&(tenant.len() as u16).to_be_bytes());
    h.extend_from_slice(tenant.as_bytes());
    h
}

fn backup_key(app: &App, tenant: &str) -> crate::seal::SealKey {
    app.store
        .master()
        .derive(&format!("atrest-vault backup v1 tenant={tenant}"))
}

pub fn backup(app: &App, name: &str) -> Result<Resp, ApiError> {
    let snap = app.store.snapshot();
    let e = live_key(&snap, name)?;
    let versions: Vec<Value> = e
        .versions
        .iter()
        .map(|v| json!({"meta": v.meta, "pkcs8": b64::encode(v.key.pkcs8())}))
        .collect();
    let doc = Zeroizing::new(
        serde_json::to_vec(&json!({
            "name": name,
            "rotationPolicy": e.state.rotation_policy,
            "versions": versions,
        }))
        .map_err(|_| ApiError::internal("backup encoding failed"))?,
    );
    let tenant = &snap.props.tenant_id;
    let h = header(tenant);
    let sealed = backup_key(app, tenant).seal(&h, &doc);
    let mut blob = h;
    blob.extend_from_slice(&sealed);
    Ok(Resp::ok(json!({"value": b64::encode(&blob)})))
}

pub fn restore(app: &App, req: &Req, info: &mut AuditInfo) -> Result<Resp, ApiError> {
    let body = req.json()?;
    let blob = body
        .get("value")
        .and_then(Value::as_str)
        .and_then(b64::decode)
        .ok_or_else(|| ApiError::bad_parameter("'value' must be a base64url backup blob"))?;
    let bad = || {
        ApiError::bad_parameter("the backup blob is malformed or was not made by an atrest vault")
    };
    if blob.len() < MAGIC.len() + 2 || &blob[..MAGIC.len()] != MAGIC {
        return Err(bad());
    }
    let tl = u16::from_be_bytes([blob[6], blob[7]]) as usize;
    if blob.len() < 8 + tl {
        return Err(bad());
    }
    let tenant = std::str::from_utf8(&blob[8..8 + tl]).map_err(|_| bad())?;
    let snap = app.store.snapshot();
    if tenant != snap.props.tenant_id {
        return Err(ApiError::bad_parameter(format!(
            "the backup belongs to tenant {tenant}; this vault is tenant {} and restores only its own tenant's backups",
            snap.props.tenant_id
        ))
        .inner("BackupTenantMismatch"));
    }
    let doc = backup_key(app, tenant)
        .open(&blob[..8 + tl], &blob[8 + tl..])
        .map_err(|_| {
            ApiError::bad_parameter(
                "the backup blob failed authentication: it was altered, or made by a vault with a different unseal key",
            )
        })?;
    let doc: Value = serde_json::from_slice(&doc).map_err(|_| bad())?;
    let name = doc["name"].as_str().ok_or_else(bad)?.to_string();
    info.key_name = Some(name.clone());
    let mut versions = Vec::new();
    for v in doc["versions"].as_array().ok_or_else(bad)? {
        let meta: VersionMeta = serde_json::from_value(v["meta"].clone()).map_err(|_| bad())?;
        let pkcs8 = Zeroizing::new(v["pkcs8"].as_str().and_then(b64::decode).ok_or_else(bad)?);
        versions.push((meta, Arc::new(RsaKey::from_pkcs8(&pkcs8)?)));
    }
    if versions.is_empty() {
        return Err(bad());
    }
    let rotation_policy = doc.get("rotationPolicy").cloned().filter(|p| !p.is_null());
    app.mutate(req, info, |st, tx| {
        if let Some(e) = st.keys.get(&name) {
            return Err(if e.is_deleted() {
                ApiError::conflict(format!(
                    "Key {name} is currently in a deleted but recoverable state; recover or purge it before restoring."
                ))
                .inner("ObjectIsDeletedButRecoverable")
            } else {
                ApiError::conflict(format!("Key {name} already exists; restore refuses to overwrite it."))
            });
        }
        let mut entry = KeyEntry {
            name: name.clone(),
            versions: vec![],
            state: KeyStateMeta {
                rotation_policy: rotation_policy.clone(),
                ..Default::default()
            },
        };
        for (mut meta, key) in versions.clone() {
            meta.seq = st.next_seq();
            entry.versions.push(KeyVersion { meta, key });
        }
        tx.put_entry(&entry)?;
        let resp = key_bundle(req, &st.props, &entry, entry.current());
        st.keys.insert(name.clone(), entry);
        Ok(Resp::ok(resp))
    })
}
