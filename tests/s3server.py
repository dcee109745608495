"""A local S3 endpoint for the object-storage archive tests: moto's standalone server, started
as a subprocess on a free port of 127.0.0.1 (real HTTP; boto3 and pyarrow talk to it as they
would to any S3)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ACCESS_KEY_ID = "metricmill-test-key"
SECRET_ACCESS_KEY = "s3cr3t-access-key-for-tests"  # moto accepts any
REGION = "us-east-1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _server_command(port: int) -> list[str]:
    beside = Path(sys.executable).with_name("moto_server")
    exe = str(beside) if beside.exists() else shutil.which("moto_server")
    if exe is None:
        raise RuntimeError("moto_server not found: `uv sync` installs moto[server] (dev group)")
    return [exe, "-H", "127.0.0.1", "-p", str(port)]


@contextmanager
def moto_server(timeout: float = 60.0) -> Iterator[str]:
    """Start moto's S3 server; yields its endpoint URL; stops it on exit."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    # The server logs a line per request: to a file, never a pipe nobody reads (a full pipe
    # would block the server mid-request).
    with tempfile.TemporaryFile() as log:
        child = subprocess.Popen(_server_command(port), stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + timeout
            while True:
                if child.poll() is not None:
                    log.seek(0)
                    err = log.read().decode(errors="replace")
                    raise RuntimeError(f"moto_server exited ({child.returncode}): {err[-2000:]}")
                try:
                    with urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2):
                        break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"moto_server did not answer on {endpoint}") from None
                    time.sleep(0.1)
            yield endpoint
        finally:
            child.terminate()
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait(timeout=10)


def client(endpoint: str) -> Any:
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id=ACCESS_KEY_ID,
        aws_secret_access_key=SECRET_ACCESS_KEY,
    )
