"""Ingest flow runs in forked children, for the tests that run several at once or kill them.

Importing the flow stack and building Great Expectations cost tens of seconds, so the test
process does it once (`warm_ingest`) and every flow run is an `os.fork()` of it that runs the
real Prefect flow (against the session's test Prefect server, whose URL the child inherits in
memory), writes its summary rows or its traceback to a log of its own, and `os._exit`s. Only
pids forked here are ever signalled or reaped.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time
import traceback
from pathlib import Path
from typing import Any

import pandas as pd

import flows.ingest


def warm_ingest() -> None:
    """Import and build Great Expectations once in this process; forked runs inherit it."""
    from tasks.quality import validate_batch

    now_ms = int(time.time() * 1000)
    frame = pd.DataFrame(
        {"metric": ["warm_up"], "labels": [{"a": "b"}], "ts": [now_ms], "value": [1.0]}
    )
    validate_batch(frame)


def tail(log: Path, lines: int = 40) -> str:
    """The last lines of a run's log (or why there is none), for assertion messages."""
    try:
        return "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(no log: {exc})"


class ForkedRuns:
    """Forks children that each run `ingest(landing only)` once, as a worker runs a
    deployment's run; reaps (and if need be kills) only those."""

    def __init__(self, log_dir: Path, run_timeout: float) -> None:
        self.log_dir = log_dir
        self.run_timeout = run_timeout
        log_dir.mkdir(parents=True, exist_ok=True)
        self.live: dict[int, Path] = {}
        self.count = 0

    def start(
        self, home: Path, url: str, *, gate: int | None = None, env: dict[str, str] | None = None
    ) -> tuple[int, Path]:
        """Fork a child running the flow with `env` added to its environment; with `gate`, it
        first waits to read one byte from that pipe so several children can be released at
        once. (pid, its log)."""
        self.count += 1
        log = self.log_dir / f"run-{self.count:03d}.log"
        pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            code = 1
            try:
                with open(log, "w", encoding="utf-8") as out:
                    try:
                        # Keep Prefect's console chatter out of pytest's capture.
                        for name in ("prefect", "prefect.flow_runs", "prefect.task_runs"):
                            logging.getLogger(name).setLevel(logging.WARNING)
                        os.environ.update(env or {})
                        if gate is not None:
                            os.read(gate, 1)
                        rows = asyncio.run(
                            flows.ingest.ingest(
                                landing=True, scrape=False, database_url=url, home=str(home)
                            )
                        )
                        out.write(json.dumps(rows, default=str) + "\n")
                        code = 0
                    except BaseException:
                        out.write(traceback.format_exc())
            finally:
                os._exit(code)
        self.live[pid] = log
        return pid, log

    def wait(self, pid: int, timeout: float) -> int | None:
        """The child's exit code, or None if it is still running after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                self.live.pop(pid, None)
                return os.waitstatus_to_exitcode(status)
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.005)

    def kill(self, pid: int) -> int:
        """SIGKILL a child of ours that has not been reaped yet (so the pid is still ours)."""
        if pid in self.live:
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            self.live.pop(pid, None)
            return os.waitstatus_to_exitcode(status)
        return 0

    def run(self, home: Path, url: str) -> float:
        """One run to completion; fails the test unless it succeeds. Returns its duration."""
        started = time.monotonic()
        pid, log = self.start(home, url)
        code = self.wait(pid, self.run_timeout)
        if code is None:
            self.kill(pid)
        assert code == 0, f"flow run exited with {code}:\n{tail(log)}"
        return time.monotonic() - started

    def run_all(
        self, home: Path, url: str, count: int, env: dict[str, str] | None = None
    ) -> list[Any]:
        """`count` runs released at once; each one's summary rows (None: it skipped). Fails
        the test unless all end, successfully, within the run timeout."""
        read_end, write_end = os.pipe()
        try:
            started = [self.start(home, url, gate=read_end, env=env) for _ in range(count)]
            os.write(write_end, b"g" * count)
            deadline = time.monotonic() + self.run_timeout
            codes: dict[int, int] = {}
            while len(codes) < count and time.monotonic() < deadline:
                for pid, _ in started:
                    if pid not in codes:
                        code = self.wait(pid, 0)
                        if code is not None:
                            codes[pid] = code
                time.sleep(0.01)
        finally:
            os.close(read_end)
            os.close(write_end)
        logs = [log for pid, log in started if pid in codes]
        text = "\n---\n".join(log.read_text(encoding="utf-8")[-3000:] for log in logs)
        assert sorted(codes) == sorted(pid for pid, _ in started), f"runs did not end:\n{text}"
        assert all(c == 0 for c in codes.values()), f"exit codes {codes}:\n{text}"
        return [json.loads(log.read_text(encoding="utf-8")) for log in logs]

    def close(self) -> None:
        """Kill and reap every child still running."""
        for pid in list(self.live):
            self.kill(pid)
