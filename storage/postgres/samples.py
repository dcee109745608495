"""The samples of a PostgreSQL write: rows that cannot exist yet by binary COPY, the others
through a staging table and one upsert per layer of overlapping parts."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import psycopg
from psycopg import sql

from storage.frames import PreparedBatch
from storage.postgres.copy_format import binary_copy_payload
from storage.write_rows import NO_TS, SeriesIds

if TYPE_CHECKING:
    from storage.postgres.backend import PostgresBackend

_PART_STAGE = "sample_part_stage"


def _layers(ids: np.ndarray, ts: np.ndarray) -> np.ndarray:
    """Per row (sorted by series id, ts, then part): how many rows of earlier parts share its
    (series, ts). Layer 0 holds each key once; layer k overwrites layer k - 1."""
    if not len(ids):
        return np.zeros(0, dtype=np.int64)
    same = (ids[1:] == ids[:-1]) & (ts[1:] == ts[:-1])
    starts = np.flatnonzero(np.concatenate(([True], ~same)))
    group = np.cumsum(np.concatenate(([True], ~same))) - 1
    return np.arange(len(ids), dtype=np.int64) - starts[group]


def _upsert(
    cur: psycopg.Cursor[Any],
    ids: np.ndarray,
    ts: np.ndarray,
    values: np.ndarray,
    parts: np.ndarray,
    n_parts: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Insert or overwrite rows whose (series, ts) are unique among them; (inserted,
    overwritten) per part. The stage table is emptied first: it is reused within the
    transaction (layer after layer) and by the same session's next transaction."""
    stage = sql.Identifier(_PART_STAGE)
    cur.execute(
        sql.SQL(
            "CREATE TEMP TABLE IF NOT EXISTS {} (series_id bigint, ts timestamptz, "
            "value float8, part int4) ON COMMIT DELETE ROWS"
        ).format(stage)
    )
    cur.execute(sql.SQL("TRUNCATE {}").format(stage))
    with cur.copy(
        sql.SQL("COPY {} (series_id, ts, value, part) FROM STDIN (FORMAT BINARY)").format(stage)
    ) as copy:
        copy.write(binary_copy_payload(ids, ts, values, parts))
    cur.execute(
        sql.SQL(
            "WITH up AS (INSERT INTO samples (series_id, ts, value) "
            "SELECT series_id, ts, value FROM {stage} "
            "ON CONFLICT (series_id, ts) DO UPDATE SET value = EXCLUDED.value "
            "WHERE samples.value IS DISTINCT FROM EXCLUDED.value "
            "RETURNING series_id, ts, (xmax = 0) AS inserted) "
            "SELECT st.part, count(*) FILTER (WHERE up.inserted), "
            "count(*) FILTER (WHERE NOT up.inserted) "
            "FROM up JOIN {stage} st USING (series_id, ts) GROUP BY st.part"
        ).format(stage=stage)
    )
    inserted = np.zeros(n_parts, dtype=np.int64)
    updated = np.zeros(n_parts, dtype=np.int64)
    for part, ins, upd in cur.fetchall():
        inserted[part], updated[part] = ins, upd
    return inserted, updated


def write_samples(
    backend: PostgresBackend,
    cur: psycopg.Cursor[Any],
    batch: PreparedBatch,
    known: SeriesIds,
    n_parts: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Write the rows as the parts written one after the other would leave them: the later
    part's value wins a (series, ts) that several parts hold. (written, overwritten,
    unchanged) per part.

    Layer 0 (each key's first part) goes in at once: COPY for rows that cannot exist yet,
    one upsert for the others. Each further layer is one upsert over the one before."""
    assert batch.parts is not None
    ids = known.ids[batch.codes]
    order = np.lexsort((batch.parts, batch.ts_us, ids))
    ids, ts, codes = ids[order], batch.ts_us[order], batch.codes[order]
    values, parts = batch.values[order], batch.parts[order]
    layer = _layers(ids, ts)
    first, last = known.first_us[codes], known.last_us[codes]
    may_exist = (layer > 0) | ((last != NO_TS) & (ts >= first) & (ts <= last))
    written = np.zeros(n_parts, dtype=np.int64)
    overwritten = np.zeros(n_parts, dtype=np.int64)
    unchanged = np.zeros(n_parts, dtype=np.int64)
    fresh = ~may_exist
    if fresh.any():
        # A concurrent writer racing us to one of these rows sends them all to the upsert.
        try:
            with (
                backend.conn.transaction(),
                cur.copy("COPY samples (series_id, ts, value) FROM STDIN (FORMAT BINARY)") as copy,
            ):
                copy.write(binary_copy_payload(ids[fresh], ts[fresh], values[fresh]))
            written += np.bincount(parts[fresh], minlength=n_parts)
        except psycopg.errors.UniqueViolation:
            may_exist[:] = True
    for level in range(int(layer.max(initial=-1)) + 1):
        rows = may_exist & (layer == level)
        if not rows.any():
            continue
        inserted, updated = _upsert(cur, ids[rows], ts[rows], values[rows], parts[rows], n_parts)
        written += inserted
        overwritten += updated
        unchanged += np.bincount(parts[rows], minlength=n_parts) - inserted - updated
    return written, overwritten, unchanged
