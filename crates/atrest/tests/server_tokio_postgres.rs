//! tokio-postgres (a strict, binary-format client) against the real server.

mod server_common;

use server_common::*;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::Type;
use tokio_postgres::NoTls;

#[test]
fn tokio_postgres_prepared_binary_transactions_and_errors() {
    let mut s = TestServer::create(&[]);
    s.start(&[]);
    let port = s.port;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let (client, conn) = tokio_postgres::connect(
            &format!("host=127.0.0.1 port={port} user=atrest password='{PASSWORD}' dbname=postgres"),
            NoTls,
        )
        .await
        .unwrap();
        tokio::spawn(conn);
        client
            .batch_execute(
                "CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT NOT NULL, qty INT,
                 price DOUBLE PRECISION, data BYTEA, active BOOLEAN, small SMALLINT)",
            )
            .await
            .unwrap();
        // Parameter types inferred from the columns they meet.
        let insert = client
            .prepare("INSERT INTO items (id, name, qty, price, data, active, small) VALUES ($1, $2, $3, $4, $5, $6, $7)")
            .await
            .unwrap();
        assert_eq!(
            insert.params(),
            &[Type::INT8, Type::TEXT, Type::INT4, Type::FLOAT8, Type::BYTEA, Type::BOOL, Type::INT2]
        );
        for i in 0..50i64 {
            let n = client
                .execute(
                    &insert,
                    &[&i, &format!("item-{i}"), &(i as i32 * 10), &(i as f64 / 4.0), &vec![i as u8; 3], &(i % 2 == 0), &(i as i16)],
                )
                .await
                .unwrap();
            assert_eq!(n, 1);
        }
        // Binary results decode into the Rust types the columns declare.
        let row = client
            .query_one("SELECT id, name, qty, price, data, active, small FROM items WHERE id = $1", &[&7i64])
            .await
            .unwrap();
        assert_eq!(row.get::<_, i64>(0), 7);
        assert_eq!(row.get::<_, String>(1), "item-7");
        assert_eq!(row.get::<_, i32>(2), 70);
        assert_eq!(row.get::<_, f64>(3), 1.75);
        assert_eq!(row.get::<_, Vec<u8>>(4), vec![7u8; 3]);
        assert!(!row.get::<_, bool>(5));
        assert_eq!(row.get::<_, i16>(6), 7);
        // Aggregates of a parameterless statement are typed from their values.
        let row = client.query_one("SELECT count(*), sum(qty) FROM items", &[]).await.unwrap();
        assert_eq!(row.get::<_, i64>(0), 50);
        assert_eq!(row.get::<_, i64>(1), 12250);
        // NULLs.
        client.execute("INSERT INTO items (id, name) VALUES ($1, $2)", &[&1000i64, &"nulls"]).await.unwrap();
        let row = client.query_one("SELECT qty, data FROM items WHERE id = $1", &[&1000i64]).await.unwrap();
        assert_eq!(row.get::<_, Option<i32>>(0), None);
        assert_eq!(row.get::<_, Option<Vec<u8>>>(1), None);
        // LIMIT parameters.
        let rows = client.query("SELECT id FROM items ORDER BY id LIMIT $1", &[&5i64]).await.unwrap();
        assert_eq!(rows.len(), 5);

        // Transactions.
        let mut client = client;
        let tx = client.transaction().await.unwrap();
        tx.execute("DELETE FROM items WHERE id < $1", &[&10i64]).await.unwrap();
        tx.rollback().await.unwrap();
        let tx = client.transaction().await.unwrap();
        tx.execute("UPDATE items SET qty = qty + 1 WHERE id = $1", &[&1i64]).await.unwrap();
        tx.commit().await.unwrap();
        let n: i64 = client.query_one("SELECT count(*) FROM items", &[]).await.unwrap().get(0);
        assert_eq!(n, 51);
        let q: i32 = client.query_one("SELECT qty FROM items WHERE id = 1", &[]).await.unwrap().get(0);
        assert_eq!(q, 11);

        // A portal read in pieces (Execute with a row limit, PortalSuspended).
        let tx = client.transaction().await.unwrap();
        let stmt = tx.prepare("SELECT value FROM generate_series(1, 25)").await.unwrap();
        let portal = tx.bind(&stmt, &[]).await.unwrap();
        let mut got = vec![];
        loop {
            let rows = tx.query_portal(&portal, 10).await.unwrap();
            if rows.is_empty() {
                break;
            }
            assert!(rows.len() <= 10);
            got.extend(rows.iter().map(|r| r.get::<_, i64>(0)));
        }
        assert_eq!(got, (1..=25).collect::<Vec<i64>>());
        tx.commit().await.unwrap();

        // Errors carry SQLSTATEs.
        let e = client.execute("INSERT INTO items (id, name) VALUES ($1, $2)", &[&1i64, &"dup"]).await.unwrap_err();
        assert_eq!(e.code(), Some(&SqlState::UNIQUE_VIOLATION), "{e:?}");
        let e = client.prepare("SELEC 1").await.unwrap_err();
        assert_eq!(e.code(), Some(&SqlState::SYNTAX_ERROR));
        let e = client.query("SELECT * FROM missing", &[]).await.unwrap_err();
        assert_eq!(e.code(), Some(&SqlState::UNDEFINED_TABLE));
        // A value that does not fit the announced type is an error, not garbage.
        client.execute("INSERT INTO items (id, name, qty) VALUES (2000, 'big', 9999999999)", &[]).await.unwrap();
        let e = client.query("SELECT qty FROM items WHERE id = 2000", &[]).await.unwrap_err();
        assert_eq!(e.code(), Some(&SqlState::NUMERIC_VALUE_OUT_OF_RANGE), "{e:?}");

        // Simple query protocol.
        let msgs = client.simple_query("SELECT name FROM items WHERE id = 3; SELECT 1").await.unwrap();
        let rows: Vec<_> = msgs
            .iter()
            .filter_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => Some(r.get(0).unwrap().to_string()),
                _ => None,
            })
            .collect();
        assert_eq!(rows, ["item-3", "1"]);
    });
    assert!(s.stop().success());
}
