//! `atrest server start` for the postgres engine: PostgreSQL supervised
//! under the one server lifecycle ([`crate::lifecycle`]): the same states,
//! state.json, activity log and webhooks as the sqlite engine, and the same
//! `/metrics`, `/status` and `/healthz` ([`crate::http`]).

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::http::Observe;
use crate::lifecycle::Lifecycle;
use crate::resource::{self, Endpoints, EngineKind, ResourceError, State};

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
}

/// What `/metrics` shows of the postgres engine: the filesystem's unit
/// traffic and authentication failures, and PostgreSQL's restarts.
struct Observed {
    fs: Arc<atrest_fs::Stats>,
    restarts: AtomicU64,
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
        counter(
            "atrest_fs_reads_total",
            "FUSE read requests served (units opened and authenticated).",
            get(&self.fs.reads),
        );
        counter(
            "atrest_fs_writes_total",
            "FUSE write requests served (units sealed).",
            get(&self.fs.writes),
        );
        counter(
            "atrest_fs_fsyncs_total",
            "fsync requests made durable.",
            get(&self.fs.fsyncs),
        );
        counter(
            "atrest_fs_auth_failures_total",
            "Units or headers that failed authentication (tampering or damage; each is an I/O error to PostgreSQL).",
            get(&self.fs.auth_failures),
        );
        counter(
            "atrest_postgres_restarts_total",
            "Times PostgreSQL died and was started again on the same mount.",
            get(&self.restarts),
        );
        s
    }

    fn status(&self, status: &mut serde_json::Value) {
        status["postgres_restarts"] = self.restarts.load(Ordering::Relaxed).into();
    }
}

/// Runs the server in `dir` until `shutdown` resolves (to the reason, such
/// as "SIGTERM"). The caller has entered a private mount namespace before
/// starting any thread (see [`atrest_fs::private_mount_namespace`]).
pub async fn serve(
    dir: PathBuf,
    listen: Option<String>,
    metrics_listen: Option<String>,
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
    let listen = listen.unwrap_or_else(|| config.default_listen.clone());
    let started = async {
        let metrics = match &metrics_listen {
            Some(a) => Some(TcpListener::bind(a).await.map_err(|e| ServeError::Listen {
                addr: a.clone(),
                source: e,
            })?),
            None => None,
        };
        let (d, l) = (dir.clone(), listen.clone());
        let running =
            tokio::task::spawn_blocking(move || super::start(&d, &l, Duration::from_secs(120)))
                .await
                .expect("the start task does not panic")?;
        Ok::<_, ServeError>((metrics, running))
    }
    .await;
    let (metrics, mut running) = match started {
        Ok(s) => s,
        Err(e) => {
            let _ = lifecycle.transition(State::Stopped, &format!("start failed: {e}"));
            lifecycle.drain_alerts(Duration::from_secs(10)).await;
            return Err(e);
        }
    };
    let metrics_addr = metrics.as_ref().and_then(|m| m.local_addr().ok());
    lifecycle.set_endpoints(Endpoints {
        pid: Some(std::process::id()),
        listen: Some(listen.clone()),
        metrics: metrics_addr.map(|a| a.to_string()),
    });
    let observed = Arc::new(Observed {
        fs: running.fs_stats(),
        restarts: AtomicU64::new(0),
    });
    if let Some(m) = metrics {
        let o: Arc<dyn Observe> = Arc::clone(&observed) as _;
        tokio::spawn(crate::http::serve(m, Arc::clone(&lifecycle), o));
    }
    let _ = lifecycle.transition(State::Ready, "PostgreSQL accepts connections");
    tracing::info!(%listen, metrics = ?metrics_addr, server = %config.name, "postgres engine ready");
    tokio::pin!(shutdown);
    let reason = loop {
        tokio::select! {
            why = &mut shutdown => break format!("shutdown ({why})"),
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
        let Some(status) = running.exited() else {
            continue;
        };
        // PostgreSQL died (killed, or a PANIC): start it again on the same
        // mount; its crash recovery replays the WAL.
        let _ = resource::log_activity(
            &dir,
            &serde_json::json!({"time": resource::now_rfc3339(), "event": "postgres_exited", "status": status.to_string()}),
        );
        tracing::warn!(%status, "PostgreSQL exited; starting it again");
        observed.restarts.fetch_add(1, Ordering::Relaxed);
        let restarted = tokio::task::spawn_blocking(move || {
            let r = running.restart(Duration::from_secs(300));
            (running, r)
        })
        .await
        .expect("the restart task does not panic");
        running = restarted.0;
        if let Err(e) = restarted.1 {
            let reason = format!("PostgreSQL could not be started again: {e}");
            let _ = lifecycle.transition(State::Stopping, &reason);
            let _ =
                tokio::task::spawn_blocking(move || running.stop(Duration::from_secs(60))).await;
            let _ = lifecycle.transition(State::Stopped, &reason);
            lifecycle.drain_alerts(Duration::from_secs(10)).await;
            return Err(e.into());
        }
    };
    let _ = lifecycle.transition(State::Stopping, &reason);
    let stopped = tokio::task::spawn_blocking(move || running.stop(Duration::from_secs(60)))
        .await
        .expect("the stop task does not panic");
    let _ = lifecycle.transition(State::Stopped, &reason);
    lifecycle.drain_alerts(Duration::from_secs(10)).await;
    stopped.map_err(|e| ServeError::Resource(e.into()))
}
