//! The running server's control plane, one for every engine: the key
//! monitor, key switches, Inaccessible and revalidation, and the admin
//! socket (`DIR/admin.sock`, mode 0600: only the server's owner can use
//! it) through which `atrest server set-key`, `rotate-key` and
//! `revalidate` reach a running server. What each step means for an engine
//! is its [`Engine`] implementation.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::cmk::{KeyUrl, VaultAccess};
use crate::config::{MonitorConfig, ServerConfig};
use crate::error::PgError;
use crate::keys::{self, Loss, Probe, Rewrap, Target};
use crate::lifecycle::Lifecycle;
use crate::monitor::{KeyMonitor, Verdict};
use crate::resource::{self, State};

pub const ADMIN_SOCKET: &str = "admin.sock";

/// An admin operation's answer, computed by an engine.
pub type AdminReply = Pin<Box<dyn Future<Output = Value> + Send>>;

/// An engine beneath the one control plane: what locking, unlocking and
/// rewrapping mean for it. Every method may block; the control plane calls
/// them off the async threads.
pub trait Engine: Send + Sync + 'static {
    /// Ends every session and zeroizes every DEK the engine holds (the
    /// server has just become Inaccessible).
    fn lock(&self);
    /// Whether new connections are refused as soon as the state says
    /// Inaccessible (the engine's own listener reads it; the lock then
    /// ends the sessions). `false`: only the lock refuses them (PostgreSQL
    /// serves until it is stopped), so the lock runs first and the state
    /// says Inaccessible only once nothing more is served.
    fn refuses_by_state(&self) -> bool {
        true
    }
    /// Unwraps the DEKs again (with `config`'s protector, reaching the
    /// vault through `access`) and serves again. Called on revalidation,
    /// also of a server that is Ready (then it only proves the keys open).
    fn unlock(
        &self,
        config: &ServerConfig,
        access: Option<&Arc<VaultAccess>>,
    ) -> Result<(), String>;
    /// The DEK holder a key switch rewraps.
    fn rewrap(&self) -> &dyn Rewrap;
    /// Open client sessions.
    fn session_count(&self) -> usize {
        0
    }
    /// Admin operations only this engine has; `None`: not one of them.
    fn admin_op(self: Arc<Self>, _op: &str, _req: &Value) -> Option<AdminReply> {
        None
    }
}

/// The customer key a running server uses.
#[derive(Default)]
pub struct KeyRuntime {
    pub access: Option<Arc<VaultAccess>>,
    pub key: Option<KeyUrl>,
    pub probe: Option<Arc<Probe>>,
}

/// The state every engine shares: the lifecycle, the live configuration,
/// the customer key and why the server is Inaccessible.
pub struct Control {
    pub dir: PathBuf,
    pub name: String,
    monitor: MonitorConfig,
    pub lifecycle: Arc<Lifecycle>,
    /// The live configuration (key operations change it).
    pub live: Mutex<ServerConfig>,
    /// The customer key in use and how to reach it.
    pub keys: Mutex<KeyRuntime>,
    /// Serializes key operations (switch, revalidate, monitor).
    pub key_op: tokio::sync::Mutex<()>,
    /// Why the server is Inaccessible.
    inaccessible: Mutex<Option<Loss>>,
    /// Asked to stop through the admin socket (delete of an Inaccessible server).
    pub stop_requested: tokio::sync::Notify,
}

impl Control {
    pub fn new(
        dir: PathBuf,
        config: &ServerConfig,
        lifecycle: Arc<Lifecycle>,
        keys: KeyRuntime,
    ) -> Arc<Control> {
        Arc::new(Control {
            dir,
            name: config.name.clone(),
            monitor: config.monitor.clone(),
            lifecycle,
            live: Mutex::new(config.clone()),
            keys: Mutex::new(keys),
            key_op: tokio::sync::Mutex::new(()),
            inaccessible: Mutex::new(None),
            stop_requested: tokio::sync::Notify::new(),
        })
    }

    pub fn state(&self) -> State {
        self.lifecycle.state()
    }

    /// Why the server is Inaccessible (the administrator's words).
    pub fn inaccessible_reason(&self) -> Option<String> {
        self.inaccessible
            .lock()
            .expect("inaccessible")
            .as_ref()
            .map(|l| l.reason.clone())
    }

    /// The error every connection gets while Inaccessible. It is sent
    /// before authentication, so it gives the cause but no key URL,
    /// identity or vault address (those are in `atrest server status`).
    pub fn inaccessible_error(&self) -> PgError {
        let cause = self
            .inaccessible
            .lock()
            .expect("inaccessible")
            .as_ref()
            .map(|l| l.cause.public())
            .unwrap_or(crate::cmk::Cause::Other.public());
        PgError::fatal(
            "57P03",
            format!(
                "server {} is Inaccessible: its customer-managed key is not accessible ({cause})",
                self.name
            ),
        )
        .hint("Restore the server identity's access to its key in the vault (get, wrapKey, unwrapKey; key enabled, not expired, not deleted; firewall), then run `atrest server revalidate`; `atrest server status` says which key and why.")
    }

    /// Records the loss and moves to Inaccessible, without touching the
    /// engine (a server that finds its key gone at start holds no DEK).
    pub fn mark_inaccessible(&self, loss: Loss, context: &str) {
        tracing::error!(reason = %loss.reason, "customer-managed key inaccessible");
        let reason = format!("{context}{}", loss.reason);
        *self.inaccessible.lock().expect("inaccessible") = Some(loss);
        // Refused only while Stopping: the keys are zeroized all the same.
        let _ = self.lifecycle.transition(State::Inaccessible, &reason);
    }

    /// Moves to Inaccessible: new connections are refused, then the
    /// engine ends every session and zeroizes its DEKs (in the other
    /// order for an engine whose lock is what refuses them).
    pub async fn go_inaccessible(&self, engine: &Arc<dyn Engine>, loss: Loss) {
        if self.state() == State::Inaccessible {
            return;
        }
        let e = Arc::clone(engine);
        if engine.refuses_by_state() {
            self.mark_inaccessible(loss, "");
            let _ = tokio::task::spawn_blocking(move || e.lock()).await;
        } else {
            // The refusal the engine answers with names the cause.
            *self.inaccessible.lock().expect("inaccessible") = Some(loss.clone());
            let _ = tokio::task::spawn_blocking(move || e.lock()).await;
            self.mark_inaccessible(loss, "");
        }
    }

    /// Inaccessible to Ready: the key must answer (a fresh probe), and the
    /// engine must unwrap its DEKs again.
    pub async fn revalidate(
        self: &Arc<Self>,
        engine: &Arc<dyn Engine>,
        reason: &str,
    ) -> Result<(), String> {
        let _guard = self.key_op.lock().await;
        let (c, e) = (Arc::clone(self), Arc::clone(engine));
        let r = tokio::task::spawn_blocking(move || c.reopen_keys(e.as_ref()))
            .await
            .map_err(|e| e.to_string())?;
        match r {
            Ok(()) => {
                if self.state() == State::Inaccessible {
                    *self.inaccessible.lock().expect("inaccessible") = None;
                    let _ = self.lifecycle.transition(State::Ready, reason);
                }
                Ok(())
            }
            Err(e) => {
                let _ = resource::log_activity(
                    &self.dir,
                    &json!({"time": resource::now_rfc3339(), "event": "revalidation_failed", "reason": e}),
                );
                Err(e)
            }
        }
    }

    fn reopen_keys(&self, engine: &dyn Engine) -> Result<(), String> {
        let (access, key) = {
            let k = self.keys.lock().expect("keys");
            (k.access.clone(), k.key.clone())
        };
        if let (Some(access), Some(key)) = (&access, key) {
            let probe = Probe::make(access, &key).map_err(|l| l.reason)?;
            keys::check(access, &key, &probe).map_err(|l| l.reason)?;
            self.keys.lock().expect("keys").probe = Some(Arc::new(probe));
        }
        let config = self.live.lock().expect("live config").clone();
        engine.unlock(&config, access.as_ref())
    }

    /// Switches the engine's DEKs to `target` (a customer key version, or
    /// the service key) and makes the new key the one the monitor checks.
    pub async fn set_key(
        self: &Arc<Self>,
        engine: &Arc<dyn Engine>,
        target: Target,
    ) -> Result<keys::SwitchReport, String> {
        let _guard = self.key_op.lock().await;
        let (c, e) = (Arc::clone(self), Arc::clone(engine));
        tokio::task::spawn_blocking(move || {
            let mut config = c.live.lock().expect("live config").clone();
            let out = keys::switch(&c.dir, &mut config, e.rewrap(), target);
            if let Ok((_, access)) = &out {
                let mut k = c.keys.lock().expect("keys");
                k.access = access.clone();
                k.key = config
                    .encryption
                    .customer_key
                    .as_ref()
                    .map(|ck| ck.key.clone());
                k.probe = match (&k.access, &k.key) {
                    (Some(a), Some(key)) => Probe::make(a, key).ok().map(Arc::new),
                    _ => None,
                };
            }
            *c.live.lock().expect("live config") = config;
            out.map(|(report, _)| report)
        })
        .await
        .map_err(|e| e.to_string())?
    }
}

/// Re-checks the customer key on an interval and acts on the
/// [`KeyMonitor`]'s verdicts. Settings are as at start; `configure`
/// changes apply at the next start.
pub async fn monitor(control: Arc<Control>, engine: Arc<dyn Engine>) {
    let cfg = control.monitor.clone();
    let interval = Duration::from_millis(cfg.interval_ms.clamp(100, 600_000));
    let mut policy = KeyMonitor::new(
        Duration::from_millis(cfg.outage_grace_ms),
        cfg.auto_revalidate,
    );
    loop {
        tokio::time::sleep(interval).await;
        match control.state() {
            State::Starting => {}
            State::Stopping | State::Stopped | State::Dropping => return,
            State::Inaccessible => {
                if policy.retry_when_inaccessible()
                    && control
                        .revalidate(
                            &engine,
                            "revalidated automatically: the key is accessible again",
                        )
                        .await
                        .is_ok()
                {
                    policy.on_ready();
                }
            }
            State::Ready => {
                let guard = control.key_op.lock().await;
                let (access, key, probe) = {
                    let k = control.keys.lock().expect("keys");
                    (k.access.clone(), k.key.clone(), k.probe.clone())
                };
                let (Some(access), Some(key), Some(probe)) = (access, key, probe) else {
                    continue;
                };
                let k2 = key.clone();
                let result = tokio::task::spawn_blocking(move || keys::check(&access, &k2, &probe))
                    .await
                    .unwrap_or_else(|e| Err(Loss::outage(e.to_string())));
                drop(guard);
                if let Err(loss) = &result {
                    let _ = resource::log_activity(
                        &control.dir,
                        &json!({
                            "time": resource::now_rfc3339(), "event": "key_check_failed",
                            "key": key.kid(), "outage": loss.outage, "reason": loss.reason,
                        }),
                    );
                }
                match policy.on_check(Instant::now(), result) {
                    Verdict::Serve => {}
                    Verdict::Grace { left } => {
                        tracing::warn!(
                            grace_left_ms = left.as_millis() as u64,
                            "vault unreachable; still serving within the outage grace period"
                        );
                    }
                    Verdict::Inaccessible(loss) => control.go_inaccessible(&engine, loss).await,
                }
            }
        }
    }
}

/// Starts the admin socket (`DIR/admin.sock`, mode 0600).
pub fn serve_admin(control: Arc<Control>, engine: Arc<dyn Engine>) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let path = control.dir.join(ADMIN_SOCKET);
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    tokio::spawn(async move {
        loop {
            let Ok((sock, _)) = listener.accept().await else {
                continue;
            };
            let (c, e) = (Arc::clone(&control), Arc::clone(&engine));
            tokio::spawn(async move {
                let (r, mut w) = sock.into_split();
                let mut line = String::new();
                if BufReader::new(r).read_line(&mut line).await.is_err() {
                    return;
                }
                let reply = match serde_json::from_str::<Value>(&line) {
                    Ok(req) => admin_op(&c, &e, req).await,
                    Err(e) => json!({"error": format!("bad request: {e}")}),
                };
                let _ = w.write_all(format!("{reply}\n").as_bytes()).await;
            });
        }
    });
    Ok(())
}

/// The target a request names: `{"service": true}` or
/// `{"key": URL, "tenant": T, "ca": PATH}`.
pub fn parse_target(req: &Value) -> Result<Target, String> {
    if req["service"].as_bool() == Some(true) {
        return Ok(Target::Service);
    }
    let key = crate::cmk::KeyUrl::parse(req["key"].as_str().ok_or("no key given")?)?;
    Ok(Target::Customer {
        key,
        login: crate::cmk::VaultLogin {
            tenant: req["tenant"].as_str().ok_or("no tenant given")?.to_string(),
            ca: req["ca"].as_str().ok_or("no vault CA given")?.into(),
        },
    })
}

/// The answer an operation gets when the server is not Ready.
pub const NOT_READY: &str =
    "the server is not Ready; an Inaccessible server cannot read its data (revalidate it first)";

async fn admin_op(control: &Arc<Control>, engine: &Arc<dyn Engine>, req: Value) -> Value {
    let op = req["op"].as_str().unwrap_or("").to_string();
    match op.as_str() {
        "revalidate" => match control.state() {
            State::Inaccessible | State::Ready => {
                match control
                    .revalidate(engine, "revalidated by the administrator")
                    .await
                {
                    Ok(()) => json!({"ok": true, "state": "Ready"}),
                    Err(e) => {
                        json!({"error": format!("revalidation failed: {e}"), "state": "Inaccessible"})
                    }
                }
            }
            State::Starting => json!({"error": "the server is starting"}),
            _ => json!({"error": "the server is shutting down"}),
        },
        "set-key" => {
            if control.state() != State::Ready {
                return json!({"error": "the server is not Ready; revalidate it first (an Inaccessible server allows only revalidation or delete)"});
            }
            let target = match parse_target(&req) {
                Ok(t) => t,
                Err(e) => return json!({"error": e}),
            };
            match control.set_key(engine, target).await {
                Ok(report) => json!({"ok": true, "report": report}),
                Err(e) => json!({"error": e}),
            }
        }
        "status" => {
            json!({"ok": true, "phase": format!("{:?}", control.state()), "sessions": engine.session_count()})
        }
        // Delete is the one operation an Inaccessible server allows: the
        // process stops so the directory can be removed.
        "stop-for-delete" => {
            if control.state() != State::Inaccessible {
                return json!({"error": "the server is running and not Inaccessible; stop it (SIGTERM) before deleting it"});
            }
            control.stop_requested.notify_one();
            json!({"ok": true})
        }
        other => match Arc::clone(engine).admin_op(other, &req) {
            Some(reply) => reply.await,
            None => json!({"error": format!("unknown operation {other:?}")}),
        },
    }
}

/// Sends one request to a running server's admin socket; `None` if no
/// server is listening there.
pub fn admin_request(dir: &std::path::Path, req: &Value) -> Option<Result<Value, String>> {
    let path = dir.join(ADMIN_SOCKET);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .ok()?;
    rt.block_on(async {
        let mut sock = UnixStream::connect(&path).await.ok()?;
        let r = async {
            sock.write_all(format!("{req}\n").as_bytes())
                .await
                .map_err(|e| e.to_string())?;
            let mut line = String::new();
            BufReader::new(&mut sock)
                .read_line(&mut line)
                .await
                .map_err(|e| e.to_string())?;
            let v: Value = serde_json::from_str(&line).map_err(|e| format!("bad answer: {e}"))?;
            match v["error"].as_str() {
                Some(e) => Err(e.to_string()),
                None => Ok(v),
            }
        }
        .await;
        Some(r)
    })
}
