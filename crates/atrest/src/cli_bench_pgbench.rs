//! `atrest bench pgbench`: the real `pgbench` against real `atrest server`
//! processes, one per side, in one run:
//!
//! * **plain**: the same server serving plain, unencrypted SQLite files
//!   (only in builds with the benchmark-only cargo feature
//!   `plaintext-baseline`; skipped otherwise);
//! * **scenario 1**: service key (AES-256-GCM data layer);
//! * **scenario 2**: service key + infrastructure layer (AEGIS-256X2);
//! * **scenario 4**: customer key in a real vault process (RSA-2048,
//!   RSA-OAEP-256 wrapKey/unwrapKey over HTTPS) + infrastructure layer.
//!
//! Every server gets the same dataset, small enough to stay in SQLite's
//! page cache (cache-sized), and the same TPC-B-like custom script (the
//! built-in one uses PostgreSQL-only syntax). All servers run for the whole
//! bench; the order of the sides rotates every round and the median TPS of
//! the rounds counts. Overheads are in time per transaction:
//! `tps_reference / tps_side - 1`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use atrest_server::keys::{self, Target};
use atrest_server::resource::{self, CreateOptions};
use serde_json::json;

use crate::cli_bench_cmk::{open_databases, setup_with, Env, PASSWORD};

#[derive(clap::Args)]
pub struct PgbenchBench {
    /// Seconds per pgbench run.
    #[arg(long, default_value_t = 15)]
    pub seconds: u64,
    /// Rounds; each runs every side once, in a rotated order.
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
    /// pgbench clients (-c); pgbench uses 2 threads (-j 2).
    #[arg(long, default_value_t = 4)]
    pub clients: u32,
    /// Rows in `accounts` (about 100 bytes each); the default keeps the
    /// working set inside the server's SQLite page cache.
    #[arg(long, default_value_t = 10_000)]
    pub accounts: u64,
    /// Scratch directory (default: a new temporary directory).
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Side {
    Plain,
    S1,
    S2,
    S4,
}

impl Side {
    fn key(self) -> &'static str {
        match self {
            Side::Plain => "plain",
            Side::S1 => "scenario1",
            Side::S2 => "scenario2",
            Side::S4 => "scenario4",
        }
    }
    fn describe(self) -> &'static str {
        match self {
            Side::Plain => "plain SQLite files, no encryption (benchmark-only build feature plaintext-baseline)",
            Side::S1 => "service key: AES-256-GCM data layer",
            Side::S2 => "service key + infrastructure layer (AEGIS-256X2)",
            Side::S4 => "customer key in the vault (RSA-2048, RSA-OAEP-256 over HTTPS) + infrastructure layer",
        }
    }
}

pub(crate) const SCRIPT: &str = r#"\set aid random(1, :accounts)
\set bid random(1, 10)
\set delta random(-5000, 5000)
BEGIN;
UPDATE accounts SET abalance = abalance + :delta WHERE aid = :aid;
SELECT abalance FROM accounts WHERE aid = :aid;
UPDATE branches SET bbalance = bbalance + :delta WHERE bid = :bid;
INSERT INTO history (bid, aid, delta, mtime) VALUES (:bid, :aid, :delta, CURRENT_TIMESTAMP);
END;
"#;

const SCHEMA: &str =
    "CREATE TABLE accounts (aid INT PRIMARY KEY, abalance INT NOT NULL, filler TEXT);
     CREATE TABLE branches (bid INT PRIMARY KEY, bbalance INT NOT NULL);
     CREATE TABLE history (bid INT, aid INT, delta INT, mtime TIMESTAMP);";

/// A server process serving one side.
pub(crate) struct Server {
    side: Side,
    pub(crate) dir: PathBuf,
    child: Child,
    pub(crate) port: u16,
    pub(crate) log: PathBuf,
    /// Keeps scenario 4's vault process alive.
    _vault: Option<Env>,
}

impl Drop for Server {
    fn drop(&mut self) {
        // SIGTERM (graceful stop), then SIGKILL if it does not exit.
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn load(conn: &rusqlite::Connection, accounts: u64) -> Result<()> {
    conn.execute_batch(SCHEMA)?;
    let tx = conn.unchecked_transaction()?;
    {
        let mut st = tx.prepare("INSERT INTO accounts VALUES (?1, 0, ?2)")?;
        let filler = " ".repeat(80);
        for aid in 1..=accounts {
            st.execute((aid as i64, &filler))?;
        }
        let mut st = tx.prepare("INSERT INTO branches VALUES (?1, 0)")?;
        for bid in 1..=10 {
            st.execute([bid])?;
        }
    }
    tx.commit()?;
    Ok(())
}

/// Creates the server resource of `side` under `root` with the dataset
/// loaded, and for scenario 4 the vault and the customer key.
pub(crate) fn prepare(root: &Path, side: Side, accounts: u64) -> Result<(PathBuf, Option<Env>)> {
    if side == Side::S4 {
        let env = setup_with(root, "bench-s4", true)?;
        let mut config = resource::load_config(&env.dir)?;
        let dbs = open_databases(&env.dir, &config)?;
        {
            let (_l, c) = dbs
                .connect("postgres")
                .map_err(|e| anyhow::anyhow!(e.message))?;
            load(&c, accounts)?;
        }
        keys::switch(
            &env.dir,
            &mut config,
            &dbs,
            Target::Customer {
                key: env.key.clone(),
                login: env.login.clone(),
            },
        )
        .map_err(|e| anyhow::anyhow!(e))?;
        return Ok((env.dir.clone(), Some(env)));
    }
    let base = root.join(side.key());
    let dir = base.join("server");
    atrest_server::provision::create(&CreateOptions {
        name: format!("bench-{}", side.key()),
        dir: dir.clone(),
        admin_user: "atrest".into(),
        admin_password: Some(zeroize::Zeroizing::new(PASSWORD.to_string())),
        keystore_dir: Some(base.join("keystore")),
        default_listen: Some("127.0.0.1:0".into()),
        infrastructure_encryption: side == Side::S2,
        infra_keystore_dir: (side == Side::S2).then(|| base.join("infra-keystore")),
        engine: Default::default(),
        postgres: None,
        ..Default::default()
    })?;
    let config = resource::load_config(&dir)?;
    if side == Side::Plain {
        // Replace the encrypted default database by a plain SQLite one.
        let data = dir.join(resource::DATA_SUBDIR);
        for suffix in ["", "-wal", "-journal"] {
            let _ = std::fs::remove_file(data.join(format!("postgres.db{suffix}")));
        }
        let c = rusqlite::Connection::open(data.join("postgres.db"))?;
        c.pragma_update(None, "journal_mode", "wal")?;
        load(&c, accounts)?;
    } else {
        let dbs = open_databases(&dir, &config)?;
        let (_l, c) = dbs
            .connect("postgres")
            .map_err(|e| anyhow::anyhow!(e.message))?;
        load(&c, accounts)?;
    }
    Ok((dir, None))
}

pub(crate) fn start(side: Side, dir: PathBuf, vault: Option<Env>) -> Result<Server> {
    let log = dir.with_file_name(format!("{}-server.log", side.key()));
    let log_file = std::fs::File::create(&log)?;
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args(["server", "start", "--data"])
        .arg(&dir)
        .args(["--listen", "127.0.0.1:0"])
        .stdout(Stdio::null())
        .stderr(log_file);
    if side == Side::Plain {
        #[cfg(feature = "plaintext-baseline")]
        cmd.env(atrest_server::listener::PLAINTEXT_BASELINE_ENV, "1");
    }
    let child = cmd.spawn().context("starting atrest server")?;
    let mut server = Server {
        side,
        dir,
        child,
        port: 0,
        log,
        _vault: vault,
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(text) = std::fs::read_to_string(server.dir.join("state.json")) {
            let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
            if v["state"] == "Ready" && v["pid"] == server.child.id() {
                server.port = v["listen"]
                    .as_str()
                    .and_then(|a| a.rsplit(':').next())
                    .and_then(|p| p.parse().ok())
                    .unwrap_or(0);
                return Ok(server);
            }
        }
        if let Some(st) = server.child.try_wait()? {
            bail!(
                "{:?} server exited ({st}) during start:\n{}",
                side,
                std::fs::read_to_string(&server.log).unwrap_or_default()
            );
        }
        if Instant::now() > deadline {
            bail!(
                "{side:?} server did not become Ready:\n{}",
                std::fs::read_to_string(&server.log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// pgbench running `script` for `seconds` against the server on `port`
/// (plaintext on loopback), with `-M prepared -j 2` and `-D` variables.
pub(crate) fn pgbench_command(
    port: u16,
    script: &Path,
    clients: u32,
    seconds: u64,
    vars: &[String],
) -> Command {
    let mut cmd = Command::new("pgbench");
    cmd.args(["-n", "-f"])
        .arg(script)
        .args(["-M", "prepared", "-j", "2"])
        .args(["-c", &clients.to_string()])
        .args(["-T", &seconds.to_string()]);
    for v in vars {
        cmd.args(["-D", v]);
    }
    cmd.arg(format!(
        "host=127.0.0.1 port={port} user=atrest dbname=postgres sslmode=disable"
    ))
    .env("PGPASSWORD", PASSWORD);
    cmd
}

/// The TPS of a finished pgbench run, or why it failed (a failed
/// transaction fails the run).
pub(crate) fn pgbench_tps(out: &std::process::Output) -> Result<f64> {
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || !text.contains("number of failed transactions: 0 ") {
        bail!(
            "pgbench failed:\n{text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    text.lines()
        .find_map(|l| {
            l.strip_prefix("tps = ")
                .and_then(|r| r.split_whitespace().next())
                .and_then(|v| v.parse().ok())
        })
        .ok_or_else(|| anyhow::anyhow!("no tps in pgbench output:\n{text}"))
}

fn pgbench(s: &Server, b: &PgbenchBench, script: &Path) -> Result<f64> {
    let out = pgbench_command(
        s.port,
        script,
        b.clients,
        b.seconds,
        &[format!("accounts={}", b.accounts)],
    )
    .output()
    .context("running pgbench (Debian: apt-get install postgresql-client)")?;
    pgbench_tps(&out).with_context(|| {
        format!(
            "pgbench against {:?}; server log:\n{}",
            s.side,
            std::fs::read_to_string(&s.log).unwrap_or_default()
        )
    })
}

/// Whether the side's database file on disk is plain SQLite.
fn is_plain_sqlite(dir: &Path) -> Result<bool> {
    let mut head = [0u8; 16];
    let f = std::fs::File::open(dir.join(resource::DATA_SUBDIR).join("postgres.db"))?;
    std::io::Read::read_exact(&mut &f, &mut head)?;
    Ok(&head == b"SQLite format 3\0")
}

pub fn run(b: PgbenchBench) -> Result<std::process::ExitCode> {
    let tmp;
    let root = match &b.dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => {
            tmp = tempfile::tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    let mut sides = vec![];
    if cfg!(feature = "plaintext-baseline") {
        sides.push(Side::Plain);
    } else {
        eprintln!("bench: no plain baseline: this build lacks the benchmark-only feature plaintext-baseline (cargo build --release -p atrest --features plaintext-baseline)");
    }
    sides.extend([Side::S1, Side::S2, Side::S4]);
    let mut servers = vec![];
    for &side in &sides {
        eprintln!("bench: preparing {} ({})", side.key(), side.describe());
        let (dir, vault) = prepare(&root, side, b.accounts)?;
        servers.push(start(side, dir, vault)?);
    }
    // Every side must be what it claims: plain files for the baseline,
    // none for the others.
    for s in &servers {
        let plain = is_plain_sqlite(&s.dir)?;
        if plain != (s.side == Side::Plain) {
            bail!(
                "{:?}: database file is {}plain SQLite",
                s.side,
                if plain { "" } else { "not " }
            );
        }
    }
    let script = root.join("bench.sql");
    std::fs::write(&script, SCRIPT)?;
    let mut tps: Vec<Vec<f64>> = vec![vec![]; servers.len()];
    for round in 0..b.repeat {
        for k in 0..servers.len() {
            let i = (round + k) % servers.len();
            let t = pgbench(&servers[i], &b, &script)?;
            eprintln!(
                "bench: round {} {}: {t:.1} tps",
                round + 1,
                servers[i].side.key()
            );
            tps[i].push(t);
        }
    }
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let med: Vec<f64> = tps.iter().map(|v| median(v)).collect();
    let of = |side: Side| servers.iter().position(|s| s.side == side).map(|i| med[i]);
    // Extra time per transaction of `x` over `reference`, in percent.
    let overhead = |x: Option<f64>, reference: Option<f64>| match (x, reference) {
        (Some(x), Some(r)) if x > 0.0 => Some(100.0 * (r / x - 1.0)),
        _ => None,
    };
    let mut sides_json = serde_json::Map::new();
    for (i, s) in servers.iter().enumerate() {
        sides_json.insert(
            s.side.key().into(),
            json!({
                "description": s.side.describe(),
                "tps": tps[i],
                "tps_median": med[i],
                "overhead_vs_scenario1_pct": overhead(Some(med[i]), of(Side::S1)),
                "overhead_vs_plain_pct": overhead(Some(med[i]), of(Side::Plain)),
            }),
        );
    }
    let doc = json!({
        "benchmark": "pgbench",
        "pgbench": format!(
            "-n -M prepared -c {} -j 2 -T {}, custom TPC-B-like script (2 updates, 1 select, 1 insert per transaction), {} accounts (cache-sized)",
            b.clients, b.seconds, b.accounts
        ),
        "script": SCRIPT,
        "rounds": b.repeat,
        "order": "rotated each round",
        "overhead_definition": "extra time per transaction: tps_reference / tps_side - 1",
        "server": "atrest server start (separate process per side), plaintext allowed on loopback (sslmode=disable), SQLite defaults (WAL, synchronous=FULL, 2 MB page cache)",
        "sides": sides_json,
    });
    println!("{}", serde_json::to_string_pretty(&doc)?);
    let pct = |x: Option<f64>| {
        x.map(|x| format!("{x:+.1}%"))
            .unwrap_or_else(|| "n/a".into())
    };
    let tps_of = |side: Side| {
        of(side)
            .map(|t| format!("{t:.0}"))
            .unwrap_or_else(|| "n/a".into())
    };
    println!(
        "summary: pgbench tps (median of {}) plain={} s1={} s2={} s4={}; vs scenario 1: s2 {} s4 {}; vs plain: s1 {} s2 {} s4 {}",
        b.repeat,
        tps_of(Side::Plain),
        tps_of(Side::S1),
        tps_of(Side::S2),
        tps_of(Side::S4),
        pct(overhead(of(Side::S2), of(Side::S1))),
        pct(overhead(of(Side::S4), of(Side::S1))),
        pct(overhead(of(Side::S1), of(Side::Plain))),
        pct(overhead(of(Side::S2), of(Side::Plain))),
        pct(overhead(of(Side::S4), of(Side::Plain))),
    );
    drop(servers);
    Ok(std::process::ExitCode::SUCCESS)
}
