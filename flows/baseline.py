"""The `baseline` flow (nightly): seasonal baselines and per-metric PyOD models from rollups."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect_dask import DaskTaskRunner

from flows.guard import exclusive
from flows.naming import run_name
from metricmill.settings import Settings, load_settings
from tasks.baseline_run import (
    BaselineOutcome,
    fit_and_merge,
    learn_all,
    learn_shard,
    log_outcome,
    run_window,
)


@flow(
    name="baseline",
    flow_run_name=run_name("baseline"),
    description="Learn per-series seasonal baselines and per-metric detectors from rollups.",
    log_prints=False,
)
@exclusive("baseline")  # one run at a time; a run that finds another in progress is Skipped
def baseline(
    database_url: str | None = None,
    home: str | None = None,
    window_days: int | None = None,
    series: str | None = None,
) -> dict[str, Any]:
    """Learn baselines over the last `window_days` (default: the baseline_window_days setting).

    Args:
        database_url: Database URL (sqlite:///PATH or postgresql://USER@HOST:PORT/DB, no
            password: that comes from METRICMILL_DATABASE_PASSWORD or a Secret block). Empty:
            METRICMILL_DATABASE_URL, else the SQLite file in the home directory.
        home: metricmill home directory (landing, archive, quarantine, metricmill.toml).
            Empty: METRICMILL_HOME, else ~/.metricmill.
        window_days: Days of rollups to learn from. Empty: the baseline_window_days setting.
        series: Relearn only the series this label selector matches, e.g.
            cpu_usage_percent{host="web-04"} or {env="prod"}; the per-metric models stay as
            they are. Empty: every series.
    """
    settings = load_settings(database_url=database_url, home=home)
    if settings.detect_dask_address or settings.detect_shards > 1:
        outcome = learn_sharded(settings, window_days, series)
    else:
        outcome = learn_all(settings, window_days, series)
    create_markdown_artifact(
        key="baseline-summary",
        markdown=summary_markdown(outcome),
        description="Series learned per season, series skipped and why, models fitted",
    )
    get_run_logger().info("baseline: %d series in %.1fs", outcome.series, outcome.seconds)
    return {
        "series": outcome.series,
        "seasons": outcome.seasons,
        "skipped": outcome.skipped,
        "models": outcome.models,
        "seconds_per_1000_series": round(outcome.seconds_per_1000, 3),
    }


def learn_sharded(
    settings: Settings, window_days: int | None, series: str | None
) -> BaselineOutcome:
    """The series split into `detect_shards` shards (series_id % shards), a task per shard on
    a Dask cluster (the one at detect_dask_address, else a local one), as the detect flow
    scores them; the models are fitted once, on the shards' samples, after all are done."""
    started = time.perf_counter()
    shards = settings.detect_shards
    window = run_window(settings, window_days)
    runner = (
        DaskTaskRunner(address=settings.detect_dask_address)
        if settings.detect_dask_address
        else DaskTaskRunner(cluster_kwargs={"n_workers": shards, "processes": False})
    )
    with runner:  # chosen from settings at run time, so entered here, not in the decorator
        futures = [
            runner.submit(
                learn_shard,
                {
                    "settings": settings,
                    "window": window,
                    "series": series,
                    "shard": s,
                    "shards": shards,
                },
            )
            for s in range(shards)
        ]
        parts = [f.result() for f in futures]
    outcome = fit_and_merge(settings, parts, series)
    outcome.seconds = time.perf_counter() - started
    log_outcome(outcome)
    return outcome


def summary_markdown(outcome: BaselineOutcome) -> str:
    """The run's artifact: what was learned, what was skipped and why, what was fitted."""
    lines = [
        "## Baselines",
        "",
        "| season | series |",
        "|---|---|",
        *(f"| {name} | {count} |" for name, count in sorted(outcome.seasons.items())),
        "",
        f"Series read: {outcome.series}; baseline rows written: {outcome.rows}; "
        f"buckets left out as confirmed incidents: {outcome.excluded_rows}; "
        f"{outcome.seconds_per_1000:.2f} s per 1000 series.",
        "",
        "## Alert budget",
        "",
        *_threshold_lines(outcome),
        "",
        "## Skipped (no baseline: these series do not alert yet)",
        "",
    ]
    if outcome.skipped:
        lines += ["| reason | series |", "|---|---|"]
        lines += [f"| {reason} | {count} |" for reason, count in sorted(outcome.skipped.items())]
        shown = outcome.skipped_series[:50]
        lines += ["", "First skipped: " + ", ".join(f"{r['series_id']}" for r in shown)]
    else:
        lines.append("None.")
    lines += ["", "## Models", ""]
    if outcome.models:
        lines += ["| metric | detector | rows fitted on |", "|---|---|---|"]
        lines += [f"| {m['metric']} | {m['detector']} | {m['n_samples']} |" for m in outcome.models]
    else:
        lines.append("None fitted (no metric had enough history).")
    return "\n".join(lines)


def _threshold_lines(outcome: BaselineOutcome) -> list[str]:
    """How the budget set the series' effective thresholds (score units, direction both)."""
    if not outcome.thresholds:
        return ["No series learned, no thresholds set."]
    q = np.quantile(np.asarray(outcome.thresholds), [0.0, 0.5, 0.9, 1.0])
    return [
        f"Budget: {outcome.budget:g} alerts per series and week. Each series' effective "
        "threshold is the score its own window exceeded that often (the rule's threshold "
        "applies where it is higher).",
        "",
        "| min | median | 90% | max |",
        "|---|---|---|---|",
        f"| {q[0]:.3f} | {q[1]:.3f} | {q[2]:.3f} | {q[3]:.3f} |",
    ]


if __name__ == "__main__":
    baseline()
