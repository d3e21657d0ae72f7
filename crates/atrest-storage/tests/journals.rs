//! The rarer journals: super-journals of multi-database commits and
//! statement journals that spill to disk go through the cipher too.

mod common;

use atrest_storage::StorageError;
use common::*;

#[test]
fn a_two_database_commit_uses_a_sealed_super_journal() {
    let fx = Fixture::new();
    let engine = fx.engine();
    {
        let conn = engine.connect("a").unwrap();
        conn.pragma_update(None, "journal_mode", "delete").unwrap();
        conn.attach(&engine, "b", "aux").unwrap();
        conn.execute_batch(
            "PRAGMA aux.journal_mode = delete; CREATE TABLE main.t(x); CREATE TABLE aux.t(x);",
        )
        .unwrap();
        let before = engine.stats();
        conn.execute_batch(
            "BEGIN; INSERT INTO main.t VALUES ('in a'); INSERT INTO aux.t VALUES ('in b'); COMMIT;",
        )
        .unwrap();
        let d = engine.stats().since(&before);
        assert!(
            d.files_opened["super_journal"] >= 1,
            "no super-journal was used: {d:?}"
        );
        assert!(
            d.files_opened["main_journal"] >= 2,
            "both databases journal: {d:?}"
        );
    }
    // Both sides committed, and both files are atrest files.
    let conn = engine.connect("a").unwrap();
    conn.attach(&engine, "b", "aux").unwrap();
    let (x, y): (String, String) = conn
        .query_row(
            "SELECT (SELECT x FROM main.t), (SELECT x FROM aux.t)",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!((x.as_str(), y.as_str()), ("in a", "in b"));
    for f in files_under(&fx.data()) {
        let bytes = std::fs::read(&f).unwrap();
        assert!(
            find(&bytes, b"in b").is_none(),
            "plaintext in {}",
            f.display()
        );
    }
}

#[test]
fn attaching_without_the_reserve_is_refused_clearly() {
    let fx = Fixture::new();
    let engine = fx.engine();
    let conn = engine.connect("a").unwrap();
    let path = engine.database_path("raw").unwrap();
    conn.execute("ATTACH DATABASE ?1 AS raw", [path.to_str().unwrap()])
        .unwrap();
    let err = conn.execute_batch("CREATE TABLE raw.t(x)").unwrap_err();
    let msg = StorageError::from_sqlite(err).to_string();
    assert!(
        msg.contains("reserved bytes") && msg.contains("atrest needs 28"),
        "{msg}"
    );
}

#[test]
fn a_spilled_statement_journal_is_sealed_and_rolls_back_correctly() {
    let fx = Fixture::new();
    let engine = fx.engine();
    let conn = engine.connect("s").unwrap();
    conn.pragma_update(None, "journal_mode", "delete").unwrap();
    conn.execute_batch("CREATE TABLE s(id INTEGER PRIMARY KEY, u TEXT UNIQUE, pad BLOB);")
        .unwrap();
    let tx = conn.unchecked_transaction().unwrap();
    for i in 0..3000 {
        tx.execute(
            "INSERT INTO s(id, u, pad) VALUES (?1, ?2, zeroblob(200))",
            (i, format!("u{i}")),
        )
        .unwrap();
    }
    tx.commit().unwrap();

    let before = engine.stats();
    conn.execute_batch("BEGIN; UPDATE s SET pad = zeroblob(210);")
        .unwrap();
    // A second statement over the same pages that fails half-way: its
    // changes are undone from the statement journal (over 64 KiB: on disk).
    let err = conn.execute(
        "UPDATE s SET pad = zeroblob(220), u = CASE WHEN id = 2900 THEN 'u1' ELSE u END",
        [],
    );
    assert!(
        err.is_err(),
        "the UNIQUE violation must abort the statement"
    );
    conn.execute_batch("COMMIT").unwrap();
    let d = engine.stats().since(&before);
    assert!(
        d.files_opened["subjournal"] >= 1,
        "statement journal never reached the VFS: {d:?}"
    );

    let (n, len): (i64, i64) = conn
        .query_row(
            "SELECT count(*), max(length(pad)) FROM s WHERE length(pad) = 210",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(
        (n, len),
        (3000, 210),
        "first update kept, failed statement fully undone"
    );
    let ok: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(ok, "ok");
}
