"""PostgreSQL, and TimescaleDB when the extension is there: binary COPY, then one upsert."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import numpy as np
import pandas as pd
import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from metricmill.errors import DatabaseUnavailable, SchemaError
from metricmill.settings import mask_url
from storage.backend import (
    Backend,
    SeriesIds,
    WriteCounts,
    late_marks,
    series_seen_changes,
)
from storage.frames import PreparedBatch
from storage.locks import EXTENSION_LOCK, SCHEMA_LOCK
from storage.pg_copy import parse_array_copy
from storage.schema import LATEST_VERSION, POSTGRES_TYPES, ROLLUP_TABLES, migrations

TimescaleMode = Literal["auto", "off", "require"]

_CHUNK_INTERVALS = {
    "samples": "1 day",
    "rollup_1m": "7 days",
    "rollup_5m": "30 days",
    "rollup_1h": "90 days",
    "rollup_1d": "365 days",
}


class PostgresBackend(Backend):
    name = "postgresql"
    ts_in = "(timestamptz 'epoch' + %s::float8 * interval '1 microsecond')"
    ts_out = "(extract(epoch from {col}) * 1000000)::bigint"
    ids_in = "= ANY(%s::bigint[])"

    def labels_hold(self, pairs: Mapping[str, str]) -> tuple[str, list[Any]]:
        """JSONB containment: one condition for all pairs, any label name."""
        return "labels @> %s", [Jsonb(dict(pairs))]

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
        self.timescale_version: str | None = None
        self.timescale_note = ""
        self._detect_timescale()

    # -- plumbing -------------------------------------------------------------------------
    def execute(self, sql_text: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self.conn.cursor() as cur:
            cur.execute(sql_text.encode(), tuple(params) or None)
            return cur.fetchall() if cur.description else []

    def executemany(self, sql_text: str, rows: Sequence[Sequence[Any]]) -> None:
        with self.conn.cursor() as cur:
            cur.executemany(sql_text.encode(), rows)

    def read_columns(
        self, template: str, columns: Sequence[tuple[str, str, str]], params: Sequence[Any]
    ) -> dict[str, np.ndarray]:
        """The result as one COPY BINARY row holding an array per column, read into numpy:
        COPY sends a message per row, so one row keeps Python out of the per-value work (and
        no server-side sort: the order is restored here). Every column is cast to an 8-byte
        type (int8, float8, or timestamptz, whose binary form is µs from 2000). A NULL
        breaks the fixed element layout, and an array past PostgreSQL's 1 GB value limit
        cannot be built: then the text path."""
        casts = {"int": "int8", "float": "float8", "ts": "timestamptz"}
        inner = ", ".join(
            f"({expr})::{casts[kind]} AS c{i}" for i, (_, expr, kind) in enumerate(columns)
        )
        arrays = ", ".join(f"array_agg(c{i})" for i in range(len(columns)))
        statement = (
            f"COPY (SELECT {arrays} FROM ({template.replace('{columns}', inner)}) z) "  # noqa: S608
            "TO STDOUT (FORMAT BINARY)"
        )
        try:
            # A savepoint inside the caller's transaction: a COPY over the limit leaves the
            # transaction usable for the text path.
            with (
                self.conn.transaction(),
                self.conn.cursor() as cur,
                cur.copy(statement.encode(), tuple(params) or None) as copy,
            ):
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
    def _detect_timescale(self) -> None:
        if self.mode == "off":
            return
        rows = self.execute("SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'")
        if rows:
            self.timescale_version = rows[0][0]
            return
        available = self.execute(
            "SELECT default_version FROM pg_available_extensions WHERE name = 'timescaledb'"
        )
        preloaded = "timescaledb" in str(self.execute("SHOW shared_preload_libraries")[0][0])
        if not available:
            self.timescale_note = "not installed on this server"
        elif not preloaded:
            # CREATE EXTENSION would fail (and can end the session): say how to enable it.
            self.timescale_note = (
                "installed but not preloaded: add timescaledb to shared_preload_libraries"
            )
        else:
            try:
                # Concurrent first connections would race on the catalog: serialise them.
                with self.transaction():
                    self.execute("SELECT pg_advisory_xact_lock(%s)", (EXTENSION_LOCK,))
                    self.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
                self.timescale_version = self.execute(
                    "SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'"
                )[0][0]
            except psycopg.Error as exc:
                first_line = str(exc).splitlines()[0]
                self.timescale_note = f"available but could not be created: {first_line}"
        if self.mode == "require" and self.timescale_version is None:
            raise SchemaError(f"TimescaleDB is required but is {self.timescale_note}")

    @property
    def timescale(self) -> bool:
        return self.timescale_version is not None

    def _ensure_hypertables(self) -> None:
        existing = {
            r[0]
            for r in self.execute(
                "SELECT hypertable_name FROM timescaledb_information.hypertables "
                "WHERE hypertable_schema = current_schema()"
            )
        }
        for table, interval in _CHUNK_INTERVALS.items():
            if table in existing:
                continue
            order = "ts" if table == "samples" else "bucket"
            self.execute(
                "SELECT create_hypertable(%s::regclass, by_range(%s, %s::interval), "
                "migrate_data => true)",
                (table, order, interval),
            )
            self.execute(
                sql.SQL(
                    "ALTER TABLE {} SET (timescaledb.compress, "
                    "timescaledb.compress_segmentby = 'series_id', "
                    "timescaledb.compress_orderby = {})"
                )
                .format(sql.Identifier(table), sql.Literal(order))
                .as_string(self.conn)
            )

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
                    self._ensure_hypertables()
            if self.timescale and before >= 1:
                self._ensure_hypertables()  # the extension may have arrived after the schema
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
        from storage.pg_parts import write_parts_together

        return write_parts_together(
            self,
            batch.as_parts(),
            batch_ids=batch_ids,
            sources=sources,
            max_new_series=max_new_series,
        )

    def execute_seen_update(
        self, cur: psycopg.Cursor[Any], known: SeriesIds, batch: PreparedBatch
    ) -> None:
        known = self._lock_seen_spans(cur, known)
        late = late_marks(known, batch)
        if len(late):
            cur.execute(
                "INSERT INTO detect_late (series_id, from_ts) "  # noqa: S608
                f"SELECT u.sid, {self.ts_in.replace('%s', 'u.lo')} "
                "FROM unnest(%b::bigint[], %b::bigint[]) AS u(sid, lo)",
                (late[:, 0].tolist(), late[:, 1].tolist()),
            )
        changed = series_seen_changes(known, batch)
        if len(changed):
            cur.execute(
                "UPDATE series s SET "  # noqa: S608 - constant fragments only
                f"first_seen = LEAST(s.first_seen, {self.ts_in.replace('%s', 'u.lo')}), "
                f"last_seen = GREATEST(s.last_seen, {self.ts_in.replace('%s', 'u.hi')}) "
                "FROM unnest(%b::bigint[], %b::bigint[], %b::bigint[]) AS u(sid, lo, hi) "
                "WHERE s.series_id = u.sid",
                (changed[:, 0].tolist(), changed[:, 1].tolist(), changed[:, 2].tolist()),
            )

    def _lock_seen_spans(self, cur: psycopg.Cursor[Any], known: SeriesIds) -> SeriesIds:
        """`known` with the stored series' first/last seen as committed now, their rows locked
        (in id order) until the transaction ends. Concurrent writers of one series (parallel
        ingest runs) take its span one after the other: late marks (detect_late) are decided
        against every sample committed before, not against what the batch read at its start."""
        stored = np.flatnonzero(~known.is_new)
        if not len(stored):
            return known
        cur.execute(
            f"SELECT series_id, {self.ts_out.format(col='first_seen')}, "  # noqa: S608
            f"{self.ts_out.format(col='last_seen')} FROM series "
            "WHERE series_id = ANY(%s::bigint[]) ORDER BY series_id FOR NO KEY UPDATE",
            (known.ids[stored].tolist(),),
        )
        spans = {sid: (first, last) for sid, first, last in cur.fetchall()}
        first_us, last_us = known.first_us.copy(), known.last_us.copy()
        for pos, sid in zip(stored.tolist(), known.ids[stored].tolist(), strict=True):
            first, last = spans.get(sid, (None, None))
            if first is not None and last is not None:
                first_us[pos], last_us[pos] = first, last
        return SeriesIds(ids=known.ids, first_us=first_us, last_us=last_us, is_new=known.is_new)

    # -- reads ----------------------------------------------------------------------------
    def bucket_expr(self, step_us: int) -> str:
        width = f"interval '{int(step_us)} microseconds'"
        if self.timescale:
            return f"time_bucket({width}, ts, origin => timestamptz 'epoch')"
        return f"date_bin({width}, ts, timestamptz 'epoch')"

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
        hypertables = set()
        if self.timescale:
            hypertables = {
                r[0]
                for r in self.execute(
                    "SELECT hypertable_name FROM timescaledb_information.hypertables"
                )
            }
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
                for name, compressed in self.execute(
                    "SELECT hypertable_name, compression_enabled "
                    "FROM timescaledb_information.hypertables"
                )
            )
        return details
