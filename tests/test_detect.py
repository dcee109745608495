"""Scoring and the `detect` flow: the score frame contract, point-wise PyOD scores, watermarks
that advance only once alerts are stored, young series reported, and Dask sharding."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from distributed import LocalCluster

from flows.baseline import baseline
from flows.detect import detect
from metricmill.settings import load_settings
from storage import detection
from storage.store import Store
from tasks.backtest import buckets_of
from tasks.baseline import DAY_US, BaselineTable, fit_models, learn_baselines
from tasks.detect import SCORE_COLUMNS, SERIES_COLUMNS, score_points
from tasks.detectors import fit_model, pointwise_scores
from tests.dbtargets import DbTarget
from tests.settings_env import isolate_settings

pytestmark = pytest.mark.usefixtures("prefect_server")

STEP = 300_000_000
MINUTE = 60_000_000
HOUR = 60 * MINUTE


@pytest.mark.parametrize("name", ["ecod", "copod", "iforest", "hbos"])
def test_each_row_scores_as_if_scored_alone(name: str) -> None:
    rng = np.random.default_rng(0)
    train = rng.normal(size=(400, 4))
    train[:, 3] = rng.exponential(size=400)
    model = fit_model(name, train, fitted_from=0, fitted_to=1, max_rows=1000).model
    batch = rng.normal(size=(15, 4)) * 3
    alone = np.array([model.decision_function(batch[i : i + 1])[0] for i in range(len(batch))])
    assert np.allclose(pointwise_scores(model, batch), alone, rtol=1e-9, atol=1e-9)
    # and a row's score does not depend on the rows scored with it
    assert np.allclose(pointwise_scores(model, batch[:5]), pointwise_scores(model, batch)[:5])


def history_and_new(n_series: int, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    start = 1_767_571_200_000_000
    ts = start + np.arange(5 * 288, dtype=np.int64) * STEP
    new_ts = ts[-1] + STEP + np.arange(120, dtype=np.int64) * MINUTE
    hist, new = [], []
    for sid in range(1, n_series + 1):
        shape = 30 * np.sin(2 * np.pi * (ts % DAY_US) / DAY_US)
        hist.append(pd.DataFrame({"series_id": sid, "ts_us": ts, "value": 200 + shape}))
        hist[-1]["value"] += rng.normal(0, 2, len(ts))
        values = 200 + 30 * np.sin(2 * np.pi * (new_ts % DAY_US) / DAY_US)
        values = values + rng.normal(0, 2, len(new_ts))
        new.append(pd.DataFrame({"series_id": sid, "ts_us": new_ts, "value": values}))
    return pd.concat(hist, ignore_index=True), pd.concat(new, ignore_index=True)


def test_score_frame_contract_and_scores() -> None:
    hist, new = history_and_new(3)
    new.loc[(new["series_id"] == 2) & (new.index % 120 == 60), "value"] += 60  # a 30-sigma spike
    young = pd.DataFrame({"series_id": 9, "ts_us": new["ts_us"].unique()[:5], "value": 1.0})
    points = pd.concat([new, young], ignore_index=True).sort_values(["series_id", "ts_us"])
    learned = learn_baselines(buckets_of(hist), bucket_us=STEP)
    metric_of = pd.Series("m", index=[1, 2, 3, 9])
    models = fit_models(
        buckets_of(hist), learned.baselines, metric_of, {"*": "ecod"}, max_rows=5000
    )
    scored = score_points(points, BaselineTable.from_frame(learned.baselines), models, metric_of)
    frame = scored.scores
    assert list(frame.columns) == list(SCORE_COLUMNS)
    assert frame["series_id"].dtype == np.int64 and frame["ts_us"].dtype == np.int64
    assert frame.equals(frame.sort_values(["series_id", "ts_us"]).reset_index(drop=True))
    assert scored.no_baseline.tolist() == [9]
    assert set(frame["series_id"]) == {1, 2, 3}
    assert frame["score"].between(0, 1).all()
    assert (frame["lower"] < frame["expected"]).all() and (frame["expected"] < frame["upper"]).all()
    spike = frame[(frame["series_id"] == 2) & (frame["value"] > frame["expected"] + 40)]
    # No clip: a 30-sigma spike scores near 1 and still below it, so it keeps ranking.
    assert len(spike) == 1 and 0.95 < spike["score"].iloc[0] < 1.0
    assert spike["model_score"].iloc[0] > 0.9
    normal = frame.drop(spike.index)
    per_series = scored.series
    # No normal point reaches its series' effective threshold (the budget's, set at the fit).
    bar = normal["series_id"].map(per_series.set_index("series_id")["threshold_both"])
    assert (bar >= 0.7).all() and (normal["score"] < bar).all()
    assert normal["model_score"].isna().mean() > 0.9  # the model only looks past the band
    assert list(per_series.columns) == list(SERIES_COLUMNS)
    assert per_series["series_id"].tolist() == [1, 2, 3]  # the table's, not young 9
    assert per_series["baseline_level"].between(190, 210).all()
    assert per_series["threshold_both"].notna().all()


# -- the flow ------------------------------------------------------------------------------------
def _rows(metric: str, labels: dict[str, str], ts: np.ndarray, values: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "metric": metric,
            "labels": [labels] * len(ts),
            "ts": pd.to_datetime(ts, unit="us", utc=True),
            "value": values,
        }
    )


def seed_store(store: Store, now_us: int) -> dict[str, int]:
    """Two days of history for api.errors{a,b}, then 30 minutes of new 1m points (b spikes),
    and a series born 20 minutes ago."""
    rng = np.random.default_rng(4)
    cut = now_us // MINUTE * MINUTE - 40 * MINUTE
    # History ends before the 60-minute look-back of a series without a watermark.
    hist_ts = np.arange(cut - 2 * DAY_US - HOUR, cut - HOUR, STEP, dtype=np.int64)
    new_ts = np.arange(cut, cut + 30 * MINUTE, MINUTE, dtype=np.int64)
    frames = []
    for host in ("a", "b"):
        frames.append(
            _rows("api.errors", {"host": host}, hist_ts, 50 + rng.normal(0, 1, len(hist_ts)))
        )
    store.write_samples(pd.concat(frames, ignore_index=True))
    store.rollup()
    new_a = 50 + rng.normal(0, 1, len(new_ts))
    new_b = 50 + rng.normal(0, 1, len(new_ts))
    new_b[10:20] += 40  # ten minutes far outside the band: fires with the default rule
    young_ts = np.arange(cut + 10 * MINUTE, cut + 30 * MINUTE, MINUTE, dtype=np.int64)
    store.write_samples(
        pd.concat(
            [
                _rows("api.errors", {"host": "a"}, new_ts, new_a),
                _rows("api.errors", {"host": "b"}, new_ts, new_b),
                _rows("api.errors", {"host": "new"}, young_ts, np.ones(len(young_ts))),
            ],
            ignore_index=True,
        )
    )
    ids = store.series("api.errors")
    return {
        labels["host"]: int(sid)
        for sid, labels in zip(ids["series_id"], ids["labels"], strict=True)
    }


def run(flow: Any, **kwargs: Any) -> dict[str, Any]:
    """A flow's returned report (the flows return a dict unless a run is skipped)."""
    report = flow(**kwargs)
    assert isinstance(report, dict), report
    return report


@pytest.fixture
def env_target(db_target: DbTarget, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> DbTarget:
    isolate_settings(monkeypatch, home=tmp_path, timescaledb=db_target.timescaledb)
    return db_target


def test_detect_flow_scores_new_points_alerts_and_advances_watermarks(
    env_target: DbTarget, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = load_settings(database_url=env_target.url, home=tmp_path)
    now_us = int(datetime.now(UTC).timestamp() * 1e6)
    with Store.open(settings=settings) as store:
        ids = seed_store(store, now_us)
    assert run(baseline, database_url=env_target.url, home=str(tmp_path))["series"] == 2

    # A notification block that does not exist fails the run before anything changes: the
    # points stay unscored (no watermark) and are scored by the next good run.
    monkeypatch.setenv("METRICMILL_NOTIFICATION_BLOCKS", '["slack-webhook/missing"]')
    failed = detect(database_url=env_target.url, home=str(tmp_path), return_state=True)
    assert failed.is_failed()
    with Store.open(settings=settings) as store:
        assert detection.read_watermarks(store).empty
    monkeypatch.delenv("METRICMILL_NOTIFICATION_BLOCKS")

    report = run(detect, database_url=env_target.url, home=str(tmp_path))
    assert report["series"] == 3
    assert report["scored"] == 60  # 30 new points of a and b; the young series is reported
    assert report["no_baseline"] == [ids["new"]]
    assert report["fired"] == 1
    with Store.open(settings=settings) as store:
        marks = detection.read_watermarks(store).set_index("series_id")["ts_us"]
        newest = store.latest("api.errors")
        latest = {
            lab["host"]: int(ts.timestamp() * 1e6)
            for lab, ts in zip(newest["labels"], newest["ts"], strict=True)
        }
        assert marks.to_dict() == {ids[h]: latest[h] for h in ("a", "b", "new")}
        alerts = store.backend.execute("SELECT series_id, status FROM alerts")
        assert alerts == [(ids["b"], "firing")]

    again = run(detect, database_url=env_target.url, home=str(tmp_path))
    assert again["scored"] == 0 and again["fired"] == 0


def test_detect_flow_shards_across_a_local_dask_cluster(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path}/metrics.db"
    isolate_settings(monkeypatch, home=tmp_path, detect_shards=2)
    settings = load_settings(database_url=url, home=tmp_path)
    now_us = int(datetime.now(UTC).timestamp() * 1e6)
    with Store.open(settings=settings) as store:
        ids = seed_store(store, now_us)
    baseline(database_url=url, home=str(tmp_path))
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None
    ) as cluster:
        monkeypatch.setenv("METRICMILL_DETECT_DASK_ADDRESS", cluster.scheduler_address)
        report = run(detect, database_url=url, home=str(tmp_path))
    assert report["shards"] == 2
    assert report["scored"] == 60 and report["fired"] == 1
    assert report["no_baseline"] == [ids["new"]]


def test_points_landing_behind_the_watermark_are_scored_and_alert_from_their_own_time(
    env_target: DbTarget, tmp_path: Path
) -> None:
    """Late samples (here eight minutes missing from a series when detect first ran, then
    delivered far outside the band) are scored by the next run; the alert's `since` is the
    first late point, and the run after has nothing left to score."""
    settings = load_settings(database_url=env_target.url, home=tmp_path)
    now_us = int(datetime.now(UTC).timestamp() * 1e6)
    rng = np.random.default_rng(9)
    cut = now_us // MINUTE * MINUTE - 40 * MINUTE
    hist_ts = np.arange(cut - 2 * DAY_US - HOUR, cut - HOUR, STEP, dtype=np.int64)
    new_ts = np.arange(cut, cut + 30 * MINUTE, MINUTE, dtype=np.int64)
    gap = (new_ts >= cut + 12 * MINUTE) & (new_ts < cut + 20 * MINUTE)
    with Store.open(settings=settings) as store:
        store.write_samples(
            _rows("api.errors", {"host": "a"}, hist_ts, 50 + rng.normal(0, 1, len(hist_ts)))
        )
        store.rollup()
        on_time = 50 + rng.normal(0, 1, len(new_ts))
        store.write_samples(_rows("api.errors", {"host": "a"}, new_ts[~gap], on_time[~gap]))
    run(baseline, database_url=env_target.url, home=str(tmp_path))
    first = run(detect, database_url=env_target.url, home=str(tmp_path))
    assert (first["scored"], first["fired"]) == (22, 0)

    with Store.open(settings=settings) as store:
        late = 90 + rng.normal(0, 1, int(gap.sum()))
        store.write_samples(_rows("api.errors", {"host": "a"}, new_ts[gap], late))
        assert store.backend.execute("SELECT count(*) FROM detect_late") == [(1,)]
    second = run(detect, database_url=env_target.url, home=str(tmp_path))
    # From the first late point on: the 8 late points and the 10 on-time ones after them.
    assert second["scored"] == 18
    assert second["fired"] == 1
    with Store.open(settings=settings) as store:
        rows = store.backend.execute(
            f"SELECT {store.backend.ts_out.format(col='started_at')}, status FROM alerts"
        )
        assert rows == [(int(new_ts[gap][0]), "resolved")]  # in the past: opened and resolved
        assert store.backend.execute("SELECT count(*) FROM detect_late") == [(0,)]
    third = run(detect, database_url=env_target.url, home=str(tmp_path))
    assert (third["scored"], third["fired"]) == (0, 0)


def test_a_series_selector_limits_baseline_and_detect_to_the_matching_series(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path}/metrics.db"
    isolate_settings(monkeypatch, home=tmp_path)
    settings = load_settings(database_url=url, home=tmp_path)
    now_us = int(datetime.now(UTC).timestamp() * 1e6)
    with Store.open(settings=settings) as store:
        ids = seed_store(store, now_us)
    only_b = '{host="b"}'
    learned = run(baseline, database_url=url, home=str(tmp_path), series=only_b)
    assert (learned["series"], learned["models"]) == (1, [])  # models stay as they are
    with Store.open(settings=settings) as store:
        assert set(detection.read_baselines(store)["series_id"]) == {ids["b"]}
    run(baseline, database_url=url, home=str(tmp_path))
    report = run(detect, database_url=url, home=str(tmp_path), series=only_b)
    assert (report["series"], report["scored"], report["fired"]) == (1, 30, 1)
    with Store.open(settings=settings) as store:
        assert set(detection.read_watermarks(store)["series_id"]) == {ids["b"]}
    rest = run(detect, database_url=url, home=str(tmp_path))
    assert (rest["series"], rest["scored"]) == (2, 30)  # a, and the young series (no baseline)
    bad = detect(database_url=url, home=str(tmp_path), series='{host=~"("}', return_state=True)
    assert bad.is_failed() and "invalid regular expression" in str(bad.message)
