"""Deployments: every flow served with its schedule, one run at a time, piled-up runs skipped."""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from prefect import get_client
from prefect.cli.deploy._models import PrefectYamlModel
from prefect.client.schemas.objects import StateType
from prefect.flow_engine import run_flow
from prefect.states import Scheduled

from deployments.schedules import FLOW_NAMES, SCHEDULES
from deployments.serve import build_deployments, load_flow, sweep_piled_runs
from flows.guard import SKIPPED
from flows.ingest import ingest
from metricmill.settings import Settings, load_settings
from storage.locks import flow_lock, lock_holders
from storage.store import Store
from tests.dbtargets import DbTarget
from tests.settings_env import isolate_settings

REPO = Path(__file__).resolve().parents[1]
_RECENT = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(minutes=10)
SAMPLES = [
    {"metric": "cpu", "labels": {"host": "a"}, "ts": _RECENT.isoformat(), "value": 1.0},
    {
        "metric": "cpu",
        "labels": {"host": "a"},
        "ts": (_RECENT + timedelta(minutes=1)).isoformat(),
        "value": 2.0,
    },
]


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    isolate_settings(monkeypatch, home=tmp_path / "home")
    return load_settings()


def target_settings(target: DbTarget, tmp_path: Path) -> Settings:
    return load_settings(
        home=tmp_path / "home", database_url=target.url, timescaledb=target.timescaledb
    )


def stored_samples(settings: Settings) -> int:
    with Store.open(settings=settings) as store:
        return int(store.stats()["samples"])


# -- the database lock ------------------------------------------------------------------------
def test_flow_lock_admits_one_holder_per_flow(db_target: DbTarget, tmp_path: Path) -> None:
    settings = target_settings(db_target, tmp_path)
    with flow_lock(settings, "rollup") as first:
        assert first is True
        with flow_lock(settings, "rollup") as second, flow_lock(settings, "detect") as other:
            assert second is False
            assert other is True
        assert "rollup" in lock_holders(settings)
    with flow_lock(settings, "rollup") as again:
        assert again is True
    assert "rollup" not in lock_holders(settings)


HOLDER = """
import sys, time
from metricmill.settings import load_settings
from storage.locks import flow_lock
settings = load_settings(database_url=sys.argv[1], home=sys.argv[2], timescaledb="off")
with flow_lock(settings, "ingest") as held:
    print("held" if held else "busy", flush=True)
    time.sleep(600)
"""


def wait_for_lock(settings: Settings, name: str, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with flow_lock(settings, name) as held:
            if held:
                return True
        time.sleep(0.2)
    return False


def test_lock_of_a_killed_process_is_released(db_target: DbTarget, tmp_path: Path) -> None:
    settings = target_settings(db_target, tmp_path)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, settings.database_url, str(settings.home)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "held"
        with flow_lock(settings, "ingest") as held:
            assert held is False  # another process holds it
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)
        assert wait_for_lock(settings, "ingest"), "a dead owner's lock was not released"
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


# -- flows skip instead of overlapping --------------------------------------------------------
@pytest.mark.usefixtures("prefect_server")
def test_ingest_run_is_skipped_while_another_run_holds_the_lock(settings: Settings) -> None:
    with flow_lock(settings, "ingest") as held:
        assert held
        state = asyncio.run(ingest(samples=SAMPLES, landing=False, scrape=False, return_state=True))
    assert state.type == StateType.COMPLETED
    assert state.name == SKIPPED
    assert "another ingest run is in progress" in (state.message or "")
    assert stored_samples(settings) == 0

    state = asyncio.run(ingest(samples=SAMPLES, landing=False, scrape=False, return_state=True))
    assert state.name == "Completed"
    assert stored_samples(settings) == 2


@pytest.mark.usefixtures("prefect_server")
def test_concurrent_runs_one_writes_the_other_skips(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two real runs at once: the second starts while the first still holds the lock."""
    release = threading.Event()
    entered = threading.Event()
    states: dict[str, Any] = {}

    def first() -> None:
        # The first run is held inside its lock by a slow scrape target: an HTTP server that
        # answers only when released.
        states["first"] = asyncio.run(
            ingest(samples=SAMPLES, landing=False, scrape=True, return_state=True)
        )

    class Slow(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            entered.set()
            release.wait(60)
            body = b"up 1\n"
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Slow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("METRICMILL_SCRAPE_TARGETS", f'["http://127.0.0.1:{server.server_port}/m"]')
    try:
        runner = threading.Thread(target=first)
        runner.start()
        assert entered.wait(120), "the first run never reached its scrape"
        second = asyncio.run(
            ingest(samples=SAMPLES, landing=False, scrape=False, return_state=True)
        )
        release.set()
        runner.join(120)
    finally:
        release.set()
        server.shutdown()
    assert second.name == SKIPPED
    assert states["first"].name == "Completed"
    assert stored_samples(settings) == len(SAMPLES) + 1  # the first run's samples and its scrape


# -- deployments ------------------------------------------------------------------------------
@pytest.fixture
def cleanup_deployments() -> Iterator[list[Any]]:
    """Deployment ids to delete from the shared test server afterwards."""
    created: list[Any] = []
    yield created
    with get_client(sync_client=True) as client:
        for deployment_id in created:
            client.delete_deployment(deployment_id)


@pytest.mark.usefixtures("prefect_server")
def test_every_available_flow_is_registered_with_its_schedule(
    cleanup_deployments: list[Any],
) -> None:
    deployments, missing = build_deployments()
    served = {d.flow_name for d in deployments}
    assert served | set(missing) == set(FLOW_NAMES)
    assert not served & set(missing)
    assert "ingest" in served
    for name in missing:  # left out only because its module does not exist (yet)
        assert not (REPO / "flows" / f"{name}.py").exists()
    for deployment in deployments:
        cleanup_deployments.append(deployment.apply())
    with get_client(sync_client=True) as client:
        for schedule in SCHEDULES:
            if schedule.flow not in served:
                continue
            registered = client.read_deployment_by_name(schedule.full_name)
            assert [s.schedule.cron for s in registered.schedules] == [schedule.cron]  # type: ignore[union-attr]
            assert all(s.active for s in registered.schedules)
            assert registered.global_concurrency_limit is not None
            assert registered.global_concurrency_limit.limit == 1
            assert registered.concurrency_options is not None
            assert registered.concurrency_options.collision_strategy.value == "CANCEL_NEW"
            assert registered.description == schedule.description
            assert set(registered.tags) == set(schedule.tags)
            assert "samples" in registered.parameter_openapi_schema["properties"] or (
                schedule.flow != "ingest"
            )


def test_a_flow_without_a_module_is_left_out() -> None:
    assert load_flow("no_such_flow_module") is None
    assert load_flow("ingest") is ingest


def test_prefect_yaml_matches_the_schedule_table() -> None:
    raw = yaml.safe_load((REPO / "prefect.yaml").read_text(encoding="utf-8"))
    model = PrefectYamlModel.model_validate(raw)
    by_entrypoint = {d.entrypoint: d for d in model.deployments}
    assert len(by_entrypoint) == len(SCHEDULES)
    for schedule in SCHEDULES:
        deployment = by_entrypoint[schedule.entrypoint]
        assert deployment.name == schedule.deployment
        assert deployment.schedules is not None
        assert [s.cron for s in deployment.schedules] == [schedule.cron]  # type: ignore[union-attr]
        assert deployment.description is not None
        assert " ".join(deployment.description.split()) == schedule.description
        assert deployment.tags == list(schedule.tags)
        limit = deployment.concurrency_limit
        assert limit is not None and not isinstance(limit, int)
        assert (limit.limit, limit.collision_strategy) == (1, "CANCEL_NEW")
        assert deployment.work_pool is not None and deployment.work_pool.name == "metricmill"
        assert (REPO / schedule.entrypoint.split(":")[0]).exists() or schedule.flow != "ingest"
    assert model.pull and "prefect.deployments.steps.set_working_directory" in model.pull[0]


# -- piled-up runs ----------------------------------------------------------------------------
def scheduled_runs(deployment_id: Any, minutes_ago: list[int]) -> list[Any]:
    now = datetime.now(UTC)
    with get_client(sync_client=True) as client:
        return [
            client.create_flow_run_from_deployment(
                deployment_id,
                state=Scheduled(scheduled_time=now - timedelta(minutes=m)),
                parameters={"samples": SAMPLES, "landing": False, "scrape": False},
            )
            for m in minutes_ago
        ]


def state_of(run_id: Any) -> Any:
    with get_client(sync_client=True) as client:
        return client.read_flow_run(run_id).state


@pytest.mark.usefixtures("prefect_server")
def test_sweep_skips_piled_up_runs_except_the_newest(cleanup_deployments: list[Any]) -> None:
    name = f"pile-{uuid.uuid4().hex[:8]}"
    deployment_id = ingest.to_deployment(name=name).apply()  # type: ignore[union-attr]
    cleanup_deployments.append(deployment_id)
    oldest, middle, newest = scheduled_runs(deployment_id, [30, 20, 10])
    future = scheduled_runs(deployment_id, [-60])[0]  # not due yet: left alone

    assert sweep_piled_runs([f"ingest/{name}"]) == 2
    for run in (oldest, middle):
        state = state_of(run.id)
        assert state.type == StateType.CANCELLED and state.name == SKIPPED
        assert newest.name in state.message
    assert state_of(newest.id).type == StateType.SCHEDULED
    assert state_of(future.id).type == StateType.SCHEDULED
    assert sweep_piled_runs([f"ingest/{name}"]) == 0  # nothing left to skip


@pytest.mark.usefixtures("prefect_server")
def test_a_piled_up_run_that_starts_skips_itself(
    settings: Settings, cleanup_deployments: list[Any]
) -> None:
    name = f"pile-{uuid.uuid4().hex[:8]}"
    deployment_id = ingest.to_deployment(name=name).apply()  # type: ignore[union-attr]
    cleanup_deployments.append(deployment_id)
    older, newer = scheduled_runs(deployment_id, [20, 10])
    parameters = {"samples": SAMPLES, "landing": False, "scrape": False}

    state = asyncio.run(
        run_flow(ingest, flow_run=older, parameters=parameters, return_type="state")
    )
    assert state.name == SKIPPED  # type: ignore[union-attr]
    assert newer.name in (state.message or "")  # type: ignore[union-attr]
    assert stored_samples(settings) == 0

    state = asyncio.run(
        run_flow(ingest, flow_run=newer, parameters=parameters, return_type="state")
    )
    assert state.name == "Completed"  # type: ignore[union-attr]
    assert stored_samples(settings) == 2


@pytest.mark.usefixtures("prefect_server")
def test_prefect_yaml_deploys_to_a_process_work_pool(cleanup_deployments: list[Any]) -> None:
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.settings import PREFECT_API_URL

    with get_client(sync_client=True) as client, contextlib.suppress(ObjectAlreadyExists):
        client.create_work_pool(WorkPoolCreate(name="metricmill", type="process"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env["PREFECT_API_URL"] = str(PREFECT_API_URL.value())
    done = subprocess.run(
        [str(Path(sys.executable).parent / "prefect"), "--no-prompt", "deploy", "--all"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    with get_client(sync_client=True) as client:
        registered = {s.full_name: client.read_deployment_by_name(s.full_name) for s in SCHEDULES}
        deployment = registered["ingest/every-minute"]
    cleanup_deployments.extend(d.id for d in registered.values())
    assert done.returncode == 0, done.stdout + done.stderr
    for schedule in SCHEDULES:
        assert registered[schedule.full_name].work_pool_name == "metricmill"
        assert [s.schedule.cron for s in registered[schedule.full_name].schedules] == [  # type: ignore[union-attr]
            schedule.cron
        ]
    assert deployment.work_pool_name == "metricmill", done.stdout + done.stderr
    assert deployment.entrypoint == "flows/ingest.py:ingest"
    assert [s.schedule.cron for s in deployment.schedules] == ["* * * * *"]  # type: ignore[union-attr]
    assert deployment.concurrency_options is not None
    assert deployment.concurrency_options.collision_strategy.value == "CANCEL_NEW"
    assert deployment.pull_steps == [
        {
            "prefect.deployments.steps.set_working_directory": {
                "directory": "{{ $METRICMILL_CHECKOUT }}"
            }
        }
    ]


def test_rollup_runs_after_the_boundary_ingest_and_detect_after_the_rollup() -> None:
    from cronsim import CronSim

    from deployments.schedules import schedule_for

    start = datetime(2026, 1, 5, 0, 0, tzinfo=UTC)

    def minutes(flow: str) -> list[int]:
        fires = CronSim(schedule_for(flow).cron, start)
        return [next(fires).minute for _ in range(12)]

    rollup, detect = minutes("rollup"), minutes("detect")
    # Every five minutes, never on a boundary minute: the ingest run at the boundary (which
    # writes the closing minute of the 5m bucket) has a minute before the rollup starts.
    assert sorted(rollup) == [m + 1 for m in range(0, 60, 5)]
    assert all(m % 5 != 0 for m in rollup)
    assert detect == [m + 2 for m in rollup]  # two minutes after each rollup
