//! The unencrypted benchmark baseline exists only in builds with the
//! benchmark-only feature `plaintext-baseline`.

mod common;
use common::*;

/// A normal build has no way to open a database unencrypted.
#[cfg(not(feature = "plaintext-baseline"))]
#[test]
fn a_default_build_has_no_plaintext_baseline() {
    let fx = Fixture::new();
    let engine = fx.engine();
    assert!(!engine.plaintext_baseline());
    let c = engine.connect("x").unwrap();
    c.execute_batch("CREATE TABLE t(x); INSERT INTO t VALUES (1);")
        .unwrap();
    drop(c);
    let head = std::fs::read(fx.data().join("x.db")).unwrap();
    assert_eq!(&head[..8], b"ATRESTH1", "an atrest file, not plain SQLite");
}

/// With the feature, an engine switched to the baseline writes plain
/// SQLite files; an encrypting engine refuses them.
#[cfg(feature = "plaintext-baseline")]
#[test]
fn the_benchmark_baseline_writes_plain_sqlite_files() {
    let fx = Fixture::new();
    let engine = fx.engine();
    engine.enable_plaintext_baseline();
    assert!(engine.plaintext_baseline());
    let c = engine.connect("x").unwrap();
    c.execute_batch("CREATE TABLE t(x); INSERT INTO t VALUES (1);")
        .unwrap();
    drop(c);
    let head = std::fs::read(fx.data().join("x.db")).unwrap();
    assert_eq!(&head[..16], b"SQLite format 3\0");
    drop(engine);
    let encrypting = fx.engine();
    assert!(!encrypting.plaintext_baseline());
    let refused = encrypting
        .connect("x")
        .and_then(|c| {
            c.query_row("SELECT count(*) FROM t", [], |r| r.get::<_, i64>(0))
                .map_err(atrest_storage::StorageError::from_sqlite)
        })
        .unwrap_err()
        .to_string();
    assert!(refused.contains("not an atrest file"), "{refused}");
}
