"""The detect run's `detect-alert-plots` artifact: a picture of each alert the run opened, read
back from a real Prefect API after real baseline and detect runs on a SQLite store."""

from __future__ import annotations

import base64
import re
import struct
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from prefect import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    ArtifactFilterKey,
)
from prefect.client.schemas.objects import Artifact
from pydantic import TypeAdapter

from flows.baseline import baseline
from flows.detect import detect
from metricmill.settings import load_settings
from storage.store import Store
from tests.settings_env import isolate_settings
from tests.test_detect import seed_store

pytestmark = pytest.mark.usefixtures("prefect_server")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
IMAGE = re.compile(r"!\[alert (\d+)\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)")


def plot_artifacts(flow_run_id: UUID) -> list[Artifact]:
    artifact_filter = ArtifactFilter(
        key=ArtifactFilterKey(any_=["detect-alert-plots"]),
        flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]),
    )
    with get_client(sync_client=True) as client:
        response = client.request(
            "POST",
            "/artifacts/filter",
            json={"artifacts": artifact_filter.model_dump(mode="json", exclude_unset=True)},
        )
    return TypeAdapter(list[Artifact]).validate_python(response.json())


def run_detect(url: str, home: Path) -> tuple[UUID, dict[str, Any]]:
    state = detect(database_url=url, home=str(home), return_state=True)
    assert state.is_completed(), state
    report = state.result()
    assert isinstance(report, dict)
    flow_run_id = state.state_details.flow_run_id
    assert flow_run_id is not None
    return flow_run_id, report


def test_a_detect_run_that_opens_an_alert_attaches_its_picture(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path}/metrics.db"
    isolate_settings(monkeypatch, home=tmp_path)
    settings = load_settings(database_url=url, home=tmp_path)
    now_us = int(datetime.now(UTC).timestamp() * 1e6)
    with Store.open(settings=settings) as store:
        ids = seed_store(store, now_us)  # host b spikes for ten minutes
    baseline(database_url=url, home=str(tmp_path))

    run_id, report = run_detect(url, tmp_path)
    assert report["fired"] == 1
    with Store.open(settings=settings) as store:
        opened = store.backend.execute("SELECT alert_id, series_id FROM alerts")
    assert [sid for _, sid in opened] == [ids["b"]]
    alert_id = int(opened[0][0])

    artifacts = plot_artifacts(run_id)
    assert len(artifacts) == 1
    markdown = str(artifacts[0].data)
    images = IMAGE.findall(markdown)
    assert [int(i) for i, _ in images] == [alert_id]
    assert f"### Alert {alert_id} " in markdown
    assert '`api.errors{host="b"}`' in markdown  # the heading names the alert's series
    picture = base64.b64decode(images[0][1], validate=True)
    assert picture.startswith(PNG_SIGNATURE)
    width, height = struct.unpack(">II", picture[16:24])  # the IHDR chunk
    assert (width, height) == (640, 256)  # 8 x 3.2 inches at 80 dpi
    points = int(re.search(r"(\d+) points drawn", markdown).group(1))  # type: ignore[union-attr]
    assert points >= 30  # the alert's own series around it, not an empty frame

    # A run that opens nothing attaches no picture.
    quiet_id, quiet = run_detect(url, tmp_path)
    assert quiet["fired"] == 0
    assert plot_artifacts(quiet_id) == []
