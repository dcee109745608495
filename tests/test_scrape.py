"""Scrape targets through the `ingest` flow: a recorded exposition, retries, a real node exporter.

The recorded text (fixtures/node_exporter_sample.prom) is served by a small HTTP server on
127.0.0.1; scripted replies check that a 5xx is retried (and the batch lands exactly once) and a
4xx is not (one request, an error row in the run summary, the other targets still land). The
last test starts a real ``prometheus-node-exporter`` on a free loopback port and scrapes it.
Without the binary that test is skipped, unless CI or METRICMILL_REQUIRE_NODE_EXPORTER=1 is set.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import math
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
from prefect.testing.utilities import prefect_test_harness

from flows.ingest import ingest
from metricmill.settings import Settings
from storage.postgres import TimescaleMode
from storage.store import Store
from tests.dbtargets import DbTarget

FIXTURES = Path(__file__).resolve().parent / "fixtures"
RECORDED = FIXTURES / "node_exporter_sample.prom"
TEXTFILE = FIXTURES / "node_exporter_textfile.prom"
EXPOSITION_TYPE = "text/plain; version=0.0.4; charset=utf-8"
NODE_EXPORTER = "prometheus-node-exporter"
NODE_EXPORTER_PATH = Path("/usr/bin/prometheus-node-exporter")
REQUIRE_NODE_EXPORTER_ENV = "METRICMILL_REQUIRE_NODE_EXPORTER"
# The one sample of the recorded text with its own timestamp (1716290000123 ms).
STAMPED_METRIC = "node_textfile_backup_last_run_info"
STAMPED_TS = datetime(2024, 5, 21, 11, 13, 20, 123000, tzinfo=UTC)
EVER_START = datetime(2000, 1, 1, tzinfo=UTC)
EVER_END = datetime(2200, 1, 1, tzinfo=UTC)

SeriesKey = tuple[str, frozenset[tuple[str, str]]]


# -- Prefect ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prefect_backend(request: pytest.FixtureRequest) -> Iterator[None]:
    """conftest's session-wide `prefect_server` if there is one, else a harness for this module."""
    try:
        request.getfixturevalue("prefect_server")
    except pytest.FixtureLookupError:
        pass
    else:
        yield
        return
    with prefect_test_harness(server_startup_timeout=180):
        yield


pytestmark = pytest.mark.usefixtures("prefect_backend")


# -- a scripted exposition server ----------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes = b""


class ScriptedServer:
    """HTTP on 127.0.0.1 (a free port): each GET gets the next scripted reply, the last repeats."""

    def __init__(self, replies: list[Reply]) -> None:
        self._replies = list(replies)
        self._lock = threading.Lock()
        self.requests: list[str] = []
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                reply = owner._next(self.path)
                self.send_response(reply.status)
                self.send_header("Content-Type", EXPOSITION_TYPE)
                self.send_header("Content-Length", str(len(reply.body)))
                self.end_headers()
                self.wfile.write(reply.body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    def _next(self, path: str) -> Reply:
        with self._lock:
            self.requests.append(path)
            return self._replies[min(len(self.requests), len(self._replies)) - 1]

    @property
    def instance(self) -> str:
        return f"127.0.0.1:{self._httpd.server_address[1]}"

    @property
    def url(self) -> str:
        return f"http://{self.instance}/metrics"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=10)


@pytest.fixture
def serve() -> Iterator[Callable[..., ScriptedServer]]:
    """serve(Reply, ...) starts a scripted server; all are shut down after the test."""
    servers: list[ScriptedServer] = []

    def start(*replies: Reply) -> ScriptedServer:
        servers.append(ScriptedServer(list(replies)))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def recorded() -> Reply:
    return Reply(200, RECORDED.read_bytes())


def recorded_sample_count() -> int:
    """Sample lines of the recorded text, less its NaN one (a scrape skips and counts it)."""
    lines = RECORDED.read_text().splitlines()
    samples = [line for line in lines if line.strip() and not line.startswith("#")]
    return sum(1 for line in samples if not line.endswith(" NaN"))


# -- running the flow and reading back -----------------------------------------------------------


@dataclass
class Run:
    rows: dict[str, dict[str, Any]]  # summary row per source
    started: datetime
    finished: datetime


def run_ingest(
    monkeypatch: pytest.MonkeyPatch,
    home: Path,
    targets: list[str] | list[str | dict[str, Any]],
    db: DbTarget | None = None,
    **env: str,
) -> Run:
    """One `ingest(landing=False)` run scraping `targets`; it must complete."""
    # Only what this test sets: no settings from the caller's environment or a config file.
    for name in [*Settings.model_fields, "config"]:
        monkeypatch.delenv(f"METRICMILL_{name.upper()}", raising=False)
    monkeypatch.setenv("METRICMILL_HOME", str(home))
    monkeypatch.setenv("METRICMILL_SCRAPE_TARGETS", json.dumps(targets))
    if db is not None:
        monkeypatch.setenv("METRICMILL_DATABASE_URL", db.url)
        monkeypatch.setenv("METRICMILL_TIMESCALEDB", db.timescaledb)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    started = datetime.now(UTC)
    state = asyncio.run(ingest(landing=False, return_state=True))
    finished = datetime.now(UTC)
    assert state.is_completed(), f"ingest run ended {state.type}: {state.message}"
    rows = state.result()
    assert isinstance(rows, list)
    by_source = {row["source"]: row for row in rows}
    assert len(by_source) == len(rows) == len(targets), rows
    return Run(by_source, started, finished)


def open_store(home: Path, db: DbTarget | None = None) -> Store:
    if db is None:
        return Store.open(f"sqlite:///{home / 'metrics.db'}")
    return Store.open(db.url, timescaledb=cast(TimescaleMode, db.timescaledb))


def series_key(metric: str, labels: dict[str, str]) -> SeriesKey:
    return metric, frozenset(labels.items())


def stored_samples(store: Store) -> dict[SeriesKey, list[tuple[datetime, float]]]:
    """Every stored sample, by series."""
    found: dict[SeriesKey, list[tuple[datetime, float]]] = {}
    for metric in sorted(set(store.series()["metric"])):
        frame = store.query(metric, start=EVER_START, end=EVER_END)
        for labels, ts, value in zip(frame["labels"], frame["ts"], frame["value"], strict=True):
            points = found.setdefault(series_key(metric, labels), [])
            points.append((ts.to_pydatetime(), float(value)))
    return found


def family(
    samples: dict[SeriesKey, list[tuple[datetime, float]]], metric: str
) -> dict[frozenset[tuple[str, str]], list[tuple[datetime, float]]]:
    return {labels: points for (name, labels), points in samples.items() if name == metric}


def one_value(
    samples: dict[SeriesKey, list[tuple[datetime, float]]], metric: str, **labels: str
) -> float:
    """The single stored value of the series whose labels include `labels`."""
    matches = [
        points
        for found_labels, points in family(samples, metric).items()
        if set(labels.items()) <= found_labels
    ]
    assert len(matches) == 1, f"{metric}{labels}: {len(matches)} matching series"
    assert len(matches[0]) == 1, f"{metric}{labels}: {matches[0]}"
    return matches[0][0][1]


def by_label(
    samples: dict[SeriesKey, list[tuple[datetime, float]]], metric: str, label: str
) -> dict[str, float]:
    """{value of `label`: the sample's value} over the single-sample series of `metric`."""
    found: dict[str, float] = {}
    for labels, points in family(samples, metric).items():
        assert len(points) == 1, (metric, labels, points)
        found[dict(labels)[label]] = points[0][1]
    return found


def quarantined(store: Store) -> list[dict[str, Any]]:
    return [
        {str(k): v for k, v in entry.items()}
        for entry in store.quarantine(limit=1000).to_dict("records")
    ]


# -- the recorded exposition -----------------------------------------------------------------


def test_recorded_exposition_lands_flat_with_target_labels(
    db_target: DbTarget,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    serve: Callable[..., ScriptedServer],
) -> None:
    server = serve(recorded())
    total = recorded_sample_count()
    # Retention long enough to keep the recorded text's own 2024 timestamp.
    run = run_ingest(
        monkeypatch, tmp_path, [server.url], db_target, METRICMILL_RETENTION_DAYS="36500"
    )
    assert server.requests == ["/metrics"]

    row = run.rows[f"scrape:{server.url}"]
    assert row["kind"] == "scrape"
    assert row["error"] == ""
    assert row["rows_in"] == total
    assert row["skipped_fields"] == 1  # the NaN quantile: skipped and counted
    assert row["written"] == total - 1
    assert row["quarantined"] == "non_finite_value: 1"
    assert row["new_series"] == total - 1

    with open_store(tmp_path, db_target) as store:
        samples = stored_samples(store)
        rejects = quarantined(store)

    assert sum(len(points) for points in samples.values()) == total - 1
    assert all(len(points) == 1 for points in samples.values())
    # Target labels on every sample; the stamped sample keeps its time, the rest share one
    # scrape time taken during the run.
    scrape_times = set()
    for (metric, labels), [(ts, _)] in samples.items():
        assert ("instance", server.instance) in labels, (metric, labels)
        assert ("job", "scrape") in labels, (metric, labels)
        if metric == STAMPED_METRIC:
            assert ts == STAMPED_TS
        else:
            scrape_times.add(ts)
    assert len(scrape_times) == 1
    [scraped_at] = scrape_times
    assert run.started - timedelta(seconds=1) <= scraped_at <= run.finished

    # Counters and gauges.
    cpu = family(samples, "node_cpu_seconds_total")
    assert len(cpu) == 16
    assert {(dict(k)["cpu"], dict(k)["mode"]) for k in cpu} == {
        (c, m)
        for c in ("0", "1")
        for m in ("idle", "iowait", "irq", "nice", "softirq", "steal", "system", "user")
    }
    assert one_value(samples, "node_cpu_seconds_total", cpu="0", mode="idle") == 845312.47
    assert one_value(samples, "node_cpu_seconds_total", cpu="1", mode="user") == 22455.31
    assert one_value(samples, "go_goroutines") == 9
    assert one_value(samples, "node_boot_time_seconds") == 1.716201472e09
    assert one_value(samples, "node_network_receive_bytes_total", device="eth0") == 9.87654321e09
    assert dict(next(iter(family(samples, "go_goroutines")))) == {
        "instance": server.instance,
        "job": "scrape",
    }

    # A histogram: one flat series per bucket (le kept as written), plus _sum and _count.
    hist = "node_textfile_backup_duration_seconds"
    assert by_label(samples, f"{hist}_bucket", "le") == {
        "60": 0,
        "300": 3,
        "900": 11,
        "3600": 14,
        "+Inf": 14,
    }
    for labels in family(samples, f"{hist}_bucket"):
        assert dict(labels) == {
            "job_name": "nightly",
            "le": dict(labels)["le"],
            "instance": server.instance,
            "job": "scrape",
        }
    assert one_value(samples, f"{hist}_sum", job_name="nightly") == 7421.5
    assert one_value(samples, f"{hist}_count", job_name="nightly") == 14

    # A summary: quantile series, _sum and _count; the NaN quantile is skipped.
    assert by_label(samples, "go_gc_duration_seconds", "quantile") == {
        "0": 2.3781e-05,
        "0.25": 3.1104e-05,
        "0.5": 4.0135e-05,
        "0.75": 5.6298e-05,
    }
    assert one_value(samples, "go_gc_duration_seconds_sum") == 0.084612361
    assert one_value(samples, "go_gc_duration_seconds_count") == 1689
    assert family(samples, "node_hwmon_temp_crit_celsius") == {}  # +Inf: quarantined

    # Escaped label values come back unescaped.
    [info_labels] = family(samples, STAMPED_METRIC)
    assert dict(info_labels)["message"] == "rsync finished\nexit status 0"
    assert dict(info_labels)["target"] == "C:\\Backups"
    [os_labels] = family(samples, "node_os_info")
    assert dict(os_labels)["pretty_name"] == 'Debian GNU/Linux 12 "bookworm"'
    units = {dict(k)["name"] for k in family(samples, "node_systemd_unit_state")}
    assert units == {"dev-disk-by\\x2duuid-3f2a.swap"}

    # The infinite sample is quarantined with its reason, from this scrape; the NaN quantile
    # is not a sample at all.
    assert sorted(e["reason"] for e in rejects) == ["non_finite_value"]
    assert {e["source"] for e in rejects} == {f"scrape:{server.url}"}
    bad = {e["row"]["metric"]: e["row"] for e in rejects}
    assert sorted(bad) == ["node_hwmon_temp_crit_celsius"]
    assert bad["node_hwmon_temp_crit_celsius"]["value"] == "inf"


# -- retries -----------------------------------------------------------------------------------


def test_5xx_is_retried_and_lands_exactly_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, serve: Callable[..., ScriptedServer]
) -> None:
    server = serve(Reply(500, b"busy"), Reply(503, b"busy"), recorded())
    total = recorded_sample_count()
    run = run_ingest(monkeypatch, tmp_path, [server.url])

    assert server.requests == ["/metrics"] * 3
    # The task's real retry delays (1 s, then 3 s) were waited out.
    assert run.finished - run.started >= timedelta(seconds=3.5)
    row = run.rows[f"scrape:{server.url}"]
    assert row["error"] == ""
    assert row["rows_in"] == total
    # Default retention (30 days): the recorded 2024 timestamp is too old now.
    assert row["written"] == total - 2
    assert row["quarantined"] == "non_finite_value: 1, timestamp_too_old: 1"

    with open_store(tmp_path) as store:
        samples = stored_samples(store)
        rejects = quarantined(store)
        series_count = len(store.series())
    assert sum(len(points) for points in samples.values()) == total - 2
    assert all(len(points) == 1 for points in samples.values())
    assert series_count == total - 2
    assert len({e["batch_id"] for e in rejects}) == 1  # one batch, written once
    assert sorted(e["reason"] for e in rejects) == [
        "non_finite_value",
        "timestamp_too_old",
    ]
    assert one_value(samples, "node_cpu_seconds_total", cpu="0", mode="idle") == 845312.47


def test_4xx_is_not_retried_and_does_not_fail_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, serve: Callable[..., ScriptedServer]
) -> None:
    missing = serve(Reply(404, b"not found"))
    healthy = serve(recorded())
    run = run_ingest(monkeypatch, tmp_path, [missing.url, healthy.url])

    assert missing.requests == ["/metrics"]  # one request: a 4xx is not retried
    assert healthy.requests == ["/metrics"]
    failed = run.rows[f"scrape:{missing.url}"]
    assert "404" in failed["error"]
    assert missing.url in failed["error"]
    assert failed["kind"] == "scrape"
    assert failed["rows_in"] == failed["written"] == 0

    landed = run.rows[f"scrape:{healthy.url}"]
    assert landed["error"] == ""
    assert landed["written"] == recorded_sample_count() - 2  # +Inf and the 2024 stamp

    with open_store(tmp_path) as store:
        samples = stored_samples(store)
        rejects = quarantined(store)
    instances = {dict(labels)["instance"] for _, labels in samples}
    assert instances == {healthy.instance}
    assert {e["source"] for e in rejects} == {f"scrape:{healthy.url}"}


# -- a real prometheus-node-exporter ------------------------------------------------------------


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class NodeExporter:
    url: str
    instance: str


@pytest.fixture(scope="module")
def node_exporter(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeExporter]:
    """prometheus-node-exporter on a free loopback port, with a few unprivileged collectors."""
    found = shutil.which(NODE_EXPORTER)
    binary = Path(found) if found else NODE_EXPORTER_PATH
    if not binary.is_file():
        reason = f"{NODE_EXPORTER} not installed: apt-get install {NODE_EXPORTER}"
        if _truthy("CI") or _truthy(REQUIRE_NODE_EXPORTER_ENV):
            pytest.fail(f"{reason} [CI or {REQUIRE_NODE_EXPORTER_ENV}=1]", pytrace=False)
        pytest.skip(reason)

    workdir = tmp_path_factory.mktemp("node_exporter")
    textfiles = workdir / "textfile"
    textfiles.mkdir()
    shutil.copyfile(TEXTFILE, textfiles / "job.prom")
    log_path = workdir / "node_exporter.log"
    problems: list[str] = []
    for _attempt in range(3):  # another process may take the free port before the exporter
        instance = f"127.0.0.1:{_free_port()}"
        command = [
            str(binary),
            f"--web.listen-address={instance}",
            # Only collectors that need no privileges, no systemd/D-Bus and answer fast.
            "--collector.disable-defaults",
            "--collector.cpu",
            "--collector.meminfo",
            "--collector.loadavg",
            "--collector.stat",
            "--collector.time",
            "--collector.uname",
            "--collector.vmstat",
            "--collector.textfile",
            f"--collector.textfile.directory={textfiles}",
        ]
        with log_path.open("ab") as log:
            process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        try:
            url = f"http://{instance}/metrics"
            deadline = time.monotonic() + 30
            while process.poll() is None and time.monotonic() < deadline:
                try:
                    if httpx.get(url, timeout=2).status_code == 200:
                        yield NodeExporter(url, instance)
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
            problems.append(
                f"{instance}: exited with {process.returncode}"
                if process.poll() is not None
                else f"{instance}: no answer within 30 s"
            )
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
    log_text = log_path.read_text(errors="replace")[-4000:]
    pytest.fail(f"{NODE_EXPORTER} did not come up ({'; '.join(problems)}):\n{log_text}")


def test_real_node_exporter_scrape(
    db_target: DbTarget,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    node_exporter: NodeExporter,
) -> None:
    run = run_ingest(monkeypatch, tmp_path, [node_exporter.url], db_target)
    row = run.rows[f"scrape:{node_exporter.url}"]
    assert row["error"] == ""
    assert row["written"] > 100, row
    assert "malformed_line" not in row["quarantined"], row

    with open_store(tmp_path, db_target) as store:
        samples = stored_samples(store)
        rejects = quarantined(store)
    assert sum(len(points) for points in samples.values()) == row["written"]
    assert len(rejects) == row["rows_in"] - row["written"]
    for (metric, labels), points in samples.items():
        assert ("instance", node_exporter.instance) in labels, (metric, labels)
        assert ("job", "scrape") in labels, (metric, labels)
        assert len(points) == 1
        ts, value = points[0]
        assert run.started - timedelta(seconds=1) <= ts <= run.finished, (metric, ts)
        assert math.isfinite(value)

    cpu = family(samples, "node_cpu_seconds_total")
    assert cpu
    assert all({"cpu", "mode"} <= {name for name, _ in labels} for labels in cpu)
    modes = {dict(labels)["mode"] for labels in cpu}
    assert {"idle", "user", "system"} <= modes
    cpus = {dict(labels)["cpu"] for labels in cpu}
    assert "0" in cpus
    assert len(cpu) == len(cpus) * len(modes)
    assert all(points[0][1] >= 0 for points in cpu.values())

    assert one_value(samples, "node_memory_MemTotal_bytes") > 0

    # A summary from the exporter's own Go runtime: quantile series plus _sum and _count.
    quantiles = by_label(samples, "go_gc_duration_seconds", "quantile")
    assert set(quantiles) == {"0", "0.25", "0.5", "0.75", "1"}
    assert one_value(samples, "go_gc_duration_seconds_count") >= 0
    assert len(family(samples, "go_gc_duration_seconds_sum")) == 1

    # A histogram re-exposed by the textfile collector: flat buckets with `le`.
    hist = "metricmill_test_job_duration_seconds"
    assert by_label(samples, f"{hist}_bucket", "le") == {
        "60": 0,
        "300": 3,
        "900": 11,
        "3600": 14,
        "+Inf": 14,
    }
    assert one_value(samples, f"{hist}_sum", job_name="nightly") == 7421.5
    assert one_value(samples, f"{hist}_count", job_name="nightly") == 14


def test_prometheus_style_targets_name_the_job_and_add_labels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, serve: Callable[..., ScriptedServer]
) -> None:
    node, plain = serve(recorded()), serve(recorded())
    targets: list[str | dict[str, Any]] = [
        {"url": node.url, "job": "node", "labels": {"dc": "fra1", "team": "ops"}},
        plain.url,  # a plain URL still works: job "scrape", no extra labels
    ]
    run = run_ingest(monkeypatch, tmp_path, targets, METRICMILL_RETENTION_DAYS="36500")
    assert run.rows[f"scrape:{node.url}"]["error"] == ""
    with open_store(tmp_path) as store:
        samples = stored_samples(store)
    jobs: dict[str, set[frozenset[tuple[str, str]]]] = {}
    for (_, labels), _points in samples.items():
        found = dict(labels)
        extra = frozenset((k, v) for k, v in found.items() if k in {"dc", "team"})
        jobs.setdefault(found["job"], set()).add(extra)
    assert set(jobs) == {"node", "scrape"}
    assert jobs["node"] == {frozenset({("dc", "fra1"), ("team", "ops")})}
    assert jobs["scrape"] == {frozenset()}


@pytest.mark.parametrize(
    "target,problem",
    [
        ({"url": "ftp://h/metrics"}, "not an http(s) URL"),
        ({"url": "http://h/m", "labels": {"job": "x"}}, "use its 'job' key"),
        ({"url": "http://h/m", "labels": {"bad-name": "x"}}, "not a Prometheus label name"),
        ({"url": "http://h/m", "jobs": "x"}, "Extra inputs are not permitted"),
    ],
)
def test_a_bad_scrape_target_is_one_settings_error(
    monkeypatch: pytest.MonkeyPatch, target: dict[str, Any], problem: str
) -> None:
    from metricmill.errors import SettingsError
    from metricmill.settings import load_settings

    monkeypatch.setenv("METRICMILL_SCRAPE_TARGETS", json.dumps([target]))
    with pytest.raises(SettingsError, match="METRICMILL_SCRAPE_TARGETS") as caught:
        load_settings()
    assert problem in str(caught.value)
