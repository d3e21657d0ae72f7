//! The per-DEK seal budget (2^32, docs/CRYPTO.md) counts seals, not opens.

mod common;
use common::*;

const LEASE: u64 = 1 << 16;

fn seals_reserved(path: &std::path::Path) -> u64 {
    atrest_storage::inspect(path).unwrap()["seals_reserved"]
        .as_u64()
        .unwrap()
}

#[test]
fn reopening_does_not_burn_the_seal_budget() {
    let fx = Fixture::new();
    for i in 0..40 {
        // A fresh engine each time, as after a process restart.
        let engine = fx.engine();
        let conn = engine.connect("b").unwrap();
        conn.pragma_update(None, "journal_mode", "persist").unwrap();
        conn.execute_batch("CREATE TABLE IF NOT EXISTS t(x)")
            .unwrap();
        conn.execute("INSERT INTO t VALUES (?1)", [i]).unwrap();
    }
    let db = fx.data().join("b.db");
    let journal = fx.data().join("b.db-journal");
    assert!(
        journal.exists(),
        "persist mode keeps the journal and its DEK"
    );
    // 40 reopens with a few seals each: far below one reservation, where
    // counting each reopen's reservation as used would give 40 x 65,536.
    assert!(
        seals_reserved(&db) < 2 * LEASE,
        "db: {}",
        seals_reserved(&db)
    );
    assert!(
        seals_reserved(&journal) < 2 * LEASE,
        "journal: {}",
        seals_reserved(&journal)
    );
    let conn = fx.engine().connect("b").unwrap();
    let n: i64 = conn
        .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 40);
}
