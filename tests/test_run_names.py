"""Flow run names (flows/naming.py): unique, and fixed once shown."""

from __future__ import annotations

import asyncio
import re
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from prefect import get_client
from prefect.client.schemas.objects import FlowRun
from prefect.flow_engine import run_flow

from flows.ingest import ingest
from flows.naming import run_name_of
from tests.settings_env import isolate_settings
from tests.test_deployments import cleanup_deployments

__all__ = ["cleanup_deployments"]  # the fixture, imported for the tests below

DIRECT = re.compile(r"ingest-(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)Z-([0-9a-f]{6})")


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    isolate_settings(monkeypatch, home=tmp_path / "home")
    return tmp_path / "home"


def read_run(run_id: Any) -> FlowRun:
    with get_client(sync_client=True) as client:
        return client.read_flow_run(run_id)


@pytest.mark.usefixtures("prefect_server", "home")
def test_direct_calls_are_named_by_their_start_and_id() -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    states = [asyncio.run(ingest(landing=False, scrape=False, return_state=True)) for _ in range(2)]
    after = datetime.now(UTC)
    runs = [read_run(s.state_details.flow_run_id) for s in states]
    for run in runs:
        found = DIRECT.fullmatch(run.name)
        assert found, run.name
        started = datetime.fromisoformat(found[1]).replace(tzinfo=UTC)
        assert before <= started <= after
        assert found[2] == run.id.hex[-6:]
    assert runs[0].name != runs[1].name


@pytest.mark.usefixtures("prefect_server", "home")
def test_a_run_made_by_hand_keeps_its_name(cleanup_deployments: list[Any]) -> None:
    name = f"names-{uuid.uuid4().hex[:8]}"
    deployment_id = ingest.to_deployment(name=name).apply()  # type: ignore[union-attr]
    cleanup_deployments.append(deployment_id)
    parameters = {"landing": False, "scrape": False}
    with get_client(sync_client=True) as client:
        created = client.create_flow_run_from_deployment(deployment_id, parameters=parameters)
    state = asyncio.run(
        run_flow(ingest, flow_run=created, parameters=parameters, return_type="state")
    )
    assert state.is_completed()  # type: ignore[union-attr]
    assert read_run(created.id).name == created.name  # what the CLI or UI printed


def test_a_scheduled_run_is_named_by_its_slot() -> None:
    slot = datetime(2026, 12, 2, 6, 4, tzinfo=UTC)
    deployment_id = uuid.uuid4()
    scheduled = FlowRun(
        flow_id=uuid.uuid4(),
        name="brisk-otter",
        deployment_id=deployment_id,
        auto_scheduled=True,
        expected_start_time=slot,
        start_time=slot - timedelta(seconds=9),  # served runs are claimed a little early
    )
    assert run_name_of("ingest", scheduled) == "ingest-2026-12-02T06:04:00Z"
    following = scheduled.model_copy(update={"expected_start_time": slot + timedelta(minutes=1)})
    assert run_name_of("ingest", following) == "ingest-2026-12-02T06:05:00Z"
    by_hand = scheduled.model_copy(update={"auto_scheduled": False})
    assert run_name_of("ingest", by_hand) == "brisk-otter"
