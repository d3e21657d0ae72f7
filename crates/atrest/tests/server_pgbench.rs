//! pgbench against the real server: custom script, simple and extended
//! protocol, 8 clients, zero failed transactions, and the books balance.

mod server_common;

use std::process::Command;

use server_common::*;

const SCRIPT: &str = r#"\set aid random(1, 1000)
\set bid random(1, 10)
\set delta random(-5000, 5000)
BEGIN;
UPDATE accounts SET abalance = abalance + :delta WHERE aid = :aid;
SELECT abalance FROM accounts WHERE aid = :aid;
UPDATE branches SET bbalance = bbalance + :delta WHERE bid = :bid;
INSERT INTO history (bid, aid, delta, mtime) VALUES (:bid, :aid, :delta, CURRENT_TIMESTAMP);
END;
"#;

fn pgbench(s: &TestServer, mode: &str, clients: u32, txns: u32) -> String {
    let script = s.tmp.path().join("bench.sql");
    std::fs::write(&script, SCRIPT).unwrap();
    let out = Command::new(tool("pgbench"))
        .args(["-n", "-f", script.to_str().unwrap(), "-M", mode])
        .args([
            "-c",
            &clients.to_string(),
            "-j",
            "2",
            "-t",
            &txns.to_string(),
        ])
        .arg(
            s.conninfo("postgres", "verify-full")
                .replace("host=127.0.0.1", "host=localhost"),
        )
        .env("PGPASSWORD", PASSWORD)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "pgbench -M {mode} failed:\n{stdout}\n{}\nserver log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        s.log_text()
    );
    stdout
}

#[test]
fn pgbench_simple_extended_and_prepared_with_zero_failures() {
    let mut s = TestServer::create(&[]);
    s.start(&[]);
    s.sql(
        "postgres",
        "CREATE TABLE accounts (aid int PRIMARY KEY, abalance int NOT NULL, filler text);
         CREATE TABLE branches (bid int PRIMARY KEY, bbalance int NOT NULL);
         CREATE TABLE history (bid int, aid int, delta int, mtime timestamp);
         INSERT INTO accounts SELECT value, 0, printf('%.*c', 80, ' ') FROM generate_series(1, 1000);
         INSERT INTO branches SELECT value, 0 FROM generate_series(1, 10);",
    );
    let (clients, txns) = (8u32, 150u32);
    let mut total = 0;
    for mode in ["simple", "extended", "prepared"] {
        let out = pgbench(&s, mode, clients, txns);
        let want = clients * txns;
        assert!(
            out.contains(&format!(
                "number of transactions actually processed: {want}/{want}"
            )),
            "{out}"
        );
        assert!(
            out.contains("number of failed transactions: 0 (0.000%)"),
            "{out}"
        );
        total += want;
    }
    // Every committed transaction is there exactly once, and the balances
    // equal the history: nothing lost, nothing applied twice.
    assert_eq!(
        s.sql("postgres", "SELECT count(*) FROM history"),
        total.to_string()
    );
    let sums = s.sql(
        "postgres",
        "SELECT (SELECT sum(delta) FROM history) = (SELECT sum(abalance) FROM accounts)
            AND (SELECT sum(delta) FROM history) = (SELECT sum(bbalance) FROM branches)",
    );
    assert_eq!(sums, "1");
    assert_eq!(s.sql("postgres", "PRAGMA integrity_check"), "ok");
    assert!(s.stop().success());
}
