"""Push receiver benchmark: remote-write requests into `metricmill receive`, against the ingest
flow taking the same samples from the landing directory.

    uv run python benchmarks/receive.py [--senders 4] [--requests 50] [--series 200]
                                        [--samples 5] [--database-url URL]

Before timing, each of ``--senders`` senders gets ``--requests`` snappy-compressed remote write
bodies of ``--series`` × ``--samples`` samples (1,000 by default: 200 series of host/region/cpu
labels, 5 samples each, recent timestamps, no two requests alike), and `metricmill receive` is
started as its own process on a free loopback port.

Timed:

* receive: the senders (threads, one HTTP connection each) post their bodies one after the
  other; from the first request to the last acknowledgement (204: the samples are fsynced in a
  landing file). Accepted samples/s = samples acknowledged / seconds.
* ingest flow: one `flows.ingest.ingest(landing=True, scrape=False)` run over the files the
  receiver landed (claim, NDJSON parse, GX, write; SQLite in the benchmark's home unless
  ``--database-url``), under `prefect_test_harness` (its start-up, the GX set-up and an empty
  warm-up run are not timed, as in benchmarks/ingest_flow.py). Flow samples/s = samples
  written / seconds.

The output ends with ``RATIO receive_vs_ingest_flow`` (receiver samples/s over flow samples/s;
goal >= 2: receiving is never the bottleneck).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cramjam
import httpx

from benchmarks._common import format_table, log, print_machine, rate, ratio_line, timed
from benchmarks.ingest_flow import warm_up_gx
from storage.proto.remote_write_pb2 import WriteRequest

HEADERS = {
    "Content-Encoding": "snappy",
    "Content-Type": "application/x-protobuf",
    "X-Prometheus-Remote-Write-Version": "0.1.0",
}


def build_bodies(senders: int, requests: int, series: int, samples: int) -> list[list[bytes]]:
    """Per sender, its request bodies; sample times are recent and never repeat."""
    start_ms = (int(time.time()) - 3600) * 1000
    bodies: list[list[bytes]] = []
    for sender in range(senders):
        mine: list[bytes] = []
        for n in range(requests):
            request = WriteRequest()
            base_ms = start_ms + (n * senders + sender) * samples * 10
            for s in range(series):
                ts = request.timeseries.add()
                labels = {
                    "__name__": "node_cpu_seconds_total",
                    "cpu": str(s % 8),
                    "host": f"host-{sender}-{s // 8:03d}",
                    "region": ("eu", "us", "ap")[s % 3],
                }
                for name in sorted(labels):
                    ts.labels[name] = labels[name]
                for k in range(samples):
                    ts.samples.add(timestamp=base_ms + k * 10, value=float(n * samples + k))
            mine.append(bytes(cramjam.snappy.compress_raw(request.SerializeToString())))
        bodies.append(mine)
    return bodies


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_receiver(home: Path, port: int) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("METRICMILL_")}
    env["METRICMILL_HOME"] = str(home)
    metricmill = Path(sys.executable).parent / "metricmill"
    process = subprocess.Popen(
        [str(metricmill), "receive", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/-/ready", timeout=2).status_code == 200:
                return process
        except httpx.TransportError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("metricmill receive did not answer within 120 s")


def push(url: str, bodies: list[list[bytes]]) -> float:
    """All senders at once; seconds from the first request to the last acknowledgement."""
    errors: list[str] = []
    barrier = threading.Barrier(len(bodies) + 1)

    def sender(mine: list[bytes]) -> None:
        with httpx.Client(timeout=60) as client:
            barrier.wait()
            for body in mine:
                reply = client.post(url, content=body, headers=HEADERS)
                if reply.status_code != 204:
                    errors.append(f"{reply.status_code}: {reply.text.strip()}")
                    return

    threads = [threading.Thread(target=sender, args=(mine,)) for mine in bodies]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"requests refused: {errors[:3]}")
    return seconds


def run_flow(home: Path, database_url: str | None, expected: int, tmp: Path) -> float:
    from prefect.testing.utilities import prefect_test_harness

    from flows.ingest import ingest

    os.environ["METRICMILL_SETTLE_SECONDS"] = "0"
    log("starting the Prefect test harness (not timed)")
    with prefect_test_harness(server_startup_timeout=180):
        log(f"  GX warm-up {warm_up_gx():.1f}s (not timed)")
        warm = tmp / "home-warmup"
        warm_url = None if database_url is None else database_url
        asyncio.run(ingest(landing=True, scrape=False, home=str(warm), database_url=warm_url))
        log("ingest flow over the landed files (timed)")
        seconds, rows = timed(
            lambda: asyncio.run(
                ingest(landing=True, scrape=False, home=str(home), database_url=database_url)
            )
        )
    if not isinstance(rows, list):
        raise RuntimeError(f"the flow run did not ingest: {rows}")
    written = sum(r["written"] for r in rows)
    bad = [r for r in rows if r["quarantined"] or r["replay"] or r.get("error")]
    if written != expected or bad:
        raise RuntimeError(f"flow wrote {written} of {expected} samples; bad rows: {bad[:3]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--senders", type=int, default=4)
    parser.add_argument("--requests", type=int, default=50, help="requests per sender")
    parser.add_argument("--series", type=int, default=200, help="series per request")
    parser.add_argument("--samples", type=int, default=5, help="samples per series")
    parser.add_argument("--database-url", default=None)
    args = parser.parse_args()
    per_request = args.series * args.samples
    total = args.senders * args.requests * per_request
    print_machine()
    log(f"building {args.senders} x {args.requests} bodies of {per_request:,} samples")
    bodies = build_bodies(args.senders, args.requests, args.series, args.samples)
    with tempfile.TemporaryDirectory(prefix="mm-receive-bench-") as tmp_name:
        tmp = Path(tmp_name)
        home = tmp / "home"
        port = free_port()
        receiver = start_receiver(home, port)
        try:
            log(f"receive: {total:,} samples from {args.senders} senders (timed)")
            receive_seconds = push(f"http://127.0.0.1:{port}/api/v1/write", bodies)
        finally:
            receiver.send_signal(signal.SIGTERM)
            receiver.wait(timeout=30)
        files = len(list((home / "landing").glob("push-*.ndjson")))
        if files != args.senders * args.requests:
            raise RuntimeError(f"{files} landed files for {args.senders * args.requests} requests")
        flow_seconds = run_flow(home, args.database_url, total, tmp)

    receive_rate = rate(total, receive_seconds)
    flow_rate = rate(total, flow_seconds)
    print(
        format_table(
            ["step", "samples", "seconds", "samples/s"],
            [
                ["receive (4 senders)" if args.senders == 4 else "receive", total,
                 f"{receive_seconds:.2f}", f"{receive_rate:,.0f}"],
                ["ingest flow", total, f"{flow_seconds:.2f}", f"{flow_rate:,.0f}"],
            ],
        )
    )  # fmt: skip
    print(f"accepted samples/s: {receive_rate:,.0f}")
    print(ratio_line("receive_vs_ingest_flow", receive_rate / flow_rate))


if __name__ == "__main__":
    main()
