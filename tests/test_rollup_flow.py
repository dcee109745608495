"""The `rollup` Prefect flow: recomputes pending ranges, publishes `rollup-summary`, and fails
loudly when what it wrote breaks the rollup-output contract."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import numpy as np
import pandas as pd
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    ArtifactFilterKey,
)
from prefect.client.schemas.objects import Artifact
from pydantic import TypeAdapter

from expectations.rollup_output import RollupOutputError, validate_rollup_output
from flows.rollup import rollup
from metricmill.settings import load_settings
from metricmill.types import datetime_to_us
from storage.store import Store
from tests.dbtargets import DbTarget
from tests.settings_env import isolate_settings

pytestmark = pytest.mark.usefixtures("prefect_server")

DAY_START = (datetime.now(UTC) - timedelta(days=2)).replace(hour=0, minute=0, second=0,
                                                             microsecond=0)  # fmt: skip


@pytest.fixture
def store(db_target: DbTarget, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Store]:
    isolate_settings(monkeypatch, home=tmp_path, timescaledb=db_target.timescaledb)
    with Store.open(settings=load_settings(database_url=db_target.url)) as opened:
        yield opened


def write_hour(store: Store, hour: int, *, seed: int) -> None:
    start = DAY_START + timedelta(hours=hour)
    times = list(pd.date_range(start, start + timedelta(hours=1), freq="30s", inclusive="left"))
    values = np.random.default_rng(seed).integers(0, 800, size=len(times)) / 8.0
    store.write_samples(
        pd.DataFrame({"metric": "cpu", "labels": [{"host": "a"}] * len(times), "ts": times,
                      "value": values})
    )  # fmt: skip


def artifacts(flow_run_id: UUID) -> list[Artifact]:
    artifact_filter = ArtifactFilter(
        key=ArtifactFilterKey(any_=["rollup-summary"]),
        flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]),
    )
    with get_client(sync_client=True) as client:
        response = client.request(
            "POST",
            "/artifacts/filter",
            json={"artifacts": artifact_filter.model_dump(mode="json", exclude_unset=True)},
        )
    return TypeAdapter(list[Artifact]).validate_python(response.json())


def run(store: Store, **kwargs: Any) -> Any:
    return rollup(
        database_url=store.settings.database_url,
        home=str(store.settings.home),
        return_state=True,
        **kwargs,
    )


def test_the_flow_rolls_up_and_publishes_its_summary(store: Store) -> None:
    write_hour(store, 3, seed=1)
    write_hour(store, 4, seed=2)
    state = run(store)
    assert state.is_completed(), state
    rows = {row["level"]: row for row in state.result()}
    assert rows["1m"]["rows"] == 120 and rows["5m"]["rows"] == 24
    assert rows["1h"]["rows"] == 2 and rows["1d"]["rows"] == 1
    assert rows["1m"]["rows_checked"] == 120
    assert rows["1d"]["from"] == DAY_START.isoformat()
    assert rows["1m"]["pending_left"] == 0
    newest = DAY_START + timedelta(hours=4, minutes=59)
    assert rows["1m"]["newest_1m_bucket"] == newest.isoformat()
    expected_lag = (datetime.now(UTC) - newest - timedelta(minutes=1)).total_seconds()
    assert abs(rows["1m"]["lag_seconds"] - expected_lag) < 120
    flow_run_id = state.state_details.flow_run_id
    found = artifacts(flow_run_id)
    assert [a.key for a in found] == ["rollup-summary"]
    assert found[0].type == "table"
    assert "lag" in (found[0].description or "")
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(flow_run_id)
    # a direct call: the flow, its start to the second and the run id's last six hex digits
    assert re.fullmatch(r"rollup-\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ-[0-9a-f]{6}", flow_run.name)
    assert flow_run.name.endswith(flow_run.id.hex[-6:])
    # a second run finds nothing pending and writes nothing
    again = run(store)
    assert again.is_completed()
    assert sum(row["rows"] for row in again.result()) == 0


def test_a_corrupted_rollup_fails_the_run_loudly(db_target: DbTarget, store: Store) -> None:
    if db_target.name != "sqlite":
        pytest.skip("the contract check is backend-blind: one backend suffices")
    write_hour(store, 3, seed=3)
    write_hour(store, 5, seed=4)
    store.rollup()
    # Damage hour 3's 1h row; hour 5 then changes, so the run rebuilds the day from both hours.
    store.backend.execute(
        f"UPDATE rollup_1h SET sum = sum + 1e12 WHERE bucket = {store.backend.ts_in}",
        (datetime_to_us(DAY_START + timedelta(hours=3)),),
    )
    write_hour(store, 5, seed=5)
    state = run(store)
    assert state.is_failed()
    with pytest.raises(RollupOutputError, match=r"rollup 1d output broke .*avg <= max"):
        state.result()


def test_the_suite_catches_min_above_max() -> None:
    minute = 60_000_000
    good = pd.DataFrame(
        {"series_id": [1, 1], "bucket": [0, minute], "count": [2, 1], "sum": [3.0, 5.0],
         "sum_sq": [5.0, 25.0], "min": [1.0, 5.0], "max": [2.0, 5.0], "first_ts": [0, minute],
         "last_ts": [10, minute]}
    )  # fmt: skip
    assert validate_rollup_output(good, "1m").ok
    bad = good.copy()
    bad.loc[1, ["min", "max"]] = [6.0, 4.0]
    with pytest.raises(RollupOutputError, match="min <= max: 1 rows"):
        validate_rollup_output(bad, "1m")
    misaligned = good.copy()
    misaligned.loc[1, ["bucket", "first_ts", "last_ts"]] = [minute + 1, minute + 1, minute + 1]
    with pytest.raises(RollupOutputError, match="bucket aligned to level: 1 rows"):
        validate_rollup_output(misaligned, "1m")
