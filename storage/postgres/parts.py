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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import psycopg

from storage.frames import PreparedBatch
from storage.postgres.samples import write_samples
from storage.postgres.series import (
    create_series,
    lookup_series,
    new_series_per_part,
    update_seen_spans,
)
from storage.write_rows import SeriesIds, WriteCounts, hour_ranges, row_json

if TYPE_CHECKING:
    from storage.postgres.backend import PostgresBackend


@dataclass
class _Parts:
    """One call's parts: their ledger batch ids and sources, and the counts filled in."""

    batch_ids: Sequence[str]
    sources: Sequence[str]
    counts: list[WriteCounts]

    @property
    def n(self) -> int:
        return len(self.batch_ids)


def write_parts_together(
    backend: PostgresBackend,
    batch: PreparedBatch,
    *,
    batch_ids: Sequence[str],
    sources: Sequence[str],
    max_new_series: int | None,
) -> list[WriteCounts]:
    """Every part of `batch` in one transaction, in part order; a WriteCounts per part, as
    writing the parts one after the other gives. The steps, in order: claim each part's
    ledger row (replays drop out), resolve the series and quarantine the parts the
    cardinality guard stops, create the new series, write the samples, grow the seen spans,
    then record per part its counts, side rows and committed ledger row."""
    assert batch.parts is not None and batch.part_rows_in is not None
    assert batch.part_duplicates is not None
    parts = _Parts(batch_ids, sources, [WriteCounts() for _ in batch_ids])
    with backend.transaction(), backend.conn.cursor() as cur:
        active = _claim_parts(cur, parts)
        if not active.any():
            return parts.counts
        if not active.all():
            batch, _ = batch.select_parts(active)
        known, found = lookup_series(backend, cur, batch)
        new, guarded = new_series_per_part(batch, found, parts.n, max_new_series)
        guarded &= active
        _quarantine_guarded(backend, batch, parts, guarded, new, max_new_series)
        writing = active & ~guarded
        if not writing.any():
            return parts.counts
        if guarded.any():
            batch, known, found = _without_guarded(batch, known, found, writing)
        new = _create_new_series(backend, cur, batch, known, found, new, parts.n)
        written, overwritten, unchanged = write_samples(backend, cur, batch, known, parts.n)
        update_seen_spans(backend, cur, known, batch)
        assert batch.part_duplicates is not None  # select_parts keeps it
        for part in np.flatnonzero(writing).tolist():
            c = parts.counts[part]
            c.new_series = int(new[part])
            c.written = int(written[part])
            c.overwritten = int(overwritten[part])
            c.unchanged = int(unchanged[part]) + int(batch.part_duplicates[part])
        _record_side_rows(backend, cur, batch, parts, writing)
        _commit_ledger_rows(backend, batch, parts, writing)
    return parts.counts


def _claim_parts(cur: psycopg.Cursor[Any], parts: _Parts) -> np.ndarray:
    """Which parts this transaction writes: those whose ledger row it opened. The others are
    replays (counts marked so): committed before, or repeating an earlier part's batch id
    (the same content)."""
    first_part = {b: i for i, b in reversed(list(enumerate(parts.batch_ids)))}
    repeat = np.array([first_part[b] != i for i, b in enumerate(parts.batch_ids)], dtype=bool)
    unique = [i for i in range(parts.n) if not repeat[i]]
    opened = _open_ledger_rows(
        cur, [parts.batch_ids[i] for i in unique], [parts.sources[i] for i in unique]
    )
    active = np.array([b in opened for b in parts.batch_ids], dtype=bool) & ~repeat
    for part in np.flatnonzero(~active).tolist():
        parts.counts[part].replay = True
    return active


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


def _quarantine_guarded(
    backend: PostgresBackend,
    batch: PreparedBatch,
    parts: _Parts,
    guarded: np.ndarray,
    new: np.ndarray,
    limit: int | None,
) -> None:
    """Keep each part the cardinality guard stopped in quarantine, whole, with its ledger row."""
    for part in np.flatnonzero(guarded).tolist():
        assert limit is not None
        backend.quarantine_whole_batch(
            batch.part(part),
            batch_id=parts.batch_ids[part],
            source=parts.sources[part],
            new=int(new[part]),
            limit=limit,
        )
        parts.counts[part].guarded_new_series = int(new[part])


def _without_guarded(
    batch: PreparedBatch, known: SeriesIds, found: np.ndarray, writing: np.ndarray
) -> tuple[PreparedBatch, SeriesIds, np.ndarray]:
    """The batch of the parts still written, with its series' ids, spans and found flags."""
    batch, used = batch.select_parts(writing)
    known = SeriesIds(
        ids=known.ids[used],
        first_us=known.first_us[used],
        last_us=known.last_us[used],
        is_new=known.is_new[used],
    )
    return batch, known, found[used]


def _create_new_series(
    backend: PostgresBackend,
    cur: psycopg.Cursor[Any],
    batch: PreparedBatch,
    known: SeriesIds,
    found: np.ndarray,
    new: np.ndarray,
    n_parts: int,
) -> np.ndarray:
    """Create the series not stored yet; the new series per part, counted again when a
    concurrent writer created some of them meanwhile (those are not new here)."""
    create_series(backend, cur, batch, known, found)
    raced = ~found & ~known.is_new
    if raced.any():
        new, _ = new_series_per_part(batch, found | raced, n_parts, None)
    return new


def _record_side_rows(
    backend: PostgresBackend,
    cur: psycopg.Cursor[Any],
    batch: PreparedBatch,
    parts: _Parts,
    writing: np.ndarray,
) -> None:
    """Per written part: the hours it touched (pending rollups) and its rejected rows."""
    assert batch.parts is not None
    pending: list[tuple[int, int, str]] = []
    for part in np.flatnonzero(writing).tolist():
        ts = batch.ts_us[batch.parts == part]
        pending += [(s, e, parts.batch_ids[part]) for s, e in hour_ranges(ts)]
    if pending:
        cur.executemany(
            "INSERT INTO rollup_pending (start_ts, end_ts, batch_id) "  # noqa: S608
            f"VALUES ({backend.ts_in}, {backend.ts_in}, %s)",
            pending,
        )
    if batch.rejected:
        cur.executemany(
            "INSERT INTO quarantine (batch_id, source, reason, row_data) VALUES (%s, %s, %s, %s)",
            [
                (parts.batch_ids[part], parts.sources[part], reason, row_json(row))
                for (row, reason), part in zip(batch.rejected, batch.rejected_parts, strict=True)
            ],
        )


def _commit_ledger_rows(
    backend: PostgresBackend, batch: PreparedBatch, parts: _Parts, writing: np.ndarray
) -> None:
    """Turn each written part's 'writing' ledger row into its committed row with its counts."""
    assert batch.parts is not None and batch.part_rows_in is not None
    rejected_per_part = np.bincount(
        np.asarray(batch.rejected_parts, dtype=np.int64), minlength=parts.n
    )
    for part in np.flatnonzero(writing).tolist():
        ts = batch.ts_us[batch.parts == part]
        c = parts.counts[part]
        backend.write_ledger(
            (
                parts.batch_ids[part],
                parts.sources[part],
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
