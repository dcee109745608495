"""Rollups: recompute the pending ranges level by level, and read stats at any resolution.

Levels chain: 1m is computed from samples, 5m from 1m, 1h from 5m and 1d from 1h. Every
bucket touched by a pending range is recomputed whole and replaced (DELETE, then INSERT …
SELECT), never incremented, so a rerun changes nothing. Work goes in bounded chunks: one
transaction covers at most `chunk_hours` of pending range, and removes (or trims) the
pending rows it finished in that same transaction.

Each backend gets a small dialect: integer bucket arithmetic on SQLite (ts are µs integers),
`date_bin` on PostgreSQL, `time_bucket` and `first()/last()` on TimescaleDB. Elsewhere first
and last are found by joining the group's first/last key back to its source row (a primary
key lookup), as the min/max of [offset in the bucket, value] arrays (PostgreSQL's 1m level),
or, for PostgreSQL's upper levels, from the source rows in the bucket's first and last slots. Every fragment composed
into SQL text is a constant of this module.
"""

from __future__ import annotations

import time
from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pandas as pd

from metricmill.errors import QueryError
from metricmill.types import US_PER_SECOND, datetime_to_us, us_to_datetime
from storage.backend import Backend
from storage.locks import ROLLUP_RETENTION_LOCK
from storage.schema import ROLLUP_LEVELS, ROLLUP_TABLES

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


# -- dialects ------------------------------------------------------------------------------
class Dialect:
    """The SQL that differs per backend; the base class is SQLite."""

    greatest, least = "max", "min"  # the scalar forms

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.ts_in = backend.ts_in
        self.ts_out = backend.ts_out
        # A span's edge (its parameter from bounds()), as a one-off subquery: computed once.
        self.bound = f"(SELECT {backend.ts_in})"

    def bounds(self, start_us: int, end_us: int) -> tuple[Any, Any]:
        """The parameters of a span's two `bound`s."""
        return start_us, end_us

    def bucket(self, column: str, width_us: int) -> str:
        return f"({column} - {column} % {int(width_us)})"

    def span_length(self, end: str, start: str) -> str:
        """µs between two stored timestamps."""
        return f"({self.ts_out.format(col=end)} - {self.ts_out.format(col=start)})"

    def lock(self) -> None:
        """Serialise rollup transactions (SQLite's BEGIN IMMEDIATE already does)."""

    def claim_suffix(self) -> str:
        return ""

    def execute_count(self, sql: str, params: tuple[Any, ...]) -> int:
        """Run a write statement; the number of rows it wrote."""
        cursor = self.backend.conn.execute(sql.replace("%s", "?"), params)  # type: ignore[attr-defined]
        return int(cursor.rowcount)

    splits_singles = True  # see singles_select

    def singles_select(self, width_us: int, series_filter: str, alone: bool) -> str:
        """The 1m rows of raw samples that are alone in their bucket (`alone`), or the grouped
        rows of the buckets holding several.

        At one sample a minute nearly every 1m bucket holds one sample, and its rollup row is
        that sample: no sort of the span, no aggregate per row, only one primary-key probe for
        a neighbour in the bucket. Buckets with several samples are grouped as usual."""
        w = int(width_us)
        bucket = f"(s.ts - s.ts % {w})"
        neighbour = (
            f"SELECT 1 FROM samples o WHERE o.series_id = s.series_id AND o.ts >= {bucket} "  # noqa: S608
            f"AND o.ts < {bucket} + {w} AND o.ts <> s.ts"
        )
        where = f"s.series_id {series_filter} AND s.ts >= {self.bound} AND s.ts < {self.bound}"
        if alone:
            return f"""SELECT s.series_id, {bucket}, 1, s.value, s.value * s.value, s.value,
                       s.value, s.value, s.ts, s.value, s.ts
                FROM samples s WHERE {where} AND NOT EXISTS ({neighbour})"""  # noqa: S608
        return f"""SELECT g.series_id, g.bucket, g.n, g.s, g.ss, g.mn, g.mx,
                   (SELECT v.value FROM samples v WHERE v.series_id = g.series_id AND v.ts = g.fts),
                   g.fts,
                   (SELECT v.value FROM samples v WHERE v.series_id = g.series_id AND v.ts = g.lts),
                   g.lts
            FROM (SELECT s.series_id, {bucket} AS bucket, count(*) AS n, sum(s.value) AS s,
                         sum(s.value * s.value) AS ss, min(s.value) AS mn, max(s.value) AS mx,
                         min(s.ts) AS fts, max(s.ts) AS lts
                  FROM samples s WHERE {where} AND EXISTS ({neighbour})
                  GROUP BY s.series_id, {bucket}) g"""  # noqa: S608

    def loop_select(self, source: str, width_us: int, series_filter: str, span: Span) -> str | None:
        """stats_select without a sort, where the backend can use it (None elsewhere).

        SQLite groups an expression such as `bucket - bucket % w` by sorting every source row
        in a temporary B-tree. Driven instead by series, then by a table of the span's bucket
        starts, then a primary-key range per pair, the groups arrive in GROUP BY order and
        nothing is sorted: twice as fast when each pair holds several source rows (5m from
        1m), a loss when most pairs are empty (the caller decides)."""
        conn = self.backend.conn  # type: ignore[attr-defined]
        conn.execute("CREATE TEMP TABLE IF NOT EXISTS rollup_buckets (start INTEGER PRIMARY KEY)")
        conn.execute("DELETE FROM temp.rollup_buckets")
        first = span[0] - span[0] % width_us
        conn.executemany(
            "INSERT INTO temp.rollup_buckets (start) VALUES (?)",
            ((b,) for b in range(first, span[1], width_us)),
        )
        src = _Source(source)
        at = f"FROM {src.table} v WHERE v.series_id = g.series_id AND v.{src.key} = g"
        return f"""SELECT g.series_id, g.bucket, g.n AS count, g.s AS sum, g.ss AS sum_sq,
                   g.mn AS min, g.mx AS max, (SELECT v.{src.first} {at}.fk) AS first,
                   g.fts AS first_ts, (SELECT v.{src.last} {at}.lk) AS last, g.lts AS last_ts
            FROM (SELECT s.series_id, b.start AS bucket, {src.qualified("r")},
                         min(r.{src.key}) AS fk, max(r.{src.key}) AS lk
                  FROM series s CROSS JOIN temp.rollup_buckets b CROSS JOIN {src.table} r
                  WHERE s.series_id {series_filter}
                    AND b.start >= {self.bound} AND b.start < {self.bound}
                    AND r.series_id = s.series_id
                    AND r.{src.key} >= b.start AND r.{src.key} < b.start + {int(width_us)}
                  GROUP BY s.series_id, b.start) g"""  # noqa: S608

    def stats_select(self, source: str, width_us: int, series_filter: str) -> str:
        """Per series and bucket of `width_us`: the rollup columns, from `source` rows in
        [%s, %s) (after the filter's own parameters). Columns in STAT_COLUMNS order."""
        src = _Source(source)
        bucket = self.bucket(src.key, width_us)
        grouped = f"""(SELECT series_id, {bucket} AS bucket, {src.aggregates},
                         min({src.key}) AS fk, max({src.key}) AS lk
                  FROM {src.table}
                  WHERE series_id {series_filter}
                    AND {src.key} >= {self.bound} AND {src.key} < {self.bound}
                  GROUP BY series_id, {bucket}) g"""  # noqa: S608
        if source == "raw":
            # A bucket of one sample (the usual 1m bucket) is its own first and last: only
            # buckets of several samples look their first/last value up by primary key.
            def value_at(key: str) -> str:
                return (
                    f"CASE WHEN g.n = 1 THEN g.mn ELSE (SELECT value FROM samples v "  # noqa: S608
                    f"WHERE v.series_id = g.series_id AND v.ts = g.{key}) END"
                )

            return f"""SELECT g.series_id, g.bucket, g.n AS count, g.s AS sum, g.ss AS sum_sq,
                   g.mn AS min, g.mx AS max, {value_at("fk")} AS first, g.fts AS first_ts,
                   {value_at("lk")} AS last, g.lts AS last_ts
            FROM {grouped}"""  # noqa: S608
        return f"""SELECT g.series_id, g.bucket, g.n AS count, g.s AS sum, g.ss AS sum_sq,
                   g.mn AS min, g.mx AS max, f.{src.first} AS first, g.fts AS first_ts,
                   l.{src.last} AS last, g.lts AS last_ts
            FROM {grouped}
            JOIN {src.table} f ON f.series_id = g.series_id AND f.{src.key} = g.fk
            JOIN {src.table} l ON l.series_id = g.series_id AND l.{src.key} = g.lk"""  # noqa: S608


class PostgresDialect(Dialect):
    greatest, least = "greatest", "least"
    splits_singles = False  # one pass with window functions (stats_select)

    def __init__(self, backend: Backend) -> None:
        super().__init__(backend)
        # Bounds bound as timestamptz values are constants when the statement is planned:
        # the planner sees how many rows the span holds (and TimescaleDB which chunks), so
        # it reads the span in primary-key order and groups or sorts it series by series in
        # memory, where an expression of the parameter (ts_in) left it guessing, and it
        # sorted the whole span on disk.
        self.bound = "%s::timestamptz"

    def bounds(self, start_us: int, end_us: int) -> tuple[Any, Any]:
        return _timestamp(start_us), _timestamp(end_us)

    def bucket(self, column: str, width_us: int) -> str:
        return f"date_bin(interval '{int(width_us)} microseconds', {column}, timestamptz 'epoch')"

    def stats_select(self, source: str, width_us: int, series_filter: str) -> str:
        if source != "raw":
            return self._upper_select(source, width_us, series_filter, per_series=False)
        if width_us >= _ARRAY_KEY_EXACT_US:
            return self._window_select(width_us, series_filter)
        # Series by series through a LATERAL primary-key range, each series' buckets hashed
        # in memory: no sort and no window. first/last are the min/max of [offset of ts in
        # its bucket, value] arrays (arrays compare element by element, and ts is unique per
        # series, so the offset decides and the value rides along, NaN and -0.0 included).
        # The window statement (_window_select) sorts each series' rows by bucket and ts and
        # buffers every bucket for first_value/last_value: this one took about 10 % less
        # server CPU on benchmarks/rollup.py's 1m level, the insert included (DESIGN.md,
        # "Backends"). The fences (OFFSET 0) keep the bucket and the array computed once a
        # row; the ORDERs keep the rows in (series_id, bucket) order, as the readers expect.
        bucket = self.bucket("ts", width_us)
        return f"""SELECT s.series_id, g.bucket, g.count, g.sum, g.sum_sq, g.min, g.max,
                   g.first, g.first_ts, g.last, g.last_ts
            FROM (SELECT series_id FROM series WHERE series_id {series_filter}
                  ORDER BY series_id) s
            CROSS JOIN LATERAL (
                SELECT bucket, count(*) AS count, sum(value) AS sum,
                       sum(value * value) AS sum_sq, min(value) AS min, max(value) AS max,
                       (min(k))[2] AS first, min(ts) AS first_ts, (max(k))[2] AS last,
                       max(ts) AS last_ts
                FROM (SELECT bucket, ts, value,
                             ARRAY[date_part('epoch', ts - bucket), value] AS k
                      FROM (SELECT {bucket} AS bucket, ts, value FROM samples
                            WHERE series_id = s.series_id
                              AND ts >= {self.bound} AND ts < {self.bound} OFFSET 0) r0
                      OFFSET 0) r
                GROUP BY bucket ORDER BY bucket) g"""  # noqa: S608

    def _window_select(self, width_us: int, series_filter: str) -> str:
        """stats_select from samples in one pass, first/last by a window over the bucket:
        for buckets too wide for stats_select's float offsets to stay exact."""
        src = _Source("raw")
        bucket = self.bucket(src.key, width_us)
        return f"""SELECT series_id, bucket, {src.totals}, min(fv) AS first,
                   min({src.first_ts}) AS first_ts, min(lv) AS last, max({src.last_ts}) AS last_ts
            FROM (SELECT series_id, {bucket} AS bucket, {src.columns},
                         first_value({src.first}) OVER w AS fv, last_value({src.last}) OVER w AS lv
                  FROM {src.table}
                  WHERE series_id {series_filter}
                    AND {src.key} >= {self.bound} AND {src.key} < {self.bound}
                  WINDOW w AS (PARTITION BY series_id, {bucket} ORDER BY {src.key}
                               ROWS BETWEEN UNBOUNDED PRECEDING AND UNBOUNDED FOLLOWING)) x
            GROUP BY series_id, bucket"""  # noqa: S608

    def loop_select(self, source: str, width_us: int, series_filter: str, span: Span) -> str | None:
        return self._upper_select(source, width_us, series_filter, per_series=True)

    def _upper_select(
        self, source: str, width_us: int, series_filter: str, *, per_series: bool
    ) -> str:
        """An upper level from the level below, with no sort of the span and no window.

        A source row starting its bucket holds the bucket's first value, one in the bucket's
        last slot its last value (a filtered aggregate each); a bucket of one row is its own
        first and last; only a bucket missing its edge rows looks them up by primary key.
        `per_series`: grouped series by series through a LATERAL primary-key range (the rows
        arrive in key order, each series' few buckets are sorted in memory), which beats one
        sort of the whole span when every series has many source rows there (5m from 1m);
        otherwise one GROUP BY over the span."""
        src = _Source(source)
        last_slot = f"interval '{int(width_us) - ROLLUP_LEVELS[source]} microseconds'"
        columns = f"""bucket, count, sum, sum_sq, min, max, first, first_ts, last, last_ts,
                      {self.bucket("bucket", width_us)} AS b"""
        aggregates = f"""{src.aggregates}, min(bucket) AS fk, max(bucket) AS lk,
                   count(*) AS k, min(first) AS fa, min(last) AS la,
                   min(first) FILTER (WHERE bucket = b) AS f0,
                   min(last) FILTER (WHERE bucket = b + {last_slot}) AS l0"""
        in_span = f"bucket >= {self.bound} AND bucket < {self.bound}"
        if per_series:
            series = "s.series_id"
            source_rows = f"""(SELECT series_id FROM series WHERE series_id {series_filter}) s
                CROSS JOIN LATERAL (
                    SELECT b, {aggregates}
                    FROM (SELECT {columns} FROM {src.table}
                          WHERE series_id = s.series_id AND {in_span}) r
                    GROUP BY b) g"""  # noqa: S608
        else:
            series = "g.series_id"
            source_rows = f"""(
                    SELECT series_id, b, {aggregates}
                    FROM (SELECT series_id, {columns} FROM {src.table}
                          WHERE series_id {series_filter} AND {in_span}) r
                    GROUP BY series_id, b) g"""  # noqa: S608

        def edge(found: str, alone: str, key: str, column: str) -> str:
            return (
                f"CASE WHEN g.k = 1 THEN g.{alone} ELSE coalesce(g.{found}, "  # noqa: S608
                f"(SELECT v.{column} FROM {src.table} v "
                f"WHERE v.series_id = {series} AND v.bucket = g.{key})) END"
            )

        return f"""SELECT {series} AS series_id, g.b AS bucket, g.n AS count, g.s AS sum,
                   g.ss AS sum_sq, g.mn AS min, g.mx AS max,
                   {edge("f0", "fa", "fk", "first")} AS first, g.fts AS first_ts,
                   {edge("l0", "la", "lk", "last")} AS last, g.lts AS last_ts
            FROM {source_rows}"""  # noqa: S608

    def lock(self) -> None:
        self.backend.execute("SELECT pg_advisory_xact_lock(%s)", (ROLLUP_RETENTION_LOCK,))
        # With the span's size known, a level's estimated cost (its edge lookups counted once
        # per group) passes jit_inline_above_cost: compiling then took longer than the work.
        self.backend.execute("SET LOCAL jit = off")
        # A statement run a few times is prepared (psycopg), and a prepared statement may get
        # a generic plan, blind to the bounds again: plan each run with its own bounds.
        self.backend.execute("SET LOCAL plan_cache_mode = force_custom_plan")

    def claim_suffix(self) -> str:
        return " FOR UPDATE SKIP LOCKED"

    def execute_count(self, sql: str, params: tuple[Any, ...]) -> int:
        with self.backend.conn.cursor() as cur:  # type: ignore[attr-defined]
            cur.execute(sql.encode(), params)
            return int(cur.rowcount)


class TimescaleDialect(PostgresDialect):
    def loop_select(self, source: str, width_us: int, series_filter: str, span: Span) -> str | None:
        return None  # first()/last() in one pass (stats_select), compressed chunks too

    def bucket(self, column: str, width_us: int) -> str:
        return (
            f"time_bucket(interval '{int(width_us)} microseconds', {column}, "
            "origin => timestamptz 'epoch')"
        )

    def stats_select(self, source: str, width_us: int, series_filter: str) -> str:
        src = _Source(source)
        bucket = self.bucket(src.key, width_us)
        return f"""SELECT series_id, {bucket} AS bucket, {src.totals},
                   first({src.first}, {src.key}) AS first, min({src.first_ts}) AS first_ts,
                   last({src.last}, {src.key}) AS last, max({src.last_ts}) AS last_ts
            FROM {src.table}
            WHERE series_id {series_filter}
              AND {src.key} >= {self.bound} AND {src.key} < {self.bound}
            GROUP BY series_id, {bucket}"""  # noqa: S608


class _Source:
    """Column names of a level's source table (samples for "raw")."""

    def __init__(self, level: str) -> None:
        if level == "raw":
            self.table, self.key = "samples", "ts"
            self.first = self.last = "value"
            self.first_ts = self.last_ts = "ts"
            self.columns = "ts, value"
            self.totals = (
                "count(*) AS count, sum(value) AS sum, sum(value * value) AS sum_sq, "
                "min(value) AS min, max(value) AS max"
            )
            self.aggregates = (
                "count(*) AS n, sum(value) AS s, sum(value * value) AS ss, "
                "min(value) AS mn, max(value) AS mx, min(ts) AS fts, max(ts) AS lts"
            )
        else:
            self.table, self.key = ROLLUP_TABLES[level], "bucket"
            self.first, self.last = "first", "last"
            self.first_ts, self.last_ts = "first_ts", "last_ts"
            self.columns = "count, sum, sum_sq, min, max, first_ts, last_ts"
            self.totals = (
                "sum(count) AS count, sum(sum) AS sum, sum(sum_sq) AS sum_sq, "
                "min(min) AS min, max(max) AS max"
            )
            self.aggregates = (
                "sum(count) AS n, sum(sum) AS s, sum(sum_sq) AS ss, min(min) AS mn, "
                "max(max) AS mx, min(first_ts) AS fts, max(last_ts) AS lts"
            )

    def qualified(self, alias: str) -> str:
        """The aggregates over a rollup source aliased `alias`."""
        a = alias
        return (
            f"sum({a}.count) AS n, sum({a}.sum) AS s, sum({a}.sum_sq) AS ss, "
            f"min({a}.min) AS mn, max({a}.max) AS mx, min({a}.first_ts) AS fts, "
            f"max({a}.last_ts) AS lts"
        )


_DATETIME_US = (
    datetime_to_us(datetime(1, 1, 2, tzinfo=UTC)),
    datetime_to_us(datetime(9999, 12, 30, tzinfo=UTC)),
)


# date_part('epoch', ts - bucket) is float8: seconds (µs as a fraction) below 2^32 s stay
# distinct and in order (their spacing 1e-6 s exceeds the float's 2^-20 s), wider buckets not.
_ARRAY_KEY_EXACT_US = 2**32 * US_PER_SECOND


def _timestamp(us: int) -> datetime:
    """µs since the epoch as a datetime, clamped to datetime's range (no data lies beyond)."""
    return us_to_datetime(min(max(int(us), _DATETIME_US[0]), _DATETIME_US[1]))


def dialect_for(backend: Backend) -> Dialect:
    if backend.name == "sqlite":
        return Dialect(backend)
    if getattr(backend, "timescale", False):
        return TimescaleDialect(backend)
    return PostgresDialect(backend)


# -- the rollup run --------------------------------------------------------------------------
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


@dataclass
class RollupStatus:
    """How far behind the rollups are: pending ranges and the newest rolled-up bucket."""

    pending_ranges: int
    pending_hours: float
    oldest_pending: datetime | None
    newest_bucket: datetime | None
    lag_seconds: float | None


def _iso(us: int) -> str:
    return us_to_datetime(us).isoformat()


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


def _series_spanning(d: Dialect) -> str:
    """Series whose sample span meets [%s, %s) (params: start, end): a cheap superset of
    the series with data there, which turns range scans into primary-key range lookups."""
    return (
        f"IN (SELECT series_id FROM series WHERE last_seen >= {d.ts_in} "  # noqa: S608
        f"AND first_seen < {d.ts_in})"
    )


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
            f"SELECT count(*) FROM series WHERE series_id {_series_spanning(d)}",  # noqa: S608
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
    series = _series_spanning(d) if probe else "IS NOT NULL"
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
    select = None
    if _dense(d, level, span, probe, source_rows):
        select = d.loop_select(SOURCE[level], ROLLUP_LEVELS[level], series, span)
    if select is None:
        select = d.stats_select(SOURCE[level], ROLLUP_LEVELS[level], series)
    return d.execute_count(
        f"INSERT INTO {table} (series_id, bucket, {', '.join(STAT_COLUMNS)}) {select}",
        params,
    )


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
    spanning = f"series_id {_series_spanning(d)}"
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
        f"FROM {ROLLUP_TABLES[level]} WHERE series_id {_series_spanning(d)} "
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


# -- reads at the right resolution -----------------------------------------------------------
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
    if source != "raw" and step_us == ROLLUP_LEVELS[source]:
        inner = (
            f"SELECT series_id, bucket, {', '.join(wanted)} "  # noqa: S608
            f"FROM {ROLLUP_TABLES[source]} WHERE series_id {ids_in} "
            f"AND bucket >= {d.ts_in} AND bucket < {d.ts_in}"
        )
        bounds: tuple[Any, Any] = (start_us, end_us)
    else:
        inner = d.stats_select(source, step_us, ids_in)
        bounds = d.bounds(start_us, end_us)
    arrays = backend.read_columns(
        f"SELECT {{columns}} FROM ({inner}) q",  # noqa: S608
        kinds,
        (backend.id_list(ids), *bounds),
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
