use atrest_storage::{Engine, EngineOptions};

#[test]
fn create_write_reopen_read() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = EngineOptions {
        data_dir: tmp.path().join("data"),
        keystore_dir: Some(tmp.path().join("keystore")),
    };
    for mode in ["wal", "delete"] {
        let name = format!("db_{mode}");
        {
            let engine = Engine::open(&opts).unwrap();
            let conn = engine.connect(&name).unwrap();
            conn.pragma_update(None, "journal_mode", mode).unwrap();
            conn.execute_batch(
                "CREATE TABLE t(a INTEGER PRIMARY KEY, b TEXT); CREATE INDEX tb ON t(b);",
            )
            .unwrap();
            let tx = conn.unchecked_transaction().unwrap();
            for i in 0..2000 {
                tx.execute(
                    "INSERT INTO t(b) VALUES (?1)",
                    [format!("row-{i}-{}", "x".repeat(i % 300))],
                )
                .unwrap();
            }
            tx.commit().unwrap();
            let n: i64 = conn
                .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
                .unwrap();
            assert_eq!(n, 2000);
        }
        let engine = Engine::open(&opts).unwrap();
        let conn = engine.connect(&name).unwrap();
        let ok: String = conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap();
        assert_eq!(ok, "ok");
        let n: i64 = conn
            .query_row(
                "SELECT count(*) FROM t WHERE b LIKE 'row-1999-%'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(n, 1);
        let raw = std::fs::read(engine.database_path(&name).unwrap()).unwrap();
        assert!(!raw.windows(16).any(|w| w == b"SQLite format 3\0"));
        assert!(!raw.windows(8).any(|w| w == b"row-1999"));
    }
}
