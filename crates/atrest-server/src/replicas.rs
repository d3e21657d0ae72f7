//! On a source server: the read replicas allowed to follow it (a token
//! each, only its hash kept) and how far each has read, which the backup
//! retention keeps ([`retention_floor`]). The replication itself is
//! `crate::replication`.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::resource::{self, load_map, save_entry};

/// The replicas allowed to follow this server.
const ALLOWED_FILE: &str = "replicas.json";

fn sha256_hex(s: &str) -> String {
    hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, s.as_bytes()).as_ref())
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Allowed {
    name: String,
    token_sha256: String,
    created: String,
}

fn load_allowed(dir: &Path) -> Vec<Allowed> {
    fs::read(dir.join(ALLOWED_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// Allows a replica named `name` to follow the server in `dir`; returns
/// its token (shown once: only its hash is kept). Allowing a name again
/// replaces its token.
pub fn allow(dir: &Path, name: &str) -> Result<String, String> {
    resource::validate_name(name).map_err(|e| e.to_string())?;
    let mut b = [0u8; 32];
    aws_lc_rs::rand::fill(&mut b).map_err(|_| "the system RNG failed".to_string())?;
    let token = hex::encode(b);
    let mut list = load_allowed(dir);
    list.retain(|a| a.name != name);
    list.push(Allowed {
        name: name.to_string(),
        token_sha256: sha256_hex(&token),
        created: resource::now_rfc3339(),
    });
    resource::write_atomic(
        &dir.join(ALLOWED_FILE),
        &serde_json::to_vec_pretty(&list).expect("serializable"),
        0o600,
    )
    .map_err(|e| e.to_string())?;
    Ok(token)
}

/// Removes a replica's permission to follow.
pub fn disallow(dir: &Path, name: &str) -> Result<bool, String> {
    let mut list = load_allowed(dir);
    let before = list.len();
    list.retain(|a| a.name != name);
    resource::write_atomic(
        &dir.join(ALLOWED_FILE),
        &serde_json::to_vec_pretty(&list).expect("serializable"),
        0o600,
    )
    .map_err(|e| e.to_string())?;
    Ok(list.len() != before)
}

/// On the source: per replica, per database, the archive segment it is
/// reading, so that retention keeps what a replica has still to read (a
/// replica that is never coming back holds segments until it is removed
/// with `replica disallow`).
const PROGRESS_FILE: &str = "replica-progress.json";

/// What this process last recorded, per (server, replica, database): a
/// poll touches the file only when its segment changes. The lock also
/// serializes the read-modify-write of a replica's entry.
static PROGRESS: std::sync::Mutex<BTreeMap<(PathBuf, String, String), u64>> =
    std::sync::Mutex::new(BTreeMap::new());

pub(crate) fn record_progress(dir: &Path, replica: &str, database: &str, seq: u64) {
    let mut last = PROGRESS.lock().expect("progress lock");
    let k = (dir.to_path_buf(), replica.to_string(), database.to_string());
    if last.insert(k, seq) == Some(seq) {
        return;
    }
    let path = dir.join(PROGRESS_FILE);
    let mut mine: BTreeMap<String, u64> = load_map(&path).remove(replica).unwrap_or_default();
    if mine.insert(database.to_string(), seq) == Some(seq) {
        return;
    }
    if let Err(e) = save_entry(&path, replica, &mine) {
        tracing::warn!(error = %e, "recording a replica's progress");
    }
}

/// Per database, the oldest archive segment an allowed replica is still
/// reading: retention keeps it and everything after it.
pub fn retention_floor(dir: &Path) -> BTreeMap<String, u64> {
    let allowed: Vec<String> = load_allowed(dir).into_iter().map(|a| a.name).collect();
    let mut floor: BTreeMap<String, u64> = BTreeMap::new();
    let progress: BTreeMap<String, BTreeMap<String, u64>> = load_map(&dir.join(PROGRESS_FILE));
    for (replica, dbs) in progress {
        if !allowed.contains(&replica) {
            continue;
        }
        for (db, seq) in dbs {
            let f = floor.entry(db).or_insert(seq);
            *f = (*f).min(seq);
        }
    }
    floor
}

pub(crate) fn replica_for_token(dir: &Path, token: &str) -> Option<String> {
    let h = sha256_hex(token);
    load_allowed(dir)
        .into_iter()
        .find(|a| {
            aws_lc_rs::constant_time::verify_slices_are_equal(
                a.token_sha256.as_bytes(),
                h.as_bytes(),
            )
            .is_ok()
        })
        .map(|a| a.name)
}
