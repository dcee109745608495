"""Parallel ingest benchmark: the same landed files through 1 and through 2 concurrent `ingest`
flow runs on PostgreSQL (`ingest_max_parallel_runs`), throughput compared.

    uv run python benchmarks/ingest_parallel.py [--rows 300000] [--files 96] [--series 3000]
                                                [--repeats 2] [--pg-url URL]

The workload is benchmarks/ingest_flow.py's (NDJSON files, recent timestamps, every row valid).
Each measurement lands the files in a fresh home, creates the schema in a fresh database (not
timed), then forks N processes (as N workers of one pool take N deployment runs), each calling
`flows.ingest.ingest(landing=True, scrape=False)` with METRICMILL_INGEST_MAX_PARALLEL_RUNS=N,
and times from releasing them to the last one's exit. Every row must be stored exactly once and
every file end in done/. The runs report to a Prefect server whose database is on the same
PostgreSQL server, as a deployment with several workers would (on the test harness's SQLite, one
of two runs starting at once waits about 2 s for the other: benchmarks/_common.py); its start-up
and the GX warm-up are one-time process costs, not timed. 1 and 2 runs alternate, `--repeats`
times each; the medians count.

The output ends with ``RATIO ingest_parallel_2_vs_1`` (rows/s with 2 runs over rows/s with 1).
On a machine with two cores that other work shares, the figure is bounded by the cores: one
run already keeps one core busy (decode, GX) while PostgreSQL writes on the other.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import (
    PgServer,
    format_table,
    log,
    median,
    prefect_server_on,
    print_machine,
    rate,
    ratio_line,
    throwaway_pg,
)
from benchmarks.ingest import check_metricmill_pg
from benchmarks.ingest_flow import (
    FLOW_ENV,
    create_schema,
    recent_workload,
    stage_landing,
    warm_up_gx,
    write_ndjson_files,
)

RUN_TIMEOUT = 1800.0


def run_parallel(url: str, home: Path, runs: int) -> tuple[float, list[int]]:
    """`runs` forked ingest runs released at once: (seconds until the last exits, files each
    run reported)."""
    read_end, write_end = os.pipe()
    logs = [home / f"run-{n}.json" for n in range(runs)]
    pids = []
    for log_path in logs:
        pid = os.fork()
        if pid == 0:  # the child: never returns
            code = 1
            try:
                with open(log_path, "w", encoding="utf-8") as out:
                    try:
                        from flows.ingest import ingest

                        os.environ["METRICMILL_INGEST_MAX_PARALLEL_RUNS"] = str(runs)
                        os.read(read_end, 1)
                        rows = asyncio.run(
                            ingest(landing=True, scrape=False, database_url=url, home=str(home))
                        )
                        out.write(json.dumps(rows, default=str))
                        code = 0
                    except BaseException:
                        out.write(traceback.format_exc())
            finally:
                os._exit(code)
        pids.append(pid)
    started = time.perf_counter()
    os.write(write_end, b"g" * runs)
    codes = []
    for pid in pids:
        _, status = os.waitpid(pid, 0)
        codes.append(os.waitstatus_to_exitcode(status))
    seconds = time.perf_counter() - started
    os.close(read_end)
    os.close(write_end)
    texts = [p.read_text(encoding="utf-8") for p in logs]
    if any(codes):
        raise RuntimeError(f"ingest runs failed ({codes}):\n" + "\n---\n".join(texts))
    reported = [json.loads(text) for text in texts]
    if any(not isinstance(rows, list) for rows in reported):
        raise RuntimeError(f"a run skipped instead of taking a slot: {reported}")
    return seconds, [len(rows) for rows in reported]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=300_000)
    parser.add_argument("--files", type=int, default=96)
    parser.add_argument("--series", type=int, default=3_000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--pg-url", default=None, help="an existing server (admin URL)")
    return parser.parse_args(argv)


def measure(
    server: PgServer, sources: list[Path], tmp: Path, runs: int, attempt: int, rows: int
) -> tuple[float, list[int]]:
    with server.fresh_database(f"mm_par{runs}") as url:
        home = tmp / f"home-{runs}-{attempt}"
        stage_landing(sources, home)
        create_schema(url)
        log(f"{runs} run(s), attempt {attempt + 1}: {len(sources)} files")
        seconds, shares = run_parallel(url, home, runs)
        log(f"  {seconds:.2f}s ({rate(rows, seconds):,.0f} rows/s), files per run {shares}")
        if sum(shares) != len(sources):
            raise RuntimeError(f"runs reported {sum(shares)} files, expected {len(sources)}")
        left = [p.name for p in (home / "landing").iterdir() if p.is_file()]
        if left:
            raise RuntimeError(f"files left in landing/: {left[:5]}")
        return seconds, shares


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.update(FLOW_ENV)
    from benchmarks.ingest_flow import versions

    with tempfile.TemporaryDirectory(prefix="metricmill-bench-par-") as tmp_name:
        tmp = Path(tmp_name)
        log(f"building {args.rows:,} rows over {args.series:,} series in {args.files} files")
        work = recent_workload(args.rows, args.series, seed=args.seed)
        sources = write_ndjson_files(work, tmp / "source", args.files, "mixed")
        with throwaway_pg(args.pg_url) as server:
            print_machine({"postgresql server": server.version(), **versions()})
            print(
                f"workload: {work.rows:,} samples, {work.n_series:,} series, {args.files} NDJSON "
                "files; fresh database and landing per measurement",
                flush=True,
            )
            log("starting a Prefect server on PostgreSQL and warming up GX (not timed)")
            with prefect_server_on(server):
                warm_up_gx()
                seconds: dict[int, list[float]] = {1: [], 2: []}
                shares: dict[int, list[int]] = {}
                for attempt in range(args.repeats):
                    for runs in (1, 2):
                        took, shares[runs] = measure(server, sources, tmp, runs, attempt, work.rows)
                        seconds[runs].append(took)
                # The stored rows of a last, checked run of 2 (exactly once, every value).
                with server.fresh_database("mm_par_check") as url:
                    home = tmp / "home-check"
                    stage_landing(sources, home)
                    create_schema(url)
                    run_parallel(url, home, 2)
                    check_metricmill_pg(url, work)

    one, two = median(seconds[1]), median(seconds[2])
    print()
    print(
        format_table(
            ["concurrent runs", "rows/s", "median s", "all s", "files per run (last)"],
            [
                (
                    str(runs),
                    f"{rate(work.rows, median(seconds[runs])):,.0f}",
                    f"{median(seconds[runs]):.2f}",
                    " ".join(f"{s:.2f}" for s in seconds[runs]),
                    " ".join(str(n) for n in shares[runs]),
                )
                for runs in (1, 2)
            ],
        )
    )
    print()
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"load average (1/5/15 min) at the end: {load}")
    print(ratio_line("ingest_parallel_2_vs_1", rate(work.rows, two) / rate(work.rows, one)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
