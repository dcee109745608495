"""PostgreSQL's write path: one or many ingest batches ("parts") in one transaction.

One transaction takes a ledger row per part (the part's lock: a concurrent writer of the same
batch waits on it, then sees it committed and reports a replay), looks up the series of every
part in one query, creates the new ones with one INSERT, COPYs every row that cannot exist yet,
upserts the others, grows first/last seen with one UPDATE, and records per part its pending
rollup ranges, its quarantined rows and its counts. Parts are applied in their order: where
several hold the same (series, ts), the later part's value is the one stored, and the counts
are those of writing the parts one after the other. A part whose batch id repeats an earlier
part's is a replay of it. A single batch is a batch of one part: there is no other path.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import psycopg
from psycopg import sql

from storage.backend import (
    NO_TS,
    SeriesIds,
    WriteCounts,
    batch_spans,
    hour_ranges,
    row_json,
    unique_sorted,
)
from storage.frames import PreparedBatch
from storage.pg_copy import binary_copy_payload

if TYPE_CHECKING:
    from storage.postgres import PostgresBackend

_PART_STAGE = "sample_part_stage"


def _open_ledger_rows(
    cur: psycopg.Cursor[Any], batch_ids: Sequence[str], sources: Sequence[str]
) -> set[str]:
    """Insert a 'writing' ledger row per part (in batch id order, so concurrent writers take
    the rows in one order); the ids this transaction may write: new, or quarantined before."""
    order = sorted(range(len(batch_ids)), key=batch_ids.__getitem__)
    cur.execute(
        "INSERT INTO ingest_batches (batch_id, source, status) "
        "SELECT b, s, 'writing' FROM unnest(%s::text[], %s::text[]) WITH ORDINALITY AS u(b, s, o) "
        "ORDER BY o ON CONFLICT (batch_id) DO NOTHING RETURNING batch_id",
        ([batch_ids[i] for i in order], [sources[i] for i in order]),
    )
    opened = {row[0] for row in cur.fetchall()}
    others = [b for b in batch_ids if b not in opened]
    if others:
        # Committed before: a replay. Quarantined whole before (the guard), or failed: may
        # land now.
        cur.execute(
            "UPDATE ingest_batches SET status = 'writing' "
            "WHERE batch_id = ANY(%s::text[]) AND status <> 'committed' RETURNING batch_id",
            (others,),
        )
        opened |= {row[0] for row in cur.fetchall()}
    return opened


def _lookup_series(
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


def _new_series_per_part(
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


def _create_series(
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
        stored, _ = _lookup_series(backend, cur, raced)
        for index, pos in enumerate(position.values()):
            known.ids[pos] = stored.ids[index]
            known.first_us[pos] = stored.first_us[index]
            known.last_us[pos] = stored.last_us[index]


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


def _write_samples(
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


def write_parts_together(
    backend: PostgresBackend,
    batch: PreparedBatch,
    *,
    batch_ids: Sequence[str],
    sources: Sequence[str],
    max_new_series: int | None,
) -> list[WriteCounts]:
    """Every part of `batch` in one transaction, in part order; a WriteCounts per part, as
    writing the parts one after the other gives."""
    n_parts = len(batch_ids)
    assert batch.parts is not None and batch.part_rows_in is not None
    assert batch.part_duplicates is not None
    counts = [WriteCounts() for _ in range(n_parts)]
    # A part with the content of an earlier part is that part's replay.
    first_part = {b: i for i, b in reversed(list(enumerate(batch_ids)))}
    repeat = np.array([first_part[b] != i for i, b in enumerate(batch_ids)], dtype=bool)
    with backend.transaction(), backend.conn.cursor() as cur:
        unique = [i for i in range(n_parts) if not repeat[i]]
        opened = _open_ledger_rows(
            cur, [batch_ids[i] for i in unique], [sources[i] for i in unique]
        )
        active = np.array([b in opened for b in batch_ids], dtype=bool) & ~repeat
        for part in np.flatnonzero(~active).tolist():
            counts[part].replay = True
        if not active.any():
            return counts
        if not active.all():
            batch, _ = batch.select_parts(active)
        known, found = _lookup_series(backend, cur, batch)
        new, guarded = _new_series_per_part(batch, found, n_parts, max_new_series)
        guarded &= active
        for part in np.flatnonzero(guarded).tolist():
            assert max_new_series is not None
            backend.quarantine_whole_batch(
                batch.part(part),
                batch_id=batch_ids[part],
                source=sources[part],
                new=int(new[part]),
                limit=max_new_series,
            )
            counts[part].guarded_new_series = int(new[part])
        writing = active & ~guarded
        if not writing.any():
            return counts
        if guarded.any():
            batch, used = batch.select_parts(writing)
            known = SeriesIds(
                ids=known.ids[used],
                first_us=known.first_us[used],
                last_us=known.last_us[used],
                is_new=known.is_new[used],
            )
            found = found[used]
        assert batch.parts is not None and batch.part_rows_in is not None
        assert batch.part_duplicates is not None
        _create_series(backend, cur, batch, known, found)
        raced = ~found & ~known.is_new  # created by a concurrent writer meanwhile: not new here
        if raced.any():
            new, _ = _new_series_per_part(batch, found | raced, n_parts, None)
        written, overwritten, unchanged = _write_samples(backend, cur, batch, known, n_parts)
        backend.execute_seen_update(cur, known, batch)

        parts = batch.parts
        pending: list[tuple[int, int, str]] = []
        for part in np.flatnonzero(writing).tolist():
            ts = batch.ts_us[parts == part]
            pending += [(s, e, batch_ids[part]) for s, e in hour_ranges(ts)]
            c = counts[part]
            c.new_series = int(new[part])
            c.written = int(written[part])
            c.overwritten = int(overwritten[part])
            c.unchanged = int(unchanged[part]) + int(batch.part_duplicates[part])
        if pending:
            cur.executemany(
                "INSERT INTO rollup_pending (start_ts, end_ts, batch_id) "  # noqa: S608
                f"VALUES ({backend.ts_in}, {backend.ts_in}, %s)",
                pending,
            )
        if batch.rejected:
            cur.executemany(
                "INSERT INTO quarantine (batch_id, source, reason, row_data) "
                "VALUES (%s, %s, %s, %s)",
                [
                    (batch_ids[part], sources[part], reason, row_json(row))
                    for (row, reason), part in zip(
                        batch.rejected, batch.rejected_parts, strict=True
                    )
                ],
            )
        rejected_per_part = np.bincount(
            np.asarray(batch.rejected_parts, dtype=np.int64), minlength=n_parts
        )
        for part in np.flatnonzero(writing).tolist():
            ts = batch.ts_us[parts == part]
            c = counts[part]
            backend.write_ledger(
                (
                    batch_ids[part],
                    sources[part],
                    "committed",
                    int(batch.part_rows_in[part]),
                    c.written,
                    c.overwritten,
                    c.unchanged,
                    int(rejected_per_part[part]),
                    c.new_series,
                    int(ts.min()) if len(ts) else None,
                    int(ts.max()) if len(ts) else None,
                )
            )
    return counts
