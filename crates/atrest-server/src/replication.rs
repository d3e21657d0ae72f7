//! Read replicas: a server that follows another by shipping its WAL as
//! ciphertext.
//!
//! The source serves its WAL archive (`backup.rs`: one segment per WAL
//! generation, the sealed bytes as they are on disk) and base backups over
//! its PostgreSQL port: a client that opens TLS directly (no SSLRequest)
//! and does not ask for ALPN `postgresql` speaks this module's HTTP API,
//! authenticated by a token that `atrest server replica allow` (or
//! `replica create --source DIR`) registered on the source (its SHA-256
//! is kept, never the token).
//!
//! The replica copies each segment's bytes into `DIR/replica/wal/NAME/`
//! (still sealed), reads the complete transactions from them with its own
//! access to the keys (the same customer key, or the source's service
//! key), decrypting in memory only, and applies them to its own database
//! as one transaction per batch (`Connection::apply_wal_commits`), where
//! they are sealed under the replica's own DEKs. Its position (segment,
//! offset, WAL salts) is written after each batch; a crash between the
//! two re-applies page images, which is harmless (see
//! `apply_wal_commits`). Sessions on a replica are read-only.
//!
//! What this is not: synchronous replication (a commit does not wait for
//! the replica), or logical replication.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::config::ReplicaConfig;
use crate::ctx::ServerCtx;
use crate::replicas::{disallow, record_progress, replica_for_token};
use crate::resource;
use crate::resource::State;
use crate::resource::{load_map, save_entry, save_lag, source_error_path, Lag, REPLICA_DIR};

/// Where a replica keeps its token, the source's CA, its position and the
/// segments it is reading.
/// The write gate holder id of the replica's applier.
const APPLIER_PID: i32 = -4;
/// Most bytes one response carries.
const CHUNK: u64 = 8 << 20;
/// At most one round of fetching and applying per database this often.
const APPLY_INTERVAL: Duration = Duration::from_millis(20);
/// Transactions are applied in batches of about this many frames.
const BATCH_FRAMES: usize = 4000;

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

// ---------------------------------------------------------------------------
// The source side

type Response = hyper::Response<http_body_util::Full<bytes::Bytes>>;

fn reply(status: u16, body: impl Into<bytes::Bytes>) -> Response {
    hyper::Response::builder()
        .status(status)
        .body(http_body_util::Full::new(body.into()))
        .expect("valid response")
}

fn json_reply(status: u16, v: serde_json::Value) -> Response {
    let mut r = reply(status, v.to_string());
    r.headers_mut()
        .insert("content-type", "application/json".parse().expect("header"));
    r
}

fn error_reply(status: u16, msg: String) -> Response {
    json_reply(status, serde_json::json!({ "error": msg }))
}

fn query(uri: &hyper::Uri, key: &str) -> Option<u64> {
    uri.query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| v.parse().ok()).flatten()
    })
}

/// Serves the replication API on a TLS connection that did not ask for
/// the PostgreSQL protocol.
pub async fn serve<S>(stream: S, peer: std::net::SocketAddr, ctx: Arc<ServerCtx>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let ctx = Arc::clone(&ctx);
        async move { Ok::<_, std::convert::Infallible>(route(req, &ctx).await) }
    });
    if let Err(e) = hyper::server::conn::http1::Builder::new()
        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
        .await
    {
        tracing::debug!(%peer, error = %e, "replication connection ended");
    }
}

async fn route(req: hyper::Request<hyper::body::Incoming>, ctx: &Arc<ServerCtx>) -> Response {
    let token = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    let Some(replica) = replica_for_token(&ctx.dir, token) else {
        ctx.metrics.rejected("replication_token");
        return error_reply(
            401,
            format!(
                "this replica is not allowed to follow {}: run `atrest server replica allow --data SOURCE_DIR --name NAME` on the source and give the replica its token",
                ctx.config.name
            ),
        );
    };
    if ctx.state() == State::Inaccessible {
        return error_reply(503, ctx.inaccessible_error().message);
    }
    let path: Vec<String> = req
        .uri()
        .path()
        .trim_start_matches('/')
        .split('/')
        .map(str::to_string)
        .collect();
    let parts: Vec<&str> = path.iter().map(String::as_str).collect();
    match (req.method().as_str(), parts.as_slice()) {
        ("GET", ["replication", "v1", "info"]) => json_reply(200, info(ctx)),
        ("POST", ["replication", "v1", "backup"]) => {
            let c = Arc::clone(ctx);
            let made = tokio::task::spawn_blocking(move || {
                let config = c.control.live.lock().expect("config").clone();
                crate::backup::take_backup(&c.dir, &config, &c.databases).map(|entry| {
                    let dir = crate::backup::repository(&c.dir, &config)
                        .join("backups")
                        .join(&entry.id);
                    let files: Vec<serde_json::Value> = fs::read_dir(&dir)
                        .map(|rd| {
                            rd.flatten()
                                .filter_map(|e| {
                                    Some(serde_json::json!({
                                        "name": e.file_name().to_str()?,
                                        "bytes": e.metadata().ok()?.len(),
                                    }))
                                })
                                .collect()
                        })
                        .unwrap_or_default();
                    serde_json::json!({ "id": entry.id, "files": files })
                })
            })
            .await;
            match made {
                Ok(Ok(v)) => {
                    tracing::info!(%replica, backup = %v["id"], "base backup for a replica");
                    json_reply(200, v)
                }
                Ok(Err(e)) => error_reply(500, format!("taking the base backup: {e}")),
                Err(e) => error_reply(500, e.to_string()),
            }
        }
        ("GET", ["replication", "v1", "backup", id, file]) => {
            let config = ctx.control.live.lock().expect("config").clone();
            let ok = |s: &str| !s.is_empty() && !s.starts_with('.') && !s.contains(['/', '\\']);
            if !ok(id) || !ok(file) {
                return error_reply(400, "bad backup file name".into());
            }
            let p = crate::backup::repository(&ctx.dir, &config)
                .join("backups")
                .join(id)
                .join(file);
            let from = query(req.uri(), "offset").unwrap_or(0);
            match read_range(&p, from, CHUNK) {
                Ok(b) => reply(200, b),
                Err(e) => error_reply(404, format!("{}: {e}", p.display())),
            }
        }
        ("GET", ["replication", "v1", "wal", name, seq]) => {
            let (Ok(seq), true) = (seq.parse::<u64>(), ctx.databases.is_database(name)) else {
                return error_reply(404, format!("no database {name:?} or bad segment {seq:?}"));
            };
            let from = query(req.uri(), "from").unwrap_or(0);
            let wait = Duration::from_millis(query(req.uri(), "wait_ms").unwrap_or(0).min(10_000));
            if !wait.is_zero() {
                // A follower's poll of the segment it stands in (a peek
                // at the next one, without a wait, is not progress yet).
                let (dir, r, n) = (ctx.dir.clone(), replica.clone(), name.to_string());
                let _ =
                    tokio::task::spawn_blocking(move || record_progress(&dir, &r, &n, seq)).await;
            }
            segment(ctx, name, seq, from, wait).await
        }
        _ => error_reply(
            404,
            format!("no such replication call: {}", req.uri().path()),
        ),
    }
}

fn info(ctx: &ServerCtx) -> serde_json::Value {
    let config = ctx.control.live.lock().expect("config").clone();
    let ck = config.encryption.customer_key.as_ref();
    serde_json::json!({
        "name": config.name,
        "server_id": config.server_id,
        "databases": ctx.databases.names(),
        // Where each database created with the archive on begins in it.
        "origins": ctx.databases.names().into_iter().filter_map(|n| {
            let o = crate::archive::origin(&crate::backup::repository(&ctx.dir, &config), &n)?;
            Some((n, o))
        }).collect::<BTreeMap<String, u64>>(),
        "customer_key": ck.map(|k| k.key.kid()),
        // Where a replica logs in to follow a change of key (its CA
        // certificate is public).
        "vault_tenant": ck.map(|k| k.login.tenant.clone()),
        "vault_ca_pem": ck.and_then(|k| fs::read_to_string(resource::resolve(&ctx.dir, &k.login.ca)).ok()),
        "infrastructure_encryption": config.encryption.infrastructure_encryption,
    })
}

fn read_range(p: &Path, from: u64, max: u64) -> std::io::Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let f = fs::File::open(p)?;
    let len = f.metadata()?.len();
    let n = len.saturating_sub(from).min(max) as usize;
    let mut buf = vec![0u8; n];
    f.read_exact_at(&mut buf, from)?;
    Ok(buf)
}

/// One response of `GET wal/NAME/SEQ`: the segment's header region and
/// its committed bytes from `from`, waiting up to `wait` for some.
async fn segment(
    ctx: &Arc<ServerCtx>,
    name: &str,
    seq: u64,
    from: u64,
    wait: Duration,
) -> Response {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let c = Arc::clone(ctx);
        let n = name.to_string();
        let read = tokio::task::spawn_blocking(move || {
            let archiver = c.databases.archiver(&n)?;
            archiver.read_segment(seq, from, CHUNK)
        })
        .await
        .unwrap_or_else(|e| Err(e.to_string()));
        let chunk = match read {
            Ok(c) if c.gone => {
                return error_reply(
                    410,
                    format!(
                        "segment {seq} of database {name} is no longer in {}'s WAL archive (backup retention removed it before this replica read it); the replica cannot catch up: create it again",
                        ctx.config.name
                    ),
                )
            }
            Ok(c) => c,
            Err(e) => return error_reply(500, format!("reading the WAL archive of {name}: {e}")),
        };
        if !chunk.data.is_empty()
            || chunk.newer.is_some()
            || tokio::time::Instant::now() >= deadline
        {
            let mut body = chunk.header;
            body.extend_from_slice(&chunk.data);
            let mut r = reply(200, body);
            let h = r.headers_mut();
            let mut set = |k: &'static str, v: String| {
                h.insert(k, v.parse().expect("header value"));
            };
            set("x-atrest-segment-len", chunk.len.to_string());
            set("x-atrest-from", chunk.from.to_string());
            set("x-atrest-commit-time-us", chunk.last_commit_us.to_string());
            set(
                "x-atrest-head",
                format!("{}:{}", chunk.head.0, chunk.head.1),
            );
            if let Some(next) = chunk.newer {
                set("x-atrest-next-seq", next.to_string());
            }
            return r;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

// ---------------------------------------------------------------------------
// The replica side

/// Where a replica stands in one database's archive.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Position {
    pub seq: u64,
    /// Physical offset in the segment: everything before it is applied.
    pub offset: u64,
    /// The WAL generation's salts (hex), once known.
    pub salts: Option<String>,
    /// The source's time of the last commit applied (µs since the epoch).
    pub applied_commit_us: u64,
}

fn positions_path(dir: &Path) -> PathBuf {
    dir.join(REPLICA_DIR).join("positions.json")
}

pub fn load_positions(dir: &Path) -> BTreeMap<String, Position> {
    load_map(&positions_path(dir))
}

fn save_position(dir: &Path, name: &str, pos: &Position) -> Result<(), String> {
    save_entry(&positions_path(dir), name, pos)
}

/// An HTTPS client for the source: trusts only its CA, carries the token.
pub struct SourceClient {
    http: reqwest::Client,
    base: String,
    token: zeroize::Zeroizing<String>,
}

/// The source's address: from its directory's state when it is on this
/// machine (it may have moved), else the configured one.
fn source_address(rc: &ReplicaConfig) -> String {
    rc.source_dir
        .as_ref()
        .and_then(|d| resource::load_state(d).ok())
        .and_then(|s| s.listen)
        .unwrap_or_else(|| rc.source.clone())
}

impl SourceClient {
    pub fn new(addr: &str, ca_pem: &[u8], token: &str) -> Result<Self, String> {
        let http = atrest_vault::client::http_client(ca_pem, None).map_err(|e| e.to_string())?;
        Ok(SourceClient {
            http,
            base: format!("https://{addr}/replication/v1"),
            token: zeroize::Zeroizing::new(token.to_string()),
        })
    }

    pub fn for_replica(dir: &Path, rc: &ReplicaConfig) -> Result<Self, String> {
        let ca = fs::read(resource::resolve(dir, &rc.source_ca))
            .map_err(|e| format!("reading the source's CA: {e}"))?;
        let token = zeroize::Zeroizing::new(
            fs::read_to_string(resource::resolve(dir, &rc.token_file))
                .map_err(|e| format!("reading the replication token: {e}"))?,
        );
        Self::new(&source_address(rc), &ca, token.trim())
    }

    async fn call(&self, method: reqwest::Method, path: &str) -> Result<reqwest::Response, String> {
        let url = format!("{}/{path}", self.base);
        let r = self
            .http
            .request(method, &url)
            .bearer_auth(self.token.as_str())
            .send()
            .await
            .map_err(|e| format!("the source at {url} cannot be reached: {e}"))?;
        if r.status().is_success() {
            return Ok(r);
        }
        let status = r.status();
        let body: serde_json::Value = r.json().await.unwrap_or_default();
        Err(format!(
            "the source refused ({status}): {}",
            body["error"].as_str().unwrap_or("no reason given")
        ))
    }

    pub async fn info(&self) -> Result<serde_json::Value, String> {
        self.call(reqwest::Method::GET, "info")
            .await?
            .json()
            .await
            .map_err(|e| e.to_string())
    }

    /// Has the source take a backup and copies it into `into/backups/ID`
    /// (a repository layout `backup::restore` reads). Returns its path.
    pub async fn fetch_base_backup(&self, into: &Path) -> Result<PathBuf, String> {
        let v: serde_json::Value = self
            .call(reqwest::Method::POST, "backup")
            .await?
            .json()
            .await
            .map_err(|e| e.to_string())?;
        let id = v["id"].as_str().ok_or("the source sent no backup id")?;
        let dir = into.join("backups").join(id);
        fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        fs::create_dir_all(into.join("wal")).map_err(|e| e.to_string())?;
        for f in v["files"].as_array().into_iter().flatten() {
            let name = f["name"].as_str().ok_or("bad file list")?;
            let want = f["bytes"].as_u64().ok_or("bad file list")?;
            let mut out = Vec::with_capacity(want as usize);
            while (out.len() as u64) < want {
                let chunk = self
                    .call(
                        reqwest::Method::GET,
                        &format!("backup/{id}/{name}?offset={}", out.len()),
                    )
                    .await?
                    .bytes()
                    .await
                    .map_err(|e| e.to_string())?;
                if chunk.is_empty() {
                    return Err(format!("the source's backup file {name} ended early"));
                }
                out.extend_from_slice(&chunk);
            }
            let p = dir.join(name);
            resource::write_atomic(&p, &out, 0o600).map_err(|e| e.to_string())?;
        }
        Ok(dir)
    }

    async fn segment(
        &self,
        name: &str,
        seq: u64,
        from: u64,
        wait_ms: u64,
    ) -> Result<Chunk, String> {
        let r = self
            .call(
                reqwest::Method::GET,
                &format!("wal/{name}/{seq}?from={from}&wait_ms={wait_ms}"),
            )
            .await?;
        let h =
            |k: &str| -> Option<String> { r.headers().get(k)?.to_str().ok().map(str::to_string) };
        let num = |k: &str| h(k).and_then(|v| v.parse::<u64>().ok());
        let len = num("x-atrest-segment-len").ok_or("no segment length in the reply")?;
        let data_from = num("x-atrest-from").unwrap_or(from);
        let commit_us = num("x-atrest-commit-time-us").unwrap_or(0);
        let newer = num("x-atrest-next-seq");
        let head = h("x-atrest-head")
            .and_then(|v| {
                let (a, b) = v.split_once(':')?;
                Some((a.parse().ok()?, b.parse().ok()?))
            })
            .unwrap_or((seq, len));
        let body = r.bytes().await.map_err(|e| e.to_string())?;
        Ok(Chunk {
            len,
            data_from,
            commit_us,
            newer,
            head,
            body: body.to_vec(),
        })
    }
}

struct Chunk {
    len: u64,
    data_from: u64,
    commit_us: u64,
    newer: Option<u64>,
    head: (u64, u64),
    /// The header region, then the bytes from `data_from`.
    body: Vec<u8>,
}

fn local_segment(dir: &Path, name: &str, seq: u64) -> PathBuf {
    dir.join(REPLICA_DIR)
        .join("wal")
        .join(name)
        .join(format!("{seq:020}.wal"))
}

/// Writes a chunk into the local copy of its segment (same layout).
fn store_chunk(path: &Path, c: &Chunk) -> Result<(), String> {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    if c.body.is_empty() {
        return Ok(());
    }
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(|e| e.to_string())?;
    }
    let f = fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let hl = (atrest_storage::HEADER_LEN as usize).min(c.body.len());
    f.write_all_at(&c.body[..hl], 0)
        .and_then(|()| f.write_all_at(&c.body[hl..], c.data_from.max(hl as u64)))
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// Follows the source: one task per database, and one for its key and
/// its list of databases, while the server is Ready.
pub fn start_follower(ctx: &Arc<ServerCtx>, rc: ReplicaConfig) {
    for name in ctx.databases.names() {
        follow_database(ctx, &rc, name);
    }
    let ctx = Arc::clone(ctx);
    tokio::spawn(async move { watch_source(ctx, rc).await });
}

fn follow_database(ctx: &Arc<ServerCtx>, rc: &ReplicaConfig, name: String) {
    let ctx = Arc::clone(ctx);
    let rc = rc.clone();
    tokio::spawn(async move { follow(ctx, rc, name).await });
}

/// Makes the databases the source has made since, and drops those it
/// dropped. A new database is followed from the archive segment its
/// history starts at, from an empty file.
fn follow_databases(
    ctx: &Arc<ServerCtx>,
    rc: &ReplicaConfig,
    info: &serde_json::Value,
) -> Result<(), String> {
    let theirs: Vec<String> = info["databases"]
        .as_array()
        .ok_or("the source sent no list of databases")?
        .iter()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();
    let mine = ctx.databases.names();
    for name in theirs.iter().filter(|n| !mine.contains(n)) {
        let origin = info["origins"][name.as_str()].as_u64().ok_or_else(|| {
            format!("the source has a database {name} whose archive does not reach back to its creation; create the replica again to have it")
        })?;
        ctx.databases
            .create_as_source_did(name)
            .map_err(|e| e.message)?;
        save_position(
            &ctx.dir,
            name,
            &Position {
                seq: origin,
                ..Position::default()
            },
        )?;
        tracing::info!(database = %name, origin, "following a database the source created");
        follow_database(ctx, rc, name.clone());
    }
    for name in mine.iter().filter(|n| !theirs.contains(n)) {
        ctx.databases
            .drop_as_source_did(name, true, "")
            .map_err(|e| format!("dropping {name}, which the source dropped: {}", e.message))?;
        let _ = fs::remove_dir_all(ctx.dir.join(REPLICA_DIR).join("wal").join(name));
        tracing::info!(database = %name, "dropped a database the source dropped");
    }
    Ok(())
}

/// Keeps the replica under the source's key: when the source rotates its
/// customer key (a new version) or changes it, the replica switches too,
/// as `set-key` does (its own DEKs rewrapped), so that the old version
/// can be retired on both. Until it can (say its identity has not been
/// granted a new key) the reason is in `status`, and the segments under
/// the new key wait.
async fn watch_source(ctx: Arc<ServerCtx>, rc: ReplicaConfig) {
    let shutdown = ctx.shutdown_watch();
    let mut client: Option<SourceClient> = None;
    loop {
        {
            let mut s = shutdown.clone();
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(2)) => {},
                _ = s.changed() => {},
            }
        }
        if *shutdown.borrow() || !ctx.is_replica() {
            return;
        }
        if ctx.state() != State::Ready {
            continue;
        }
        if client.is_none() {
            client = SourceClient::for_replica(&ctx.dir, &rc).ok();
        }
        let Some(c) = &client else { continue };
        let info = match c.info().await {
            Ok(i) => i,
            Err(_) => {
                // The data followers report an unreachable source.
                client = None;
                continue;
            }
        };
        let databases = follow_databases(&ctx, &rc, &info);
        match follow_key_once(&ctx, &rc, &info).await.and(databases) {
            Ok(()) => {
                let _ = fs::remove_file(source_error_path(&ctx.dir));
            }
            Err(e) => {
                tracing::warn!(error = %e, "following the source's key");
                let _ = resource::write_atomic(&source_error_path(&ctx.dir), e.as_bytes(), 0o600);
            }
        }
    }
}

async fn follow_key_once(
    ctx: &Arc<ServerCtx>,
    rc: &ReplicaConfig,
    info: &serde_json::Value,
) -> Result<(), String> {
    let want = info["customer_key"].as_str();
    let have = ctx
        .control
        .live
        .lock()
        .expect("config")
        .encryption
        .customer_key
        .clone();
    if want == have.as_ref().map(|c| c.key.kid()).as_deref() {
        return Ok(());
    }
    let target = match want {
        None => crate::keys::Target::Service,
        Some(kid) => {
            let key = crate::cmk::KeyUrl::parse(kid)?;
            let login = match have {
                Some(c) => c.login,
                None => {
                    // The source moved from the service key to a customer
                    // key: log in where it does.
                    let tenant = info["vault_tenant"]
                        .as_str()
                        .ok_or("the source names no vault tenant")?;
                    let ca = info["vault_ca_pem"]
                        .as_str()
                        .ok_or("the source sends no vault CA")?;
                    resource::write_atomic(&ctx.dir.join("vault-ca.pem"), ca.as_bytes(), 0o644)
                        .map_err(|e| e.to_string())?;
                    crate::cmk::VaultLogin {
                        tenant: tenant.to_string(),
                        ca: PathBuf::from("vault-ca.pem"),
                    }
                }
            };
            crate::keys::Target::Customer { key, login }
        }
    };
    let client_id = ctx
        .control
        .live
        .lock()
        .expect("config")
        .identity
        .client_id
        .clone();
    let engine: Arc<dyn crate::control::Engine> = Arc::clone(ctx) as _;
    let report = ctx.control.set_key(&engine, target).await.map_err(|e| {
        format!(
            "the source now uses {}; this replica cannot switch to it yet: {e} (grant this replica's identity {client_id} get, wrapKey and unwrapKey on that key)",
            want.unwrap_or("its service-managed key")
        )
    })?;
    // The switch set a new protector: route the source's own keys again.
    let customer = want.is_some();
    prepare_keys(ctx.databases.engine(), rc, customer)?;
    tracing::info!(key = want.unwrap_or("service-managed"), report = ?report, "followed the source's key");
    let _ = resource::log_activity(
        &ctx.dir,
        &serde_json::json!({"time": resource::now_rfc3339(), "event": "replica_followed_key",
            "key": want}),
    );
    Ok(())
}

async fn follow(ctx: Arc<ServerCtx>, rc: ReplicaConfig, name: String) {
    let shutdown = ctx.shutdown_watch();
    let mut client: Option<SourceClient> = None;
    let mut lag = Lag::default();
    let mut pos = load_positions(&ctx.dir).remove(&name).unwrap_or_default();
    loop {
        if *shutdown.borrow() || !ctx.is_replica() || !ctx.databases.is_database(&name) {
            return;
        }
        let wait = |d: Duration| {
            let mut s = shutdown.clone();
            async move {
                tokio::select! {
                    _ = tokio::time::sleep(d) => {},
                    _ = s.changed() => {},
                }
            }
        };
        if ctx.state() != State::Ready {
            wait(Duration::from_millis(500)).await;
            continue;
        }
        if client.is_none() {
            match SourceClient::for_replica(&ctx.dir, &rc) {
                Ok(c) => client = Some(c),
                Err(e) => {
                    lag.last_error = Some(e);
                    save_lag(&ctx.dir, &name, &lag);
                    wait(Duration::from_secs(1)).await;
                    continue;
                }
            }
        }
        let c = client.as_ref().expect("client");
        let round = tokio::time::Instant::now();
        match step(&ctx, c, &name, &mut pos, &mut lag).await {
            Ok(()) => {
                lag.last_error = None;
                // Under a steady stream of commits, gather them into fewer,
                // larger batches: each batch costs a sync on the replica.
                tokio::time::sleep_until(round + APPLY_INTERVAL).await;
            }
            Err(e) => {
                tracing::warn!(database = %name, error = %e, "replication");
                lag.last_error = Some(e);
                // The source may have moved (restarted on another port).
                client = None;
                save_lag(&ctx.dir, &name, &lag);
                wait(Duration::from_secs(1)).await;
            }
        }
        let _ = shutdown.has_changed();
    }
}

/// One round: fetch what is new in the current segment, apply it; or move
/// to the next segment once this one is done.
///
/// The local copy of a segment only ever grows by bytes the source has
/// committed (a segment never changes once written, but for its header
/// region, which comes with every reply), so the long poll asks for what
/// the copy lacks. A segment is done when a newer one exists and the copy
/// holds all of its bytes: whatever the copy holds past the last complete
/// transaction is not a transaction (a restart archives the whole WAL,
/// with a transaction cut by the crash or an older generation's frames
/// after the committed ones).
async fn step(
    ctx: &Arc<ServerCtx>,
    c: &SourceClient,
    name: &str,
    pos: &mut Position,
    lag: &mut Lag,
) -> Result<(), String> {
    let local = local_segment(&ctx.dir, name, pos.seq);
    let local_len = || fs::metadata(&local).map_or(0, |m| m.len());
    // The copy needs the segment's beginning (its SQLite WAL header) too:
    // fetch from the start if it does not have everything before `offset`.
    let have = local_len();
    let from = if have >= pos.offset { have } else { 0 };
    let chunk = c.segment(name, pos.seq, from, 1000).await?;
    store_chunk(&local, &chunk)?;
    if chunk.len > pos.offset {
        let (ctx2, name2, local2, from) =
            (Arc::clone(ctx), name.to_string(), local.clone(), pos.offset);
        let applied = tokio::task::spawn_blocking(move || apply_from(&ctx2, &name2, &local2, from))
            .await
            .map_err(|e| e.to_string())?;
        let applied = match applied {
            Ok(a) => a,
            Err(ApplyError::Read(e)) => {
                // A copy torn by a crash of this machine: fetch it again.
                let _ = fs::remove_file(&local);
                return Err(e);
            }
            Err(ApplyError::Apply(e)) => return Err(e),
        };
        if let Some((end, salts, n)) = applied {
            pos.offset = end;
            pos.salts = Some(salts);
            lag.transactions_applied += n;
        }
    }
    let complete = local_len() >= chunk.len;
    if complete && chunk.len > 0 {
        pos.applied_commit_us = pos.applied_commit_us.max(chunk.commit_us);
    }
    save_position(&ctx.dir, name, pos)?;
    if complete {
        if let Some(next) = chunk.newer {
            move_to(ctx, c, name, pos, next).await?;
        }
    }
    // Lag: bytes the source has committed past ours (this segment and any
    // newer), and how old our newest applied commit is when behind.
    let (hseq, hlen) = chunk.head;
    let rest = if complete {
        0
    } else {
        chunk.len - pos.offset.min(chunk.len)
    };
    lag.lag_bytes = if hseq == pos.seq { rest } else { rest + hlen };
    lag.applied_commit_us = pos.applied_commit_us;
    lag.lag_seconds = if lag.lag_bytes == 0 {
        0.0
    } else {
        now_us().saturating_sub(pos.applied_commit_us.max(1)) as f64 / 1e6
    };
    lag.updated_us = now_us();
    save_lag(&ctx.dir, name, lag);
    Ok(())
}

/// Moves a follower from its finished segment to segment `next`. A
/// segment of the same generation (a restart archives the WAL again)
/// continues at the same offset; a new generation starts at its
/// beginning; an empty segment (a crash between its creation and its
/// first commit) is passed through with the position unchanged.
async fn move_to(
    ctx: &Arc<ServerCtx>,
    c: &SourceClient,
    name: &str,
    pos: &mut Position,
    next: u64,
) -> Result<(), String> {
    let nchunk = c.segment(name, next, 0, 0).await?;
    let old = local_segment(&ctx.dir, name, pos.seq);
    if nchunk.len > 0 {
        let nlocal = local_segment(&ctx.dir, name, next);
        store_chunk(&nlocal, &nchunk)?;
        let engine = ctx.databases.engine().clone();
        let salts = tokio::task::spawn_blocking(move || {
            engine
                .read_wal_commits(&nlocal, 0, 1)
                .map(|r| hex::encode(r.salts))
                .map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| e.to_string())??;
        if pos.salts.as_deref() != Some(salts.as_str()) {
            pos.offset = 0;
        }
        pos.salts = Some(salts);
    }
    pos.seq = next;
    save_position(&ctx.dir, name, pos)?;
    let _ = fs::remove_file(old);
    Ok(())
}

enum ApplyError {
    /// The local copy could not be read (fetch it again).
    Read(String),
    Apply(String),
}

/// Reads and applies the transactions of a local segment copy from
/// `from`, in batches, under the database's write gate. Returns the new
/// offset, the salts and how many transactions were applied.
fn apply_from(
    ctx: &ServerCtx,
    name: &str,
    local: &Path,
    from: u64,
) -> Result<Option<(u64, String, u64)>, ApplyError> {
    let engine = ctx.databases.engine();
    let (db, conn) = ctx
        .databases
        .maintenance_connection(name)
        .map_err(|e| ApplyError::Apply(e.message))?;
    // The applied batch is durable before the position says so.
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(|e| ApplyError::Apply(e.to_string()))?;
    let db_path = engine
        .database_path(name)
        .map_err(|e| ApplyError::Apply(e.to_string()))?;
    let mut at = from;
    let mut out = None;
    let mut n = 0u64;
    loop {
        let read = engine
            .read_wal_commits(local, at, BATCH_FRAMES)
            .map_err(|e| ApplyError::Read(format!("reading {}: {e}", local.display())))?;
        let Some(last) = read.commits.last() else {
            break;
        };
        let end = last.end;
        db.gate
            .acquire(APPLIER_PID, Some(Duration::from_secs(60)), &|| None)
            .map_err(|e| ApplyError::Apply(e.message))?;
        let applied = conn.apply_wal_commits(&read.commits);
        if applied.is_ok() {
            // The replica checkpoints its own WAL (it archives nothing).
            if engine
                .wal_status(&db_path)
                .is_some_and(|s| s.committed_frames >= 1000)
            {
                let _ = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()));
            }
        }
        db.gate.release(APPLIER_PID);
        applied.map_err(|e| ApplyError::Apply(format!("applying to {name}: {e}")))?;
        n += read.commits.len() as u64;
        at = end;
        out = Some((end, hex::encode(read.salts), n));
    }
    Ok(out)
}

/// Lets the engine read segments wrapped under the source's service key
/// and infrastructure key (a customer key needs nothing: it is the same
/// key). A replica under a customer key can do without the source's
/// service key (it needs it only if the source moves back to it), so a
/// missing one is then a warning, not a failure.
pub fn prepare_keys(
    engine: &atrest_storage::Engine,
    rc: &ReplicaConfig,
    customer_key: bool,
) -> Result<(), String> {
    let plan = |service: bool| crate::backup::RestorePlan {
        backup: String::new(),
        to_time_unix_us: None,
        source_service_key: rc.source_service_key.clone().filter(|_| service),
        source_keystore_dir: rc.source_keystore_dir.clone(),
        source_infra_key: rc.source_infra_key.clone(),
        source_infra_keystore_dir: rc.source_infra_keystore_dir.clone(),
        replay: BTreeMap::new(),
    };
    match crate::backup::prepare_engine(engine, &plan(true)) {
        Err(e) if customer_key => {
            tracing::warn!(error = %e, "the source's service key is not available to this replica (it is not needed while the source uses its customer key)");
            crate::backup::prepare_engine(engine, &plan(false))
        }
        r => r,
    }
}

// ---------------------------------------------------------------------------
// Creating and promoting a replica

/// What `atrest server replica create` is asked for.
pub struct CreateOptions {
    /// The source: its server directory on this machine, or its address
    /// HOST:PORT (then `source_ca` and `token_file` are needed).
    pub source: String,
    pub source_ca: Option<PathBuf>,
    pub token_file: Option<PathBuf>,
    pub name: String,
    pub dir: PathBuf,
    pub listen: Option<String>,
}

/// Makes a read replica: a base backup of the source restored into a new
/// server (new identity, TLS certificate and service key; the same
/// customer key, and then Inaccessible until its identity is granted the
/// key and revalidated, as a restore is), which follows the source from
/// the backup's point once it runs.
pub async fn create(opts: &CreateOptions) -> Result<crate::backup::Restored, String> {
    let src = Path::new(&opts.source);
    let (addr, ca, token, source_dir) = if src.join(resource::CONFIG_FILE).exists() {
        let sdir = src
            .canonicalize()
            .map_err(|e| format!("{}: {e}", src.display()))?;
        let sconfig = resource::load_config(&sdir).map_err(|e| e.to_string())?;
        let state = resource::load_state(&sdir).map_err(|e| e.to_string())?;
        let addr = match (&state.listen, resource::running_pid(&sdir)) {
            (Some(a), Some(_)) => a.clone(),
            _ => {
                return Err(format!(
                    "the source server in {} is not running: start it first (a replica follows a running source)",
                    sdir.display()
                ))
            }
        };
        let ca_path = sconfig.tls.ca.as_ref().ok_or(
            "the source uses an operator-supplied TLS certificate: give its CA with --source-ca and its address as --source",
        )?;
        let ca = fs::read(resource::resolve(&sdir, ca_path)).map_err(|e| e.to_string())?;
        let token = crate::replicas::allow(&sdir, &opts.name)?;
        (addr, ca, token, Some(sdir))
    } else {
        let (Some(ca), Some(tf)) = (&opts.source_ca, &opts.token_file) else {
            return Err(format!(
                "{} is not a server directory; for a source at an address give --source-ca (its TLS CA) and --token-file (from `atrest server replica allow` on the source)",
                opts.source
            ));
        };
        let ca = fs::read(ca).map_err(|e| format!("{}: {e}", ca.display()))?;
        let token = fs::read_to_string(tf).map_err(|e| format!("{}: {e}", tf.display()))?;
        (opts.source.clone(), ca, token.trim().to_string(), None)
    };
    let allowed_on = source_dir.clone();
    let client = SourceClient::new(&addr, &ca, &token)?;
    client.info().await?;
    let parent = opts
        .dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(parent).map_err(|e| e.to_string())?;
    let tmp = parent.join(format!(".{}.base-{}", opts.name, &resource::uuid()[..8]));
    let result = async {
        let backup = client.fetch_base_backup(&tmp).await?;
        let manifest = crate::backup::read_manifest(&backup)?;
        let restore = crate::backup::RestoreOptions {
            from: backup.clone(),
            to_time_us: None,
            name: opts.name.clone(),
            dir: opts.dir.clone(),
            listen: opts.listen.clone(),
        };
        let mut restored = tokio::task::spawn_blocking(move || crate::backup::restore(&restore))
            .await
            .map_err(|e| e.to_string())??;
        let dir = opts.dir.canonicalize().map_err(|e| e.to_string())?;
        let rdir = dir.join(REPLICA_DIR);
        fs::create_dir_all(&rdir).map_err(|e| e.to_string())?;
        resource::write_atomic(&rdir.join("source-ca.pem"), &ca, 0o644)
            .map_err(|e| e.to_string())?;
        resource::write_atomic(&rdir.join("token"), token.as_bytes(), 0o600)
            .map_err(|e| e.to_string())?;
        let rc = ReplicaConfig {
            source: addr.clone(),
            source_name: manifest.source.name.clone(),
            source_server_id: manifest.source.server_id.clone(),
            source_dir,
            source_ca: PathBuf::from(REPLICA_DIR).join("source-ca.pem"),
            token_file: PathBuf::from(REPLICA_DIR).join("token"),
            // Even under a customer key: the source may move back to its
            // service key, and a replica follows.
            source_service_key: manifest.data_dir_info["service_key"]
                .as_str()
                .map(str::to_string),
            source_keystore_dir: manifest.source.encryption.keystore_dir.clone(),
            source_infra_key: manifest.entry.infrastructure_key.clone(),
            source_infra_keystore_dir: manifest.source.encryption.infra_keystore_dir.clone(),
        };
        for d in &manifest.entry.databases {
            save_position(
                &dir,
                &d.name,
                &Position {
                    seq: d.archive_from,
                    offset: d.wal_bytes,
                    salts: None,
                    applied_commit_us: d.point_unix_us,
                },
            )?;
        }
        let mut config = resource::load_config(&dir).map_err(|e| e.to_string())?;
        config.replica = Some(rc);
        config.save(&dir).map_err(|e| e.to_string())?;
        let _ = resource::log_activity(
            &dir,
            &serde_json::json!({"time": resource::now_rfc3339(), "event": "replica_created",
                "source": manifest.source.name, "backup": manifest.entry.id}),
        );
        restored.config = config;
        Ok::<_, String>(restored)
    }
    .await;
    let _ = fs::remove_dir_all(&tmp);
    if let (Err(_), Some(sdir)) = (&result, &allowed_on) {
        // Nothing half-made: the token goes too.
        let _ = disallow(sdir, &opts.name);
    }
    result
}

/// Turns a replica into an independent, writable server. Running: at
/// once (the archive of its own WAL starts at its next start). Stopped:
/// in its configuration.
pub fn promote(dir: &Path) -> Result<(), String> {
    let mut config = resource::load_config(dir).map_err(|e| e.to_string())?;
    let Some(rc) = config.replica.take() else {
        return Err(format!("{} is not a read replica", dir.display()));
    };
    config.save(dir).map_err(|e| e.to_string())?;
    let _ = fs::remove_dir_all(dir.join(REPLICA_DIR).join("wal"));
    let _ = resource::log_activity(
        dir,
        &serde_json::json!({"time": resource::now_rfc3339(), "event": "replica_promoted",
            "source": rc.source_name}),
    );
    Ok(())
}

/// The admin socket's `promote`: the running server stops following and
/// takes writes.
pub fn promote_running(ctx: &ServerCtx) -> Result<(), String> {
    if !ctx.is_replica() {
        return Err("this server is not a read replica".into());
    }
    promote(&ctx.dir)?;
    ctx.control.live.lock().expect("config").replica = None;
    ctx.databases.set_read_only(None);
    tracing::info!("promoted: no longer a replica; writes are taken");
    Ok(())
}
