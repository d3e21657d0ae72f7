"""psycopg 3 against a running atrest server.

Usage: psycopg_suite.py CASE   (connection from ATREST_PORT, ATREST_PASSWORD,
ATREST_CA). Each case raises on failure; the process exits non-zero then.
"""

import datetime
import decimal
import os
import socket
import sys
import threading
import time
import uuid

import psycopg
from psycopg import errors

PORT = int(os.environ["ATREST_PORT"])
PASSWORD = os.environ["ATREST_PASSWORD"]
CA = os.environ["ATREST_CA"]


def connect(dbname="postgres", **kw):
    args = dict(
        host="localhost",
        port=PORT,
        user="atrest",
        password=PASSWORD,
        dbname=dbname,
        sslmode="verify-full",
        sslrootcert=CA,
        connect_timeout=10,
    )
    args.update(kw)
    return psycopg.connect(**args)


def expect_error(exc_type, fn, sqlstate=None):
    try:
        fn()
    except exc_type as e:
        if sqlstate is not None:
            assert e.sqlstate == sqlstate, (e.sqlstate, str(e))
        return e
    raise AssertionError(f"expected {exc_type.__name__}")


def case_types():
    """Parameters of every common type, text and binary, round trip."""
    with connect() as conn:
        conn.execute(
            "CREATE TABLE typed (i8 bigint, i4 int, i2 smallint, f8 double precision, f4 real,"
            " t text, vc varchar(20), b bytea, ok boolean, d date, ts timestamp, tstz timestamptz,"
            " tm time, n numeric, u uuid, j json, jb jsonb)"
        )
        vals = (
            -(2**62),
            -(2**31),
            -(2**15),
            3.141592653589793,
            1.5,
            "héllo wörld ✓",
            "short",
            bytes(range(256)),
            True,
            datetime.date(1999, 12, 31),
            datetime.datetime(2026, 11, 22, 23, 59, 58, 123456),
            datetime.datetime(2026, 11, 22, 8, 30, tzinfo=datetime.timezone.utc),
            datetime.time(13, 14, 15, 500000),
            decimal.Decimal("12345.678"),
            uuid.UUID("12345678-1234-5678-1234-567812345678"),
            {"a": [1, 2, {"b": None}]},
            {"k": "v"},
        )
        placeholders = ",".join(["%s"] * len(vals))
        for binary in (False, True):
            conn.execute("DELETE FROM typed")
            with conn.cursor(binary=binary) as cur:
                cur.execute(
                    f"INSERT INTO typed VALUES ({placeholders})",
                    vals[:15] + (psycopg.types.json.Json(vals[15]), psycopg.types.json.Jsonb(vals[16])),
                )
                cur.execute("SELECT * FROM typed")
                row = cur.fetchone()
            expected = list(vals)
            assert row[:14] == tuple(expected[:14]), (binary, row, expected)
            assert row[14] == expected[14], row[14]
            assert row[15] == expected[15] and row[16] == expected[16], row[15:]
            # NULL of every type.
            conn.execute("DELETE FROM typed")
            with conn.cursor(binary=binary) as cur:
                cur.execute(f"INSERT INTO typed VALUES ({placeholders})", (None,) * len(vals))
                cur.execute("SELECT * FROM typed")
                assert cur.fetchone() == (None,) * len(vals)
        # Untyped expressions come back as their values' types.
        row = conn.execute("SELECT 1 + %s, 'x' || %s, 2.5 * 2, NULL", (41, "y")).fetchone()
        assert row == (42, "xy", 5.0, None), row
        # Out-of-range for an int column is an error, not a wrapped value.
        conn.execute("INSERT INTO typed (i4) VALUES (%s)", (2**40,))
        expect_error(errors.NumericValueOutOfRange, lambda: conn.execute("SELECT i4 FROM typed WHERE i4 IS NOT NULL").fetchall())


def case_prepared():
    """Server-side prepared statements (psycopg prepares after 5 runs, or on request)."""
    with connect() as conn:
        conn.execute("CREATE TABLE kv (k int PRIMARY KEY, v text)")
        for i in range(20):
            conn.execute("INSERT INTO kv VALUES (%s, %s)", (i, f"v{i}"), prepare=True)
        for i in range(20):
            row = conn.execute("SELECT v FROM kv WHERE k = %s", (i,), prepare=True).fetchone()
            assert row == (f"v{i}",), row
        assert conn.execute("SELECT count(*) FROM kv").fetchone() == (20,)
        # executemany (pipelined extended protocol)
        with conn.cursor() as cur:
            cur.executemany("INSERT INTO kv VALUES (%s, %s)", [(i, str(i)) for i in range(100, 200)])
        assert conn.execute("SELECT count(*) FROM kv").fetchone() == (120,)
        # A pipeline with an error in the middle: the rest is skipped, nothing of it commits.
        conn.commit()
        try:
            with conn.pipeline():
                conn.execute("INSERT INTO kv VALUES (1000, 'a')")
                conn.execute("INSERT INTO kv VALUES (1, 'dup')")
                conn.execute("INSERT INTO kv VALUES (1001, 'b')")
        except errors.UniqueViolation:
            pass
        conn.rollback()
        assert conn.execute("SELECT count(*) FROM kv WHERE k >= 1000").fetchone() == (0,)


def case_transactions():
    with connect() as conn:
        conn.autocommit = True
        conn.execute("CREATE TABLE acct (id int PRIMARY KEY, bal int NOT NULL CHECK (bal >= 0))")
        conn.execute("INSERT INTO acct VALUES (1, 100), (2, 0)")
        # Commit.
        with conn.transaction():
            conn.execute("UPDATE acct SET bal = bal - 30 WHERE id = 1")
            conn.execute("UPDATE acct SET bal = bal + 30 WHERE id = 2")
        assert conn.execute("SELECT bal FROM acct ORDER BY id").fetchall() == [(70,), (30,)]
        # Rollback on a constraint violation inside the transaction.
        conn.execute("BEGIN")
        conn.execute("UPDATE acct SET bal = bal - 10 WHERE id = 2")
        expect_error(errors.CheckViolation,
                     lambda: conn.execute("UPDATE acct SET bal = bal - 1000 WHERE id = 1"), "23514")
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
        # In a failed transaction every statement is refused until ROLLBACK.
        expect_error(errors.InFailedSqlTransaction, lambda: conn.execute("SELECT 1"), "25P02")
        conn.execute("ROLLBACK")
        assert conn.execute("SELECT bal FROM acct ORDER BY id").fetchall() == [(70,), (30,)]
        # A syntax error inside a transaction, then COMMIT turns into ROLLBACK.
        conn.execute("BEGIN")
        conn.execute("INSERT INTO acct VALUES (3, 5)")
        expect_error(errors.SyntaxError, lambda: conn.execute("SELEC 1"), "42601")
        cur = conn.execute("COMMIT")
        assert cur.statusmessage == "ROLLBACK", cur.statusmessage
        assert conn.execute("SELECT count(*) FROM acct WHERE id = 3").fetchone() == (0,)
        # Savepoints.
        with conn.transaction():
            conn.execute("INSERT INTO acct VALUES (4, 1)")
            try:
                with conn.transaction():
                    conn.execute("INSERT INTO acct VALUES (4, 2)")
            except errors.UniqueViolation:
                pass
            conn.execute("INSERT INTO acct VALUES (5, 1)")
        assert conn.execute("SELECT id FROM acct WHERE id > 3 ORDER BY id").fetchall() == [(4,), (5,)]
        # Unique violation outside a transaction: SQLSTATE and message.
        e = expect_error(errors.UniqueViolation, lambda: conn.execute("INSERT INTO acct VALUES (1, 1)"), "23505")
        assert "unique" in str(e).lower(), str(e)
        expect_error(errors.NotNullViolation, lambda: conn.execute("INSERT INTO acct VALUES (9, NULL)"), "23502")
        expect_error(errors.UndefinedTable, lambda: conn.execute("SELECT * FROM nope"), "42P01")
        expect_error(errors.UndefinedColumn, lambda: conn.execute("SELECT nope FROM acct"), "42703")
        # Read-only transactions refuse writes.
        conn.execute("BEGIN READ ONLY")
        expect_error(errors.ReadOnlySqlTransaction, lambda: conn.execute("DELETE FROM acct"), "25006")
        conn.execute("ROLLBACK")
        assert conn.execute("SELECT count(*) FROM acct").fetchone() == (4,)


def case_large_results():
    with connect() as conn:
        n = 200_000
        cur = conn.execute("SELECT value, printf('row-%%08d', value) FROM generate_series(1, %s)", (n,))
        count = 0
        total = 0
        for v, s in cur:
            count += 1
            total += v
            assert s == f"row-{v:08d}"
        assert count == n and total == n * (n + 1) // 2, (count, total)
        # A named server-side cursor in chunks is refused clearly (no DECLARE),
        # but fetchmany over a client cursor streams.
        conn.execute("CREATE TABLE big (id integer primary key, payload blob)")
        with conn.cursor() as c:
            c.executemany("INSERT INTO big VALUES (%s, %s)", [(i, os.urandom(10_000)) for i in range(300)])
        conn.commit()
        rows = conn.execute("SELECT id, length(payload) FROM big ORDER BY id").fetchall()
        assert len(rows) == 300 and all(r[1] == 10_000 for r in rows)


def case_concurrency():
    """Many writers and readers at once: no spurious errors, nothing lost."""
    with connect() as conn:
        conn.execute("CREATE TABLE counter (id int PRIMARY KEY, n int NOT NULL)")
        conn.execute("INSERT INTO counter VALUES (1, 0)")
        conn.execute("CREATE TABLE log (w int, i int)")
        conn.commit()
    writers, per_writer, readers = 12, 40, 6
    errs = []
    stop = threading.Event()

    def writer(w):
        try:
            with connect() as c:
                for i in range(per_writer):
                    with c.transaction():
                        c.execute("UPDATE counter SET n = n + 1 WHERE id = 1")
                        c.execute("INSERT INTO log VALUES (%s, %s)", (w, i))
        except Exception as e:  # noqa: BLE001
            errs.append(repr(e))

    def reader():
        try:
            with connect() as c:
                c.autocommit = True
                last = -1
                while not stop.is_set():
                    with c.transaction():
                        n = c.execute("SELECT n FROM counter").fetchone()[0]
                        logged = c.execute("SELECT count(*) FROM log").fetchone()[0]
                    # A snapshot is consistent: the counter equals the log.
                    assert n == logged, (n, logged)
                    assert n >= last
                    last = n
        except Exception as e:  # noqa: BLE001
            errs.append(repr(e))

    rs = [threading.Thread(target=reader) for _ in range(readers)]
    ws = [threading.Thread(target=writer, args=(w,)) for w in range(writers)]
    for t in rs + ws:
        t.start()
    for t in ws:
        t.join()
    stop.set()
    for t in rs:
        t.join()
    assert not errs, errs
    with connect() as conn:
        assert conn.execute("SELECT n FROM counter").fetchone() == (writers * per_writer,)
        assert conn.execute("SELECT count(DISTINCT w * 1000 + i) FROM log").fetchone() == (writers * per_writer,)


def case_cancel_and_timeout():
    with connect() as conn:
        conn.autocommit = True
        # Cancel from another thread.
        t = threading.Timer(0.5, conn.cancel)
        t.start()
        start = time.time()
        expect_error(errors.QueryCanceled, lambda: conn.execute("SELECT pg_sleep(30)"), "57014")
        assert time.time() - start < 10
        # The session is usable afterwards.
        assert conn.execute("SELECT 1").fetchone() == (1,)
        # A CPU-bound statement is cancelled too (progress handler).
        t = threading.Timer(0.5, conn.cancel)
        t.start()
        expect_error(errors.QueryCanceled,
                     lambda: conn.execute("SELECT count(*) FROM generate_series(1, 10000000000)"), "57014")
        # statement_timeout.
        conn.execute("SET statement_timeout = '300ms'")
        e = expect_error(errors.QueryCanceled, lambda: conn.execute("SELECT pg_sleep(5)"), "57014")
        assert "statement timeout" in str(e), str(e)
        conn.execute("RESET statement_timeout")
        assert conn.execute("SHOW statement_timeout").fetchone() == ("0",)
        conn.execute("SELECT pg_sleep(0.4)")


def case_session_surface():
    """What clients ask of a PostgreSQL server."""
    with connect(application_name="suite") as conn:
        conn.autocommit = True
        assert conn.info.server_version >= 160000
        assert conn.info.parameter_status("application_name") == "suite"
        assert "atrest" in conn.execute("SELECT version()").fetchone()[0]
        assert conn.execute("SHOW server_encoding").fetchone() == ("UTF8",)
        assert conn.execute("SELECT current_database(), current_user").fetchone() == ("postgres", "atrest")
        conn.execute("SET application_name = 'renamed'")
        assert conn.info.parameter_status("application_name") == "renamed"
        expect_error(errors.UndefinedObject, lambda: conn.execute("SHOW no_such_setting"), "42704")
        expect_error(errors.FeatureNotSupported, lambda: conn.execute("COPY t FROM STDIN"), "0A000")
        assert conn.execute("SELECT 1::int8 + '2'::integer").fetchone() == (3,)
        # Databases.
        conn.execute("CREATE DATABASE sales")
        expect_error(errors.DuplicateDatabase, lambda: conn.execute("CREATE DATABASE sales"), "42P04")
        with connect("sales") as s:
            s.execute("CREATE TABLE only_in_sales (x int)")
            s.commit()
            expect_error(errors.ObjectInUse, lambda: conn.execute("DROP DATABASE sales"), "55006")
        expect_error(errors.UndefinedTable, lambda: conn.execute("SELECT * FROM only_in_sales"), "42P01")
        conn.execute("DROP DATABASE sales")
        expect_error(psycopg.OperationalError, lambda: connect("sales"))


def case_write_lock_wait_and_snapshot_conflicts():
    """Writers queue for the write lock (no spurious errors), give up after
    lock_timeout with 55P03 naming the holder, and a transaction that read
    an older snapshot and then writes gets 40001 (retryable)."""
    with connect() as a, connect() as b:
        a.autocommit = b.autocommit = True
        a.execute("CREATE TABLE w (id int PRIMARY KEY, v int)")
        a.execute("INSERT INTO w VALUES (1, 0)")
        a.execute("BEGIN")
        a.execute("UPDATE w SET v = 1 WHERE id = 1")
        # b waits for a, then proceeds once a commits.
        threading.Timer(0.5, lambda: a.execute("COMMIT")).start()
        start = time.time()
        b.execute("UPDATE w SET v = v + 10 WHERE id = 1")
        assert time.time() - start >= 0.4
        assert b.execute("SELECT v FROM w").fetchone() == (11,)
        # With a short lock_timeout the wait ends in a clear error.
        a.execute("BEGIN")
        a.execute("UPDATE w SET v = 2 WHERE id = 1")
        b.execute("SET lock_timeout = '200ms'")
        e = expect_error(errors.LockNotAvailable, lambda: b.execute("UPDATE w SET v = 3 WHERE id = 1"), "55P03")
        assert "write lock" in str(e) and "holds it" in str(e), str(e)
        a.execute("COMMIT")
        # Read, another session commits a write, then write: 40001.
        b.execute("BEGIN")
        assert b.execute("SELECT v FROM w").fetchone() == (2,)
        a.execute("UPDATE w SET v = 4 WHERE id = 1")
        expect_error(errors.SerializationFailure, lambda: b.execute("UPDATE w SET v = 5 WHERE id = 1"), "40001")
        b.execute("ROLLBACK")
        assert b.execute("SELECT v FROM w").fetchone() == (4,)


def case_idle_session_timeout():
    with connect() as conn:
        conn.autocommit = True
        time.sleep(1.0)
        expect_error(psycopg.Error, lambda: conn.execute("SELECT 1"), "57P05")


def case_connection_limit():
    held = [connect() for _ in range(3)]
    e = expect_error(psycopg.OperationalError, lambda: connect())
    assert "too many clients" in str(e), str(e)
    held.pop().close()
    deadline = time.time() + 5
    while True:
        try:
            connect().close()
            break
        except psycopg.OperationalError:
            assert time.time() < deadline
            time.sleep(0.05)
    for c in held:
        c.close()


def case_disconnect_mid_query():
    """A client vanishes mid-statement and mid-transaction: the server
    stops its statement, rolls its transaction back, and serves others."""
    with connect() as conn:
        conn.execute("CREATE TABLE d (x int)")
        conn.execute("INSERT INTO d VALUES (1)")
        conn.commit()
    c = connect()
    c.execute("INSERT INTO d VALUES (2)")  # open transaction, not committed
    c.pgconn.send_query(b"SELECT pg_sleep(60)")
    time.sleep(0.3)
    fd = c.pgconn.socket
    socket.socket(fileno=os.dup(fd)).shutdown(socket.SHUT_RDWR)
    c.pgconn.finish()
    start = time.time()
    with connect() as conn:
        # The writer gate is free again: a write goes through promptly.
        conn.execute("INSERT INTO d VALUES (3)")
        conn.commit()
        assert conn.execute("SELECT x FROM d ORDER BY x").fetchall() == [(1,), (3,)]
    assert time.time() - start < 20


def case_idle_in_transaction_timeout():
    with connect() as conn:
        conn.execute("SELECT 1")  # opens a transaction (psycopg default)
        time.sleep(1.0)
        e = expect_error(psycopg.Error, lambda: conn.execute("SELECT 2"), "25P03")
        assert "idle-in-transaction" in str(e), str(e)
    with connect() as conn:
        conn.autocommit = True
        time.sleep(1.0)
        assert conn.execute("SELECT 3").fetchone() == (3,)


def case_sigterm_open_transaction():
    """Phase 1: commit a row, open a transaction with an uncommitted row,
    print READY and wait to be killed by the server's shutdown."""
    conn = connect()
    conn.execute("CREATE TABLE s (x int)")
    conn.execute("INSERT INTO s VALUES (1)")
    conn.commit()
    conn.execute("INSERT INTO s VALUES (2)")
    print("READY", flush=True)
    try:
        for _ in range(100):
            time.sleep(0.2)
            conn.execute("SELECT 1")
    except psycopg.OperationalError as e:
        print("TERMINATED", e.sqlstate, str(e).splitlines()[0], flush=True)
        return
    raise AssertionError("the session survived shutdown")


def case_after_sigterm():
    with connect() as conn:
        assert conn.execute("SELECT x FROM s ORDER BY x").fetchall() == [(1,)]


def case_hold_until_ended():
    """Holds a session (with an open transaction) until the server ends it."""
    conn = connect()
    conn.execute("SELECT count(*) FROM t")
    print("READY", flush=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            conn.execute("SELECT 1")
        except psycopg.Error as e:
            print("ENDED", e.sqlstate, str(e).splitlines()[0], flush=True)
            return
        time.sleep(0.05)
    raise AssertionError("the session was never ended")


def case_expect_inaccessible():
    e = expect_error(psycopg.OperationalError, lambda: connect())
    assert e.sqlstate == "57P03", (e.sqlstate, str(e))
    assert "Inaccessible" in str(e) and "customer-managed key" in str(e), str(e)
    print("REFUSED", str(e).splitlines()[0], flush=True)


CASES = {name[5:]: fn for name, fn in globals().items() if name.startswith("case_")}

if __name__ == "__main__":
    name = sys.argv[1]
    CASES[name]()
    print(f"ok {name}")
