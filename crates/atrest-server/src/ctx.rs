//! What every connection of a running sqlite-engine server shares: its
//! configuration, databases, TLS, roles, sessions and the control plane.
//! Connections, the replication API and the listener all see this; it sees
//! none of them.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use tokio_rustls::TlsAcceptor;

use crate::config::{Limits, ServerConfig};
use crate::control::Control;
use crate::databases::Databases;
use crate::lifecycle::Lifecycle;
use crate::metrics::Metrics;
use crate::resource::{Role, Roles, State};
use crate::session::SessionShared;

/// What every connection of a running server shares.
pub struct ServerCtx {
    pub dir: PathBuf,
    pub config: ServerConfig,
    pub limits: Limits,
    pub databases: Arc<Databases>,
    pub metrics: Arc<Metrics>,
    pub tls: TlsAcceptor,
    /// Direct TLS that does not ask for `postgresql`: the replication API.
    pub replication_tls: TlsAcceptor,
    /// `tls-server-end-point` of our certificate (None: -PLUS not offered).
    pub channel_binding: Option<Vec<u8>>,
    pub mock_key: String,
    pub(crate) roles: RwLock<Roles>,
    pub(crate) sessions: Mutex<HashMap<i32, Arc<SessionShared>>>,
    pub(crate) next_pid: AtomicI32,
    /// The one lifecycle (state, state.json, activity log, webhooks).
    pub lifecycle: Arc<Lifecycle>,
    /// The control plane every engine shares (key, Inaccessible, admin).
    pub control: Arc<Control>,
    pub(crate) shutdown_tx: tokio::sync::watch::Sender<bool>,
    pub(crate) grace_tx: tokio::sync::watch::Sender<Option<Instant>>,
    /// Bumped to end every session at once (the key became inaccessible).
    pub(crate) kick_tx: tokio::sync::watch::Sender<u64>,
    /// Online DEK rotation (see [`crate::rotation`]).
    pub rotator: Arc<crate::rotation::DekRotator>,
}

impl ServerCtx {
    /// The server's state: sessions are admitted only when Ready.
    pub fn state(&self) -> State {
        self.lifecycle.state()
    }

    /// The error every connection gets while Inaccessible.
    pub fn inaccessible_error(&self) -> crate::error::PgError {
        self.control.inaccessible_error()
    }

    /// Whether this server follows another (a read replica not promoted).
    pub fn is_replica(&self) -> bool {
        self.databases.read_only().is_some()
    }

    pub fn kick_watch(&self) -> tokio::sync::watch::Receiver<u64> {
        self.kick_tx.subscribe()
    }

    /// A role, from roles.json as it is now (`atrest server role` edits
    /// it while the server runs; a file that does not load keeps the last
    /// good roles).
    pub fn role(&self, user: &str) -> Option<Role> {
        match Roles::load(&self.dir) {
            Ok(fresh) => {
                let r = fresh.roles.get(user).cloned();
                *self.roles.write().expect("roles") = fresh;
                r
            }
            Err(e) => {
                tracing::warn!(error = %e, "roles.json does not load; using the roles loaded before");
                self.roles.read().expect("roles").roles.get(user).cloned()
            }
        }
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
