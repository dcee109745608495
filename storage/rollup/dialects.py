"""The SQL of rollups that differs per backend: one dialect class per backend.

Integer bucket arithmetic on SQLite (ts are µs integers), `date_bin` on PostgreSQL,
`time_bucket` and `first()/last()` on TimescaleDB. Elsewhere first and last are found by
joining the group's first/last key back to its source row (a primary key lookup), as the
min/max of [offset in the bucket, value] arrays (PostgreSQL's 1m level), or, for
PostgreSQL's upper levels, from the source rows in the bucket's first and last slots. Every
fragment composed into SQL text is a constant of this package.

Sums and sums of squares saturate at ±FLOAT8_MAX, the largest finite float8, and a square
too small for float8 is 0, as IEEE arithmetic has it: every stored value is finite, however
close to float8's limits, and a bucket of such values rolls up like any other (its sums are
then only a bound), where PostgreSQL's float8 arithmetic raises. PostgreSQL runs the plain
statement first and, when it raises out of range, the same statement `wide` (numeric sums,
clamped back into float8) from a savepoint (Dialect.run_safely).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import psycopg

from metricmill.types import US_PER_SECOND, datetime_to_us, us_to_datetime
from storage.backend import Backend
from storage.locks import ROLLUP_RETENTION_LOCK
from storage.rollup.levels import Span
from storage.schema import ROLLUP_LEVELS, ROLLUP_TABLES

T = TypeVar("T")

# float8's largest finite value, and the half of its smallest subnormal: a sum beyond the
# one is clamped to it, a magnitude below the other rounds to 0.
FLOAT8_MAX = "1.7976931348623157e308"
FLOAT8_HALF_TINY = "2.4703282292062328e-324"


class Dialect:
    """The SQL that differs per backend; the base class is SQLite."""

    greatest, least = "max", "min"  # the scalar forms
    wide = False  # PostgreSQL: sums in numeric (see run_safely)

    def total(self, expr: str) -> str:
        """The aggregate sum of `expr`, saturating at ±FLOAT8_MAX (SQLite's sum overflows to
        ±Infinity, and it can hold no NaN: a finite input never meets both signs of it)."""
        return f"max(min(sum({expr}), {FLOAT8_MAX}), -{FLOAT8_MAX})"

    def squares(self, expr: str) -> str:
        """The aggregate sum of `expr` squared, saturating at FLOAT8_MAX."""
        return f"min(sum({expr} * {expr}), {FLOAT8_MAX})"

    def square(self, expr: str) -> str:
        """One row's `expr` squared, saturating at FLOAT8_MAX."""
        return f"min({expr} * {expr}, {FLOAT8_MAX})"

    def run_safely(self, build: Callable[[], str], run: Callable[[str], T]) -> T:
        """run(build()): where float8 arithmetic can raise, again `wide` if it did."""
        return run(build())

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

    def compile_big(self, on: bool) -> None:
        """Let the next statements be compiled when they are big (PostgreSQL's JIT), or not."""

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
            return f"""SELECT s.series_id, {bucket}, 1, s.value, {self.square("s.value")}, s.value,
                       s.value, s.value, s.ts, s.value, s.ts
                FROM samples s WHERE {where} AND NOT EXISTS ({neighbour})"""  # noqa: S608
        return f"""SELECT g.series_id, g.bucket, g.n, g.s, g.ss, g.mn, g.mx,
                   (SELECT v.value FROM samples v WHERE v.series_id = g.series_id AND v.ts = g.fts),
                   g.fts,
                   (SELECT v.value FROM samples v WHERE v.series_id = g.series_id AND v.ts = g.lts),
                   g.lts
            FROM (SELECT s.series_id, {bucket} AS bucket, count(*) AS n,
                         {self.total("s.value")} AS s, {self.squares("s.value")} AS ss,
                         min(s.value) AS mn, max(s.value) AS mx,
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
        src = Source(source, self)
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
        src = Source(source, self)
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

    # float8's sum raises on overflow and its product on underflow, so the plain forms never
    # leave float8's range: when one raises, run_safely runs the statement `wide`, where the
    # sums are exact numeric ones (through float8's shortest exact text) clamped back.
    def total(self, expr: str) -> str:
        if not self.wide:
            return f"sum({expr})"
        return _float8_of(f"sum({expr}::text::numeric)")

    def squares(self, expr: str) -> str:
        if not self.wide:
            return f"sum({expr} * {expr})"
        return _float8_of(f"sum({expr}::text::numeric * {expr}::text::numeric)")

    def run_safely(self, build: Callable[[], str], run: Callable[[str], T]) -> T:
        try:
            with self.backend.transaction():  # a savepoint inside the caller's transaction
                return run(build())
        except psycopg.errors.NumericValueOutOfRange:
            self.wide = True
            try:
                return run(build())
            finally:
                self.wide = False

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
                SELECT bucket, count(*) AS count, {self.total("value")} AS sum,
                       {self.squares("value")} AS sum_sq, min(value) AS min, max(value) AS max,
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
        src = Source("raw", self)
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
        src = Source(source, self)
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
        # JIT off, but for the statements from samples (compile_big) on spans of millions of
        # samples. An upper level's estimated cost (its edge lookups counted once per group)
        # passed the default thresholds and compiling took longer than the work; the 1m
        # level of 10,000,000 samples (cost about 2e7) took about 20 % less time compiled,
        # inlined and optimised, and a compile costs well under a second.
        self.backend.execute("SET LOCAL jit = off")
        for setting in ("jit_above_cost", "jit_inline_above_cost", "jit_optimize_above_cost"):
            self.backend.execute(f"SET LOCAL {setting} = {_JIT_ABOVE_COST}")  # a constant
        # A statement run a few times is prepared (psycopg), and a prepared statement may get
        # a generic plan, blind to the bounds again: plan each run with its own bounds.
        self.backend.execute("SET LOCAL plan_cache_mode = force_custom_plan")

    def compile_big(self, on: bool) -> None:
        self.backend.execute(f"SET LOCAL jit = {'on' if on else 'off'}")

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
        src = Source(source, self)
        bucket = self.bucket(src.key, width_us)
        return f"""SELECT series_id, {bucket} AS bucket, {src.totals},
                   first({src.first}, {src.key}) AS first, min({src.first_ts}) AS first_ts,
                   last({src.last}, {src.key}) AS last, max({src.last_ts}) AS last_ts
            FROM {src.table}
            WHERE series_id {series_filter}
              AND {src.key} >= {self.bound} AND {src.key} < {self.bound}
            GROUP BY series_id, {bucket}"""  # noqa: S608


class Source:
    """Column names of a level's source table (samples for "raw"), and its aggregates in the
    dialect `d`."""

    def __init__(self, level: str, d: Dialect) -> None:
        self.d = d
        if level == "raw":
            self.table, self.key = "samples", "ts"
            self.first = self.last = "value"
            self.first_ts = self.last_ts = "ts"
            self.columns = "ts, value"
            self.totals = (
                f"count(*) AS count, {d.total('value')} AS sum, "
                f"{d.squares('value')} AS sum_sq, min(value) AS min, max(value) AS max"
            )
            self.aggregates = (
                f"count(*) AS n, {d.total('value')} AS s, {d.squares('value')} AS ss, "
                "min(value) AS mn, max(value) AS mx, min(ts) AS fts, max(ts) AS lts"
            )
        else:
            self.table, self.key = ROLLUP_TABLES[level], "bucket"
            self.first, self.last = "first", "last"
            self.first_ts, self.last_ts = "first_ts", "last_ts"
            self.columns = "count, sum, sum_sq, min, max, first_ts, last_ts"
            self.totals = (
                f"sum(count) AS count, {d.total('sum')} AS sum, {d.total('sum_sq')} AS sum_sq, "
                "min(min) AS min, max(max) AS max"
            )
            self.aggregates = self.qualified("")

    def qualified(self, alias: str) -> str:
        """The aggregates over a rollup source aliased `alias` ("" for none)."""
        a = f"{alias}." if alias else ""
        return (
            f"sum({a}count) AS n, {self.d.total(f'{a}sum')} AS s, "
            f"{self.d.total(f'{a}sum_sq')} AS ss, min({a}min) AS mn, max({a}max) AS mx, "
            f"min({a}first_ts) AS fts, max({a}last_ts) AS lts"
        )


def _float8_of(numeric: str) -> str:
    """A numeric aggregate as float8: clamped to ±FLOAT8_MAX, 0 where it rounds to 0 (both
    of which float8's input function would refuse), Infinity clamped too."""
    return (
        f"CASE WHEN {numeric} > {FLOAT8_MAX} THEN {FLOAT8_MAX}::float8 "
        f"WHEN {numeric} < -{FLOAT8_MAX} THEN -{FLOAT8_MAX}::float8 "
        f"WHEN abs({numeric}) < {FLOAT8_HALF_TINY} THEN 0::float8 ELSE ({numeric})::float8 END"
    )


_DATETIME_US = (
    datetime_to_us(datetime(1, 1, 2, tzinfo=UTC)),
    datetime_to_us(datetime(9999, 12, 30, tzinfo=UTC)),
)


# The estimated cost above which a rollup statement from samples is compiled (PostgresDialect):
# about 5,000,000 samples of the 1m statement.
_JIT_ABOVE_COST = 10_000_000

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


def series_spanning(d: Dialect) -> str:
    """Series whose sample span meets [%s, %s) (params: start, end): a cheap superset of
    the series with data there, which turns range scans into primary-key range lookups."""
    return (
        f"IN (SELECT series_id FROM series WHERE last_seen >= {d.ts_in} "  # noqa: S608
        f"AND first_seen < {d.ts_in})"
    )
