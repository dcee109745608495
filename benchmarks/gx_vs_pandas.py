"""GX suite vs the same checks in plain pandas: 100 batches of 10,000 samples (1M rows).

Run: uv run python benchmarks/gx_vs_pandas.py [--frames N] [--rows N]

Batches look like NDJSON input (each row has its own labels dict); about 1% of rows are bad,
spread over every reason. Both paths are timed end to end (helper columns included),
interleaved per batch, after one warm-up call each (the GX import and context setup are excluded
and reported separately).
The last line is `RATIO gx_vs_pandas <gx seconds / pandas seconds>`.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import pandas as pd

from tasks.quality import QualityLimits, validate_batch, validate_batch_pandas

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
METRICS = [
    "http_requests_total",
    "node_cpu_seconds_total",
    "process_resident_memory_bytes",
    "disk:io_time_seconds",
    "go_goroutines",
]


def make_frame(seed: int, rows: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    hosts = rng.integers(0, 50, rows)
    metric_idx = rng.integers(0, len(METRICS), rows)
    metric = np.array(METRICS, dtype=object)[metric_idx]
    # distinct timestamps per series: 1 s steps, so only injected rows conflict
    ts_us = int(NOW.timestamp() * 1e6) - np.arange(rows, dtype=np.int64)[::-1] * 1_000_000
    value = rng.normal(100.0, 10.0, rows)
    labels = [{"host": f"host-{h:03d}", "job": "node", "env": "prod"} for h in hosts]

    bad = rng.choice(rows, size=rows // 100, replace=False)
    kinds = np.array_split(bad, 9)
    metric[kinds[0]] = "cpu usage"
    value[kinds[1]] = np.nan
    value[kinds[2]] = np.inf
    ts_us[kinds[3]] = int(datetime(2099, 1, 1, tzinfo=UTC).timestamp() * 1e6)
    ts_us[kinds[4]] = int((NOW - timedelta(days=60)).timestamp() * 1e6)
    for i in kinds[5]:
        labels[i] = {f"k{j}": "v" for j in range(40)}
    for i in kinds[6]:
        labels[i] = {"k" * 200: "v"}
    for i in kinds[7]:
        labels[i] = {"host": "x" * 3000}
    # conflicting pairs: copy series + ts from the previous row, with another value
    for i in kinds[8]:
        j = i - 1 if i else i + 1
        metric[i], labels[i], ts_us[i] = metric[j], dict(labels[j]), ts_us[j]
        value[i] = value[j] + 1.0
    return pd.DataFrame(
        {
            "metric": pd.Series(metric, dtype="str"),
            "labels": pd.Series(labels, dtype=object),
            "ts": pd.to_datetime(ts_us, unit="us", utc=True).astype("datetime64[us, UTC]"),
            "value": value,
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=100)
    parser.add_argument("--rows", type=int, default=10_000)
    args = parser.parse_args()
    limits = QualityLimits(now=NOW)

    frames = [make_frame(seed, args.rows) for seed in range(args.frames)]
    total_rows = sum(len(f) for f in frames)
    print(f"{len(frames)} frames x {args.rows} rows = {total_rows} rows")

    start = time.perf_counter()
    validate_batch(frames[0], limits)  # imports GX, builds the context and suite
    print(f"gx first call (import + setup + 1 batch): {time.perf_counter() - start:.2f} s")
    validate_batch_pandas(frames[0], limits)

    # interleaved per frame, so a change in machine load hits both paths alike
    pandas_s = gx_s = 0.0
    pandas_results, gx_results = [], []
    for frame in frames:
        start = time.perf_counter()
        pandas_results.append(validate_batch_pandas(frame, limits))
        middle = time.perf_counter()
        gx_results.append(validate_batch(frame, limits))
        pandas_s += middle - start
        gx_s += time.perf_counter() - middle

    rejected_gx = sum(len(r.rejected) for r in gx_results)
    rejected_pd = sum(len(r.rejected) for r in pandas_results)
    same = all(
        [reason for _, reason in g.rejected] == [reason for _, reason in p.rejected]
        and g.good.index.equals(p.good.index)
        for g, p in zip(gx_results, pandas_results, strict=True)
    )
    print(
        f"pandas: {pandas_s:.2f} s ({pandas_s / len(frames) * 1000:.1f} ms/batch), "
        f"rejected {rejected_pd}"
    )
    print(
        f"gx:     {gx_s:.2f} s ({gx_s / len(frames) * 1000:.1f} ms/batch), rejected {rejected_gx}"
    )
    print(f"same rejects and good rows: {same}")
    print(f"RATIO gx_vs_pandas {gx_s / pandas_s:.2f}")


if __name__ == "__main__":
    main()
