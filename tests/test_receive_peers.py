"""Pushing agents through `metricmill receive` and the ingest flow, with real peers.

A real Prometheus (Debian's `prometheus`) scrapes a real node exporter and remote-writes to the
receiver; the stored series and values must be what Prometheus' own query API returns. The
OpenTelemetry SDK's OTLP/HTTP exporter pushes a counter, gauges and a histogram. Line protocol is
posted gzipped as Telegraf's influxdb_v2 output does, twice. The receiver process is killed with
SIGKILL while senders push: every acknowledged sample must be stored after the next ingest run.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import re
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from flows.ingest import ingest
from metricmill.errors import MetricmillError
from metricmill.settings import Settings
from storage.store import Store
from tests.receive_peers import (
    NODE_EXPORTER,
    PROMETHEUS,
    REMOTE_WRITE_HEADERS,
    ReceiverProcess,
    free_port,
    node_exporter_command,
    prometheus_config,
    receiver_in_thread,
    receiver_settings,
    remote_write_body,
    require_binary,
    start_process,
    stop_process,
)

pytestmark = pytest.mark.usefixtures("prefect_server")

EVER_START = datetime(2000, 1, 1, tzinfo=UTC)
EVER_END = datetime(2200, 1, 1, tzinfo=UTC)
Key = tuple[str, frozenset[tuple[str, str]]]


def run_ingest(monkeypatch: pytest.MonkeyPatch, home: Path) -> list[dict[str, Any]]:
    """One ingest run over the landing directory (files claimed at once); it must complete."""
    for name in [*Settings.model_fields, "config"]:
        monkeypatch.delenv(f"METRICMILL_{name.upper()}", raising=False)
    monkeypatch.setenv("METRICMILL_HOME", str(home))
    monkeypatch.setenv("METRICMILL_SETTLE_SECONDS", "0")
    state = asyncio.run(ingest(scrape=False, return_state=True))
    assert state.is_completed(), f"ingest run ended {state.type}: {state.message}"
    rows = state.result()
    assert isinstance(rows, list)
    return rows


def stored(home: Path) -> dict[Key, list[tuple[int, float]]]:
    """Every stored sample by series, as (epoch ms, value)."""
    found: dict[Key, list[tuple[int, float]]] = {}
    with Store.open(f"sqlite:///{home / 'metrics.db'}") as store:
        for metric in sorted(set(store.series()["metric"])):
            frame = store.query(metric, start=EVER_START, end=EVER_END)
            for labels, ts, value in zip(frame["labels"], frame["ts"], frame["value"], strict=True):
                points = found.setdefault((metric, frozenset(labels.items())), [])
                points.append((ts.value // 1_000_000, float(value)))
    return found


# -- Prometheus remote write ---------------------------------------------------------------------
@pytest.fixture
def node_exporter(tmp_path: Path) -> Iterator[str]:
    binary = require_binary(
        NODE_EXPORTER, Path("/usr/bin/prometheus-node-exporter"), "METRICMILL_REQUIRE_NODE_EXPORTER"
    )
    instance = f"127.0.0.1:{free_port()}"
    process = start_process(
        node_exporter_command(binary, instance),
        tmp_path / "node_exporter.log",
        f"http://{instance}/metrics",
    )
    try:
        yield instance
    finally:
        stop_process(process)


def prometheus_query(base: str, query: str, at: float) -> list[dict[str, Any]]:
    reply = httpx.get(f"{base}/api/v1/query", params={"query": query, "time": at}, timeout=10)
    reply.raise_for_status()
    body = reply.json()
    assert body["status"] == "success", body
    return list(body["data"]["result"])


def highest_sent_seconds(base: str) -> float:
    """Prometheus' own gauge of the newest sample time its remote write has delivered."""
    text = httpx.get(f"{base}/metrics", timeout=10).text
    found = re.findall(
        r"^prometheus_remote_storage_queue_highest_sent_timestamp_seconds\{[^}]*\} (\S+)$",
        text,
        re.MULTILINE,
    )
    return max((float(v) for v in found), default=0.0)


def test_prometheus_remote_write_stores_what_prometheus_scraped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, node_exporter: str
) -> None:
    binary = require_binary(
        PROMETHEUS, Path("/usr/bin/prometheus"), "METRICMILL_REQUIRE_PROMETHEUS"
    )
    home = tmp_path / "home"
    with receiver_in_thread(receiver_settings(home)) as live:
        config = tmp_path / "prometheus.yml"
        config.write_text(prometheus_config(node_exporter, f"{live.url}/api/v1/write"))
        listen = f"127.0.0.1:{free_port()}"
        base = f"http://{listen}"
        prometheus = start_process(
            [
                str(binary),
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address={listen}",
            ],
            tmp_path / "prometheus.log",
            f"{base}/-/ready",
        )
        try:
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:  # a few scrapes
                scrapes = prometheus_query(base, 'count_over_time(up{job="node"}[5m])', time.time())
                if scrapes and float(scrapes[0]["value"][1]) >= 4:
                    break
                time.sleep(0.5)
            else:
                pytest.fail("Prometheus did not scrape the node exporter 4 times in 90 s")
            at = time.time()
            scraped = prometheus_query(base, '{job="node"}[5m]', at)
            newest = max(float(v[0]) for series in scraped for v in series["values"])
            deadline = time.monotonic() + 60
            while highest_sent_seconds(base) < newest:  # remote write has caught up
                assert time.monotonic() < deadline, "remote write did not catch up in 60 s"
                time.sleep(0.25)
        finally:
            stop_process(prometheus)
        assert live.receiver.stats["requests_accepted"] > 0

    rows = run_ingest(monkeypatch, home)
    assert all(not row.get("error") for row in rows), rows
    assert not any(row.get("quarantined") for row in rows), rows
    samples = stored(home)

    at_ms = int(at * 1000)
    expected: dict[Key, list[tuple[int, float]]] = {}
    for series in scraped:
        labels = dict(series["metric"])
        metric = labels.pop("__name__")
        expected[(metric, frozenset(labels.items()))] = [
            (round(float(ts) * 1000), float(value)) for ts, value in series["values"]
        ]
    assert len(expected) > 50  # cpu, memory, load, stat families and up/scrape_* series
    got = {key: [p for p in samples.get(key, []) if p[0] <= at_ms] for key in expected}
    missing = [key for key, points in got.items() if not points]
    assert not missing, missing[:5]
    assert got == expected
    # nothing stored beyond what Prometheus scraped from that target
    assert {key for key in samples if ("job", "node") in key[1]} == set(expected)


# -- OpenTelemetry SDK ---------------------------------------------------------------------------
def test_otel_sdk_pushes_counters_gauges_and_histograms_as_documented(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
    from opentelemetry.sdk.resources import Resource

    home = tmp_path / "home"
    token = "otel-push-token"
    with receiver_in_thread(receiver_settings(home), token=token) as live:
        exporter = OTLPMetricExporter(
            endpoint=f"{live.url}/v1/metrics", headers={"Authorization": f"Bearer {token}"}
        )
        reader = PeriodicExportingMetricReader(exporter, export_interval_millis=3_600_000)
        resource = Resource.create(
            {
                "service.name": "checkout",
                "service.namespace": "shop",
                "service.instance.id": "pod-7",
                "host.name": "web-1",
            }
        )
        provider = MeterProvider(resource=resource, metric_readers=[reader])
        meter = provider.get_meter("metricmill-test")
        orders = meter.create_counter("orders.placed")
        orders.add(3, {"region": "eu"})
        orders.add(2, {"region": "eu"})
        depth = meter.create_gauge("queue.depth")
        depth.set(7, {"queue": "mail"})
        sessions = meter.create_up_down_counter("sessions.active")
        sessions.add(5)
        sessions.add(-2)
        latency = meter.create_histogram(
            "request.duration", unit="s", explicit_bucket_boundaries_advisory=[0.1, 0.5, 1.0]
        )
        for seconds in (0.05, 0.3, 2.0):
            latency.record(seconds, {"route": "/pay"})
        assert provider.force_flush(timeout_millis=30_000)
        provider.shutdown()
        assert live.receiver.stats["requests_accepted"] >= 1
        assert live.receiver.stats["refused_401"] == 0

    run_ingest(monkeypatch, home)
    samples = stored(home)
    base = {"job": "shop/checkout", "instance": "pod-7", "host_name": "web-1"}

    def value(metric: str, **labels: str) -> float:
        points = samples[(metric, frozenset({**base, **labels}.items()))]
        return points[-1][1]

    assert value("orders_placed_total", region="eu") == 5
    assert value("queue_depth", queue="mail") == 7
    assert value("sessions_active") == 3
    bounds = ("0.1", "0.5", "1", "+Inf")
    buckets = {le: value("request_duration_bucket", route="/pay", le=le) for le in bounds}
    assert buckets == {"0.1": 1, "0.5": 2, "1": 2, "+Inf": 3}
    assert value("request_duration_count", route="/pay") == 3
    assert value("request_duration_sum", route="/pay") == pytest.approx(2.35)
    assert {key[0] for key in samples} == {
        "orders_placed_total",
        "queue_depth",
        "sessions_active",
        "request_duration_bucket",
        "request_duration_count",
        "request_duration_sum",
    }
    assert all(not any(k.startswith("telemetry_") for k, _ in key[1]) for key in samples)


# -- Telegraf-style line protocol ----------------------------------------------------------------
def test_gzipped_line_protocol_replayed_is_written_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    now_s = int(time.time()) - 60
    lines = [
        f"cpu,cpu=cpu-total,host=edge-1 usage_idle={90 + i * 0.5},usage_user={2 + i}i "
        f"{(now_s + i * 10) * 1_000_000_000}"
        for i in range(5)
    ] + [
        f'system,host=edge-1 load1=0.42,uptime_format="3 days" {now_s * 1_000_000_000}',
        "system,host=edge-1 load5=oops",  # quarantined with its text; the others land
    ]
    body = gzip.compress(("\n".join(lines) + "\n").encode())
    headers = {  # what Telegraf's outputs.influxdb_v2 sends
        "Content-Encoding": "gzip",
        "Content-Type": "text/plain; charset=utf-8",
        "User-Agent": "Telegraf/1.30.0",
        "Authorization": "Token telegraf-token",
    }
    params = {"org": "ops", "bucket": "edge", "precision": "ns"}
    settings = receiver_settings(home, receive_token="telegraf-token")
    with receiver_in_thread(settings, token="telegraf-token") as live:
        first = httpx.post(f"{live.url}/api/v2/write", params=params, content=body, headers=headers)
        assert first.status_code == 204, first.text
        rows = run_ingest(monkeypatch, home)
        again = httpx.post(f"{live.url}/api/v2/write", params=params, content=body, headers=headers)
        assert again.status_code == 204, again.text
        replay_rows = run_ingest(monkeypatch, home)

    [landed] = [r for r in rows if "push-influx" in str(r["source"])]
    assert (landed["written"], landed["replay"]) == (11, False), landed
    assert landed["quarantined"] == "malformed_line: 1", landed
    [replayed] = [r for r in replay_rows if "push-influx" in str(r["source"])]
    assert (replayed["written"], replayed["replay"]) == (0, True), replayed
    samples = stored(home)
    tags = frozenset({"cpu": "cpu-total", "host": "edge-1", "bucket": "edge"}.items())
    assert samples[("cpu_usage_idle", tags)] == [
        ((now_s + i * 10) * 1000, 90 + i * 0.5) for i in range(5)
    ]
    assert samples[("cpu_usage_user", tags)] == [
        ((now_s + i * 10) * 1000, 2.0 + i) for i in range(5)
    ]
    load = frozenset({"host": "edge-1", "bucket": "edge"}.items())
    assert samples[("system_load1", load)] == [(now_s * 1000, 0.42)]
    assert len(samples) == 3  # the string field is skipped
    with Store.open(f"sqlite:///{home / 'metrics.db'}") as store:
        [bad] = store.quarantine().to_dict(orient="records")
    assert bad["reason"] == "malformed_line" and "load5=oops" in str(bad), bad


# -- kill -9 while senders push ------------------------------------------------------------------
class Sender(threading.Thread):
    """Pushes `requests` remote-write bodies in order, retrying each until it is acknowledged."""

    def __init__(self, url: str, sender: int, requests: int, start_ms: int) -> None:
        super().__init__(daemon=True)
        self.url, self.sender, self.requests, self.start_ms = url, sender, requests, start_ms
        self.acked: list[tuple[Key, int, float]] = []
        self.failures = 0
        self.error: str | None = None

    def run(self) -> None:
        deadline = time.monotonic() + 240
        with httpx.Client(timeout=10) as client:
            for n in range(self.requests):
                labels = {"__name__": "pushed", "sender": str(self.sender), "series": str(n % 5)}
                points = [(self.start_ms + n * 100 + k, float(n * 100 + k)) for k in range(50)]
                body = remote_write_body([(labels, points)])
                while True:
                    if time.monotonic() > deadline:
                        self.error = f"request {n} not acknowledged within 240 s"
                        return
                    try:
                        reply = client.post(self.url, content=body, headers=REMOTE_WRITE_HEADERS)
                    except httpx.TransportError:
                        reply = None
                    if reply is not None and reply.status_code == 204:
                        break
                    self.failures += 1  # unacknowledged: retried, as Prometheus does
                    time.sleep(0.2)
                key = (
                    "pushed",
                    frozenset({"sender": str(self.sender), "series": str(n % 5)}.items()),
                )
                self.acked.extend((key, ts, value) for ts, value in points)


def test_kill_9_loses_no_acknowledged_sample(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    receiver = ReceiverProcess(home, free_port(), tmp_path / "receiver.log")
    receiver.start()
    start_ms = (int(time.time()) - 300) * 1000
    senders = [Sender(f"{receiver.url}/api/v1/write", s, 60, start_ms) for s in range(3)]
    try:
        for sender in senders:
            sender.start()
        while sum(len(s.acked) for s in senders) < 3 * 50 * 10:  # ten requests each, roughly
            time.sleep(0.05)
        receiver.kill()
        killed_with = sum(len(s.acked) for s in senders)
        time.sleep(1)  # senders see refused connections meanwhile
        receiver.start()
        for sender in senders:
            sender.join(timeout=300)
    finally:
        receiver.stop()
    for sender in senders:
        assert sender.error is None, sender.error
    assert sum(s.failures for s in senders) > 0, "the kill interrupted no sender"
    assert killed_with < 3 * 60 * 50  # it died while requests were still coming
    assert not list((home / "landing").glob(".receive-*"))  # no half-written file left

    rows = run_ingest(monkeypatch, home)
    assert all(not row.get("error") for row in rows), rows
    samples = {key: set(points) for key, points in stored(home).items()}
    for sender in senders:
        for key, ts, value in sender.acked:
            assert (ts, value) in samples.get(key, set()), (key, ts, value)
    assert sum(len(points) for points in samples.values()) == 3 * 60 * 50
    print(json.dumps({"acked_before_kill": killed_with, "retries": [s.failures for s in senders]}))


def test_token_from_a_prefect_secret_block(tmp_path: Path) -> None:
    from prefect.blocks.system import Secret

    from metricmill.receiver import load_token

    Secret(value="from-the-block").save("metricmill-receive-test", overwrite=True)
    settings = receiver_settings(tmp_path, receive_token_block="metricmill-receive-test")
    token = load_token(settings)
    assert token == "from-the-block"
    body = remote_write_body([({"__name__": "up"}, [(int(time.time() * 1000), 1.0)])])
    with receiver_in_thread(settings, token=token) as live:
        url = f"{live.url}/api/v1/write"
        assert httpx.post(url, content=body, headers=REMOTE_WRITE_HEADERS).status_code == 401
        auth = {**REMOTE_WRITE_HEADERS, "Authorization": "Bearer from-the-block"}
        assert httpx.post(url, content=body, headers=auth).status_code == 204
    missing = receiver_settings(tmp_path, receive_token_block="no-such-block")
    with pytest.raises(MetricmillError, match="no-such-block"):
        load_token(missing)
