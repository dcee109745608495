"""Reading samples back: windows, selectors, step aggregates, latest, series, stats, health."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pandas as pd
import pytest

from metricmill.errors import QueryError, SelectorError
from storage.schema import LATEST_VERSION
from storage.store import Store
from tests.dbtargets import DbTarget

T0 = datetime(2024, 5, 1, 10, 0, tzinfo=UTC)
WINDOW = {"start": T0 - timedelta(days=1), "end": T0 + timedelta(days=1)}


def sample(metric: str, seconds: float, value: float, **labels: str) -> dict[str, Any]:
    return {
        "metric": metric,
        "labels": labels,
        "ts": T0 + timedelta(seconds=seconds),
        "value": value,
    }


FIXTURE_ROWS = [
    *(
        sample("http_requests", s, v, host="a", env="prod", job="api")
        for s, v in [(0, 1.0), (60, 2.0), (120, 3.0), (180, 4.0)]
    ),
    sample("http_requests", 0, 10.0, host="b", env="dev", job="api-gw"),
    sample("http_requests", 60, 20.0, host="b", env="dev", job="api-gw"),
    sample("http_requests", 0, 100.0, host="c", env="prod"),
    sample("cpu_user", 0, 0.5, host="a"),
    sample("cpu_system", 0, 0.25, host="a"),
    sample("cpu_system", 30, 0.75, host="b"),
    sample("mem_free", -3600, 512.0, host="a"),
    sample("mem_free", 7200, 256.0, host="a"),
]


@pytest.fixture
def store(db_target: DbTarget) -> Iterator[Store]:
    with Store.open(db_target.url, timescaledb=db_target.timescaledb) as opened:
        opened.write_samples(FIXTURE_ROWS)
        yield opened


def hosts(frame: pd.DataFrame) -> set[str]:
    return {labels["host"] for labels in frame["labels"]}


def test_raw_query_window_is_half_open(store: Store) -> None:
    points = store.query(
        "http_requests",
        {"host": "a"},
        start=T0 + timedelta(seconds=60),
        end=T0 + timedelta(seconds=180),
    )

    assert points["ts"].tolist() == [T0 + timedelta(seconds=60), T0 + timedelta(seconds=120)]
    assert points["value"].tolist() == [2.0, 3.0]
    assert str(points["ts"].dt.tz) == "UTC"
    assert points["metric"].tolist() == ["http_requests"] * 2


def test_label_selectors_filter_series(store: Store) -> None:
    expected = {
        '{host="a"}': {"a"},
        '{env!="prod"}': {"b"},
        '{job=~"api"}': {"a"},  # anchored: api-gw does not match
        '{job=~"api.*"}': {"a", "b"},
        '{job!~"api.*"}': {"c"},  # no job label counts as the empty string
        '{job=""}': {"c"},
        '{job!=""}': {"a", "b"},
        '{env="prod", host!~"a|b"}': {"c"},
        'http_requests{env=~"pro.", job=~".*"}': {"a", "c"},
        '{host=~"A"}': set(),
    }

    found = {}
    for selector in expected:
        metric = None if selector.startswith("http_requests") else "http_requests"
        found[selector] = hosts(store.query(metric, selector, **WINDOW))

    assert found == expected


STEP_VALUES = np.random.default_rng(20240501).normal(50.0, 10.0, 200)
STEP_SECONDS = np.sort(
    np.random.default_rng(7).choice(np.arange(120, 3720), size=200, replace=False)
)


def test_step_aggregates_match_numpy(store: Store) -> None:
    store.write_samples(
        [
            sample("latency", float(s), float(v), host="a")
            for s, v in zip(STEP_SECONDS, STEP_VALUES, strict=True)
        ]
    )
    epoch_seconds = T0.timestamp() + STEP_SECONDS
    start, end = T0 + timedelta(minutes=2), T0 + timedelta(minutes=62)
    for step_seconds, step in [(300, "5m"), (420, "7m")]:
        frame = pd.DataFrame(
            {"bucket": epoch_seconds // step_seconds * step_seconds, "value": STEP_VALUES}
        )
        groups = frame.groupby("bucket")["value"]
        expected = {
            "avg": groups.mean(),
            "min": groups.min(),
            "max": groups.max(),
            "sum": groups.sum(),
            "count": groups.count().astype("float64"),
            "last": groups.last(),
            "stddev": groups.agg(lambda v: np.std(v.to_numpy(), ddof=0)),
        }
        starts = [datetime.fromtimestamp(b, UTC) for b in expected["avg"].index]
        assert starts[0] < start  # the first bucket starts on the epoch grid, before `start`
        for agg, values in expected.items():
            got = store.query("latency", start=start, end=end, step=step, agg=agg)
            assert got["ts"].tolist() == starts, (step, agg)
            np.testing.assert_allclose(
                got["value"].to_numpy(), values.to_numpy(), rtol=1e-9, err_msg=f"{step} {agg}"
            )
        default = store.query("latency", start=start, end=end, step=step)
        np.testing.assert_allclose(default["value"].to_numpy(), expected["avg"].to_numpy())


def test_latest_returns_the_newest_sample_of_each_series(store: Store) -> None:
    newest = store.latest("http_requests")

    by_host = {
        labels["host"]: (ts, value)
        for labels, ts, value in zip(newest["labels"], newest["ts"], newest["value"], strict=True)
    }
    assert by_host == {
        "a": (T0 + timedelta(seconds=180), 4.0),
        "b": (T0 + timedelta(seconds=60), 20.0),
        "c": (T0, 100.0),
    }
    assert hosts(store.latest("http_requests", '{env="prod"}')) == {"a", "c"}


def test_series_match_a_metric_glob_and_a_selector(store: Store) -> None:
    def names(frame: pd.DataFrame) -> set[tuple[str, str]]:
        pairs = zip(frame["metric"], frame["labels"], strict=True)
        return {(metric, labels["host"]) for metric, labels in pairs}

    assert names(store.series("cpu_*")) == {
        ("cpu_user", "a"),
        ("cpu_system", "a"),
        ("cpu_system", "b"),
    }
    assert names(store.series("cpu_*", '{host="b"}')) == {("cpu_system", "b")}
    assert names(store.series(None, 'cpu_system{host="a"}')) == {("cpu_system", "a")}
    assert names(store.series("*_free")) == {("mem_free", "a")}
    assert store.series("disk_*").empty
    mem = store.series("mem_free")
    assert mem["first_seen"].tolist() == [T0 - timedelta(hours=1)]
    assert mem["last_seen"].tolist() == [T0 + timedelta(hours=2)]


def test_label_equalities_narrow_the_series_read_in_the_database(store: Store) -> None:
    """A query of one series of a metric reads that series' row, not every series of the
    metric; label names a JSON path would have to quote and empty values still match."""
    found = store.backend.find_series("http_requests", {"host": "a", "env": "prod"})
    assert [labels["host"] for _, _, labels in found] == ["a"]
    assert store.backend.find_series("http_requests", {"host": "zz"}) == []
    assert len(store.backend.find_series("http_requests")) == 3

    store.write_samples(
        [sample("odd", 0, 1.0, **{'a-b."c': "x"}), sample("odd", 0, 2.0, **{'a-b."c': "y"})]
    )
    assert store.query("odd", {'a-b."c': "y"}, **WINDOW)["value"].tolist() == [2.0]
    assert hosts(store.query("http_requests", {"host": "c", "job": ""}, **WINDOW)) == {"c"}
    assert store.query("http_requests", {"host": "zz"}, **WINDOW).empty
    with pytest.raises(QueryError, match="no_such_metric"):
        store.query("no_such_metric", {"host": "a"}, **WINDOW)


def test_unknown_metric_is_a_query_error(store: Store) -> None:
    with pytest.raises(QueryError, match="no_such_metric"):
        store.query("no_such_metric", **WINDOW)
    with pytest.raises(QueryError):
        store.latest("no_such_metric")


def test_start_not_before_end_is_a_query_error(store: Store) -> None:
    with pytest.raises(QueryError):
        store.query("http_requests", start=T0 + timedelta(hours=1), end=T0)
    with pytest.raises(QueryError):
        store.query("http_requests", start=T0, end=T0)


def test_malformed_selector_is_a_selector_error(store: Store) -> None:
    for selector in ['{host="a"', "{host=a}", '{host=~"("}', "{host}"]:
        with pytest.raises(SelectorError):
            store.query("http_requests", selector, **WINDOW)


def test_stats_count_rows_series_and_time_bounds(store: Store) -> None:
    stats = store.stats()

    assert stats["series"] == 7
    assert stats["samples"] == len(FIXTURE_ROWS)
    assert stats["tables"]["samples"]["rows"] == len(FIXTURE_ROWS)
    assert stats["tables"]["ingest_batches"]["rows"] == 1
    assert stats["oldest_sample"] == T0 - timedelta(hours=1)
    assert stats["newest_sample"] == T0 + timedelta(hours=2)
    assert stats["schema_version"] == LATEST_VERSION


def test_health_reports_schema_version_and_backend_mode(store: Store, db_target: DbTarget) -> None:
    health = store.health()

    assert health.ok, health.problems
    assert health.schema_version == LATEST_VERSION
    assert health.backend_name == ("postgresql" if db_target.name == "postgres" else db_target.name)
    if db_target.name == "sqlite":
        assert health.details["journal_mode"] == "wal"
    elif db_target.name == "timescaledb":
        assert re.fullmatch(r"\d+\.\d+\.\d+.*", health.details["timescaledb"])
    else:
        assert str(health.details["timescaledb"]).startswith("off")
    assert store.stats()["tables"]["ingest_batches"]["rows"] == 1  # the probe left no row


def test_memory_store_writes_and_queries() -> None:
    with Store.memory() as store:
        report = store.write_samples(FIXTURE_ROWS)
        points = store.query("http_requests", {"host": "a"}, **WINDOW)
        assert report.written == len(FIXTURE_ROWS)
        assert points["value"].tolist() == [1.0, 2.0, 3.0, 4.0]
        assert store.health().ok
        assert store.stats()["samples"] == len(FIXTURE_ROWS)
