"""Ingest benchmark: metricmill's write path against the databases' own bulk loaders.

    uv run python benchmarks/ingest.py [--rows 1000000] [--series 10000] [--repeat 3]
                                       [--pg-url URL] [--timescaledb]

One synthetic batch (metric ``bench_metric``, labels host/region, evenly spaced UTC timestamps
from 2025-01-01, seeded random values) is written, each repeat into a fresh database, by

* PostgreSQL: ``Store.write_samples(frame)`` (validation, series resolution and the write: the
  whole public call) against ``psql -c "\\copy samples_copy FROM file WITH (FORMAT csv)"`` into a
  table with the same columns and primary key as metricmill's samples table;
* SQLite: the same call on a fresh file against the sqlite3 shell's ``.import`` of the same rows
  into a table with metricmill's samples schema (WITHOUT ROWID, WAL, synchronous=NORMAL);
* optionally TimescaleDB: metricmill on a hypertable against ``\\copy`` into a hypertable.

The CSV files are written before the timed part. Rows/s are medians over the repeats; the
ratios (metricmill rows/s divided by loader rows/s) close the output as ``RATIO`` lines.
"""

from __future__ import annotations

import argparse
import math
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import pandas as pd
import psycopg
from psycopg import sql

from benchmarks._common import (
    PSQL,
    SQLITE3,
    PgServer,
    format_table,
    log,
    median,
    print_machine,
    rate,
    ratio_line,
    sqlite_shell_version,
    throwaway_pg,
    timed,
)
from storage.store import Store

METRIC = "bench_metric"
REGIONS = ("eu-west", "eu-central", "us-east", "us-west", "ap-south")
START = pd.Timestamp("2025-01-01T00:00:00Z")
START_US = START.value // 1000

PG_COPY_TABLE = """
CREATE TABLE samples_copy (
    series_id bigint NOT NULL,
    ts timestamptz NOT NULL,
    value double precision NOT NULL,
    PRIMARY KEY (series_id, ts)
)"""
SQLITE_TABLE = """
CREATE TABLE samples (
    series_id INTEGER NOT NULL,
    ts INTEGER NOT NULL,
    value REAL NOT NULL,
    PRIMARY KEY (series_id, ts)
) WITHOUT ROWID"""


# --------------------------------------------------------------------------- data


@dataclass
class Workload:
    frame: pd.DataFrame  # metric, labels, ts, value: what a caller hands to write_samples
    series_id: np.ndarray  # 1..S per row, in frame order (the baselines' series ids)
    ts_us: np.ndarray  # epoch µs per row, in frame order
    values: np.ndarray  # float64 per row, in frame order
    n_series: int

    @property
    def rows(self) -> int:
        return len(self.frame)


def build_workload(rows: int, series: int, *, step_seconds: int, order: str, seed: int) -> Workload:
    """N rows over S series, vectorised; one label dict per series, shared by its rows.

    order "time": scrape order, every series at t0, then every series at t1, ...
    order "series": all of series 0's points, then series 1's, ... (primary-key order).
    """
    position = np.arange(rows, dtype=np.int64)
    series_idx = position % series
    step = position // series
    if order == "series":
        regroup = np.argsort(series_idx, kind="stable")
        series_idx, step = series_idx[regroup], step[regroup]
    ts_us = START_US + step * (step_seconds * 1_000_000)
    values = np.random.default_rng(seed).normal(50.0, 15.0, rows)

    label_sets = np.empty(series, dtype=object)
    for i in range(series):  # one dict per series, as a producer would reuse it
        label_sets[i] = {"host": f"host-{i}", "region": REGIONS[i % len(REGIONS)]}
    frame = pd.DataFrame(
        {
            "metric": np.full(rows, METRIC, dtype=object),
            "labels": label_sets[series_idx],
            "ts": pd.to_datetime(ts_us, unit="us", utc=True),
            "value": values,
        }
    )
    return Workload(
        frame=frame,
        series_id=series_idx + 1,
        ts_us=ts_us,
        values=values,
        n_series=int(np.unique(series_idx).size),
    )


def write_pg_csv(work: Workload, path: Path) -> None:
    """series_id, ISO timestamptz, value (shortest round-trip repr) in frame order, no header."""
    pd.DataFrame(
        {
            "series_id": work.series_id,
            "ts": pd.to_datetime(work.ts_us, unit="us", utc=True),
            "value": work.values,
        }
    ).to_csv(path, header=False, index=False, date_format="%Y-%m-%d %H:%M:%S.%f+00")


def write_sqlite_csv(work: Workload, path: Path) -> None:
    """series_id, epoch µs, value in frame order, no header."""
    pd.DataFrame({"series_id": work.series_id, "ts": work.ts_us, "value": work.values}).to_csv(
        path, header=False, index=False
    )


# --------------------------------------------------------------------------- runs


@dataclass
class Result:
    database: str
    method: str
    runs: list[float] = field(default_factory=list)  # seconds per repeat

    @property
    def label(self) -> str:
        return f"{self.database} {self.method}"

    def rows_per_s(self, rows: int) -> float:
        return rate(rows, median(self.runs))


def check_rows(actual: int, expected: int, what: str) -> None:
    if actual != expected:
        raise RuntimeError(f"{what}: {actual} rows stored, expected {expected}")


def check_stored(what: str, work: Workload, count: int, total: float, lo: int, hi: int) -> None:
    """Row count, value sum and time span of what landed match the workload."""
    check_rows(int(count), work.rows, what)
    if not math.isclose(float(total), float(work.values.sum()), rel_tol=1e-9):
        raise RuntimeError(f"{what}: value sum {total} != {work.values.sum()}")
    expected = (int(work.ts_us.min()), int(work.ts_us.max()))
    if (int(lo), int(hi)) != expected:
        raise RuntimeError(f"{what}: time span {(lo, hi)} µs != {expected}")


_PG_CHECK = (
    "SELECT count(*), sum(value), "
    "(extract(epoch FROM min(ts)) * 1000000)::bigint, "
    "(extract(epoch FROM max(ts)) * 1000000)::bigint FROM {}"
)


def check_pg(url: str, table: str, work: Workload, what: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(sql.SQL(_PG_CHECK).format(sql.Identifier(table))).fetchone()
    assert row is not None
    check_stored(what, work, *row)


def check_metricmill_pg(url: str, work: Workload) -> None:
    check_pg(url, "samples", work, "metricmill samples")
    with psycopg.connect(url, autocommit=True) as conn:
        n_series = conn.execute("SELECT count(*) FROM series").fetchone()
    assert n_series is not None
    check_rows(int(n_series[0]), work.n_series, "metricmill series")


def run_psql_copy(url: str, table: str, csv_path: Path) -> None:
    quoted = str(csv_path).replace("'", "''")
    command = f"\\copy {table} FROM '{quoted}' WITH (FORMAT csv)"
    done = subprocess.run(
        [PSQL, url, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-c", command],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"psql \\copy failed ({done.returncode}): {done.stderr.strip()}")


def bench_pg(
    server: PgServer,
    work: Workload,
    csv_path: Path,
    *,
    repeat: int,
    timescale: bool,
) -> tuple[Result, Result]:
    """(metricmill, \\copy) timings; each run in a fresh database."""
    name = "timescaledb" if timescale else "postgresql"
    mine = Result(name, "metricmill write_samples")
    copy = Result(name, "psql \\copy (csv)")
    for attempt in range(1, repeat + 1):
        with server.fresh_database("mm_ingest") as url:
            store = Store.open(url, timescaledb="require" if timescale else "off")
            try:
                if timescale and not getattr(store.backend, "timescale", False):
                    raise RuntimeError("metricmill did not enable TimescaleDB")
                cpu = time.process_time()
                seconds, report = timed(store.write_samples, work.frame)
                cpu = time.process_time() - cpu
            finally:
                store.close()
            if report.written != work.rows or report.rejected:
                raise RuntimeError(f"unexpected write report: {report}")
            check_metricmill_pg(url, work)
        mine.runs.append(seconds)
        log(
            f"  {mine.label} #{attempt}: {seconds:.3f}s ({rate(work.rows, seconds):,.0f} rows/s;"
            f" {cpu:.3f}s CPU in this process)"
        )

        with server.fresh_database("copy_ingest") as url:
            with psycopg.connect(url, autocommit=True) as conn:
                if timescale:
                    conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
                conn.execute(PG_COPY_TABLE)
                if timescale:
                    conn.execute(
                        "SELECT create_hypertable('samples_copy', by_range('ts', INTERVAL '1 day'))"
                    )
            seconds, _ = timed(run_psql_copy, url, "samples_copy", csv_path)
            check_pg(url, "samples_copy", work, "\\copy into samples_copy")
        copy.runs.append(seconds)
        log(f"  {copy.label} #{attempt}: {seconds:.3f}s ({rate(work.rows, seconds):,.0f} rows/s)")
    return mine, copy


def run_sqlite_import(db_path: Path, csv_path: Path) -> None:
    done = subprocess.run(
        [
            SQLITE3,
            str(db_path),
            # synchronous is a per-connection setting, so the importing session sets it itself
            "PRAGMA synchronous=NORMAL;",
            ".mode csv",
            f".import '{csv_path}' samples",
        ],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0 or done.stderr.strip():
        raise RuntimeError(f"sqlite3 .import failed ({done.returncode}): {done.stderr.strip()}")


def check_sqlite(db_path: Path, work: Workload, what: str) -> None:
    conn = sqlite3.connect(db_path)
    try:
        n, total, lo, hi, typed = conn.execute(
            "SELECT count(*), sum(value), min(ts), max(ts), "
            "sum(typeof(series_id) = 'integer' AND typeof(ts) = 'integer' "
            "AND typeof(value) = 'real') FROM samples"
        ).fetchone()
    finally:
        conn.close()
    check_stored(what, work, n, total, lo, hi)
    if int(typed) != work.rows:
        raise RuntimeError(f"{what}: {work.rows - int(typed)} rows stored with the wrong types")


def bench_sqlite(
    work: Workload, csv_path: Path, tmp: Path, *, repeat: int
) -> tuple[Result, Result]:
    mine = Result("sqlite", "metricmill write_samples")
    shell = Result("sqlite", "sqlite3 .import (csv)")
    for attempt in range(1, repeat + 1):
        run_dir = Path(tempfile.mkdtemp(prefix=f"mm-{attempt}-", dir=tmp))
        db_path = run_dir / "bench.db"
        store = Store.open(f"sqlite:///{db_path}")
        try:
            cpu = time.process_time()
            seconds, report = timed(store.write_samples, work.frame)
            cpu = time.process_time() - cpu
        finally:
            store.close()
        if report.written != work.rows or report.rejected:
            raise RuntimeError(f"unexpected write report: {report}")
        check_sqlite(db_path, work, "metricmill samples")
        _remove_tree(run_dir)
        mine.runs.append(seconds)
        log(
            f"  {mine.label} #{attempt}: {seconds:.3f}s ({rate(work.rows, seconds):,.0f} rows/s;"
            f" {cpu:.3f}s CPU in this process)"
        )

        run_dir = Path(tempfile.mkdtemp(prefix=f"import-{attempt}-", dir=tmp))
        db_path = run_dir / "bench.db"
        conn = sqlite3.connect(db_path)
        try:
            conn.execute("PRAGMA journal_mode=WAL")  # persistent: stored in the file
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute(SQLITE_TABLE)
            conn.commit()
        finally:
            conn.close()
        seconds, _ = timed(run_sqlite_import, db_path, csv_path)
        check_sqlite(db_path, work, "sqlite3 .import")
        _remove_tree(run_dir)
        shell.runs.append(seconds)
        log(f"  {shell.label} #{attempt}: {seconds:.3f}s ({rate(work.rows, seconds):,.0f} rows/s)")
    return mine, shell


def _remove_tree(path: Path) -> None:
    for child in path.iterdir():
        child.unlink()
    path.rmdir()


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows in the batch")
    parser.add_argument("--series", type=int, default=10_000, help="distinct series")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement (median)")
    parser.add_argument("--pg-url", help="use this PostgreSQL server instead of a throwaway one")
    parser.add_argument(
        "--timescaledb",
        action="store_true",
        help="also measure TimescaleDB hypertables (a cluster that preloads timescaledb)",
    )
    parser.add_argument("--step-seconds", type=int, choices=(1, 10), default=10)
    parser.add_argument(
        "--order",
        choices=("time", "series"),
        default="time",
        help="row order of the batch: scrape order (default) or primary-key order",
    )
    parser.add_argument("--seed", type=int, default=20250101)
    args = parser.parse_args(argv)
    if args.rows < 1 or args.series < 1 or args.repeat < 1:
        parser.error("--rows, --series and --repeat must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results: list[Result] = []
    ratios: list[tuple[str, float]] = []

    with tempfile.TemporaryDirectory(prefix="metricmill-bench-ingest-") as tmp_name:
        tmp = Path(tmp_name)
        log(f"building {args.rows:,} rows over {args.series:,} series ({args.order} order)")
        work = build_workload(
            args.rows, args.series, step_seconds=args.step_seconds, order=args.order, seed=args.seed
        )
        pg_csv, sqlite_csv = tmp / "samples_pg.csv", tmp / "samples_sqlite.csv"
        write_pg_csv(work, pg_csv)
        write_sqlite_csv(work, sqlite_csv)

        with throwaway_pg(args.pg_url) as server:
            print_machine(
                {
                    "postgresql server": server.version(),
                    "sqlite3 shell": sqlite_shell_version(),
                    "psql": PSQL,
                }
            )
            print(
                f"workload: {work.rows:,} rows, {work.n_series:,} series, "
                f"{args.step_seconds}s spacing from {START.isoformat()}, {args.order} order, "
                f"{args.repeat} repeat(s), fresh database per run",
                flush=True,
            )
            log("postgresql:")
            mine, copy = bench_pg(server, work, pg_csv, repeat=args.repeat, timescale=False)
        results += [mine, copy]
        ratios.append(("ingest_pg_vs_copy", ratio(mine, copy, work.rows)))

        log("sqlite:")
        mine, shell = bench_sqlite(work, sqlite_csv, tmp, repeat=args.repeat)
        results += [mine, shell]
        ratios.append(("ingest_sqlite_vs_import", ratio(mine, shell, work.rows)))

        if args.timescaledb:
            with throwaway_pg(args.pg_url, preload_timescaledb=True) as server:
                log("timescaledb:")
                mine, copy = bench_pg(server, work, pg_csv, repeat=args.repeat, timescale=True)
            results += [mine, copy]
            ratios.append(("ingest_timescaledb_vs_copy", ratio(mine, copy, work.rows)))

    print()
    print(
        format_table(
            ["database", "method", "rows/s (median)", "median s", "runs (s)"],
            [
                (
                    r.database,
                    r.method,
                    f"{r.rows_per_s(work.rows):,.0f}",
                    f"{median(r.runs):.3f}",
                    " ".join(f"{s:.3f}" for s in r.runs),
                )
                for r in results
            ],
        )
    )
    print()
    for name, value in ratios:
        print(ratio_line(name, value))
    return 0


def ratio(mine: Result, baseline: Result, rows: int) -> float:
    """metricmill rows/s over the loader's rows/s (> 1 means metricmill is faster)."""
    return mine.rows_per_s(rows) / baseline.rows_per_s(rows)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # cleanup already ran in the finally blocks on the way out
        log("interrupted")
        sys.exit(130)
