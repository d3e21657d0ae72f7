//! Read replicas against the real binaries: a replica made from a running
//! source (through `replica allow` and a token, over a TCP relay that
//! records every byte) follows it under pgbench while each is killed with
//! SIGKILL in turn, and ends with exactly the source's transactions; it
//! refuses writes; neither its directory nor the recorded stream holds
//! plaintext; promoted, it takes writes and outlives its deleted source.

mod server_common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use server_common::*;

const SCRIPT: &str = r#"\set aid random(1, 500)
\set bid random(1, 5)
\set delta random(-5000, 5000)
BEGIN;
UPDATE accounts SET abalance = abalance + :delta WHERE aid = :aid;
UPDATE branches SET bbalance = bbalance + :delta WHERE bid = :bid;
INSERT INTO history (bid, aid, delta, note) VALUES (:bid, :aid, :delta, 'REPLMARKER-pgbench');
END;
"#;

/// A TCP relay to the source's current port that records both directions.
fn relay(target: Arc<AtomicU16>, capture: Arc<Mutex<Vec<u8>>>) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            let Ok(up) = TcpStream::connect(("127.0.0.1", target.load(Ordering::SeqCst))) else {
                continue;
            };
            for (mut from, mut to) in [(c.try_clone().unwrap(), up.try_clone().unwrap()), (up, c)] {
                let cap = Arc::clone(&capture);
                std::thread::spawn(move || {
                    let mut buf = [0u8; 65536];
                    loop {
                        match from.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                cap.lock().unwrap().extend_from_slice(&buf[..n]);
                                if to.write_all(&buf[..n]).is_err() {
                                    break;
                                }
                            }
                        }
                    }
                    let _ = to.shutdown(std::net::Shutdown::Both);
                });
            }
        }
    });
    port
}

/// What must match between source and replica.
const SUMMARY: &str = "SELECT (SELECT count(*) || ' ' || coalesce(sum(delta), 0) || ' ' || coalesce(sum(aid * 7 + bid), 0) FROM history) || ' / ' || (SELECT sum(abalance) FROM accounts) || ' / ' || (SELECT sum(bbalance) FROM branches) || ' / ' || (SELECT count(*) FROM ticks)";

#[test]
fn replica_follows_through_kills_refuses_writes_and_promotes() {
    let mut source = TestServer::create(&[]);
    source.start(&[]);
    source.sql(
        "postgres",
        "CREATE TABLE accounts (aid int PRIMARY KEY, abalance int NOT NULL);
         CREATE TABLE branches (bid int PRIMARY KEY, bbalance int NOT NULL);
         CREATE TABLE history (bid int, aid int, delta int, note text);
         CREATE TABLE ticks (n int PRIMARY KEY, note text);
         INSERT INTO accounts SELECT value, 0 FROM generate_series(1, 500);
         INSERT INTO branches SELECT value, 0 FROM generate_series(1, 5);
         INSERT INTO ticks VALUES (0, 'REPLMARKER-base');",
    );
    let target = Arc::new(AtomicU16::new(source.port));
    let capture = Arc::new(Mutex::new(Vec::new()));
    let relay_port = relay(Arc::clone(&target), Arc::clone(&capture));

    // Without a token the source refuses.
    let token = source.tmp.path().join("replica.token");
    let rdir = source.tmp.path().join("replica");
    let addr = format!("127.0.0.1:{relay_port}");
    std::fs::write(&token, "not-a-token").unwrap();
    let create = |token: &std::path::Path| {
        atrest(&[
            "server",
            "replica",
            "create",
            "--source",
            &addr,
            "--source-ca",
            source.ca().to_str().unwrap(),
            "--token-file",
            token.to_str().unwrap(),
            "--name",
            "replica-1",
            "--data",
            rdir.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ])
    };
    let out = create(&token);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not allowed to follow"), "{err}");
    assert!(!rdir.exists(), "a refused create left a directory");

    let out = atrest(&[
        "server",
        "replica",
        "allow",
        "--data",
        source.dir.to_str().unwrap(),
        "--name",
        "replica-1",
        "--token-out",
        token.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut bench = pgbench_script(&source, SCRIPT, 4, 300);
    let out = create(&token);
    assert!(
        out.status.success(),
        "replica create: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let mut replica = TestServer::existing(rdir.clone(), source.keystore.clone());
    replica.start(&[]);
    assert!(bench.wait().unwrap().success());

    // Rounds: pgbench on the source, and one of the two killed mid-way.
    let mut committed_rounds = 0;
    for round in 0..6 {
        let bench = pgbench_script(&source, SCRIPT, 4, 200);
        std::thread::sleep(Duration::from_millis(300 + 150 * (round % 4)));
        if round % 2 == 0 {
            replica.kill9();
            replica.start(&[]);
            let out = bench.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stdout)
            );
            committed_rounds += 1;
        } else {
            source.kill9();
            let _ = bench.wait_with_output();
            source.start(&[]);
            target.store(source.port, Ordering::SeqCst);
        }
    }
    assert_eq!(committed_rounds, 3);
    source.sql(
        "postgres",
        "INSERT INTO ticks VALUES (1, 'REPLMARKER-last')",
    );
    let want = source.sql("postgres", SUMMARY);
    let lag = replica.wait_sql(SUMMARY, &want, Duration::from_secs(30));
    eprintln!("replica caught up {lag:?} after the last commit");
    let history: i64 = source
        .sql("postgres", "SELECT count(*) FROM history")
        .parse()
        .unwrap();
    assert!(history >= 300 * 4 + 3 * 200 * 4, "history {history}");
    assert_eq!(replica.sql("postgres", "PRAGMA integrity_check"), "ok");

    // Writes are refused with the reason.
    let out = replica.psql("postgres", &["-c", "INSERT INTO ticks VALUES (2, 'x')"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("read replica"), "{err}");
    // Status shows the lag.
    let st = atrest(&["server", "status", "--data", rdir.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&st.stdout);
    assert!(text.contains("replication: postgres lag 0 bytes"), "{text}");

    // No plaintext in the replica's files or on the wire.
    for (p, bytes) in files_under(&rdir) {
        assert!(
            !contains(&bytes, b"REPLMARKER"),
            "plaintext in {}",
            p.display()
        );
    }
    let wire = capture.lock().unwrap().clone();
    assert!(wire.len() > 1 << 20, "only {} bytes relayed", wire.len());
    assert!(!contains(&wire, b"REPLMARKER"), "plaintext on the wire");

    // Promote: writes are taken; the source can go.
    let out = atrest(&[
        "server",
        "replica",
        "promote",
        "--data",
        rdir.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    replica.sql("postgres", "INSERT INTO ticks VALUES (2, 'after promote')");
    source.stop();
    let out = atrest(&[
        "server",
        "delete",
        "--data",
        source.dir.to_str().unwrap(),
        "--yes",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    replica.stop();
    replica.start(&[]);
    assert_eq!(
        replica.sql("postgres", "SELECT count(*) FROM history"),
        history.to_string()
    );
    assert_eq!(replica.sql("postgres", "SELECT count(*) FROM ticks"), "3");
    replica.sql("postgres", "INSERT INTO ticks VALUES (3, 'after restart')");
}

fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> Option<String>) {
    let t0 = Instant::now();
    loop {
        match f() {
            None => return,
            Some(state) => assert!(t0.elapsed() < limit, "{what} not within {limit:?}: {state}"),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn replica_status(dir: &std::path::Path) -> serde_json::Value {
    serde_json::from_str(&atrest_ok(&[
        "server",
        "status",
        "--data",
        dir.to_str().unwrap(),
        "--json",
    ]))
    .unwrap()
}

#[test]
fn new_databases_are_followed_and_retention_keeps_what_a_stopped_replica_needs() {
    let mut source = TestServer::create(&[]);
    // Keep one backup: without replicas, every older segment would go.
    let cfg_path = source.dir.join("server.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    config["backup"]["retain_count"] = 1.into();
    std::fs::write(&cfg_path, config.to_string()).unwrap();
    source.start(&[]);
    let sdir = source.dir.to_str().unwrap().to_string();
    source.sql(
        "postgres",
        "CREATE TABLE t (n int, note text); INSERT INTO t SELECT value, 'REPLMARKER' FROM generate_series(1, 100);",
    );
    let rdir = source.tmp.path().join("replica");
    let rd = rdir.to_str().unwrap().to_string();
    atrest_ok(&[
        "server",
        "replica",
        "create",
        "--source",
        &sdir,
        "--name",
        "replica-r1",
        "--data",
        &rd,
        "--listen",
        "127.0.0.1:0",
    ]);
    let mut replica = TestServer::existing(rdir.clone(), source.keystore.clone());
    replica.start(&[]);
    let count = |s: &TestServer, db: &str, table: &str| {
        let out = s.psql(db, &["-c", &format!("SELECT count(*) FROM {table}")]);
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    wait_until("the replica's first rows", Duration::from_secs(20), || {
        (count(&replica, "postgres", "t") != "100").then(|| count(&replica, "postgres", "t"))
    });

    // The replica is down while the source writes, makes a database and
    // takes backups that retire the replica's base backup.
    replica.stop();
    let held: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(rdir.join("replica/positions.json")).unwrap(),
    )
    .unwrap();
    let held_seq = held["postgres"]["seq"].as_u64().unwrap();
    let archive = source.dir.join("backups/wal/postgres");
    let segment = |seq: u64| archive.join(format!("{seq:020}.wal"));
    let rows = "INSERT INTO t SELECT value, 'REPLMARKER' FROM generate_series";
    source.sql("postgres", &format!("{rows}(101, 150)"));
    // A restart starts a new WAL generation: the next backup's archive
    // begins after the segment the replica stands in.
    source.stop();
    source.start(&[]);
    source.sql("postgres", &format!("{rows}(151, 200)"));
    source.sql("postgres", "CREATE DATABASE shop");
    source.sql(
        "shop",
        "CREATE TABLE orders (id int PRIMARY KEY, item text); INSERT INTO orders SELECT value, 'REPLMARKER-shop' FROM generate_series(1, 50);",
    );
    atrest_ok(&["server", "backup", "--data", &sdir]);
    source.sql("postgres", "INSERT INTO t VALUES (201, 'between backups')");
    source.sql("shop", "INSERT INTO orders VALUES (51, 'between backups')");
    atrest_ok(&["server", "backup", "--data", &sdir]);
    let list: serde_json::Value =
        serde_json::from_str(&atrest_ok(&["server", "backup", "list", "--data", &sdir])).unwrap();
    assert_eq!(list["backups"].as_array().unwrap().len(), 1, "{list}");
    // Only the replica holds the segment: the one backup left starts later.
    let from = list["backups"][0]["databases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == "postgres")
        .unwrap()["archive_from"]
        .as_u64()
        .unwrap();
    assert!(
        from > held_seq,
        "backup archive from {from}, replica at {held_seq}"
    );
    assert!(
        segment(held_seq).exists(),
        "retention removed segment {held_seq}, which the stopped replica has still to read"
    );

    // Back up, it catches up with both databases.
    replica.start(&[]);
    wait_until("the replica catching up", Duration::from_secs(30), || {
        let (a, b) = (
            count(&replica, "postgres", "t"),
            count(&replica, "shop", "orders"),
        );
        (a != "201" || b != "51").then(|| format!("t {a}, orders {b}\n{}", replica.log_text()))
    });
    assert_eq!(
        replica.sql("shop", "SELECT sum(id) || ' ' || max(item) FROM orders"),
        source.sql("shop", "SELECT sum(id) || ' ' || max(item) FROM orders")
    );
    assert_eq!(replica.sql("shop", "PRAGMA integrity_check"), "ok");
    for (p, bytes) in files_under(&rdir) {
        assert!(
            !contains(&bytes, b"REPLMARKER"),
            "plaintext in {}",
            p.display()
        );
    }
    // A database the source drops goes on the replica too.
    source.sql("postgres", "DROP DATABASE shop");
    wait_until("the replica dropping shop", Duration::from_secs(20), || {
        let out = replica.psql("shop", &["-c", "SELECT 1"]);
        out.status.success().then(|| "shop still there".to_string())
    });

    // Disallowed, the replica no longer holds segments back, and is told.
    atrest_ok(&[
        "server",
        "replica",
        "disallow",
        "--data",
        &sdir,
        "--name",
        "replica-r1",
    ]);
    wait_until(
        "the replica seeing it is refused",
        Duration::from_secs(20),
        || {
            let st = replica_status(&rdir);
            let e = st["replica"]["databases"]["postgres"]["last_error"].to_string();
            (!e.contains("not allowed to follow")).then_some(e)
        },
    );
    let held: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(rdir.join("replica/positions.json")).unwrap(),
    )
    .unwrap();
    let held_seq = held["postgres"]["seq"].as_u64().unwrap();
    source.stop();
    source.start(&[]);
    source.sql("postgres", "INSERT INTO t VALUES (202, 'after disallow')");
    atrest_ok(&["server", "backup", "--data", &sdir]);
    assert!(
        !segment(held_seq).exists(),
        "segment {held_seq} was kept for a replica that may no longer follow"
    );
    // Allowed again, it finds that what it needs is gone, and says so.
    atrest_ok(&[
        "server",
        "replica",
        "allow",
        "--data",
        &sdir,
        "--name",
        "replica-r1",
        "--token-out",
        rdir.join("replica/token").to_str().unwrap(),
    ]);
    wait_until(
        "the replica seeing its segment is gone",
        Duration::from_secs(20),
        || {
            let st = replica_status(&rdir);
            let e = st["replica"]["databases"]["postgres"]["last_error"].to_string();
            (!e.contains("create it again")).then_some(e)
        },
    );
    assert_eq!(count(&replica, "postgres", "t"), "201");
}
