"""How far behind the rollups are, and the rows a run wrote (for the rollup-output check)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pandas as pd

from metricmill.types import US_PER_SECOND, datetime_to_us, us_to_datetime
from storage.backend import Backend
from storage.rollup.dialects import dialect_for, series_spanning
from storage.rollup.levels import HOUR_US, STAT_COLUMNS, Span, merge_spans
from storage.schema import ROLLUP_LEVELS, ROLLUP_TABLES


@dataclass
class RollupStatus:
    """How far behind the rollups are: pending ranges and the newest rolled-up bucket."""

    pending_ranges: int
    pending_hours: float
    oldest_pending: datetime | None
    newest_bucket: datetime | None
    lag_seconds: float | None


def rollup_status_of(backend: Backend, now: datetime | None = None) -> RollupStatus:
    d = dialect_for(backend)
    length = d.span_length("end_ts", "start_ts")
    count, total, oldest = backend.execute(
        f"SELECT count(*), sum({length}), {d.ts_out.format(col='min(start_ts)')} "  # noqa: S608
        "FROM rollup_pending"
    )[0]
    # Per series, the newest bucket is one primary-key probe: no scan of the whole table.
    newest = backend.execute(
        f"SELECT {d.ts_out.format(col='max(m)')} FROM (SELECT (SELECT max(r.bucket) "  # noqa: S608
        "FROM rollup_1m r WHERE r.series_id = s.series_id) AS m FROM series s) per_series"
    )[0][0]
    moment = now or datetime.now(UTC)
    lag = None
    if newest is not None:
        lag = (datetime_to_us(moment) - int(newest) - ROLLUP_LEVELS["1m"]) / US_PER_SECOND
    return RollupStatus(
        pending_ranges=int(count),
        pending_hours=int(total or 0) / HOUR_US,
        oldest_pending=None if oldest is None else us_to_datetime(int(oldest)),
        newest_bucket=None if newest is None else us_to_datetime(int(newest)),
        lag_seconds=lag,
    )


def written_rows(backend: Backend, level: str, spans: list[Span], limit: int) -> pd.DataFrame:
    """A level's rows in the spans (newest first, at most `limit`), in one query."""
    d = dialect_for(backend)
    if not spans:
        return pd.DataFrame(columns=["series_id", "bucket", *STAT_COLUMNS])
    spans = merge_spans(spans)
    low, high = spans[0][0], spans[-1][1]
    # Only the newest buckets can hold the `limit` newest rows: start from the newest bucket
    # (one primary-key probe per series) and widen the window until it holds `limit` rows,
    # so a backfill is not sorted whole to keep its tail.
    table = ROLLUP_TABLES[level]
    spanning = f"series_id {series_spanning(d)}"
    newest = backend.execute(
        f"SELECT {d.ts_out.format(col='max(m)')} FROM (SELECT (SELECT max(r.bucket) "  # noqa: S608
        f"FROM {table} r WHERE r.series_id = s.series_id AND r.bucket < {d.ts_in}) AS m "
        f"FROM series s WHERE s.{spanning}) per_series",
        (high, low, high),
    )[0][0]
    width = ROLLUP_LEVELS[level]
    buckets = max(1, limit // 1000)
    while newest is not None:
        tail = int(newest) - width * buckets
        if tail <= low:
            break
        inside = backend.execute(
            f"SELECT count(*) FROM {table} WHERE {spanning} "  # noqa: S608
            f"AND bucket >= {d.ts_in} AND bucket < {d.ts_in}",
            (tail, high, tail, high),
        )[0][0]
        if int(inside) >= limit:
            low = tail
            spans = [(max(s, low), e) for s, e in spans if e > low]
            break
        buckets *= 4
    # The spanning series and the outer bounds let every backend probe the primary key.
    where = " OR ".join(f"(bucket >= {d.ts_in} AND bucket < {d.ts_in})" for _ in spans)
    params: list[Any] = [low, high, low, high, *(v for span in spans for v in span)]
    rows = backend.execute(
        f"SELECT series_id, {d.ts_out.format(col='bucket')}, count, sum, sum_sq, min, max, "  # noqa: S608
        f"first, {d.ts_out.format(col='first_ts')}, last, {d.ts_out.format(col='last_ts')} "
        f"FROM {ROLLUP_TABLES[level]} WHERE series_id {series_spanning(d)} "
        f"AND bucket >= {d.ts_in} AND bucket < {d.ts_in} AND ({where}) "
        "ORDER BY bucket DESC LIMIT %s",
        (*params, limit),
    )
    frame = pd.DataFrame(rows, columns=["series_id", "bucket", *STAT_COLUMNS])
    for column in ("series_id", "bucket", "count", "first_ts", "last_ts"):
        frame[column] = frame[column].astype("int64")
    for column in ("sum", "sum_sq", "min", "max", "first", "last"):
        frame[column] = frame[column].astype("float64")
    return frame
