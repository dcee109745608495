"""Stop `metricmill serve`, let runs pile up, start it again: exactly one catch-up run does the
work, the skipped runs name it, and no run is cancelled by a slot the stopped serve still held.

Real parts: a `prefect server start` with its scheduler on, `metricmill serve` subprocesses
serving ingest every 20 seconds (`--every`, so runs pile up within a minute).
"""

from __future__ import annotations

import re
import signal
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.test_ui_e2e import BIN, clean_env, free_port, get_json, start, stop, wait_until

EVERY = 20
DEPLOYMENT = "ingest/every-minute"
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
LIMIT_REACHED = "Deployment concurrency limit reached"


@pytest.fixture
def scheduling_api(tmp_path: Path) -> Iterator[str]:
    """A real Prefect server whose scheduler creates the deployment's runs (every 5 s)."""
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    log = tmp_path / "prefect-server.log"
    env = clean_env(
        PREFECT_HOME=str(tmp_path / "prefect"),
        PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="5",
    )
    args = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    server = start(args, env, log)
    try:
        wait_until("the Prefect server", lambda: get_json(f"{api}/health") is True, 150, log)
        yield api
    finally:
        stop(server)


def when(value: str) -> datetime:
    return datetime.fromisoformat(value).astimezone(UTC)


def runs_of(api: str, deployment_id: str) -> list[dict[str, Any]]:
    """The deployment's runs due so far, oldest first."""
    body = {
        "flow_runs": {"deployment_id": {"any_": [deployment_id]}},
        "sort": "EXPECTED_START_TIME_ASC",
        "limit": 200,
    }
    try:
        response = httpx.post(f"{api}/flow_runs/filter", json=body, timeout=30)
    except httpx.HTTPError:
        return []
    if response.status_code != 200:
        return []
    now = datetime.now(UTC)
    return [r for r in response.json() if when(r["expected_start_time"]) <= now]


def slot_name(run: dict[str, Any]) -> str:
    return f"ingest-{when(run['expected_start_time']):%Y-%m-%dT%H:%M:%S}Z"


def serve(home: Path, api: str, log: Path) -> Any:
    args = [str(BIN / "metricmill"), "--home", str(home), "serve", "--flow", "ingest"]
    return start([*args, "--every", str(EVERY)], clean_env(PREFECT_API_URL=api), log)


def test_one_catch_up_run_after_a_serve_restart(scheduling_api: str, tmp_path: Path) -> None:
    api, home = scheduling_api, tmp_path / "home"
    first_log, second_log = tmp_path / "serve-1.log", tmp_path / "serve-2.log"
    first = serve(home, api, first_log)
    try:
        deployment = wait_until(
            "serve to register ingest",
            lambda: get_json(f"{api}/deployments/name/{DEPLOYMENT}"),
            120,
            first_log,
        )
        # Stop it while its runner has claimed a run ahead of that run's time (Pending): the
        # run that used to keep the deployment's one slot after serve was gone.
        wait_until(
            "the runner to claim a run ahead of its time",
            lambda: any(
                r["state"]["type"] == "PENDING"
                for r in httpx.post(
                    f"{api}/flow_runs/filter",
                    json={"flow_runs": {"deployment_id": {"any_": [deployment["id"]]}}},
                    timeout=30,
                ).json()
            ),
            120,
            first_log,
        )
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=60) == 0, first_log.read_text()
    finally:
        stop(first)
    stopped = datetime.now(UTC)
    left = [r for r in runs_of(api, deployment["id"]) if r["state"]["type"] == "PENDING"]
    assert not left, "a stopped serve left a run claimed"

    # Let at least two runs pile up while nothing serves the deployment.
    wait_until(
        "two runs to pile up",
        lambda: (
            sum(
                1
                for r in runs_of(api, deployment["id"])
                if when(r["expected_start_time"]) > stopped and r["state"]["type"] == "SCHEDULED"
            )
            >= 2
        ),
        120,
    )
    restarted = datetime.now(UTC)
    second = serve(home, api, second_log)
    try:
        piled = [
            r["id"]
            for r in runs_of(api, deployment["id"])
            if when(r["expected_start_time"]) > stopped
            and when(r["expected_start_time"]) <= restarted
        ]
        assert len(piled) >= 2

        def settled() -> list[dict[str, Any]] | None:
            by_id = {r["id"]: r for r in runs_of(api, deployment["id"])}
            runs = [by_id[i] for i in piled if i in by_id]
            if len(runs) < len(piled) or any(r["state"]["type"] not in TERMINAL for r in runs):
                return None
            # ... and the run they name has finished too. That run may be one the runner
            # claimed ahead of its time: until it is due it is not in `by_id` either.
            named = {
                m[1]
                for r in runs
                if (m := re.search(r"run (\S+) does", r["state"]["message"] or ""))
            }
            finished = {r["name"] for r in by_id.values() if r["state"]["type"] in TERMINAL}
            if not named <= finished:
                return None
            return list(by_id.values())

        everything = wait_until("the piled-up runs to settle", settled, 150, second_log)
    finally:
        stop(second)

    by_name = {r["name"]: r for r in everything}
    piled_runs = [r for r in everything if r["id"] in piled]
    workers: set[str] = set()
    for run in piled_runs:
        state = run["state"]
        assert LIMIT_REACHED not in (state["message"] or ""), (run, second_log.read_text())
        assert run["name"] == slot_name(run)  # named by its slot, renamed before it was skipped
        if state["name"] == "Skipped":
            found = re.search(r"the newer run (\S+) does the work", state["message"] or "")
            assert found, state
            workers.add(found[1])
        else:
            assert (state["type"], state["name"]) == ("COMPLETED", "Completed"), run
            workers.add(run["name"])
    assert len(workers) == 1, workers  # exactly one catch-up run
    (worker_name,) = workers
    worker = by_name[worker_name]
    assert (worker["state"]["type"], worker["state"]["name"]) == ("COMPLETED", "Completed")
    assert worker_name == slot_name(worker)
    assert when(worker["expected_start_time"]) >= max(
        when(r["expected_start_time"]) for r in piled_runs
    )
    done = [r for r in piled_runs if r["state"]["name"] == "Completed"]
    assert len(done) == (1 if worker["id"] in piled else 0)
    assert "Traceback" not in second_log.read_text()
