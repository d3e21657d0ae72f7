//! WAL recovery after a close without checkpoint, for write patterns that
//! make SQLite rewrite frames and their checksums.

mod common;
use common::*;

/// With a tiny cache, a transaction spills pages to the WAL and then
/// changes them again: SQLite overwrites those frames, writes later frame
/// headers with zero salts and rewrites every checksum at commit. All of it
/// must recover.
#[test]
fn overwritten_frames_and_rewritten_checksums_recover() {
    let fx = Fixture::new();
    let engine = fx.engine();
    {
        let conn = engine.connect("w").unwrap();
        conn.pragma_update(None, "journal_mode", "wal").unwrap();
        conn.pragma_update(None, "cache_size", 8).unwrap();
        conn.set_db_config(
            rusqlite::config::DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE,
            true,
        )
        .unwrap();
        conn.execute_batch(
            "CREATE TABLE t(id INTEGER PRIMARY KEY, p BLOB, n INT); CREATE INDEX tn ON t(n);",
        )
        .unwrap();
        let mut id = 0;
        for _ in 0..20 {
            let tx = conn.unchecked_transaction().unwrap();
            for _ in 0..10 {
                id += 1;
                tx.execute(
                    "INSERT INTO t VALUES (?1, ?2, ?3)",
                    (id, vec![1u8; 2000], id % 97),
                )
                .unwrap();
            }
            tx.execute("UPDATE t SET n = n + 1 WHERE id % 53 = 1", [])
                .unwrap();
            tx.commit().unwrap();
        }
    }
    assert!(std::fs::metadata(fx.data().join("w.db-wal")).unwrap().len() > 100_000);
    let conn = engine.connect("w").unwrap();
    let (n, s): (i64, i64) = conn
        .query_row("SELECT count(*), sum(n) FROM t", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap();
    assert_eq!(n, 200);
    let expected: i64 = (1..=200i64).map(|id| id % 97).sum::<i64>()
        + (1..=200i64)
            .filter(|id| id % 53 == 1)
            .map(|id| 20 - (id - 1) / 10)
            .sum::<i64>();
    assert_eq!(s, expected, "every committed update must survive recovery");
    let ok: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(ok, "ok");
}
