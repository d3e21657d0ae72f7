//! Many connections of one engine on one database at once: shared file
//! state (keys, WAL salts and durable mark, seal counters) stays coherent.

mod common;

use std::sync::{Arc, Barrier};

use common::*;

#[test]
fn concurrent_writers_and_readers_on_one_wal_database() {
    let fx = Fixture::new();
    let engine = fx.engine();
    {
        let conn = engine.connect("c").unwrap();
        conn.pragma_update(None, "journal_mode", "wal").unwrap();
        conn.pragma_update(None, "wal_autocheckpoint", 50).unwrap();
        conn.execute_batch("CREATE TABLE t(w INTEGER, i INTEGER, v TEXT, PRIMARY KEY (w, i));")
            .unwrap();
    }
    const WRITERS: i64 = 3;
    const READERS: usize = 3;
    const TXNS: i64 = 150;
    let start = Arc::new(Barrier::new(WRITERS as usize + READERS));
    let mut handles = vec![];
    for w in 0..WRITERS {
        let (engine, start) = (engine.clone(), Arc::clone(&start));
        handles.push(std::thread::spawn(move || {
            let conn = engine.connect("c").unwrap();
            conn.pragma_update(None, "cache_size", 10).unwrap();
            start.wait();
            for i in 0..TXNS {
                let tx = conn.unchecked_transaction().unwrap();
                tx.execute(
                    "INSERT INTO t VALUES (?1, ?2, ?3)",
                    (w, i, "x".repeat(300 + (i as usize % 700))),
                )
                .unwrap();
                tx.execute(
                    "UPDATE t SET v = v || 'y' WHERE w = ?1 AND i = ?2 / 2",
                    (w, i),
                )
                .unwrap();
                tx.commit().unwrap();
            }
        }));
    }
    for _ in 0..READERS {
        let (engine, start) = (engine.clone(), Arc::clone(&start));
        handles.push(std::thread::spawn(move || {
            let conn = engine.connect("c").unwrap();
            start.wait();
            let mut last = 0i64;
            for _ in 0..200 {
                // A reader sees a consistent, growing snapshot.
                let n: i64 = conn
                    .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
                    .unwrap();
                assert!(n >= last, "row count went backwards: {last} -> {n}");
                last = n;
                let bad: i64 = conn
                    .query_row("SELECT count(*) FROM t WHERE length(v) < 300", [], |r| {
                        r.get(0)
                    })
                    .unwrap();
                assert_eq!(bad, 0);
            }
        }));
    }
    for h in handles {
        h.join().unwrap();
    }
    drop(engine);
    let conn = fx.engine().connect("c").unwrap();
    let n: i64 = conn
        .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, WRITERS * TXNS);
    let ok: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(ok, "ok");
}
