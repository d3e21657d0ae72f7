//! Online DEK rotation of a database: new DEKs (both layers) seal every
//! unit from the start of the rotation, the pages are re-sealed in batches
//! while a writer and a reader carry on, and at the end no header, of the
//! database or its WAL, holds the old keys. A reopened engine resumes a
//! rotation where it stood; damage found on the way is named; a page
//! sealed under the retired DEK is refused afterwards.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::*;

scenarios!(rotation_under_load_retires_every_old_key);

fn wal_connection(engine: &atrest_storage::Engine) -> atrest_storage::Connection {
    let c = engine.connect("db").unwrap();
    c.pragma_update(None, "journal_mode", "wal").unwrap();
    c.busy_timeout(std::time::Duration::from_secs(10)).unwrap();
    c
}

/// The ids of the data-layer and infrastructure DEKs a header names, and
/// any previous ones.
fn key_ids(engine: &atrest_storage::Engine, path: &Path) -> (Vec<String>, Vec<String>) {
    let h = engine.inspect(path).unwrap();
    assert_eq!(h["header_verified"], true, "{h}");
    let mut current = vec![h["dek_id"].as_str().unwrap().to_string()];
    if let Some(i) = h["infrastructure_layer"]["dek_id"].as_str() {
        current.push(i.to_string());
    }
    if let Some(p) = h["key"]["parent_dek_id"].as_str() {
        current.push(p.to_string());
    }
    let mut previous = vec![];
    if let Some(r) = h["dek_rotation"].as_object() {
        previous.push(r["previous_dek_id"].as_str().unwrap().to_string());
        if let Some(i) = r["previous_infrastructure_dek_id"].as_str() {
            previous.push(i.to_string());
        }
    }
    (current, previous)
}

fn fill(c: &rusqlite::Connection, from: i64, to: i64) {
    c.execute_batch("BEGIN").unwrap();
    for i in from..to {
        c.execute(
            "INSERT INTO t VALUES (?1, ?2)",
            (i, format!("{i:08} {}", "r".repeat(400))),
        )
        .unwrap();
    }
    c.execute_batch("COMMIT").unwrap();
}

fn check_rows(c: &rusqlite::Connection, n: i64) {
    let (count, sum): (i64, i64) = c
        .query_row("SELECT count(*), sum(i) FROM t", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap();
    assert_eq!((count, sum), (n, n * (n - 1) / 2));
    let ok: String = c
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(ok, "ok");
}

fn rotation_under_load_retires_every_old_key(sc: Scenario) {
    let fx = Fixture::with(sc);
    let engine = fx.engine();
    let db = engine.database_path("db").unwrap();
    let wal = std::path::PathBuf::from(format!("{}-wal", db.display()));
    let c = wal_connection(&engine);
    c.execute_batch("CREATE TABLE t(i INTEGER PRIMARY KEY, v TEXT)")
        .unwrap();
    fill(&c, 0, 2000);
    c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .unwrap();
    fill(&c, 2000, 2100); // some frames in the WAL under its old key
    let (old_db, none) = key_ids(&engine, &db);
    let (old_wal, _) = key_ids(&engine, &wal);
    assert!(none.is_empty());
    let before_stats = engine.stats();

    let started = c.begin_dek_rotation().unwrap();
    assert_eq!(started.pages_done, 0);
    assert!(started.pages_total > 200, "{started:?}");
    let (now, previous) = key_ids(&engine, &db);
    assert_eq!(previous, old_db[..previous.len()].to_vec());
    assert!(now.iter().all(|k| !old_db.contains(k)));

    // A writer and a reader carry on through the whole rotation.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let engine = engine.clone();
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let w = wal_connection(&engine);
            let mut n = 2100;
            while !stop.load(Ordering::Relaxed) {
                fill(&w, n, n + 20);
                n += 20;
                if n % 200 == 0 {
                    w.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
                        .unwrap();
                }
            }
            n
        })
    };
    let reader = {
        let engine = engine.clone();
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let r = wal_connection(&engine);
            let mut reads = 0;
            while !stop.load(Ordering::Relaxed) {
                let n: i64 = r
                    .query_row("SELECT count(*) FROM t WHERE v LIKE '%r%'", [], |x| {
                        x.get(0)
                    })
                    .unwrap();
                assert!(n >= 2100);
                reads += 1;
            }
            reads
        })
    };
    let mut steps = 0;
    loop {
        let s = c.step_dek_rotation(64).unwrap().expect("rotation runs");
        steps += 1;
        if s.complete() {
            break;
        }
    }
    assert!(steps > 3);
    let mut tries = 0;
    while !c.finish_dek_rotation().unwrap() {
        tries += 1;
        assert!(tries < 500, "the WAL never emptied");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(c.dek_rotation().unwrap(), None);
    stop.store(true, Ordering::Relaxed);
    let n = writer.join().unwrap();
    let reads = reader.join().unwrap();
    assert!(reads > 0);
    check_rows(&c, n);
    let moved = engine.stats().since(&before_stats);
    assert!(moved.units_sealed >= started.pages_total);

    // No header names an old key, as current or previous.
    let (db_keys, db_prev) = key_ids(&engine, &db);
    let (wal_keys, wal_prev) = key_ids(&engine, &wal);
    assert!(db_prev.is_empty() && wal_prev.is_empty());
    for k in old_db.iter().chain(&old_wal) {
        assert!(
            !db_keys.contains(k) && !wal_keys.contains(k),
            "old key {k} still named (scenario {})",
            sc.name()
        );
    }
    // And the same after a reopen.
    drop(c);
    drop(engine);
    let engine = fx.engine();
    let c = wal_connection(&engine);
    check_rows(&c, n);
}

/// A rotation stopped halfway (the engine closed) resumes from its
/// recorded progress in a new engine and completes; the data is intact
/// at every point.
#[test]
fn a_rotation_resumes_after_a_reopen() {
    let fx = Fixture::with(Scenario::ServiceKeyAndInfra);
    let rows = 1500;
    {
        let engine = fx.engine();
        let c = wal_connection(&engine);
        c.execute_batch("CREATE TABLE t(i INTEGER PRIMARY KEY, v TEXT)")
            .unwrap();
        fill(&c, 0, rows);
        c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .unwrap();
        c.begin_dek_rotation().unwrap();
        let s = c.step_dek_rotation(50).unwrap().unwrap();
        assert_eq!(s.pages_done, 50);
        check_rows(&c, rows);
    }
    let engine = fx.engine();
    let c = wal_connection(&engine);
    let s = c.dek_rotation().unwrap().expect("still rotating");
    assert_eq!(s.pages_done, 50);
    check_rows(&c, rows);
    // Beginning again continues the same rotation.
    assert_eq!(c.begin_dek_rotation().unwrap().started_unix, s.started_unix);
    while !c.step_dek_rotation(200).unwrap().unwrap().complete() {}
    assert!(c.finish_dek_rotation().unwrap());
    check_rows(&c, rows);
}

/// A page damaged on disk stops the rotation with an error naming it
/// (never re-sealed into authenticity); after a rotation, a page sealed
/// under the retired DEK put back in place is refused.
#[test]
fn damage_is_named_and_retired_pages_are_refused() {
    let fx = Fixture::new();
    let engine = fx.engine();
    let db = engine.database_path("db").unwrap();
    let c = wal_connection(&engine);
    c.execute_batch("CREATE TABLE t(i INTEGER PRIMARY KEY, v TEXT)")
        .unwrap();
    fill(&c, 0, 300);
    c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .unwrap();
    let before = std::fs::read(&db).unwrap();
    let page = |bytes: &[u8], n: usize| {
        let off = atrest_storage::HEADER_LEN as usize + (n - 1) * 4096;
        bytes[off..off + 4096].to_vec()
    };
    let write_page = |n: usize, content: &[u8]| {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&db).unwrap();
        let off = atrest_storage::HEADER_LEN + (n as u64 - 1) * 4096;
        f.write_all_at(content, off).unwrap();
    };
    c.begin_dek_rotation().unwrap();
    let mut bad = page(&before, 5);
    bad[100] ^= 1;
    write_page(5, &bad);
    let e = c.step_dek_rotation(100).unwrap_err().to_string();
    assert!(e.contains("page 5") && e.contains("db.db"), "{e}");
    write_page(5, &page(&before, 5)); // repaired from a good copy
    while !c.step_dek_rotation(100).unwrap().unwrap().complete() {}
    assert!(c.finish_dek_rotation().unwrap());
    check_rows(&c, 300);

    // Page 4 as it was before the rotation: authentic under the old DEK,
    // which this file no longer accepts.
    drop(c);
    write_page(4, &page(&before, 4));
    drop(engine);
    let engine = fx.engine();
    let c = engine.connect("db").unwrap();
    let e = c
        .query_row("SELECT count(*), sum(length(v)) FROM t", [], |r| {
            r.get::<_, i64>(0)
        })
        .map_err(atrest_storage::StorageError::from_sqlite)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("page 4") && e.contains("failed authentication"),
        "{e}"
    );
}

/// Rotation needs WAL mode: a rollback journal made before the rotation
/// would still name the old key after it.
#[test]
fn rotation_in_rollback_journal_mode_is_refused() {
    let fx = Fixture::new();
    let engine = fx.engine();
    let c = engine.connect("db").unwrap();
    c.execute_batch("CREATE TABLE t(i)").unwrap();
    let e = c.begin_dek_rotation().unwrap_err().to_string();
    assert!(e.contains("journal mode") && e.contains("WAL"), "{e}");
}
