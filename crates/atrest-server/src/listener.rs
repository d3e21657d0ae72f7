//! `atrest server start`: opens the engine, listens, accepts connections,
//! serves /metrics and /status, and shuts down gracefully.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicI32;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use atrest_keystore::Keystore;
use atrest_storage::EngineOptions;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::cmk::Cause;
use crate::cmk::VaultAccess;
use crate::config::{Limits, ServerConfig};
use crate::control::{AdminReply, Control, KeyRuntime, NOT_READY};
use crate::ctx::ServerCtx;
use crate::databases::Databases;
use crate::keys::Loss;
use crate::lifecycle::Lifecycle;
use crate::metrics::Metrics;
use crate::resource::{self, Endpoints, ResourceError, Roles, State};

/// The sqlite engine beneath the one control plane.
impl crate::control::Engine for ServerCtx {
    /// Ends every session (new ones are refused already), then zeroizes
    /// the unwrapped DEKs.
    fn lock(&self) {
        let sessions: Vec<_> = self
            .sessions
            .lock()
            .expect("sessions")
            .values()
            .cloned()
            .collect();
        for s in &sessions {
            s.terminate();
        }
        self.kick_tx.send_modify(|g| *g += 1);
        let deadline = Instant::now() + Duration::from_secs(15);
        while self.session_count() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        // The rotation's connection holds unit keys too.
        self.rotator.park();
        let n = self.databases.engine().forget_keys();
        tracing::info!(
            keys = n,
            sessions = sessions.len(),
            "sessions ended, data encryption keys zeroized"
        );
    }

    /// Unwraps every database's DEK (and finishes a restore waiting for
    /// its first access to the key).
    fn unlock(&self, _: &ServerConfig, _: Option<&Arc<VaultAccess>>) -> Result<(), String> {
        crate::backup::finish_restore(&self.dir, self.databases.engine())?;
        for name in self.databases.names() {
            let (_lease, conn) = self
                .databases
                .connect(&name)
                .map_err(|e| format!("database {name}: {}", e.message))?;
            conn.query_row("SELECT count(*) FROM sqlite_schema", [], |r| {
                r.get::<_, i64>(0)
            })
            .map_err(|e| format!("database {name}: {}", crate::error::from_sqlite(e).message))?;
        }
        Ok(())
    }

    fn rewrap(&self) -> &dyn crate::keys::Rewrap {
        &*self.databases
    }

    fn session_count(&self) -> usize {
        ServerCtx::session_count(self)
    }

    fn admin_op(self: Arc<Self>, op: &str, req: &Value) -> Option<AdminReply> {
        let ctx = self;
        let reply: Value = match op {
            "backup" | "backup-verify" => {
                if ctx.state() != State::Ready {
                    return Some(Box::pin(async { json!({"error": NOT_READY}) }));
                }
                let op = op.to_string();
                let id = req["id"].as_str().map(str::to_string);
                return Some(Box::pin(async move {
                    let r = tokio::task::spawn_blocking(move || {
                        let config = ctx.control.live.lock().expect("live config").clone();
                        if op == "backup" {
                            crate::backup::take_backup(&ctx.dir, &config, &ctx.databases)
                                .map(|e| json!({"ok": true, "backup": e}))
                        } else {
                            let repo = crate::backup::repository(&ctx.dir, &config);
                            crate::backup::verify_all(ctx.databases.engine(), &repo, id.as_deref())
                                .map(|r| json!({"ok": true, "verified": r}))
                        }
                    })
                    .await;
                    match r {
                        Ok(Ok(v)) => v,
                        Ok(Err(e)) => json!({"error": e}),
                        Err(e) => json!({"error": e.to_string()}),
                    }
                }));
            }
            "rotate-dek" | "rotation-status" => {
                crate::rotation::admin_op(&ctx.rotator, ctx.state() == State::Ready, op, req)?
            }
            "promote" => match crate::replication::promote_running(&ctx) {
                Ok(()) => json!({"ok": true}),
                Err(e) => json!({"error": e}),
            },
            _ => return None,
        };
        Some(Box::pin(async move { reply }))
    }
}

/// Options of `atrest server start`.
#[derive(Debug, Clone, Default)]
pub struct StartOptions {
    pub dir: PathBuf,
    /// Overrides `default_listen` from the configuration.
    pub listen: Option<String>,
    /// Where to serve /metrics and /status (off if None).
    pub metrics_listen: Option<String>,
    /// Overrides the configured limits.
    pub limits: Option<Limits>,
}

/// Why a server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Resource(#[from] ResourceError),
    #[error("cannot open the encrypted databases: {0}")]
    Storage(#[from] atrest_storage::StorageError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error("TLS configuration: {0}")]
    Tls(String),
    #[error("database {name}: {message}")]
    Database { name: String, message: String },
    #[error("admin socket: {0}")]
    Admin(std::io::Error),
}

/// The PostgreSQL acceptor (ALPN `postgresql`), the replication API's
/// (direct TLS, ALPN `http/1.1`) and the channel binding.
fn load_tls(
    dir: &Path,
    config: &ServerConfig,
) -> Result<(TlsAcceptor, TlsAcceptor, Option<Vec<u8>>), StartError> {
    let (mut cfg, chain) = resource::tls_server_config(dir, config).map_err(StartError::Tls)?;
    let mut replication = cfg.clone();
    replication.alpn_protocols = vec![b"http/1.1".to_vec()];
    cfg.alpn_protocols = vec![b"postgresql".to_vec()];
    let leaf = rustls_pemfile::certs(&mut chain.as_slice())
        .next()
        .and_then(Result::ok)
        .ok_or_else(|| {
            StartError::Tls(format!(
                "no certificate in {}",
                resource::resolve(dir, &config.tls.cert).display()
            ))
        })?;
    let binding = crate::scram::tls_server_end_point(&leaf);
    if binding.is_none() {
        tracing::warn!("the certificate's signature algorithm has no channel-binding hash; SCRAM-SHA-256-PLUS is not offered");
    }
    Ok((
        TlsAcceptor::from(Arc::new(cfg)),
        TlsAcceptor::from(Arc::new(replication)),
        binding,
    ))
}

/// A started server: where it listens, and how to stop it.
pub struct Running {
    pub listen: SocketAddr,
    pub metrics: Option<SocketAddr>,
    ctx: Arc<ServerCtx>,
    stop_tx: tokio::sync::oneshot::Sender<()>,
    done: tokio::task::JoinHandle<()>,
    _lock: resource::ServerLock,
}

impl Running {
    pub fn ctx(&self) -> &Arc<ServerCtx> {
        &self.ctx
    }

    /// Graceful shutdown: waits until every session ended.
    pub async fn stop(self, reason: &str) {
        let _ = self.stop_tx.send(());
        let _ = self.done.await;
        let _ = self.ctx.lifecycle.transition(State::Stopped, reason);
        self.ctx
            .lifecycle
            .drain_alerts(Duration::from_secs(10))
            .await;
        let _ = std::fs::remove_file(self.ctx.dir.join(crate::control::ADMIN_SOCKET));
    }
}

/// Opens the server in `dir` and starts serving. Returns once it listens.
pub async fn start(opts: StartOptions) -> Result<Running, StartError> {
    let dir = opts.dir.canonicalize().map_err(|e| ResourceError::Io {
        path: opts.dir.clone(),
        source: e,
    })?;
    let config = resource::load_config(&dir)?;
    let lock = resource::lock(&dir)?;
    let lifecycle = Arc::new(Lifecycle::begin(&dir, &config));
    let result = start_locked(&dir, config.clone(), &opts, Arc::clone(&lifecycle)).await;
    match result {
        Ok((listen, metrics, ctx, stop_tx, done)) => Ok(Running {
            listen,
            metrics,
            ctx,
            stop_tx,
            done,
            _lock: lock,
        }),
        Err(e) => {
            let reason = format!("start failed: {e}");
            let _ = lifecycle.transition(State::Stopped, &reason);
            lifecycle.drain_alerts(Duration::from_secs(10)).await;
            Err(e)
        }
    }
}

type Started = (
    SocketAddr,
    Option<SocketAddr>,
    Arc<ServerCtx>,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
);

/// BENCHMARK ONLY, in builds with the non-default cargo feature
/// `plaintext-baseline`: with this environment variable set, `atrest server
/// start` serves its databases with plain SQLite, unencrypted (the baseline
/// of `atrest bench pgbench`; see docs/BENCHMARKS.md). Without the feature
/// the variable means nothing.
#[cfg(feature = "plaintext-baseline")]
pub const PLAINTEXT_BASELINE_ENV: &str = "ATREST_BENCH_PLAINTEXT_BASELINE";

async fn start_locked(
    dir: &Path,
    config: ServerConfig,
    opts: &StartOptions,
    lifecycle: Arc<Lifecycle>,
) -> Result<Started, StartError> {
    let limits = opts.limits.clone().unwrap_or_else(|| config.limits.clone());
    let roles = Roles::load(dir)?;
    // The service key must be there and readable before anything listens.
    Keystore::open(&config.encryption.keystore_dir).map_err(ResourceError::from)?;
    let engine = atrest_storage::Engine::open(&EngineOptions {
        data_dir: dir.join(resource::DATA_SUBDIR),
        keystore_dir: Some(config.encryption.keystore_dir.clone()),
        infrastructure_encryption: Some(config.encryption.infrastructure_encryption),
        infra_keystore_dir: config.encryption.infra_keystore_dir.clone(),
    })?;
    #[cfg(feature = "plaintext-baseline")]
    if std::env::var_os(PLAINTEXT_BASELINE_ENV).is_some() {
        engine.enable_plaintext_baseline();
    }
    if engine.info().map(|i| i.service_key) != Some(config.encryption.service_key.clone()) {
        return Err(StartError::Resource(ResourceError::Corrupt {
            path: dir.join(resource::DATA_SUBDIR),
            reason: format!(
                "the data directory's service key does not match {} in {}",
                config.encryption.service_key,
                resource::CONFIG_FILE
            ),
        }));
    }
    // A customer key: reach the vault as this server's identity. The
    // engine's protector follows the configuration (and, while a rewrap is
    // unfinished, the keys it came from).
    let mut key_failure: Option<Loss> = None;
    let failed = |reason: String| Some(Loss::refused(Cause::Other, reason));
    let mut runtime = KeyRuntime::default();
    if let Some(ck) = &config.encryption.customer_key {
        match crate::keys::vault_access(dir, &config, &ck.login, &ck.key) {
            Ok(a) => {
                runtime.access = Some(a);
                runtime.key = Some(ck.key.clone());
            }
            Err(e) => key_failure = failed(format!("cannot reach the vault: {e}")),
        }
    }
    if config.encryption.customer_key.is_some() || !config.encryption.rewrap_from.is_empty() {
        match crate::keys::engine_protector(&config, runtime.access.as_ref()) {
            Ok(p) => engine.set_protector(p),
            Err(e) => key_failure = key_failure.or(failed(e)),
        }
    }
    // Unwrap every database's DEK now: a missing or wrong key is found at
    // start, not at the first query. With a customer key a refusal means
    // Inaccessible, not a failed start.
    let databases = Arc::new(Databases::new(engine));
    match &config.replica {
        // A replica archives nothing (its source does) and takes no writes.
        Some(rc) => databases.set_read_only(Some(format!(
            "this server is a read replica of {}; send writes to the source ({})",
            rc.source_name, rc.source
        ))),
        None => databases.set_archive(crate::backup::repository(dir, &config)),
    }
    // A restore not finished yet: its files are still under the source's
    // keys. With a service key it finishes now; with a customer key once
    // the vault lets this server's identity in.
    if key_failure.is_none()
        && config.encryption.customer_key.is_some()
        && crate::backup::pending_plan(dir).is_some()
    {
        // The seeds' procedure: a restored server stays Inaccessible until
        // its identity is granted the key and it is revalidated.
        key_failure = Some(Loss::refused(Cause::Restored,
            "restored from a backup: grant this server's identity get, wrapKey and unwrapKey on its customer key, then run `atrest server revalidate`",
        ));
    }
    if key_failure.is_none() && crate::backup::pending_plan(dir).is_some() {
        if let Err(e) = crate::backup::finish_restore(dir, databases.engine()) {
            if config.encryption.customer_key.is_none() {
                return Err(StartError::Database {
                    name: "(restore)".into(),
                    message: e,
                });
            }
            key_failure = failed(format!("finishing the restore: {e}"));
        }
    }
    if key_failure.is_none() {
        for name in databases.names() {
            let opened =
                databases
                    .connect(&name)
                    .map_err(|e| e.message)
                    .and_then(|(_lease, conn)| {
                        conn.query_row("SELECT count(*) FROM sqlite_schema", [], |r| {
                            r.get::<_, i64>(0)
                        })
                        .map_err(|e| crate::error::from_sqlite(e).message)
                    });
            if let Err(message) = opened {
                if config.encryption.customer_key.is_none() {
                    return Err(StartError::Database { name, message });
                }
                key_failure = failed(format!("database {name}: {message}"));
                break;
            }
        }
    }
    let mut config = config;
    if key_failure.is_none() && !config.encryption.rewrap_from.is_empty() {
        // A key switch was interrupted: finish it before serving.
        let from = config.encryption.rewrap_from.clone();
        match crate::keys::rewrap_all(dir, &mut config, &*databases, runtime.access.as_ref()) {
            Ok(n) => {
                tracing::info!(?from, databases = n, "finished an interrupted rewrap");
                if let Ok(p) = crate::keys::engine_protector(&config, runtime.access.as_ref()) {
                    databases.engine().set_protector(p);
                }
            }
            Err(e) => key_failure = failed(format!("finishing the rewrap: {e}")),
        }
    }
    if let Some(rc) = &config.replica {
        // After any protector change above, and before any
        // revalidation: a replica that starts Inaccessible
        // reads its source's segments once it is back.
        if let Err(e) = crate::replication::prepare_keys(
            databases.engine(),
            rc,
            config.encryption.customer_key.is_some(),
        ) {
            key_failure = key_failure.or(failed(format!("the source's keys: {e}")));
        }
    }
    if key_failure.is_none() {
        // Archive what the WAL holds from before this start, then begin a
        // fresh generation (see crate::backup).
        crate::backup::recover_all(&databases).map_err(|message| StartError::Database {
            name: "(WAL archive)".into(),
            message,
        })?;
    }
    if key_failure.is_none() {
        if let (Some(a), Some(k)) = (&runtime.access, &runtime.key) {
            let (a, k) = (Arc::clone(a), k.clone());
            match tokio::task::spawn_blocking(move || crate::keys::Probe::make(&a, &k)).await {
                Ok(Ok(p)) => runtime.probe = Some(Arc::new(p)),
                Ok(Err(l)) => key_failure = Some(l),
                Err(e) => key_failure = failed(e.to_string()),
            }
        }
    }
    if key_failure.is_some() {
        databases.engine().forget_keys();
    }
    let (tls, replication_tls, channel_binding) = load_tls(dir, &config)?;
    let addr = opts
        .listen
        .clone()
        .unwrap_or_else(|| config.default_listen.clone());
    let listener = TcpListener::bind(&addr)
        .await
        .map_err(|e| StartError::Listen {
            addr: addr.clone(),
            source: e,
        })?;
    let listen = listener.local_addr().map_err(|e| StartError::Listen {
        addr: addr.clone(),
        source: e,
    })?;
    let metrics_listener = match &opts.metrics_listen {
        Some(a) => Some(TcpListener::bind(a).await.map_err(|e| StartError::Listen {
            addr: a.clone(),
            source: e,
        })?),
        None => None,
    };
    let metrics_addr = metrics_listener.as_ref().and_then(|l| l.local_addr().ok());
    let (shutdown_tx, _) = tokio::sync::watch::channel(false);
    let (grace_tx, _) = tokio::sync::watch::channel(None);
    let (kick_tx, _) = tokio::sync::watch::channel(0u64);
    lifecycle.set_endpoints(Endpoints {
        pid: Some(std::process::id()),
        listen: Some(listen.to_string()),
        metrics: metrics_addr.map(|a| a.to_string()),
    });
    let rotator = crate::rotation::DekRotator::new(
        crate::rotation::DatabaseRotation::new(Arc::clone(&databases)),
        dir.to_path_buf(),
        config.dek_rotation.clone(),
    );
    let control = Control::new(dir.to_path_buf(), &config, Arc::clone(&lifecycle), runtime);
    let ctx = Arc::new(ServerCtx {
        rotator,
        dir: dir.to_path_buf(),
        mock_key: roles.mock_key.clone(),
        control,
        config,
        limits,
        databases,
        metrics: Arc::new(Metrics::default()),
        tls,
        replication_tls,
        channel_binding,
        roles: RwLock::new(roles),
        sessions: Mutex::new(HashMap::new()),
        next_pid: AtomicI32::new(1000),
        lifecycle,
        shutdown_tx,
        grace_tx,
        kick_tx,
    });
    if let Some(ml) = metrics_listener {
        let observed: Arc<dyn crate::http::Observe> = Arc::clone(&ctx) as _;
        tokio::spawn(crate::http::serve(ml, Arc::clone(&ctx.lifecycle), observed));
    }
    let engine: Arc<dyn crate::control::Engine> = Arc::clone(&ctx) as _;
    crate::control::serve_admin(Arc::clone(&ctx.control), Arc::clone(&engine))
        .map_err(StartError::Admin)?;
    match key_failure {
        None => {
            let _ = ctx.lifecycle.transition(State::Ready, "started");
        }
        Some(loss) => ctx.control.mark_inaccessible(loss, "at start: "),
    }
    // Always: a customer key can be set while the server runs.
    tokio::spawn(crate::control::monitor(Arc::clone(&ctx.control), engine));
    // Resumes an unfinished DEK rotation once Ready, and rotates DEKs that
    // reach their usage limit.
    ctx.rotator.start(Arc::clone(&ctx.lifecycle));
    if let Some(rc) = ctx.config.replica.clone() {
        crate::replication::start_follower(&ctx, rc);
    }
    tracing::info!(%listen, metrics = ?metrics_addr, server = %ctx.config.name, "atrest server listening");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
    let c = Arc::clone(&ctx);
    let done = tokio::spawn(accept_loop(listener, c, stop_rx));
    Ok((listen, metrics_addr, ctx, stop_tx, done))
}

async fn accept_loop(
    listener: TcpListener,
    ctx: Arc<ServerCtx>,
    mut stop: tokio::sync::oneshot::Receiver<()>,
) {
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((sock, peer)) => {
                    let c = Arc::clone(&ctx);
                    tasks.spawn(crate::connection::handle(sock, peer, c));
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            _ = &mut stop => break,
        }
    }
    // Graceful shutdown: refuse new sessions, end idle ones now, give open
    // transactions the grace period, then roll them back.
    ctx.rotator.shutdown();
    let grace = Duration::from_millis(ctx.limits.shutdown_grace_ms);
    let _ = ctx.lifecycle.transition(
        State::Stopping,
        &format!(
            "shutdown requested; {} session(s) open, {} ms for open transactions",
            ctx.session_count(),
            grace.as_millis()
        ),
    );
    let _ = ctx.grace_tx.send(Some(Instant::now() + grace));
    let _ = ctx.shutdown_tx.send(true);
    // Keep answering new connections (with "shutting down") until done.
    let deadline = Instant::now() + grace + Duration::from_secs(10);
    loop {
        tokio::select! {
            r = tasks.join_next() => if r.is_none() { break },
            accepted = listener.accept() => if let Ok((sock, peer)) = accepted {
                let c = Arc::clone(&ctx);
                tasks.spawn(crate::connection::handle(sock, peer, c));
            },
            _ = tokio::time::sleep_until(deadline.into()) => {
                tracing::warn!(left = tasks.len(), "sessions did not end in time; aborting them");
                tasks.abort_all();
                break;
            }
        }
    }
}

/// `/metrics` and `/status` of the sqlite engine.
impl crate::http::Observe for ServerCtx {
    fn metrics(&self) -> String {
        self.metrics.render(&self.databases.engine().stats()) + &self.rotator.render_metrics()
    }

    fn status(&self, status: &mut serde_json::Value) {
        status["sessions"] = serde_json::json!(self.session_count());
    }
}
