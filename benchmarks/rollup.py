"""Rollup benchmark: the rollup path against one hand-written statement, and rollup-served queries.

    uv run python benchmarks/rollup.py [--scale 1.0] [--repeat 2] [--pg-url URL] [--timescaledb]

On a throwaway PostgreSQL (plain, no TimescaleDB; with ``--timescaledb`` one that preloads it,
the store on hypertables):

* 10,000 series x 1,000 points (10 s apart: 10,000,000 raw samples, generated in SQL) are rolled
  up by ``Store.rollup()`` — claiming the pending range, DELETE + INSERT ... SELECT per level, in
  chunk transactions — against one hand-written ``INSERT INTO ref_1m SELECT date_bin(...) ...
  GROUP BY`` over the same rows computing the same columns (count, sum, sum_sq, min, max, and
  first/last by ts through first_value/last_value over the bucket, the single-pass shape the
  PostgreSQL dialect used before it grouped series by series with array min/max for first and
  last: the reference stays the plain window statement a user would write). The run's 1m
  time includes its bookkeeping (claim, pending-row delete, commit). Both start from empty
  rollup tables, after one untimed read of all samples (so no peer pays for the cold caches);
  which goes first rotates between repeats; medians over three repeats by default.
* ``--timescaledb``: a third peer, ``CALL refresh_continuous_aggregate(...)`` over the whole span
  of a 1m continuous aggregate on the same ``samples`` hypertable computing the same columns
  (``first()``/``last()`` for first/last), created empty before each repeat; its rows must equal
  ``rollup_1m``'s. ``rollup_1m_vs_cagg``: the run's 1m time over the refresh's. The ratios that
  exist on both backends get a ``_timescaledb`` suffix there.
* ``rollup_upper_vs_1m``: the 5m, 1h and 1d levels' time together over the 1m level's time.
* ``query_rollup_speedup``: a 30-day query at a 1h step (avg) over 100 series with one point a
  minute (4.3M raw samples), served from the rollups against the same query forced to raw
  samples (``level="raw"``); medians over the repeats. Both answers are compared.

``--scale`` shrinks the series counts for a quick run. ``benchmarks/archive.py``'s ``main()``
runs at the end when that module exists.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import psycopg

from benchmarks._common import (
    format_table,
    log,
    median,
    print_machine,
    ratio_line,
    throwaway_pg,
)
from metricmill.settings import load_settings
from storage.store import Store

START = "2025-01-06 00:00:00+00"  # an hour (and day) boundary
STEP_SECONDS = 10
QUERY_DAYS = 30

_SEED_SERIES = """
INSERT INTO series (series_key, metric, labels, first_seen, last_seen)
SELECT %(metric)s || '{host="h' || i || '"}', %(metric)s, jsonb_build_object('host', 'h' || i),
       %(start)s::timestamptz,
       %(start)s::timestamptz + (%(points)s - 1) * %(step)s * interval '1 second'
FROM generate_series(1, %(series)s) AS i
"""
_SEED_SAMPLES = """
INSERT INTO samples (series_id, ts, value)
SELECT s.series_id, %(start)s::timestamptz + k * %(step)s * interval '1 second',
       ((s.series_id * 7919 + k::bigint * 104729) %% 10007) / 8.0
FROM series s CROSS JOIN generate_series(0, %(points)s - 1) AS k
WHERE s.metric = %(metric)s
ORDER BY s.series_id, k
"""
_SEED_PENDING = """
INSERT INTO rollup_pending (start_ts, end_ts, batch_id)
SELECT date_trunc('hour', min(first_seen)),
       date_trunc('hour', max(last_seen)) + interval '1 hour', 'benchmark'
FROM series WHERE metric = %(metric)s
"""
_REFERENCE = """
INSERT INTO ref_1m (series_id, bucket, count, sum, sum_sq, min, max, first, first_ts, last,
                    last_ts)
SELECT series_id, bucket, count(*), sum(value), sum(value * value), min(value), max(value),
       min(fv), min(ts), min(lv), max(ts)
FROM (SELECT series_id, date_bin(interval '1 minute', ts, timestamptz 'epoch') AS bucket,
             ts, value, first_value(value) OVER w AS fv, last_value(value) OVER w AS lv
      FROM samples
      WINDOW w AS (PARTITION BY series_id, date_bin(interval '1 minute', ts, timestamptz 'epoch')
                   ORDER BY ts ROWS BETWEEN UNBOUNDED PRECEDING AND UNBOUNDED FOLLOWING)) x
GROUP BY series_id, bucket
"""
_CAGG = """
CREATE MATERIALIZED VIEW cagg_1m WITH (timescaledb.continuous, timescaledb.materialized_only = true)
AS SELECT series_id, time_bucket(interval '1 minute', ts) AS bucket, count(*) AS count,
          sum(value) AS sum, sum(value * value) AS sum_sq, min(value) AS min, max(value) AS max,
          first(value, ts) AS first, min(ts) AS first_ts, last(value, ts) AS last,
          max(ts) AS last_ts
   FROM samples GROUP BY series_id, time_bucket(interval '1 minute', ts)
WITH NO DATA
"""
_REFRESH = """
CALL refresh_continuous_aggregate('cagg_1m', %(start)s::timestamptz,
     %(start)s::timestamptz + %(points)s * %(step)s * interval '1 second' + interval '1 minute',
     options => %(options)s::jsonb)
"""
# A manual refresh materialises 10 buckets per transaction by default (TimescaleDB 2.28's
# DEFAULT_BUCKETS_PER_BATCH); 0 makes it one atomic pass, as one rollup transaction is.
_REFRESH_OPTIONS = {"cagg": "{}", "cagg_atomic": '{"buckets_per_batch": 0}'}
_SAME_AS_CAGG = """
SELECT (SELECT count(*) FROM rollup_1m), (SELECT count(*) FROM cagg_1m),
       (SELECT count(*) FROM (SELECT * FROM rollup_1m EXCEPT
        SELECT series_id, bucket, count, sum, sum_sq, min, max, first, first_ts, last, last_ts
        FROM cagg_1m) d)
"""
_EMPTY = "TRUNCATE rollup_1m, rollup_5m, rollup_1h, rollup_1d, ref_1m, rollup_pending"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the series counts")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--points", type=int, default=1000, help="points per series (rollup)")
    parser.add_argument("--pg-url", default=None, help="use this server instead of a throwaway")
    parser.add_argument(
        "--timescaledb",
        action="store_true",
        help="on TimescaleDB hypertables, with a continuous aggregate's refresh as a peer",
    )
    return parser.parse_args(argv)


def seed(conn: psycopg.Connection, *, metric: str, series: int, points: int, step: int) -> int:
    params = {"metric": metric, "start": START, "points": points, "step": step, "series": series}
    for statement in (_SEED_SERIES, _SEED_SAMPLES, _SEED_PENDING):
        conn.execute(statement, params)
    conn.execute("VACUUM ANALYZE series")
    conn.execute("VACUUM ANALYZE samples")
    return series * points


def open_store(url: str, home: Path, *, timescaledb: bool = False) -> Store:
    mode = "require" if timescaledb else "off"
    return Store.open(settings=load_settings(database_url=url, home=home, timescaledb=mode))


def bench_rollup(
    url: str, home: Path, *, series: int, points: int, repeat: int, timescaledb: bool = False
) -> dict[str, float]:
    with (
        psycopg.connect(url, autocommit=True) as conn,
        open_store(url, home, timescaledb=timescaledb) as store,
    ):
        rows = seed(conn, metric="bench_rollup", series=series, points=points, step=STEP_SECONDS)
        conn.execute("CREATE TABLE ref_1m (LIKE rollup_1m INCLUDING ALL)")
        log(f"seeded {rows:,} samples over {series:,} series")
        # One untimed read of every sample first: otherwise whichever peer reads the freshly
        # loaded table first pays for bringing it into the caches, and the ratio measures
        # the order of the peers rather than their work.
        conn.execute("SELECT count(*), sum(value) FROM samples")
        span = {"start": START, "points": points, "step": STEP_SECONDS}
        sides = ["mine", "reference", *(_REFRESH_OPTIONS if timescaledb else [])]
        times: dict[str, list[float]] = {side: [] for side in (*sides, "upper")}
        for number in range(repeat):
            conn.execute(_EMPTY)
            conn.execute(_SEED_PENDING, {"metric": "bench_rollup"})
            # Rotate who goes first: the first reader of the samples warms the caches.
            for side in sides[number % len(sides) :] + sides[: number % len(sides)]:
                if side in _REFRESH_OPTIONS:  # each refresh starts from an empty aggregate
                    conn.execute("DROP MATERIALIZED VIEW IF EXISTS cagg_1m")
                    conn.execute(_CAGG)
                conn.execute("CHECKPOINT")
                if side == "mine":
                    report = store.rollup()
                    levels = report.levels
                    overhead = report.seconds - sum(w.seconds for w in levels.values())
                    times["mine"].append(levels["1m"].seconds + overhead)
                    times["upper"].append(sum(levels[lv].seconds for lv in ("5m", "1h", "1d")))
                elif side == "reference":
                    started = time.perf_counter()
                    with conn.transaction():
                        conn.execute(_REFERENCE)
                    times["reference"].append(time.perf_counter() - started)
                else:  # a refresh runs its own transactions (not inside a transaction block)
                    started = time.perf_counter()
                    conn.execute(_REFRESH, {**span, "options": _REFRESH_OPTIONS[side]})
                    times[side].append(time.perf_counter() - started)
                    _check_same_as_cagg(conn)
            same = conn.execute(
                "SELECT count(*) FROM (SELECT * FROM rollup_1m EXCEPT SELECT * FROM ref_1m) d"
            ).fetchone()
            assert same is not None and same[0] == 0, "the two 1m tables differ"
            if timescaledb:
                _check_same_as_cagg(conn)
            peers = ", ".join(f"{side} {times[side][-1]:.2f}s" for side in sides[1:])
            log(
                f"  repeat {number + 1}: rollup 1m {times['mine'][-1]:.2f}s "
                f"(chunks {report.chunks}, rows {levels['1m'].rows:,}), "
                f"upper {times['upper'][-1]:.2f}s, {peers}"
            )
    return {side: median(values) for side, values in times.items()}


def _check_same_as_cagg(conn: psycopg.Connection) -> None:
    """The aggregate holds exactly rollup_1m's rows (once both have run in this repeat)."""
    rolled = conn.execute("SELECT count(*) FROM rollup_1m").fetchone()
    if rolled is None or rolled[0] == 0:
        return  # the rollup runs later in this repeat; the check after it covers this pair
    counted = conn.execute(_SAME_AS_CAGG).fetchone()
    assert counted is not None and counted[0] == counted[1] and counted[2] == 0, (
        f"rollup_1m and the continuous aggregate differ: {counted}"
    )


def bench_query(
    url: str, home: Path, *, series: int, repeat: int, timescaledb: bool = False
) -> dict[str, float]:
    points = QUERY_DAYS * 24 * 60
    with (
        psycopg.connect(url, autocommit=True) as conn,
        open_store(url, home, timescaledb=timescaledb) as store,
    ):
        rows = seed(conn, metric="bench_query", series=series, points=points, step=60)
        log(f"seeded {rows:,} samples over {series} series ({QUERY_DAYS} days, 1 a minute)")
        started = time.perf_counter()
        store.rollup()
        log(f"  rolled up in {time.perf_counter() - started:.1f}s")
        start = "2025-01-06T00:00:00Z"
        end = "2025-02-05T00:00:00Z"
        from_rollup, from_raw = [], []
        for _ in range(repeat):
            t0 = time.perf_counter()
            fast = store.query("bench_query", None, start, end, step="1h", agg="avg")
            from_rollup.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            slow = store.query("bench_query", None, start, end, step="1h", agg="avg", level="raw")
            from_raw.append(time.perf_counter() - t0)
        assert len(fast) == len(slow) == series * QUERY_DAYS * 24
        np.testing.assert_allclose(fast["value"], slow["value"], rtol=1e-9)
        log(f"  rollup {median(from_rollup):.3f}s, raw {median(from_raw):.3f}s")
    return {"rollup": median(from_rollup), "raw": median(from_raw)}


def run_archive_benchmark() -> None:
    if not (Path(__file__).parent / "archive.py").exists():
        log("benchmarks/archive.py not present: no archive ratio")
        return
    module = importlib.import_module("benchmarks.archive")
    saved = sys.argv
    sys.argv = [str(Path(__file__).parent / "archive.py")]
    try:
        module.main()
    finally:
        sys.argv = saved


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rollup_series = max(1, round(10_000 * args.scale))
    query_series = max(1, round(100 * args.scale))
    with (
        tempfile.TemporaryDirectory(prefix="metricmill-bench-rollup-") as tmp,
        throwaway_pg(args.pg_url, preload_timescaledb=args.timescaledb) as server,
    ):
        home = Path(tmp)
        print_machine({"postgresql server": server.version()})
        print(
            f"backend: {'TimescaleDB (hypertables)' if args.timescaledb else 'plain PostgreSQL'}; "
            f"workload: rollup {rollup_series:,} series x {args.points:,} points "
            f"({STEP_SECONDS}s apart); query {query_series} series x {QUERY_DAYS} days at 1/min; "
            f"{args.repeat} repeat(s)",
            flush=True,
        )
        with server.fresh_database("bench_rollup") as url:
            rolled = bench_rollup(
                url,
                home,
                series=rollup_series,
                points=args.points,
                repeat=args.repeat,
                timescaledb=args.timescaledb,
            )
        with server.fresh_database("bench_query") as url:
            queried = bench_query(
                url,
                home,
                series=query_series,
                repeat=max(3, args.repeat),
                timescaledb=args.timescaledb,
            )
    cagg = []
    if args.timescaledb:
        cagg = [
            ["refresh_continuous_aggregate, 1m (batches of 10 buckets)", f"{rolled['cagg']:.3f}"],
            ["same, one atomic pass (buckets_per_batch 0)", f"{rolled['cagg_atomic']:.3f}"],
        ]
    print(
        format_table(
            ["measure", "seconds (median)"],
            [
                ["Store.rollup(): 1m level (with run bookkeeping)", f"{rolled['mine']:.3f}"],
                [
                    "hand-written INSERT ... SELECT date_bin ... GROUP BY",
                    f"{rolled['reference']:.3f}",
                ],
                *cagg,
                ["Store.rollup(): 5m + 1h + 1d levels", f"{rolled['upper']:.3f}"],
                ["30-day 1h-step query from rollups", f"{queried['rollup']:.4f}"],
                ["30-day 1h-step query from raw samples", f"{queried['raw']:.4f}"],
            ],
        ),
        flush=True,
    )
    suffix = "_timescaledb" if args.timescaledb else ""
    if args.timescaledb:
        faster = min(rolled["cagg"], rolled["cagg_atomic"])  # the aggregate's better way
        print(ratio_line("rollup_1m_vs_cagg", rolled["mine"] / faster))
    print(ratio_line(f"rollup_1m_vs_sql{suffix}", rolled["mine"] / rolled["reference"]))
    print(ratio_line(f"rollup_upper_vs_1m{suffix}", rolled["upper"] / rolled["mine"]))
    print(
        ratio_line(f"query_rollup_speedup{suffix}", queried["raw"] / queried["rollup"]),
        flush=True,
    )
    if not args.timescaledb:
        run_archive_benchmark()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
