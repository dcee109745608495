"""Ingestion follows each series' raw retention rule, not only the default horizon.

A rule keeping a metric 7 days means retention archives (and deletes) its older hours; a late
sample for such an hour must go to quarantine as timestamp_too_old, or a rollup would rebuild
the archived hour from the late sample alone. Other series keep the default (30 days), and a
legal hold keeps everything.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from flows.ingest import ingest
from metricmill.settings import load_settings
from storage import retention
from storage.store import Store
from tests.dbtargets import DbTarget
from tests.settings_env import isolate_settings

pytestmark = pytest.mark.usefixtures("prefect_server")

NOW = datetime.now(UTC).replace(second=0, microsecond=0)


def test_samples_older_than_their_series_rule_are_quarantined(
    db_target: DbTarget, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    if db_target.name == "timescaledb":
        pytest.skip("the check is above the storage layer: SQLite and PostgreSQL suffice")
    isolate_settings(monkeypatch, settle_seconds=0, timescaledb=db_target.timescaledb)
    settings = load_settings(home=tmp_path, database_url=db_target.url)
    with Store.open(settings=settings) as store:
        retention.add_rule(store.backend, "container_*", 7)
        retention.add_rule(store.backend, "container_cpu", labels={"host": "held"},
                           legal_hold=True)  # fmt: skip
    ten_days_ago = NOW - timedelta(days=10)
    rows = [
        ("container_cpu", {"host": "a"}, ten_days_ago, 1.0),  # past its 7-day rule
        ("container_cpu", {"host": "a"}, NOW - timedelta(days=2), 2.0),
        ("container_cpu", {"host": "held"}, ten_days_ago, 3.0),  # held: kept
        ("node_load", {"host": "a"}, ten_days_ago, 4.0),  # default 30 days
    ]
    landing = settings.landing
    landing.mkdir(parents=True, exist_ok=True)
    (landing / "late.ndjson").write_text(
        "".join(
            json.dumps({"metric": m, "labels": lb, "ts": ts.isoformat(), "value": v}) + "\n"
            for m, lb, ts, v in rows
        )
    )

    state = asyncio.run(ingest(home=str(tmp_path), database_url=db_target.url, scrape=False,
                   return_state=True))  # fmt: skip

    assert state.is_completed(), state
    with Store.open(settings=settings) as store:
        quarantine = store.quarantine(limit=100)
        reasons = Counter(quarantine["reason"])
        assert reasons == Counter({"timestamp_too_old": 1})
        window = (NOW - timedelta(days=20), NOW + timedelta(minutes=1))
        kept = store.query("container_cpu", None, *window)
        assert sorted(kept["value"]) == [2.0, 3.0]
        assert list(store.query("node_load", None, *window)["value"]) == [4.0]


def test_programmatic_samples_follow_the_rule_too(
    db_target: DbTarget, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    if db_target.name != "sqlite":
        pytest.skip("the check is above the storage layer: one backend suffices here")
    isolate_settings(monkeypatch, settle_seconds=0, timescaledb=db_target.timescaledb)
    settings = load_settings(home=tmp_path, database_url=db_target.url)
    with Store.open(settings=settings) as store:
        retention.add_rule(store.backend, "container_*", 7)
    samples = [
        {"metric": "container_cpu", "labels": {"host": "a"}, "ts": ts.isoformat(), "value": v}
        for ts, v in ((NOW - timedelta(days=9), 1.0), (NOW - timedelta(hours=1), 2.0))
    ]

    state = asyncio.run(ingest(samples=samples, landing=False, scrape=False, home=str(tmp_path),
                   database_url=db_target.url, return_state=True))  # fmt: skip

    assert state.is_completed(), state
    with Store.open(settings=settings) as store:
        assert list(store.quarantine(limit=10)["reason"]) == ["timestamp_too_old"]
        window = (NOW - timedelta(days=20), NOW + timedelta(minutes=1))
        assert list(store.query("container_cpu", None, *window)["value"]) == [2.0]
