//! Backups, the WAL archive and restore, against the real server binary:
//! a backup under pgbench load restores every committed transaction;
//! point-in-time restore holds exactly what was committed by then (times
//! taken by the client); nothing in the repository is plaintext; verify
//! and restore name a tampered file and page.

mod server_common;

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use server_common::*;

const SCRIPT: &str = r#"\set aid random(1, 500)
\set bid random(1, 5)
\set delta random(-5000, 5000)
BEGIN;
UPDATE accounts SET abalance = abalance + :delta WHERE aid = :aid;
UPDATE branches SET bbalance = bbalance + :delta WHERE bid = :bid;
INSERT INTO history (bid, aid, delta, note) VALUES (:bid, :aid, :delta, 'BKMARKER-pgbench');
END;
"#;

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

fn setup_tables(s: &TestServer) {
    s.sql(
        "postgres",
        "CREATE TABLE accounts (aid int PRIMARY KEY, abalance int NOT NULL);
         CREATE TABLE branches (bid int PRIMARY KEY, bbalance int NOT NULL);
         CREATE TABLE history (bid int, aid int, delta int, note text);
         CREATE TABLE ticks (n int PRIMARY KEY, note text);
         INSERT INTO accounts SELECT value, 0 FROM generate_series(1, 500);
         INSERT INTO branches SELECT value, 0 FROM generate_series(1, 5);",
    );
}

fn finish(child: std::process::Child) -> String {
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "pgbench failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("number of failed transactions: 0 (0.000%)"),
        "{text}"
    );
    text
}

/// One tick: (n, time before the INSERT was sent, time after COMMIT returned).
fn tick(s: &TestServer, n: u32) -> (u32, u64, u64) {
    let before = now_us();
    s.sql(
        "postgres",
        &format!("INSERT INTO ticks VALUES ({n}, 'BKMARKER-tick-{n}')"),
    );
    (n, before, now_us())
}

fn run_err(args: &[&str]) -> String {
    let out = atrest(args);
    assert!(!out.status.success(), "atrest {args:?} should have failed");
    String::from_utf8_lossy(&out.stderr).to_string()
}

fn restore(src: &TestServer, backup: &Path, name: &str, to_time: Option<u64>) -> TestServer {
    let dir = src.tmp.path().join(name);
    let from = backup.to_str().unwrap().to_string();
    let mut args = vec![
        "server",
        "restore",
        "--from",
        &from,
        "--name",
        name,
        "--data",
        dir.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ];
    let t;
    if let Some(us) = to_time {
        t = format!("{}.{:06}", us / 1_000_000, us % 1_000_000);
        args.extend(["--to-time", &t]);
    }
    atrest_ok(&args);
    TestServer::existing(dir, src.keystore.clone())
}

fn count(s: &TestServer, sql: &str) -> i64 {
    s.sql("postgres", sql).parse().unwrap()
}

/// The books balance: every history row's delta is in the balances.
fn assert_consistent(s: &TestServer) -> i64 {
    assert_eq!(s.sql("postgres", "PRAGMA integrity_check"), "ok");
    let h = count(s, "SELECT count(*) FROM history");
    let sum_h = count(s, "SELECT coalesce(sum(delta), 0) FROM history");
    assert_eq!(count(s, "SELECT sum(abalance) FROM accounts"), sum_h);
    assert_eq!(count(s, "SELECT sum(bbalance) FROM branches"), sum_h);
    h
}

fn latest_backup(s: &TestServer) -> PathBuf {
    let v: serde_json::Value = serde_json::from_str(&atrest_ok(&[
        "server",
        "backup",
        "list",
        "--data",
        s.dir.to_str().unwrap(),
    ]))
    .unwrap();
    let id = v["backups"].as_array().unwrap().last().unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    s.dir.join("backups/backups").join(id)
}

#[test]
fn backup_under_load_then_full_and_point_in_time_restores() {
    let mut s = TestServer::create(&[]);
    s.start(&[]);
    setup_tables(&s);

    // A backup while pgbench writes, ticks before and after it.
    let bench = pgbench_script(&s, SCRIPT, 4, 400);
    let mut ticks = vec![];
    for n in 0..5 {
        ticks.push(tick(&s, n));
    }
    let taken: serde_json::Value = serde_json::from_str(&atrest_ok(&[
        "server",
        "backup",
        "--data",
        s.dir.to_str().unwrap(),
    ]))
    .unwrap();
    let point = taken["time_unix_us"].as_u64().unwrap();
    for n in 5..40 {
        ticks.push(tick(&s, n));
        std::thread::sleep(Duration::from_millis(30));
    }
    finish(bench);
    let total = assert_consistent(&s);
    assert_eq!(total, 1600);
    let backup = latest_backup(&s);

    // Nothing in the repository (backups and WAL archive) is plaintext.
    let repo = s.dir.join("backups");
    let files = files_under(&repo);
    // Several WAL generations were archived (checkpoints ran under load).
    let segments = files
        .iter()
        .filter(|(p, _)| p.extension().is_some_and(|e| e == "wal"))
        .count();
    assert!(segments >= 2, "{segments} archive segments");
    for (p, bytes) in &files {
        assert!(
            !contains(bytes, b"BKMARKER"),
            "plaintext in {}",
            p.display()
        );
    }

    // verify: every page and frame authenticates.
    let v = atrest_ok(&[
        "server",
        "backup",
        "verify",
        "--data",
        s.dir.to_str().unwrap(),
    ]);
    assert!(v.contains("pages_and_frames"), "{v}");

    // A point in time between two ticks after the backup.
    let (_, _, after20) = ticks[20];
    let (_, before21, _) = ticks[21];
    assert!(before21 > after20);
    let t = after20 + (before21 - after20) / 2;

    // Full restore (the whole archive): everything, and the books balance.
    let mut full = restore(&s, &backup, "full-copy", None);
    // The copy seals under new DEKs from the start, never its source's:
    // a rotation has begun, with the source's DEK as the previous one.
    let dek = |dir: &Path| -> serde_json::Value {
        let out = atrest(&["inspect", dir.join("data/postgres.db").to_str().unwrap()]);
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let (src_dek, copy_dek) = (dek(&s.dir), dek(&full.dir));
    assert_ne!(copy_dek["dek_id"], src_dek["dek_id"]);
    assert!(!copy_dek["dek_rotation"].is_null(), "{copy_dek}");
    full.start(&[]);
    assert_eq!(assert_consistent(&full), total);
    assert_eq!(count(&full, "SELECT count(*) FROM ticks"), 40);
    // ... and the server's rotation re-seals the restored pages.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !dek(&full.dir)["dek_rotation"].is_null() {
        assert!(std::time::Instant::now() < deadline, "{}", full.log_text());
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(assert_consistent(&full), total);
    full.stop();
    let done = dek(&full.dir);
    assert_ne!(done["dek_id"], src_dek["dek_id"]);

    // Point-in-time: exactly the ticks committed by t.
    let mut pitr = restore(&s, &backup, "pitr-copy", Some(t));
    pitr.start(&[]);
    let have: Vec<u32> = pitr
        .sql("postgres", "SELECT n FROM ticks ORDER BY n")
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    assert_eq!(have, (0..=20).collect::<Vec<_>>());
    let h = assert_consistent(&pitr);
    assert!(h <= total);
    pitr.stop();

    // Restoring to the backup point itself: every transaction committed
    // before the backup started is there (ticks 0-4 ended before it).
    let mut at_point = restore(&s, &backup, "point-copy", Some(point));
    at_point.start(&[]);
    let n = count(&at_point, "SELECT count(*) FROM ticks");
    assert!((5..=5 + 1).contains(&n), "{n} ticks at the backup point");
    assert_consistent(&at_point);
    at_point.stop();

    // Before the backup point: refused, saying why.
    let e = run_err(&[
        "server",
        "restore",
        "--from",
        backup.to_str().unwrap(),
        "--to-time",
        &format!("{}", point / 1_000_000 - 60),
        "--name",
        "too-early",
        "--data",
        s.tmp.path().join("too-early").to_str().unwrap(),
    ]);
    assert!(e.contains("before the point of backup"), "{e}");
    assert!(!s.tmp.path().join("too-early/server.json").exists());

    // Tamper with one page of the backup: verify and restore name it.
    let db = backup.join("postgres.db");
    let mut bytes = std::fs::read(&db).unwrap();
    let off = 8192 + 200; // page 1
    bytes[off] ^= 0x01;
    std::fs::write(&db, &bytes).unwrap();
    let e = run_err(&[
        "server",
        "backup",
        "verify",
        "--data",
        s.dir.to_str().unwrap(),
    ]);
    assert!(e.contains("postgres.db") && e.contains("page 1"), "{e}");
    let e = run_err(&[
        "server",
        "restore",
        "--from",
        backup.to_str().unwrap(),
        "--name",
        "from-tampered",
        "--data",
        s.tmp.path().join("from-tampered").to_str().unwrap(),
    ]);
    assert!(
        e.contains("page 1") && e.contains("failed authentication"),
        "{e}"
    );
    s.stop();
}

#[test]
fn offline_backup_retention_and_a_client_cannot_checkpoint() {
    let mut s = TestServer::create(&[]);
    s.start(&[]);
    setup_tables(&s);
    let out = s.psql("postgres", &["-c", "PRAGMA wal_checkpoint(TRUNCATE)"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("managed by the server"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    s.sql("postgres", "INSERT INTO ticks VALUES (1, 'one')");
    s.stop();
    // A stopped server is backed up offline, the same way.
    let dir = s.dir.to_str().unwrap().to_string();
    atrest_ok(&["server", "backup", "--data", &dir]);
    s.start(&[]);
    s.sql("postgres", "INSERT INTO ticks VALUES (2, 'two')");
    atrest_ok(&["server", "backup", "--data", &dir]);
    atrest_ok(&["server", "backup", "--data", &dir]);
    let list: serde_json::Value =
        serde_json::from_str(&atrest_ok(&["server", "backup", "list", "--data", &dir])).unwrap();
    assert_eq!(list["backups"].as_array().unwrap().len(), 3);
    let first = list["backups"][0]["id"].as_str().unwrap().to_string();
    s.stop();

    // Keep two: the oldest goes, with the archive only it needed.
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(s.dir.join("server.json")).unwrap()).unwrap();
    config["backup"]["retain_count"] = 2.into();
    std::fs::write(s.dir.join("server.json"), config.to_string()).unwrap();
    atrest_ok(&["server", "backup", "--data", &dir]);
    let list: serde_json::Value =
        serde_json::from_str(&atrest_ok(&["server", "backup", "list", "--data", &dir])).unwrap();
    let ids: Vec<&str> = list["backups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 2);
    assert!(!ids.contains(&first.as_str()));
    assert!(!s.dir.join("backups/backups").join(&first).exists());
    // The newest backup restores with both rows.
    let backup = latest_backup(&s);
    let mut r = restore(&s, &backup, "kept-copy", None);
    r.start(&[]);
    assert_eq!(r.sql("postgres", "SELECT count(*) FROM ticks"), "2");
    r.stop();
}
