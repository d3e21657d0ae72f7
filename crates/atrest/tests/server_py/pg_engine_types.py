"""psycopg 3 against the postgres engine: numeric, boolean, timestamptz,
jsonb and arrays come back exactly as PostgreSQL returns them (Decimal, bool,
aware datetime, dict, list), in text and in binary format."""
import datetime
import decimal
import os
import sys

import psycopg

conninfo = (
    f"host=localhost port={os.environ['ATREST_PORT']} user=atrest dbname=postgres "
    f"sslmode=verify-full sslrootcert={os.environ['ATREST_CA']} password={os.environ['ATREST_PASSWORD']}"
)

D = decimal.Decimal
UTC = datetime.timezone.utc
rows = [
    (1, D("12345678901234567890.123456789"), True,
     datetime.datetime(2026, 12, 3, 10, 11, 12, 345678, tzinfo=UTC),
     {"a": [1, 2, {"b": None}], "c": "é"}, [1, 2, 3], ["x", "y z", None]),
    (2, D("-0.000000000000000001"), False,
     datetime.datetime(1999, 12, 31, 23, 59, 59, tzinfo=datetime.timezone(datetime.timedelta(hours=5, minutes=30))),
     [], [], []),
    (3, D("NaN"), None, None, None, None, None),
]

with psycopg.connect(conninfo) as conn:
    conn.execute("set timezone = 'UTC'")
    conn.execute("drop table if exists typed")
    conn.execute(
        "create table typed(id int primary key, n numeric, b boolean, t timestamptz, j jsonb, a int[], s text[])"
    )
    with conn.cursor() as cur:
        cur.executemany(
            "insert into typed values (%s, %s, %s, %s, %s, %s, %s)",
            [(i, n, b, t, psycopg.types.json.Jsonb(j) if j is not None else None, a, s) for (i, n, b, t, j, a, s) in rows],
        )
    conn.commit()
    for binary in (False, True):
        with conn.cursor(binary=binary) as cur:
            got = cur.execute("select * from typed order by id").fetchall()
        for want, have in zip(rows, got):
            w = list(want)
            h = list(have)
            # NaN is not equal to itself.
            if w[1].is_nan():
                assert h[1].is_nan(), (binary, h)
                w[1] = h[1] = None
            assert w == h, (binary, w, h)
            assert have[2] is None or type(have[2]) is bool
            assert have[1] is None or type(have[1]) is D
        total = conn.execute("select sum(n) from typed where id < 3", binary=binary).fetchone()[0]
        assert total == D("12345678901234567890.123456788999999999"), total
        assert conn.execute("select 0.1::numeric + 0.2", binary=binary).fetchone()[0] == D("0.3")
        assert conn.execute("select true and not false", binary=binary).fetchone()[0] is True
    # Catalogue queries applications and ORMs send.
    cols = conn.execute(
        "select column_name, data_type from information_schema.columns where table_name = 'typed' order by ordinal_position"
    ).fetchall()
    assert cols == [("id", "integer"), ("n", "numeric"), ("b", "boolean"), ("t", "timestamp with time zone"),
                    ("j", "jsonb"), ("a", "ARRAY"), ("s", "ARRAY")], cols
print("ok types")
