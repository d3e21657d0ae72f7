//! WAL recovery after a close without checkpoint, for write patterns that
//! make SQLite rewrite frames and their checksums.

mod common;
use common::*;

/// With a tiny cache, a transaction spills pages to the WAL and then
/// changes them again: SQLite overwrites those frames, writes later frame
/// headers with zero salts and rewrites every checksum at commit. All of it
/// must recover.
fn overwritten_frames_and_rewritten_checksums_recover(sc: Scenario) {
    let fx = Fixture::with(sc);
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

/// The WAL's durable mark covers complete, synced commits only: frames of a
/// rolled-back transaction past it may be damaged (they read as an
/// uncommitted tail, as SQLite itself treats them), frames before it may not.
fn the_durable_mark_covers_committed_frames_only(sc: Scenario) {
    let fx = Fixture::with(sc);
    let engine = fx.engine();
    {
        let conn = engine.connect("d").unwrap();
        conn.pragma_update(None, "journal_mode", "wal").unwrap();
        conn.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
        conn.pragma_update(None, "cache_size", 5).unwrap();
        conn.set_db_config(
            rusqlite::config::DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE,
            true,
        )
        .unwrap();
        conn.execute_batch("CREATE TABLE t(id INTEGER PRIMARY KEY, p BLOB);")
            .unwrap();
        conn.execute("INSERT INTO t VALUES (1, zeroblob(100))", [])
            .unwrap();
        // A big transaction spills frames to the WAL, then rolls back.
        conn.execute_batch("BEGIN;").unwrap();
        for i in 10..400 {
            conn.execute("INSERT INTO t VALUES (?1, zeroblob(3000))", [i])
                .unwrap();
        }
        conn.execute_batch("ROLLBACK;").unwrap();
        conn.execute("INSERT INTO t VALUES (2, zeroblob(100))", [])
            .unwrap();
    }
    let wal = fx.data().join("d.db-wal");
    let bytes = std::fs::read(&wal).unwrap();
    // WAL layout: header, sealed WAL header (32 + ov), then frames of
    // salts (8) + frame header and page sealed as one unit (24 + 4096).
    let pframe = 8 + 24 + 4096;
    let frame = |i: usize| atrest_storage::HEADER_LEN as usize + 32 + fx.ov() + i * pframe;
    let physical_frames = (bytes.len() - frame(0)) / pframe;
    let durable = atrest_storage::inspect(&wal).unwrap()["wal_durable_frames"]
        .as_u64()
        .unwrap() as usize;
    assert!(
        durable >= 2,
        "committed frames must be marked durable ({durable})"
    );
    assert!(
        durable + 20 < physical_frames,
        "rolled-back frames must not count: durable {durable} of {physical_frames} frames"
    );
    let db = std::fs::read(fx.data().join("d.db")).unwrap();

    // Damage past the mark: a rolled-back frame. Reads as the log's end.
    let mut past = bytes.clone();
    past[frame(durable + 10) + 200] ^= 1;
    std::fs::write(&wal, &past).unwrap();
    let conn = engine.connect("d").unwrap();
    let ids: Vec<i64> = conn
        .prepare("SELECT id FROM t ORDER BY id")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(ids, vec![1, 2]);
    drop(conn);

    // Damage before the mark: a committed frame. Reported, not skipped.
    std::fs::write(fx.data().join("d.db"), &db).unwrap();
    let mut before = bytes.clone();
    before[frame(durable - 1) + 30] ^= 1; // in the frame header part
    std::fs::write(&wal, &before).unwrap();
    let err = engine
        .connect("d")
        .and_then(|c| {
            c.query_row("SELECT count(*) FROM t", [], |r| r.get::<_, i64>(0))
                .map_err(atrest_storage::StorageError::from_sqlite)
        })
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&format!("WAL frame {durable} ")) && err.contains("failed authentication"),
        "{err}"
    );
}

/// A WAL in the older layout (header format 1 or 3: frame header and page
/// sealed as two units) is refused with an error naming the layout, never
/// misread: the database does not open until it is dealt with.
fn an_old_format_wal_is_refused_clearly(sc: Scenario) {
    let fx = Fixture::with(sc);
    let engine = fx.engine();
    {
        let conn = engine.connect("o").unwrap();
        conn.pragma_update(None, "journal_mode", "wal").unwrap();
        conn.set_db_config(
            rusqlite::config::DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE,
            true,
        )
        .unwrap();
        conn.execute_batch("CREATE TABLE t(x); INSERT INTO t VALUES (1), (2);")
            .unwrap();
    }
    let wal = fx.data().join("o.db-wal");
    let mut bytes = std::fs::read(&wal).unwrap();
    let old: u16 = if sc.infra() { 3 } else { 1 };
    for slot in bytes[..atrest_storage::HEADER_LEN as usize].chunks_mut(4096) {
        if slot.iter().any(|&b| b != 0) {
            assert_eq!(&slot[8..10], &4u16.to_be_bytes(), "WALs are format 4");
            slot[8..10].copy_from_slice(&old.to_be_bytes());
        }
    }
    std::fs::write(&wal, &bytes).unwrap();
    let err = engine
        .connect("o")
        .and_then(|c| {
            c.query_row("SELECT count(*) FROM t", [], |r| r.get::<_, i64>(0))
                .map_err(atrest_storage::StorageError::from_sqlite)
        })
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("o.db-wal")
            && err.contains(&format!("format version {old}"))
            && err.contains("one unit"),
        "{err}"
    );
}

scenarios!(
    overwritten_frames_and_rewritten_checksums_recover,
    the_durable_mark_covers_committed_frames_only,
    an_old_format_wal_is_refused_clearly,
);
