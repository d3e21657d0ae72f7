//! Changes to the bytes at rest are detected and named, never served.

mod common;

use std::fs;
use std::path::Path;

use atrest_storage::{Engine, StorageError, HEADER_LEN};
use common::*;

const PAGE: usize = 4096;

fn build(engine: &Engine, name: &str, rows: usize) {
    let conn = engine.connect(name).unwrap();
    conn.pragma_update(None, "journal_mode", "delete").unwrap();
    conn.execute_batch("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT); CREATE INDEX tv ON t(v);")
        .unwrap();
    let tx = conn.unchecked_transaction().unwrap();
    for i in 0..rows {
        tx.execute(
            "INSERT INTO t(v) VALUES (?1)",
            [format!("value {i} {}", "z".repeat(i % 90))],
        )
        .unwrap();
    }
    tx.commit().unwrap();
}

/// Reads every page (full scans of the table and of the index, then
/// integrity_check for anything else) and returns the first error.
fn read_all(engine: &Engine, name: &str) -> Result<(), StorageError> {
    let conn = engine.connect(name)?;
    for sql in [
        "SELECT count(*), sum(length(v)) FROM t NOT INDEXED",
        "SELECT count(*) FROM t INDEXED BY tv WHERE v > ''",
    ] {
        conn.query_row(sql, [], |r| r.get::<_, i64>(0))
            .map_err(StorageError::from_sqlite)?;
    }
    let ok: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .map_err(StorageError::from_sqlite)?;
    assert_eq!(
        ok, "ok",
        "a tampered file must fail, not read as a valid database"
    );
    Ok(())
}

fn page_offset(page: usize) -> usize {
    HEADER_LEN as usize + (page - 1) * PAGE
}

fn expect_tampered(err: StorageError, path: &Path, unit: &str) {
    match &err {
        StorageError::Tampered { path: p, unit: u } => {
            assert_eq!(p, &path.display().to_string());
            assert_eq!(u, unit);
        }
        other => panic!("expected tampering of {unit}, got: {other}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains(unit) && msg.contains("failed authentication"),
        "{msg}"
    );
}

fn a_flipped_bit_in_any_page_is_detected_and_named(sc: Scenario) {
    let fx = Fixture::with(sc);
    let engine = fx.engine();
    build(&engine, "orig", 600);
    let orig = fs::read(fx.data().join("orig.db")).unwrap();
    let pages = (orig.len() - HEADER_LEN as usize) / PAGE;
    assert!(pages >= 8, "want a database of several pages, got {pages}");
    // Each variant in place of the original (a database file is bound to
    // its name: a copy under another name is refused before any page).
    let path = fx.data().join("orig.db");
    for page in 1..=pages {
        let mut bytes = orig.clone();
        // A different bit and byte in every page: ciphertext, tag or nonce.
        let pos = page_offset(page) + (page * 997) % PAGE;
        bytes[pos] ^= 1 << (page % 8);
        fs::write(&path, &bytes).unwrap();
        let err = read_all(&engine, "orig").unwrap_err();
        expect_tampered(err, &path, &format!("page {page}"));
    }
    fs::write(&path, &orig).unwrap();
    read_all(&engine, "orig").unwrap();
}

fn pages_moved_within_or_between_databases_are_detected(sc: Scenario) {
    let fx = Fixture::with(sc);
    let engine = fx.engine();
    build(&engine, "a", 600);
    build(&engine, "b", 600);
    let a = fs::read(fx.data().join("a.db")).unwrap();
    let b = fs::read(fx.data().join("b.db")).unwrap();

    // Page 2 copied over page 3 of the same file.
    let mut swapped = a.clone();
    swapped.copy_within(page_offset(2)..page_offset(3), page_offset(3));
    // Each variant in place of a.db (a copy under another name is refused
    // before any page is read).
    let path = fx.data().join("a.db");
    fs::write(&path, &swapped).unwrap();
    expect_tampered(read_all(&engine, "a").unwrap_err(), &path, "page 3");

    // Page 2 of another database (same schema, same place).
    let mut foreign = a.clone();
    foreign[page_offset(2)..page_offset(3)].copy_from_slice(&b[page_offset(2)..page_offset(3)]);
    fs::write(&path, &foreign).unwrap();
    expect_tampered(read_all(&engine, "a").unwrap_err(), &path, "page 2");

    // A never-written (all-zero) page.
    let mut zero = a.clone();
    zero[page_offset(4)..page_offset(5)].fill(0);
    fs::write(&path, &zero).unwrap();
    expect_tampered(read_all(&engine, "a").unwrap_err(), &path, "page 4");

    // The original reads again, and b was never touched.
    fs::write(&path, &a).unwrap();
    read_all(&engine, "a").unwrap();
    read_all(&engine, "b").unwrap();
}

/// Makes a WAL database whose WAL survives close (no checkpoint).
fn wal_db(engine: &Engine, name: &str) {
    let conn = engine.connect(name).unwrap();
    conn.pragma_update(None, "journal_mode", "wal").unwrap();
    conn.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
    conn.set_db_config(
        rusqlite::config::DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE,
        true,
    )
    .unwrap();
    conn.execute_batch("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT);")
        .unwrap();
    for i in 0..20 {
        conn.execute(
            "INSERT INTO t(v) VALUES (?1)",
            [format!("wal row {i} {}", "w".repeat(500))],
        )
        .unwrap();
    }
}

fn an_altered_wal_frame_is_detected_and_named(sc: Scenario) {
    let fx = Fixture::with(sc);
    let engine = fx.engine();
    wal_db(&engine, "w");
    let db = fs::read(fx.data().join("w.db")).unwrap();
    let wal = fs::read(fx.data().join("w.db-wal")).unwrap();
    // WAL layout (format 4): header, sealed WAL header (32 + ov), then per
    // frame its salts in clear (8) and the frame header and page sealed as
    // one unit (24 + page; tags and nonces in the page's reserved bytes).
    let pframe = 8 + 24 + PAGE;
    let frame = |i: usize| HEADER_LEN as usize + 32 + fx.ov() + i * pframe;
    assert!(wal.len() >= frame(10), "WAL should hold at least 10 frames");

    let flip = |pos: usize| {
        let mut bad = wal.clone();
        bad[pos] ^= 0x10;
        bad
    };
    // Frames 3 and 4 swapped, and frame 6 replaced by frame 2: authentic
    // units in the wrong place (the frame number is in their AAD).
    let mut swapped = wal.clone();
    swapped[frame(3)..frame(4)].copy_from_slice(&wal[frame(4)..frame(5)]);
    swapped[frame(4)..frame(5)].copy_from_slice(&wal[frame(3)..frame(4)]);
    let mut moved = wal.clone();
    moved[frame(6)..frame(7)].copy_from_slice(&wal[frame(2)..frame(3)]);
    for (_case, bad, unit) in [
        ("hdr", flip(frame(3) + 8 + 10), "WAL frame 4"),
        ("body", flip(frame(5) + 8 + 24 + 100), "WAL frame 6"),
        ("tail", flip(frame(7) + pframe - 1), "WAL frame 8"),
        ("salt", flip(frame(2) + 1), "WAL frame 3"),
        ("swap", swapped, "WAL frame 4"),
        ("move", moved, "WAL frame 7"),
    ] {
        // In place of w's files (a database file is bound to its name).
        fs::write(fx.data().join("w.db"), &db).unwrap();
        let path = fx.data().join("w.db-wal");
        fs::write(&path, &bad).unwrap();
        let err = count_rows(&engine, "w").unwrap_err();
        expect_tampered(err, &path, unit);
    }

    // The unaltered files read every committed row.
    fs::write(fx.data().join("w.db"), &db).unwrap();
    fs::write(fx.data().join("w.db-wal"), &wal).unwrap();
    let c = engine.connect("w").unwrap();
    let n: i64 = c
        .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 20);
}

/// Opens database `name` and counts its rows.
fn count_rows(engine: &Engine, name: &str) -> Result<i64, StorageError> {
    engine
        .connect(name)?
        .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
        .map_err(StorageError::from_sqlite)
}

fn a_wal_or_journal_from_another_database_is_refused(sc: Scenario) {
    let fx = Fixture::with(sc);
    let engine = fx.engine();
    wal_db(&engine, "src");
    build(&engine, "dst", 50);
    let before = fs::read(fx.data().join("dst.db")).unwrap();
    // The other database's WAL (same service key, valid on its own).
    fs::copy(fx.data().join("src.db-wal"), fx.data().join("dst.db-wal")).unwrap();
    let err = count_rows(&engine, "dst").unwrap_err().to_string();
    assert!(err.contains("copied here from another database"), "{err}");
    assert_eq!(
        fs::read(fx.data().join("dst.db")).unwrap(),
        before,
        "nothing replayed into dst"
    );

    // The same for a rollback journal.
    fs::remove_file(fx.data().join("dst.db-wal")).unwrap();
    let src = engine.connect("src").unwrap();
    src.pragma_update(None, "journal_mode", "delete").unwrap();
    src.execute_batch("PRAGMA cache_size = 2; BEGIN; UPDATE t SET v = v || 'x';")
        .unwrap();
    fs::copy(
        fx.data().join("src.db-journal"),
        fx.data().join("dst.db-journal"),
    )
    .unwrap();
    src.execute_batch("ROLLBACK").unwrap();
    let err = count_rows(&engine, "dst").unwrap_err().to_string();
    assert!(err.contains("copied here from another database"), "{err}");
    assert_eq!(
        fs::read(fx.data().join("dst.db")).unwrap(),
        before,
        "nothing played back into dst"
    );
}

fn damaged_headers_and_foreign_files_are_clear_errors(sc: Scenario) {
    let fx = Fixture::with(sc);
    let engine = fx.engine();
    build(&engine, "h", 50);
    let orig = fs::read(fx.data().join("h.db")).unwrap();

    // Both header slots damaged.
    let mut bad = orig.clone();
    bad[20] ^= 1;
    bad[4096 + 20] ^= 1;
    fs::write(fx.data().join("hbad.db"), &bad).unwrap();
    let msg = count_rows(&engine, "hbad").unwrap_err().to_string();
    assert!(msg.contains("hbad.db") && msg.contains("header"), "{msg}");

    // A plain SQLite database is not silently accepted.
    let plain = fx.data().join("plain.db");
    rusqlite::Connection::open(&plain)
        .unwrap()
        .execute_batch("CREATE TABLE x(a); INSERT INTO x VALUES (1);")
        .unwrap();
    let msg = engine.connect("plain").map(|_| ()).and_then(|_| {
        engine
            .connect("plain")?
            .query_row("SELECT * FROM x", [], |r| r.get::<_, i64>(0))
            .map_err(StorageError::from_sqlite)
            .map(|_| ())
    });
    let msg = msg.unwrap_err().to_string();
    assert!(msg.contains("not an atrest file"), "{msg}");
}

fn wrong_or_missing_service_key_is_a_clear_error_and_data_survives(sc: Scenario) {
    let fx = Fixture::with(sc);
    build(&fx.engine(), "k", 100);
    if sc.customer() {
        return wrong_or_missing_customer_key(&fx);
    }
    let keystore = fx.opts.keystore_dir.clone().unwrap();
    let saved = fx.dir.path().join("keystore.saved");
    fs::rename(&keystore, &saved).unwrap();

    // Missing keystore: the error names the key and how to point at it.
    let msg = match Engine::open(&fx.opts) {
        Ok(_) => panic!("opened without its service key"),
        Err(e) => e.to_string(),
    };
    assert!(
        msg.contains("was not found in keystore") && msg.contains("--keystore"),
        "{msg}"
    );

    // A different key under the same name: unwrap fails, nothing is written.
    let other = tempfile::tempdir().unwrap();
    let other_opts = atrest_storage::EngineOptions {
        data_dir: other.path().join("d"),
        keystore_dir: Some(keystore.clone()),
        infrastructure_encryption: Some(false),
        infra_keystore_dir: None,
    };
    drop(Engine::open(&other_opts).unwrap());
    let info: serde_json::Value =
        serde_json::from_slice(&fs::read(fx.data().join("atrest.json")).unwrap()).unwrap();
    let want = info["service_key"]
        .as_str()
        .unwrap()
        .trim_start_matches("service:")
        .to_string();
    let made = fs::read_dir(&keystore)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    // Re-label the other key file with our key id, checksum recomputed, so
    // only the key bytes differ.
    let mut content = fs::read(&made).unwrap();
    content[8..24].copy_from_slice(&hex::decode(&want).unwrap());
    let sum = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &content[..56]);
    content[56..72].copy_from_slice(&sum.as_ref()[..16]);
    let forged = keystore.join(format!("service-{want}.key"));
    fs::write(&forged, &content).unwrap();
    fs::set_permissions(&forged, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let before = fs::read(fx.data().join("k.db")).unwrap();
    let engine = Engine::open(&fx.opts).unwrap();
    let msg = match count_rows(&engine, "k") {
        Ok(_) => panic!("read with the wrong key"),
        Err(e) => e.to_string(),
    };
    assert!(msg.contains("not the one that wrapped it"), "{msg}");
    drop(engine);
    assert_eq!(
        fs::read(fx.data().join("k.db")).unwrap(),
        before,
        "a failed open must not write"
    );

    // The right key comes back: everything is there.
    fs::remove_dir_all(&keystore).unwrap();
    fs::rename(&saved, &keystore).unwrap();
    let conn = fx.engine().connect("k").unwrap();
    let n: i64 = conn
        .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 100);
}

/// The customer-key scenarios: without the customer key, or with another
/// RSA key in its place, nothing reads, the error names the key, and
/// nothing is written; with the right key everything is there.
fn wrong_or_missing_customer_key(fx: &Fixture) {
    let before = fs::read(fx.data().join("k.db")).unwrap();
    // Only the service key (the customer key's holder is unreachable).
    let engine = Engine::open(&fx.opts).unwrap();
    let msg = count_rows(&engine, "k").unwrap_err().to_string();
    assert!(
        msg.contains(common::CUSTOMER_KEY_ID),
        "the error names the key needed: {msg}"
    );
    drop(engine);
    // Another RSA key under the same name.
    let der = fx.dir.path().join("customer-kek.der");
    let saved = fs::read(&der).unwrap();
    let other = tempfile::tempdir().unwrap();
    common::CustomerKek::load_or_create(other.path());
    fs::copy(other.path().join("customer-kek.der"), &der).unwrap();
    let msg = count_rows(&fx.engine(), "k").unwrap_err().to_string();
    assert!(msg.contains("not the one that wrapped it"), "{msg}");
    assert_eq!(
        fs::read(fx.data().join("k.db")).unwrap(),
        before,
        "a failed open must not write"
    );
    fs::write(&der, saved).unwrap();
    let n: i64 = fx
        .engine()
        .connect("k")
        .unwrap()
        .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 100);
}

scenarios!(
    a_flipped_bit_in_any_page_is_detected_and_named,
    pages_moved_within_or_between_databases_are_detected,
    an_altered_wal_frame_is_detected_and_named,
    a_wal_or_journal_from_another_database_is_refused,
    damaged_headers_and_foreign_files_are_clear_errors,
    wrong_or_missing_service_key_is_a_clear_error_and_data_survives,
);
