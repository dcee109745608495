"""The nightly baseline's Prefect tasks: the window, learning per shard of series (on Dask
when detect_shards > 1), fitting the per-metric models once, and the outcome log."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from prefect import get_run_logger, task

from metricmill.settings import Settings
from storage import detection
from storage.schema import ROLLUP_LEVELS
from storage.store import Store
from tasks.baseline import DAY_US, HOUR_US, LearnParams, fit_models, learn_baselines
from tasks.detectors import FittedModel


@dataclass
class BaselineOutcome:
    """What one baseline run learned: the rows of the run's summary."""

    seasons: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    skipped_series: list[dict[str, object]] = field(default_factory=list)
    models: list[dict[str, object]] = field(default_factory=list)
    series: int = 0
    rows: int = 0
    excluded_rows: int = 0
    seconds: float = 0.0
    budget: float = 0.5
    thresholds: list[float] = field(default_factory=list)  # effective (both), one per series

    @property
    def seconds_per_1000(self) -> float:
        return self.seconds / self.series * 1000 if self.series else 0.0


@dataclass
class ShardLearned:
    """One shard's part of a baseline run: its counts and its sample for the models."""

    outcome: BaselineOutcome
    fit_buckets: list[pd.DataFrame] = field(default_factory=list)
    fit_baselines: list[pd.DataFrame] = field(default_factory=list)


def run_window(settings: Settings, window_days: int | None = None) -> tuple[int, int]:
    """(start, end) in µs of the run's window: whole hours, ending at the last full hour."""
    end_us = _now_us() // HOUR_US * HOUR_US
    return end_us - (window_days or settings.baseline_window_days) * DAY_US, end_us


@task(name="learn-baselines-shard")
def learn_shard(
    settings: Settings,
    window: tuple[int, int],
    series: str | None = None,
    shard: int = 0,
    shards: int = 1,
) -> ShardLearned:
    """Learn and write the baselines of the series in this shard (series_id % shards == shard)
    over `window`, chunk by chunk; keep a sample of whole series for the per-metric models."""
    start_us, end_us = window
    level = settings.baseline_level
    part = ShardLearned(BaselineOutcome(budget=settings.alert_budget_per_week))
    outcome = part.outcome
    with Store.open(settings=settings) as store:
        ids = store.detection.series_with_history(start_us=start_us, end_us=end_us, level=level)
        ids = [i for i in ids if int(i) % shards == shard]
        if series and series.strip():
            wanted = set(store.series(None, series)["series_id"].astype(int))
            ids = [i for i in ids if int(i) in wanted]
        incidents = store.alerts.incident_windows()  # confirmed incidents
        chunk = settings.baseline_chunk_series
        for offset in range(0, len(ids), chunk):  # a query per chunk of series
            chunk_ids = ids[offset : offset + chunk]
            buckets = store.detection.history(
                start_us=start_us, end_us=end_us, level=level, series_ids=chunk_ids
            )
            kept = detection.exclude_windows(buckets, incidents)
            outcome.excluded_rows += len(buckets) - len(kept)
            learned = learn_baselines(
                kept,
                bucket_us=ROLLUP_LEVELS[level],
                params=LearnParams(alert_budget_per_week=settings.alert_budget_per_week),
            )
            outcome.rows += store.detection.write_baselines(learned.baselines)
            for name, count in learned.seasons.items():
                outcome.seasons[name] = outcome.seasons.get(name, 0) + count
            for reason, count in learned.skipped["reason"].value_counts().items():
                outcome.skipped[str(reason)] = outcome.skipped.get(str(reason), 0) + int(count)
            outcome.skipped_series.extend(
                {"series_id": int(i), "reason": str(r)}
                for i, r in learned.skipped[["series_id", "reason"]].itertuples(index=False)
            )
            outcome.series += len(chunk_ids)
            firsts = learned.baselines.drop_duplicates("series_id")
            if "threshold_both" in firsts:
                outcome.thresholds.extend(float(v) for v in firsts["threshold_both"].dropna())
            sample = _sample_rows(kept, settings.detector_max_fit_rows)
            part.fit_buckets.append(sample)
            # Only the sampled series' baselines are needed to fit the models.
            chosen = learned.baselines["series_id"].isin(sample["series_id"].unique())
            part.fit_baselines.append(learned.baselines[chosen])
    return part


@task(name="fit-models")
def fit_and_merge(
    settings: Settings, parts: list[ShardLearned], series: str | None = None
) -> BaselineOutcome:
    """The shards' counts added up, and (on a full run) the per-metric models fitted on their
    samples and stored. With a selector the models are left as they are: a model fitted on a
    few series of a metric would replace the one fitted on all of them."""
    outcome = BaselineOutcome(budget=settings.alert_budget_per_week)
    for part in parts:
        got = part.outcome
        for name, count in got.seasons.items():
            outcome.seasons[name] = outcome.seasons.get(name, 0) + count
        for reason, count in got.skipped.items():
            outcome.skipped[reason] = outcome.skipped.get(reason, 0) + count
        outcome.skipped_series.extend(got.skipped_series)
        outcome.series += got.series
        outcome.rows += got.rows
        outcome.excluded_rows += got.excluded_rows
        outcome.thresholds.extend(got.thresholds)
    outcome.skipped_series.sort(key=lambda r: int(str(r["series_id"])))
    fit_buckets = [frame for part in parts for frame in part.fit_buckets]
    if fit_buckets and not (series and series.strip()):
        with Store.open(settings=settings) as store:
            metrics = store.detection.series_metrics().set_index("series_id")["metric"]
            models = fit_models(
                pd.concat(fit_buckets, ignore_index=True),  # fit_models sorts the rows
                pd.concat([f for p in parts for f in p.fit_baselines], ignore_index=True),
                metrics,
                settings.detectors,
                max_rows=settings.detector_max_fit_rows,
            )
            store.detection.write_models(_model_rows(models))
        outcome.models = [
            {"metric": m, "detector": f.detector, "n_samples": f.n_samples}
            for m, f in sorted(models.items())
        ]
    return outcome


@task(name="learn-baselines")
def learn_all(
    settings: Settings, window_days: int | None = None, series: str | None = None
) -> BaselineOutcome:
    """Learn baselines for every series with rollups in the window and fit per-metric models,
    in this process (the flow shards the same work across a Dask cluster; see flows/baseline).

    With `series` (a label selector such as `cpu{host="a"}` or `{env="prod"}`), only the
    matching series are relearned and the per-metric models are left as they are."""
    started = time.perf_counter()
    part = learn_shard.fn(settings, run_window(settings, window_days), series)
    outcome = fit_and_merge.fn(settings, [part], series)
    outcome.seconds = time.perf_counter() - started
    log_outcome(outcome)
    return outcome


def log_outcome(outcome: BaselineOutcome) -> None:
    get_run_logger().info(
        "baselines for %d series (%s), %d skipped, %d models",
        outcome.series,
        outcome.seasons,
        sum(outcome.skipped.values()),
        len(outcome.models),
    )


def _sample_rows(buckets: pd.DataFrame, budget: int) -> pd.DataFrame:
    """Whole series (features look back along a series) up to about `budget` rows per chunk."""
    if len(buckets) <= budget:
        return buckets
    ids = buckets["series_id"].unique()
    per_series = max(1, len(buckets) // len(ids))
    take = max(1, budget // per_series)
    chosen = np.random.default_rng(0).choice(ids, size=min(take, len(ids)), replace=False)
    return buckets[buckets["series_id"].isin(chosen)]


def _model_rows(models: dict[str, FittedModel]) -> list[dict[str, object]]:
    now = _now_us()
    return [
        {
            "scope": f"metric:{metric}",
            "detector": fitted.detector,
            "model": fitted.to_bytes(),
            "params": {"features": ["value", "residual", "diff", "spread"]},
            "n_samples": fitted.n_samples,
            "fitted_from": fitted.fitted_from,
            "fitted_to": fitted.fitted_to,
            "fitted_at": now,
        }
        for metric, fitted in models.items()
    ]


def _now_us() -> int:
    return time.time_ns() // 1000
