//! The running server's control plane: the key monitor and the admin
//! socket (`DIR/admin.sock`, mode 0600: only the server's
//! owner can use it) through which `atrest server set-key`, `rotate-key`
//! and `revalidate` reach a running server.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::keys::{self, Loss, Target};
use crate::listener::{ServerCtx, StartError};
use crate::resource::{self, State};

pub const ADMIN_SOCKET: &str = "admin.sock";

/// Re-checks the customer key on an interval; moves to Inaccessible on a
/// refusal at once, on an outage after the grace period; while
/// Inaccessible, retries by itself after an outage (or always, with
/// auto_revalidate).
pub async fn monitor(ctx: Arc<ServerCtx>) {
    // Settings as at start; `configure` changes apply at the next start.
    let cfg = ctx.config.monitor.clone();
    let interval = Duration::from_millis(cfg.interval_ms.clamp(100, 600_000));
    let grace = Duration::from_millis(cfg.outage_grace_ms);
    let mut outage_since: Option<Instant> = None;
    let mut last_loss_was_outage = false;
    let mut shutdown = ctx.shutdown_watch();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shutdown.changed() => return,
        }
        match ctx.state() {
            State::Starting => {}
            State::Stopping | State::Stopped | State::Dropping => return,
            State::Inaccessible => {
                if (cfg.auto_revalidate || last_loss_was_outage)
                    && ctx
                        .revalidate("revalidated automatically: the key is accessible again")
                        .await
                        .is_ok()
                {
                    outage_since = None;
                    last_loss_was_outage = false;
                }
            }
            State::Ready => {
                let _guard = ctx.key_op.lock().await;
                let (access, key, probe) = {
                    let k = ctx.keys.lock().expect("keys");
                    (k.access.clone(), k.key.clone(), k.probe.clone())
                };
                let (Some(access), Some(key), Some(probe)) = (access, key, probe) else {
                    continue;
                };
                let k2 = key.clone();
                let result = tokio::task::spawn_blocking(move || keys::check(&access, &k2, &probe))
                    .await
                    .unwrap_or_else(|e| Err(Loss::Outage(e.to_string())));
                drop(_guard);
                match result {
                    Ok(()) => outage_since = None,
                    Err(loss) => {
                        let outage = matches!(loss, Loss::Outage(_));
                        let _ = resource::log_activity(
                            &ctx.dir,
                            &json!({
                                "time": resource::now_rfc3339(), "event": "key_check_failed",
                                "key": key.kid(), "outage": outage, "reason": loss.reason(),
                            }),
                        );
                        match loss {
                            Loss::Refused(r) => {
                                last_loss_was_outage = false;
                                ctx.go_inaccessible(r).await;
                            }
                            Loss::Outage(r) => {
                                let since = *outage_since.get_or_insert_with(Instant::now);
                                if since.elapsed() >= grace {
                                    last_loss_was_outage = true;
                                    ctx.go_inaccessible(format!(
                                        "the vault has been unreachable for {} s: {r}",
                                        since.elapsed().as_secs()
                                    ))
                                    .await;
                                } else {
                                    tracing::warn!(reason = %r, grace_left_ms = (grace - since.elapsed()).as_millis() as u64,
                                        "vault unreachable; still serving within the outage grace period");
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Starts the admin socket.
pub fn serve_admin(ctx: Arc<ServerCtx>) -> Result<(), StartError> {
    use std::os::unix::fs::PermissionsExt;
    let path = ctx.dir.join(ADMIN_SOCKET);
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).map_err(StartError::Admin)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .map_err(StartError::Admin)?;
    tokio::spawn(async move {
        loop {
            let Ok((sock, _)) = listener.accept().await else {
                continue;
            };
            let c = Arc::clone(&ctx);
            tokio::spawn(async move {
                let (r, mut w) = sock.into_split();
                let mut line = String::new();
                if BufReader::new(r).read_line(&mut line).await.is_err() {
                    return;
                }
                let reply = match serde_json::from_str::<Value>(&line) {
                    Ok(req) => admin_op(&c, req).await,
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

/// Switches a running server's DEKs to `target` (a customer key version,
/// or the service key) and makes the new key the one its monitor checks.
pub async fn set_key(ctx: &Arc<ServerCtx>, target: Target) -> Result<keys::SwitchReport, String> {
    let _guard = ctx.key_op.lock().await;
    let c = Arc::clone(ctx);
    tokio::task::spawn_blocking(move || {
        let mut config = c.live.lock().expect("live config").clone();
        let out = keys::switch(&c.dir, &mut config, &c.databases, target);
        if let Ok((_, access)) = &out {
            let mut k = c.keys.lock().expect("keys");
            k.access = access.clone();
            k.key = config
                .encryption
                .customer_key
                .as_ref()
                .map(|ck| ck.key.clone());
            k.probe = match (&k.access, &k.key) {
                (Some(a), Some(key)) => keys::Probe::make(a, key).ok().map(Arc::new),
                _ => None,
            };
        }
        *c.live.lock().expect("live config") = config;
        out.map(|(report, _)| report)
    })
    .await
    .map_err(|e| e.to_string())?
}

async fn admin_op(ctx: &Arc<ServerCtx>, req: Value) -> Value {
    match req["op"].as_str().unwrap_or("") {
        "revalidate" => match ctx.state() {
            State::Inaccessible | State::Ready => {
                match ctx.revalidate("revalidated by the administrator").await {
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
            if ctx.state() != State::Ready {
                return json!({"error": "the server is not Ready; revalidate it first (an Inaccessible server allows only revalidation or delete)"});
            }
            let target = match parse_target(&req) {
                Ok(t) => t,
                Err(e) => return json!({"error": e}),
            };
            match set_key(ctx, target).await {
                Ok(report) => json!({"ok": true, "report": report}),
                Err(e) => json!({"error": e}),
            }
        }
        "backup" | "backup-verify" => {
            if ctx.state() != State::Ready {
                return json!({"error": "the server is not Ready; an Inaccessible server cannot read its data (revalidate it first)"});
            }
            let c = Arc::clone(ctx);
            let op = req["op"].as_str().unwrap_or("").to_string();
            let id = req["id"].as_str().map(str::to_string);
            let r = tokio::task::spawn_blocking(move || {
                let config = c.live.lock().expect("live config").clone();
                if op == "backup" {
                    crate::backup::take_backup(&c.dir, &config, &c.databases)
                        .map(|e| json!({"ok": true, "backup": e}))
                } else {
                    let repo = crate::backup::repository(&c.dir, &config);
                    crate::backup::verify_all(c.databases.engine(), &repo, id.as_deref())
                        .map(|r| json!({"ok": true, "verified": r}))
                }
            })
            .await;
            match r {
                Ok(Ok(v)) => v,
                Ok(Err(e)) => json!({"error": e}),
                Err(e) => json!({"error": e.to_string()}),
            }
        }
        "rotate-dek" => {
            if ctx.state() != State::Ready {
                return json!({"error": "the server is not Ready; an Inaccessible server cannot read its data (revalidate it first)"});
            }
            let rate = req["pages_per_second"].as_u64();
            if rate == Some(0) {
                return json!({"error": "pages_per_second must be at least 1"});
            }
            match ctx
                .rotator
                .request(req["database"].as_str(), "requested", rate)
            {
                Ok(queued) => json!({"ok": true, "queued": queued}),
                Err(e) => json!({"error": e}),
            }
        }
        "rotation-status" => json!({"ok": true, "databases": ctx.rotator.progress()}),
        "promote" => match crate::replication::promote_running(ctx) {
            Ok(()) => json!({"ok": true}),
            Err(e) => json!({"error": e}),
        },
        "status" => {
            json!({"ok": true, "phase": format!("{:?}", ctx.state()), "sessions": ctx.session_count()})
        }
        // Delete is the one operation an Inaccessible server allows: the
        // process stops so the directory can be removed.
        "stop-for-delete" => {
            if ctx.state() != State::Inaccessible {
                return json!({"error": "the server is running and not Inaccessible; stop it (SIGTERM) before deleting it"});
            }
            ctx.stop_requested.notify_one();
            json!({"ok": true})
        }
        other => json!({"error": format!("unknown operation {other:?}")}),
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
