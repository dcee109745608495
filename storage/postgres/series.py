"""The series of a PostgreSQL write: which are stored, which each part creates (and the
cardinality guard's verdict per part), creating them, and growing their seen spans."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import psycopg

from storage.frames import PreparedBatch
from storage.write_rows import (
    SeriesIds,
    batch_spans,
    late_marks,
    series_seen_changes,
    unique_sorted,
)

if TYPE_CHECKING:
    from storage.postgres.backend import PostgresBackend


def lookup_series(
    backend: PostgresBackend, cur: psycopg.Cursor[Any], batch: PreparedBatch
) -> tuple[SeriesIds, np.ndarray]:
    """Ids and seen spans of the batch's stored series, and which of them are stored."""
    out = SeriesIds.empty(len(batch.series))
    found = np.zeros(len(batch.series), dtype=bool)
    position = {s.key: pos for pos, s in enumerate(batch.series)}
    cur.execute(
        f"SELECT series_key, series_id, {backend.ts_out.format(col='first_seen')}, "  # noqa: S608
        f"{backend.ts_out.format(col='last_seen')} FROM series "
        "WHERE series_key = ANY(%b::text[])",  # binary: no per-key quoting in Python
        (list(position),),
    )
    for key, sid, first, last in cur.fetchall():
        pos = position[key]
        out.ids[pos], found[pos] = sid, True
        if first is not None and last is not None:
            out.first_us[pos], out.last_us[pos] = first, last
    return out, found


def new_series_per_part(
    batch: PreparedBatch, found: np.ndarray, n_parts: int, limit: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """(new series per part, guarded per part), taking the parts in order as if written one
    after the other: a series is new to the first part that has it; a part that would create
    more than `limit` is guarded and creates none."""
    assert batch.parts is not None
    n_series = max(len(batch.series), 1)
    pairs = unique_sorted(batch.parts * n_series + batch.codes)
    pair_part, pair_code = pairs // n_series, pairs % n_series
    missing = ~found[pair_code]
    bounds = np.searchsorted(pair_part, np.arange(n_parts + 1))
    created = np.zeros(len(batch.series), dtype=bool)
    new = np.zeros(n_parts, dtype=np.int64)
    guarded = np.zeros(n_parts, dtype=bool)
    for part in range(n_parts):
        lo, hi = bounds[part], bounds[part + 1]
        codes = pair_code[lo:hi][missing[lo:hi]]
        codes = codes[~created[codes]]
        if limit is not None and len(codes) > limit:
            guarded[part] = True
            new[part] = len(codes)
            continue
        created[codes] = True
        new[part] = len(codes)
    return new, guarded


def create_series(
    backend: PostgresBackend,
    cur: psycopg.Cursor[Any],
    batch: PreparedBatch,
    known: SeriesIds,
    found: np.ndarray,
) -> None:
    """Insert the batch's series that are not stored; concurrent creators' ones are looked up."""
    missing = np.flatnonzero(~found)
    if not len(missing):
        return
    lo, hi = batch_spans(batch)
    cur.execute(
        "CREATE TEMP TABLE IF NOT EXISTS series_new_stage (pos integer, series_key text, "
        "metric text, labels jsonb, lo bigint, hi bigint) ON COMMIT DELETE ROWS"
    )
    cur.execute("TRUNCATE series_new_stage")
    with cur.copy("COPY series_new_stage FROM STDIN") as copy:
        for pos in missing.tolist():
            s = batch.series[pos]
            copy.write_row((pos, s.key, s.metric, s.labels_json, int(lo[pos]), int(hi[pos])))
    start = backend.ts_in.replace("%s", "st.lo")
    end = backend.ts_in.replace("%s", "st.hi")
    cur.execute(
        "INSERT INTO series (series_key, metric, labels, first_seen, last_seen) "  # noqa: S608
        f"SELECT st.series_key, st.metric, st.labels, {start}, {end} FROM series_new_stage st "
        "ORDER BY st.pos ON CONFLICT (series_key) DO NOTHING "
        "RETURNING series_id, series_key"
    )
    position = {batch.series[pos].key: pos for pos in missing.tolist()}
    for sid, key in cur.fetchall():
        pos = position.pop(key)
        known.ids[pos] = sid
        known.is_new[pos] = True
    if position:  # a concurrent writer created these first: they are stored series now
        raced = PreparedBatch(
            series=[batch.series[pos] for pos in position.values()],
            codes=np.zeros(0, dtype=np.int64),
            ts_us=np.zeros(0, dtype=np.int64),
            values=np.zeros(0, dtype=np.float64),
            rows_in=0,
        )
        stored, _ = lookup_series(backend, cur, raced)
        for index, pos in enumerate(position.values()):
            known.ids[pos] = stored.ids[index]
            known.first_us[pos] = stored.first_us[index]
            known.last_us[pos] = stored.last_us[index]


def update_seen_spans(
    backend: PostgresBackend, cur: psycopg.Cursor[Any], known: SeriesIds, batch: PreparedBatch
) -> None:
    """Grow the stored series' first/last seen to cover the batch, and mark late rows
    (detect_late) against the spans as committed now."""
    known = _lock_seen_spans(backend, cur, known)
    late = late_marks(known, batch)
    if len(late):
        cur.execute(
            "INSERT INTO detect_late (series_id, from_ts) "  # noqa: S608
            f"SELECT u.sid, {backend.ts_in.replace('%s', 'u.lo')} "
            "FROM unnest(%b::bigint[], %b::bigint[]) AS u(sid, lo)",
            (late[:, 0].tolist(), late[:, 1].tolist()),
        )
    changed = series_seen_changes(known, batch)
    if len(changed):
        cur.execute(
            "UPDATE series s SET "  # noqa: S608 - constant fragments only
            f"first_seen = LEAST(s.first_seen, {backend.ts_in.replace('%s', 'u.lo')}), "
            f"last_seen = GREATEST(s.last_seen, {backend.ts_in.replace('%s', 'u.hi')}) "
            "FROM unnest(%b::bigint[], %b::bigint[], %b::bigint[]) AS u(sid, lo, hi) "
            "WHERE s.series_id = u.sid",
            (changed[:, 0].tolist(), changed[:, 1].tolist(), changed[:, 2].tolist()),
        )


def _lock_seen_spans(
    backend: PostgresBackend, cur: psycopg.Cursor[Any], known: SeriesIds
) -> SeriesIds:
    """`known` with the stored series' first/last seen as committed now, their rows locked
    (in id order) until the transaction ends. Concurrent writers of one series (parallel
    ingest runs) take its span one after the other: late marks (detect_late) are decided
    against every sample committed before, not against what the batch read at its start."""
    stored = np.flatnonzero(~known.is_new)
    if not len(stored):
        return known
    cur.execute(
        f"SELECT series_id, {backend.ts_out.format(col='first_seen')}, "  # noqa: S608
        f"{backend.ts_out.format(col='last_seen')} FROM series "
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
