"""Detection: speed against a plain robust z-score, baseline cost, and the synthetic evaluation.

Run: uv run python benchmarks/detect.py [--series N] [--baseline-series N] [--eval-series N]

1. detect: `score_points` (baselines, robust z, per-metric ECOD) over N series x 1 day of 1m
   points, against a vectorised pandas robust z-score (per-series median and MAD) over the same
   frame, in the same run -> `RATIO detect_vs_zscore <detect s / pandas s>`.
2. baseline: learn_baselines + per-metric model fit over N series x 28 days of 5m buckets, in
   chunks of 1000 series as the flow does (generation not timed) -> `BASELINE_SECONDS_PER_1000
   <s>`. Reading the buckets from the database is not included.
3. evaluation: labelled synthetic series (daily + weekly seasonality, trend, noise; one
   anomaly each) replayed walk-forward (nightly refits), alerts from the rule engine with
   threshold 0.7, for 0 s, keep-firing-for 15 min; scored after 22 days of warm-up so weekly
   series have their week -> `RECALL <kind> <v>`, `DELAY_S <kind> <median s>` and
   `FALSE_ALERTS_PER_SERIES_WEEK <v>`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import pandas as pd

from benchmarks._common import log
from metricmill.synthetic import ANOMALY_KINDS, labelled_set, seasonal_series
from tasks.alert_engine import AlertRule
from tasks.backtest import alerts_for, evaluate_alerts, replay
from tasks.baseline import DAY_US, BaselineTable, fit_models, learn_baselines
from tasks.detect import score_points
from tasks.detectors import FittedModel

STEP_5M = 300_000_000
CHUNK = 1000


def buckets(first_id: int, n: int, days: float, seed: int) -> pd.DataFrame:
    """5m buckets (one point each) of n synthetic series."""
    ts, values, _ = seasonal_series(n, days=days, step_minutes=5, seed=seed)
    ids = np.repeat(np.arange(first_id, first_id + n, dtype=np.int64), len(ts))
    flat = values.ravel()
    return pd.DataFrame(
        {"series_id": ids, "ts_us": np.tile(ts, n), "count": 1.0, "sum": flat, "sum_sq": flat**2}
    )


def robust_z(frame: pd.DataFrame) -> pd.Series:
    """The comparison: per-series median and MAD, then |value - median| / (1.4826 MAD)."""
    by = frame.groupby("series_id", sort=False)["value"]
    median = by.transform("median")
    deviation = (frame["value"] - median).abs()
    mad = deviation.groupby(frame["series_id"], sort=False).transform("median")
    return deviation / (1.4826 * mad)


def bench_detect(n_series: int) -> float:
    log(f"detect: learning baselines for {n_series} series (not timed)")
    tables: list[pd.DataFrame] = []
    models: dict[str, FittedModel] = {}
    for first in range(0, n_series, CHUNK):
        n = min(CHUNK, n_series - first)
        hist = buckets(first + 1, n, 7, seed=first)
        learned = learn_baselines(hist, bucket_us=STEP_5M)
        tables.append(learned.baselines)
        if not models:
            metric_of = pd.Series("bench", index=np.arange(first + 1, first + n + 1))
            models = fit_models(hist, learned.baselines, metric_of, {"*": "ecod"}, max_rows=20_000)
    table = BaselineTable.from_frame(pd.concat(tables, ignore_index=True))
    # The day after the history, at 1m: the same series (same seeds, so the same level, shape
    # and noise scale), continued.
    parts = []
    for first in range(0, n_series, CHUNK):
        n = min(CHUNK, n_series - first)
        ts, values, _ = seasonal_series(n, days=8, step_minutes=1, seed=first)
        day = ts >= ts[0] + 7 * DAY_US
        parts.append(
            pd.DataFrame(
                {
                    "series_id": np.repeat(np.arange(first + 1, first + n + 1), day.sum()),
                    "ts_us": np.tile(ts[day], n),
                    "value": values[:, day].ravel(),
                }
            )
        )
    points = pd.concat(parts, ignore_index=True)
    metric_of = pd.Series("bench", index=np.arange(1, n_series + 1))
    log(f"detect: scoring {len(points):,} points")
    timings = []
    for _ in range(2):
        started = time.perf_counter()
        scored = score_points(points, table, models, metric_of)
        detect_s = time.perf_counter() - started
        started = time.perf_counter()
        z = robust_z(points)
        zscore_s = time.perf_counter() - started
        timings.append((detect_s, zscore_s))
    detect_s, zscore_s = min(timings, key=lambda t: t[0] / t[1])
    assert len(scored.scores) == len(points) and len(z) == len(points)
    print(f"DETECT_SECONDS {detect_s:.2f}")
    print(f"ZSCORE_SECONDS {zscore_s:.2f}")
    print(f"POINTS {len(points)}")
    ratio = detect_s / zscore_s
    print(f"RATIO detect_vs_zscore {ratio:.2f}")
    return ratio


def bench_baseline(n_series: int) -> float:
    total = 0.0
    for first in range(0, n_series, CHUNK):
        n = min(CHUNK, n_series - first)
        hist = buckets(first + 1, n, 28, seed=first)
        started = time.perf_counter()
        learned = learn_baselines(hist, bucket_us=STEP_5M)
        metric_of = pd.Series("bench", index=np.arange(first + 1, first + n + 1))
        fit_models(hist, learned.baselines, metric_of, {"*": "ecod"}, max_rows=20_000)
        total += time.perf_counter() - started
        log(f"baseline: {first + n} series, {total:.1f}s")
        del hist, learned
    per_1000 = total / n_series * 1000
    print(f"BASELINE_SECONDS_PER_1000 {per_1000:.2f}")
    return per_1000


def bench_evaluation(n_series: int) -> None:
    data = labelled_set(n_series, days=35, clean_days=22, seed=5)
    log(f"evaluation: replaying {n_series} series x 35 days")
    started = time.perf_counter()
    scores = replay(data.frame[["series_id", "ts_us", "value"]])
    log(f"evaluation: replay took {time.perf_counter() - started:.1f}s")
    start = data.start_us + 22 * DAY_US
    scored = scores[scores["ts_us"] >= start].reset_index(drop=True)
    rule = AlertRule(threshold=0.7, for_seconds=0, keep_firing_for_seconds=900)
    result = evaluate_alerts(
        scored, alerts_for(scored, rule), data.anomaly_frame(), grace_us=data.step_us
    )
    by_kind = result.windows.groupby("kind")
    for kind in ANOMALY_KINDS:
        print(f"RECALL {kind} {by_kind['detected'].mean()[kind]:.3f}")
    for kind in ANOMALY_KINDS:
        found = result.windows[(result.windows["kind"] == kind) & result.windows["detected"]]
        print(f"DELAY_S {kind} {found['delay_s'].median():.0f}")
    print(f"PRECISION {result.precision:.3f}")
    print(f"FALSE_ALERTS_PER_SERIES_WEEK {result.false_per_series_week:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--series", type=int, default=10_000)
    parser.add_argument("--baseline-series", type=int, default=10_000)
    parser.add_argument("--eval-series", type=int, default=100)
    args = parser.parse_args()
    bench_evaluation(args.eval_series)
    bench_detect(args.series)
    bench_baseline(args.baseline_series)


if __name__ == "__main__":
    main()
