"""TimescaleDB chunk housekeeping: compress old chunks, drop whole chunks past retention."""

from __future__ import annotations

from storage.backend import Backend


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
