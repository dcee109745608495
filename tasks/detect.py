"""Scoring of new points against baselines and per-metric PyOD models, vectorised across series.

The score rule (documented in the README, "Anomaly detection"):

- z = |value - expected| / scale, with expected and scale from the series' baseline slot;
- stat_score = clip((z - 3) / 2, 0, 1): nothing inside 3 scales, 1 from 5 scales on;
- model_score = the share of the metric's training rows that the PyOD detector scored lower
  (0..1); it is only computed where stat_score > 0 (NaN elsewhere or without a model);
- score = max(stat_score, (stat_score * model_score) ** 0.75).

So the statistics decide *whether* a point is unusual and the model can only raise a point
that is already outside the band — when the shape around it (jump, spread of recent points)
is rare too; e.g. a point at 4.2 scales scores 0.6 alone and 0.68 with a model score of 1.
A point inside the band never scores above 0, whatever the model says. (On the synthetic
evaluation a square root instead of the 0.75 power tripled false alerts for no recall.)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from prefect import get_run_logger, task

from metricmill.settings import Settings
from storage import detection
from storage.store import Store
from tasks.alert_engine import SCORE_COLUMNS
from tasks.baseline import DAY_US, BaselineTable, fit_models, model_features
from tasks.detectors import FittedModel, detector_for

Z_FLOOR = 3.0
Z_FULL = 5.0
MODEL_POWER = 0.75
CONTEXT_US = 3_600_000_000  # points before the watermark the features look back at


def stat_score(z: np.ndarray) -> np.ndarray:
    """Robust z mapped to [0, 1]: 0 inside Z_FLOOR scales, 1 from Z_FULL on."""
    with np.errstate(invalid="ignore"):
        return np.nan_to_num(np.clip((z - Z_FLOOR) / (Z_FULL - Z_FLOOR), 0.0, 1.0), nan=0.0)


def combine(stat: np.ndarray, model: np.ndarray) -> np.ndarray:
    """score = max(stat, (stat * model) ** 0.75); a missing model score leaves the stat score."""
    m = np.nan_to_num(model, nan=0.0)
    return np.clip(np.maximum(stat, (stat * m) ** MODEL_POWER), 0.0, 1.0)


def empty_scores() -> pd.DataFrame:
    frame = pd.DataFrame({c: pd.Series(dtype="float64") for c in SCORE_COLUMNS})
    return frame.astype({"series_id": "int64", "ts_us": "int64"})


@dataclass
class Scored:
    """Scores of the fresh points, and the fresh series that have no baseline yet."""

    scores: pd.DataFrame
    no_baseline: np.ndarray


def score_points(
    points: pd.DataFrame,
    table: BaselineTable,
    models: dict[str, FittedModel],
    metric_of: pd.Series,
) -> Scored:
    """Score points (series_id, ts_us, value[, fresh]) sorted by series and time.

    Rows with fresh=False are context only (the features look back at them); output rows are
    the fresh rows of series with a baseline, sorted by (series_id, ts_us).
    """
    if points.empty:
        return Scored(empty_scores(), np.empty(0, dtype=np.int64))
    fresh = (
        points["fresh"].to_numpy(bool) if "fresh" in points else np.ones(len(points), dtype=bool)
    )
    has, expected, scale, level_all, feats = model_features(points, table)
    sid = points["series_id"].to_numpy(np.int64)
    value = points["value"].to_numpy(np.float64)
    no_baseline = np.unique(sid[fresh & ~has])
    z = np.abs(feats[:, 1])
    stat = np.where(has, stat_score(z), 0.0)
    model = np.full(len(points), np.nan)
    gated = np.flatnonzero(fresh & has & (stat > 0))
    if len(gated) and models:
        metrics = sid[gated]
        names = pd.Series(metrics).map(metric_of).to_numpy(dtype=object)
        codes, uniq = pd.factorize(names)
        for code, metric in enumerate(uniq):  # a loop per metric
            fitted = models.get(str(metric))
            if fitted is None:
                continue
            rows = gated[codes == code]
            model[rows] = fitted.calibrated(feats[rows])
    score = combine(stat, model)
    out_rows = fresh & has
    level = level_all[out_rows]
    band = Z_FLOOR * scale[out_rows]
    scores = pd.DataFrame(
        {
            "series_id": sid[out_rows],
            "ts_us": points["ts_us"].to_numpy(np.int64)[out_rows],
            "value": value[out_rows],
            "expected": expected[out_rows],
            "lower": expected[out_rows] - band,
            "upper": expected[out_rows] + band,
            "stat_score": stat[out_rows],
            "model_score": model[out_rows],
            "score": score[out_rows],
            "baseline_level": level,
        }
    )
    return Scored(scores.reset_index(drop=True), no_baseline)


# -- loading what scoring needs ------------------------------------------------------------------
def load_models(
    store: Store, settings: Settings, metrics: list[str], *, refit_window_days: int | None = None
) -> tuple[dict[str, FittedModel], list[str]]:
    """The configured detector of each metric; a stored model that fails to load is refitted.

    Returns the models and one message per refit (also logged by the caller).
    """
    wanted = {m: detector_for(m, settings.detectors) for m in metrics}
    rows = detection.read_models(store, [f"metric:{m}" for m in metrics])
    models: dict[str, FittedModel] = {}
    broken: list[str] = []
    notes: list[str] = []
    for record in rows.to_dict("records"):  # one row per metric
        row = {str(k): v for k, v in record.items()}
        metric = str(row["scope"]).removeprefix("metric:")
        if wanted.get(metric) != row["detector"]:
            continue
        try:
            models[metric] = FittedModel.from_row(row)
        except Exception as exc:  # a corrupt or incompatible pickle: refit below
            broken.append(metric)
            notes.append(f"model for {metric} failed to load ({type(exc).__name__}); refitted")
    if broken:
        models.update(_refit(store, settings, broken, refit_window_days))
    return models, notes


def _refit(
    store: Store, settings: Settings, metrics: list[str], window_days: int | None
) -> dict[str, FittedModel]:
    from tasks.baseline import _model_rows  # the same rows the nightly flow writes

    catalog = detection.series_metrics(store)
    ids = catalog.loc[catalog["metric"].isin(metrics), "series_id"].tolist()
    end_us = time.time_ns() // 1000
    start_us = end_us - (window_days or settings.baseline_window_days) * DAY_US
    buckets = detection.history(
        store, start_us=start_us, end_us=end_us, level=settings.baseline_level, series_ids=ids
    )
    baselines = detection.read_baselines(store, ids)
    fitted = fit_models(
        buckets,
        baselines,
        catalog.set_index("series_id")["metric"],
        settings.detectors,
        max_rows=settings.detector_max_fit_rows,
    )
    detection.write_models(store, _model_rows(fitted))
    return fitted


# -- Prefect task --------------------------------------------------------------------------
@dataclass
class ShardResult:
    """One shard's scores, the watermarks to advance once alerts are stored, and notes."""

    scores: pd.DataFrame
    marks: pd.DataFrame
    no_baseline: list[int] = field(default_factory=list)
    series: int = 0
    points: int = 0
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


@task(name="score-shard")
def score_shard(settings: Settings, shard: int = 0, shards: int = 1) -> ShardResult:
    """Score every new point of the series in this shard (series_id % shards == shard)."""
    logger = get_run_logger()
    started = time.perf_counter()
    floor_us = time.time_ns() // 1000 - settings.detect_lookback_minutes * 60_000_000
    with Store.open(settings=settings) as store:
        ids = [
            i for i in detection.series_to_score(store, floor_us=floor_us) if i % shards == shard
        ]
        points = detection.recent_points(
            store, series_ids=ids, floor_us=floor_us, context_us=CONTEXT_US
        )
        catalog = detection.series_metrics(store, ids)
        metric_of = catalog.set_index("series_id")["metric"]
        table = BaselineTable.from_frame(detection.read_baselines(store, ids))
        models, notes = load_models(store, settings, sorted(set(catalog["metric"])))
    for note in notes:
        logger.warning(note)
    scored = score_points(points, table, models, metric_of)
    fresh = points[points["fresh"]]
    marks = fresh.groupby("series_id", sort=True)["ts_us"].max().reset_index()
    return ShardResult(
        scores=scored.scores,
        marks=marks,
        no_baseline=[int(i) for i in scored.no_baseline],
        series=len(ids),
        points=int(len(fresh)),
        notes=notes,
        seconds=time.perf_counter() - started,
    )
