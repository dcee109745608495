"""Reads at the right resolution: which level serves a step query, and its stats.

A step query's whole steps are read from the coarsest level whose width divides the step and
that holds data back to the window's start, up to the first still-pending range; raw samples
serve the rest (`plan_query`). Every source answers the same per series and step columns
(`step_stats`), so the parts concatenate.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import numpy as np
import pandas as pd

from metricmill.errors import QueryError
from storage.backend import Backend
from storage.rollup.dialects import dialect_for
from storage.rollup.levels import LEVELS, QUERY_LEVELS, STAT_COLUMNS, STATS_FRAME_COLUMNS
from storage.schema import ROLLUP_LEVELS, ROLLUP_TABLES

_INT_COLUMNS = frozenset({"series_id", "ts_us", "count", "first_ts", "last_ts"})


_KIND = {c: "int" if c == "count" else "ts" if c.endswith("_ts") else "float" for c in STAT_COLUMNS}


def _stats_frame_from(arrays: dict[str, np.ndarray]) -> pd.DataFrame:
    """A stats frame from column arrays; stat columns not read are 0 (ints) or NaN."""
    n = len(arrays["series_id"]) if "series_id" in arrays else 0
    frame: dict[str, np.ndarray] = {}
    for name in STATS_FRAME_COLUMNS:
        dtype = "int64" if name in _INT_COLUMNS else "float64"
        if name in arrays:
            frame[name] = np.asarray(arrays[name], dtype=dtype)
        else:
            frame[name] = np.zeros(n, dtype=dtype) if dtype == "int64" else np.full(n, np.nan)
    return pd.DataFrame(frame)


def step_stats(
    backend: Backend,
    source: str,
    ids: list[int],
    start_us: int,
    end_us: int,
    step_us: int,
    columns: Collection[str] | None = None,
) -> pd.DataFrame:
    """Per series and step bucket: the rollup columns, from raw samples or one level.

    A level's rows are taken whole: the caller aligns [start, end) to the level's width.
    """
    if end_us <= start_us or not ids:
        return _stats_frame_from({})
    d = dialect_for(backend)
    # Only the columns the caller needs cross the wire, read straight into arrays (a 30-day
    # hourly read is mostly transfer and decoding, not the index scan).
    wanted = [c for c in STAT_COLUMNS if columns is None or c in columns]
    kinds = [
        ("series_id", "q.series_id", "int"),
        ("ts_us", "q.bucket", "ts"),
        *((c, f"q.{c}", _KIND[c]) for c in wanted),
    ]
    ids_in = backend.ids_in
    stored = source != "raw" and step_us == ROLLUP_LEVELS[source]
    bounds = (start_us, end_us) if stored else d.bounds(start_us, end_us)

    def select() -> str:
        if stored:
            inner = (
                f"SELECT series_id, bucket, {', '.join(wanted)} "  # noqa: S608
                f"FROM {ROLLUP_TABLES[source]} WHERE series_id {ids_in} "
                f"AND bucket >= {d.ts_in} AND bucket < {d.ts_in}"
            )
        else:
            inner = d.stats_select(source, step_us, ids_in)
        return f"SELECT {{columns}} FROM ({inner}) q"  # noqa: S608

    arrays = d.run_safely(
        select, lambda sql: backend.read_columns(sql, kinds, (backend.id_list(ids), *bounds))
    )
    return _stats_frame_from(arrays)


def _level_start(backend: Backend, level: str, ids: list[int]) -> int | None:
    """The oldest bucket the level holds for these series (one key probe per series)."""
    d = dialect_for(backend)
    row = backend.execute(
        f"SELECT {d.ts_out.format(col='min(m)')} FROM (SELECT (SELECT min(r.bucket) "  # noqa: S608
        f"FROM {ROLLUP_TABLES[level]} r WHERE r.series_id = s.series_id) AS m "
        f"FROM series s WHERE s.series_id {backend.ids_in}) per_series",
        (backend.id_list(ids),),
    )[0][0]
    return None if row is None else int(row)


def _first_seen(backend: Backend, ids: list[int]) -> int | None:
    d = dialect_for(backend)
    row = backend.execute(
        f"SELECT {d.ts_out.format(col='min(first_seen)')} FROM series "  # noqa: S608
        f"WHERE series_id {backend.ids_in}",
        (backend.id_list(ids),),
    )[0][0]
    return None if row is None else int(row)


def _pending_from(backend: Backend, start_us: int, end_us: int) -> int | None:
    """The earliest start of a pending range meeting [start, end): rollups are stale from there."""
    d = dialect_for(backend)
    row = backend.execute(
        f"SELECT {d.ts_out.format(col='min(start_ts)')} FROM rollup_pending "  # noqa: S608
        f"WHERE end_ts > {d.ts_in} AND start_ts < {d.ts_in}",
        (start_us, end_us),
    )[0][0]
    return None if row is None else int(row)


@dataclass
class QueryPlan:
    """Which source serves which part of a step query (the parts are step-aligned)."""

    level: str  # the rollup level of the middle part, or "raw"
    parts: list[tuple[str, int, int]]  # (source, start µs, end µs)


def plan_query(
    backend: Backend,
    ids: list[int],
    start_us: int,
    end_us: int,
    step_us: int,
    level: str | None = None,
) -> QueryPlan:
    """Pick the source of each part of [start, end) for buckets of `step_us`.

    Automatic: the coarsest level whose width divides the step and that holds data back to
    the window's start (or the series' first sample) serves the whole steps from there up to
    the first still-pending range; raw samples serve the partial first step and the tail.
    Forced: that one level (or raw) serves the whole window.
    """
    if level is not None and level not in QUERY_LEVELS:
        raise QueryError(f"unknown level {level!r}: use one of {', '.join(QUERY_LEVELS)}")
    if level is not None and level != "raw" and step_us % ROLLUP_LEVELS[level]:
        raise QueryError(f"step is not a whole number of {level} buckets")
    if level == "raw":
        return QueryPlan("raw", [("raw", start_us, end_us)])
    if level is not None:
        width = ROLLUP_LEVELS[level]
        return QueryPlan(level, [(level, start_us - start_us % width, end_us)])
    head = start_us + (-start_us) % step_us
    pending = _pending_from(backend, start_us, end_us)
    stale = end_us if pending is None else min(end_us, pending)
    tail = stale - stale % step_us
    if tail > head:
        first_seen = _first_seen(backend, ids)
        for candidate in reversed(LEVELS):
            width = ROLLUP_LEVELS[candidate]
            if step_us % width:
                continue
            oldest = _level_start(backend, candidate, ids)
            needed = max(head, (first_seen or head) - (first_seen or head) % width)
            if oldest is not None and oldest <= needed:
                parts = [("raw", start_us, head), (candidate, head, tail), ("raw", tail, end_us)]
                return QueryPlan(candidate, [p for p in parts if p[2] > p[1]])
    return QueryPlan("raw", [("raw", start_us, end_us)])


def resolved_stats(
    backend: Backend,
    ids: list[int],
    start_us: int,
    end_us: int,
    step_us: int,
    level: str | None = None,
    columns: Collection[str] | None = None,
) -> pd.DataFrame:
    """Per series and step bucket: the rollup columns, read at the best resolution.

    `columns`: the stat columns to read (None: all); the others come back as 0 / NaN.
    """
    plan = plan_query(backend, ids, start_us, end_us, step_us, level)
    frames = [step_stats(backend, src, ids, s, e, step_us, columns) for src, s, e in plan.parts]
    frames = [f for f in frames if len(f)]
    if not frames:
        return _stats_frame_from({})
    if len(frames) == 1:
        return frames[0]
    return pd.concat(frames, ignore_index=True).sort_values(
        ["series_id", "ts_us"], ignore_index=True, kind="stable"
    )


def counter_increase(stats: pd.DataFrame) -> pd.Series:
    """Per bucket, a counter's increase the Prometheus way: a drop is a reset, after which
    the counter counts from 0. Buckets chain: the step from the previous bucket's last value
    to this bucket's first is this bucket's. Inside a bucket, with last >= first the increase
    is last - first; with last < first it is a reset: (max - first) up to the peak, then last.
    """
    if stats.empty:
        return pd.Series([], dtype="float64", index=stats.index)
    first = stats["first"].to_numpy(dtype="float64")
    last = stats["last"].to_numpy(dtype="float64")
    peak = stats["max"].to_numpy(dtype="float64")
    series = stats["series_id"].to_numpy()
    inside = np.where(last >= first, last - first, (peak - first) + last)
    previous = np.roll(last, 1)
    chained = np.ones(len(stats), dtype=bool)
    chained[0] = False
    chained[1:] = series[1:] == series[:-1]
    step_in = np.where(first >= previous, first - previous, first)
    return pd.Series(inside + np.where(chained, step_in, 0.0), index=stats.index)
