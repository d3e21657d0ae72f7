//! Writes marker strings through every path SQLite has to the disk and
//! checks that none of them, nor any SQLite magic, is readable there.

mod common;

use std::sync::{Arc, Mutex};

use atrest_storage::HEADER_LEN;
use common::*;

const SQLITE_MAGIC: &[u8] = b"SQLite format 3\0";
const JOURNAL_MAGIC: [u8; 8] = [0xd9, 0xd5, 0x05, 0xf9, 0x20, 0xa1, 0x63, 0xd7];

fn marker() -> String {
    // Built at run time so the test binary itself never holds it.
    format!("{}-{}", "ZQX", "MARKER-7731")
}

/// Fails if any file in the data directory or its temp directory, or any
/// open temp file, holds a marker or SQLite magic. Returns files scanned.
fn assert_no_plaintext(fx: &Fixture, what: &str) -> usize {
    let m = marker();
    let mut scanned = 0;
    let mut check = |name: &str, bytes: &[u8]| {
        scanned += 1;
        assert!(
            find(bytes, m.as_bytes()).is_none(),
            "{what}: marker in plaintext in {name}"
        );
        assert!(
            find(bytes, SQLITE_MAGIC).is_none(),
            "{what}: SQLite header magic in {name}"
        );
        assert!(
            find(bytes, &JOURNAL_MAGIC).is_none(),
            "{what}: journal magic in {name}"
        );
        for off in [0usize, HEADER_LEN as usize] {
            if bytes.len() >= off + 4 {
                let w = u32::from_be_bytes(bytes[off..off + 4].try_into().unwrap());
                assert!(
                    w & 0xFFFFFFFE != 0x377f0682,
                    "{what}: WAL magic at {off} in {name}"
                );
            }
        }
    };
    for f in files_under(&fx.data()) {
        check(&f.display().to_string(), &std::fs::read(&f).unwrap());
    }
    for (name, bytes) in open_temp_files("atrest-tmp-") {
        check(&name, &bytes);
    }
    scanned
}

fn fill(conn: &rusqlite::Connection, rows: usize) {
    let m = marker();
    conn.execute_batch("CREATE TABLE t(id INTEGER PRIMARY KEY, body TEXT, tag TEXT); CREATE INDEX t_tag ON t(tag);")
        .unwrap();
    let tx = conn.unchecked_transaction().unwrap();
    for i in 0..rows {
        tx.execute(
            "INSERT INTO t(body, tag) VALUES (?1, ?2)",
            (
                format!("{m} body {i} {}", "p".repeat(i % 200)),
                format!("{m}-{:08}", (i * 7919) % rows),
            ),
        )
        .unwrap();
    }
    tx.commit().unwrap();
}

fn table_index_and_wal_before_checkpoint(sc: Scenario) {
    let fx = Fixture::with(sc);
    let engine = fx.engine();
    let conn = engine.connect("wal").unwrap();
    conn.pragma_update(None, "journal_mode", "wal").unwrap();
    conn.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
    fill(&conn, 3000);
    let wal = fx.data().join("wal.db-wal");
    let wal_len = std::fs::metadata(&wal).unwrap().len();
    assert!(
        wal_len > HEADER_LEN + 100_000,
        "WAL should hold the frames: {wal_len} bytes"
    );
    assert!(
        !fx.data().join("wal.db-shm").exists(),
        "no -shm file: the WAL index stays in memory"
    );
    assert_no_plaintext(&fx, "WAL before checkpoint");
    conn.pragma_update(None, "wal_checkpoint", "TRUNCATE")
        .unwrap();
    let n: i64 = conn
        .query_row("SELECT count(*) FROM t WHERE tag >= ?1", [marker()], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(n, 3000);
    assert_no_plaintext(&fx, "after checkpoint");
}

fn rollback_journal_mid_transaction(sc: Scenario) {
    let fx = Fixture::with(sc);
    let engine = fx.engine();
    let conn = engine.connect("journal").unwrap();
    conn.pragma_update(None, "journal_mode", "delete").unwrap();
    conn.pragma_update(None, "cache_size", 20).unwrap();
    fill(&conn, 2000);
    conn.execute_batch("BEGIN; UPDATE t SET body = 'overwritten', tag = 'gone';")
        .unwrap();
    // The transaction is open and has spilled: the journal holds the old
    // pages (full of markers) and the database some new ones.
    let journal = fx.data().join("journal.db-journal");
    let jlen = std::fs::metadata(&journal)
        .expect("journal exists mid-transaction")
        .len();
    assert!(
        jlen > HEADER_LEN + 50_000,
        "journal should hold old pages: {jlen} bytes"
    );
    assert_no_plaintext(&fx, "rollback journal mid-transaction");
    conn.execute_batch("ROLLBACK").unwrap();
    let n: i64 = conn
        .query_row(
            "SELECT count(*) FROM t WHERE body LIKE ?1",
            [format!("{}%", marker())],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(
        n, 2000,
        "rollback restored every row through the encrypted journal"
    );
}

fn sort_spill_and_temp_tables(sc: Scenario) {
    let fx = Fixture::with(sc);
    let engine = fx.engine();
    let conn = engine.connect("sort").unwrap();
    conn.pragma_update(None, "temp_store", "file").unwrap();
    fill(&conn, 20000);
    conn.pragma_update(None, "cache_size", 10).unwrap();

    // A collation runs inside the sorter, also while it merges spilled runs
    // from temp files: look at those files from there.
    let seen = Arc::new(Mutex::new((0usize, 0usize, Vec::<String>::new())));
    let seen2 = Arc::clone(&seen);
    let m = marker();
    let calls = std::sync::atomic::AtomicUsize::new(0);
    conn.create_collation("probe", move |a: &str, b: &str| {
        if calls
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            .is_multiple_of(20000)
        {
            let files = open_temp_files("atrest-tmp-");
            let mut s = seen2.lock().unwrap();
            s.0 += 1;
            s.1 = s.1.max(files.len());
            for (name, bytes) in files {
                if find(&bytes, m.as_bytes()).is_some() {
                    s.2.push(name);
                }
            }
        }
        a.cmp(b)
    })
    .unwrap();
    let rows: i64 = conn
        .query_row(
            "SELECT count(*) FROM (SELECT body FROM t ORDER BY body COLLATE probe DESC)",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(rows, 20000);
    let s = seen.lock().unwrap().clone();
    assert!(s.0 > 0, "collation never probed");
    assert!(
        s.1 > 0,
        "the sort never spilled to a temp file; the test would prove nothing"
    );
    assert!(
        s.2.is_empty(),
        "marker in plaintext in temp files {:?}",
        s.2
    );

    // A materialized CTE bigger than the cache spills to a transient
    // database file; look at it from inside the query that reads it.
    let hits = Arc::new(Mutex::new(None::<(usize, Vec<String>)>));
    let hits2 = Arc::clone(&hits);
    let m2 = marker();
    conn.create_collation("probe_once", move |a: &str, b: &str| {
        let mut h = hits2.lock().unwrap();
        if h.is_none() {
            let files = open_temp_files("atrest-tmp-");
            let bad = files
                .iter()
                .filter(|(_, bytes)| find(bytes, m2.as_bytes()).is_some())
                .map(|(name, _)| name.clone())
                .collect();
            *h = Some((files.len(), bad));
        }
        a.cmp(b)
    })
    .unwrap();
    let before = engine.stats();
    let n: i64 = conn
        .query_row(
            "WITH m AS MATERIALIZED (SELECT body FROM t) SELECT count(*) FROM m WHERE body > '' COLLATE probe_once",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(n, 20000);
    let (files, bad) = hits.lock().unwrap().clone().expect("collation ran");
    assert!(
        files > 0,
        "the materialized view did not spill to a temp file"
    );
    assert!(bad.is_empty(), "marker in plaintext in {bad:?}");
    let used = engine.stats().since(&before);
    assert!(used.files_opened["transient_db"] >= 1, "{used:?}");

    // A temp table bigger than the cache lives in a temp database file.
    conn.execute_batch(
        "CREATE TEMP TABLE tt AS SELECT * FROM t; CREATE INDEX temp.tt_b ON tt(body);",
    )
    .unwrap();
    let open = open_temp_files("atrest-tmp-");
    assert!(!open.is_empty(), "temp table should live in a temp file");
    assert_no_plaintext(&fx, "temp table");
    let n: i64 = conn
        .query_row("SELECT count(*) FROM tt", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 20000);
}

fn every_page_size_round_trips_encrypted(sc: Scenario) {
    let fx = Fixture::with(sc);
    let engine = fx.engine();
    let mut size = 512;
    while size <= 65536 {
        for mode in ["wal", "delete"] {
            let name = format!("p{size}{mode}");
            {
                let conn = engine.connect(&name).unwrap();
                conn.pragma_update(None, "page_size", size).unwrap();
                conn.pragma_update(None, "journal_mode", mode).unwrap();
                fill(&conn, 300);
                let ps: i64 = conn
                    .query_row("PRAGMA page_size", [], |r| r.get(0))
                    .unwrap();
                // SQLite needs 480 usable bytes per page: with 76 reserved
                // bytes (both layers), 512-byte pages are not possible and
                // SQLite keeps a larger page size.
                let want = if sc.infra() { size.max(1024) } else { size };
                assert_eq!(ps, want);
            }
            let conn = engine.connect(&name).unwrap();
            let ok: String = conn
                .query_row("PRAGMA integrity_check", [], |r| r.get(0))
                .unwrap();
            assert_eq!(ok, "ok", "page size {size} {mode}");
            let n: i64 = conn
                .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
                .unwrap();
            assert_eq!(n, 300);
        }
        size *= 2;
    }
    assert_no_plaintext(&fx, "all page sizes");
}

fn vacuum_works_and_page_size_change_is_refused_without_loss(sc: Scenario) {
    let fx = Fixture::with(sc);
    let engine = fx.engine();
    let conn = engine.connect("v").unwrap();
    conn.pragma_update(None, "journal_mode", "delete").unwrap();
    fill(&conn, 500);
    conn.execute_batch("DELETE FROM t WHERE id % 2 = 0; VACUUM;")
        .unwrap();
    conn.pragma_update(None, "page_size", 8192).unwrap();
    let err = conn.execute_batch("VACUUM").unwrap_err();
    let detail = atrest_storage::StorageError::from_sqlite(err).to_string();
    assert!(
        detail.contains("changing the page size") && detail.contains("VACUUM INTO"),
        "{detail}"
    );
    let ok: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(ok, "ok");
    let n: i64 = conn
        .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 250);

    // The supported way: a new database with the new page size.
    let target = fx.data().join("v8k.db");
    conn.execute("VACUUM INTO ?1", [target.to_str().unwrap()])
        .unwrap();
    drop(conn);
    let copy = fx.engine().connect("v8k").unwrap();
    let ps: i64 = copy
        .query_row("PRAGMA page_size", [], |r| r.get(0))
        .unwrap();
    assert_eq!(ps, 8192);
    let ok: String = copy
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(ok, "ok");
    let n: i64 = copy
        .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 250);
    assert_no_plaintext(&fx, "after vacuum");
}

fn mmap_does_not_bypass_the_cipher(sc: Scenario) {
    let fx = Fixture::with(sc);
    let engine = fx.engine();
    let conn = engine.connect("m").unwrap();
    conn.pragma_update(None, "mmap_size", 1i64 << 30).unwrap();
    fill(&conn, 2000);
    drop(conn);
    let conn = engine.connect("m").unwrap();
    conn.pragma_update(None, "mmap_size", 1i64 << 30).unwrap();
    let before = engine.stats();
    let n: i64 = conn
        .query_row(
            "SELECT count(*) FROM t WHERE body LIKE '%body 1999%'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(n, 1);
    let opened = engine.stats().since(&before).units_opened;
    assert!(
        opened > 10,
        "pages must be read and opened through the VFS even with mmap_size set ({opened})"
    );
    assert_no_plaintext(&fx, "mmap");
}

scenarios!(
    table_index_and_wal_before_checkpoint,
    rollback_journal_mid_transaction,
    sort_spill_and_temp_tables,
    every_page_size_round_trips_encrypted,
    vacuum_works_and_page_size_change_is_refused_without_loss,
    mmap_does_not_bypass_the_cipher,
);
