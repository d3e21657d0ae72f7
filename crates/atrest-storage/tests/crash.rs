//! A writer killed with SIGKILL at random points loses nothing it reported
//! committed, in WAL and in rollback-journal mode.
//!
//! The test binary re-runs itself as the child (`ATREST_CRASH_CHILD`), so
//! the writer is a real separate process using the real engine.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{open_engine, options, Scenario};

/// Kills per journal mode and scenario: 3 modes x 4 scenarios x 15 = 180
/// kills, near the 150 the suite had with one scenario (the CI budget).
const KILLS_PER_MODE: usize = 15;

/// The child: writes transactions forever, printing each committed id.
fn child_main() {
    let data = std::env::var("ATREST_CRASH_DATA").unwrap();
    let keystore = std::env::var("ATREST_CRASH_KEYSTORE").unwrap();
    let mode = std::env::var("ATREST_CRASH_MODE").unwrap();
    let mut next: i64 = std::env::var("ATREST_CRASH_START")
        .unwrap()
        .parse()
        .unwrap();
    let sc = Scenario::from_name(&std::env::var("ATREST_CRASH_SCENARIO").unwrap_or_default());
    let root = std::path::PathBuf::from(&data);
    let root = root.parent().unwrap();
    assert_eq!(std::path::PathBuf::from(keystore), root.join("keystore"));
    let engine = open_engine(root, sc);
    assert_eq!(engine.infrastructure_encryption(), sc.infra());
    let conn = engine.connect("crash").unwrap();
    // "delete-16k": rollback journal with 16 KiB pages, whose writes span
    // several page-cache pages and can be torn by the kill.
    let (mode, page_size) = match mode.strip_suffix("-16k") {
        Some(m) => (m.to_string(), 16384),
        None => (mode, 4096),
    };
    conn.pragma_update(None, "page_size", page_size).unwrap();
    conn.pragma_update(None, "journal_mode", &mode).unwrap();
    // A tiny cache makes transactions spill pages before commit.
    conn.pragma_update(None, "cache_size", 8).unwrap();
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, payload BLOB NOT NULL, n INTEGER NOT NULL);
         CREATE INDEX IF NOT EXISTS t_n ON t(n);",
    )
    .unwrap();
    let stdout = std::io::stdout();
    let mut rng = (next as u64)
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    loop {
        rng = rng
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let rows = 1 + (rng >> 60) as i64; // 1..16 rows per transaction
        let tx = conn.unchecked_transaction().unwrap();
        let first = next;
        for _ in 0..rows {
            let len = 50 + ((rng >> 20) % 3000) as usize;
            tx.execute(
                "INSERT INTO t(id, payload, n) VALUES (?1, ?2, ?3)",
                (next, vec![(next % 251) as u8; len], next % 97),
            )
            .unwrap();
            next += 1;
        }
        // Touch older rows too, so commits rewrite existing pages.
        tx.execute("UPDATE t SET n = n + 1 WHERE id % 53 = ?1", [first % 53])
            .unwrap();
        tx.commit().unwrap();
        let mut out = stdout.lock();
        writeln!(out, "COMMITTED {first} {}", next - 1).unwrap();
        out.flush().unwrap();
    }
}

fn run_mode(mode: &str, sc: Scenario) {
    let fx_dir = tempfile::tempdir().unwrap();
    let opts = options(fx_dir.path(), sc);
    drop(open_engine(fx_dir.path(), sc));
    let exe = std::env::current_exe().unwrap();
    let mut committed: Vec<(i64, i64)> = vec![];
    let mut next_start = 1i64;
    let mut rng: u64 = 0x9E3779B97F4A7C15 ^ mode.len() as u64;
    for kill in 0..KILLS_PER_MODE {
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "sigkill_child_entry",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("ATREST_CRASH_CHILD", "1")
            .env("ATREST_CRASH_DATA", &opts.data_dir)
            .env("ATREST_CRASH_KEYSTORE", opts.keystore_dir.as_ref().unwrap())
            .env("ATREST_CRASH_MODE", mode)
            .env("ATREST_CRASH_SCENARIO", sc.name())
            .env("ATREST_CRASH_START", next_start.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (first_tx, first_rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            let mut seen = vec![];
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(rest) = line.strip_prefix("COMMITTED ") {
                    let mut it = rest.split(' ').map(|x| x.parse::<i64>().unwrap());
                    seen.push((it.next().unwrap(), it.next().unwrap()));
                    if seen.len() == 1 {
                        let _ = first_tx.send(());
                    }
                }
            }
            seen
        });
        // Kill at a random point of the writing, not of the start-up.
        first_rx
            .recv_timeout(Duration::from_secs(30))
            .expect("child committed nothing within 30 s");
        rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1);
        std::thread::sleep(Duration::from_millis((rng >> 33) % 150));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let seen = reader.join().unwrap();
        committed.extend(&seen);

        let engine = open_engine(fx_dir.path(), sc);
        let conn = engine.connect("crash").unwrap();
        let ok: String = conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(ok, "ok", "{mode}: integrity after kill {kill}");
        let table_exists: i64 = conn
            .query_row(
                "SELECT count(*) FROM sqlite_schema WHERE name = 't'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        if table_exists == 1 {
            for &(a, b) in &committed {
                let n: i64 = conn
                    .query_row(
                        "SELECT count(*) FROM t WHERE id BETWEEN ?1 AND ?2",
                        [a, b],
                        |r| r.get(0),
                    )
                    .unwrap();
                assert_eq!(
                    n,
                    b - a + 1,
                    "{mode}: committed rows {a}..={b} lost after kill {kill}"
                );
            }
            let max: Option<i64> = conn
                .query_row("SELECT max(id) FROM t", [], |r| r.get(0))
                .unwrap();
            next_start = max.unwrap_or(0) + 1;
        } else {
            assert!(committed.is_empty(), "{mode}: table missing after commits");
        }
    }
    let total: i64 = committed.iter().map(|(a, b)| b - a + 1).sum();
    assert!(
        committed.len() >= KILLS_PER_MODE,
        "{mode}: too few commits ({}) to mean anything",
        committed.len()
    );
    eprintln!(
        "{mode} ({sc:?}): {KILLS_PER_MODE} kills, {} transactions ({total} rows) verified",
        committed.len()
    );
}

#[test]
fn sigkill_child_entry() {
    // Runs as the writer only when re-executed by the tests below.
    if std::env::var_os("ATREST_CRASH_CHILD").is_some() {
        child_main();
    }
}

fn sigkill_during_writes_wal_mode(sc: Scenario) {
    run_mode("wal", sc);
}

fn sigkill_during_writes_rollback_journal_mode(sc: Scenario) {
    run_mode("delete", sc);
}

fn sigkill_during_writes_rollback_journal_mode_16k_pages(sc: Scenario) {
    run_mode("delete-16k", sc);
}

scenarios!(
    sigkill_during_writes_wal_mode,
    sigkill_during_writes_rollback_journal_mode,
    sigkill_during_writes_rollback_journal_mode_16k_pages,
);
