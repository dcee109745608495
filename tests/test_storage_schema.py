"""The versioned schema: idempotent init, in-place upgrades, refusing the future, hypertables."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from metricmill.errors import SchemaError
from storage.schema import LATEST_VERSION, ROLLUP_TABLES
from storage.store import Store
from tests.dbtargets import DbTarget

T0 = datetime(2024, 5, 1, 10, 0, tzinfo=UTC)
ROWS = [
    {"metric": "cpu", "labels": {"host": "a"}, "ts": T0 + timedelta(minutes=i), "value": float(i)}
    for i in range(5)
]
MISSING_RELATION = (sqlite3.OperationalError, psycopg.errors.UndefinedTable)


def open_store(target: DbTarget, *, init: bool = True) -> Store:
    return Store.open(target.url, timescaledb=target.timescaledb, init=init)


def schema_snapshot(store: Store, target: DbTarget) -> list[tuple[Any, ...]]:
    """Every table, view and column definition, in a stable order."""
    if target.name == "sqlite":
        return store.backend.execute(
            "SELECT type, name, sql FROM sqlite_master WHERE name NOT LIKE 'sqlite_%' "
            "ORDER BY type, name"
        )
    return store.backend.execute(
        "SELECT c.relname, c.relkind, a.attname, format_type(a.atttypid, a.atttypmod), "
        "a.attnotnull FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped "
        "WHERE n.nspname = current_schema() ORDER BY c.relname, a.attnum"
    )


def test_init_twice_is_a_noop(db_target: DbTarget) -> None:
    with open_store(db_target) as store:
        store.write_samples(ROWS)
        before = schema_snapshot(store, db_target)

        assert store.init() == (LATEST_VERSION, LATEST_VERSION)

        assert schema_snapshot(store, db_target) == before
        assert store.backend.execute("SELECT version FROM schema_version ORDER BY version") == [
            (version,) for version in range(1, LATEST_VERSION + 1)
        ]
        assert store.stats()["samples"] == len(ROWS)
    with open_store(db_target) as reopened:
        assert schema_snapshot(reopened, db_target) == before


def test_version_1_database_upgrades_in_place(db_target: DbTarget) -> None:
    with open_store(db_target, init=False) as old:
        assert old.schema_version() is None
        assert old.init(target=1) == (0, 1)
        assert old.schema_version() == 1
        old.write_samples(ROWS)
        with pytest.raises(MISSING_RELATION):
            old.backend.execute("SELECT count(*) FROM metrics_view")

    with open_store(db_target) as upgraded:
        assert upgraded.schema_version() == LATEST_VERSION
        if db_target.name != "sqlite":  # version 3: room for in-place updates of series rows
            options = upgraded.backend.execute(
                "SELECT reloptions FROM pg_class WHERE relname = 'series'"
            )
            assert options == [(["fillfactor=70"],)]
        points = upgraded.query("cpu", start=T0, end=T0 + timedelta(hours=1))
        assert points["value"].tolist() == [float(i) for i in range(5)]
        view_rows = upgraded.backend.execute("SELECT metric, value FROM metrics_view ORDER BY time")
        assert view_rows == [("cpu", float(i)) for i in range(5)]
        assert upgraded.backend.execute("SELECT count(*) FROM rollup_1m_view") == [(0,)]
        assert upgraded.health().ok


def test_newer_schema_version_is_refused(db_target: DbTarget) -> None:
    with open_store(db_target) as store:
        if db_target.name == "sqlite":
            store.backend.execute(
                "INSERT INTO schema_version VALUES (%s, 0)", (LATEST_VERSION + 1,)
            )
        else:
            store.backend.execute(
                "INSERT INTO schema_version (version) VALUES (%s)", (LATEST_VERSION + 1,)
            )

    with pytest.raises(SchemaError, match="newer"):
        open_store(db_target)
    with open_store(db_target, init=False) as store, pytest.raises(SchemaError):
        store.init()


def test_timescaledb_keeps_samples_and_rollups_in_compressed_hypertables(
    pg_only_target: DbTarget,
) -> None:
    with open_store(pg_only_target) as store:
        extension = store.backend.execute(
            "SELECT extname FROM pg_extension WHERE extname = 'timescaledb'"
        )
        hypertables = (
            dict(
                store.backend.execute(
                    "SELECT hypertable_name, compression_enabled "
                    "FROM timescaledb_information.hypertables "
                    "WHERE hypertable_schema = current_schema()"
                )
            )
            if extension
            else {}
        )

    if pg_only_target.name == "timescaledb":
        expected = {"samples", *ROLLUP_TABLES.values()}
        assert hypertables == dict.fromkeys(expected, True)
    else:
        assert extension == []
        assert hypertables == {}
