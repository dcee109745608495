"""Archive benchmark: metricmill's verified Parquet archival against a bare pyarrow write.

    uv run python benchmarks/archive.py [--rows 1000000] [--series 1000] [--repeat 5]

One day of synthetic samples (seeded random values, `--series` series with host/region labels)
is archived the way the retention flow does it, from the arrays a database select hands over:
build the Arrow table (series key, labels map, ts, value), serialise with zstd, name the file
by a content hash, write it atomically with fsync, read it back and check sha256 and row count.
The baseline is ``pyarrow.parquet.write_table`` of the same, already built table straight to a
file with zstd. Methods alternate within each repeat, after one warm-up repeat that is not
counted; rows/s are medians over the repeats and the ratio (ours / pyarrow) closes the output
as ``RATIO archive_vs_pyarrow``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from benchmarks._common import format_table, log, median, print_machine, rate, ratio_line
from storage.archive import write_verified
from storage.frames import series_key
from storage.retention import archive_table

DAY_US = 86_400_000_000
FIRST_DAY_US = 1_735_689_600_000_000  # 2025-01-01T00:00:00Z


def synthetic(rows: int, series: int) -> tuple[pd.DataFrame, np.ndarray, np.ndarray, np.ndarray]:
    """A series frame and (series id, ts µs, value) arrays in key order, all within one day."""
    per_series = max(rows // series, 1)
    labels = [{"host": f"host-{i:05d}", "region": f"region-{i % 7}"} for i in range(series)]
    frame = pd.DataFrame(
        {
            "series_id": np.arange(1, series + 1, dtype=np.int64),
            "metric": "bench_metric",
            "labels": labels,
            "series_key": [
                series_key("bench_metric", f'{{"host":"{x["host"]}","region":"{x["region"]}"}}')
                for x in labels
            ],
        }
    )
    sid = np.repeat(frame["series_id"].to_numpy(), per_series)
    step = DAY_US // per_series
    ts = FIRST_DAY_US + np.tile(np.arange(per_series, dtype=np.int64) * step, series)
    values = np.random.default_rng(42).normal(50.0, 10.0, len(sid))
    return frame, sid, ts, values


def main(argv: Sequence[str] = ()) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--series", type=int, default=1_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(list(argv))
    print_machine()
    frame, sid, ts, values = synthetic(args.rows, args.series)
    n = len(sid)
    ours: list[float] = []
    bare: list[float] = []
    with tempfile.TemporaryDirectory(prefix="metricmill-archive-bench-") as tmp:
        # Repeat 0 is a warm-up, not counted: the first calls pay one-time costs (lazy imports,
        # pandas' and Arrow's first allocations) that a retention run pays once, not per file.
        for attempt in range(args.repeat + 1):
            root = Path(tmp) / f"archive-{attempt}"
            started = time.perf_counter()
            table = archive_table(frame, sid, ts, values)
            item = write_verified(root, "bench_metric", FIRST_DAY_US, table)
            took = time.perf_counter() - started
            assert item.rows == n
            target = Path(tmp) / f"bare-{attempt}.parquet"
            started = time.perf_counter()
            pq.write_table(table.table, target, compression="zstd")
            took_bare = time.perf_counter() - started
            if attempt == 0:
                log(f"warm-up (not counted): ours {took:.3f} s, pyarrow {took_bare:.3f} s")
                continue
            ours.append(took)
            bare.append(took_bare)
            log(f"repeat {attempt}: ours {took:.3f} s, pyarrow {took_bare:.3f} s")
    ours_rate, bare_rate = rate(n, median(ours)), rate(n, median(bare))
    print(
        format_table(
            ["method", "rows", "median s", "rows/s"],
            [
                [
                    "metricmill archive (build, hash, write, fsync, verify)",
                    n,
                    f"{median(ours):.3f}",
                    f"{ours_rate:,.0f}",
                ],
                ["pyarrow write_table (zstd)", n, f"{median(bare):.3f}", f"{bare_rate:,.0f}"],
            ],
        )  # fmt: skip
    )
    ratio = ours_rate / bare_rate
    print(ratio_line("archive_vs_pyarrow", ratio))
    return ratio


if __name__ == "__main__":
    main(sys.argv[1:])
