"""The rollup levels, the columns every level stores, and time spans in µs.

Levels chain: 1m is computed from samples, 5m from 1m, 1h from 5m and 1d from 1h
(`SOURCE`); every level stores the same statistics (`STAT_COLUMNS`), from which average,
standard deviation and rate derive, so no level ever averages averages.
"""

from __future__ import annotations

from storage.schema import ROLLUP_LEVELS

LEVELS: tuple[str, ...] = tuple(ROLLUP_LEVELS)  # finest first
QUERY_LEVELS: tuple[str, ...] = ("raw", *LEVELS)
SOURCE: dict[str, str] = {"1m": "raw", "5m": "1m", "1h": "5m", "1d": "1h"}
HOUR_US = ROLLUP_LEVELS["1h"]
DAY_US = ROLLUP_LEVELS["1d"]
STAT_COLUMNS = [
    "count",
    "sum",
    "sum_sq",
    "min",
    "max",
    "first",
    "first_ts",
    "last",
    "last_ts",
]
STATS_FRAME_COLUMNS = ["series_id", "ts_us", *STAT_COLUMNS]
Span = tuple[int, int]


def merge_spans(spans: list[Span]) -> list[Span]:
    """Sorted, overlapping or touching spans merged."""
    merged: list[Span] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def widen(spans: list[Span], width: int) -> list[Span]:
    """Spans widened to whole buckets of `width`, then merged."""
    return merge_spans([(s - s % width, e + (-e) % width) for s, e in spans])
