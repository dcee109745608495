"""The rollup run: recompute the pending ranges level by level, in chunk transactions.

Every bucket touched by a pending range is recomputed whole and replaced (DELETE, then
INSERT … SELECT), never incremented, so a rerun changes nothing. Work goes in bounded
chunks: one transaction covers at most `chunk_hours` of pending range, claims its
`rollup_pending` rows (other runs skip them), and removes (or trims) the rows it finished in
that same transaction.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from metricmill.types import us_to_datetime
from storage.backend import Backend
from storage.rollup.dialects import Dialect, dialect_for, series_spanning
from storage.rollup.levels import (
    DAY_US,
    HOUR_US,
    LEVELS,
    SOURCE,
    STAT_COLUMNS,
    Span,
    merge_spans,
    widen,
)
from storage.rollup.status import rollup_status_of
from storage.schema import ROLLUP_LEVELS, ROLLUP_TABLES


@dataclass
class LevelWork:
    """What one level did in a run: recomputed ranges, rows written, and the merged spans."""

    ranges: int = 0
    rows: int = 0
    seconds: float = 0.0
    spans: list[Span] = field(default_factory=list)


@dataclass
class RollupReport:
    """One rollup run: per level work, transactions (chunks), time, what is left, the lag."""

    levels: dict[str, LevelWork] = field(default_factory=lambda: {lv: LevelWork() for lv in LEVELS})
    chunks: int = 0
    seconds: float = 0.0
    pending_left: int = 0
    newest_bucket: datetime | None = None  # start of the newest 1m bucket
    lag_seconds: float | None = None  # now - end of the newest 1m bucket

    def rows(self) -> list[dict[str, Any]]:
        """One summary row per level (for tables and artifacts)."""
        return [
            {
                "level": level,
                "ranges": work.ranges,
                "rows": work.rows,
                "seconds": round(work.seconds, 3),
                "from": _iso(work.spans[0][0]) if work.spans else "",
                "to": _iso(work.spans[-1][1]) if work.spans else "",
            }
            for level, work in self.levels.items()
        ]


def _iso(us: int) -> str:
    return us_to_datetime(us).isoformat()


def _mostly_inside(d: Dialect, span: Span) -> bool:
    """True when the span holds most of the series' stored time: one range scan then beats a
    primary-key probe per series (a backfill, a first run), else the probes win."""
    first, last = d.ts_out.format(col="first_seen"), d.ts_out.format(col="last_seen")
    inside, total = d.backend.execute(
        f"SELECT sum({d.greatest}(0, {d.least}({last}, %s) - {d.greatest}({first}, %s))), "  # noqa: S608
        f"sum({last} - {first}) FROM series WHERE last_seen IS NOT NULL",
        (span[1], span[0]),
    )[0]
    return bool(total) and float(inside or 0) > 0.5 * float(total)


def _pairs(d: Dialect, level: str, span: Span, probe: bool) -> int:
    """(series, bucket) pairs of the level in the span: the most rows it can get there."""
    if probe:
        series = d.backend.execute(
            f"SELECT count(*) FROM series WHERE series_id {series_spanning(d)}",  # noqa: S608
            span,
        )[0][0]
    else:
        series = d.backend.execute("SELECT count(*) FROM series")[0][0]
    return int(series) * max(1, (span[1] - span[0]) // ROLLUP_LEVELS[level])


def _dense(d: Dialect, level: str, span: Span, probe: bool, source_rows: int | None) -> bool:
    """True when the source holds at least one row per (series, bucket) pair of the span:
    then the bucket loop (Dialect.loop_select) beats a sort of the source rows."""
    if source_rows is None or SOURCE[level] == "raw":
        return False
    return source_rows >= _pairs(d, level, span, probe)


def _recompute_singles(d: Dialect, span: Span, series: str, params: tuple[Any, ...]) -> int | None:
    """The 1m level from samples, bucket by bucket alone or grouped (Dialect.singles_select),
    when the span holds at most about one sample per series and minute; else None."""
    (rows,) = d.backend.execute(
        f"SELECT count(*) FROM samples WHERE series_id {series} "  # noqa: S608
        f"AND ts >= {d.bound} AND ts < {d.bound}",
        params,
    )[0]
    if int(rows) > 1.25 * _pairs(d, "1m", span, series != "IS NOT NULL"):
        return None
    columns = f"series_id, bucket, {', '.join(STAT_COLUMNS)}"
    width = ROLLUP_LEVELS["1m"]
    written = d.execute_count(
        f"INSERT INTO rollup_1m ({columns}) {d.singles_select(width, series, alone=True)}",
        params,
    )
    if written < int(rows):  # some buckets hold several samples
        written += d.execute_count(
            f"INSERT INTO rollup_1m ({columns}) {d.singles_select(width, series, alone=False)}",
            params,
        )
    return written


def _recompute(
    d: Dialect, level: str, span: Span, *, probe: bool, source_rows: int | None = None
) -> int:
    """Replace the level's buckets in the span by a recompute from the level below
    (`source_rows`: how many rows the level below has in the span, when known)."""
    table = ROLLUP_TABLES[level]
    start, end = span
    series = series_spanning(d) if probe else "IS NOT NULL"
    bounds = d.bounds(start, end)
    params = (start, end, *bounds) if probe else bounds
    d.execute_count(
        f"DELETE FROM {table} WHERE series_id {series} "  # noqa: S608
        f"AND bucket >= {d.bound} AND bucket < {d.bound}",
        params,
    )
    if SOURCE[level] == "raw" and d.splits_singles:
        written = _recompute_singles(d, span, series, params)
        if written is not None:
            return written
    dense = _dense(d, level, span, probe, source_rows)

    def insert() -> str:
        select = None
        if dense:
            select = d.loop_select(SOURCE[level], ROLLUP_LEVELS[level], series, span)
        if select is None:
            select = d.stats_select(SOURCE[level], ROLLUP_LEVELS[level], series)
        return f"INSERT INTO {table} (series_id, bucket, {', '.join(STAT_COLUMNS)}) {select}"

    raw = SOURCE[level] == "raw"
    if raw:
        d.compile_big(True)
    written = d.run_safely(insert, lambda sql: d.execute_count(sql, params))
    if raw:
        d.compile_big(False)
    return written


def _run_chunk(d: Dialect, chunk_us: int, report: RollupReport) -> bool:
    """One transaction: claim the pending rows of the earliest window, recompute, finish.
    False when nothing was pending."""
    backend = d.backend
    with backend.transaction():
        d.lock()
        first = backend.execute(
            f"SELECT {d.ts_out.format(col='min(start_ts)')} FROM rollup_pending"  # noqa: S608
        )[0][0]
        if first is None:
            return False
        window_end = int(first) + chunk_us
        claimed = backend.execute(
            f"SELECT id, {d.ts_out.format(col='start_ts')}, {d.ts_out.format(col='end_ts')} "  # noqa: S608
            f"FROM rollup_pending WHERE start_ts < {d.ts_in}{d.claim_suffix()}",
            (window_end,),
        )
        if not claimed:  # another run holds them
            return False
        spans = widen(
            [(int(s), min(int(e), window_end)) for _, s, e in claimed if int(e) > int(s)],
            HOUR_US,
        )
        probe = not spans or not _mostly_inside(d, (spans[0][0], spans[-1][1]))
        below: dict[Span, int] = {}  # rows the level below wrote, per span
        for level in LEVELS:
            level_spans = widen(spans, DAY_US) if level == "1d" else spans
            work = report.levels[level]
            started = time.perf_counter()
            written: dict[Span, int] = {}
            for span in level_spans:
                written[span] = _recompute(d, level, span, probe=probe, source_rows=below.get(span))
                work.rows += written[span]
                work.ranges += 1
            below = written
            work.seconds += time.perf_counter() - started
            work.spans = merge_spans(work.spans + level_spans)
        done = [int(i) for i, _, e in claimed if int(e) <= window_end]
        trimmed = [int(i) for i, _, e in claimed if int(e) > window_end]
        if done:
            backend.execute(
                f"DELETE FROM rollup_pending WHERE id {backend.ids_in}",  # noqa: S608
                (backend.id_list(done),),
            )
        if trimmed:
            backend.execute(
                f"UPDATE rollup_pending SET start_ts = {d.ts_in} "  # noqa: S608
                f"WHERE id {backend.ids_in}",
                (window_end, backend.id_list(trimmed)),
            )
    return True


def run_rollup(
    backend: Backend, *, chunk_hours: int = 6, max_chunks: int | None = None
) -> RollupReport:
    """Recompute every pending range (or `max_chunks` transactions' worth of them)."""
    if chunk_hours < 1:
        raise ValueError("chunk_hours must be at least 1")
    d = dialect_for(backend)
    report = RollupReport()
    started = time.perf_counter()
    while max_chunks is None or report.chunks < max_chunks:
        if not _run_chunk(d, chunk_hours * HOUR_US, report):
            break
        report.chunks += 1
    report.seconds = time.perf_counter() - started
    status = rollup_status_of(backend)
    report.pending_left = status.pending_ranges
    report.newest_bucket = status.newest_bucket
    report.lag_seconds = status.lag_seconds
    return report
