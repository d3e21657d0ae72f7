//! The rarer journals: super-journals of multi-database commits and
//! statement journals that spill to disk go through the cipher too.

mod common;

use common::*;

fn a_two_database_commit_uses_a_sealed_super_journal(sc: Scenario) {
    let fx = Fixture::with(sc);
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

fn sql_cannot_write_around_the_cipher_through_a_uri(sc: Scenario) {
    let fx = Fixture::with(sc);
    let engine = fx.engine();
    let conn = engine.connect("a").unwrap();
    conn.execute_batch("CREATE TABLE t(x); INSERT INTO t VALUES ('secret row');")
        .unwrap();
    let leak = fx.dir.path().join("leak.db");
    for sql in [
        format!("ATTACH 'file:{}?vfs=unix' AS leak", leak.display()),
        format!("ATTACH 'FILE:{}?vfs=unix' AS leak", leak.display()),
        format!("VACUUM INTO 'file:{}?vfs=unix'", leak.display()),
    ] {
        let err = conn.execute_batch(&sql).unwrap_err().to_string();
        assert!(
            err.contains("not authorized") || err.contains("authorization denied"),
            "{sql}: {err}"
        );
        assert!(!leak.exists(), "{sql} wrote a file");
    }
    // A bound file name cannot be checked, so it is refused too.
    assert!(conn
        .execute("ATTACH ?1 AS p", [leak.to_str().unwrap()])
        .is_err());
    // A plain path goes through atrest and is encrypted.
    let plain = fx.data().join("copy.db");
    conn.execute_batch(&format!("VACUUM INTO '{}'", plain.display()))
        .unwrap();
    let bytes = std::fs::read(&plain).unwrap();
    assert!(find(&bytes, b"secret row").is_none() && find(&bytes, b"SQLite format 3").is_none());
}

fn a_spilled_statement_journal_is_sealed_and_rolls_back_correctly(sc: Scenario) {
    let fx = Fixture::with(sc);
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

scenarios!(
    a_two_database_commit_uses_a_sealed_super_journal,
    sql_cannot_write_around_the_cipher_through_a_uri,
    a_spilled_statement_journal_is_sealed_and_rolls_back_correctly,
);
