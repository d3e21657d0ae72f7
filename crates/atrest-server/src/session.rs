//! One client session: a thread that owns the session's SQLite connection
//! and speaks the PostgreSQL query protocols (simple and extended) on it.
//!
//! The async connection task decodes frontend messages and hands them
//! here one at a time; this thread answers with backend messages. Keeping
//! the protocol state machine synchronous, next to the connection, makes
//! transactions, portals and errors easy to reason about, and keeps
//! SQLite's blocking calls off the async runtime.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use pgwire::messages::data::{
    DataRow, FieldDescription, NoData, ParameterDescription, RowDescription,
};
use pgwire::messages::extendedquery::{
    Bind, BindComplete, Close, CloseComplete, Describe, Execute, Parse, ParseComplete,
    PortalSuspended,
};
use pgwire::messages::response::{
    CommandComplete, EmptyQueryResponse, ReadyForQuery, TransactionStatus,
};
use pgwire::messages::startup::ParameterStatus;
use pgwire::messages::PgWireBackendMessage as B;
use rusqlite::types::{Value, ValueRef};

use crate::config::Limits;
use crate::databases::{DatabaseLease, Databases, StopReason};
use crate::error::{from_sqlite, PgError};
use crate::metrics::Metrics;
use crate::sql::{self, Command, SavepointKind, Statement};
use crate::types::{decode_param, encode_field, PgType};

/// The server version clients see: PostgreSQL 16 protocol and syntax
/// level as far as atrest implements it.
pub const SERVER_VERSION: &str = concat!("16.0 (atrest ", env!("CARGO_PKG_VERSION"), ")");

fn process_start() -> Instant {
    static START: OnceLock<Instant> = OnceLock::new();
    *START.get_or_init(Instant::now)
}

fn now_ms() -> u64 {
    process_start().elapsed().as_millis() as u64 + 1
}

/// What the connection task and other threads share with a session.
pub struct SessionShared {
    pub pid: i32,
    pub secret: i32,
    pub user: String,
    pub database: String,
    /// A cancel request or shutdown arrived; checked by the running statement.
    stop: AtomicU8,
    /// Statement deadline in ms since process start (0: none).
    deadline_ms: AtomicU64,
    /// Whether a statement is running.
    pub busy: AtomicBool,
    /// Transaction status as last reported (b'I', b'T', b'E').
    pub tx_status: AtomicU8,
    /// ms since process start of the last activity.
    pub last_active_ms: AtomicI64,
}

const STOP_NONE: u8 = 0;
const STOP_CANCEL: u8 = 1;
const STOP_SHUTDOWN: u8 = 2;

impl SessionShared {
    pub fn new(pid: i32, secret: i32, user: &str, database: &str) -> Self {
        SessionShared {
            pid,
            secret,
            user: user.to_string(),
            database: database.to_string(),
            stop: AtomicU8::new(STOP_NONE),
            deadline_ms: AtomicU64::new(0),
            busy: AtomicBool::new(false),
            tx_status: AtomicU8::new(b'I'),
            last_active_ms: AtomicI64::new(now_ms() as i64),
        }
    }

    /// Cancels the running statement, if any (a CancelRequest).
    pub fn cancel(&self) {
        if self.busy.load(Ordering::SeqCst) {
            let _ = self.stop.compare_exchange(
                STOP_NONE,
                STOP_CANCEL,
                Ordering::SeqCst,
                Ordering::SeqCst,
            );
        }
    }

    /// Stops whatever runs, for good (shutdown, client gone).
    pub fn terminate(&self) {
        self.stop.store(STOP_SHUTDOWN, Ordering::SeqCst);
    }

    /// Whether the running statement must stop, and why.
    pub fn should_stop(&self) -> Option<StopReason> {
        match self.stop.load(Ordering::Relaxed) {
            STOP_CANCEL => return Some(StopReason::Cancel),
            STOP_SHUTDOWN => return Some(StopReason::Shutdown),
            _ => {}
        }
        let d = self.deadline_ms.load(Ordering::Relaxed);
        (d != 0 && now_ms() >= d).then_some(StopReason::StatementTimeout)
    }

    pub fn idle_for(&self) -> Duration {
        let last = self.last_active_ms.load(Ordering::Relaxed);
        Duration::from_millis((now_ms() as i64 - last).max(0) as u64)
    }

    pub fn in_transaction(&self) -> bool {
        self.tx_status.load(Ordering::Relaxed) != b'I'
    }
}

/// What the connection task sends a session.
pub enum Job {
    Query(String),
    Parse(Parse),
    Bind(Bind),
    Describe(Describe),
    Execute(Execute),
    Close(Close),
    Sync,
    Flush,
}

/// What a session answers with.
pub enum Out {
    Messages(Vec<B>),
    /// Send what you have to the client now.
    Flush,
    /// The job is done.
    Done,
    /// The session ended (fatal error sent, or shutdown).
    Closed,
}

/// The handle the connection task keeps.
pub struct SessionHandle {
    pub shared: Arc<SessionShared>,
    jobs: std::sync::mpsc::Sender<Job>,
    pub out: tokio::sync::mpsc::Receiver<Out>,
}

impl SessionHandle {
    pub fn submit(&self, job: Job) -> bool {
        self.jobs.send(job).is_ok()
    }
}

/// Session settings (SET/SHOW).
#[derive(Clone)]
struct Settings {
    values: BTreeMap<String, String>,
}

/// Parameters reported to the client at startup and when they change.
pub const REPORTED: &[&str] = &[
    "application_name",
    "client_encoding",
    "DateStyle",
    "default_transaction_read_only",
    "in_hot_standby",
    "integer_datetimes",
    "IntervalStyle",
    "is_superuser",
    "server_encoding",
    "server_version",
    "session_authorization",
    "standard_conforming_strings",
    "TimeZone",
];

impl Settings {
    fn new(
        user: &str,
        app: &str,
        limits: &Limits,
        superuser: bool,
        scenario: &str,
        server: &str,
    ) -> Self {
        let mut v = BTreeMap::new();
        let mut put = |k: &str, val: String| {
            v.insert(k.to_ascii_lowercase(), val);
        };
        put("application_name", app.to_string());
        put("client_encoding", "UTF8".into());
        put("DateStyle", "ISO, MDY".into());
        put("default_transaction_read_only", "off".into());
        put("in_hot_standby", "off".into());
        put("integer_datetimes", "on".into());
        put("IntervalStyle", "postgres".into());
        put("is_superuser", if superuser { "on" } else { "off" }.into());
        put("server_encoding", "UTF8".into());
        put("server_version", SERVER_VERSION.into());
        put("server_version_num", "160000".into());
        put("session_authorization", user.to_string());
        put("standard_conforming_strings", "on".into());
        put("TimeZone", "UTC".into());
        put("search_path", "\"$user\", public".into());
        put("transaction_isolation", "serializable".into());
        put("default_transaction_isolation", "serializable".into());
        put("max_connections", limits.max_connections.to_string());
        put("statement_timeout", limits.statement_timeout_ms.to_string());
        put("lock_timeout", limits.lock_timeout_ms.to_string());
        put(
            "idle_in_transaction_session_timeout",
            limits.idle_in_transaction_session_timeout_ms.to_string(),
        );
        put(
            "idle_session_timeout",
            limits.idle_session_timeout_ms.to_string(),
        );
        put("extra_float_digits", "1".into());
        put("bytea_output", "hex".into());
        put("client_min_messages", "notice".into());
        put("atrest.encryption_scenario", scenario.to_string());
        put("atrest.server_name", server.to_string());
        put(
            "atrest.storage_engine",
            format!("SQLite {}", rusqlite::version()),
        );
        Settings { values: v }
    }

    fn get(&self, name: &str) -> Option<&String> {
        self.values.get(&name.to_ascii_lowercase())
    }

    fn ms(&self, name: &str) -> u64 {
        self.get(name).and_then(|v| v.parse().ok()).unwrap_or(0)
    }

    /// The canonical spelling of a reported parameter.
    fn reported_name(name: &str) -> Option<&'static str> {
        REPORTED
            .iter()
            .find(|r| r.eq_ignore_ascii_case(name))
            .copied()
    }

    /// Startup ParameterStatus values.
    pub fn startup_params(&self) -> Vec<(String, String)> {
        REPORTED
            .iter()
            .filter_map(|r| self.get(r).map(|v| (r.to_string(), v.clone())))
            .collect()
    }
}

/// Parses a PostgreSQL duration setting into milliseconds.
fn parse_duration_ms(v: &str) -> Option<u64> {
    let v = v.trim();
    let split = v
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(v.len());
    let (num, unit) = v.split_at(split);
    let n: f64 = num.parse().ok()?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "ms" => 1.0,
        "s" => 1000.0,
        "min" => 60_000.0,
        "h" => 3_600_000.0,
        "d" => 86_400_000.0,
        "us" => 0.001,
        _ => return None,
    };
    Some((n * mult).round() as u64)
}

/// A prepared statement's analysis.
struct Prepared {
    command: Command,
    /// For SQL: the rewritten text, its verb, and what SQLite says of it.
    sql: Option<SqlInfo>,
    /// Parameter OIDs from Parse (0: unspecified), then resolved by Describe.
    param_oids: Mutex<Vec<u32>>,
    /// Result types fixed by Describe (statement); portals then use them.
    fixed_types: Mutex<Option<Vec<PgType>>>,
}

struct SqlInfo {
    text: String,
    verb: String,
    readonly: bool,
    columns: Vec<(String, Option<PgType>)>,
    /// For each SQLite parameter index (1-based, position i-1): which PG
    /// parameter ($n, 0-based) feeds it.
    param_map: Vec<usize>,
    /// Number of PostgreSQL parameters ($1..$n).
    pg_params: usize,
    /// Statements SQLite refuses inside a transaction.
    no_transaction: bool,
}

struct Portal {
    stmt: Arc<Prepared>,
    params: Vec<Value>,
    result_formats: Vec<i16>,
    /// Types announced for this portal (by Describe), if any.
    types: Option<Vec<PgType>>,
    /// Rows left over from a suspended execution.
    remaining: Option<VecDeque<DataRow>>,
    sent: usize,
    done: bool,
}

impl Portal {
    fn binary(&self, col: usize) -> bool {
        match self.result_formats.len() {
            0 => false,
            1 => self.result_formats[0] == 1,
            _ => self.result_formats.get(col).copied() == Some(1),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tx {
    Idle,
    /// Opened by BEGIN.
    Explicit,
    /// Opened by the extended protocol until Sync (or a multi-statement query).
    Implicit,
    /// An error happened inside a transaction: only ROLLBACK helps.
    Failed {
        explicit: bool,
    },
}

/// Everything a session thread needs.
pub struct SessionConfig {
    pub databases: Arc<Databases>,
    pub limits: Limits,
    pub metrics: Arc<Metrics>,
    pub user: String,
    pub superuser: bool,
    pub application_name: String,
    pub scenario: String,
    pub server_name: String,
}

/// Opens the session's connection and starts its thread. On success also
/// returns the ParameterStatus values to send at startup.
pub fn start(
    cfg: SessionConfig,
    shared: Arc<SessionShared>,
) -> Result<(SessionHandle, Vec<(String, String)>), PgError> {
    let (lease, conn) = cfg.databases.connect(&shared.database)?;
    let settings = Settings::new(
        &cfg.user,
        &cfg.application_name,
        &cfg.limits,
        cfg.superuser,
        &cfg.scenario,
        &cfg.server_name,
    );
    let params = settings.startup_params();
    let (job_tx, job_rx) = std::sync::mpsc::channel();
    let (out_tx, out_rx) = tokio::sync::mpsc::channel(16);
    let shared2 = Arc::clone(&shared);
    std::thread::Builder::new()
        .name(format!("session-{}", shared.pid))
        .spawn(move || {
            let mut w = match Worker::new(cfg, shared2, lease, conn, settings, out_tx) {
                Ok(w) => w,
                Err(e) => {
                    tracing::warn!(error = %e.message, "session setup failed");
                    return;
                }
            };
            w.run(job_rx);
        })
        .map_err(|e| PgError::fatal("53000", format!("cannot start a session thread: {e}")))?;
    Ok((
        SessionHandle {
            shared,
            jobs: job_tx,
            out: out_rx,
        },
        params,
    ))
}

thread_local! {
    /// The session of this thread, for SQLite callbacks that take no state.
    static CURRENT: std::cell::RefCell<Option<Arc<SessionShared>>> = const { std::cell::RefCell::new(None) };
}

fn current_should_stop() -> Option<StopReason> {
    CURRENT.with(|c| c.borrow().as_ref().and_then(|s| s.should_stop()))
}

/// SQLite's busy handler: only reached when a write races a checkpoint
/// or another process; waits briefly unless the statement must stop.
fn busy_handler(count: i32) -> bool {
    if current_should_stop().is_some() || count > 5000 {
        return false;
    }
    std::thread::sleep(Duration::from_millis(if count < 10 { 1 } else { 5 }));
    true
}

struct Worker {
    cfg: SessionConfig,
    shared: Arc<SessionShared>,
    lease: DatabaseLease,
    conn: atrest_storage::Connection,
    settings: Settings,
    /// The settings as the session started (what RESET returns to).
    defaults: Settings,
    stmts: HashMap<String, Arc<Prepared>>,
    portals: HashMap<String, Portal>,
    tx: Tx,
    holds_gate: bool,
    skip_until_sync: bool,
    pending_describe: Option<String>,
    out: Vec<B>,
    out_tx: tokio::sync::mpsc::Sender<Out>,
    closed: bool,
}

const BATCH: usize = 128;

impl Worker {
    fn new(
        cfg: SessionConfig,
        shared: Arc<SessionShared>,
        lease: DatabaseLease,
        mut conn: atrest_storage::Connection,
        settings: Settings,
        out_tx: tokio::sync::mpsc::Sender<Out>,
    ) -> Result<Self, PgError> {
        CURRENT.with(|c| *c.borrow_mut() = Some(Arc::clone(&shared)));
        conn.set_prepared_statement_cache_capacity(256);
        conn.busy_handler(Some(busy_handler)).map_err(from_sqlite)?;
        // PostgreSQL enforces foreign keys; so do we.
        conn.pragma_update(None, "foreign_keys", "on")
            .map_err(from_sqlite)?;
        let s = Arc::clone(&shared);
        conn.progress_handler(1000, Some(move || s.should_stop().is_some()))
            .map_err(from_sqlite)?;
        register_functions(&conn, &shared, &cfg)?;
        rusqlite::vtab::series::load_module(&conn).map_err(from_sqlite)?;
        Ok(Worker {
            cfg,
            shared,
            lease,
            conn,
            defaults: settings.clone(),
            settings,
            stmts: HashMap::new(),
            portals: HashMap::new(),
            tx: Tx::Idle,
            holds_gate: false,
            skip_until_sync: false,
            pending_describe: None,
            out: Vec::new(),
            out_tx,
            closed: false,
        })
    }

    fn run(&mut self, jobs: std::sync::mpsc::Receiver<Job>) {
        while let Ok(job) = jobs.recv() {
            self.shared
                .last_active_ms
                .store(now_ms() as i64, Ordering::Relaxed);
            self.handle(job);
            self.push_out();
            let _ = self
                .out_tx
                .blocking_send(if self.closed { Out::Closed } else { Out::Done });
            self.shared
                .tx_status
                .store(self.status_byte(), Ordering::Relaxed);
            self.shared
                .last_active_ms
                .store(now_ms() as i64, Ordering::Relaxed);
            if self.closed {
                break;
            }
        }
        // Connection closed: an open transaction rolls back when the
        // connection is dropped; give the write gate back first.
        self.release_gate_if_done(true);
        CURRENT.with(|c| *c.borrow_mut() = None);
    }

    fn status_byte(&self) -> u8 {
        match self.tx {
            Tx::Idle => b'I',
            Tx::Explicit | Tx::Implicit => b'T',
            Tx::Failed { .. } => b'E',
        }
    }

    fn status(&self) -> TransactionStatus {
        match self.tx {
            Tx::Idle => TransactionStatus::Idle,
            Tx::Explicit | Tx::Implicit => TransactionStatus::Transaction,
            Tx::Failed { .. } => TransactionStatus::Error,
        }
    }

    fn send(&mut self, m: B) {
        self.out.push(m);
        if self.out.len() >= BATCH {
            self.push_out();
        }
    }

    fn push_out(&mut self) {
        if !self.out.is_empty() {
            let batch = std::mem::take(&mut self.out);
            if self.out_tx.blocking_send(Out::Messages(batch)).is_err() {
                // The connection task is gone: stop whatever runs.
                self.shared.terminate();
                self.closed = true;
            }
        }
    }

    fn send_error(&mut self, e: PgError) {
        self.cfg.metrics.error(e.class());
        if e.is_fatal() {
            self.closed = true;
        }
        self.send(B::ErrorResponse(e.to_response()));
    }

    fn ready(&mut self) {
        let st = self.status();
        self.send(B::ReadyForQuery(ReadyForQuery::new(st)));
        self.push_out();
        let _ = self.out_tx.blocking_send(Out::Flush);
    }

    fn handle(&mut self, job: Job) {
        // A Describe(portal) answer may be owed: anything but the Execute
        // of that portal settles it now.
        if let Some(p) = self.pending_describe.clone() {
            let is_exec = matches!(&job, Job::Execute(e) if portal_name(&e.name) == p);
            if !is_exec {
                self.pending_describe = None;
                self.settle_describe(&p);
            }
        }
        if self.skip_until_sync && !matches!(job, Job::Sync | Job::Query(_)) {
            return;
        }
        match job {
            Job::Query(q) => {
                self.skip_until_sync = false;
                self.simple_query(&q);
            }
            Job::Parse(p) => self.on_parse(p),
            Job::Bind(b) => self.on_bind(b),
            Job::Describe(d) => self.on_describe(d),
            Job::Execute(e) => self.on_execute(e),
            Job::Close(c) => self.on_close(c),
            Job::Sync => self.on_sync(),
            Job::Flush => {
                self.push_out();
                let _ = self.out_tx.blocking_send(Out::Flush);
            }
        }
    }

    fn extended_error(&mut self, e: PgError) {
        self.fail_transaction();
        self.send_error(e);
        self.skip_until_sync = true;
    }

    fn fail_transaction(&mut self) {
        self.tx = match self.tx {
            Tx::Idle => Tx::Idle,
            Tx::Explicit => Tx::Failed { explicit: true },
            Tx::Implicit => Tx::Failed { explicit: false },
            f @ Tx::Failed { .. } => f,
        };
        self.release_gate_if_done(false);
    }

    // ---------------------------------------------------------------
    // Simple query protocol

    fn simple_query(&mut self, text: &str) {
        self.cfg.metrics.query();
        let statements = match sql::split(text) {
            Ok(s) => s,
            Err(e) => {
                self.fail_transaction();
                self.send_error(e.into());
                self.ready();
                return;
            }
        };
        if statements.is_empty() {
            self.send(B::EmptyQueryResponse(EmptyQueryResponse::new()));
            self.ready();
            return;
        }
        let commands: Vec<Command> = statements.iter().map(sql::classify).collect();
        let has_tx_control = commands.iter().any(|c| {
            matches!(
                c,
                Command::Begin { .. }
                    | Command::Commit
                    | Command::Rollback
                    | Command::Savepoint { .. }
            )
        });
        let implicit = statements.len() > 1 && self.tx == Tx::Idle && !has_tx_control;
        if implicit {
            if let Err(e) = self.begin(Tx::Implicit) {
                self.send_error(e);
                self.ready();
                return;
            }
        }
        for (st, cmd) in statements.iter().zip(commands) {
            let prepared = match self.analyze(st, cmd, &[]) {
                Ok(p) => Arc::new(p),
                Err(e) => {
                    self.fail_transaction();
                    self.send_error(e);
                    break;
                }
            };
            let mut portal = Portal {
                stmt: prepared,
                params: Vec::new(),
                result_formats: Vec::new(),
                types: None,
                remaining: None,
                sent: 0,
                done: false,
            };
            let ok = self.execute_portal(&mut portal, 0, true, false);
            if !ok || self.closed {
                break;
            }
        }
        if implicit {
            match self.tx {
                Tx::Implicit => {
                    if let Err(e) = self.commit() {
                        self.send_error(e);
                    }
                }
                Tx::Failed { explicit: false } => self.rollback(),
                _ => {}
            }
        }
        self.ready();
    }

    // ---------------------------------------------------------------
    // Extended query protocol

    fn on_parse(&mut self, p: Parse) {
        let name = p.name.clone().unwrap_or_default();
        let statements = match sql::split(&p.query) {
            Ok(s) => s,
            Err(e) => return self.extended_error(e.into()),
        };
        if statements.len() > 1 {
            return self.extended_error(PgError::syntax(
                "cannot insert multiple commands into a prepared statement",
            ));
        }
        let prepared = match statements.first() {
            None => Prepared {
                command: Command::Ignored { tag: String::new() },
                sql: None,
                param_oids: Mutex::new(p.type_oids.clone()),
                fixed_types: Mutex::new(None),
            },
            Some(st) => match self.analyze(st, sql::classify(st), &p.type_oids) {
                Ok(p) => p,
                Err(e) => return self.extended_error(e),
            },
        };
        if !name.is_empty() && self.stmts.contains_key(&name) {
            return self.extended_error(PgError::new(
                "42P05",
                format!("prepared statement \"{name}\" already exists"),
            ));
        }
        self.stmts.insert(name, Arc::new(prepared));
        self.send(B::ParseComplete(ParseComplete::new()));
    }

    fn on_bind(&mut self, b: Bind) {
        let sname = b.statement_name.clone().unwrap_or_default();
        let pname = b.portal_name.clone().unwrap_or_default();
        let Some(stmt) = self.stmts.get(&sname).cloned() else {
            return self.extended_error(PgError::new(
                "26000",
                format!("prepared statement \"{sname}\" does not exist"),
            ));
        };
        if matches!(self.tx, Tx::Failed { .. }) && !stmt_ends_transaction(&stmt.command) {
            return self.extended_error(PgError::in_failed_transaction());
        }
        let oids = stmt.param_oids.lock().expect("poisoned").clone();
        let want = stmt.sql.as_ref().map(|s| s.pg_params).unwrap_or(0);
        if b.parameters.len() != want {
            return self.extended_error(PgError::protocol(format!(
                "bind message supplies {} parameters, but prepared statement \"{sname}\" requires {want}",
                b.parameters.len()
            )));
        }
        let mut params = Vec::with_capacity(b.parameters.len());
        for (i, raw) in b.parameters.iter().enumerate() {
            let binary = match b.parameter_format_codes.len() {
                0 => false,
                1 => b.parameter_format_codes[0] == 1,
                _ => b.parameter_format_codes.get(i).copied() == Some(1),
            };
            let oid = oids.get(i).copied().unwrap_or(0);
            match decode_param(raw.as_deref(), oid, binary) {
                Ok(v) => params.push(v),
                Err(e) => {
                    let mut pe: PgError = e.into();
                    pe.message = format!("parameter ${}: {}", i + 1, pe.message);
                    return self.extended_error(pe);
                }
            }
        }
        let fixed = stmt.fixed_types.lock().expect("poisoned").clone();
        self.portals.insert(
            pname,
            Portal {
                stmt,
                params,
                result_formats: b.result_column_format_codes.clone(),
                types: fixed,
                remaining: None,
                sent: 0,
                done: false,
            },
        );
        self.send(B::BindComplete(BindComplete::new()));
    }

    fn on_describe(&mut self, d: Describe) {
        let name = d.name.clone().unwrap_or_default();
        if d.target_type == b'S' {
            let Some(stmt) = self.stmts.get(&name).cloned() else {
                return self.extended_error(PgError::new(
                    "26000",
                    format!("prepared statement \"{name}\" does not exist"),
                ));
            };
            let oids = self.resolve_param_types(&stmt);
            self.send(B::ParameterDescription(ParameterDescription::new(oids)));
            match self.result_types(&stmt, None) {
                Ok(Some(types)) => {
                    *stmt.fixed_types.lock().expect("poisoned") = Some(types.clone());
                    let desc = row_description(&columns_of(&stmt), &types, &|_| false);
                    self.send(B::RowDescription(desc));
                }
                Ok(None) => self.send(B::NoData(NoData::new())),
                Err(e) => self.extended_error(e),
            }
        } else {
            let Some(portal) = self.portals.get(&name) else {
                return self.extended_error(PgError::new(
                    "34000",
                    format!("portal \"{name}\" does not exist"),
                ));
            };
            if !returns_rows(&portal.stmt) {
                self.send(B::NoData(NoData::new()));
            } else if let Some(types) = portal.types.clone() {
                let desc =
                    row_description(&columns_of(&portal.stmt), &types, &|c| portal.binary(c));
                self.send(B::RowDescription(desc));
            } else {
                // Answered with the first row's types when Execute comes.
                self.pending_describe = Some(name);
            }
        }
    }

    /// Answers a Describe(portal) without executing it: declared types, or
    /// the first row of a read-only statement, or text.
    fn settle_describe(&mut self, name: &str) {
        let Some(mut portal) = self.portals.remove(name) else {
            return;
        };
        match self.result_types(&portal.stmt, Some(&portal.params)) {
            Ok(types) => {
                let types = types.unwrap_or_default();
                let desc =
                    row_description(&columns_of(&portal.stmt), &types, &|c| portal.binary(c));
                portal.types = Some(types);
                self.send(B::RowDescription(desc));
            }
            Err(e) => self.extended_error(e),
        }
        self.portals.insert(name.to_string(), portal);
    }

    fn on_execute(&mut self, e: Execute) {
        let name = portal_name(&e.name);
        let describe = self.pending_describe.take().is_some_and(|p| p == name);
        let Some(mut portal) = self.portals.remove(&name) else {
            return self.extended_error(PgError::new(
                "34000",
                format!("portal \"{name}\" does not exist"),
            ));
        };
        self.cfg.metrics.query();
        let max_rows = if e.max_rows > 0 {
            e.max_rows as usize
        } else {
            0
        };
        let ok = self.execute_portal(&mut portal, max_rows, describe, true);
        if ok {
            self.portals.insert(name, portal);
        } else {
            self.skip_until_sync = true;
        }
    }

    fn on_close(&mut self, c: Close) {
        let name = c.name.clone().unwrap_or_default();
        if c.target_type == b'S' {
            self.stmts.remove(&name);
        } else {
            self.portals.remove(&name);
        }
        self.send(B::CloseComplete(CloseComplete::new()));
    }

    fn on_sync(&mut self) {
        self.skip_until_sync = false;
        match self.tx {
            Tx::Implicit => {
                if let Err(e) = self.commit() {
                    self.send_error(e);
                }
            }
            Tx::Failed { explicit: false } => self.rollback(),
            _ => {}
        }
        if self.tx == Tx::Idle {
            self.portals.clear();
        } else {
            self.portals.remove("");
        }
        self.ready();
    }

    // ---------------------------------------------------------------
    // Statements

    /// Checks a statement and learns what it needs and returns.
    fn analyze(
        &mut self,
        st: &Statement,
        command: Command,
        oids: &[u32],
    ) -> Result<Prepared, PgError> {
        let sql = match &command {
            Command::Sql(text) => {
                let stmt = self.conn.prepare_cached(text).map_err(from_sqlite)?;
                let count = stmt.parameter_count();
                let mut param_map = Vec::with_capacity(count);
                let mut pg_params = 0usize;
                for i in 1..=count {
                    let pg = match stmt.parameter_name(i) {
                        Some(n) if n.starts_with('$') => {
                            n[1..].parse::<usize>().ok().filter(|k| *k >= 1)
                        }
                        Some(n) => {
                            return Err(PgError::syntax(format!(
                                "parameter {n} is not supported; use $1, $2, ..."
                            )))
                        }
                        None => Some(i),
                    }
                    .ok_or_else(|| PgError::syntax("parameters are numbered from $1"))?;
                    pg_params = pg_params.max(pg);
                    param_map.push(pg - 1);
                }
                let columns = stmt
                    .columns()
                    .map(|c| {
                        (
                            c.name().to_string(),
                            c.decl_type().and_then(PgType::from_decltype),
                        )
                    })
                    .collect();
                let w0 = st.word(0).unwrap_or_default();
                if w0 == "PRAGMA" {
                    // The server runs checkpoints after archiving the WAL
                    // (crate::backup); a client must not move frames out of
                    // the WAL, or out of WAL mode, behind the archive's back.
                    let lower = text.to_ascii_lowercase();
                    if let Some(p) = [
                        "wal_checkpoint",
                        "wal_autocheckpoint",
                        "journal_mode",
                        "locking_mode",
                        "journal_size_limit",
                    ]
                    .into_iter()
                    .find(|p| lower.contains(p))
                    {
                        return Err(PgError::new(
                            "42501",
                            format!("PRAGMA {p} is managed by the server (its WAL archive and checkpoints) and cannot be run by a client"),
                        ));
                    }
                }
                Some(SqlInfo {
                    text: text.clone(),
                    verb: sql::tag_verb(st),
                    readonly: stmt.readonly(),
                    columns,
                    param_map,
                    pg_params,
                    no_transaction: matches!(w0.as_str(), "VACUUM" | "PRAGMA" | "ANALYZE"),
                })
            }
            _ => None,
        };
        let pg_params = sql.as_ref().map(|s| s.pg_params).unwrap_or(0);
        let mut param_oids = oids.to_vec();
        param_oids.resize(pg_params.max(oids.len()), 0);
        param_oids.truncate(pg_params.max(oids.len().min(pg_params)));
        Ok(Prepared {
            command,
            sql,
            param_oids: Mutex::new(param_oids),
            fixed_types: Mutex::new(None),
        })
    }

    /// Parameter types for ParameterDescription: what Parse said, else
    /// inferred from the columns the parameters meet, else text.
    fn resolve_param_types(&self, stmt: &Prepared) -> Vec<u32> {
        let mut oids = stmt.param_oids.lock().expect("poisoned");
        if let Some(info) = &stmt.sql {
            if oids.contains(&0) {
                let inferred = crate::infer::param_types(&self.conn, &info.text, info.pg_params);
                for (i, o) in oids.iter_mut().enumerate() {
                    if *o == 0 {
                        *o = inferred.get(i).copied().unwrap_or(PgType::Text).oid();
                    }
                }
            }
        }
        oids.clone()
    }

    /// Result column types without running a statement for real: declared
    /// types; for expressions, the first row of a read-only statement
    /// (run and thrown away); else text. `None`: returns no rows.
    fn result_types(
        &mut self,
        stmt: &Prepared,
        params: Option<&[Value]>,
    ) -> Result<Option<Vec<PgType>>, PgError> {
        if !returns_rows(stmt) {
            return Ok(None);
        }
        let cols = columns_of(stmt);
        if let Some(info) = &stmt.sql {
            let all_declared = info.columns.iter().all(|(_, t)| t.is_some());
            if !all_declared && info.readonly && (info.pg_params == 0 || params.is_some()) {
                let mut s = self.conn.prepare_cached(&info.text).map_err(from_sqlite)?;
                if let Some(params) = params {
                    bind_all(&mut s, info, params)?;
                }
                let mut rows = s.raw_query();
                if let Some(row) = rows.next().map_err(from_sqlite)? {
                    return Ok(Some(
                        info.columns
                            .iter()
                            .enumerate()
                            .map(|(i, (_, t))| {
                                t.unwrap_or_else(|| PgType::of_value(row.get_ref_unwrap(i)))
                            })
                            .collect(),
                    ));
                }
            }
            return Ok(Some(
                info.columns
                    .iter()
                    .map(|(_, t)| t.unwrap_or(PgType::Text))
                    .collect(),
            ));
        }
        Ok(Some(vec![PgType::Text; cols.len()]))
    }

    /// Runs a portal: builtins, or SQL through SQLite, sending rows and the
    /// command tag. Returns false after an error (already sent).
    fn execute_portal(
        &mut self,
        portal: &mut Portal,
        max_rows: usize,
        describe: bool,
        extended: bool,
    ) -> bool {
        // A suspended portal continues where it stopped.
        if portal.remaining.is_some() {
            self.continue_portal(portal, max_rows);
            return true;
        }
        if portal.done {
            // PostgreSQL answers an exhausted portal with an empty result.
            let tag = format!(
                "{} 0",
                portal
                    .stmt
                    .sql
                    .as_ref()
                    .map(|s| s.verb.as_str())
                    .unwrap_or("SELECT")
            );
            self.send(B::CommandComplete(CommandComplete::new(tag)));
            return true;
        }
        let command = portal.stmt.command.clone();
        if matches!(self.tx, Tx::Failed { .. }) && !stmt_ends_transaction(&command) {
            let e = PgError::in_failed_transaction();
            if extended {
                self.extended_error(e);
            } else {
                self.send_error(e);
            }
            return false;
        }
        let result = match command {
            Command::Sql(_) => self.run_sql(portal, max_rows, describe, extended),
            other => self.run_builtin(other, describe),
        };
        match result {
            Ok(()) => {
                portal.done = portal.remaining.is_none();
                true
            }
            Err(e) => {
                self.fail_transaction();
                self.send_error(e);
                self.release_gate_if_done(false);
                false
            }
        }
    }

    fn continue_portal(&mut self, portal: &mut Portal, max_rows: usize) {
        let rows = portal.remaining.as_mut().expect("suspended");
        let n = if max_rows == 0 {
            rows.len()
        } else {
            max_rows.min(rows.len())
        };
        let chunk: Vec<DataRow> = rows.drain(..n).collect();
        let more = !rows.is_empty();
        for r in chunk {
            self.send(B::DataRow(r));
        }
        portal.sent += n;
        if more {
            self.send(B::PortalSuspended(PortalSuspended::new()));
        } else {
            portal.remaining = None;
            portal.done = true;
            let tag = format!("SELECT {}", portal.sent);
            self.send(B::CommandComplete(CommandComplete::new(tag)));
        }
    }

    fn arm_deadline(&self) {
        let ms = self.settings.ms("statement_timeout");
        self.shared
            .deadline_ms
            .store(if ms == 0 { 0 } else { now_ms() + ms }, Ordering::SeqCst);
    }

    fn disarm(&self) {
        self.shared.deadline_ms.store(0, Ordering::SeqCst);
        let _ = self.shared.stop.compare_exchange(
            STOP_CANCEL,
            STOP_NONE,
            Ordering::SeqCst,
            Ordering::SeqCst,
        );
        self.shared.busy.store(false, Ordering::SeqCst);
    }

    fn lock_timeout(&self) -> Option<Duration> {
        let ms = self.settings.ms("lock_timeout");
        (ms > 0).then(|| Duration::from_millis(ms))
    }

    /// Why this server refuses writes (a read replica), if it does.
    fn cfg_read_only(&self) -> Option<String> {
        self.cfg.databases.read_only()
    }

    fn acquire_gate(&mut self) -> Result<(), PgError> {
        if self.holds_gate {
            return Ok(());
        }
        let shared = Arc::clone(&self.shared);
        self.lease
            .db
            .gate
            .acquire(self.shared.pid, self.lock_timeout(), &|| {
                shared.should_stop()
            })?;
        self.holds_gate = true;
        Ok(())
    }

    /// Gives the write gate back once SQLite holds no transaction (or
    /// always, when the session ends).
    fn release_gate_if_done(&mut self, force: bool) {
        if self.holds_gate && (force || self.conn.is_autocommit()) {
            if self.conn.is_autocommit() {
                if let Some(a) = &self.lease.db.archiver {
                    // A commit is archived before the next writer can run.
                    if let Err(e) = a.after_write(&self.conn) {
                        tracing::error!(database = %self.lease.db.name, error = %e, "WAL archiving failed");
                    }
                }
            }
            self.lease.db.gate.release(self.shared.pid);
            self.holds_gate = false;
        }
    }

    fn run_sql(
        &mut self,
        portal: &mut Portal,
        max_rows: usize,
        describe: bool,
        extended: bool,
    ) -> Result<(), PgError> {
        let stmt = Arc::clone(&portal.stmt);
        let info = stmt.sql.as_ref().expect("sql");
        // The extended protocol runs statements in an implicit transaction
        // until Sync, as PostgreSQL does.
        if extended && self.tx == Tx::Idle && !info.no_transaction {
            self.begin(Tx::Implicit)?;
        }
        if self.tx != Tx::Idle && info.no_transaction && !info.readonly {
            return Err(PgError::new(
                "25001",
                format!("{} cannot run inside a transaction block", info.verb),
            ));
        }
        self.shared.busy.store(true, Ordering::SeqCst);
        self.arm_deadline();
        let result = if info.readonly {
            Ok(())
        } else if let Some(why) = self.cfg_read_only() {
            Err(PgError::new(
                "25006",
                format!(
                    "cannot execute {} in a read-only transaction: {why}",
                    info.verb
                ),
            ))
        } else {
            self.acquire_gate()
        }
        .and_then(|()| self.stream_rows(portal, info, max_rows, describe, extended));
        self.disarm();
        let count = result?;
        if portal.remaining.is_some() {
            self.continue_portal(portal, max_rows);
        } else {
            let changes = self.conn.changes() as usize;
            let n = if info.columns.is_empty() {
                changes
            } else {
                count
            };
            let tag = match info.verb.as_str() {
                "INSERT" => format!("INSERT 0 {n}"),
                "UPDATE" | "DELETE" => format!("{} {n}", info.verb),
                _ if !info.columns.is_empty() => format!("SELECT {count}"),
                v => v.to_string(),
            };
            self.send(B::CommandComplete(CommandComplete::new(tag)));
        }
        self.release_gate_if_done(false);
        Ok(())
    }

    /// Steps the statement, sending (or, for a row limit, keeping) its rows.
    fn stream_rows(
        &mut self,
        portal: &mut Portal,
        info: &SqlInfo,
        max_rows: usize,
        describe: bool,
        extended: bool,
    ) -> Result<usize, PgError> {
        let Worker {
            conn,
            out,
            out_tx,
            shared,
            closed,
            ..
        } = self;
        let mut s = conn.prepare_cached(&info.text).map_err(from_sqlite)?;
        bind_all(&mut s, info, &portal.params)?;
        let ncols = info.columns.len();
        let mut rows = s.raw_query();
        let first = rows.next().map_err(|e| sqlite_error(shared, e))?;
        let mut count = 0usize;
        if ncols == 0 {
            return Ok(0);
        }
        let types: Vec<PgType> = match &portal.types {
            Some(t) => t.clone(),
            None => info
                .columns
                .iter()
                .enumerate()
                .map(|(i, (_, t))| {
                    t.unwrap_or_else(|| {
                        first
                            .map(|r| PgType::of_value(r.get_ref_unwrap(i)))
                            .unwrap_or(PgType::Text)
                    })
                })
                .collect(),
        };
        if describe || !extended {
            let names: Vec<String> = info.columns.iter().map(|(n, _)| n.clone()).collect();
            out.push(B::RowDescription(row_description(&names, &types, &|c| {
                portal.binary(c)
            })));
        }
        portal.types = Some(types.clone());
        let binary: Vec<bool> = (0..ncols).map(|c| portal.binary(c)).collect();
        let mut stash: Option<VecDeque<DataRow>> = (max_rows > 0).then(VecDeque::new);
        let mut row = first;
        while let Some(r) = row {
            let mut buf = BytesMut::with_capacity(64);
            for (i, ty) in types.iter().enumerate() {
                encode_field(&mut buf, r.get_ref_unwrap(i), *ty, binary[i]).map_err(|e| {
                    let mut pe: PgError = e.into();
                    pe.message = format!("column \"{}\": {}", info.columns[i].0, pe.message);
                    pe
                })?;
            }
            let dr = DataRow::new(buf, ncols as i16);
            match stash.as_mut() {
                Some(st) => st.push_back(dr),
                None => {
                    out.push(B::DataRow(dr));
                    if out.len() >= BATCH {
                        let batch = std::mem::take(out);
                        if out_tx.blocking_send(Out::Messages(batch)).is_err() {
                            shared.terminate();
                            *closed = true;
                            return Err(StopReason::Shutdown.to_error());
                        }
                    }
                }
            }
            count += 1;
            row = rows.next().map_err(|e| sqlite_error(shared, e))?;
        }
        if let Some(stash) = stash {
            portal.remaining = Some(stash);
            portal.sent = 0;
        }
        Ok(count)
    }

    fn begin(&mut self, kind: Tx) -> Result<(), PgError> {
        self.conn.execute_batch("BEGIN").map_err(from_sqlite)?;
        self.tx = kind;
        Ok(())
    }

    fn commit(&mut self) -> Result<(), PgError> {
        let r = if self.conn.is_autocommit() {
            Ok(())
        } else {
            self.conn
                .execute_batch("COMMIT")
                .map_err(|e| sqlite_error(&self.shared, e))
        };
        if r.is_err() && !self.conn.is_autocommit() {
            let _ = self.conn.execute_batch("ROLLBACK");
        }
        self.tx = Tx::Idle;
        self.portals.clear();
        self.release_gate_if_done(false);
        self.cfg.metrics.transaction(r.is_ok());
        r
    }

    fn rollback(&mut self) {
        if !self.conn.is_autocommit() {
            if let Err(e) = self.conn.execute_batch("ROLLBACK") {
                tracing::warn!(error = %e, "rollback failed");
            }
        }
        self.tx = Tx::Idle;
        self.portals.clear();
        self.release_gate_if_done(false);
        self.cfg.metrics.transaction(false);
    }

    fn complete(&mut self, tag: &str) {
        self.send(B::CommandComplete(CommandComplete::new(tag.to_string())));
    }

    fn warn(&mut self, code: &str, msg: &str) {
        let fields = vec![
            (b'S', "WARNING".to_string()),
            (b'V', "WARNING".to_string()),
            (b'C', code.to_string()),
            (b'M', msg.to_string()),
        ];
        self.send(B::NoticeResponse(
            pgwire::messages::response::NoticeResponse::new(fields),
        ));
    }

    fn run_builtin(&mut self, command: Command, describe: bool) -> Result<(), PgError> {
        match command {
            Command::Begin { read_only } => {
                match self.tx {
                    Tx::Explicit => {
                        self.warn("25001", "there is already a transaction in progress")
                    }
                    Tx::Implicit => self.tx = Tx::Explicit,
                    _ => {
                        self.begin(Tx::Explicit)?;
                        if read_only {
                            // SQLite has no read-only transactions; enforce
                            // it with the connection's query_only flag.
                            self.conn
                                .pragma_update(None, "query_only", "on")
                                .map_err(from_sqlite)?;
                        }
                    }
                }
                self.complete("BEGIN");
            }
            Command::Commit => {
                let _ = self.conn.pragma_update(None, "query_only", "off");
                match self.tx {
                    Tx::Idle => {
                        self.warn("25P01", "there is no transaction in progress");
                        self.complete("COMMIT");
                    }
                    Tx::Failed { .. } => {
                        self.rollback();
                        self.complete("ROLLBACK");
                    }
                    _ => {
                        self.commit()?;
                        self.complete("COMMIT");
                    }
                }
            }
            Command::Rollback => {
                let _ = self.conn.pragma_update(None, "query_only", "off");
                if self.tx == Tx::Idle {
                    self.warn("25P01", "there is no transaction in progress");
                }
                self.rollback();
                self.complete("ROLLBACK");
            }
            Command::Savepoint { kind, sql } => {
                if self.tx == Tx::Idle {
                    return Err(PgError::new(
                        "25P01",
                        format!(
                            "{} can only be used in transaction blocks",
                            match kind {
                                SavepointKind::Savepoint => "SAVEPOINT",
                                SavepointKind::Release => "RELEASE SAVEPOINT",
                                SavepointKind::RollbackTo => "ROLLBACK TO SAVEPOINT",
                            }
                        ),
                    ));
                }
                if self.conn.is_autocommit() {
                    // SQLite already rolled the transaction back (an
                    // interrupt, a full disk): no savepoint survives.
                    return Err(PgError::new(
                        "3B001",
                        "the transaction was rolled back; no savepoint exists",
                    )
                    .hint("ROLLBACK and start again."));
                }
                self.conn.execute_batch(&sql).map_err(from_sqlite)?;
                if kind == SavepointKind::RollbackTo {
                    if let Tx::Failed { explicit } = self.tx {
                        self.tx = if explicit { Tx::Explicit } else { Tx::Implicit };
                    }
                }
                self.complete(match kind {
                    SavepointKind::Savepoint => "SAVEPOINT",
                    SavepointKind::Release => "RELEASE",
                    SavepointKind::RollbackTo => "ROLLBACK",
                });
            }
            Command::Set { name, value } => {
                self.set(&name, value)?;
                self.complete("SET");
            }
            Command::Reset { name } => {
                if name == "all" {
                    for n in [
                        "statement_timeout",
                        "lock_timeout",
                        "application_name",
                        "timezone",
                    ] {
                        self.set(n, None)?;
                    }
                } else {
                    self.set(&name, None)?;
                }
                self.complete("RESET");
            }
            Command::Discard => {
                if self.tx != Tx::Idle {
                    return Err(PgError::new(
                        "25001",
                        "DISCARD ALL cannot run inside a transaction block",
                    ));
                }
                self.stmts.retain(|k, _| k.is_empty());
                self.portals.clear();
                self.complete("DISCARD ALL");
            }
            Command::Show { name } => {
                let rows: Vec<(String, String)> = if name == "all" {
                    self.settings
                        .values
                        .iter()
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect()
                } else {
                    let key = if name == "time zone" {
                        "timezone".to_string()
                    } else {
                        name.clone()
                    };
                    match self.settings.get(&key) {
                        Some(v) => vec![(name.clone(), v.clone())],
                        None => {
                            return Err(PgError::new(
                                "42704",
                                format!("unrecognized configuration parameter \"{name}\""),
                            ))
                        }
                    }
                };
                let all = name == "all";
                if describe {
                    let cols: Vec<String> = if all {
                        vec!["name".into(), "setting".into()]
                    } else {
                        vec![name.clone()]
                    };
                    let types = vec![PgType::Text; cols.len()];
                    self.send(B::RowDescription(row_description(&cols, &types, &|_| {
                        false
                    })));
                }
                for (k, v) in rows {
                    let mut buf = BytesMut::new();
                    let mut fields = 1;
                    if all {
                        encode_field(&mut buf, ValueRef::Text(k.as_bytes()), PgType::Text, false)?;
                        fields = 2;
                    }
                    encode_field(&mut buf, ValueRef::Text(v.as_bytes()), PgType::Text, false)?;
                    self.send(B::DataRow(DataRow::new(buf, fields)));
                }
                self.complete("SHOW");
            }
            Command::CreateDatabase { name } => {
                if self.tx != Tx::Idle && self.tx != Tx::Implicit {
                    return Err(PgError::new(
                        "25001",
                        "CREATE DATABASE cannot run inside a transaction block",
                    ));
                }
                self.cfg.databases.create(&name)?;
                self.complete("CREATE DATABASE");
            }
            Command::DropDatabase { name, if_exists } => {
                if self.tx != Tx::Idle && self.tx != Tx::Implicit {
                    return Err(PgError::new(
                        "25001",
                        "DROP DATABASE cannot run inside a transaction block",
                    ));
                }
                let current = self.shared.database.clone();
                if !self
                    .cfg
                    .databases
                    .drop_database(&name, if_exists, &current)?
                {
                    let msg = format!("database \"{name}\" does not exist, skipping");
                    let fields = vec![
                        (b'S', "NOTICE".to_string()),
                        (b'V', "NOTICE".to_string()),
                        (b'C', "00000".to_string()),
                        (b'M', msg),
                    ];
                    self.send(B::NoticeResponse(
                        pgwire::messages::response::NoticeResponse::new(fields),
                    ));
                }
                self.complete("DROP DATABASE");
            }
            Command::Ignored { tag } => {
                if tag.is_empty() {
                    self.send(B::EmptyQueryResponse(EmptyQueryResponse::new()));
                } else {
                    self.complete(&tag);
                }
            }
            Command::Unsupported { what } => {
                return Err(PgError::new("0A000", what));
            }
            Command::Sql(_) => unreachable!("handled by run_sql"),
        }
        Ok(())
    }

    fn set(&mut self, name: &str, value: Option<String>) -> Result<(), PgError> {
        let key = name.to_ascii_lowercase();
        let value = match value {
            Some(v) => v,
            None => self.defaults.get(&key).cloned().unwrap_or_default(),
        };
        let stored = match key.as_str() {
            "statement_timeout"
            | "lock_timeout"
            | "idle_in_transaction_session_timeout"
            | "idle_session_timeout" => parse_duration_ms(&value)
                .ok_or_else(|| {
                    PgError::new(
                        "22023",
                        format!("invalid value for parameter \"{key}\": \"{value}\""),
                    )
                    .hint("Use a number of milliseconds or a unit: 500ms, 5s, 2min.")
                })?
                .to_string(),
            "client_encoding" => {
                let v = value.to_ascii_uppercase().replace('-', "");
                if v != "UTF8" && v != "UNICODE" {
                    return Err(PgError::new(
                        "22023",
                        format!("client encoding \"{value}\" is not supported; atrest speaks UTF8"),
                    ));
                }
                "UTF8".into()
            }
            "standard_conforming_strings" => {
                if !matches!(value.to_ascii_lowercase().as_str(), "on" | "true" | "1") {
                    return Err(PgError::new(
                        "0A000",
                        "standard_conforming_strings cannot be turned off",
                    ));
                }
                "on".into()
            }
            "server_version"
            | "server_version_num"
            | "server_encoding"
            | "is_superuser"
            | "session_authorization"
            | "integer_datetimes"
            | "max_connections" => {
                return Err(PgError::new(
                    "55P02",
                    format!("parameter \"{key}\" cannot be changed"),
                ));
            }
            k if k.starts_with("atrest.") => {
                return Err(PgError::new(
                    "55P02",
                    format!("parameter \"{key}\" cannot be changed"),
                ));
            }
            _ => value,
        };
        self.settings.values.insert(key.clone(), stored.clone());
        if let Some(reported) = Settings::reported_name(&key) {
            self.send(B::ParameterStatus(ParameterStatus::new(
                reported.to_string(),
                stored,
            )));
        }
        Ok(())
    }
}

/// An error from stepping: an interrupt becomes the reason we stopped.
fn sqlite_error(shared: &SessionShared, e: rusqlite::Error) -> PgError {
    if e.sqlite_error_code() == Some(rusqlite::ErrorCode::OperationInterrupted) {
        if let Some(reason) = shared.should_stop() {
            return reason.to_error();
        }
    }
    let mut pe = from_sqlite(e);
    if pe.code == "42000" || pe.code == "XX000" {
        if let Some(reason) = shared.should_stop() {
            pe = reason.to_error();
        }
    }
    pe
}

fn portal_name(n: &Option<String>) -> String {
    n.clone().unwrap_or_default()
}

fn stmt_ends_transaction(c: &Command) -> bool {
    matches!(
        c,
        Command::Commit
            | Command::Rollback
            | Command::Savepoint {
                kind: SavepointKind::RollbackTo,
                ..
            }
    )
}

fn returns_rows(stmt: &Prepared) -> bool {
    match &stmt.command {
        Command::Sql(_) => stmt.sql.as_ref().is_some_and(|s| !s.columns.is_empty()),
        Command::Show { .. } => true,
        _ => false,
    }
}

fn columns_of(stmt: &Prepared) -> Vec<String> {
    match (&stmt.command, &stmt.sql) {
        (_, Some(info)) => info.columns.iter().map(|(n, _)| n.clone()).collect(),
        (Command::Show { name }, _) if name == "all" => vec!["name".into(), "setting".into()],
        (Command::Show { name }, _) => vec![name.clone()],
        _ => vec![],
    }
}

fn row_description(
    cols: &[String],
    types: &[PgType],
    binary: &dyn Fn(usize) -> bool,
) -> RowDescription {
    RowDescription::new(
        cols.iter()
            .zip(types)
            .enumerate()
            .map(|(i, (name, ty))| {
                FieldDescription::new(
                    name.clone(),
                    0,
                    0,
                    ty.oid(),
                    ty.size(),
                    -1,
                    if binary(i) { 1 } else { 0 },
                )
            })
            .collect(),
    )
}

fn bind_all(
    s: &mut rusqlite::CachedStatement<'_>,
    info: &SqlInfo,
    params: &[Value],
) -> Result<(), PgError> {
    for (i, pg) in info.param_map.iter().enumerate() {
        let v = params.get(*pg).ok_or_else(|| {
            PgError::protocol(format!(
                "statement needs parameter ${}, which was not supplied",
                pg + 1
            ))
        })?;
        s.raw_bind_parameter(i + 1, v).map_err(from_sqlite)?;
    }
    Ok(())
}

/// Functions clients expect from PostgreSQL.
fn register_functions(
    conn: &rusqlite::Connection,
    shared: &Arc<SessionShared>,
    cfg: &SessionConfig,
) -> Result<(), PgError> {
    use rusqlite::functions::FunctionFlags;
    let det = FunctionFlags::SQLITE_UTF8 | FunctionFlags::SQLITE_DETERMINISTIC;
    let plain = FunctionFlags::SQLITE_UTF8;
    let version = format!(
        "PostgreSQL {SERVER_VERSION} on SQLite {}, every byte at rest encrypted ({} key)",
        rusqlite::version(),
        cfg.scenario
    );
    conn.create_scalar_function("version", 0, det, move |_| Ok(version.clone()))
        .map_err(from_sqlite)?;
    let db = shared.database.clone();
    conn.create_scalar_function("current_database", 0, det, move |_| Ok(db.clone()))
        .map_err(from_sqlite)?;
    let user = shared.user.clone();
    for f in ["current_user", "session_user", "current_role", "user"] {
        let u = user.clone();
        conn.create_scalar_function(f, 0, det, move |_| Ok(u.clone()))
            .map_err(from_sqlite)?;
    }
    let db2 = shared.database.clone();
    conn.create_scalar_function("current_catalog", 0, det, move |_| Ok(db2.clone()))
        .map_err(from_sqlite)?;
    conn.create_scalar_function("current_schema", 0, det, |_| Ok("public".to_string()))
        .map_err(from_sqlite)?;
    let pid = shared.pid;
    conn.create_scalar_function("pg_backend_pid", 0, det, move |_| Ok(pid as i64))
        .map_err(from_sqlite)?;
    conn.create_scalar_function("now", 0, plain, |_| Ok(crate::resource::now_rfc3339()))
        .map_err(from_sqlite)?;
    conn.create_scalar_function("gen_random_uuid", 0, plain, |_| Ok(crate::resource::uuid()))
        .map_err(from_sqlite)?;
    let s = Arc::clone(shared);
    conn.create_scalar_function("pg_sleep", 1, plain, move |ctx| {
        let secs: f64 = ctx.get(0)?;
        let until = Instant::now() + Duration::from_secs_f64(secs.clamp(0.0, 86_400.0));
        while Instant::now() < until {
            if s.should_stop().is_some() {
                return Err(rusqlite::Error::SqliteFailure(
                    rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_INTERRUPT),
                    Some("interrupted".into()),
                ));
            }
            std::thread::sleep(
                Duration::from_millis(5).min(until.saturating_duration_since(Instant::now())),
            );
        }
        Ok(None::<i64>)
    })
    .map_err(from_sqlite)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_like_postgres() {
        assert_eq!(parse_duration_ms("500"), Some(500));
        assert_eq!(parse_duration_ms("5s"), Some(5000));
        assert_eq!(parse_duration_ms("2min"), Some(120_000));
        assert_eq!(parse_duration_ms("1.5 s"), Some(1500));
        assert_eq!(parse_duration_ms("5 parsecs"), None);
        assert_eq!(parse_duration_ms("x"), None);
    }

    #[test]
    fn cancel_only_hits_a_running_statement() {
        let s = SessionShared::new(1, 2, "u", "d");
        s.cancel();
        assert_eq!(s.should_stop(), None, "no statement ran: nothing to cancel");
        s.busy.store(true, Ordering::SeqCst);
        s.cancel();
        assert_eq!(s.should_stop(), Some(StopReason::Cancel));
        s.terminate();
        assert_eq!(s.should_stop(), Some(StopReason::Shutdown));
    }
}
