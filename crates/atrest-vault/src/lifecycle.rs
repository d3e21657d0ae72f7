//! Background key lifecycle: purging soft-deleted keys whose retention has
//! passed, and executing rotation policies (`lifetimeActions` with a
//! `Rotate` action triggered `timeAfterCreate` or `timeBeforeExpiry`, and
//! `attributes.expiryTime` for the new version). Runs every 30 seconds and
//! whenever the test clock moves. Every action is audited (identity
//! `system`) before it commits.

use std::sync::Arc;

use serde_json::{json, Value};

use crate::error::{ApiError, VaultError};
use crate::keys::RsaKey;
use crate::server::App;
use crate::store::{new_version, KeyVersion, VersionMeta};

/// Seconds in an ISO 8601 duration such as `P90D`, `P1Y2M`, `PT12H`, `P2W`
/// (years are 365 days and months 30, as rotation policies need no more).
pub fn parse_duration(s: &str) -> Option<i64> {
    let rest = s.strip_prefix('P')?;
    if rest.is_empty() {
        return None;
    }
    let (date, time) = match rest.split_once('T') {
        Some((d, t)) if !t.is_empty() => (d, Some(t)),
        Some(_) => return None,
        None => (rest, None),
    };
    let mut total: i64 = 0;
    let mut parse = |part: &str, units: &[(char, i64)]| -> Option<()> {
        let mut num = String::new();
        let mut last_unit = 0usize;
        for c in part.chars() {
            if c.is_ascii_digit() {
                num.push(c);
                continue;
            }
            let idx = units.iter().position(|(u, _)| *u == c)?;
            if num.is_empty() || idx < last_unit {
                return None;
            }
            last_unit = idx;
            let n: i64 = num.parse().ok()?;
            total = total.checked_add(n.checked_mul(units[idx].1)?)?;
            num.clear();
        }
        num.is_empty().then_some(())
    };
    parse(
        date,
        &[
            ('Y', 365 * 86_400),
            ('M', 30 * 86_400),
            ('W', 7 * 86_400),
            ('D', 86_400),
        ],
    )?;
    if let Some(t) = time {
        parse(t, &[('H', 3600), ('M', 60), ('S', 1)])?;
    }
    Some(total)
}

/// Checks a rotation policy body; returns it normalised.
pub fn validate_policy(p: &Value) -> Result<(), ApiError> {
    let bad = |m: String| Err(ApiError::bad_parameter(m));
    if let Some(la) = p.get("lifetimeActions") {
        let Some(arr) = la.as_array() else {
            return bad("lifetimeActions must be an array".into());
        };
        for a in arr {
            let ty = a["action"]["type"].as_str().unwrap_or("");
            if !ty.eq_ignore_ascii_case("rotate") && !ty.eq_ignore_ascii_case("notify") {
                return bad(format!("action type '{ty}' is not Rotate or Notify"));
            }
            let t = &a["trigger"];
            let (after, before) = (t.get("timeAfterCreate"), t.get("timeBeforeExpiry"));
            match (
                after.and_then(Value::as_str),
                before.and_then(Value::as_str),
            ) {
                (Some(d), None) | (None, Some(d)) => {
                    if parse_duration(d).is_none_or(|s| s <= 0) {
                        return bad(format!("'{d}' is not an ISO 8601 duration such as P30D"));
                    }
                }
                _ => {
                    return bad(
                        "each trigger needs exactly one of timeAfterCreate or timeBeforeExpiry"
                            .into(),
                    )
                }
            }
        }
    }
    if let Some(e) = p["attributes"].get("expiryTime").filter(|e| !e.is_null()) {
        if e.as_str().and_then(parse_duration).is_none_or(|s| s <= 0) {
            return bad("attributes.expiryTime must be an ISO 8601 duration such as P90D".into());
        }
    }
    Ok(())
}

/// `exp` for a new version under `policy`, if it sets `expiryTime`.
pub fn policy_exp(policy: Option<&Value>, now: i64) -> Option<i64> {
    policy?["attributes"]["expiryTime"]
        .as_str()
        .and_then(parse_duration)
        .map(|d| now + d)
}

/// Whether the policy wants the key rotated now.
fn rotation_due(policy: &Value, current: &VersionMeta, now: i64) -> bool {
    policy["lifetimeActions"].as_array().is_some_and(|arr| {
        arr.iter().any(|a| {
            if !a["action"]["type"]
                .as_str()
                .unwrap_or("")
                .eq_ignore_ascii_case("rotate")
            {
                return false;
            }
            let t = &a["trigger"];
            if let Some(d) = t["timeAfterCreate"].as_str().and_then(parse_duration) {
                return now >= current.created + d;
            }
            if let (Some(d), Some(exp)) = (
                t["timeBeforeExpiry"].as_str().and_then(parse_duration),
                current.exp,
            ) {
                return now >= exp - d;
            }
            false
        })
    })
}

fn system_record(app: &App, op: &str, key: &str, version: Option<&str>) -> Value {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_millis())
        .unwrap_or(0);
    let base = format!("https://{}", app.listen);
    json!({
        "time": crate::timefmt::rfc3339(app.clock.now(), ms),
        "resourceId": base,
        "operationName": op,
        "category": "AuditEvent",
        "resultType": "Success",
        "resultSignature": "OK",
        "durationMs": 0,
        "callerIpAddress": null,
        "correlationId": crate::store::new_guid(),
        "identity": {"claim": {"appid": "system", "tid": app.tenant}},
        "properties": {"keyName": key, "keyVersion": version, "trigger": "policy"},
    })
}

/// What one maintenance pass did.
#[derive(Debug, Default)]
pub struct Maintenance {
    pub purged: Vec<String>,
    pub rotated: Vec<String>,
}

/// One maintenance pass (blocking: call from a blocking thread).
pub fn run(app: &App) -> Result<Maintenance, VaultError> {
    let now = app.clock.now();
    let mut done = Maintenance::default();
    let snap = app.store.snapshot();
    for e in snap.keys.values() {
        if e.state.scheduled_purge_date.is_some_and(|d| d <= now) {
            let name = e.name.clone();
            // The retention period is the safety window (as in Azure): a
            // scheduled purge happens even with dependents registered; the
            // audit record names them.
            let deps: Vec<Value> = snap
                .key_dependents(&name)
                .into_iter()
                .map(|(v, d)| {
                    let mut j = crate::api::dependent_json(d);
                    j["version"] = json!(v);
                    j
                })
                .collect();
            if !deps.is_empty() {
                tracing::warn!(key = %name, dependents = deps.len(), "scheduled purge of a key with registered dependents");
            }
            let purged = app.store.mutate_hooked(
                |st, tx| -> Result<bool, VaultError> {
                    let due = st
                        .keys
                        .get(&name)
                        .is_some_and(|e| e.state.scheduled_purge_date.is_some_and(|d| d <= now));
                    if due {
                        tx.delete_key(&name)?;
                        tx.delete_key_dependents(&name)?;
                        st.keys.remove(&name);
                        st.dependents.remove(&name);
                    }
                    Ok(due)
                },
                |due, tx| match due {
                    true => {
                        let mut rec = system_record(app, "KeyPurge", &name, None);
                        if !deps.is_empty() {
                            rec["properties"]["details"] =
                                json!({"overriddenDependents": deps.clone()});
                        }
                        let (seq, hash) = app.audit.write_blocking(rec)?;
                        tx.put_audit_head(seq, &hash)
                    }
                    false => Ok(()),
                },
            )?;
            if purged {
                done.purged.push(name);
            }
        }
    }
    for e in snap.keys.values() {
        let Some(policy) = e.state.rotation_policy.as_ref() else {
            continue;
        };
        if e.is_deleted() || !rotation_due(policy, &e.current().meta, now) {
            continue;
        }
        let cur = e.current();
        let key = match RsaKey::generate(cur.key.bits() as u32) {
            Ok(k) => Arc::new(k),
            Err(err) => {
                tracing::error!(key = %e.name, error = %err, "policy rotation: key generation failed");
                continue;
            }
        };
        let name = e.name.clone();
        let cur_version = cur.meta.version.clone();
        let rotated = app.store.mutate_hooked(
            |st, tx| -> Result<Option<String>, VaultError> {
                let Some(entry) = st.keys.get(&name) else {
                    return Ok(None);
                };
                // Someone rotated or deleted it meanwhile: nothing to do.
                if entry.is_deleted() || entry.current().meta.version != cur_version {
                    return Ok(None);
                }
                let old = entry.current().meta.clone();
                let exp = policy_exp(entry.state.rotation_policy.as_ref(), now);
                let meta = VersionMeta {
                    version: new_version(),
                    seq: st.next_seq(),
                    created: now,
                    updated: now,
                    enabled: true,
                    nbf: None,
                    exp,
                    key_ops: old.key_ops,
                    tags: old.tags,
                    kty: "RSA".into(),
                };
                let v = KeyVersion {
                    meta,
                    key: key.clone(),
                };
                tx.put_version(&name, &v)?;
                let version = v.meta.version.clone();
                st.keys.get_mut(&name).expect("checked").versions.push(v);
                Ok(Some(version))
            },
            |v, tx| match v {
                Some(v) => {
                    let (seq, hash) = app.audit.write_blocking(system_record(
                        app,
                        "KeyRotate",
                        &name,
                        Some(v),
                    ))?;
                    tx.put_audit_head(seq, &hash)
                }
                None => Ok(()),
            },
        )?;
        if rotated.is_some() {
            done.rotated.push(name);
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("P30D"), Some(30 * 86_400));
        assert_eq!(parse_duration("P1Y2M"), Some(365 * 86_400 + 60 * 86_400));
        assert_eq!(parse_duration("PT12H30M"), Some(12 * 3600 + 30 * 60));
        assert_eq!(parse_duration("P2W"), Some(14 * 86_400));
        for bad in ["", "P", "30D", "PD", "P1H", "PT", "P1D2Y", "P-1D", "P1.5D"] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }

    #[test]
    fn policies() {
        let ok = json!({"lifetimeActions": [{"trigger": {"timeAfterCreate": "P30D"}, "action": {"type": "Rotate"}}],
                        "attributes": {"expiryTime": "P90D"}});
        assert!(validate_policy(&ok).is_ok());
        let bad = json!({"lifetimeActions": [{"trigger": {"timeAfterCreate": "soon"}, "action": {"type": "Rotate"}}]});
        assert!(validate_policy(&bad).is_err());
        let both = json!({"lifetimeActions": [{"trigger": {"timeAfterCreate": "P1D", "timeBeforeExpiry": "P1D"}, "action": {"type": "Rotate"}}]});
        assert!(validate_policy(&both).is_err());
        let meta = VersionMeta {
            version: "v".into(),
            seq: 1,
            created: 1000,
            updated: 1000,
            enabled: true,
            nbf: None,
            exp: Some(1000 + 90 * 86_400),
            key_ops: vec![],
            tags: Default::default(),
            kty: "RSA".into(),
        };
        assert!(!rotation_due(&ok, &meta, 1000 + 29 * 86_400));
        assert!(rotation_due(&ok, &meta, 1000 + 30 * 86_400));
        let before = json!({"lifetimeActions": [{"trigger": {"timeBeforeExpiry": "P10D"}, "action": {"type": "Rotate"}}]});
        assert!(!rotation_due(&before, &meta, 1000 + 79 * 86_400));
        assert!(rotation_due(&before, &meta, 1000 + 80 * 86_400));
        let notify = json!({"lifetimeActions": [{"trigger": {"timeAfterCreate": "P1D"}, "action": {"type": "Notify"}}]});
        assert!(!rotation_due(&notify, &meta, 1000 + 80 * 86_400));
        assert_eq!(policy_exp(Some(&ok), 5), Some(5 + 90 * 86_400));
    }
}
