"""The write path's arithmetic, the same for every backend: where a prepared batch's rows
stand against the series already stored (which may collide with a stored sample), how each
series' seen span grows, which rows are late, which hours a batch touches, and what a write
counts. Pure numpy: no SQL here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from storage.frames import PreparedBatch


@dataclass
class WriteCounts:
    written: int = 0
    overwritten: int = 0
    unchanged: int = 0
    new_series: int = 0
    replay: bool = False
    guarded_new_series: int = 0  # > 0: the batch was quarantined whole by the cardinality guard


NO_TS = np.iinfo(np.int64).min  # a series with no samples yet


@dataclass
class SeriesIds:
    """Database ids of a batch's series, and the time span each already covers."""

    ids: np.ndarray
    first_us: np.ndarray
    last_us: np.ndarray
    is_new: np.ndarray  # inserted by this batch, already carrying the batch's span

    @property
    def new_series(self) -> int:
        return int(self.is_new.sum())

    @classmethod
    def empty(cls, n: int) -> SeriesIds:
        return cls(
            ids=np.zeros(n, dtype=np.int64),
            first_us=np.full(n, NO_TS, dtype=np.int64),
            last_us=np.full(n, NO_TS, dtype=np.int64),
            is_new=np.zeros(n, dtype=bool),
        )


def sorted_rows(
    batch: PreparedBatch, known: SeriesIds
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(series_id, ts, value, may_exist) in primary-key order.

    A row can only collide with a stored sample when its ts lies inside its series'
    [first_seen, last_seen]; everything else (the append-only common case) is new for sure.
    """
    ids = known.ids[batch.codes]
    order = np.lexsort((batch.ts_us, ids))
    ts = batch.ts_us[order]
    codes = batch.codes[order]
    first, last = known.first_us[codes], known.last_us[codes]
    may_exist = (last != NO_TS) & (ts >= first) & (ts <= last)
    return ids[order], ts, batch.values[order], may_exist


def batch_spans(batch: PreparedBatch) -> tuple[np.ndarray, np.ndarray]:
    """Per series of the batch: its earliest and latest accepted timestamp (µs)."""
    n = len(batch.series)
    lo = np.full(n, np.iinfo(np.int64).max, dtype=np.int64)
    hi = np.full(n, np.iinfo(np.int64).min, dtype=np.int64)
    np.minimum.at(lo, batch.codes, batch.ts_us)
    np.maximum.at(hi, batch.codes, batch.ts_us)
    return lo, hi


def series_seen_changes(known: SeriesIds, batch: PreparedBatch) -> np.ndarray:
    """Rows (series_id, first_seen, last_seen) for stored series whose span grows.

    New series were inserted with their span already; series with no samples yet
    (NO_TS) are updated too.
    """
    lo, hi = batch_spans(batch)
    has_old = known.last_us != NO_TS
    new_lo = np.where(has_old, np.minimum(lo, known.first_us), lo)
    new_hi = np.where(has_old, np.maximum(hi, known.last_us), hi)
    grows = (hi >= lo) & ~known.is_new
    grows &= ~has_old | (new_lo != known.first_us) | (new_hi != known.last_us)
    return np.column_stack([known.ids[grows], new_lo[grows], new_hi[grows]])


def late_marks(known: SeriesIds, batch: PreparedBatch) -> np.ndarray:
    """Rows (series_id, earliest ts) for stored series that get samples at or before their
    last sample so far: late data or overwrites, which detection has to look back at."""
    lo, _ = batch_spans(batch)
    late = ~known.is_new & (known.last_us != NO_TS) & (lo <= known.last_us)
    return np.column_stack([known.ids[late], lo[late]])


def unique_sorted(values: np.ndarray) -> np.ndarray:
    """np.unique of an int array by sorting: numpy's hash-table unique (taken when only the
    values are asked for) is about ten times slower on a batch's many distinct keys."""
    ordered = np.sort(values, kind="stable")
    if len(ordered) < 2:
        return ordered
    return ordered[np.concatenate(([True], ordered[1:] != ordered[:-1]))]


def hour_ranges(ts_us: np.ndarray) -> list[tuple[int, int]]:
    """The touched hours of a batch, merged into half-open [start, end) ranges in µs."""
    if len(ts_us) == 0:
        return []
    hour = 3_600_000_000
    hours = unique_sorted(ts_us // hour)
    breaks = np.flatnonzero(np.diff(hours) != 1)
    starts = np.concatenate(([hours[0]], hours[breaks + 1]))
    ends = np.concatenate((hours[breaks], [hours[-1]])) + 1
    return [(int(s) * hour, int(e) * hour) for s, e in zip(starts, ends, strict=True)]


def row_json(row: dict[str, Any]) -> str:
    """A rejected row as JSON text; escapes what UTF-8 cannot carry (lone surrogates)."""
    text = json.dumps(row, default=str, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(row, default=str, ensure_ascii=True)
    return text
