"""Real peers for the receiver's tests: `metricmill receive` in-process or as a process, a node
exporter, a Prometheus server, and the remote-write request builder senders use.

Binaries missing: the tests using them are skipped, unless CI or the named REQUIRE variable is
set (then they fail, saying what to install).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cramjam
import httpx
import pytest
import uvicorn

from metricmill.receiver import Receiver, build_app
from metricmill.settings import Settings, load_settings
from storage.proto.remote_write_pb2 import WriteRequest

METRICMILL = Path(sys.executable).parent / "metricmill"


def truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def require_binary(name: str, path: Path, env_var: str) -> Path:
    """The binary, or skip (fail under CI / env_var) saying how to install it."""
    found = shutil.which(name)
    binary = Path(found) if found else path
    if not binary.is_file():
        reason = f"{name} not installed: apt-get install {name}"
        if truthy("CI") or truthy(env_var):
            pytest.fail(f"{reason} [CI or {env_var}=1]", pytrace=False)
        pytest.skip(reason)
    return binary


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    """This process's environment without METRICMILL_* settings, plus home and `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("METRICMILL_")}
    env["METRICMILL_HOME"] = str(home)
    env.update(extra)
    return env


def receiver_settings(home: Path, **overrides: Any) -> Settings:
    """Settings for an in-process receiver: only `home` and `overrides`, whatever the env says."""
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("METRICMILL_")}
    try:
        return load_settings(home=home, **overrides)
    finally:
        os.environ.update(saved)


@dataclass
class LiveReceiver:
    url: str
    receiver: Receiver


@contextmanager
def receiver_in_thread(settings: Settings, token: str | None = None) -> Iterator[LiveReceiver]:
    """The receiver's app under uvicorn on a free loopback port, in a thread of this process."""
    receiver = Receiver(settings, token)
    receiver.prepare()
    port = free_port()
    config = uvicorn.Config(
        build_app(receiver),
        host="127.0.0.1",
        port=port,
        limit_concurrency=settings.receive_max_connections,
        access_log=False,
        log_level="warning",
        lifespan="off",
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, timeout=30)
        yield LiveReceiver(url, receiver)
    finally:
        server.should_exit = True
        thread.join(timeout=15)


def wait_ready(url: str, *, timeout: float, process: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise AssertionError(f"receiver exited with {process.returncode}")
        try:
            if httpx.get(f"{url}/-/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{url} not ready within {timeout} s")


class ReceiverProcess:
    """`metricmill receive` as a child process (so it can be killed with SIGKILL)."""

    def __init__(self, home: Path, port: int, log_path: Path, **env: str) -> None:
        self.home, self.port, self.log_path, self.env = home, port, log_path, env
        self.url = f"http://127.0.0.1:{port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [str(METRICMILL), "receive", "--host", "127.0.0.1", "--port", str(self.port)],
                env=clean_env(self.home, **self.env),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_ready(self.url, timeout=120, process=self.process)

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def remote_write_body(series: list[tuple[dict[str, str], list[tuple[int, float]]]]) -> bytes:
    """A snappy-compressed WriteRequest: (labels with __name__, [(ms, value)]) per series."""
    request = WriteRequest()
    for labels, samples in series:
        ts = request.timeseries.add()
        for name in sorted(labels):
            ts.labels[name] = labels[name]
        for stamp, value in samples:
            ts.samples.add(timestamp=stamp, value=value)
    return bytes(cramjam.snappy.compress_raw(request.SerializeToString()))


REMOTE_WRITE_HEADERS = {
    "Content-Encoding": "snappy",
    "Content-Type": "application/x-protobuf",
    "X-Prometheus-Remote-Write-Version": "0.1.0",
}


# -- node exporter and Prometheus ------------------------------------------------------------------
NODE_EXPORTER = "prometheus-node-exporter"
PROMETHEUS = "prometheus"


def start_process(command: list[str], log_path: Path, ready_url: str) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
        )
    deadline = time.monotonic() + 60
    while process.poll() is None and time.monotonic() < deadline:
        try:
            if httpx.get(ready_url, timeout=2).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    stop_process(process)
    tail = log_path.read_text(errors="replace")[-3000:]
    raise AssertionError(f"{command[0]} did not come up at {ready_url}:\n{tail}")


def stop_process(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def node_exporter_command(binary: Path, instance: str) -> list[str]:
    return [
        str(binary),
        f"--web.listen-address={instance}",
        # Collectors that need no privileges and answer fast.
        "--collector.disable-defaults",
        "--collector.cpu",
        "--collector.meminfo",
        "--collector.loadavg",
        "--collector.stat",
    ]


def prometheus_config(target: str, remote_write_url: str) -> str:
    return f"""\
global:
  scrape_interval: 1s
  evaluation_interval: 1m
scrape_configs:
  - job_name: node
    static_configs:
      - targets: ["{target}"]
remote_write:
  - url: "{remote_write_url}"
    queue_config:
      batch_send_deadline: 1s
      max_samples_per_send: 500
      min_backoff: 100ms
      max_backoff: 1s
      retry_on_http_429: true
"""
