"""TimescaleDB: finding or creating the extension, hypertables with compression, and chunk
housekeeping (compress old chunks, drop whole chunks past retention, list background jobs).

Every function takes a backend already known to be on TimescaleDB (callers ask
`backend.timescale`), except `detect_timescale`, which finds out.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import psycopg
from psycopg import sql

from metricmill.errors import SchemaError
from storage.backend import Backend
from storage.locks import EXTENSION_LOCK

if TYPE_CHECKING:
    from storage.postgres.backend import PostgresBackend

TimescaleMode = Literal["auto", "off", "require"]

CHUNK_INTERVALS = {
    "samples": "1 day",
    "rollup_1m": "7 days",
    "rollup_5m": "30 days",
    "rollup_1h": "90 days",
    "rollup_1d": "365 days",
}


def detect_timescale(backend: Backend, mode: TimescaleMode) -> tuple[str | None, str]:
    """(extension version or None, why not): the extension as found, or created when the
    server has it preloaded. Mode "require" turns its absence into a SchemaError."""
    if mode == "off":
        return None, ""
    rows = backend.execute("SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'")
    if rows:
        return rows[0][0], ""
    version, note = None, ""
    available = backend.execute(
        "SELECT default_version FROM pg_available_extensions WHERE name = 'timescaledb'"
    )
    preloaded = "timescaledb" in str(backend.execute("SHOW shared_preload_libraries")[0][0])
    if not available:
        note = "not installed on this server"
    elif not preloaded:
        # CREATE EXTENSION would fail (and can end the session): say how to enable it.
        note = "installed but not preloaded: add timescaledb to shared_preload_libraries"
    else:
        try:
            # Concurrent first connections would race on the catalog: serialise them.
            with backend.transaction():
                backend.execute("SELECT pg_advisory_xact_lock(%s)", (EXTENSION_LOCK,))
                backend.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
            version = backend.execute(
                "SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'"
            )[0][0]
        except psycopg.Error as exc:
            first_line = str(exc).splitlines()[0]
            note = f"available but could not be created: {first_line}"
    if mode == "require" and version is None:
        raise SchemaError(f"TimescaleDB is required but is {note}")
    return version, note


def ensure_hypertables(backend: PostgresBackend) -> None:
    """Turn samples and the rollup tables into compressed hypertables, those not yet ones."""
    existing = {
        r[0]
        for r in backend.execute(
            "SELECT hypertable_name FROM timescaledb_information.hypertables "
            "WHERE hypertable_schema = current_schema()"
        )
    }
    for table, interval in CHUNK_INTERVALS.items():
        if table in existing:
            continue
        order = "ts" if table == "samples" else "bucket"
        backend.execute(
            "SELECT create_hypertable(%s::regclass, by_range(%s, %s::interval), "
            "migrate_data => true)",
            (table, order, interval),
        )
        backend.execute(
            sql.SQL(
                "ALTER TABLE {} SET (timescaledb.compress, "
                "timescaledb.compress_segmentby = 'series_id', "
                "timescaledb.compress_orderby = {})"
            )
            .format(sql.Identifier(table), sql.Literal(order))
            .as_string(backend.conn)
        )


def hypertable_names(backend: Backend) -> set[str]:
    """Every hypertable the database holds."""
    return {
        r[0]
        for r in backend.execute("SELECT hypertable_name FROM timescaledb_information.hypertables")
    }


def hypertables_compression(backend: Backend, *, this_schema: bool) -> list[tuple[str, bool]]:
    """(hypertable, compression enabled), by name; of the current schema or of all."""
    where = "WHERE hypertable_schema = current_schema() " if this_schema else ""
    rows = backend.execute(
        "SELECT hypertable_name, compression_enabled "  # noqa: S608 - a constant condition
        f"FROM timescaledb_information.hypertables {where}ORDER BY hypertable_name"
    )
    return [(str(h), bool(c)) for h, c in rows]


def background_jobs(backend: Backend) -> list[tuple[str, str, bool]]:
    """TimescaleDB's background jobs on hypertables: (policy, hypertable, scheduled)."""
    rows = backend.execute(
        "SELECT proc_name, coalesce(hypertable_name, ''), scheduled "
        "FROM timescaledb_information.jobs WHERE proc_schema = '_timescaledb_functions' "
        "AND hypertable_name IS NOT NULL ORDER BY hypertable_name, proc_name"
    )
    return [(str(p), str(h), bool(s)) for p, h, s in rows]


def drop_boundary(backend: Backend, table: str, limit_us: int) -> int | None:
    """The latest chunk end of `table` at or before `limit_us` (µs), or None: no whole chunk."""
    value = backend.execute(
        f"SELECT {backend.ts_out.format(col='max(range_end)')} "  # noqa: S608
        "FROM timescaledb_information.chunks WHERE hypertable_schema = current_schema() "
        f"AND hypertable_name = %s AND range_end <= {backend.ts_in}",
        (table, limit_us),
    )[0][0]
    return None if value is None else int(value)


def drop_chunks_before(backend: Backend, table: str, boundary_us: int) -> int:
    """drop_chunks for every chunk of `table` that ends at or before the boundary."""
    rows = backend.execute(
        "SELECT count(*) FROM drop_chunks(%s::regclass, "  # noqa: S608
        f"older_than => {backend.ts_in})",
        (table, boundary_us),
    )
    return int(rows[0][0])


def compress_old_chunks(backend: Backend, days: int, table: str = "samples") -> int:
    """Compress the table's uncompressed chunks that ended more than `days` days ago."""
    if days <= 0:
        return 0
    rows = backend.execute(
        "SELECT count(compress_chunk((quote_ident(chunk_schema) || '.' || "
        "quote_ident(chunk_name))::regclass, if_not_compressed => true)) "
        "FROM timescaledb_information.chunks WHERE hypertable_schema = current_schema() "
        "AND hypertable_name = %s AND NOT is_compressed "
        "AND range_end <= now() - make_interval(days => %s)",
        (table, days),
    )
    return int(rows[0][0])


def compressed_chunks(backend: Backend, table: str = "samples") -> int:
    rows = backend.execute(
        "SELECT count(*) FROM timescaledb_information.chunks "
        "WHERE hypertable_schema = current_schema() AND hypertable_name = %s AND is_compressed",
        (table,),
    )
    return int(rows[0][0])


def chunks_before(backend: Backend, table: str, limit_us: int) -> list[tuple[str, str, int, int]]:
    """(schema, name, range start µs, range end µs) of the table's chunks that end at or
    before `limit_us`, oldest first."""
    rows = backend.execute(
        f"SELECT chunk_schema, chunk_name, {backend.ts_out.format(col='range_start')}, "  # noqa: S608
        f"{backend.ts_out.format(col='range_end')} FROM timescaledb_information.chunks "
        "WHERE hypertable_schema = current_schema() AND hypertable_name = %s "
        f"AND range_end <= {backend.ts_in} ORDER BY range_start",
        (table, limit_us),
    )
    return [(str(a), str(b), int(c), int(d)) for a, b, c, d in rows]


def drop_chunk_range(backend: Backend, table: str, start_us: int, end_us: int) -> int:
    """drop_chunks for the chunks lying wholly in [start, end)."""
    rows = backend.execute(
        "SELECT count(*) FROM drop_chunks(%s::regclass, "  # noqa: S608
        f"older_than => {backend.ts_in}, newer_than => {backend.ts_in})",
        (table, end_us, start_us),
    )
    return int(rows[0][0])
