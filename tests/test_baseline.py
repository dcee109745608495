"""Seasonal baselines: season choice, trend, constant and young series, gaps, incidents left out,
per-metric models (a broken one is refitted), and the nightly `baseline` flow on every backend."""

from __future__ import annotations

import warnings
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from distributed import LocalCluster

import tasks.baseline_run
from flows.baseline import baseline
from metricmill.settings import load_settings
from storage import detection
from storage.store import Store
from tasks.backtest import buckets_of
from tasks.baseline import DAY_US, HOUR_US, BaselineTable, learn_baselines
from tasks.detect import load_models
from tests.dbtargets import DbTarget
from tests.settings_env import isolate_settings

pytestmark = pytest.mark.usefixtures("prefect_server")

STEP = 300_000_000  # 5 minutes
MONDAY = 1_767_571_200_000_000  # 2026-01-05 00:00 UTC


def grid(days: float, start: int = MONDAY) -> np.ndarray:
    return start + np.arange(int(days * DAY_US // STEP), dtype=np.int64) * STEP


def series(sid: int, ts: np.ndarray, values: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame({"series_id": sid, "ts_us": ts, "value": values})


def daily(ts: np.ndarray, amplitude: float = 20.0) -> np.ndarray:
    return amplitude * np.sin(2 * np.pi * (ts % DAY_US) / DAY_US)


def weekend(ts: np.ndarray, drop: float = 30.0) -> np.ndarray:
    return np.where(((ts // DAY_US) + 3) % 7 >= 5, -drop, 0.0)  # epoch day 0 was a Thursday


def learn(*frames: pd.DataFrame):
    points = pd.concat(frames, ignore_index=True)
    return learn_baselines(buckets_of(points), bucket_us=STEP)


def seasons(learned) -> dict[int, str]:
    first = learned.baselines.drop_duplicates("series_id")
    return dict(zip(first["series_id"], first["season"], strict=True))


def test_season_is_chosen_per_series_from_its_history() -> None:
    rng = np.random.default_rng(0)
    long, short = grid(24), grid(14)
    learned = learn(
        series(1, long, 100 + daily(long) + weekend(long) + rng.normal(0, 2, len(long))),
        series(2, short, 100 + daily(short) + weekend(short) + rng.normal(0, 2, len(short))),
        series(3, long, 100 + daily(long) + rng.normal(0, 2, len(long))),
        series(4, long, 100 + rng.normal(0, 2, len(long))),
    )
    # Two weeks cannot fill 168 slots, but they show a weekend unlike the weekdays.
    assert seasons(learned) == {1: "week", 2: "weekpart", 3: "day", 4: "none"}
    slots = learned.baselines.groupby("series_id")["slot"].agg(["count", "min", "max"])
    assert slots.loc[1].tolist() == [168, 0, 167]
    assert slots.loc[2].tolist() == [48, 0, 47]
    assert slots.loc[3].tolist() == [24, 0, 23]
    assert slots.loc[4].tolist() == [1, 0, 0]
    assert learned.seasons == {"none": 1, "day": 1, "week": 1, "weekpart": 1}
    # Saturday noon expects the weekend drop only where weeks were learned (the noon hour
    # slot's median sits 20 * sin(pi / 12) / 2 ~ 2.6 below the level); Tuesday noon does not.
    table = BaselineTable.from_frame(learned.baselines)
    saturday_noon = MONDAY + 5 * DAY_US + 12 * HOUR_US + 14 * 7 * DAY_US
    tuesday_noon = saturday_noon - 4 * DAY_US
    ids = np.array([1, 2, 3])
    _, expected, scale, _ = table.lookup(ids, np.full(3, saturday_noon))
    assert expected[2] == pytest.approx(97.4, abs=1)
    assert expected[0] - expected[2] == pytest.approx(-30, abs=1.5)
    assert expected[1] - expected[2] == pytest.approx(-30, abs=1.5)
    assert np.all(scale > 0)
    _, weekday, _, _ = table.lookup(ids, np.full(3, tuesday_noon))
    assert weekday[1] - weekday[2] == pytest.approx(0, abs=1.5)


def test_per_slot_statistics_and_trend() -> None:
    rng = np.random.default_rng(1)
    ts = grid(10)
    slope_per_day = 5.0
    values = 50 + slope_per_day * (ts - ts[0]) / DAY_US + daily(ts) + rng.normal(0, 1, len(ts))
    learned = learn(series(7, ts, values))
    rows = learned.baselines
    assert set(rows["season"]) == {"day"}
    assert rows["trend_slope"].iloc[0] == pytest.approx(slope_per_day, rel=0.05)
    assert (rows["n"] == 120).all()  # 10 days x 12 five-minute buckets per hour slot
    assert (rows["p05"] <= rows["p50"]).all() and (rows["p95"] <= rows["p99"]).all()
    assert np.allclose(rows["median"], rows["p50"])
    assert rows["mad"].between(0.3, 2.0).all()  # detrended noise of sigma 1 (+ in-slot shape)
    # The expected value follows the trend past the end of the window.
    table = BaselineTable.from_frame(rows)
    later = np.array([int(ts[-1]) + DAY_US, int(ts[-1]) + 2 * DAY_US])
    _, expected, _, _ = table.lookup(np.array([7, 7]), later - later % DAY_US)
    assert expected[1] - expected[0] == pytest.approx(slope_per_day, rel=0.1)


def test_constant_series_has_a_positive_scale_and_no_runtime_warnings() -> None:
    ts = grid(3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        learned = learn(series(1, ts, np.full(len(ts), 42.0)), series(2, ts, np.zeros(len(ts))))
    rows = learned.baselines.set_index("series_id")
    assert rows.loc[1, "season"] == "none" and rows.loc[2, "season"] == "none"
    assert rows.loc[1, "mad"] == 0 and rows.loc[1, "scale"] == pytest.approx(0.042)
    assert rows.loc[2, "scale"] > 0


def test_series_under_a_day_get_no_baseline_and_are_reported() -> None:
    young, old = grid(0.5), grid(2)
    learned = learn(series(1, young, np.ones(len(young))), series(2, old, np.ones(len(old))))
    assert learned.baselines["series_id"].unique().tolist() == [2]
    assert learned.skipped.to_dict("records") == [
        {"series_id": 1, "reason": "under a day of history"}
    ]


def test_gaps_of_days_still_give_every_slot_an_expectation() -> None:
    rng = np.random.default_rng(2)
    ts = grid(24)
    # Hours 10-13 never seen (the collector was down around noon for three weeks) and a
    # four-day outage: the season is still learned and every slot expects something.
    keep = ~(((ts % DAY_US) // HOUR_US >= 10) & ((ts % DAY_US) // HOUR_US < 14))
    keep &= ~((ts >= MONDAY + 8 * DAY_US) & (ts < MONDAY + 12 * DAY_US))
    ts = ts[keep]
    learned = learn(series(5, ts, 100 + daily(ts) + rng.normal(0, 1, len(ts))))
    rows = learned.baselines
    assert rows["season"].iloc[0] == "day"
    assert sorted(rows["slot"]) == list(range(24))
    missing = rows[rows["slot"].between(10, 13)]
    assert (missing["n"] == 0).all()
    assert np.isfinite(missing["median"]).all() and (missing["scale"] > 0).all()


def test_incident_windows_are_cut_out_of_history() -> None:
    frame = pd.DataFrame(
        {"series_id": [1, 1, 1, 2, 2], "ts_us": [10, 20, 30, 10, 20], "value": [1.0] * 5}
    )
    windows = pd.DataFrame({"series_id": [1, 2], "start_us": [15, 0], "end_us": [30, 15]})
    kept = detection.exclude_windows(frame, windows)
    assert list(zip(kept["series_id"], kept["ts_us"], strict=True)) == [(1, 10), (1, 30), (2, 20)]


# -- the flow, on every backend -----------------------------------------------------------------
def write_history(store: Store, now_us: int) -> None:
    """Three metrics: web.latency (two daily series), queue.depth (constant), new.thing (young)."""
    rng = np.random.default_rng(3)
    end = now_us // HOUR_US * HOUR_US - HOUR_US
    ts = np.arange(end - 4 * DAY_US, end, STEP, dtype=np.int64)
    young = ts[ts >= end - 6 * HOUR_US]
    parts = []
    for host in ("a", "b"):
        values = 100 + daily(ts) + rng.normal(0, 1, len(ts))
        parts.append(("web.latency", {"host": host}, ts, values))
    parts.append(("queue.depth", {"q": "main"}, ts, np.full(len(ts), 7.0)))
    parts.append(("new.thing", {}, young, np.ones(len(young))))
    rows = pd.concat(
        [
            pd.DataFrame(
                {
                    "metric": m,
                    "labels": [labels] * len(t),
                    "ts": pd.to_datetime(t, unit="us", utc=True),
                    "value": v,
                }
            )
            for m, labels, t, v in parts
        ],
        ignore_index=True,
    )
    store.write_samples(rows)
    store.rollup()


@pytest.fixture
def env_target(db_target: DbTarget, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> DbTarget:
    isolate_settings(monkeypatch, home=tmp_path, timescaledb=db_target.timescaledb)
    return db_target


def test_baseline_flow_learns_skips_fits_and_refits_a_broken_model(
    env_target: DbTarget, tmp_path: Path
) -> None:
    settings = load_settings(database_url=env_target.url, home=tmp_path)
    now_us = int(datetime.now(UTC).timestamp() * 1e6)
    with Store.open(settings=settings) as store:
        write_history(store, now_us)
        # A spike inside a confirmed incident must not widen the learned band.
        sid_a = int(store.series("web.latency", {"host": "a"})["series_id"].iloc[0])
        spike_at = now_us // HOUR_US * HOUR_US - 30 * HOUR_US
        store.backend.execute(
            f"UPDATE samples SET value = 1e6 WHERE series_id = %s AND ts >= {store.backend.ts_in} "
            f"AND ts < {store.backend.ts_in}",
            (sid_a, spike_at, spike_at + HOUR_US),
        )
        store.backend.execute(
            "INSERT INTO rollup_pending (start_ts, end_ts) VALUES "
            f"({store.backend.ts_in}, {store.backend.ts_in})",
            (spike_at, spike_at + HOUR_US),
        )
        store.rollup()
        incident = store.backend.ts_in
        store.backend.execute(
            "INSERT INTO alerts (fingerprint, rule, series_id, severity, status, started_at, "
            f"updated_at, resolved_at, incident) VALUES ('f', 'anomaly', %s, 'critical', "
            f"'resolved', {incident}, {incident}, {incident}, %s)",
            (sid_a, spike_at - STEP, spike_at + HOUR_US, spike_at + HOUR_US, True),
        )

    state = baseline(database_url=env_target.url, home=str(tmp_path), return_state=True)
    assert state.is_completed(), state
    report = state.result()
    assert isinstance(report, dict)
    assert report["series"] == 4
    assert report["seasons"] == {"none": 1, "day": 2, "week": 0, "weekpart": 0}
    assert report["skipped"] == {"under a day of history": 1}
    assert [m["metric"] for m in report["models"]] == ["queue.depth", "web.latency"]
    assert {m["detector"] for m in report["models"]} == {"ecod"}

    with Store.open(settings=settings) as store:
        rows = detection.read_baselines(store)
        catalog = detection.series_metrics(store).set_index("series_id")["metric"]
        by_metric = rows.assign(metric=rows["series_id"].map(catalog))
        assert set(by_metric["metric"]) == {"web.latency", "queue.depth"}
        latency_a = rows[rows["series_id"] == sid_a]
        assert len(latency_a) == 24
        assert latency_a["p99"].max() < 200  # the 1e6 incident was left out
        constant = by_metric[by_metric["metric"] == "queue.depth"].iloc[0]
        assert constant["mad"] == 0 and constant["scale"] > 0

        # A model blob that no longer loads is refitted, logged and replaced.
        store.backend.execute(
            "UPDATE detector_models SET model = %s WHERE scope = %s",
            (b"not a pickle", "metric:web.latency"),
        )
        models, notes = load_models(store, settings, ["web.latency", "queue.depth"])
        assert sorted(models) == ["queue.depth", "web.latency"]
        assert notes == ["model for web.latency failed to load (UnpicklingError); refitted"]
        again, notes_again = load_models(store, settings, ["web.latency"])
        assert notes_again == [] and again["web.latency"].n_samples > 0


def test_baseline_flow_sharded_on_a_local_dask_cluster_learns_what_one_process_learns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With detect_shards 2 and a Dask cluster, each shard learns its series (series_id % 2)
    in a task of its own; the stored baselines are those of a run in one process."""
    url = f"sqlite:///{tmp_path}/metrics.db"
    isolate_settings(monkeypatch, home=tmp_path)
    settings = load_settings(database_url=url, home=tmp_path)
    now_us = int(datetime.now(UTC).timestamp() * 1e6)
    # Both runs see the same window even if the clock passes an hour between them.
    monkeypatch.setattr(tasks.baseline_run, "_now_us", lambda: now_us)
    with Store.open(settings=settings) as store:
        write_history(store, now_us)
    single = baseline(database_url=url, home=str(tmp_path))
    with Store.open(settings=settings) as store:
        alone = detection.read_baselines(store)
        store.backend.execute("DELETE FROM baselines")
        assert detection.read_baselines(store).empty

    monkeypatch.setenv("METRICMILL_DETECT_SHARDS", "2")
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None
    ) as cluster:
        monkeypatch.setenv("METRICMILL_DETECT_DASK_ADDRESS", cluster.scheduler_address)
        sharded = baseline(database_url=url, home=str(tmp_path))
    for key in ("series", "seasons", "skipped"):
        assert sharded[key] == single[key], key
    assert [m["metric"] for m in sharded["models"]] == ["queue.depth", "web.latency"]
    with Store.open(settings=settings) as store:
        together = detection.read_baselines(store)
    assert len(alone) == 24 + 24 + 1
    pd.testing.assert_frame_equal(together, alone)
