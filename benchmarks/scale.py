"""How cost grows: ingest, rollup, a 30-day query, baseline and detect at several sizes.

    uv run python benchmarks/scale.py [--sizes 1000x1000,10000x1000,100000x500]
                                      [--pg-url URL] [--batch-rows 250000] [--repeat 3]

Each size is SERIESxPOINTS: that many series (metric ``scale_metric``, label ``host``) with that
many points each, 5 minutes apart and ending now, so the baseline window and detect's lookback
see them. Every size runs in a fresh database on PostgreSQL (a throwaway cluster unless
--pg-url is given); the data is generated before each timed part. Stages, in order:

* ingest: ``Store.write_samples`` in batches of about --batch-rows rows (validation, series
  resolution, the exactly-once ledger and the write; not the landing files or the GX suite,
  which benchmarks/ingest_flow.py measures);
* rollup: ``Store.rollup()``, every level (1m, 5m, 1h, 1d);
* query: a 30-day, 1h-step average of one series (``Store.query`` with a label selector),
  the median over 5 different series;
* baseline: the baseline flow's task (``learn_all``): reads the 5m buckets chunk by chunk,
  learns, writes baselines and fits the per-metric model;
* detect: the detect flow's scoring task (``score_shard``) over the last hour of every series,
  the median of DETECT_REPEAT runs (the first, cold one is printed too, not fitted);
* baseline_sharded (with --baseline-shards N > 1): the baseline flow's sharded form, a
  ``learn_shard`` task per shard (series_id % N) on a local Dask cluster of N worker
  processes, then the models fitted once (``fit_and_merge``).

Every size but the largest runs --repeat times (each in a fresh database) and each stage's
time there is the median of its runs: a small size's stages take seconds, and one run of them
swung by half from run to run (the rollup of 1,000 series took 7.2 to 11.1 s), which moved
the fitted exponents more than any change to the code did. The largest size runs once (its
stages take minutes). Every run's seconds are printed.

Each stage's exponent k is the least-squares slope of log(seconds) on log(size), where size is
the work the stage is given: samples for ingest, rollup and baseline (one 5m bucket per sample
here), series for detect (it scores each series' last hour), and the samples in the table for
the query (which reads one series, so its k should be near 0: its cost follows the rows it
returns). ``RATIO scale_exponent_max`` is the largest k; the goal is <= 1.1.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import pandas as pd
from prefect.logging import disable_run_logger

from benchmarks._common import format_table, log, median, print_machine, ratio_line, throwaway_pg
from metricmill.settings import Settings, load_settings
from storage.store import Store
from tasks.baseline_run import fit_and_merge, learn_all, learn_shard, run_window
from tasks.detect import score_shard

METRIC = "scale_metric"
STEP_US = 300_000_000  # 5 minutes
HOUR_US = 3_600_000_000
STAGES = ("ingest", "rollup", "query", "baseline", "detect")
DEFAULT_SIZES = "1000x1000,10000x1000,100000x500"
QUERY_REPEAT = 5
# Detect runs every few minutes on the samples ingest has just written. Its first run here
# follows the rollup of the whole backfilled history, which at 50M samples pushes the recent
# rows and their index pages out of memory: that run measures partly the cache (8.8 s of
# reads cold against 3.3-4.4 s warm at 100,000 series), so detect's time is the median of
# DETECT_REPEAT runs and the first one is printed beside it (`detect_first`, not fitted).
DETECT_REPEAT = 3
LIVE_POINTS = 48  # 4 hours: more than detect's lookback (1 h) and context (2 h 5 min)


def parse_sizes(text: str) -> list[tuple[int, int]]:
    sizes = []
    for part in text.split(","):
        series, _, points = part.strip().lower().partition("x")
        try:
            size = (int(series), int(points))
        except ValueError:
            raise SystemExit(f"error: size {part!r} is not SERIESxPOINTS, e.g. 1000x1000") from None
        if size[0] < 1 or size[1] < 24:
            raise SystemExit(f"error: size {part!r}: at least 1 series of 24 points")
        sizes.append(size)
    if len(sizes) < 2:
        raise SystemExit("error: --sizes needs at least two sizes to fit an exponent")
    return sizes


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--sizes", default=DEFAULT_SIZES, help="SERIESxPOINTS,... (>= 2 sizes)")
    parser.add_argument("--batch-rows", type=int, default=250_000, help="rows per write batch")
    parser.add_argument("--pg-url", default=None, help="use this server instead of a throwaway")
    parser.add_argument(
        "--baseline-shards", type=int, default=1, help="also time baselines in N Dask shards"
    )
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs of every size but the largest (median)"
    )
    args = parser.parse_args(argv)
    if args.repeat < 1:
        raise SystemExit("error: --repeat must be at least 1")
    args.size_list = parse_sizes(args.sizes)
    return args


def batches(
    series: int, points: int, end_us: int, batch_rows: int
) -> Iterator[tuple[int, pd.DataFrame]]:
    """(rows, frame) per batch of whole series: a daily cycle plus noise, seeded per group.

    The history (all but the last LIVE_POINTS points of each series) of every series comes
    first, then the last LIVE_POINTS points of every series, as the recent hours arrive after
    a backfill of the history. So the samples detect reads (its lookback and context;
    LIVE_POINTS covers both) lie where live data lies in a table, among its newest rows, not
    one page per series spread over all of it. The recent rows still come in batches of whole
    series (their last LIVE_POINTS points): a batch of a few points of every series costs about
    five times as much per row to resolve its series (DESIGN.md, "Beyond one machine")."""
    ts = end_us - STEP_US * np.arange(points - 1, -1, -1, dtype=np.int64)
    phase = 2 * np.pi * (ts % (24 * HOUR_US)) / (24 * HOUR_US)
    live = min(LIVE_POINTS, points)
    per_group = max(1, batch_rows // points)  # series drawn at once (and seeded) together
    for part in (slice(0, points - live), slice(points - live, points)):
        width = part.stop - part.start
        if not width:
            continue
        groups_per_batch = max(1, batch_rows // (width * per_group))
        pending: list[pd.DataFrame] = []
        for first in range(0, series, per_group):
            n = min(per_group, series - first)
            labels = np.empty(n, dtype=object)
            for i in range(n):  # one dict per series, shared by its rows (as a producer does)
                labels[i] = {"host": f"h{first + i}"}
            rng = np.random.default_rng(first)
            level = rng.uniform(20, 200, n)[:, None]
            values = level * (1 + 0.2 * np.sin(phase)[None, :]) + rng.normal(0, 1, (n, points))
            pending.append(
                pd.DataFrame(
                    {
                        "metric": METRIC,
                        "labels": np.repeat(labels, width),
                        "ts": pd.to_datetime(np.tile(ts[part], n), unit="us", utc=True),
                        "value": values[:, part].ravel(),
                    }
                )
            )
            if len(pending) == groups_per_batch or first + n == series:
                batch = pd.concat(pending, ignore_index=True) if len(pending) > 1 else pending[0]
                pending = []
                yield len(batch), batch


def learn_sharded(settings: Settings, shards: int) -> int:
    """The baseline flow's sharded run on a local Dask cluster of worker processes; the
    number of series learned."""
    from distributed import Client, LocalCluster

    window = run_window(settings, 7)
    with (
        LocalCluster(
            n_workers=shards, threads_per_worker=1, processes=True, dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        futures = [
            client.submit(learn_shard.fn, settings, window, None, s, shards, pure=False)
            for s in range(shards)
        ]
        parts = client.gather(futures)
    return fit_and_merge.fn(settings, parts).series


def run_size(
    settings: Settings, series: int, points: int, batch_rows: int, shards: int = 1
) -> tuple[dict[str, float], int]:
    """Seconds per stage at one size, and the rows the query returned."""
    end_us = time.time_ns() // 1000 // STEP_US * STEP_US - STEP_US
    seconds = dict.fromkeys(STAGES, 0.0)
    with Store.open(settings=settings) as store:
        written = 0
        for _rows, frame in batches(series, points, end_us, batch_rows):
            started = time.perf_counter()
            report = store.write_samples(frame)
            seconds["ingest"] += time.perf_counter() - started
            written += report.written
        assert written == series * points, f"wrote {written} of {series * points} rows"
        log(f"  ingest {seconds['ingest']:.1f}s ({written:,} samples)")

        started = time.perf_counter()
        rolled = store.rollup()
        seconds["rollup"] = time.perf_counter() - started
        levels = ", ".join(f"{r['level']} {r['seconds']:.1f}s" for r in rolled.rows())
        log(f"  rollup {seconds['rollup']:.1f}s ({rolled.chunks} transactions; {levels})")

        end = datetime.now(UTC)
        start = end - timedelta(days=30)
        times, returned = [], 0
        for k in range(QUERY_REPEAT):
            host = f"h{(k * 7919) % series}"
            started = time.perf_counter()
            answer = store.query(METRIC, {"host": host}, start, end, step="1h", agg="avg")
            times.append(time.perf_counter() - started)
            returned = len(answer)
            assert returned >= points * STEP_US // HOUR_US, f"{host}: {returned} rows"
        seconds["query"] = median(times)
        log(f"  query {seconds['query'] * 1000:.1f}ms ({returned} rows)")

    with disable_run_logger():
        started = time.perf_counter()
        outcome = learn_all.fn(settings, window_days=7)
        seconds["baseline"] = time.perf_counter() - started
        assert outcome.series == series, f"baselines for {outcome.series} of {series} series"
        log(f"  baseline {seconds['baseline']:.1f}s ({outcome.rows:,} baseline rows)")
        runs = []
        for _ in range(DETECT_REPEAT):
            started = time.perf_counter()
            scored = score_shard.fn(settings)
            runs.append(time.perf_counter() - started)
            assert scored.series == series and not len(scored.no_baseline), scored.no_baseline[:5]
        seconds["detect"] = median(runs)
        seconds["detect_first"] = runs[0]
        listed = ", ".join(f"{t:.2f}" for t in runs)
        log(f"  detect {seconds['detect']:.1f}s, runs {listed}s ({len(scored.scores):,} points)")
        if shards > 1:
            started = time.perf_counter()
            learned = learn_sharded(settings, shards)
            seconds["baseline_sharded"] = time.perf_counter() - started
            assert learned == series, f"sharded baselines for {learned} of {series} series"
            log(f"  baseline in {shards} shards {seconds['baseline_sharded']:.1f}s")
    return seconds, returned


def exponent(sizes: list[float], seconds: list[float]) -> float:
    """Least-squares slope of log(seconds) on log(size)."""
    slope, _ = np.polyfit(np.log(sizes), np.log(np.maximum(seconds, 1e-6)), 1)
    return float(slope)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results: list[tuple[int, int, dict[str, float], int]] = []
    with (
        tempfile.TemporaryDirectory(prefix="metricmill-bench-scale-") as tmp,
        throwaway_pg(args.pg_url) as server,
    ):
        print_machine({"postgresql server": server.version()})
        print(f"sizes (series x points, 5m apart): {args.sizes}", flush=True)
        largest = max(s * p for s, p in args.size_list)
        for series, points in args.size_list:
            runs = 1 if series * points == largest else args.repeat
            each: list[dict[str, float]] = []
            for run in range(runs):
                log(f"size {series:,} series x {points:,} points, run {run + 1} of {runs}")
                with server.fresh_database("bench_scale") as url:
                    settings = load_settings(database_url=url, home=Path(tmp), timescaledb="off")
                    seconds, returned = run_size(
                        settings, series, points, args.batch_rows, args.baseline_shards
                    )
                each.append(seconds)
            if runs > 1:
                for stage in each[0]:
                    listed = ", ".join(f"{run[stage]:.3f}" for run in each)
                    print(f"{series:,} series, {stage}: runs {listed} s; median taken", flush=True)
            middle = {stage: median([run[stage] for run in each]) for stage in each[0]}
            results.append((series, points, middle, returned))
    samples = [float(s * p) for s, p, _, _ in results]
    work = {
        "ingest": samples,
        "rollup": samples,
        "query": samples,
        "baseline": samples,
        "detect": [float(s) for s, _, _, _ in results],
        "baseline_sharded": samples,
    }
    stages = [*STAGES, *(["baseline_sharded"] if args.baseline_shards > 1 else [])]
    headers = ["stage", *(f"{s * p / 1e6:g}M / {s:,}" for s, p, _, _ in results), "k", "size"]
    units = {"detect": "series", "query": "samples (table)"}
    rows = []
    exponents = {}
    for stage in stages:
        times = [r[2][stage] for r in results]
        exponents[stage] = exponent(work[stage], times)
        rows.append(
            [
                stage,
                *(f"{t:.3f}" for t in times),
                f"{exponents[stage]:.2f}",
                units.get(stage, "samples"),
            ]
        )
    print("seconds per stage (columns: samples / series)")
    print(format_table(headers, rows))
    print(f"query rows returned per series: {', '.join(str(r[3]) for r in results)}")
    first = [r[2]["detect_first"] for r in results]
    print(
        "detect's first run after the rollup (cold cache; not fitted into scale_exponent_max): "
        f"{' / '.join(f'{t:.3f}' for t in first)} s, "
        f"k {exponent(work['detect'], first):.2f}"
    )
    for stage in stages:
        print(ratio_line(f"scale_exponent_{stage}", exponents[stage]))
    print(ratio_line("scale_exponent_max", max(exponents.values())), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
