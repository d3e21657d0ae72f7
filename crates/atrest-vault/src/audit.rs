//! Hash-chained, fail-closed audit log.
//!
//! One JSON object per line. Each line carries `seq` and `prevHash`, and
//! ends with `"hash"`: the hex SHA-256 of the line's text up to (not
//! including) `,"hash":...`, closed with `}`. Editing, removing or
//! reordering a line breaks the chain at that line, which `verify` names.
//!
//! Records are written by one thread that batches whatever is queued,
//! appends it, `fdatasync`s, and only then lets the requests answer. The
//! file is reopened for every batch, so a log that became unwritable is
//! noticed at once and the requests waiting on it are refused.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use aws_lc_rs::digest;
use aws_lc_rs::hmac;
use serde_json::Value;

use crate::error::VaultError;

/// Where a record landed: its `seq` and `hash`.
pub type Pos = (u64, String);

/// Where the writer sends the outcome of one record.
enum Reply {
    Async(tokio::sync::oneshot::Sender<Result<Pos, String>>),
    Blocking(mpsc::SyncSender<Result<Pos, String>>),
}

impl Reply {
    fn send(self, r: Result<Pos, String>) {
        match self {
            Reply::Async(t) => {
                let _ = t.send(r);
            }
            Reply::Blocking(t) => {
                let _ = t.send(r);
            }
        }
    }
}

/// How long a request waits for its record to be on disk before it is
/// refused: a stalled disk must not hang requests silently.
pub const DEFAULT_WRITE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

pub struct AuditLog {
    path: PathBuf,
    tx: Mutex<mpsc::Sender<(Value, Reply)>>,
    /// Why the last write failed, if it did (shown by health).
    failure: Arc<Mutex<Option<String>>>,
    timeout: std::time::Duration,
}

fn sha256_hex(b: &[u8]) -> String {
    hex::encode(digest::digest(&digest::SHA256, b))
}

/// Returns `(seq, hash)` of the last line, or `(0, zeros)` for a new log.
fn chain_head(path: &Path) -> Result<(u64, String), VaultError> {
    let genesis = (0, "0".repeat(64));
    if let Ok(m) = std::fs::metadata(path) {
        if !m.is_file() {
            return Err(VaultError::Audit(format!(
                "{} is not a regular file",
                path.display()
            )));
        }
    }
    let f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(genesis),
        Err(e) => return Err(e.into()),
    };
    let mut last = None;
    for line in std::io::BufReader::new(f).lines() {
        let line = line?;
        if !line.trim().is_empty() {
            last = Some(line);
        }
    }
    match last {
        None => Ok(genesis),
        Some(l) => {
            let v: Value = serde_json::from_str(&l)
                .map_err(|_| VaultError::Audit("last audit line is not JSON".into()))?;
            let seq = v["seq"]
                .as_u64()
                .ok_or_else(|| VaultError::Audit("last line has no seq".into()))?;
            let hash = v["hash"]
                .as_str()
                .ok_or_else(|| VaultError::Audit("last line has no hash".into()))?;
            Ok((seq, hash.to_string()))
        }
    }
}

/// Builds a chained line from a record (an object without seq/prevHash/hash).
fn chain_line(
    mut rec: Value,
    seq: u64,
    prev: &str,
    mac_key: Option<&hmac::Key>,
) -> (String, String) {
    let obj = rec.as_object_mut().expect("audit record is an object");
    obj.insert("seq".into(), Value::from(seq));
    obj.insert("prevHash".into(), Value::from(prev));
    let body = serde_json::to_string(&rec).expect("serialize");
    let hash = sha256_hex(body.as_bytes());
    let mac = mac_key
        .map(|k| {
            format!(
                ",\"mac\":\"{}\"",
                hex::encode(hmac::sign(k, hash.as_bytes()))
            )
        })
        .unwrap_or_default();
    let line = format!("{},\"hash\":\"{hash}\"{mac}}}\n", &body[..body.len() - 1]);
    (line, hash)
}

impl AuditLog {
    /// Opens (appends to) the log. With `mac_key`, each line also carries
    /// `mac` = HMAC-SHA256(key, hash): without the key (derived from the
    /// master key) nobody can rewrite the chain after an edit.
    pub fn open(path: &Path, mac_key: Option<hmac::Key>) -> Result<Self, VaultError> {
        let (mut seq, mut prev) = chain_head(path)?;
        let (tx, rx) = mpsc::channel::<(Value, Reply)>();
        let failure = Arc::new(Mutex::new(None));
        let fail2 = failure.clone();
        let p = path.to_path_buf();
        std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut batch = vec![first];
                    while let Ok(more) = rx.try_recv() {
                        batch.push(more);
                    }
                    let (mut s, mut h) = (seq, prev.clone());
                    let mut buf = String::new();
                    let mut positions = Vec::with_capacity(batch.len());
                    for (rec, _) in &batch {
                        s += 1;
                        let (line, hash) = chain_line(rec.clone(), s, &h, mac_key.as_ref());
                        buf.push_str(&line);
                        positions.push((s, hash.clone()));
                        h = hash;
                    }
                    let res = (|| -> std::io::Result<()> {
                        let mut f = std::fs::OpenOptions::new()
                            .create(true)
                            .append(true)
                            .open(&p)?;
                        f.write_all(buf.as_bytes())?;
                        f.sync_data()
                    })();
                    let res: Result<(), String> = match res {
                        Ok(()) => {
                            seq = s;
                            prev = h;
                            *fail2.lock().expect("lock") = None;
                            Ok(())
                        }
                        Err(e) => {
                            let msg = format!("cannot append to {}: {e}", p.display());
                            tracing::error!(error = %msg, "audit write failed; refusing requests");
                            *fail2.lock().expect("lock") = Some(msg.clone());
                            Err(msg)
                        }
                    };
                    for ((_, reply), pos) in batch.into_iter().zip(positions) {
                        reply.send(res.clone().map(|()| pos));
                    }
                }
            })?;
        Ok(AuditLog {
            path: path.to_path_buf(),
            tx: Mutex::new(tx),
            failure,
            timeout: DEFAULT_WRITE_TIMEOUT,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Cheap pre-check before doing any work: the log must be appendable.
    pub fn with_timeout(mut self, t: std::time::Duration) -> Self {
        self.timeout = t;
        self
    }

    fn stalled(&self) -> VaultError {
        let msg = format!(
            "the audit writer has not confirmed a write to {} within {} s (disk stalled?)",
            self.path.display(),
            self.timeout.as_secs_f32()
        );
        tracing::error!(error = %msg, "audit write timed out; refusing requests");
        *self.failure.lock().expect("lock") = Some(msg.clone());
        VaultError::Audit(msg)
    }

    pub fn probe(&self) -> Result<(), VaultError> {
        use std::os::unix::fs::OpenOptionsExt;
        // O_NONBLOCK: a FIFO or similar in the log's place must make the
        // probe fail, not block an async worker.
        match std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&self.path)
        {
            Ok(_) => Ok(()),
            Err(e) => {
                let msg = format!("cannot append to {}: {e}", self.path.display());
                *self.failure.lock().expect("lock") = Some(msg.clone());
                Err(VaultError::Audit(msg))
            }
        }
    }

    pub fn failure(&self) -> Option<String> {
        self.failure.lock().expect("lock").clone()
    }

    /// Same as `write`, from a blocking (non-async) thread.
    pub fn write_blocking(&self, rec: Value) -> Result<Pos, VaultError> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.tx
            .lock()
            .expect("lock")
            .send((rec, Reply::Blocking(tx)))
            .map_err(|_| VaultError::Audit("audit writer stopped".into()))?;
        match rx.recv_timeout(self.timeout) {
            Ok(Ok(pos)) => Ok(pos),
            Ok(Err(m)) => Err(VaultError::Audit(m)),
            Err(mpsc::RecvTimeoutError::Timeout) => Err(self.stalled()),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                Err(VaultError::Audit("audit writer stopped".into()))
            }
        }
    }

    /// Appends a record durably; the request may answer only on Ok.
    pub async fn write(&self, rec: Value) -> Result<(), VaultError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.tx
            .lock()
            .expect("lock")
            .send((rec, Reply::Async(tx)))
            .map_err(|_| VaultError::Audit("audit writer stopped".into()))?;
        match tokio::time::timeout(self.timeout, rx).await {
            Ok(Ok(Ok(_))) => Ok(()),
            Ok(Ok(Err(m))) => Err(VaultError::Audit(m)),
            Ok(Err(_)) => Err(VaultError::Audit("audit writer stopped".into())),
            Err(_) => Err(self.stalled()),
        }
    }
}

/// Result of checking a log file.
#[derive(Debug, PartialEq, Eq)]
pub struct VerifyReport {
    pub lines: u64,
    /// `(line number, reason)` of the first break, if any.
    pub error: Option<(u64, String)>,
}

/// Checks the whole chain of a log file.
/// With `mac_key` the MAC of every line is checked too; with `head` (the
/// position the vault recorded with its last state change) a log cut
/// short or rewritten before that point is caught as well.
pub fn verify(path: &Path, mac_key: Option<&hmac::Key>) -> Result<VerifyReport, VaultError> {
    verify_with_head(path, mac_key, None)
}

pub fn verify_with_head(
    path: &Path,
    mac_key: Option<&hmac::Key>,
    head: Option<&Pos>,
) -> Result<VerifyReport, VaultError> {
    let f = std::fs::File::open(path)?;
    let mut prev = "0".repeat(64);
    let mut n = 0u64;
    for (lineno, line) in (1u64..).zip(std::io::BufReader::new(f).lines()) {
        let expected_seq = lineno;
        let line = line?;
        n = lineno;
        let fail = |m: &str| {
            Ok(VerifyReport {
                lines: lineno,
                error: Some((lineno, m.to_string())),
            })
        };
        let marker = ",\"hash\":\"";
        let Some(pos) = line.rfind(marker) else {
            return fail("no hash field");
        };
        let body = format!("{}}}", &line[..pos]);
        let rest = &line[pos + marker.len()..];
        let Some(end) = rest.find('"') else {
            return fail("malformed hash field");
        };
        let claimed = &rest[..end];
        let tail = &rest[end..];
        if let Some(key) = mac_key {
            let mac = tail
                .strip_prefix("\",\"mac\":\"")
                .and_then(|t| t.strip_suffix("\"}"))
                .and_then(|m| hex::decode(m).ok());
            match mac {
                Some(m) if hmac::verify(key, claimed.as_bytes(), &m).is_ok() => {}
                _ => {
                    return fail(
                        "MAC missing or wrong: the line was written or rewritten without the vault's key",
                    )
                }
            }
        } else if tail != "\"}" && !tail.starts_with("\",\"mac\":\"") {
            return fail("malformed line ending");
        }
        if sha256_hex(body.as_bytes()) != claimed {
            return fail("hash does not match the line's content (line edited)");
        }
        let v: Value = match serde_json::from_str(&line) {
            Ok(v) => v,
            Err(_) => return fail("not valid JSON"),
        };
        if v["prevHash"].as_str() != Some(prev.as_str()) {
            return fail(
                "prevHash does not match the previous line (line removed, inserted or reordered)",
            );
        }
        if v["seq"].as_u64() != Some(expected_seq) {
            return fail(&format!(
                "seq is {}, expected {expected_seq} (line removed or reordered)",
                v["seq"]
            ));
        }
        if let Some((hseq, hhash)) = head {
            if *hseq == lineno && hhash != claimed {
                return fail(
                    "this line is not the one the vault recorded at this position (log rewritten)",
                );
            }
        }
        prev = claimed.to_string();
    }
    if let Some((hseq, _)) = head {
        if *hseq > n {
            return Ok(VerifyReport {
                lines: n,
                error: Some((
                    n + 1,
                    format!("the log ends after line {n} but the vault recorded line {hseq}: lines were cut off the end"),
                )),
            });
        }
    }
    Ok(VerifyReport {
        lines: n,
        error: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::os::unix::fs::OpenOptionsExt;

    fn key() -> hmac::Key {
        hmac::Key::new(hmac::HMAC_SHA256, &[9u8; 32])
    }

    #[test]
    fn rewritten_chain_passes_hashes_but_fails_macs() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("audit.log");
        write_n(&p, 4);
        assert_eq!(verify(&p, Some(&key())).unwrap().error, None);
        // An attacker edits line 2 and recomputes every hash after it.
        let text = std::fs::read_to_string(&p).unwrap();
        let mut prev = "0".repeat(64);
        let mut out = String::new();
        for (i, l) in text.lines().enumerate() {
            let mut v: Value = serde_json::from_str(l).unwrap();
            let o = v.as_object_mut().unwrap();
            o.remove("hash");
            o.remove("mac");
            o.remove("seq");
            o.remove("prevHash");
            if i == 1 {
                o.insert("i".into(), json!(99));
            }
            let (line, h) = chain_line(v, i as u64 + 1, &prev, None);
            out.push_str(&line);
            prev = h;
        }
        std::fs::write(&p, out).unwrap();
        assert_eq!(verify(&p, None).unwrap().error, None);
        let wrong = hmac::Key::new(hmac::HMAC_SHA256, &[8u8; 32]);
        assert_eq!(verify(&p, Some(&key())).unwrap().error.unwrap().0, 1);
        assert_eq!(verify(&p, Some(&wrong)).unwrap().error.unwrap().0, 1);
    }

    fn write_n(path: &Path, n: usize) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let log = AuditLog::open(path, Some(key())).unwrap();
        rt.block_on(async {
            for i in 0..n {
                log.write(json!({"operationName": "KeyGet", "i": i}))
                    .await
                    .unwrap();
            }
        });
    }

    #[test]
    fn chain_verifies_and_survives_reopen() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("audit.log");
        write_n(&p, 3);
        write_n(&p, 2);
        let r = verify(&p, None).unwrap();
        assert_eq!(
            r,
            VerifyReport {
                lines: 5,
                error: None
            }
        );
    }

    #[test]
    fn detects_edit_removal_and_reorder() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("audit.log");
        write_n(&p, 4);
        let text = std::fs::read_to_string(&p).unwrap();
        let lines: Vec<&str> = text.lines().collect();

        let edited = text.replacen("\"i\":2", "\"i\":9", 1);
        std::fs::write(&p, edited).unwrap();
        assert_eq!(verify(&p, None).unwrap().error.unwrap().0, 3);

        let removed = [lines[0], lines[2], lines[3]].join("\n");
        std::fs::write(&p, removed).unwrap();
        assert_eq!(verify(&p, None).unwrap().error.unwrap().0, 2);

        let reordered = [lines[0], lines[2], lines[1], lines[3]].join("\n");
        std::fs::write(&p, reordered).unwrap();
        assert_eq!(verify(&p, None).unwrap().error.unwrap().0, 2);
    }

    #[test]
    fn stalled_writer_times_out_instead_of_hanging() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("audit.log");
        let log = AuditLog::open(&p, None)
            .unwrap()
            .with_timeout(std::time::Duration::from_millis(300));
        // Then a FIFO without a reader takes the log's place: opening it
        // for writing blocks forever, like a hung disk.
        let st = std::process::Command::new("mkfifo")
            .arg(&p)
            .status()
            .unwrap();
        assert!(st.success());
        assert!(log.probe().is_err(), "probe must not block on a FIFO");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let t0 = std::time::Instant::now();
        let err = rt.block_on(log.write(json!({"a": 1}))).unwrap_err();
        assert!(t0.elapsed() < std::time::Duration::from_secs(3));
        assert!(err.to_string().contains("stalled"), "{err}");
        assert!(log.failure().unwrap().contains("stalled"));
        let err = log.write_blocking(json!({"a": 2})).unwrap_err();
        assert!(err.to_string().contains("stalled"), "{err}");
        // Unblock the writer thread so it can finish.
        let _reader = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&p)
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(100));
    }

    #[test]
    fn unwritable_log_fails_the_write() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("audit.log");
        let log = AuditLog::open(&p, None).unwrap();
        std::fs::create_dir(&p).unwrap();
        assert!(log.probe().is_err());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let err = rt.block_on(log.write(json!({"a": 1}))).unwrap_err();
        assert!(matches!(err, VaultError::Audit(_)));
        assert!(log.failure().is_some());
        std::fs::remove_dir(&p).unwrap();
        rt.block_on(log.write(json!({"a": 2}))).unwrap();
        assert!(log.failure().is_none());
        assert_eq!(verify(&p, None).unwrap().lines, 1);
    }
}
