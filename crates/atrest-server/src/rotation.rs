//! Online DEK rotation, for every engine.
//!
//! `atrest server rotate-dek` (or a DEK nearing its usage limit, or a
//! rotation found unfinished at start) queues a target here: a database
//! of the sqlite engine, or the postgres engine's cluster. One background
//! thread works the queue: it begins the rotation in the engine (new DEKs
//! in both layers seal everything from then on), re-seals units in
//! batches at a bounded rate while sessions read and write, and finishes
//! it; the old DEKs then leave every header. The engine keeps the
//! progress durable, so a crash or restart resumes where it stood.
//!
//! The queue, the throttle, progress in `status` and `/metrics`, resume,
//! and the usage-limit check are here; what one engine does to rotate is
//! its [`RotationTarget`]: [`DatabaseRotation`] for the sqlite engine,
//! `postgres::rotate::ClusterRotation` for the postgres engine.
//!
//! What it is not: key rotation of the KEK (that is a rewrap, see
//! [`crate::keys`]), and not a way to read pages (it only re-seals them).

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use atrest_storage::Connection;
pub use atrest_storage::RotationStatus;
use serde::Serialize;
use serde_json::{json, Value};

use crate::config::DekRotationConfig;
use crate::databases::Databases;
use crate::lifecycle::Lifecycle;
use crate::resource::State;

/// What one engine rotates, and how. Every method may block.
pub trait RotationTarget: Send + Sync + 'static {
    /// The targets `rotate-dek` queues for `name` (`None`: all of them).
    fn resolve(&self, name: Option<&str>) -> Result<Vec<String>, String>;
    /// Whether `name` still exists (a database may be dropped meanwhile).
    fn exists(&self, name: &str) -> bool;
    /// Targets whose rotation was under way at the last stop.
    fn unfinished(&self) -> Vec<String>;
    /// Targets with a DEK that has made at least `limit` seals.
    fn worn(&self, limit: u64) -> Vec<(String, u64)>;
    /// Begins the rotation of `name`, or resumes the one under way.
    fn begin(&self, name: &str) -> Result<RotationStatus, String>;
    /// Re-seals about `units` more units. `None`: finished elsewhere.
    fn step(&self, name: &str, units: u64) -> Result<Option<RotationStatus>, String>;
    /// Finishes the rotation: the old DEKs leave every header. `false`:
    /// interrupted (`ready` turned false), to be resumed.
    fn finish(&self, name: &str, ready: &dyn Fn() -> bool) -> Result<bool, String>;
    /// Drops every key the rotation holds (the server left Ready); the
    /// next step opens what it needs again. Waits for a step under way.
    fn park(&self);
}

/// Pages re-sealed per batch: one fsync and one header write each.
const BATCH_PAGES: u64 = 64;
/// The write gate's holder id while a rotation finishes.
const ROTATOR_PID: i32 = -3;
const PROGRESS_FILE: &str = "dek-rotation.json";

/// Where one database's rotation stands (status, metrics, progress file).
#[derive(Debug, Clone, Serialize, Default)]
pub struct Progress {
    pub database: String,
    /// queued, rotating, finishing, done, failed, or waiting (the server
    /// is not Ready).
    pub state: String,
    /// Why it runs: requested, automatic (usage limit), or resumed.
    pub reason: String,
    pub pages_done: u64,
    pub pages_total: u64,
    pub percent: f64,
    pub pages_per_second: f64,
    pub bytes_per_second: f64,
    pub eta_seconds: Option<f64>,
    pub started_unix: u64,
    pub finished_unix: Option<u64>,
    pub error: Option<String>,
}

struct Job {
    database: String,
    reason: String,
    pages_per_second: u64,
}

/// The rotation worker and its queue.
pub struct DekRotator {
    target: Arc<dyn RotationTarget>,
    dir: PathBuf,
    config: DekRotationConfig,
    /// The server's lifecycle: the rotation works only while Ready.
    lifecycle: OnceLock<Arc<Lifecycle>>,
    queue: Mutex<VecDeque<Job>>,
    wake: Condvar,
    progress: Mutex<BTreeMap<String, Progress>>,
    completed: std::sync::atomic::AtomicU64,
    stop: AtomicBool,
}

enum Outcome {
    Done,
    /// The server left Ready or is stopping: resume later.
    Interrupted,
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl DekRotator {
    pub fn new(
        target: Arc<dyn RotationTarget>,
        dir: PathBuf,
        config: DekRotationConfig,
    ) -> Arc<Self> {
        Arc::new(DekRotator {
            target,
            dir,
            config,
            lifecycle: OnceLock::new(),
            queue: Mutex::new(VecDeque::new()),
            wake: Condvar::new(),
            progress: Mutex::new(BTreeMap::new()),
            completed: Default::default(),
            stop: AtomicBool::new(false),
        })
    }

    /// Starts the worker thread for the server `ctx`.
    pub fn start(self: &Arc<Self>, lifecycle: Arc<Lifecycle>) {
        let _ = self.lifecycle.set(lifecycle);
        let me = Arc::clone(self);
        std::thread::Builder::new()
            .name("dek-rotation".into())
            .spawn(move || me.run())
            .expect("spawn the DEK rotation thread");
    }

    fn ready(&self) -> bool {
        !self.stop.load(Ordering::Relaxed)
            && self
                .lifecycle
                .get()
                .is_some_and(|l| l.state() == State::Ready)
    }

    /// Queues a rotation of `database` (every database when `None`).
    /// Returns the names queued; a database already queued stays once,
    /// with its throttle changed to `pages_per_second` if one is given
    /// (a running rotation picks it up at its next batch).
    pub fn request(
        &self,
        database: Option<&str>,
        reason: &str,
        pages_per_second: Option<u64>,
    ) -> Result<Vec<String>, String> {
        let names = self.target.resolve(database)?;
        let rate = pages_per_second
            .unwrap_or(self.config.pages_per_second)
            .max(1);
        let mut q = self.queue.lock().expect("rotation queue");
        let mut progress = self.progress.lock().expect("rotation progress");
        for name in &names {
            if let Some(job) = q.iter_mut().find(|j| &j.database == name) {
                if let Some(r) = pages_per_second {
                    job.pages_per_second = r.max(1);
                }
                continue;
            }
            q.push_back(Job {
                database: name.clone(),
                reason: reason.to_string(),
                pages_per_second: rate,
            });
            progress.insert(
                name.clone(),
                Progress {
                    database: name.clone(),
                    state: "queued".into(),
                    reason: reason.to_string(),
                    ..Default::default()
                },
            );
        }
        drop(progress);
        drop(q);
        self.wake.notify_all();
        self.save_progress();
        Ok(names)
    }

    /// Every database's rotation as last seen.
    pub fn progress(&self) -> Vec<Progress> {
        self.progress
            .lock()
            .expect("rotation progress")
            .values()
            .cloned()
            .collect()
    }

    /// Drops the rotation's connection, zeroizing the keys it holds; the
    /// worker reopens it once the server is Ready again. Waits for a batch
    /// in progress to end.
    pub fn park(&self) {
        self.target.park();
    }

    /// Stops the worker (server shutdown); the rotation resumes at the
    /// next start.
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::Relaxed);
        self.wake.notify_all();
        self.park();
    }

    /// Lines for /metrics.
    pub fn render_metrics(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let all = self.progress();
        type Gauge = (&'static str, &'static str, fn(&Progress) -> f64);
        let gauges: [Gauge; 4] = [
            (
                "atrest_dek_rotation_pages_done",
                "Pages re-sealed under the new DEKs by the current or last rotation.",
                |p| p.pages_done as f64,
            ),
            (
                "atrest_dek_rotation_pages_total",
                "Pages of the database being rotated.",
                |p| p.pages_total as f64,
            ),
            (
                "atrest_dek_rotation_pages_per_second",
                "Re-sealing rate of the running rotation.",
                |p| p.pages_per_second,
            ),
            (
                "atrest_dek_rotation_eta_seconds",
                "Estimated seconds left in the running rotation.",
                |p| p.eta_seconds.unwrap_or(0.0),
            ),
        ];
        for (name, help, f) in gauges {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} gauge");
            for p in &all {
                let _ = writeln!(
                    s,
                    "{name}{{database=\"{}\",state=\"{}\"}} {}",
                    p.database,
                    p.state,
                    f(p)
                );
            }
        }
        let _ = writeln!(
            s,
            "# HELP atrest_dek_rotations_completed_total DEK rotations finished since start.\n# TYPE atrest_dek_rotations_completed_total counter\natrest_dek_rotations_completed_total {}",
            self.completed.load(Ordering::Relaxed)
        );
        s
    }

    fn update(&self, database: &str, f: impl FnOnce(&mut Progress)) {
        let mut all = self.progress.lock().expect("rotation progress");
        let p = all.entry(database.to_string()).or_insert_with(|| Progress {
            database: database.to_string(),
            ..Default::default()
        });
        f(p);
    }

    /// Writes `dek-rotation.json` for `atrest server status` (another
    /// process).
    fn save_progress(&self) {
        let all = self.progress();
        let v = serde_json::json!({ "updated_unix": now_unix(), "databases": all });
        if let Err(e) = crate::resource::write_atomic(
            &self.dir.join(PROGRESS_FILE),
            v.to_string().as_bytes(),
            0o644,
        ) {
            tracing::warn!(error = %e, "cannot record the DEK rotation progress");
        }
    }

    fn run(self: Arc<Self>) {
        let mut resumed = false;
        let mut last_auto_check = Instant::now();
        while !self.stop.load(Ordering::Relaxed) {
            if !self.ready() {
                self.park();
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
            if !resumed {
                self.queue_unfinished();
                resumed = true;
            }
            if last_auto_check.elapsed() >= Duration::from_secs(2) {
                self.queue_worn_keys();
                last_auto_check = Instant::now();
            }
            let job = {
                let q = self.queue.lock().expect("rotation queue");
                match q.front() {
                    Some(j) => Job {
                        database: j.database.clone(),
                        reason: j.reason.clone(),
                        pages_per_second: j.pages_per_second,
                    },
                    None => {
                        let _ = self.wake.wait_timeout(q, Duration::from_millis(500));
                        continue;
                    }
                }
            };
            let outcome = self.rotate(&job);
            let finished = match outcome {
                Ok(Outcome::Done) => {
                    self.completed.fetch_add(1, Ordering::Relaxed);
                    true
                }
                Ok(Outcome::Interrupted) => {
                    self.update(&job.database, |p| p.state = "waiting".into());
                    false
                }
                Err(e) => {
                    tracing::error!(database = %job.database, error = %e, "DEK rotation failed");
                    self.update(&job.database, |p| {
                        p.state = "failed".into();
                        p.error = Some(e);
                        p.eta_seconds = None;
                        p.pages_per_second = 0.0;
                    });
                    true
                }
            };
            if finished {
                let mut q = self.queue.lock().expect("rotation queue");
                if q.front().is_some_and(|j| j.database == job.database) {
                    q.pop_front();
                }
            }
            self.save_progress();
        }
        self.park();
    }

    /// Queues the targets whose rotation was under way (a crash or stop
    /// in the middle).
    fn queue_unfinished(&self) {
        for name in self.target.unfinished() {
            tracing::info!(target = %name, "resuming an unfinished DEK rotation");
            let _ = self.request(Some(&name), "resumed", None);
        }
    }

    /// Queues the targets with a DEK that has sealed `auto_at_seals` units.
    fn queue_worn_keys(&self) {
        for (name, used) in self.target.worn(self.config.auto_at_seals) {
            let queued = self
                .queue
                .lock()
                .expect("rotation queue")
                .iter()
                .any(|j| j.database == name);
            if !queued {
                tracing::warn!(target = %name, seals = used, limit = self.config.auto_at_seals,
                    "a data encryption key reached its rotation point; rotating it");
                let _ = self.request(Some(&name), "automatic: usage limit", None);
            }
        }
    }

    fn rotate(&self, job: &Job) -> Result<Outcome, String> {
        let name = job.database.as_str();
        let begun = self.target.begin(name)?;
        tracing::info!(target = name, pages = begun.pages_total, reason = %job.reason, "DEK rotation running");
        self.update(name, |p| {
            p.state = "rotating".into();
            p.reason = job.reason.clone();
            p.started_unix = begun.started_unix;
            p.finished_unix = None;
            p.error = None;
        });
        self.record(name, &begun, 0.0);
        let started = Instant::now();
        let mut moved = 0u64;
        let mut last_saved = Instant::now();
        let mut last_done = begun.pages_done;
        let mut status = begun;
        while !status.complete() {
            if !self.ready() {
                return Ok(Outcome::Interrupted);
            }
            if !self.target.exists(name) {
                return Err(format!("{name} was dropped during its DEK rotation"));
            }
            let batch_started = Instant::now();
            let Some(next) = self.target.step(name, BATCH_PAGES)? else {
                break; // finished elsewhere (another process)
            };
            moved += next.pages_done.saturating_sub(last_done);
            last_done = next.pages_done;
            status = next;
            let rate = moved as f64 / started.elapsed().as_secs_f64().max(1e-3);
            self.record(name, &status, rate);
            if last_saved.elapsed() >= Duration::from_millis(500) {
                self.save_progress();
                last_saved = Instant::now();
            }
            // The throttle: a batch takes at least its share of a second.
            let budget = Duration::from_secs_f64(BATCH_PAGES as f64 / self.rate_of(job) as f64);
            if let Some(rest) = budget.checked_sub(batch_started.elapsed()) {
                std::thread::sleep(rest);
            }
        }
        self.update(name, |p| p.state = "finishing".into());
        self.save_progress();
        if !self.target.finish(name, &|| self.ready())? {
            return Ok(Outcome::Interrupted);
        }
        let secs = started.elapsed().as_secs_f64();
        tracing::info!(
            target = name,
            pages = moved,
            seconds = secs,
            "DEK rotation finished; the old DEKs are in no header"
        );
        self.update(name, |p| {
            p.state = "done".into();
            p.pages_done = p.pages_total.max(p.pages_done);
            p.percent = 100.0;
            p.eta_seconds = Some(0.0);
            p.finished_unix = Some(now_unix());
        });
        Ok(Outcome::Done)
    }

    /// The throttle of `job` as it is now (`rotate-dek` may change it).
    fn rate_of(&self, job: &Job) -> u64 {
        self.queue
            .lock()
            .expect("rotation queue")
            .iter()
            .find(|j| j.database == job.database)
            .map_or(job.pages_per_second, |j| j.pages_per_second)
    }

    fn record(&self, name: &str, s: &RotationStatus, rate: f64) {
        self.update(name, |p| {
            p.pages_done = s.pages_done.min(s.pages_total);
            p.pages_total = s.pages_total;
            p.percent = if s.pages_total == 0 {
                100.0
            } else {
                (p.pages_done as f64 * 100.0 / s.pages_total as f64 * 10.0).round() / 10.0
            };
            p.pages_per_second = (rate * 10.0).round() / 10.0;
            p.bytes_per_second = (rate * s.page_size as f64).round();
            p.eta_seconds = (rate > 0.0)
                .then(|| ((s.pages_total - p.pages_done) as f64 / rate * 10.0).round() / 10.0);
        });
    }
}

/// The admin operations of DEK rotation, the same for every engine:
/// `rotate-dek` (queue, or change a queued one's throttle) and
/// `rotation-status`. `None`: not one of them.
pub fn admin_op(rotator: &DekRotator, ready: bool, op: &str, req: &Value) -> Option<Value> {
    Some(match op {
        "rotate-dek" => {
            let rate = req["pages_per_second"].as_u64();
            if !ready {
                json!({"error": crate::control::NOT_READY})
            } else if rate == Some(0) {
                json!({"error": "pages_per_second must be at least 1"})
            } else {
                match rotator.request(req["database"].as_str(), "requested", rate) {
                    Ok(queued) => json!({"ok": true, "queued": queued}),
                    Err(e) => json!({"error": e}),
                }
            }
        }
        "rotation-status" => json!({"ok": true, "databases": rotator.progress()}),
        _ => return None,
    })
}

/// The sqlite engine's rotation: one database at a time, through a
/// maintenance connection, finished under the database's write gate.
pub struct DatabaseRotation {
    databases: Arc<Databases>,
    /// The connection a rotation works through; dropped (and its keys with
    /// it) whenever the server leaves Ready.
    conn: Mutex<Option<(String, Connection)>>,
}

impl DatabaseRotation {
    pub fn new(databases: Arc<Databases>) -> Arc<Self> {
        Arc::new(DatabaseRotation {
            databases,
            conn: Mutex::new(None),
        })
    }

    /// Runs `f` on the rotation's connection to `database`, opening it if
    /// needed.
    fn with_conn<T>(
        &self,
        database: &str,
        f: impl FnOnce(&Connection) -> Result<T, String>,
    ) -> Result<T, String> {
        let mut guard = self.conn.lock().expect("rotation connection");
        if guard.as_ref().is_none_or(|(n, _)| n != database) {
            *guard = None;
            let (_, conn) = self
                .databases
                .maintenance_connection(database)
                .map_err(|e| e.message)?;
            *guard = Some((database.to_string(), conn));
        }
        f(&guard.as_ref().expect("opened").1)
    }
}

fn storage(e: atrest_storage::StorageError) -> String {
    e.to_string()
}

impl RotationTarget for DatabaseRotation {
    fn resolve(&self, name: Option<&str>) -> Result<Vec<String>, String> {
        match name {
            Some(n) if self.databases.is_database(n) => Ok(vec![n.to_string()]),
            Some(n) => Err(format!("database \"{n}\" does not exist")),
            None => Ok(self.databases.names()),
        }
    }

    fn exists(&self, name: &str) -> bool {
        self.databases.is_database(name)
    }

    fn unfinished(&self) -> Vec<String> {
        self.databases
            .names()
            .into_iter()
            .filter(|name| {
                self.databases
                    .maintenance_connection(name)
                    .is_ok_and(|(_, conn)| matches!(conn.dek_rotation(), Ok(Some(_))))
            })
            .collect()
    }

    fn worn(&self, limit: u64) -> Vec<(String, u64)> {
        let engine = self.databases.engine();
        self.databases
            .names()
            .into_iter()
            .filter_map(|name| {
                let used = engine.seals_used(&engine.database_path(&name).ok()?)?;
                (used >= limit).then_some((name, used))
            })
            .collect()
    }

    fn begin(&self, name: &str) -> Result<RotationStatus, String> {
        self.with_conn(name, |c| c.begin_dek_rotation().map_err(storage))
    }

    fn step(&self, name: &str, units: u64) -> Result<Option<RotationStatus>, String> {
        let archiver = self.databases.archiver(name).ok();
        let _no_backup_copy = archiver
            .as_ref()
            .map(|a| a.db_copy.read().expect("db copy lock"));
        self.with_conn(name, |c| c.step_dek_rotation(units).map_err(storage))
    }

    /// Under the write gate: every commit is archived, then the WAL is
    /// checkpointed, truncated and rekeyed, and the old keys retired.
    fn finish(&self, name: &str, ready: &dyn Fn() -> bool) -> Result<bool, String> {
        let (db, _) = self
            .databases
            .maintenance_connection(name)
            .map_err(|e| e.message)?;
        let archiver = db.archiver.clone();
        for _ in 0..1200 {
            if !ready() {
                return Ok(false);
            }
            db.gate
                .acquire(ROTATOR_PID, Some(Duration::from_secs(60)), &|| None)
                .map_err(|e| e.message)?;
            let finished = self.with_conn(name, |c| {
                c.query_row("SELECT count(*) FROM sqlite_schema", [], |_| Ok(()))
                    .map_err(|e| e.to_string())?;
                let Some(a) = &archiver else {
                    return c.finish_dek_rotation().map_err(storage);
                };
                a.after_write(c)?;
                let _no_backup_copy = a.db_copy.read().expect("db copy lock");
                if a.paused() {
                    return Ok(false); // a backup is copying: no checkpoint now
                }
                c.finish_dek_rotation().map_err(storage)
            });
            db.gate.release(ROTATOR_PID);
            if finished? {
                return Ok(true);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err("the WAL could not be emptied to finish the rotation (readers kept it busy for a minute); it will be retried".into())
    }

    fn park(&self) {
        self.conn.lock().expect("rotation connection").take();
    }
}
