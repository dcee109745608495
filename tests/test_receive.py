"""The receiver over real HTTP (uvicorn on loopback): what lands, and every refusal.

Landed files are read back with the ingest flow's own reader (storage.readers.read_landed_file),
so these tests pin what the ingest flow will see; the flow itself runs in test_receive_peers.py.
"""

from __future__ import annotations

import gzip
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pandas as pd
import pytest

from storage.push_landing import TEMP_PREFIX, landing_backlog
from storage.readers import read_landed_file
from tests.receive_peers import (
    REMOTE_WRITE_HEADERS,
    LiveReceiver,
    receiver_in_thread,
    receiver_settings,
    remote_write_body,
)

NOW_MS = int(time.time() * 1000) // 1000 * 1000
STALE_NAN = 0x7FF0000000000002


@pytest.fixture
def live(tmp_path: Path) -> LiveReceiver:
    settings = receiver_settings(tmp_path, receive_max_request_bytes=64 * 1024)
    with receiver_in_thread(settings) as receiver:
        yield receiver


def landed(home: Path) -> list[Path]:
    return sorted((home / "landing").glob("push-*.ndjson"))


def rows(path: Path) -> list[tuple[str, dict[str, str], int, float]]:
    """(metric, labels, epoch ms, value) per landed sample, as the ingest flow reads them."""
    frame = read_landed_file(path).frame
    stamps = [t.value // 1_000_000 for t in pd.to_datetime(frame["ts"], utc=True)]
    return [
        (m, dict(labels), ts, float(v))
        for m, labels, ts, v in zip(
            frame["metric"], frame["labels"], stamps, frame["value"], strict=True
        )
    ]


def test_remote_write_lands_samples_with_name_as_metric(live: LiveReceiver, tmp_path: Path) -> None:
    body = remote_write_body(
        [
            ({"__name__": "up", "job": "node", "instance": "a:9100"}, [(NOW_MS, 1.0)]),
            ({"__name__": "load1", "job": "node"}, [(NOW_MS, 0.25), (NOW_MS + 1000, 0.5)]),
        ]
    )
    reply = httpx.post(f"{live.url}/api/v1/write", content=body, headers=REMOTE_WRITE_HEADERS)
    assert reply.status_code == 204, reply.text
    [path] = landed(tmp_path)
    assert sorted(rows(path)) == sorted(
        [
            ("up", {"job": "node", "instance": "a:9100"}, NOW_MS, 1.0),
            ("load1", {"job": "node"}, NOW_MS, 0.25),
            ("load1", {"job": "node"}, NOW_MS + 1000, 0.5),
        ]
    )
    assert not list((tmp_path / "landing").glob(f"{TEMP_PREFIX}*"))  # no temp file left


def test_same_body_twice_is_one_file_with_the_same_bytes(
    live: LiveReceiver, tmp_path: Path
) -> None:
    body = remote_write_body([({"__name__": "up"}, [(NOW_MS, 1.0)])])
    for _ in range(2):
        reply = httpx.post(f"{live.url}/api/v1/write", content=body, headers=REMOTE_WRITE_HEADERS)
        assert reply.status_code == 204
    assert len(landed(tmp_path)) == 1


def test_staleness_markers_are_not_landed_and_nan_is_kept_for_quarantine(
    live: LiveReceiver, tmp_path: Path
) -> None:
    import struct

    stale = struct.unpack("<d", struct.pack("<Q", STALE_NAN))[0]
    body = remote_write_body(
        [({"__name__": "gone"}, [(NOW_MS, 3.0), (NOW_MS + 1000, stale)]),
         ({"__name__": "broken"}, [(NOW_MS, math.nan)])]
    )  # fmt: skip
    reply = httpx.post(f"{live.url}/api/v1/write", content=body, headers=REMOTE_WRITE_HEADERS)
    assert reply.status_code == 204
    [path] = landed(tmp_path)
    got = rows(path)
    assert [(m, ts, v) for m, _, ts, v in got if m == "gone"] == [("gone", NOW_MS, 3.0)]
    [broken] = [v for m, _, _, v in got if m == "broken"]
    assert math.isnan(broken)  # the ingest flow quarantines it as non_finite_value
    assert live.receiver.stats["ignored_stale_markers"] == 1


def test_line_protocol_gzipped_gets_the_bucket_label_and_bad_lines_kept_as_text(
    live: LiveReceiver, tmp_path: Path
) -> None:
    text = (
        "cpu,host=a usage_idle=91.5,usage_user=3i 1700000000000000000\n"
        "mem,host=a value=42 1700000000000000000\n"
        "this is not line protocol\n"
    )
    reply = httpx.post(
        f"{live.url}/api/v2/write",
        params={"org": "ops", "bucket": "telegraf", "precision": "ns"},
        content=gzip.compress(text.encode()),
        headers={"Content-Encoding": "gzip", "Authorization": "Token ignored-without-a-token"},
    )
    assert reply.status_code == 204, reply.text
    [path] = landed(tmp_path)
    decoded = read_landed_file(path)
    frame = decoded.frame
    got = {
        (m, tuple(sorted(labels.items())), v)
        for m, labels, v in zip(frame["metric"], frame["labels"], frame["value"], strict=True)
    }
    tags = (("bucket", "telegraf"), ("host", "a"))
    assert got == {
        ("cpu_usage_idle", tags, 91.5),
        ("cpu_usage_user", tags, 3.0),
        ("mem", tags, 42.0),
    }
    [(record, reason)] = decoded.rejected
    assert reason == "malformed_line"
    assert "this is not line protocol" in record["text"]


def test_influx_1x_write_uses_db_and_precision(live: LiveReceiver, tmp_path: Path) -> None:
    reply = httpx.post(
        f"{live.url}/write", params={"db": "legacy", "precision": "s"}, content=b"t v=1 1700000000"
    )
    assert reply.status_code == 204, reply.text
    [(metric, labels, ts, value)] = rows(landed(tmp_path)[0])
    assert (metric, labels, ts, value) == ("t_v", {"bucket": "legacy"}, 1_700_000_000_000, 1.0)


@pytest.mark.parametrize(
    ("path", "params", "body", "headers", "needle"),
    [
        ("/api/v1/write", {}, b"\x00\x01garbage", REMOTE_WRITE_HEADERS, "snappy"),
        ("/api/v1/write", {}, b"\xff\xff\xff", {"Content-Encoding": "snappy"}, "snappy"),
        ("/api/v2/write", {"bucket": "b"}, b"no fields here", {}, "malformed_line"),
        ("/api/v2/write", {}, b"m v=1", {}, "'bucket'"),
        ("/api/v2/write", {"bucket": "b", "precision": "h"}, b"m v=1", {}, "precision"),
        ("/write", {"db": "d"}, b"\xff\xfe", {}, "UTF-8"),
        ("/write", {"db": "d"}, b"not gzip", {"Content-Encoding": "gzip"}, "gzip"),
        ("/v1/metrics", {}, b"{not json", {"Content-Type": "application/json"}, "OTLP"),
        ("/v1/metrics", {}, b"\xff\xff\xff", {"Content-Type": "application/x-protobuf"}, "OTLP"),
    ],
)
def test_malformed_body_gets_400_with_one_line(
    live: LiveReceiver,
    tmp_path: Path,
    path: str,
    params: dict[str, str],
    body: bytes,
    headers: dict[str, str],
    needle: str,
) -> None:
    reply = httpx.post(f"{live.url}{path}", params=params, content=body, headers=headers)
    assert reply.status_code == 400
    assert reply.text.count("\n") == 1 and needle in reply.text, reply.text
    assert "Traceback" not in reply.text
    assert landed(tmp_path) == []


def test_body_above_the_limit_gets_413_before_and_after_decompression(
    live: LiveReceiver, tmp_path: Path
) -> None:
    big = b"m v=1 1700000000000000000\n" * 4000  # 104 kB, above the 64 kB limit
    reply = httpx.post(f"{live.url}/write", params={"db": "d"}, content=big)
    assert reply.status_code == 413
    bomb = gzip.compress(big)  # small on the wire, too big once decompressed
    assert len(bomb) < 64 * 1024
    reply = httpx.post(
        f"{live.url}/write", params={"db": "d"}, content=bomb, headers={"Content-Encoding": "gzip"}
    )
    assert reply.status_code == 413, reply.text
    assert landed(tmp_path) == []


def test_unknown_encoding_gets_415(live: LiveReceiver) -> None:
    reply = httpx.post(
        f"{live.url}/write",
        params={"db": "d"},
        content=b"m v=1",
        headers={"Content-Encoding": "br"},
    )
    assert reply.status_code == 415


def test_backlog_above_the_limit_gets_429_with_retry_after(tmp_path: Path) -> None:
    settings = receiver_settings(
        tmp_path, receive_max_backlog_bytes=1000, receive_retry_after_seconds=7
    )
    (tmp_path / "landing").mkdir(parents=True)
    waiting = tmp_path / "landing" / "dropped.ndjson"
    waiting.write_bytes(b"x" * 2000)  # a file the ingest flow has not taken yet
    body = remote_write_body([({"__name__": "up"}, [(NOW_MS, 1.0)])])
    with receiver_in_thread(settings) as live:
        reply = httpx.post(f"{live.url}/api/v1/write", content=body, headers=REMOTE_WRITE_HEADERS)
        assert reply.status_code == 429
        assert reply.headers["Retry-After"] == "7"
        assert landed(tmp_path) == []
        waiting.unlink()  # the ingest flow took it
        time.sleep(1.1)  # the backlog is measured at most once a second
        reply = httpx.post(f"{live.url}/api/v1/write", content=body, headers=REMOTE_WRITE_HEADERS)
        assert reply.status_code == 204
    assert len(landed(tmp_path)) == 1


def test_backlog_counts_claimed_files_not_done_ones(tmp_path: Path) -> None:
    landing = tmp_path / "landing"
    (landing / "processing" / "123-claim").mkdir(parents=True)
    (landing / "done").mkdir()
    (landing / "a.ndjson").write_bytes(b"x" * 10)
    (landing / "processing" / "123-claim" / "b.ndjson").write_bytes(b"x" * 5)
    (landing / "processing" / "123-claim" / ".lock").write_bytes(b"")
    (landing / "done" / "c.ndjson").write_bytes(b"x" * 100)
    (landing / ".receive-1-x.tmp").write_bytes(b"x" * 100)
    backlog = landing_backlog(landing)
    assert (backlog.files, backlog.bytes) == (2, 15)


def test_token_is_required_when_configured_and_compared_exactly(tmp_path: Path) -> None:
    settings = receiver_settings(tmp_path, receive_token="s3cret-token")
    body = remote_write_body([({"__name__": "up"}, [(NOW_MS, 1.0)])])
    with receiver_in_thread(settings, token="s3cret-token") as live:
        url = f"{live.url}/api/v1/write"
        assert httpx.post(url, content=body, headers=REMOTE_WRITE_HEADERS).status_code == 401
        wrong = {**REMOTE_WRITE_HEADERS, "Authorization": "Bearer s3cret-toke"}
        reply = httpx.post(url, content=body, headers=wrong)
        assert reply.status_code == 401 and "s3cret" not in reply.text
        right = {**REMOTE_WRITE_HEADERS, "Authorization": "Bearer s3cret-token"}
        assert httpx.post(url, content=body, headers=right).status_code == 204
        influx = httpx.post(
            f"{live.url}/api/v2/write",
            params={"bucket": "b"},
            content=b"m v=1 1700000000000000000",
            headers={"Authorization": "Token s3cret-token"},
        )
        assert influx.status_code == 204
    assert len(landed(tmp_path)) == 2


def test_stale_temp_files_of_a_dead_receiver_are_removed_at_start(tmp_path: Path) -> None:
    landing = tmp_path / "landing"
    landing.mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    orphan = landing / f"{TEMP_PREFIX}{dead.stdout.strip()}-abc.tmp"
    orphan.write_bytes(b'{"metric": "half')
    with receiver_in_thread(receiver_settings(tmp_path)):
        assert not orphan.exists()


def test_generated_protobuf_code_matches_the_proto_file(tmp_path: Path) -> None:
    proto_dir = Path(__file__).resolve().parents[1] / "storage" / "proto"
    subprocess.run(
        [
            sys.executable, "-m", "grpc_tools.protoc", f"-I{proto_dir}",
            f"--python_out={tmp_path}", f"--pyi_out={tmp_path}",
            str(proto_dir / "remote_write.proto"),
        ],
        check=True,
    )  # fmt: skip
    for name in ("remote_write_pb2.py", "remote_write_pb2.pyi"):
        assert (tmp_path / name).read_text() == (proto_dir / name).read_text(), name


def test_status_shows_the_receivers_backlog(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from metricmill.cli import app
    from tests.settings_env import isolate_settings

    body = remote_write_body([({"__name__": "up"}, [(NOW_MS, 1.0)])])
    with receiver_in_thread(receiver_settings(tmp_path)) as live:
        reply = httpx.post(f"{live.url}/api/v1/write", content=body, headers=REMOTE_WRITE_HEADERS)
        assert reply.status_code == 204
        size = landed(tmp_path)[0].stat().st_size
        isolate_settings(monkeypatch, home=tmp_path, receive_port=live.url.rsplit(":", 1)[1])
        monkeypatch.setenv("COLUMNS", "250")
        result = CliRunner().invoke(app, ["status"])
    assert result.exit_code == 0, result.output
    line = next(x for x in result.output.splitlines() if "push receiver backlog" in x)
    assert f"1 files, {size} bytes waiting in landing" in line, line
    assert f"receiver at {live.url} answering" in line, line


def test_otlp_json_lands_as_documented(live: LiveReceiver, tmp_path: Path) -> None:
    request = {
        "resourceMetrics": [
            {
                "resource": {
                    "attributes": [
                        {"key": "service.name", "value": {"stringValue": "api"}},
                        {"key": "telemetry.sdk.name", "value": {"stringValue": "opentelemetry"}},
                        {"key": "k8s.pod.name", "value": {"stringValue": "api-0"}},
                    ]
                },
                "scopeMetrics": [
                    {
                        "metrics": [
                            {
                                "name": "jobs.done",
                                "sum": {
                                    "isMonotonic": True,
                                    "aggregationTemporality": 2,
                                    "dataPoints": [
                                        {"asInt": "12", "timeUnixNano": str(NOW_MS * 1_000_000)}
                                    ],
                                },
                            },
                            {
                                "name": "jobs.delta",
                                "sum": {
                                    "isMonotonic": True,
                                    "aggregationTemporality": 1,
                                    "dataPoints": [
                                        {"asInt": "1", "timeUnixNano": str(NOW_MS * 1_000_000)}
                                    ],
                                },
                            },
                        ]
                    }
                ],
            }
        ]
    }
    reply = httpx.post(
        f"{live.url}/v1/metrics",
        content=json.dumps(request),
        headers={"Content-Type": "application/json"},
    )
    assert reply.status_code == 200, reply.text
    assert reply.json()["partialSuccess"]["rejectedDataPoints"] == "1"  # the delta point
    [path] = landed(tmp_path)
    assert rows(path) == [
        ("jobs_done_total", {"job": "api", "k8s_pod_name": "api-0"}, NOW_MS, 12.0)
    ]


def test_invalid_receive_setting_is_one_error_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from metricmill.cli import app
    from tests.settings_env import isolate_settings

    isolate_settings(monkeypatch, home=tmp_path, receive_max_backlog_bytes=0)
    result = CliRunner().invoke(app, ["receive", "--port", "70000"])
    assert result.exit_code == 1
    [line] = result.output.strip().splitlines()
    assert line.startswith("error: invalid settings:"), line
    assert "METRICMILL_RECEIVE_PORT" in line and "METRICMILL_RECEIVE_MAX_BACKLOG_BYTES" in line


def test_address_in_use_is_one_error_line(tmp_path: Path) -> None:
    import os
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("METRICMILL_")}
        env["METRICMILL_HOME"] = str(tmp_path)
        result = subprocess.run(
            [str(Path(sys.executable).parent / "metricmill"), "receive", "--port", str(port)],
            capture_output=True, text=True, env=env, timeout=180, check=False,
        )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr == f"error: cannot listen on 127.0.0.1:{port}: Address already in use\n"
    assert "receiving on" not in result.stdout


def test_bodies_are_decoded_and_landed_at_most_receive_concurrency_at_once(
    tmp_path: Path,
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    settings = receiver_settings(tmp_path, receive_concurrency=2)
    bodies = [
        remote_write_body(
            [({"__name__": "m", "s": str(s)}, [(NOW_MS + k, float(n)) for k in range(50)])
             for s in range(40)]
        )
        for n in range(12)
    ]  # fmt: skip
    with receiver_in_thread(settings) as live, ThreadPoolExecutor(12) as pool:
        url = f"{live.url}/api/v1/write"
        codes = list(
            pool.map(lambda b: httpx.post(url, content=b, headers=REMOTE_WRITE_HEADERS), bodies)
        )
        peak = live.receiver.stats["peak_concurrent_work"]
    assert [r.status_code for r in codes] == [204] * 12
    assert 1 <= peak <= 2
    assert len(landed(tmp_path)) == 12
