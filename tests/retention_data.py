"""Shared data for the retention and archive tests: a few series over forty days."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest

from metricmill.settings import Settings, load_settings
from storage.store import Store
from tests.dbtargets import DbTarget
from tests.settings_env import isolate_settings

NOW = datetime.now(UTC)
TODAY = NOW.replace(hour=0, minute=0, second=0, microsecond=0)
DAYS = 40
PER_DAY = 4  # samples per day, six hours apart
SERIES = [
    ("container_cpu_usage", {"host": "host_1", "container_id": "ctr-alpha-0001"}),
    ("container_cpu_usage", {"host": "host_2", "container_id": "ctr-bravo-0002"}),
    ("mem_used_bytes", {"host": "host_1"}),
]


def sample_frame(series: list[tuple[str, dict[str, str]]] = SERIES) -> pd.DataFrame:
    """PER_DAY samples a day for DAYS days up to today's midnight, for each series."""
    rows = []
    for n, (metric, labels) in enumerate(series):
        for step in range(DAYS * PER_DAY):
            ts = TODAY - timedelta(hours=6 * step + 3)
            rows.append({"metric": metric, "labels": labels, "ts": ts, "value": n * 1e4 + step})
    return pd.DataFrame(rows)


def make_settings(
    monkeypatch: pytest.MonkeyPatch, home: Path, target: DbTarget, **extra: object
) -> Settings:
    isolate_settings(monkeypatch, home=home, timescaledb=target.timescaledb, **extra)
    return load_settings(home=home, database_url=target.url)


def filled_store(settings: Settings) -> Store:
    """A store holding sample_frame(), with no pending rollup ranges (as after a rollup run)."""
    store = Store.open(settings=settings)
    store.write_samples(sample_frame(), source="test")
    store.backend.execute("DELETE FROM rollup_pending")
    return store


def remaining(store: Store, metric: str, labels: dict[str, str]) -> pd.DataFrame:
    return store.query(metric, labels, TODAY - timedelta(days=DAYS + 5), NOW)


def expected_rows(metric: str, labels: dict[str, str]) -> pd.DataFrame:
    frame = sample_frame()
    chosen = frame[(frame["metric"] == metric) & (frame["labels"].map(lambda x: x == labels))]
    return chosen.sort_values("ts").reset_index(drop=True)


def cutoff(days: int) -> datetime:
    return TODAY - timedelta(days=days)


def assert_archive_plus_database_is_everything(
    store: Store, settings: Settings, series: list[tuple[str, dict[str, str]]] = SERIES
) -> None:
    """The archive verifies, holds no row twice, and with what the database kept is exactly
    what was written: no sample lost, none duplicated."""
    from storage.archive import read_archive, verify_archive

    assert verify_archive(store.backend, settings.archive) == []
    for metric, labels in series:
        archived = read_archive(settings, metric, labels)
        assert not archived.duplicated(["series_key", "ts"]).any()
        both = pd.concat(
            [archived[["ts", "value"]], remaining(store, metric, labels)[["ts", "value"]]]
        )
        want = expected_rows(metric, labels)
        assert sorted(zip(both["ts"], both["value"], strict=True)) == sorted(
            zip(want["ts"], want["value"], strict=True)
        ), (metric, labels)
