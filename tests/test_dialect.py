"""The per-database answers of storage/dialect.py give the same results on every backend.

Callers in storage/ ask the backend (a counted delete, a bulk insert of columns, a timestamp
plus microseconds, a bound boolean, TimescaleDB's state) instead of branching on its name, so
each answer is checked here against a real database of each kind.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import psycopg
import pytest

from storage.backend import Backend
from storage.locks import ROLLUP_RETENTION_LOCK
from storage.schema import POSTGRES_TYPES, SQLITE_TYPES
from storage.store import Store
from tests.dbtargets import DbTarget

T0 = 1_714_557_600_123_456  # 2024-05-01T10:00:00.123456Z, in µs: sub-millisecond on purpose


@pytest.fixture
def store(db_target: DbTarget) -> Iterator[Store]:
    with Store.open(db_target.url, timescaledb=db_target.timescaledb, init=True) as opened:
        types = SQLITE_TYPES if db_target.name == "sqlite" else POSTGRES_TYPES
        opened.backend.execute(
            "CREATE TABLE scratch (a BIGINT PRIMARY KEY, b INTEGER, c TEXT, "
            f"d {types.float}, e {types.ts}, f {types.bool})"
        )
        yield opened


def _scratch(backend: Backend) -> list[tuple[int, int, str, float, int, object]]:
    return [
        (int(a), int(b), str(c), float(d), int(e), f)
        for a, b, c, d, e, f in backend.execute(
            f"SELECT a, b, c, d, {backend.ts_out.format(col='e')}, f FROM scratch ORDER BY a"
        )
    ]


COLUMNS = [("a", "bigint"), ("b", "integer"), ("c", "text"), ("d", "float"), ("e", "ts")]


def test_insert_columns_stores_each_kind_exactly(store: Store) -> None:
    b = store.backend
    with b.transaction():
        b.insert_columns(
            "scratch",
            COLUMNS,
            [[1, 2, 3], [10, 20, 30], ["x", "y", "é"], [0.5, -1.25, 1e300], [T0, T0 + 1, 0]],
        )
    assert [row[:5] for row in _scratch(b)] == [
        (1, 10, "x", 0.5, T0),
        (2, 20, "y", -1.25, T0 + 1),
        (3, 30, "é", 1e300, 0),
    ]


def test_insert_columns_takes_numpy_arrays_and_stores_nan_and_none_as_null(store: Store) -> None:
    """Numeric columns may come as numpy arrays (PostgreSQL binds them as binary arrays):
    values exact, a float's NaN or None NULL, an empty insert harmless."""
    b = store.backend
    with b.transaction():
        b.insert_columns(
            "scratch",
            COLUMNS,
            [
                np.array([1, 2, 3, 2**62], dtype=np.int64),
                np.array([-7, 0, 2**31 - 1, 5], dtype=np.int64),
                ["x", "y", "z", "w"],
                np.array([0.1, np.nan, -5e-324, 1e300]),
                [T0, None, 0, T0 + 1],
            ],
        )
        b.insert_columns("scratch", COLUMNS, [np.array([], dtype=np.int64)] * 2 + [[], [], []])
    rows = b.execute(f"SELECT a, b, c, d, {b.ts_out.format(col='e')} FROM scratch ORDER BY a")
    assert [tuple(row) for row in rows] == [
        (1, -7, "x", 0.1, T0),
        (2, 0, "y", None, None),
        (3, 2**31 - 1, "z", -5e-324, 0),
        (2**62, 5, "w", 1e300, T0 + 1),
    ]


def test_insert_columns_on_conflict_keeps_the_greater_timestamp(store: Store) -> None:
    """The watermark upsert's shape: `greatest` and `now` are the dialect's own words."""
    b = store.backend
    upsert = (
        f"ON CONFLICT (a) DO UPDATE SET e = {b.greatest}(scratch.e, excluded.e), c = excluded.c"
    )
    with b.transaction():
        b.insert_columns("scratch", COLUMNS, [[1, 2], [1, 2], ["a", "b"], [0.0, 0.0], [T0, T0]])
    with b.transaction():
        b.insert_columns(
            "scratch",
            COLUMNS,
            [[1, 2, 3], [0, 0, 0], ["c", "d", "e"], [0.0, 0.0, 0.0], [T0 - 5, T0 + 5, 7]],
            on_conflict=upsert,
        )
    assert [(a, c, e) for a, _, c, _, e, _ in _scratch(b)] == [
        (1, "c", T0),  # an older timestamp never moves it back
        (2, "d", T0 + 5),
        (3, "e", 7),
    ]
    stamp = b.execute(f"SELECT {b.ts_out.format(col=b.now)}")[0][0]
    assert abs(int(stamp) - time.time() * 1e6) < 600e6  # the database's clock, in µs


def test_delete_counted_says_how_many_rows_went(store: Store) -> None:
    b = store.backend
    with b.transaction():
        b.insert_columns(
            "scratch",
            COLUMNS,
            [[1, 2, 3, 4], [1, 1, 2, 1], ["k"] * 4, [0.0] * 4, [T0] * 4],
        )
    with b.transaction():
        assert b.delete_counted("scratch", "b = %s AND a > %s", [1, 1]) == 2
    with b.transaction():
        assert b.delete_counted("scratch", "b = %s", [9]) == 0
    assert [row[0] for row in _scratch(b)] == [1, 3]


def test_plus_us_adds_microseconds_to_a_stored_timestamp(store: Store) -> None:
    b = store.backend
    for us in (0, 1, 90_000_000, 86_400_000_000 * 366):
        shifted = b.plus_us(b.ts_in, us)
        value = b.execute(f"SELECT {b.ts_out.format(col=shifted)}", (T0,))[0][0]
        assert int(value) == T0 + us


def test_sql_bool_matches_a_boolean_column(store: Store) -> None:
    b = store.backend
    with b.transaction():
        b.executemany(
            f"INSERT INTO scratch (a, b, c, d, e, f) VALUES (%s, 0, '', 0, {b.ts_in}, %s)",
            [(1, T0, b.sql_bool(True)), (2, T0, b.sql_bool(False)), (3, T0, b.sql_bool(True))],
        )
    for flag, expected in ((True, [1, 3]), (False, [2])):
        rows = b.execute("SELECT a FROM scratch WHERE f = %s ORDER BY a", (b.sql_bool(flag),))
        assert [int(r[0]) for r in rows] == expected


def test_timescale_state_is_asked_not_guessed(store: Store, db_target: DbTarget) -> None:
    b = store.backend
    assert b.timescale is (db_target.name == "timescaledb")
    if not b.timescale:
        assert b.timescale_jobs() == []
        assert b.compressed_hypertables() == []
        return
    hypertables = dict(b.compressed_hypertables())
    assert hypertables["samples"] is True
    assert {"rollup_1m", "rollup_5m", "rollup_1h", "rollup_1d"} <= set(hypertables)


def test_lock_for_deleting_holds_the_rollup_lock_and_a_stable_snapshot(
    pg_only_target: DbTarget,
) -> None:
    with Store.open(pg_only_target.url, timescaledb=pg_only_target.timescaledb, init=True) as store:
        b = store.backend
        with psycopg.connect(pg_only_target.url, autocommit=True) as other:
            with b.transaction():
                b.lock_for_deleting("LOCK TABLE samples IN SHARE ROW EXCLUSIVE MODE")
                assert b.execute("SHOW transaction_isolation")[0][0] == "repeatable read"
                taken = other.execute(
                    "SELECT pg_try_advisory_lock(%s)", (ROLLUP_RETENTION_LOCK,)
                ).fetchone()
                assert taken == (False,)  # a rollup transaction would wait
                other.execute("SET lock_timeout = '200ms'")
                with pytest.raises(psycopg.errors.LockNotAvailable):
                    other.execute(
                        "INSERT INTO retention_rules (metric_pattern, labels, level, "
                        "retention_days, priority) VALUES ('x', '{}', 'raw', 1, 0)"
                    )
            taken = other.execute(
                "SELECT pg_try_advisory_lock(%s)", (ROLLUP_RETENTION_LOCK,)
            ).fetchone()
            assert taken == (True,)  # released at commit
