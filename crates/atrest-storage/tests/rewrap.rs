//! Rewrapping DEKs under another KEK, online: no page is re-encrypted,
//! the WAL's copy of the wrapping moves too, and afterwards the old KEK
//! unwraps nothing on disk.

mod common;

use std::sync::Arc;

use atrest_crypto::{KeyProtector, RoutingProtector};
use atrest_keystore::Keystore;
use atrest_storage::Engine;
use common::*;

#[test]
fn rewrap_moves_every_header_to_the_new_kek_while_connections_stay_open() {
    let fx = Fixture::new();
    let engine = fx.engine();
    let old_id = engine.info().unwrap().service_key.clone();
    let ks = Keystore::open(fx.opts.keystore_dir.clone().unwrap()).unwrap();
    let old: Arc<dyn KeyProtector> = Arc::new(
        ks.service_protector(
            atrest_keystore::ServiceKeyId::parse(old_id.strip_prefix("service:").unwrap()).unwrap(),
        )
        .unwrap(),
    );
    let new_id = ks.create_service_key().unwrap();
    let new: Arc<dyn KeyProtector> = Arc::new(ks.service_protector(new_id).unwrap());

    let writer = engine.connect("db").unwrap();
    writer.pragma_update(None, "journal_mode", "wal").unwrap();
    writer.execute_batch("CREATE TABLE t(x TEXT);").unwrap();
    for i in 0..500 {
        writer
            .execute("INSERT INTO t VALUES (?1)", [format!("row{i}")])
            .unwrap();
    }
    // A reader inside a transaction across the rewrap.
    let reader = engine.connect("db").unwrap();
    reader.execute_batch("BEGIN").unwrap();
    let before: i64 = reader
        .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
        .unwrap();
    assert_eq!(before, 500);

    engine.set_protector(Arc::new(RoutingProtector::new(
        Arc::clone(&new),
        vec![Arc::clone(&old)],
    )));
    let kek = writer.rewrap().unwrap();
    assert_eq!(kek, new.current_kek());
    // Writes keep going (WAL frames under the same DEK) and the reader's
    // snapshot holds.
    writer
        .execute("INSERT INTO t VALUES ('after')", [])
        .unwrap();
    let still: i64 = reader
        .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
        .unwrap();
    assert_eq!(still, 500);
    reader.execute_batch("COMMIT").unwrap();

    // Every header slot of the database and of its WAL names the new key
    // and none the old one.
    let data = fx.data();
    let old_hex = old_id.strip_prefix("service:").unwrap().to_string();
    let db = std::fs::read(data.join("db.db")).unwrap();
    let wal = std::fs::read(data.join("db.db-wal")).unwrap();
    for (name, bytes) in [("db", &db), ("wal", &wal)] {
        let header = &bytes[..8192];
        assert!(
            find(header, old_hex.as_bytes()).is_none(),
            "{name} still names the old key"
        );
        assert!(
            find(header, new_id.to_hex().as_bytes()).is_some(),
            "{name} does not name the new key"
        );
    }
    drop(reader);
    drop(writer);
    drop(engine);

    // Only the new key is needed now; the old one opens nothing.
    let fresh = Engine::open_with_protector(&data, Arc::clone(&new), None).unwrap();
    let c = fresh.connect("db").unwrap();
    let n: i64 = c
        .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 501);
    drop(c);
    drop(fresh);
    ks.destroy_service_key(atrest_keystore::ServiceKeyId::parse(&old_hex).unwrap())
        .unwrap();
    let only_old_gone = Engine::open_with_protector(&data, Arc::clone(&new), None).unwrap();
    assert_eq!(
        only_old_gone
            .connect("db")
            .unwrap()
            .query_row("SELECT count(*) FROM t", [], |r| r.get::<_, i64>(0))
            .unwrap(),
        501
    );
    drop(only_old_gone);
    let wrong = Engine::open_with_protector(&data, old, None).unwrap();
    let e = wrong
        .connect("db")
        .and_then(|c| {
            c.query_row("SELECT count(*) FROM t", [], |r| r.get::<_, i64>(0))
                .map_err(atrest_storage::StorageError::from_sqlite)
        })
        .unwrap_err();
    assert!(
        e.to_string().contains(&new_id.to_hex()),
        "the error names the key needed: {e}"
    );
}

#[test]
fn forget_keys_makes_the_protector_necessary_again() {
    let fx = Fixture::new();
    let engine = fx.engine();
    {
        let c = engine.connect("db").unwrap();
        c.execute_batch("CREATE TABLE t(x); INSERT INTO t VALUES (1);")
            .unwrap();
    }
    assert!(engine.cached_keys() >= 1);
    assert!(engine.forget_keys() >= 1);
    assert_eq!(engine.cached_keys(), 0);
    let c = engine.connect("db").unwrap();
    assert_eq!(
        c.query_row("SELECT x FROM t", [], |r| r.get::<_, i64>(0))
            .unwrap(),
        1
    );
    assert_eq!(engine.cached_keys(), 1);
}
