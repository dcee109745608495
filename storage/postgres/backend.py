"""The PostgreSQL backend (TimescaleDB when the extension is there): the connection, the
schema, and PostgreSQL's answers to the dialect's questions. The write path is
storage/postgres/parts.py; COPY's binary format storage/postgres/copy_format.py; TimescaleDB's
own statements storage/postgres/timescale.py."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import pandas as pd
import psycopg
from psycopg.adapt import Dumper
from psycopg.pq import Format
from psycopg.types.json import Jsonb

from metricmill.errors import DatabaseUnavailable
from metricmill.settings import mask_url
from storage.backend import Backend
from storage.dialect import ColumnKind
from storage.frames import PreparedBatch
from storage.locks import ROLLUP_RETENTION_LOCK, SCHEMA_LOCK
from storage.postgres.copy_format import binary_array, parse_array_copy
from storage.postgres.parts import write_parts_together
from storage.postgres.timescale import (
    TimescaleMode,
    background_jobs,
    detect_timescale,
    ensure_hypertables,
    hypertable_names,
    hypertables_compression,
)
from storage.schema import LATEST_VERSION, POSTGRES_TYPES, ROLLUP_TABLES, migrations
from storage.write_rows import WriteCounts

# insert_columns' array type per column kind.
_ARRAY_TYPES: dict[ColumnKind, str] = {
    "bigint": "bigint[]",
    "integer": "integer[]",
    "text": "text[]",
    "float": "float8[]",
    "ts": "float8[]",  # ts_in casts to float8 anyway
}


class _Float8Array:
    """A float8[] parameter already in binary form (insert_columns)."""

    def __init__(self, values: np.ndarray) -> None:
        self.payload = binary_array(values, 701)


class _Int8Array:
    """An int8[] parameter already in binary form (insert_columns)."""

    def __init__(self, values: np.ndarray) -> None:
        self.payload = binary_array(values, 20)


class _Float8ArrayDumper(Dumper):
    format = Format.BINARY
    oid = 1022  # float8[]

    def dump(self, obj: _Float8Array) -> bytes:
        return obj.payload


class _Int8ArrayDumper(_Float8ArrayDumper):
    oid = 1016  # int8[]


class PostgresBackend(Backend):
    name = "postgresql"
    ts_in = "(timestamptz 'epoch' + %s::float8 * interval '1 microsecond')"
    ts_out = "(extract(epoch from {col}) * 1000000)::bigint"
    ids_in = "= ANY(%s::bigint[])"

    def __init__(self, url: str, timescaledb: TimescaleMode = "auto") -> None:
        super().__init__(url)
        self.mode = timescaledb
        try:
            self.conn = psycopg.connect(url, autocommit=True, connect_timeout=10)
        except psycopg.Error as exc:
            first_line = (
                str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            )
            raise DatabaseUnavailable(f"cannot connect to {mask_url(url)}: {first_line}") from None
        self.conn.adapters.register_dumper(_Float8Array, _Float8ArrayDumper)
        self.conn.adapters.register_dumper(_Int8Array, _Int8ArrayDumper)
        self.timescale_version, self.timescale_note = detect_timescale(self, timescaledb)

    # -- plumbing -------------------------------------------------------------------------
    def execute(self, sql_text: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self.conn.cursor() as cur:
            cur.execute(sql_text.encode(), tuple(params) or None)
            return cur.fetchall() if cur.description else []

    def executemany(self, sql_text: str, rows: Sequence[Sequence[Any]]) -> None:
        with self.conn.cursor() as cur:
            cur.executemany(sql_text.encode(), rows)

    def read_columns(
        self,
        template: str,
        columns: Sequence[tuple[str, str, str]],
        params: Sequence[Any],
        *,
        by_key: bool = False,
    ) -> dict[str, np.ndarray]:
        """The result as one COPY BINARY row holding an array per column, read into numpy:
        COPY sends a message per row, so one row keeps Python out of the per-value work (and
        no server-side sort: the order is restored here). Every column is cast to an 8-byte
        type (int8, float8, or timestamptz, whose binary form is µs from 2000); a NULL float
        is read as NaN. A NULL int or time breaks the fixed element layout, and an array past
        PostgreSQL's 1 GB value limit cannot be built: then the text path.

        `by_key` turns sequential scans off for this statement. Rows arrive in time order, so
        a series' rows are spread over the whole table, and once the table is analysed the
        planner prices the key lookups of a chunk of 1,000 series of 100,000 above a parallel
        scan of the whole table: every chunk then read the table once (baselines at 100,000
        series took 387 s where 10,000 took 23 s). The lookups cost what the chunk holds."""
        casts = {"int": "int8", "float": "float8", "ts": "timestamptz"}
        inner = ", ".join(
            # a NULL float is read as NaN, as the text path reads it, and keeps this path
            f"COALESCE(({expr})::float8, 'NaN'::float8) AS c{i}"
            if kind == "float"
            else f"({expr})::{casts[kind]} AS c{i}"
            for i, (_, expr, kind) in enumerate(columns)
        )
        arrays = ", ".join(f"array_agg(c{i})" for i in range(len(columns)))
        statement = (
            f"COPY (SELECT {arrays} FROM ({template.replace('{columns}', inner)}) z) "  # noqa: S608
            "TO STDOUT (FORMAT BINARY)"
        )
        try:
            # A savepoint inside the caller's transaction: a COPY over the limit leaves the
            # transaction usable for the text path. A keyed read rolls its savepoint back (it
            # only read), which undoes its SET LOCAL: a released one would outlive it.
            with (
                self.conn.transaction(force_rollback=by_key),
                self.conn.cursor() as cur,
            ):
                if by_key:
                    cur.execute("SET LOCAL enable_seqscan = off")
                with cur.copy(statement.encode(), tuple(params) or None) as copy:
                    data = b"".join(copy)
        except psycopg.errors.ProgramLimitExceeded:
            data = b""
        parsed = parse_array_copy(data, [kind for _, _, kind in columns])
        if parsed is None:
            return super().read_columns(template, columns, params)
        out = {name: parsed[i] for i, (name, _, _) in enumerate(columns)}
        if len(columns) > 1:
            first, second = out[columns[0][0]], out[columns[1][0]]
            step = np.diff(first)
            if not ((step > 0) | ((step == 0) & (np.diff(second) >= 0))).all():
                order = np.lexsort((second, first))
                out = {name: values[order] for name, values in out.items()}
        return out

    @contextmanager
    def transaction(self) -> Iterator[None]:
        with self.conn.transaction():
            yield

    def close(self) -> None:
        self.conn.close()

    # -- TimescaleDB ----------------------------------------------------------------------
    @property
    def timescale(self) -> bool:
        return self.timescale_version is not None

    def timescale_jobs(self) -> list[tuple[str, str, bool]]:
        return background_jobs(self) if self.timescale else []

    def compressed_hypertables(self) -> list[tuple[str, bool]]:
        return hypertables_compression(self, this_schema=True) if self.timescale else []

    # -- schema ---------------------------------------------------------------------------
    def schema_version(self) -> int | None:
        if self.execute("SELECT to_regclass('schema_version')")[0][0] is None:
            return None
        return self.execute("SELECT max(version) FROM schema_version")[0][0]

    def migrate(self, target: int = LATEST_VERSION) -> tuple[int, int]:
        steps = migrations(POSTGRES_TYPES, "{col}")
        with self.transaction():
            # Serialise concurrent `init`s on one database.
            self.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
            self.execute(
                "CREATE TABLE IF NOT EXISTS schema_version "
                "(version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
            )
            before = self.schema_version() or 0
            for version in range(before + 1, target + 1):
                for statement in steps[version]:
                    self.execute(statement)
                self.execute("INSERT INTO schema_version (version) VALUES (%s)", (version,))
                if version == 1 and self.timescale:
                    ensure_hypertables(self)
            if self.timescale and before >= 1:
                ensure_hypertables(self)  # the extension may have arrived after the schema
        return before, max(before, target)

    # -- writes ---------------------------------------------------------------------------
    def write_ledger(self, values: tuple[Any, ...]) -> None:
        # The row was inserted as 'writing' at the start of the transaction (it is the lock).
        self.execute(
            "UPDATE ingest_batches SET status = %s, rows_in = %s, written = %s, "  # noqa: S608
            "overwritten = %s, unchanged = %s, quarantined = %s, new_series = %s, "
            f"min_ts = {self.ts_in}, max_ts = {self.ts_in} WHERE batch_id = %s",
            (*values[2:], values[0]),
        )

    def write_prepared(
        self,
        batch: PreparedBatch,
        *,
        batch_id: str,
        source: str,
        max_new_series: int | None = None,
    ) -> WriteCounts:
        return self.write_parts(
            batch.as_parts(), batch_ids=[batch_id], sources=[source], max_new_series=max_new_series
        )[0]

    def write_parts(
        self,
        batch: PreparedBatch,
        *,
        batch_ids: Sequence[str],
        sources: Sequence[str],
        max_new_series: int | None = None,
    ) -> list[WriteCounts]:
        return write_parts_together(
            self,
            batch.as_parts(),
            batch_ids=batch_ids,
            sources=sources,
            max_new_series=max_new_series,
        )

    # -- dialect ----------------------------------------------------------------------------
    def plus_us(self, column: str, us: int) -> str:
        return f"({column} + interval '{int(us)} microseconds')"

    def labels_hold(self, pairs: Mapping[str, str]) -> tuple[str, list[Any]]:
        """JSONB containment: one condition for all pairs, any label name."""
        return "labels @> %s", [Jsonb(dict(pairs))]

    def delete_counted(self, table: str, where: str, params: Sequence[Any]) -> int:
        rows = self.execute(
            f"WITH gone AS (DELETE FROM {table} WHERE {where} RETURNING 1) "  # noqa: S608
            "SELECT count(*) FROM gone",
            params,
        )
        return int(rows[0][0])

    def insert_columns(
        self,
        table: str,
        columns: Sequence[tuple[str, ColumnKind]],
        values: Sequence[Sequence[Any]],
        *,
        on_conflict: str = "",
    ) -> None:
        """One INSERT … SELECT FROM unnest of a bound array per column. Numbers are bound
        as binary arrays built by numpy (as text, psycopg quoted every element in Python:
        most of a 100,000-series baseline run's time); None and NaN of a float or ts column
        are NULL, as before."""
        names = ", ".join(name for name, _ in columns)
        selects, arrays, params = [], [], []
        for (name, kind), column in zip(columns, values, strict=True):
            bound, expr = _bound_array(kind, column), f"u.{name}"
            if isinstance(bound, _Float8Array):
                expr = f"nullif({expr}, 'NaN'::float8)"
            selects.append(self.ts_in.replace("%s", expr) if kind == "ts" else expr)
            arrays.append(f"%s::{_ARRAY_TYPES[kind]}")
            params.append(bound)
        self.execute(
            f"INSERT INTO {table} ({names}) SELECT {', '.join(selects)} "  # noqa: S608
            f"FROM unnest({', '.join(arrays)}) AS u({names}) {on_conflict}",
            params,
        )

    def lock_for_deleting(self, first: str | None = None) -> None:
        """A snapshot that sees what the locks waited for: REPEATABLE READ, taken after the
        caller's own LOCK, the SHARE lock on retention_rules (new rules wait for commit) and
        the lock rollup transactions hold."""
        self.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        if first is not None:
            self.execute(first)  # before any SELECT: the snapshot sees what it waited for
        self.execute("LOCK TABLE retention_rules IN SHARE MODE")
        self.execute("SELECT pg_advisory_xact_lock(%s)", (ROLLUP_RETENTION_LOCK,))

    def latest_points(self, ids: list[int]) -> pd.DataFrame:
        rows = self.execute(
            f"SELECT l.series_id, {self.ts_out.format(col='l.ts')}, l.value "  # noqa: S608
            "FROM unnest(%s::bigint[]) AS i(id) CROSS JOIN LATERAL ("
            "SELECT series_id, ts, value FROM samples WHERE series_id = i.id "
            "ORDER BY ts DESC LIMIT 1) l ORDER BY l.series_id",
            (ids,),
        )
        return pd.DataFrame(rows, columns=["series_id", "ts_us", "value"])

    def table_bytes(self) -> dict[str, int]:
        hypertables = hypertable_names(self) if self.timescale else set()
        sizes = {}
        for table in ["series", "samples", *ROLLUP_TABLES.values(), "ingest_batches", "quarantine"]:
            query = (
                "SELECT coalesce(hypertable_size(%s::regclass), 0)"
                if table in hypertables
                else "SELECT pg_total_relation_size(%s::regclass)"
            )
            sizes[table] = int(self.execute(query, (table,))[0][0])
        return sizes

    def health_details(self) -> dict[str, Any]:
        details: dict[str, Any] = {
            "server_version": self.execute("SHOW server_version")[0][0],
            "database": self.execute("SELECT current_database()")[0][0],
            "timescaledb": self.timescale_version or f"off ({self.timescale_note or 'disabled'})",
        }
        if self.timescale:
            details["hypertables"] = sorted(
                f"{name} (compression {'on' if compressed else 'off'})"
                for name, compressed in hypertables_compression(self, this_schema=False)
            )
        return details


def _bound_array(kind: ColumnKind, column: Sequence[Any]) -> Any:
    """A column of insert_columns as its parameter: a binary array for numbers (a list where
    an integer column holds a None), the list for text."""
    try:
        if kind in ("float", "ts"):
            return _Float8Array(np.asarray(column, dtype=np.float64))  # None becomes NaN
        if kind in ("bigint", "integer"):
            ints = np.asarray(column)
            if ints.dtype.kind in "iub":  # never truncate a float: the server refuses it
                return _Int8Array(ints.astype(np.int64))
    except (TypeError, ValueError):
        pass
    return list(column)
