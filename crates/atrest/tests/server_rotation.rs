//! Online DEK rotation against the real server binary: `atrest server
//! rotate-dek` under pgbench load, with the server SIGKILLed at random
//! points 20 times. After each restart the rotation resumes from where it
//! stood (never from the start) and it completes; no transaction fails
//! except those in flight at a kill; every committed transaction is there
//! and the books balance; and no file header names an old DEK afterwards.
//! Also: a DEK that reaches its rotation point is rotated on its own.

mod server_common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use server_common::*;

const SCRIPT: &str = r#"\set aid random(1, 20000)
\set bid random(1, 10)
\set delta random(-5000, 5000)
BEGIN;
UPDATE accounts SET abalance = abalance + :delta WHERE aid = :aid;
UPDATE branches SET bbalance = bbalance + :delta WHERE bid = :bid;
INSERT INTO history (bid, aid, delta) VALUES (:bid, :aid, :delta);
END;
"#;

fn setup(s: &TestServer) {
    s.sql(
        "postgres",
        "CREATE TABLE accounts (aid int PRIMARY KEY, abalance int NOT NULL, filler text);
         CREATE TABLE branches (bid int PRIMARY KEY, bbalance int NOT NULL);
         CREATE TABLE history (bid int, aid int, delta int);
         INSERT INTO accounts SELECT value, 0, printf('%.*c', 400, 'f') FROM generate_series(1, 20000);
         INSERT INTO branches SELECT value, 0 FROM generate_series(1, 10);",
    );
}

fn pgbench_cmd(s: &TestServer, args: &[&str]) -> Command {
    let script = s.tmp.path().join("bench.sql");
    std::fs::write(&script, SCRIPT).unwrap();
    let mut c = Command::new(tool("pgbench"));
    c.args([
        "-n",
        "-f",
        script.to_str().unwrap(),
        "-M",
        "prepared",
        "-j",
        "2",
    ])
    .args(args)
    .arg(
        s.conninfo("postgres", "verify-full")
            .replace("host=127.0.0.1", "host=localhost"),
    )
    .env("PGPASSWORD", PASSWORD);
    c
}

/// Transactions pgbench reports as committed.
fn processed(stdout: &str) -> u64 {
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
        .and_then(|v| v.split('/').next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// The DEK ids (both layers, current and previous) named by the headers
/// of every file in the server's data directory.
fn header_keys(dir: &Path) -> (BTreeSet<String>, usize) {
    let mut keys = BTreeSet::new();
    let mut rotating = 0;
    for entry in std::fs::read_dir(dir.join("data")).unwrap() {
        let p: PathBuf = entry.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        if !(name.ends_with(".db") || name.ends_with(".db-wal")) {
            continue;
        }
        let out = atrest(&["inspect", p.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let h: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        for k in [
            &h["dek_id"],
            &h["infrastructure_layer"]["dek_id"],
            &h["key"]["parent_dek_id"],
            &h["dek_rotation"]["previous_dek_id"],
            &h["dek_rotation"]["previous_infrastructure_dek_id"],
        ] {
            if let Some(id) = k.as_str() {
                keys.insert(id.to_string());
            }
        }
        if !h["dek_rotation"].is_null() {
            rotating += 1;
        }
    }
    (keys, rotating)
}

fn rotation_progress(s: &TestServer) -> serde_json::Value {
    let out = atrest(&[
        "server",
        "status",
        "--data",
        s.dir.to_str().unwrap(),
        "--json",
    ]);
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    st["dek_rotation"]
        .as_array()
        .and_then(|a| a.iter().find(|p| p["database"] == "postgres").cloned())
        .unwrap_or(serde_json::Value::Null)
}

/// The header's record of pages done (the durable progress).
fn pages_done_on_disk(s: &TestServer) -> Option<u64> {
    let out = atrest(&["inspect", s.dir.join("data/postgres.db").to_str().unwrap()]);
    let h: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    h["dek_rotation"]["pages_done"].as_u64()
}

fn set_rotation_config(s: &TestServer, config: serde_json::Value) {
    let path = s.dir.join("server.json");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    v["dek_rotation"] = config;
    std::fs::write(&path, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
}

fn books_balance(s: &TestServer) -> u64 {
    let sums = s.sql(
        "postgres",
        "SELECT (SELECT sum(abalance) FROM accounts) || ' ' || (SELECT sum(bbalance) FROM branches) || ' ' || (SELECT coalesce(sum(delta), 0) FROM history) || ' ' || (SELECT count(*) FROM history)",
    );
    let v: Vec<i64> = sums
        .lines()
        .find(|l| l.trim().split(' ').count() == 4)
        .unwrap_or_else(|| panic!("{sums}"))
        .trim()
        .split(' ')
        .map(|x| x.parse().unwrap())
        .collect();
    assert_eq!(v[0], v[2], "accounts and history disagree: {sums}");
    assert_eq!(v[1], v[2], "branches and history disagree: {sums}");
    v[3] as u64
}

#[test]
fn rotation_under_pgbench_survives_20_kills_and_retires_the_old_deks() {
    let mut s = TestServer::create(&["--infrastructure-encryption"]);
    // Slow enough that every kill lands mid-rotation (sped up below).
    set_rotation_config(
        &s,
        serde_json::json!({"pages_per_second": 25, "auto_at_seals": 1u64 << 31}),
    );
    s.start(&[]);
    setup(&s);
    let (old_keys, rotating) = header_keys(&s.dir);
    assert_eq!(rotating, 0);
    assert!(old_keys.len() >= 2, "{old_keys:?}");

    let out = atrest(&["server", "rotate-dek", "--data", s.dir.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("postgres"));

    let mut committed = 0u64;
    let mut last_done = 0u64;
    let mut resumed_above_zero = 0;
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    for round in 0..20 {
        // A complete run while the rotation works: nothing may fail.
        let out = pgbench_cmd(&s, &["-c", "4", "-t", "25"]).output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success() && stdout.contains("number of failed transactions: 0 "),
            "round {round}: {stdout}\n{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            s.log_text()
        );
        committed += processed(&stdout);

        // Then a run the kill interrupts, at a random point.
        let bench = pgbench_cmd(&s, &["-c", "4", "-T", "30"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        std::thread::sleep(Duration::from_millis(200 + seed % 900));
        let progress = rotation_progress(&s);
        assert!(
            ["rotating", "queued"].contains(&progress["state"].as_str().unwrap_or("")),
            "round {round}: the rotation should be running: {progress}"
        );
        s.kill9();
        let out = bench.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        // Only connection loss: no SQL error from the server.
        assert!(
            !stderr.contains("ERROR:") && !stdout.contains("ERROR:"),
            "round {round}: a transaction failed with a server error:\n{stdout}\n{stderr}"
        );
        committed += processed(&stdout);

        // Durable progress never goes back.
        let done = pages_done_on_disk(&s).expect("the header records a rotation in progress");
        assert!(
            done >= last_done,
            "round {round}: progress went back {last_done} -> {done}"
        );
        if done > 0 {
            resumed_above_zero += 1;
        }
        last_done = done;
        s.start(&[]);
    }
    assert!(
        resumed_above_zero >= 15,
        "the rotation did not make progress across restarts"
    );

    // Left alone (under a little load), at a higher throttle set while it
    // runs, it completes.
    let out = atrest(&[
        "server",
        "rotate-dek",
        "--data",
        s.dir.to_str().unwrap(),
        "--pages-per-second",
        "3000",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let out = pgbench_cmd(&s, &["-c", "2", "-t", "20"]).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
        committed += processed(&String::from_utf8_lossy(&out.stdout));
        let p = rotation_progress(&s);
        if p["state"] == "done" {
            break;
        }
        assert_ne!(p["state"], "failed", "{p}");
        assert!(
            Instant::now() < deadline,
            "rotation did not finish: {p}\n{}",
            s.log_text()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let metrics = s.http_get("/metrics");
    assert!(
        metrics.contains("atrest_dek_rotations_completed_total 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("atrest_dek_rotation_pages_done{database=\"postgres\",state=\"done\"}")
    );

    // Every committed transaction is there; the books balance.
    let rows = books_balance(&s);
    assert!(
        rows >= committed,
        "history has {rows} rows, pgbench committed {committed}"
    );
    assert_eq!(s.sql("postgres", "PRAGMA integrity_check"), "ok");
    assert!(s.stop().success());

    // No header names an old DEK, as current or previous, nor a rotation.
    let (new_keys, rotating) = header_keys(&s.dir);
    assert_eq!(rotating, 0);
    let kept: Vec<_> = old_keys.intersection(&new_keys).collect();
    assert!(kept.is_empty(), "old DEKs still named: {kept:?}");
}

#[test]
fn a_dek_at_its_rotation_point_is_rotated_on_its_own() {
    let mut s = TestServer::create(&[]);
    s.start(&[]);
    setup(&s);
    let (old_keys, _) = header_keys(&s.dir);
    assert!(s.stop().success());
    // A low rotation point stands in for 2^31 seals.
    set_rotation_config(
        &s,
        serde_json::json!({"pages_per_second": 5000, "auto_at_seals": 2000}),
    );
    s.start(&[]);
    let out = pgbench_cmd(&s, &["-c", "2", "-t", "200"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let p = rotation_progress(&s);
        if p["state"] == "done" {
            assert!(p["reason"].as_str().unwrap().contains("automatic"), "{p}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no automatic rotation: {p}\n{}",
            s.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(s.log_text().contains("reached its rotation point"));
    books_balance(&s);
    assert!(s.stop().success());
    let (new_keys, _) = header_keys(&s.dir);
    assert!(old_keys.is_disjoint(&new_keys));
}
