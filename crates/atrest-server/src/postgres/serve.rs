//! `atrest server start` for the postgres engine: PostgreSQL supervised
//! under the one server lifecycle ([`crate::lifecycle`]): the same states,
//! state.json, activity log and webhooks as the sqlite engine, and the same
//! `/metrics`, `/status` and `/healthz` ([`crate::http`]).

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use atrest_crypto::KeyProtector;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::cmk::Cause;
use crate::cmk::VaultAccess;
use crate::config::{EngineKind, Limits, ServerConfig};
use crate::control::{AdminReply, Control, Engine, KeyRuntime};
use crate::http::Observe;
use crate::keys::{self, Loss, Rewrap};
use crate::lifecycle::Lifecycle;
use crate::resource::{self, Endpoints, ResourceError, State};
use crate::rotation::DekRotator;

/// Why a postgres-engine server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Resource(#[from] ResourceError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error("{} holds a {engine:?}-engine server, not a postgres-engine one", dir.display())]
    NotPostgres { dir: PathBuf, engine: EngineKind },
    #[error("the admin socket: {0}")]
    Admin(std::io::Error),
    #[error("the server's TLS certificate: {0}")]
    Tls(String),
}

/// What `/metrics` shows of the postgres engine: the filesystem's unit
/// traffic and authentication failures, and PostgreSQL's restarts.
#[derive(Default)]
struct Observed {
    /// The counters of the current mount (a revalidation mounts anew).
    fs: FsStats,
    restarts: AtomicU64,
    rotator: std::sync::OnceLock<Arc<DekRotator>>,
}

#[derive(Default)]
struct FsStats(Mutex<Arc<atrest_fs::Stats>>);

impl FsStats {
    fn set(&self, s: Arc<atrest_fs::Stats>) {
        *self.0.lock().expect("fs stats") = s;
    }

    fn get(&self) -> Arc<atrest_fs::Stats> {
        Arc::clone(&self.0.lock().expect("fs stats"))
    }
}

impl Observe for Observed {
    fn metrics(&self) -> String {
        let mut s = String::new();
        let mut counter = |name: &str, help: &str, v: u64| {
            s.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}\n"
            ));
        };
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let fs = self.fs.get();
        counter(
            "atrest_fs_reads_total",
            "FUSE read requests served (units opened and authenticated).",
            get(&fs.reads),
        );
        counter(
            "atrest_fs_writes_total",
            "FUSE write requests served (units sealed).",
            get(&fs.writes),
        );
        counter(
            "atrest_fs_fsyncs_total",
            "fsync requests made durable.",
            get(&fs.fsyncs),
        );
        counter(
            "atrest_fs_auth_failures_total",
            "Units or headers that failed authentication (tampering or damage; each is an I/O error to PostgreSQL).",
            get(&fs.auth_failures),
        );
        counter(
            "atrest_postgres_restarts_total",
            "Times PostgreSQL died and was started again on the same mount.",
            get(&self.restarts),
        );
        if let Some(r) = self.rotator.get() {
            s.push_str(&r.render_metrics());
        }
        s
    }

    fn status(&self, status: &mut serde_json::Value) {
        status["postgres_restarts"] = self.restarts.load(Ordering::Relaxed).into();
    }
}

/// Runs the server in `dir` until `shutdown` resolves (to the reason, such
/// as "SIGTERM"). The caller has entered a private mount namespace before
/// starting any thread (see [`atrest_fs::private_mount_namespace`]).
/// The postgres engine beneath the one control plane: PostgreSQL on its
/// mount while the key is there; while it is not, nothing mounted, no key
/// in memory, and the port answering 57P03 ([`super::refuse`]).
struct PgEngine {
    dir: PathBuf,
    listen: String,
    limits: Limits,
    /// Shared with the DEK rotation, which works on the mounted tree.
    running: Arc<Mutex<Option<super::Running>>>,
    rotator: Arc<DekRotator>,
    /// What unwraps and wraps the tree's root DEK now.
    protector: Mutex<Option<Arc<dyn KeyProtector>>>,
    refusing: Mutex<Option<tokio::task::JoinHandle<()>>>,
    tls: TlsAcceptor,
    control: Arc<Control>,
    observed: Arc<Observed>,
    rt: tokio::runtime::Handle,
}

impl PgEngine {
    /// Starts answering the port with 57P03 (PostgreSQL has released it).
    fn start_refusing(&self) {
        let _rt = self.rt.enter();
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        let listener = loop {
            match std::net::TcpListener::bind(&self.listen) {
                Ok(l) => break Some(l),
                Err(_) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(e) => {
                    tracing::error!(listen = %self.listen, error = %e, "cannot answer the port while Inaccessible");
                    break None;
                }
            }
        };
        let Some(l) = listener else { return };
        let listener = match l
            .set_nonblocking(true)
            .and_then(|_| TcpListener::from_std(l))
        {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "cannot answer the port while Inaccessible");
                return;
            }
        };
        let task = tokio::spawn(super::refuse::refuse(
            listener,
            Some(self.tls.clone()),
            Arc::clone(&self.control),
        ));
        *self.refusing.lock().expect("refusing") = Some(task);
    }

    /// Stops answering the port, and waits until it is free.
    fn stop_refusing(&self) {
        if let Some(task) = self.refusing.lock().expect("refusing").take() {
            task.abort();
            let _ = self.rt.block_on(task);
        }
    }

    /// Mounts with `config`'s protector and starts PostgreSQL (its crash
    /// recovery runs), unless it runs already.
    fn start_postgres(
        &self,
        config: &ServerConfig,
        access: Option<&Arc<VaultAccess>>,
    ) -> Result<(), String> {
        let mut running = self.running.lock().expect("running");
        if running.is_some() {
            return Ok(());
        }
        let protector = keys::engine_protector(config, access)?;
        self.stop_refusing();
        match super::start(
            &self.dir,
            &self.listen,
            Duration::from_secs(300),
            protector.as_ref(),
            &self.limits,
        ) {
            Ok(r) => {
                self.observed.fs.set(r.fs_stats());
                *running = Some(r);
                *self.protector.lock().expect("protector") = Some(protector);
                Ok(())
            }
            Err(e) => {
                drop(running);
                if self.control.state() == State::Inaccessible {
                    self.start_refusing();
                }
                Err(e.to_string())
            }
        }
    }

    /// Stops PostgreSQL (fast shutdown) and unmounts, or stops refusing.
    fn shutdown(&self) -> Result<(), String> {
        self.stop_refusing();
        let taken = self.running.lock().expect("running").take();
        match taken {
            Some(r) => r.stop(Duration::from_secs(60)).map_err(|e| e.to_string()),
            None => Ok(()),
        }
    }
}

impl Engine for PgEngine {
    /// Immediate shutdown of PostgreSQL (every session ends now), the
    /// unmount (every DEK zeroized with the root key), then the port
    /// answers 57P03.
    fn lock(&self) {
        let taken = self.running.lock().expect("running").take();
        if let Some(r) = taken {
            if let Err(e) = r.stop_immediately() {
                tracing::error!(error = %e, "stopping PostgreSQL for Inaccessible");
            }
        }
        *self.protector.lock().expect("protector") = None;
        // A file the DEK rotation was copying: its keys go too.
        self.rotator.park();
        tracing::info!("PostgreSQL stopped, tree unmounted, keys zeroized");
        self.start_refusing();
    }

    /// PostgreSQL serves until it is stopped.
    fn refuses_by_state(&self) -> bool {
        false
    }

    fn admin_op(self: Arc<Self>, op: &str, req: &Value) -> Option<AdminReply> {
        let ready = self.control.state() == State::Ready;
        match op {
            "backup" | "backup-verify" => {
                if !ready {
                    return Some(Box::pin(async {
                        json!({"error": crate::control::NOT_READY})
                    }));
                }
                let (op, id) = (op.to_string(), req["id"].as_str().map(str::to_string));
                Some(Box::pin(async move {
                    let e = Arc::clone(&self);
                    let r =
                        tokio::task::spawn_blocking(move || e.backup_op(&op, id.as_deref())).await;
                    match r {
                        Ok(Ok(v)) => v,
                        Ok(Err(e)) => json!({"error": e}),
                        Err(e) => json!({"error": e.to_string()}),
                    }
                }))
            }
            _ => {
                let reply = crate::rotation::admin_op(&self.rotator, ready, op, req)?;
                Some(Box::pin(async move { reply }))
            }
        }
    }

    fn unlock(
        &self,
        config: &ServerConfig,
        access: Option<&Arc<VaultAccess>>,
    ) -> Result<(), String> {
        self.start_postgres(config, access)
    }

    fn rewrap(&self) -> &dyn Rewrap {
        self
    }
}

/// The tree's root header and every file header's copy of it; never a unit.
impl Rewrap for PgEngine {
    fn set_protector(&self, protector: Arc<dyn KeyProtector>) -> Result<(), String> {
        *self.protector.lock().expect("protector") = Some(protector);
        Ok(())
    }

    fn rewrap_every(&self, _dir: &std::path::Path, config: &ServerConfig) -> Result<usize, String> {
        let protector = self
            .protector
            .lock()
            .expect("protector")
            .clone()
            .ok_or("the tree is not mounted (the server is Inaccessible)")?;
        let running = self.running.lock().expect("running");
        let tree = running
            .as_ref()
            .and_then(|r| r.tree())
            .ok_or("the tree is not mounted (the server is Inaccessible)")?;
        let files = tree.rewrap(protector.as_ref()).map_err(|e| e.to_string())?;
        tracing::info!(files, "rewrapped the tree's root and file headers");
        let copies = super::backup::rewrap_repository(&self.dir, config, tree)?;
        tracing::info!(
            copies,
            "rewrapped the backups' and the WAL archive's headers"
        );
        Ok(1)
    }
}

impl PgEngine {
    /// A backup, or the verification of backups, through the mounted tree
    /// (the running lock is held only to take a handle on it).
    fn backup_op(&self, op: &str, id: Option<&str>) -> Result<Value, String> {
        let config = self.control.live.lock().expect("live config").clone();
        let tree = self
            .running
            .lock()
            .expect("running")
            .as_ref()
            .and_then(|r| r.tree().cloned())
            .ok_or("the tree is not mounted (the server is not Ready)")?;
        let repo = crate::backup::repository(&self.dir, &config);
        if op == "backup-verify" {
            let r = super::backup::verify_all(&tree, &repo, id)?;
            return Ok(json!({"ok": true, "verified": r}));
        }
        let control = Arc::clone(&self.control);
        let ready = move || control.state() == State::Ready;
        let entry =
            super::backup::take_backup(&self.dir, &config, &tree, &self.listen, &self.rt, &ready)?;
        Ok(json!({"ok": true, "backup": entry}))
    }
}

fn load_tls(dir: &std::path::Path, config: &ServerConfig) -> Result<TlsAcceptor, ServeError> {
    let (mut cfg, _) = resource::tls_server_config(dir, config).map_err(ServeError::Tls)?;
    cfg.alpn_protocols = vec![b"postgresql".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(cfg)))
}

/// The customer key at start: reach the vault and prove the key answers
/// (a probe), or say why not (the server starts Inaccessible).
fn key_at_start(dir: &std::path::Path, config: &ServerConfig) -> (KeyRuntime, Option<Loss>) {
    let mut runtime = KeyRuntime::default();
    let Some(ck) = &config.encryption.customer_key else {
        return (runtime, None);
    };
    let access = match keys::vault_access(dir, config, &ck.login, &ck.key) {
        Ok(a) => a,
        Err(e) => {
            return (
                runtime,
                Some(Loss::refused(
                    Cause::Other,
                    format!("cannot reach the vault: {e}"),
                )),
            )
        }
    };
    runtime.access = Some(Arc::clone(&access));
    runtime.key = Some(ck.key.clone());
    let checked = keys::Probe::make(&access, &ck.key)
        .and_then(|p| keys::check(&access, &ck.key, &p).map(|()| p));
    match checked {
        Ok(p) => {
            runtime.probe = Some(Arc::new(p));
            (runtime, None)
        }
        Err(loss) => (runtime, Some(loss)),
    }
}

/// PostgreSQL takes a port, not port 0: for `HOST:0` the engine picks a
/// free port now, and `state.json` reports it (as the sqlite engine's
/// listener reports the port the kernel gave it).
fn pick_port(listen: String) -> Result<String, ServeError> {
    match listen.rsplit_once(':') {
        Some((host, "0")) => {
            let l = std::net::TcpListener::bind(&listen).map_err(|e| ServeError::Listen {
                addr: listen.clone(),
                source: e,
            })?;
            let port = l
                .local_addr()
                .map(|a| a.port())
                .map_err(|e| ServeError::Listen {
                    addr: listen.clone(),
                    source: e,
                })?;
            Ok(format!("{host}:{port}"))
        }
        _ => Ok(listen),
    }
}

pub async fn serve(
    dir: PathBuf,
    listen: Option<String>,
    metrics_listen: Option<String>,
    limits: Option<Limits>,
    shutdown: impl Future<Output = &'static str>,
) -> Result<(), ServeError> {
    let dir = dir.canonicalize().map_err(|e| ResourceError::Io {
        path: dir.clone(),
        source: e,
    })?;
    let config = resource::load_config(&dir)?;
    if config.engine != EngineKind::Postgres {
        return Err(ServeError::NotPostgres {
            dir,
            engine: config.engine,
        });
    }
    let _lock = resource::lock(&dir)?;
    let lifecycle = Arc::new(Lifecycle::begin(&dir, &config));
    let listen = pick_port(listen.unwrap_or_else(|| config.default_listen.clone()))?;
    let started = async {
        let metrics = match &metrics_listen {
            Some(a) => Some(TcpListener::bind(a).await.map_err(|e| ServeError::Listen {
                addr: a.clone(),
                source: e,
            })?),
            None => None,
        };
        // Before any state change: state.json names this process and its
        // ports from the first state it records (Inaccessible at start).
        lifecycle.set_endpoints(Endpoints {
            pid: Some(std::process::id()),
            listen: Some(listen.clone()),
            metrics: metrics
                .as_ref()
                .and_then(|m| m.local_addr().ok())
                .map(|a| a.to_string()),
        });
        let tls = load_tls(&dir, &config)?;
        let (d, c) = (dir.clone(), config.clone());
        let (runtime, loss) = tokio::task::spawn_blocking(move || key_at_start(&d, &c))
            .await
            .expect("the key check does not panic");
        let control = Control::new(dir.clone(), &config, Arc::clone(&lifecycle), runtime);
        let running = Arc::new(Mutex::new(None));
        let rotator = DekRotator::new(
            super::rotate::ClusterRotation::new(Arc::clone(&running)),
            dir.clone(),
            config.dek_rotation.clone(),
        );
        let engine = Arc::new(PgEngine {
            dir: dir.clone(),
            listen: listen.clone(),
            limits: limits.unwrap_or_else(|| config.limits.clone()),
            running: Arc::clone(&running),
            rotator: Arc::clone(&rotator),
            protector: Mutex::new(None),
            refusing: Mutex::new(None),
            tls,
            control: Arc::clone(&control),
            observed: Arc::new(Observed {
                rotator: rotator.into(),
                ..Default::default()
            }),
            rt: tokio::runtime::Handle::current(),
        });
        match loss {
            Some(loss) => {
                control.mark_inaccessible(loss, "at start: ");
                let e = Arc::clone(&engine);
                tokio::task::spawn_blocking(move || e.start_refusing())
                    .await
                    .expect("no panic");
            }
            None => {
                let (e, c) = (Arc::clone(&engine), Arc::clone(&control));
                tokio::task::spawn_blocking(move || {
                    let (config, access) = (
                        c.live.lock().expect("live config").clone(),
                        c.keys.lock().expect("keys").access.clone(),
                    );
                    e.start_postgres(&config, access.as_ref())?;
                    // A key switch that a crash interrupted: finish it.
                    if !config.encryption.rewrap_from.is_empty() {
                        let mut config = config;
                        keys::rewrap_all(&c.dir, &mut config, e.as_ref(), access.as_ref())
                            .map_err(|e| format!("finishing an interrupted rewrap: {e}"))?;
                        e.set_protector(keys::engine_protector(&config, access.as_ref())?)?;
                        *c.live.lock().expect("live config") = config;
                    }
                    Ok::<(), String>(())
                })
                .await
                .expect("the start task does not panic")
                .map_err(|e| {
                    ServeError::Resource(ResourceError::Invalid(format!(
                        "starting PostgreSQL: {e}"
                    )))
                })?;
            }
        }
        Ok::<_, ServeError>((metrics, control, engine))
    }
    .await;
    let (metrics, control, engine) = match started {
        Ok(s) => s,
        Err(e) => {
            let _ = lifecycle.transition(State::Stopped, &format!("start failed: {e}"));
            lifecycle.drain_alerts(Duration::from_secs(10)).await;
            return Err(e);
        }
    };
    let dyn_engine: Arc<dyn Engine> = Arc::clone(&engine) as _;
    if let Err(e) = crate::control::serve_admin(Arc::clone(&control), Arc::clone(&dyn_engine)) {
        let e2 = Arc::clone(&engine);
        let _ = tokio::task::spawn_blocking(move || e2.shutdown()).await;
        let _ = lifecycle.transition(State::Stopped, &format!("start failed: {e}"));
        return Err(ServeError::Admin(e));
    }
    let metrics_addr = metrics.as_ref().and_then(|m| m.local_addr().ok());
    if let Some(m) = metrics {
        let o: Arc<dyn Observe> = Arc::clone(&engine.observed) as _;
        tokio::spawn(crate::http::serve(m, Arc::clone(&lifecycle), o));
    }
    if control.state() == State::Starting {
        let _ = lifecycle.transition(State::Ready, "PostgreSQL accepts connections");
    }
    tokio::spawn(crate::control::monitor(Arc::clone(&control), dyn_engine));
    engine.rotator.start(Arc::clone(&lifecycle));
    tracing::info!(%listen, metrics = ?metrics_addr, server = %config.name, state = %control.state(), "postgres engine started");
    tokio::pin!(shutdown);
    let reason = loop {
        tokio::select! {
            why = &mut shutdown => break format!("shutdown ({why})"),
            _ = control.stop_requested.notified() => break "delete requested while Inaccessible".to_string(),
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
        // A rewrap or a lock holds it: look again at the next tick.
        let status = match engine.running.try_lock() {
            Ok(mut r) => r.as_mut().and_then(|r| r.exited()),
            Err(_) => None,
        };
        let Some(status) = status else {
            continue;
        };
        // PostgreSQL died (killed, or a PANIC): start it again on the same
        // mount; its crash recovery replays the WAL.
        let _ = resource::log_activity(
            &dir,
            &json!({"time": resource::now_rfc3339(), "event": "postgres_exited", "status": status.to_string()}),
        );
        tracing::warn!(%status, "PostgreSQL exited; starting it again");
        engine.observed.restarts.fetch_add(1, Ordering::Relaxed);
        let e = Arc::clone(&engine);
        let restarted = tokio::task::spawn_blocking(move || {
            match e.running.lock().expect("running").as_mut() {
                Some(r) => r.restart(Duration::from_secs(300)),
                None => Ok(()),
            }
        })
        .await
        .expect("the restart task does not panic");
        if let Err(e) = restarted {
            let reason = format!("PostgreSQL could not be started again: {e}");
            let _ = lifecycle.transition(State::Stopping, &reason);
            let e2 = Arc::clone(&engine);
            let _ = tokio::task::spawn_blocking(move || e2.shutdown()).await;
            let _ = lifecycle.transition(State::Stopped, &reason);
            lifecycle.drain_alerts(Duration::from_secs(10)).await;
            return Err(e.into());
        }
    };
    let _ = lifecycle.transition(State::Stopping, &reason);
    engine.rotator.shutdown();
    let e = Arc::clone(&engine);
    // Key operations finish first (a rewrap holds the mount).
    let _key_op = control.key_op.lock().await;
    let stopped = tokio::task::spawn_blocking(move || e.shutdown())
        .await
        .expect("the stop task does not panic");
    let _ = lifecycle.transition(State::Stopped, &reason);
    lifecycle.drain_alerts(Duration::from_secs(10)).await;
    stopped.map_err(|e| {
        ServeError::Resource(ResourceError::Invalid(format!("stopping PostgreSQL: {e}")))
    })
}
