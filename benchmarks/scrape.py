"""Scrape benchmark: the ingest flow's scrape task on a ~500-sample node-exporter-like target.

    uv run python benchmarks/scrape.py [--repeat 7] [--samples 500] [--fresh 3]

A loopback HTTP server answers a Prometheus exposition of `--samples` samples (25 families of
gauges and counters with cpu/mode/device labels, like node_exporter's). The task function
(`tasks.ingest.scrape_target`, called as the flow calls it, with its write into a fresh SQLite
store: quality checks, series lookup, insert, rollup ranges) runs `--repeat` times in one
process, then once in each of `--fresh` new processes.

* `RATIO scrape_task_500_seconds <x>`: the median of the later scrapes of one process, each
  scrape and write of ~500 samples (goal < 1 s).
* `RATIO scrape_task_fresh_process_seconds <x>`: the median over `--fresh` new processes of the
  first scrape task (goal < 1 s). A served ingest run is a process of its own, so this is what
  every scheduled scrape pays; the child imports the ingest flow's module first, as the served
  run does before its tasks start, and reports whether Great Expectations got imported.
"""

from __future__ import annotations

import argparse
import http.server
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import log, ratio_line


def exposition(samples: int) -> bytes:
    families = 25
    per_family = max(1, samples // families)
    lines = []
    for f in range(families):
        kind = "counter" if f % 2 else "gauge"
        name = f"node_bench_{f}_total" if kind == "counter" else f"node_bench_{f}"
        lines.append(f"# HELP {name} Benchmark family {f}.\n# TYPE {name} {kind}\n")
        for i in range(per_family):
            labels = f'cpu="{i % 8}",mode="m{i // 8}",device="sd{f % 3}"'
            lines.append(f"{name}{{{labels}}} {i * 1.25 + f}\n")
    return "".join(lines).encode()


def child(url: str) -> None:
    """One scrape task in this (new) process; prints a JSON line: seconds, rows, gx_imported."""
    from prefect.logging import disable_run_logger

    from flows.ingest import prepare_store  # what a served run imports before its tasks
    from metricmill.settings import load_settings
    from tasks.ingest import scrape_target

    with tempfile.TemporaryDirectory(prefix="mm-scrape-") as home, disable_run_logger():
        settings = load_settings(home=home, database_url=f"sqlite:///{home}/metrics.db")
        settings.ensure_dirs()
        prepare_store.fn(settings)
        started = time.perf_counter()
        outcome = scrape_target.fn(settings, url)
        seconds = time.perf_counter() - started
    assert outcome.written == outcome.rows_in, outcome
    gx = "great_expectations" in sys.modules
    print(json.dumps({"seconds": seconds, "rows": outcome.rows_in, "gx_imported": gx}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--fresh", type=int, default=3, help="new processes, one scrape each")
    parser.add_argument("--child", metavar="URL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    body = exposition(args.samples)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}/metrics"

    from prefect.logging import disable_run_logger

    from flows.ingest import prepare_store
    from metricmill.settings import load_settings
    from tasks.ingest import scrape_target

    times: list[float] = []
    rows = 0
    with tempfile.TemporaryDirectory(prefix="mm-scrape-") as home, disable_run_logger():
        settings = load_settings(home=home, database_url=f"sqlite:///{home}/metrics.db")
        settings.ensure_dirs()
        prepare_store.fn(settings)
        for attempt in range(args.repeat + 1):
            started = time.perf_counter()
            outcome = scrape_target.fn(settings, url)
            times.append(time.perf_counter() - started)
            rows = outcome.rows_in
            assert outcome.written == rows, outcome
            log(f"scrape {attempt + 1}: {rows} samples in {times[-1]:.3f} s")
    fresh: list[float] = []
    for number in range(args.fresh):
        done = subprocess.run(
            [sys.executable, __file__, "--child", url], capture_output=True, text=True, check=True
        )
        result = json.loads(done.stdout.strip().splitlines()[-1])
        fresh.append(result["seconds"])
        gx = "imported" if result["gx_imported"] else "not imported"
        log(f"fresh process {number + 1}: {result['rows']} in {fresh[-1]:.3f} s, GX {gx}")
    server.shutdown()
    first, later = times[0], times[1:]
    print(f"samples per scrape           {rows}")
    print(f"first scrape of this process {first:.3f} s")
    print(f"later scrapes: median {statistics.median(later):.3f} s, max {max(later):.3f} s")
    print(ratio_line("scrape_task_500_seconds", statistics.median(later)))
    if fresh:
        print(f"fresh processes: {', '.join(f'{t:.3f}' for t in fresh)} s")
        print(ratio_line("scrape_task_fresh_process_seconds", statistics.median(fresh)))


if __name__ == "__main__":
    main()
