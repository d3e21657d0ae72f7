//! `atrest server start`: opens the engine, listens, accepts connections,
//! serves /metrics and /status, and shuts down gracefully.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use atrest_keystore::Keystore;
use atrest_storage::{Engine, EngineOptions};
use http_body_util::Full;
use hyper::body::Bytes;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::databases::Databases;
use crate::metrics::Metrics;
use crate::resource::{self, Endpoints, Limits, ResourceError, Role, Roles, ServerConfig, State};
use crate::session::SessionShared;

/// Whether new sessions are admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Ready,
    Stopping,
}

/// What every connection of a running server shares.
pub struct ServerCtx {
    pub dir: PathBuf,
    pub config: ServerConfig,
    pub limits: Limits,
    pub databases: Arc<Databases>,
    pub metrics: Arc<Metrics>,
    pub tls: TlsAcceptor,
    /// `tls-server-end-point` of our certificate (None: -PLUS not offered).
    pub channel_binding: Option<Vec<u8>>,
    pub mock_key: String,
    roles: RwLock<Roles>,
    sessions: Mutex<HashMap<i32, Arc<SessionShared>>>,
    next_pid: AtomicI32,
    phase: AtomicU8,
    shutdown_tx: tokio::sync::watch::Sender<bool>,
    grace_tx: tokio::sync::watch::Sender<Option<Instant>>,
}

impl ServerCtx {
    pub fn phase(&self) -> Phase {
        if self.phase.load(Ordering::SeqCst) == 0 {
            Phase::Ready
        } else {
            Phase::Stopping
        }
    }

    pub fn role(&self, user: &str) -> Option<Role> {
        self.roles.read().expect("roles").roles.get(user).cloned()
    }

    /// Admits a new session unless the server is full: gives it a pid and
    /// a cancel secret and registers it, in one step (no race past the limit).
    pub fn admit(
        &self,
        make: impl FnOnce(i32, i32) -> Arc<SessionShared>,
    ) -> Option<Arc<SessionShared>> {
        let mut sessions = self.sessions.lock().expect("sessions");
        if sessions.len() >= self.limits.max_connections {
            return None;
        }
        let pid = self.next_pid.fetch_add(1, Ordering::Relaxed);
        let mut b = [0u8; 4];
        aws_lc_rs::rand::fill(&mut b).expect("system RNG");
        let shared = make(pid, i32::from_ne_bytes(b));
        sessions.insert(pid, Arc::clone(&shared));
        Some(shared)
    }

    pub fn unregister(&self, pid: i32) {
        self.sessions.lock().expect("sessions").remove(&pid);
    }

    pub fn session_count(&self) -> usize {
        self.sessions.lock().expect("sessions").len()
    }

    /// A CancelRequest: cancels the session's running statement if the
    /// secret matches (compared in constant time).
    pub fn cancel(&self, pid: i32, secret: i32) -> bool {
        let s = self.sessions.lock().expect("sessions").get(&pid).cloned();
        match s {
            Some(s)
                if aws_lc_rs::constant_time::verify_slices_are_equal(
                    &s.secret.to_ne_bytes(),
                    &secret.to_ne_bytes(),
                )
                .is_ok() =>
            {
                tracing::info!(pid, "cancel request");
                s.cancel();
                true
            }
            _ => {
                tracing::info!(pid, "cancel request for no matching session");
                false
            }
        }
    }

    pub fn shutdown_watch(&self) -> tokio::sync::watch::Receiver<bool> {
        self.shutdown_tx.subscribe()
    }

    /// Resolves once shutdown was requested and its grace period is over.
    pub async fn grace_over(&self) {
        let mut rx = self.grace_tx.subscribe();
        loop {
            let deadline = *rx.borrow_and_update();
            if let Some(d) = deadline {
                tokio::time::sleep_until(d.into()).await;
                return;
            }
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
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
}

fn load_tls(
    dir: &Path,
    config: &ServerConfig,
) -> Result<(TlsAcceptor, Option<Vec<u8>>), StartError> {
    let cert = resource::resolve(dir, &config.tls.cert);
    let key = resource::resolve(dir, &config.tls.key);
    let chain =
        std::fs::read(&cert).map_err(|e| StartError::Tls(format!("{}: {e}", cert.display())))?;
    let keypem = zeroize::Zeroizing::new(
        std::fs::read(&key).map_err(|e| StartError::Tls(format!("{}: {e}", key.display())))?,
    );
    let mut cfg = atrest_vault::tls::server_config_pem(&chain, &keypem)
        .map_err(|e| StartError::Tls(e.to_string()))?;
    cfg.alpn_protocols = vec![b"postgresql".to_vec()];
    let leaf = rustls_pemfile::certs(&mut chain.as_slice())
        .next()
        .and_then(Result::ok)
        .ok_or_else(|| StartError::Tls(format!("no certificate in {}", cert.display())))?;
    let binding = crate::scram::tls_server_end_point(&leaf);
    if binding.is_none() {
        tracing::warn!("the certificate's signature algorithm has no channel-binding hash; SCRAM-SHA-256-PLUS is not offered");
    }
    Ok((TlsAcceptor::from(Arc::new(cfg)), binding))
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
        let _ = resource::set_state(&self.ctx.dir, State::Stopped, reason, None);
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
    resource::set_state(&dir, State::Starting, "start requested", None)?;
    let result = start_locked(&dir, config, &opts).await;
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
            let _ = resource::set_state(&dir, State::Stopped, &format!("start failed: {e}"), None);
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

async fn start_locked(
    dir: &Path,
    config: ServerConfig,
    opts: &StartOptions,
) -> Result<Started, StartError> {
    let limits = opts.limits.clone().unwrap_or_else(|| config.limits.clone());
    let roles = Roles::load(dir)?;
    // The service key must be there and readable before anything listens.
    Keystore::open(&config.encryption.keystore_dir).map_err(ResourceError::from)?;
    let engine = Engine::open(&EngineOptions {
        data_dir: dir.join(resource::DATA_SUBDIR),
        keystore_dir: Some(config.encryption.keystore_dir.clone()),
    })?;
    if engine.info().map(|i| i.service_key.as_str()) != Some(config.encryption.service_key.as_str())
    {
        return Err(StartError::Resource(ResourceError::Corrupt {
            path: dir.join(resource::DATA_SUBDIR),
            reason: format!(
                "the data directory's service key does not match {} in {}",
                config.encryption.service_key,
                resource::CONFIG_FILE
            ),
        }));
    }
    // Unwrap every database's DEK now: a missing or wrong key is found at
    // start, not at the first query.
    let databases = Arc::new(Databases::new(engine));
    for name in databases.names() {
        let (_lease, conn) = databases.connect(&name).map_err(|e| StartError::Database {
            name: name.clone(),
            message: e.message,
        })?;
        conn.query_row("SELECT count(*) FROM sqlite_schema", [], |r| {
            r.get::<_, i64>(0)
        })
        .map_err(atrest_storage::StorageError::from_sqlite)?;
    }
    let (tls, channel_binding) = load_tls(dir, &config)?;
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
    let ctx = Arc::new(ServerCtx {
        dir: dir.to_path_buf(),
        mock_key: roles.mock_key.clone(),
        config,
        limits,
        databases,
        metrics: Arc::new(Metrics::default()),
        tls,
        channel_binding,
        roles: RwLock::new(roles),
        sessions: Mutex::new(HashMap::new()),
        next_pid: AtomicI32::new(1000),
        phase: AtomicU8::new(0),
        shutdown_tx,
        grace_tx,
    });
    if let Some(ml) = metrics_listener {
        let c = Arc::clone(&ctx);
        tokio::spawn(serve_http(ml, c));
    }
    resource::set_state(
        dir,
        State::Ready,
        "started",
        Some(&Endpoints {
            pid: Some(std::process::id()),
            listen: Some(listen.to_string()),
            metrics: metrics_addr.map(|a| a.to_string()),
        }),
    )?;
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
    ctx.phase.store(1, Ordering::SeqCst);
    let grace = Duration::from_millis(ctx.limits.shutdown_grace_ms);
    let _ = resource::set_state(
        &ctx.dir,
        State::Stopping,
        &format!(
            "shutdown requested; {} session(s) open, {} ms for open transactions",
            ctx.session_count(),
            grace.as_millis()
        ),
        None,
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

async fn serve_http(listener: TcpListener, ctx: Arc<ServerCtx>) {
    use hyper::service::service_fn;
    loop {
        let Ok((sock, _)) = listener.accept().await else {
            continue;
        };
        let c = Arc::clone(&ctx);
        tokio::spawn(async move {
            let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let c = Arc::clone(&c);
                async move {
                    let (status, ctype, body) = match req.uri().path() {
                        "/metrics" => {
                            let state = match c.phase() {
                                Phase::Ready => "Ready",
                                Phase::Stopping => "Stopping",
                            };
                            (
                                200,
                                "text/plain; version=0.0.4",
                                c.metrics.render(&c.databases.engine().stats(), state),
                            )
                        }
                        "/status" => match resource::status(&c.dir) {
                            Ok(mut v) => {
                                v["sessions"] = serde_json::json!(c.session_count());
                                (200, "application/json", v.to_string())
                            }
                            Err(e) => (500, "text/plain", e.to_string()),
                        },
                        "/healthz" => (200, "text/plain", "ok\n".to_string()),
                        _ => (404, "text/plain", "not found\n".to_string()),
                    };
                    hyper::Response::builder()
                        .status(status)
                        .header("content-type", ctype)
                        .body(Full::new(Bytes::from(body)))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(sock), svc)
                .await;
        });
    }
}
