"""`metricmill serve` stops on SIGTERM (what systemd sends) and SIGINT (Ctrl-C) with one line
and exit code 0, against a real `prefect server start`."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.test_ui_e2e import (
    BIN,
    clean_env,
    forget_deployment,
    prefect_api,
    registered,
    start,
    stop,
)

__all__ = ["prefect_api"]  # the fixture, imported for the tests below


@pytest.mark.parametrize(
    ("signum", "inherited"),
    [
        (signal.SIGTERM, signal.SIG_DFL),
        (signal.SIGINT, signal.SIG_DFL),
        # A background job of a script (`nohup metricmill serve &`) starts with SIGINT ignored.
        (signal.SIGINT, signal.SIG_IGN),
    ],
    ids=["SIGTERM", "SIGINT", "SIGINT-ignored-at-start"],
)
def test_serve_stops_on_a_signal_with_one_line(
    prefect_api: str, tmp_path: Path, signum: signal.Signals, inherited: signal.Handlers
) -> None:
    log = tmp_path / "serve.log"
    env = clean_env(PREFECT_API_URL=prefect_api)
    args = [str(BIN / "metricmill"), "--home", str(tmp_path / "home"), "serve", "--flow", "rollup"]
    # The server is the module's: the deployment is registered afresh by this test's serve.
    forget_deployment(prefect_api, "rollup/every-5-minutes")
    # What the process inherits for SIGINT is set explicitly: the test runner's own disposition
    # (ignored, when the suite itself was started in the background) must not decide it.
    previous = signal.signal(signal.SIGINT, inherited)
    try:
        serve = start(args, env, log)
    finally:
        signal.signal(signal.SIGINT, previous)
    try:
        registered(prefect_api, "rollup/every-5-minutes", serve, log)
        # Registered: the runner starts its loop next. Signal it once it polls the API.
        time.sleep(5)
        assert serve.poll() is None, log.read_text()
        before = len(log.read_bytes())
        serve.send_signal(signum)  # to the process alone, as `kill PID` or systemd do
        try:
            code = serve.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"serve still running 60 s after {signum.name}:\n{log.read_text()}")
    finally:
        stop(serve)
    after = log.read_bytes()[before:].decode(errors="replace")
    assert code == 0, log.read_text()
    lines = [line for line in after.splitlines() if line.strip()]
    assert lines == [f"metricmill serve: stopped ({signum.name})"], log.read_text()
    assert "Traceback" not in log.read_text()
