//! The databases of a running server: one encrypted file set per name,
//! opened through one engine, with one write gate each.
//!
//! SQLite allows one writer per database. Instead of letting writers spin
//! in SQLite's busy handler (sleeps that grow to 100 ms, unfair, and
//! failures under load), a writer waits in a FIFO queue for the database's
//! write gate, holds it until its transaction ends, and hands it to the
//! next. Readers never take it (WAL: they read a snapshot).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use atrest_storage::{Connection, Engine};

use crate::archive::WalArchiver;
use crate::error::{storage_error, PgError};
use crate::resource::validate_database_name;

/// Why a wait was given up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    Cancel,
    StatementTimeout,
    Shutdown,
}

impl StopReason {
    pub fn to_error(self) -> PgError {
        match self {
            StopReason::Cancel => PgError::new("57014", "canceling statement due to user request"),
            StopReason::StatementTimeout => {
                PgError::new("57014", "canceling statement due to statement timeout")
                    .hint("Raise statement_timeout (SET statement_timeout = '30s') or make the statement cheaper.")
            }
            StopReason::Shutdown => {
                PgError::fatal("57P01", "terminating connection due to administrator command")
            }
        }
    }
}

/// FIFO write lock of one database.
#[derive(Default)]
pub struct WriteGate {
    inner: Mutex<GateInner>,
    cv: Condvar,
}

#[derive(Default)]
struct GateInner {
    holder: Option<i32>,
    queue: VecDeque<i32>,
}

impl WriteGate {
    /// Waits for the gate in arrival order. `stop` is polled while waiting.
    pub fn acquire(
        &self,
        pid: i32,
        lock_timeout: Option<Duration>,
        stop: &dyn Fn() -> Option<StopReason>,
    ) -> Result<(), PgError> {
        let started = Instant::now();
        let mut g = self.inner.lock().expect("gate poisoned");
        if g.holder == Some(pid) {
            return Ok(());
        }
        g.queue.push_back(pid);
        loop {
            if g.holder.is_none() && g.queue.front() == Some(&pid) {
                g.queue.pop_front();
                g.holder = Some(pid);
                return Ok(());
            }
            let give_up = |g: &mut GateInner| {
                g.queue.retain(|p| *p != pid);
            };
            if let Some(reason) = stop() {
                give_up(&mut g);
                self.cv.notify_all();
                return Err(reason.to_error());
            }
            if let Some(t) = lock_timeout {
                if started.elapsed() >= t {
                    let holder = g.holder;
                    give_up(&mut g);
                    self.cv.notify_all();
                    return Err(PgError::new(
                        "55P03",
                        format!(
                            "could not obtain the database's write lock within {} ms{}",
                            t.as_millis(),
                            holder.map(|h| format!("; session {h} holds it")).unwrap_or_default()
                        ),
                    )
                    .hint("Another transaction is writing; retry, end long write transactions, or raise lock_timeout."));
                }
            }
            let (ng, _) = self
                .cv
                .wait_timeout(g, Duration::from_millis(20))
                .expect("gate poisoned");
            g = ng;
        }
    }

    pub fn release(&self, pid: i32) {
        let mut g = self.inner.lock().expect("gate poisoned");
        if g.holder == Some(pid) {
            g.holder = None;
            self.cv.notify_all();
        }
    }

    pub fn holder(&self) -> Option<i32> {
        self.inner.lock().expect("gate poisoned").holder
    }
}

/// One database of the server.
pub struct Database {
    pub name: String,
    pub gate: WriteGate,
    sessions: AtomicUsize,
    /// Archives the WAL and runs checkpoints (see [`crate::backup`]).
    pub archiver: Option<Arc<WalArchiver>>,
}

impl Database {
    pub fn sessions(&self) -> usize {
        self.sessions.load(Ordering::Relaxed)
    }
}

/// A session's hold on its database; counts it as in use.
pub struct DatabaseLease {
    pub db: Arc<Database>,
}

impl Drop for DatabaseLease {
    fn drop(&mut self) {
        self.db.sessions.fetch_sub(1, Ordering::Relaxed);
    }
}

/// All databases of a server.
pub struct Databases {
    engine: Engine,
    open: Mutex<HashMap<String, Arc<Database>>>,
    /// The backup repository whose `wal/` receives the WAL archive.
    archive: Mutex<Option<std::path::PathBuf>>,
    /// On a read replica: why writes are refused.
    read_only: Mutex<Option<String>>,
}

impl Databases {
    pub fn new(engine: Engine) -> Self {
        Databases {
            engine,
            open: Mutex::new(HashMap::new()),
            archive: Mutex::new(None),
            read_only: Mutex::new(None),
        }
    }

    /// Archives every database's WAL into `repo` from now on.
    pub fn set_archive(&self, repo: std::path::PathBuf) {
        *self.archive.lock().expect("archive") = Some(repo);
    }

    /// The archivers of the databases opened so far.
    pub fn archivers(&self) -> Vec<Arc<WalArchiver>> {
        self.open
            .lock()
            .expect("databases poisoned")
            .values()
            .filter_map(|d| d.archiver.clone())
            .collect()
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The WAL archiver of database `name` (opening it if needed).
    pub fn archiver(&self, name: &str) -> Result<Arc<WalArchiver>, String> {
        let existing = self
            .open
            .lock()
            .expect("databases poisoned")
            .get(name)
            .cloned();
        let db = match existing {
            Some(db) => db,
            None => self.maintenance_connection(name).map_err(|e| e.message)?.0,
        };
        db.archiver
            .clone()
            .ok_or_else(|| format!("database {name} has no WAL archive"))
    }

    /// Makes every database read-only (a read replica) with `why` as the
    /// reason writers are given, or writable again (`None`: promoted).
    pub fn set_read_only(&self, why: Option<String>) {
        *self.read_only.lock().expect("read-only") = why;
    }

    /// Why writes are refused, on a read replica.
    pub fn read_only(&self) -> Option<String> {
        self.read_only.lock().expect("read-only").clone()
    }

    fn exists(&self, name: &str) -> bool {
        self.engine
            .database_path(name)
            .map(|p| p.exists())
            .unwrap_or(false)
    }

    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.engine.data_dir())
            .map(|rd| {
                rd.flatten()
                    .filter_map(|e| {
                        let p = e.path();
                        (p.extension().is_some_and(|x| x == "db"))
                            .then(|| p.file_stem()?.to_str().map(str::to_string))
                            .flatten()
                    })
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// Opens a session's connection to an existing database.
    pub fn connect(&self, name: &str) -> Result<(DatabaseLease, Connection), PgError> {
        let (db, conn) = self.open_existing(name)?;
        db.sessions.fetch_add(1, Ordering::Relaxed);
        Ok((DatabaseLease { db }, conn))
    }

    /// A connection for the server's own background work (DEK rotation):
    /// not a session, so it does not keep the database from being dropped.
    pub fn maintenance_connection(
        &self,
        name: &str,
    ) -> Result<(Arc<Database>, Connection), PgError> {
        self.open_existing(name)
    }

    fn open_existing(&self, name: &str) -> Result<(Arc<Database>, Connection), PgError> {
        let mut open = self.open.lock().expect("databases poisoned");
        if !self.is_database(name) {
            return Err(
                PgError::fatal("3D000", format!("database \"{name}\" does not exist"))
                    .hint("Connect to \"postgres\" and run CREATE DATABASE, or check the name."),
            );
        }
        let conn = self.server_connection(name).map_err(|mut pe| {
            pe.severity = "FATAL";
            pe
        })?;
        let archive = self.archive.lock().expect("archive").clone();
        let db = open
            .entry(name.to_string())
            .or_insert_with(|| {
                let archiver = archive.as_ref().and_then(|repo| {
                    let path = self.engine.database_path(name).ok()?;
                    Some(Arc::new(WalArchiver::new(
                        repo,
                        name,
                        path,
                        self.engine.clone(),
                    )))
                });
                Arc::new(Database {
                    name: name.to_string(),
                    gate: WriteGate::default(),
                    sessions: AtomicUsize::new(0),
                    archiver,
                })
            })
            .clone();
        Ok((db, conn))
    }

    /// Whether database `name` exists (a valid name with a file).
    pub fn is_database(&self, name: &str) -> bool {
        validate_database_name(name).is_ok() && self.exists(name)
    }

    /// A connection as the server uses them: the server, not SQLite, runs
    /// checkpoints (after archiving the WAL), so neither a commit nor the
    /// last close of a connection checkpoints on its own.
    fn server_connection(&self, name: &str) -> Result<Connection, PgError> {
        let conn = self.engine.connect(name).map_err(storage_error)?;
        conn.pragma_update(None, "wal_autocheckpoint", 0)
            .map_err(crate::error::from_sqlite)?;
        conn.set_db_config(
            rusqlite::config::DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE,
            true,
        )
        .map_err(crate::error::from_sqlite)?;
        Ok(conn)
    }

    pub fn create(&self, name: &str) -> Result<(), PgError> {
        if let Some(why) = self.read_only() {
            return Err(PgError::new(
                "25006",
                format!("cannot execute CREATE DATABASE: {why}"),
            ));
        }
        self.create_as_source_did(name)
    }

    /// CREATE DATABASE whether or not this server is a read replica: a
    /// replica makes the databases its source makes.
    pub fn create_as_source_did(&self, name: &str) -> Result<(), PgError> {
        validate_database_name(name).map_err(|m| PgError::new("42602", m))?;
        let _open = self.open.lock().expect("databases poisoned");
        if self.exists(name) {
            return Err(PgError::new(
                "42P04",
                format!("database \"{name}\" already exists"),
            ));
        }
        if let Some(repo) = self.archive.lock().expect("archive").as_ref() {
            // Where this database's history starts in the archive (a
            // replica follows a new database from there).
            crate::archive::mark_origin(repo, name).map_err(|m| {
                tracing::error!(database = name, error = %m, "marking the archive origin");
                PgError::new(
                    "58030",
                    format!("could not start the WAL archive of database \"{name}\" (the server log says why)"),
                )
            })?;
        }
        let conn = self.server_connection(name)?;
        conn.pragma_update(None, "journal_mode", "wal")
            .map_err(crate::error::from_sqlite)?;
        tracing::info!(database = name, "created database");
        Ok(())
    }

    /// Drops a database no session uses; `current` is the caller's own.
    pub fn drop_database(
        &self,
        name: &str,
        if_exists: bool,
        current: &str,
    ) -> Result<bool, PgError> {
        if let Some(why) = self.read_only() {
            return Err(PgError::new(
                "25006",
                format!("cannot execute DROP DATABASE: {why}"),
            ));
        }
        self.drop_as_source_did(name, if_exists, current)
    }

    /// DROP DATABASE whether or not this server is a read replica.
    pub fn drop_as_source_did(
        &self,
        name: &str,
        if_exists: bool,
        current: &str,
    ) -> Result<bool, PgError> {
        let mut open = self.open.lock().expect("databases poisoned");
        if !self.exists(name) {
            if if_exists {
                return Ok(false);
            }
            return Err(PgError::new(
                "3D000",
                format!("database \"{name}\" does not exist"),
            ));
        }
        if name == current {
            return Err(
                PgError::new("55006", "cannot drop the currently open database")
                    .hint("Connect to another database (e.g. postgres) first."),
            );
        }
        if let Some(db) = open.get(name).cloned() {
            // Like PostgreSQL, give sessions that are ending up to 5 s.
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while db.sessions() > 0 && std::time::Instant::now() < deadline {
                drop(open);
                std::thread::sleep(Duration::from_millis(10));
                open = self.open.lock().expect("databases poisoned");
            }
            let n = db.sessions();
            if n > 0 {
                return Err(PgError::new(
                    "55006",
                    format!("database \"{name}\" is being accessed by {n} other session(s)"),
                ));
            }
        }
        open.remove(name);
        let path = self.engine.database_path(name).map_err(storage_error)?;
        for suffix in ["", "-wal", "-journal"] {
            let p = std::path::PathBuf::from(format!("{}{suffix}", path.display()));
            match std::fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::error!(path = %p.display(), error = %e, "dropping a database");
                    return Err(PgError::new(
                        "58030",
                        format!("could not remove a file of database \"{name}\": {e}"),
                    ));
                }
            }
        }
        tracing::info!(database = name, "dropped database");
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    #[test]
    fn gate_is_fifo_and_times_out_with_the_holder_named() {
        let gate = Arc::new(WriteGate::default());
        let never = || None;
        gate.acquire(1, None, &never).unwrap();
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut hs = vec![];
        for pid in 2..=4 {
            let (g, o) = (gate.clone(), order.clone());
            hs.push(std::thread::spawn(move || {
                g.acquire(pid, None, &|| None).unwrap();
                o.lock().unwrap().push(pid);
                g.release(pid);
            }));
            // Arrival order is the queue order.
            while gate.inner.lock().unwrap().queue.len() < (pid - 1) as usize {
                std::thread::yield_now();
            }
        }
        let e = gate
            .acquire(9, Some(Duration::from_millis(50)), &never)
            .unwrap_err();
        assert_eq!(e.code, "55P03");
        assert!(e.message.contains("session 1 holds it"), "{}", e.message);
        gate.release(1);
        for h in hs {
            h.join().unwrap();
        }
        assert_eq!(*order.lock().unwrap(), vec![2, 3, 4]);
        assert_eq!(gate.holder(), None);
    }

    #[test]
    fn gate_wait_stops_on_cancel() {
        let gate = WriteGate::default();
        gate.acquire(1, None, &|| None).unwrap();
        let cancel = AtomicBool::new(false);
        let stop = || {
            cancel
                .swap(true, Ordering::Relaxed)
                .then_some(StopReason::Cancel)
        };
        let e = gate.acquire(2, None, &stop).unwrap_err();
        assert_eq!(e.code, "57014");
        assert!(gate.inner.lock().unwrap().queue.is_empty());
    }
}
