"""Step queries read the coarsest rollup that fits, raw samples for what is not rolled up yet,
and answer exactly as a query over raw samples would; rate and increase survive counter resets."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from metricmill.cli import app
from metricmill.errors import QueryError
from metricmill.settings import load_settings
from metricmill.types import datetime_to_us
from storage.rollup import plan_query
from storage.store import AGGREGATIONS, Store
from tests.dbtargets import DbTarget
from tests.settings_env import isolate_settings

NOW = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
DAY = NOW - timedelta(days=3)  # midnight-free start: the day buckets are partial
START = DAY.replace(hour=0) + timedelta(hours=1)
END = START + timedelta(hours=30)
HOUR = timedelta(hours=1)


@pytest.fixture
def store(db_target: DbTarget, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Store]:
    isolate_settings(monkeypatch, home=tmp_path, timescaledb=db_target.timescaledb)
    with Store.open(settings=load_settings(database_url=db_target.url)) as opened:
        yield opened


def gauge(store: Store, start: datetime, end: datetime, *, seed: int) -> None:
    rng = np.random.default_rng(seed)
    times = list(pd.date_range(start, end, freq="20s", inclusive="left", tz=UTC))
    for host in ("a", "b"):
        values = rng.integers(0, 8000, size=len(times)) / 8.0
        store.write_samples(
            pd.DataFrame({"metric": "cpu", "labels": [{"host": host}] * len(times),
                          "ts": times, "value": values})
        )  # fmt: skip


def ids(store: Store) -> list[int]:
    return [int(i) for i in store.series("cpu")["series_id"]]


def plan(store: Store, start: datetime, end: datetime, step: timedelta, level: str | None = None):
    step_us = int(step / timedelta(microseconds=1))
    return plan_query(
        store.backend, ids(store), datetime_to_us(start), datetime_to_us(end), step_us, level
    )


def assert_same(got: pd.DataFrame, want: pd.DataFrame, agg: str) -> None:
    assert len(got) == len(want) > 0
    assert [json.dumps(x, sort_keys=True) for x in got["labels"]] == [
        json.dumps(x, sort_keys=True) for x in want["labels"]
    ]
    assert got["ts"].tolist() == want["ts"].tolist()
    if agg in ("avg", "stddev", "rate"):
        np.testing.assert_allclose(got["value"], want["value"], rtol=1e-9, atol=1e-12)
    else:
        assert got["value"].tolist() == want["value"].tolist()


def test_the_coarsest_dividing_level_serves_and_answers_as_raw_does(store: Store) -> None:
    gauge(store, START, END, seed=1)
    store.rollup()
    assert plan(store, START, END, HOUR).level == "1h"
    assert plan(store, START, END, timedelta(minutes=15)).level == "5m"
    assert plan(store, START, END, timedelta(minutes=3)).level == "1m"
    assert plan(store, START, END, timedelta(seconds=90)).level == "raw"
    assert plan(store, DAY.replace(hour=0), END, timedelta(days=1)).level == "1d"
    # the first, partial step comes from raw samples, the whole steps from the rollup
    unaligned = START + timedelta(minutes=7, seconds=13)
    parts = plan(store, unaligned, END, HOUR).parts
    assert parts[0] == ("raw", datetime_to_us(unaligned), datetime_to_us(START + HOUR))
    assert parts[1][0] == "1h"
    for agg in AGGREGATIONS:
        for step, start in (("1h", unaligned), ("15m", START), ("1d", START)):
            got = store.query("cpu", None, start, END, step=step, agg=agg)
            want = store.query("cpu", None, start, END, step=step, agg=agg, level="raw")
            assert_same(got, want, agg)


def test_not_yet_rolled_up_data_is_read_raw(store: Store) -> None:
    gauge(store, START, START + 10 * HOUR, seed=2)
    store.rollup()
    gauge(store, START + 10 * HOUR, START + 12 * HOUR + timedelta(minutes=30), seed=3)
    query_plan = plan(store, START, END, HOUR)
    assert query_plan.parts[0] == ("1h", datetime_to_us(START), datetime_to_us(START + 10 * HOUR))
    assert query_plan.parts[-1] == ("raw", datetime_to_us(START + 10 * HOUR), datetime_to_us(END))
    got = store.query("cpu", None, START, END, step="1h", agg="count")
    assert len(got) == 2 * 13  # 12 whole hours and the half hour, for both hosts
    assert got["value"].sum() == 2 * (12 * 180 + 90)
    assert_same(got, store.query("cpu", None, START, END, step="1h", agg="count", level="raw"),
                "count")  # fmt: skip
    # a 30-day-late sample makes its hour pending: that hour onwards is read raw until rolled up
    late = START - timedelta(days=1)
    store.write_samples([{"metric": "cpu", "labels": {"host": "a"}, "ts": late, "value": 5.0}])
    assert plan(store, late, END, HOUR).level == "raw"
    store.rollup()
    assert plan(store, late - 3 * HOUR, END, HOUR).level == "1h"
    got = store.query("cpu", None, late - 3 * HOUR, END, step="1h", agg="sum")
    assert_same(got, store.query("cpu", None, late - 3 * HOUR, END, step="1h", agg="sum",
                                 level="raw"), "sum")  # fmt: skip


def test_a_forced_level_is_read_alone(store: Store) -> None:
    gauge(store, START, START + 3 * HOUR, seed=4)
    store.rollup()
    gauge(store, START + 3 * HOUR, START + 4 * HOUR, seed=5)  # pending, not in 5m yet
    forced = store.query("cpu", {"host": "a"}, START, START + 4 * HOUR, level="5m", agg="count")
    assert forced["ts"].iloc[1] - forced["ts"].iloc[0] == pd.Timedelta(minutes=5)
    assert len(forced) == 3 * 12 and set(forced["value"]) == {15.0}
    assert plan(store, START, END, HOUR, level="1m").parts == [
        ("1m", datetime_to_us(START), datetime_to_us(END))
    ]
    with pytest.raises(QueryError, match="whole number of 1h"):
        store.query("cpu", None, START, END, step="30m", level="1h")
    with pytest.raises(QueryError, match="unknown level"):
        store.query("cpu", None, START, END, step="1h", level="2h")


@pytest.mark.parametrize("seed", range(4))
def test_random_windows_steps_and_aggregations_answer_as_raw_does(store: Store, seed: int) -> None:
    """Random data (gaps, a counter with resets), rolled up in part, then rewrites of some of
    its points, rolled up or not; then random windows (on and off bucket edges), steps and
    aggregations read through the levels must answer exactly as the same query over raw."""
    rng = np.random.default_rng(500 + seed)
    times = pd.date_range(START, END, freq=f"{int(rng.choice([7, 20, 60]))}s", inclusive="left",
                          tz=UTC)  # fmt: skip
    for host in ("a", "b"):
        kept = times[rng.random(len(times)) < rng.uniform(0.3, 1.0)]  # gaps
        values = np.cumsum(rng.integers(0, 80, size=len(kept)) / 8.0)
        resets = rng.choice(len(kept), size=3, replace=False)
        for at in np.sort(resets):
            values[at:] -= values[at] - rng.integers(0, 8) / 8.0
        store.write_samples(pd.DataFrame({"metric": "cpu", "labels": [{"host": host}] * len(kept),
                                          "ts": list(kept), "value": values}))  # fmt: skip
    store.rollup(max_chunks=int(rng.integers(2, 30)))  # part of it rolled up, the rest pending
    old = store.query("cpu", {"host": "a"}, START, END)
    pick = np.sort(rng.choice(len(old), size=40, replace=False))
    store.write_samples(pd.DataFrame({"metric": "cpu", "labels": [{"host": "a"}] * 40,
                                      "ts": list(old["ts"].iloc[pick]),
                                      "value": rng.integers(0, 800, size=40) / 8.0}))  # fmt: skip
    if rng.random() < 0.5:
        store.rollup()
    span_us = int((END - START) / timedelta(microseconds=1))
    for _ in range(12):
        step = str(rng.choice(["1m", "2m", "5m", "10m", "15m", "1h", "3h", "1d"]))
        start_off = int(rng.integers(0, span_us // 2))
        if rng.random() < 0.5:  # on a whole hour
            start_off -= start_off % 3_600_000_000
        start = START + timedelta(microseconds=start_off)
        end = start + timedelta(microseconds=int(rng.integers(3_600_000_000, span_us)))
        for agg in AGGREGATIONS:
            got = store.query("cpu", None, start, end, step=step, agg=agg)
            want = store.query("cpu", None, start, end, step=step, agg=agg, level="raw")
            assert_same(got, want, agg)


def counter_truth(times: list[datetime], values: np.ndarray, step: timedelta) -> list[float]:
    """Per step bucket, the Prometheus-style increase: each sample's rise over the one before,
    a drop counting as a reset from 0."""
    delta = np.diff(values)
    rise = np.where(delta >= 0, delta, values[1:])
    step_us = int(step / timedelta(microseconds=1))
    bucket = np.array([datetime_to_us(t) // step_us for t in times])
    totals: dict[int, float] = {int(b): 0.0 for b in bucket}
    for b, r in zip(bucket[1:], rise, strict=True):
        totals[int(b)] += float(r)
    return [totals[b] for b in sorted(totals)]


def test_rate_and_increase_handle_counter_resets(store: Store) -> None:
    times = list(pd.date_range(START, START + 6 * HOUR, freq="30s", inclusive="left", tz=UTC))
    rng = np.random.default_rng(9)
    values = np.cumsum(rng.integers(1, 80, size=len(times)) / 8.0)
    boundary = 2 * 120  # the first sample of hour 2: a reset right at a bucket edge
    values[boundary:] -= values[boundary] - 1.5
    inside = 4 * 120 + 50  # mid hour 4, staying below the hour's first value
    values[inside:] -= values[inside] - 0.25
    assert values[4 * 120 + 119] < values[4 * 120]
    frame = pd.DataFrame(
        {"metric": "requests_total", "labels": [{"job": "api"}] * len(times), "ts": times,
         "value": values}
    )  # fmt: skip
    store.write_samples(frame)
    store.rollup()
    truth = counter_truth(times, values, HOUR)
    window = (START, START + 6 * HOUR)
    for level in (None, "raw", "5m"):
        increase = store.query("requests_total", None, *window, step="1h", agg="increase",
                               level=level)  # fmt: skip
        assert increase["value"].tolist() == truth
        rate = store.query("requests_total", None, *window, step="1h", agg="rate", level=level)
        np.testing.assert_allclose(rate["value"], np.array(truth) / 3600, rtol=1e-12)
    assert min(truth) > 0  # the resets did not turn into negative increases


def ndjson(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_cli_query_takes_level_and_counter_aggregations(
    db_target: DbTarget, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    if db_target.name != "sqlite":
        pytest.skip("the CLI option is backend-blind")
    gauge(store, START, START + 2 * HOUR, seed=6)
    store.rollup()
    window = ["--start", START.isoformat(), "--end", (START + 2 * HOUR).isoformat()]
    common = ["--database", db_target.url, "query", 'cpu{host="a"}', *window, "--format", "json"]
    runner = CliRunner()
    result = runner.invoke(app, [*common, "--step", "1h", "--agg", "count", "--level", "1h"])
    assert result.exit_code == 0, result.output
    assert [p["value"] for p in ndjson(result.output)] == [180.0, 180.0]
    result = runner.invoke(app, [*common, "--step", "1h", "--agg", "increase"])
    assert result.exit_code == 0, result.output
    assert len(ndjson(result.output)) == 2
    result = runner.invoke(app, [*common, "--step", "1h", "--level", "3h"])
    assert result.exit_code == 1
    assert result.output.strip().startswith("error: unknown level '3h'")
