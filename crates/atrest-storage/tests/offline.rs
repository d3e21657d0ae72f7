//! Copies of closed files (what backups and the WAL archive are made of):
//! a ciphertext copy of a database and of its WAL's committed prefix opens
//! elsewhere with exactly the commits up to the copy point; verification
//! names the damaged page or frame; a copy is rewrapped under a new KEK
//! without being opened by SQLite.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use atrest_crypto::{KeyProtector, RoutingProtector};
use atrest_keystore::{Keystore, ServiceKeyId};
use atrest_storage::{Engine, EngineOptions};
use common::*;

scenarios!(a_copy_of_the_committed_prefix_opens_with_every_commit_before_it);

/// Options for a second data directory `data2` under `root` sharing the
/// first one's keystores (a restore on the same host).
fn copy_options(root: &Path, sc: Scenario) -> EngineOptions {
    EngineOptions {
        data_dir: root.join("data2"),
        ..options(root, sc)
    }
}

fn open_copy(root: &Path, sc: Scenario) -> Engine {
    let engine = Engine::open(&copy_options(root, sc)).unwrap();
    if sc.customer() {
        engine.set_protector(Arc::new(CustomerKek::load_or_create(root)));
    }
    engine
}

fn server_style_connection(engine: &Engine) -> atrest_storage::Connection {
    let c = engine.connect("db").unwrap();
    c.pragma_update(None, "journal_mode", "wal").unwrap();
    c.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
    c.set_db_config(
        rusqlite::config::DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE,
        true,
    )
    .unwrap();
    c
}

/// Copies the database file and the WAL's committed prefix of `data/db`
/// into `data2`, with the data directory's metadata.
fn copy_at_commit_point(root: &Path, engine: &Engine) -> (PathBuf, PathBuf) {
    let src = root.join("data");
    let dst = root.join("data2");
    std::fs::create_dir_all(&dst).unwrap();
    std::fs::copy(src.join("atrest.json"), dst.join("atrest.json")).unwrap();
    let db = engine.database_path("db").unwrap();
    let status = engine.wal_status(&db).expect("the WAL is open");
    let wal = std::fs::read(format!("{}-wal", db.display())).unwrap();
    assert!(wal.len() as u64 >= status.committed_len);
    std::fs::write(dst.join("db.db-wal"), &wal[..status.committed_len as usize]).unwrap();
    std::fs::copy(&db, dst.join("db.db")).unwrap();
    (dst.join("db.db"), dst.join("db.db-wal"))
}

fn a_copy_of_the_committed_prefix_opens_with_every_commit_before_it(sc: Scenario) {
    let fx = Fixture::with(sc);
    let engine = fx.engine();
    let w = server_style_connection(&engine);
    w.execute_batch("CREATE TABLE t(i INTEGER PRIMARY KEY, v TEXT)")
        .unwrap();
    let commit = |i: i64| {
        w.execute(
            "INSERT INTO t VALUES (?1, ?2)",
            (i, format!("row {i} {}", "x".repeat(300))),
        )
        .unwrap();
    };
    for i in 0..60 {
        commit(i);
    }
    // Part of the WAL is already in the database file, part is not.
    let (_, ckpt): (i64, i64) = w
        .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
            Ok((r.get(1)?, r.get(2)?))
        })
        .unwrap();
    assert!(ckpt > 0);
    for i in 60..100 {
        commit(i);
    }
    let (db_copy, wal_copy) = copy_at_commit_point(fx.dir.path(), &engine);
    for i in 100..150 {
        commit(i);
    }
    drop(w);

    let copy = open_copy(fx.dir.path(), sc);
    let db_checked = copy.verify_at_rest(&db_copy).unwrap();
    let wal_checked = copy.verify_at_rest(&wal_copy).unwrap();
    assert!(db_checked.units > 0 && wal_checked.units > 0);
    let c = copy.connect("db").unwrap();
    let (n, max): (i64, i64) = c
        .query_row("SELECT count(*), max(i) FROM t", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap();
    assert_eq!((n, max), (100, 99), "scenario {}", sc.name());
    let ok: String = c
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(ok, "ok");
}

#[test]
fn verification_names_the_damaged_page_and_frame() {
    let fx = Fixture::new();
    let engine = fx.engine();
    let w = server_style_connection(&engine);
    w.execute_batch("CREATE TABLE t(v TEXT)").unwrap();
    for i in 0..50 {
        w.execute("INSERT INTO t VALUES (?1)", [format!("{i:0>500}")])
            .unwrap();
    }
    w.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
        .unwrap();
    w.execute("INSERT INTO t VALUES ('tail')", []).unwrap();
    let (db_copy, wal_copy) = copy_at_commit_point(fx.dir.path(), &engine);
    let copy = open_copy(fx.dir.path(), Scenario::ServiceKey);
    copy.verify_at_rest(&db_copy).unwrap();
    copy.verify_at_rest(&wal_copy).unwrap();

    // One bit of page 3 of the database copy.
    let mut bytes = std::fs::read(&db_copy).unwrap();
    let off = atrest_storage::HEADER_LEN as usize + 2 * 4096 + 100;
    bytes[off] ^= 1;
    std::fs::write(&db_copy, &bytes).unwrap();
    let e = copy.verify_at_rest(&db_copy).unwrap_err().to_string();
    assert!(e.contains("page 3") && e.contains("db.db"), "{e}");

    // One bit near the end of the WAL copy: its last frame.
    let mut bytes = std::fs::read(&wal_copy).unwrap();
    let n = bytes.len();
    bytes[n - 10] ^= 0x80;
    std::fs::write(&wal_copy, &bytes).unwrap();
    let e = copy.verify_at_rest(&wal_copy).unwrap_err().to_string();
    assert!(e.contains("WAL frame") && e.contains("db.db-wal"), "{e}");
}

#[test]
fn a_copy_is_rewrapped_under_a_new_kek_without_sqlite() {
    let fx = Fixture::new();
    let engine = fx.engine();
    let w = server_style_connection(&engine);
    w.execute_batch("CREATE TABLE t(v TEXT); INSERT INTO t VALUES ('kept');")
        .unwrap();
    let (db_copy, wal_copy) = copy_at_commit_point(fx.dir.path(), &engine);
    drop(w);
    let old_id = engine.info().unwrap().service_key.clone();
    drop(engine);

    let ks = Keystore::open(fx.opts.keystore_dir.clone().unwrap()).unwrap();
    let old: Arc<dyn KeyProtector> = Arc::new(
        ks.service_protector(
            ServiceKeyId::parse(old_id.strip_prefix("service:").unwrap()).unwrap(),
        )
        .unwrap(),
    );
    let new_id = ks.create_service_key().unwrap();
    let new: Arc<dyn KeyProtector> = Arc::new(ks.service_protector(new_id).unwrap());

    let copy = open_copy(fx.dir.path(), Scenario::ServiceKey);
    copy.set_protector(Arc::new(RoutingProtector::new(
        Arc::clone(&new),
        vec![Arc::clone(&old)],
    )));
    assert!(copy.rewrap_at_rest(&db_copy).unwrap());
    assert!(copy.rewrap_at_rest(&wal_copy).unwrap());
    // A second pass has nothing to do.
    assert!(!copy.rewrap_at_rest(&db_copy).unwrap());
    drop(copy);

    // The old key is gone: only the new one can open the copy.
    ks.destroy_service_key(ServiceKeyId::parse(old_id.strip_prefix("service:").unwrap()).unwrap())
        .unwrap();
    let only_new =
        Engine::open_with_protector(&fx.dir.path().join("data2"), Arc::clone(&new), None).unwrap();
    for p in [&db_copy, &wal_copy] {
        let hdr = only_new.inspect(p).unwrap().to_string();
        assert!(hdr.contains(&new.current_kek().key_id), "{hdr}");
        assert!(!hdr.contains(old_id.as_str()), "{hdr}");
    }
    let c = only_new.connect("db").unwrap();
    let v: String = c.query_row("SELECT v FROM t", [], |r| r.get(0)).unwrap();
    assert_eq!(v, "kept");
}
