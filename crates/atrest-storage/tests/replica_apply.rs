//! What a read replica does with its source's WAL: transactions are read
//! from a closed copy of the WAL (authenticated frame by frame, decrypted
//! in memory) and applied to another database as one transaction of its
//! own. Readers of the copy see each batch whole; the result matches the
//! source at every boundary, whatever the WAL did (growth, updates,
//! deletes, a VACUUM that shrinks the file); applying again is harmless;
//! a damaged frame is named; and no other statement can reach the raw
//! pages (`sqlite_dbpage`).

mod common;

use std::path::Path;

use common::*;

scenarios!(replica_follows_the_source_wal);

fn dump(c: &rusqlite::Connection) -> Vec<String> {
    let mut out = vec![];
    let tables: Vec<String> = c
        .prepare("SELECT name FROM sqlite_schema WHERE type='table' ORDER BY name")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    for t in tables {
        let mut s = c
            .prepare(&format!("SELECT * FROM \"{t}\" ORDER BY 1"))
            .unwrap();
        let n = s.column_count();
        let rows = s
            .query_map([], |r| {
                Ok((0..n)
                    .map(|i| format!("{:?}", r.get_ref(i).unwrap()))
                    .collect::<Vec<_>>()
                    .join("|"))
            })
            .unwrap();
        for row in rows {
            out.push(format!("{t}: {}", row.unwrap()));
        }
    }
    out
}

fn copy_wal(data: &Path, to: &Path) {
    std::fs::copy(data.join("src.db-wal"), to).unwrap();
}

fn replica_follows_the_source_wal(sc: Scenario) {
    let fx = Fixture::with(sc);
    let engine = fx.engine();
    let src = engine.connect("src").unwrap();
    src.pragma_update(None, "journal_mode", "wal").unwrap();
    src.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
    src.execute_batch(
        "CREATE TABLE t(id INTEGER PRIMARY KEY, body TEXT);
         WITH RECURSIVE n(value) AS (SELECT 1 UNION ALL SELECT value + 1 FROM n WHERE value < 300)
         INSERT INTO t SELECT value, printf('%08d REPLICA-MARKER %s', value, hex(randomblob(200))) FROM n;",
    )
    .unwrap();
    // The base: the source checkpointed and copied, as a backup is.
    src.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .unwrap();
    // The replica's data directory: the same file name (a database file
    // is bound to its name).
    let rdata = fx.dir.path().join("replica-data");
    let replica = fx.engine_at(&rdata);
    std::fs::copy(fx.data().join("src.db"), rdata.join("src.db")).unwrap();
    let rep = replica.connect("src").unwrap();
    rep.pragma_update(None, "journal_mode", "wal").unwrap();
    assert_eq!(dump(&rep), dump(&src));

    let seg = fx.dir.path().join("segment.wal");
    let mut applied = 0u64;
    let steps: &[&str] = &[
        "WITH RECURSIVE n(value) AS (SELECT 301 UNION ALL SELECT value + 1 FROM n WHERE value < 900) INSERT INTO t SELECT value, printf('%08d new %s', value, hex(randomblob(300))) FROM n",
        "UPDATE t SET body = 'changed ' || id WHERE id % 3 = 0",
        "CREATE TABLE u(k TEXT PRIMARY KEY, v BLOB); INSERT INTO u VALUES ('a', randomblob(5000)), ('b', zeroblob(10))",
        "DELETE FROM t WHERE id > 100",
        "DROP TABLE u",
        "VACUUM",
        "INSERT INTO t VALUES (5000, 'after vacuum')",
    ];
    let reader = replica.connect("src").unwrap();
    for (i, step) in steps.iter().enumerate() {
        let before = dump(&reader);
        src.execute_batch(step).unwrap();
        copy_wal(&fx.data(), &seg);
        // A reader in a transaction keeps its snapshot across an apply.
        reader.execute_batch("BEGIN").unwrap();
        assert_eq!(dump(&reader), before);
        let read = engine.read_wal_commits(&seg, applied, 1 << 20).unwrap();
        assert!(!read.commits.is_empty(), "step {i}: no transaction read");
        rep.apply_wal_commits(&read.commits).unwrap();
        applied = read.commits.last().unwrap().end;
        assert_eq!(dump(&reader), before, "step {i}: a snapshot moved");
        reader.execute_batch("COMMIT").unwrap();
        assert_eq!(dump(&reader), dump(&src), "step {i} ({step}) differs");
        // (The applying connection keeps the schema it had; others see
        // the new one: check through a fresh connection.)
        let fresh = replica.connect("src").unwrap();
        let ok: String = fresh
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(ok, "ok", "step {i}");
    }
    let src_pages: i64 = src
        .query_row("PRAGMA page_count", [], |r| r.get(0))
        .unwrap();
    let rep_pages: i64 = reader
        .query_row("PRAGMA page_count", [], |r| r.get(0))
        .unwrap();
    assert_eq!(rep_pages, src_pages, "the VACUUM's shrink was not applied");

    // Nothing new: an empty read, and applying nothing changes nothing.
    let read = engine.read_wal_commits(&seg, applied, 1 << 20).unwrap();
    assert!(read.commits.is_empty());
    // Applying every transaction again, in one call, gives the same state.
    let again = engine.read_wal_commits(&seg, 0, usize::MAX).unwrap();
    assert!(again.commits.len() >= steps.len());
    rep.apply_wal_commits(&again.commits).unwrap();
    assert_eq!(dump(&reader), dump(&src));
    // A bounded read stops at a transaction boundary past the bound.
    let bounded = engine.read_wal_commits(&seg, 0, 1).unwrap();
    assert_eq!(bounded.commits.len(), 1);
    assert!(bounded.commits[0].end > 0);

    // The copy holds no plaintext.
    let bytes = std::fs::read(&seg).unwrap();
    assert!(find(&bytes, b"REPLICA-MARKER").is_none());
    assert!(find(&bytes, b"after vacuum").is_none());

    // A flipped bit in a frame is an error that names the frame.
    let mut damaged = bytes.clone();
    let at = damaged.len() - 100;
    damaged[at] ^= 0x40;
    let bad = fx.dir.path().join("damaged.wal");
    std::fs::write(&bad, &damaged).unwrap();
    let e = engine
        .read_wal_commits(&bad, 0, usize::MAX)
        .err()
        .expect("a damaged frame must not read");
    assert!(e.to_string().contains("frame"), "{e}");

    // The raw pages are out of reach of every other statement.
    for sql in [
        "SELECT data FROM sqlite_dbpage WHERE pgno = 1",
        "INSERT INTO sqlite_dbpage(pgno, data) VALUES (2, zeroblob(4096))",
        "UPDATE sqlite_dbpage SET data = zeroblob(4096) WHERE pgno = 2",
    ] {
        let e = reader.execute_batch(sql).unwrap_err().to_string();
        assert!(
            e.contains("not authorized") || e.contains("prohibited"),
            "{sql}: {e}"
        );
    }
    assert_eq!(dump(&reader), dump(&src));
}
