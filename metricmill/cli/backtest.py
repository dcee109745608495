"""`metricmill backtest FILE.csv --output SCORES.csv`: replay one series through detection.

Registered by metricmill/cli/main.py with `app.add_typer(backtest_app)` (a top-level command).
The replay refits baselines every UTC midnight (detector models weekly) from the rows before
it, as the nightly flow would, and scores each day's rows; a labelled incident the rule alerted
on before a refit is left out of it (alert and incident rows), as the nightly flow leaves out
alerts an operator confirmed as incidents (missed incidents stay in); alerts come from
the same rule engine as the detect flow, with the rule from settings unless options override it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
import typer

from metricmill.cli.common import out, settings_from

if TYPE_CHECKING:
    import pandas as pd

    from metricmill.settings import Settings
    from tasks.alert_engine import AlertRule

backtest_app = typer.Typer()
_DAY_S = 86_400


@backtest_app.command()
def backtest(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="CSV with timestamp,value[,label] of one series.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the scores.")],
    threshold: Annotated[float | None, typer.Option(help="Score that counts as high.")] = None,
    for_seconds: Annotated[
        float | None, typer.Option("--for", help="Seconds the score must stay high to fire.")
    ] = None,
    keep_firing_for: Annotated[
        float | None, typer.Option(help="Seconds of normal scores before resolving.")
    ] = None,
    min_abs_deviation: Annotated[
        float | None, typer.Option(help="|value - expected| below this never counts.")
    ] = None,
    min_baseline_level: Annotated[
        float | None, typer.Option(help="Series whose typical level is below never alert.")
    ] = None,
    window_days: Annotated[
        int | None, typer.Option(min=1, help="Days of history per nightly refit.")
    ] = None,
    detector: Annotated[
        str | None, typer.Option(help="ecod, iforest, copod or hbos (default: settings).")
    ] = None,
    budget: Annotated[
        float | None,
        typer.Option(min=0.001, help="Alerts per week the refits set thresholds for."),
    ] = None,
    direction: Annotated[
        str | None, typer.Option(help="up, down or both: which side may alert (default both).")
    ] = None,
) -> None:
    """Replay a series walk-forward and write every row with anomaly_score and alert."""
    from storage.detection import read_backtest_csv, write_scores_csv
    from tasks.backtest import alerts_for, replay
    from tasks.baseline import LearnParams
    from tasks.detectors import DETECTORS, detector_for

    settings = settings_from(ctx)
    rule = _rule(
        settings,
        direction,
        threshold=threshold,
        for_seconds=for_seconds,
        keep_firing_for_seconds=keep_firing_for,
        min_abs_deviation=min_abs_deviation,
        min_baseline_level=min_baseline_level,
    )
    name = (detector or detector_for("backtest", settings.detectors)).strip().lower()
    if name not in DETECTORS:
        raise typer.BadParameter(f"unknown detector {name!r}: use one of {', '.join(DETECTORS)}")
    rows = read_backtest_csv(file)
    points = rows.assign(series_id=1)[["series_id", "ts_us", "value"]]
    scores = replay(
        points,
        window_days=window_days or settings.baseline_window_days,
        detectors={"*": name},
        max_fit_rows=settings.detector_max_fit_rows,
        params=LearnParams(alert_budget_per_week=budget or settings.alert_budget_per_week),
        confirmed=rows["label"].to_numpy() > 0 if "label" in rows else None,
        confirm_with=rule,
    )
    alert = alerts_for(scores, rule)
    result = rows.assign(
        timestamp=[t.isoformat() for t in _stamps(rows["ts_us"].to_numpy())],
        expected=scores["expected"].to_numpy(),
        lower=scores["lower"].to_numpy(),
        upper=scores["upper"].to_numpy(),
        anomaly_score=scores["score"].to_numpy(),
        alert=alert,
    )
    columns = ["timestamp", "value", "expected", "lower", "upper", "anomaly_score", "alert"]
    if "label" in rows:
        columns.append("label")
    write_scores_csv(result[columns], output)
    _print_summary(rows, scores, alert, output)
    if "label" in rows:
        _print_against_labels(rows, scores, alert, rule)


def _rule(settings: Settings, direction: str | None, **overrides: float | None) -> AlertRule:
    """The default rule with the options the user gave."""
    from tasks.alerting import default_rule

    if direction is not None and direction not in ("up", "down", "both"):
        raise typer.BadParameter("--direction must be up, down or both")
    given: dict[str, Any] = {k: v for k, v in overrides.items() if v is not None}
    if direction is not None:
        given["direction"] = direction
    return dataclasses.replace(default_rule(settings), **given)


def _print_summary(
    rows: pd.DataFrame, scores: pd.DataFrame, alert: np.ndarray, output: Path
) -> None:
    """What was read (duplicates, gaps, order), scored and written."""
    console = out()
    notes = [
        f"{rows.attrs.get('duplicates', 0)} duplicated timestamps (all rows kept, in file order)",
        f"{rows.attrs.get('gaps', 0)} empty values (gaps)",
    ]
    if rows.attrs.get("unsorted"):
        notes.append("rows sorted by time")
    console.print(f"read {rows.attrs.get('rows', len(rows))} rows: " + "; ".join(notes))
    scored = int(np.isfinite(scores["expected"].to_numpy()).sum())
    console.print(
        f"{len(rows)} rows, {scored} scored (the first day only trains), "
        f"{int(alert.sum())} alerting; wrote {output}"
    )


def _print_against_labels(
    rows: pd.DataFrame, scores: pd.DataFrame, alert: np.ndarray, rule: AlertRule
) -> None:
    """Precision, recall, delay and false alerts against the file's label column."""
    from tasks.backtest import evaluate_alerts, label_windows

    console = out()
    step = int(np.median(np.diff(rows["ts_us"].to_numpy()))) if len(rows) > 1 else 1
    windows = label_windows(rows.assign(series_id=1), max(step, 1))
    ev = evaluate_alerts(
        scores, alert, windows, grace_us=int(rule.for_seconds * 1e6) + max(step, 1)
    )
    console.print(f"precision {_fmt(ev.precision)}")
    console.print(
        f"recall {_fmt(ev.recall)} ({int(ev.windows['detected'].sum())} of "
        f"{len(ev.windows)} labelled windows)"
    )
    console.print(f"detection delay (median) {_fmt(ev.median_delay_s)} s")
    console.print(f"false alerts per week {_fmt(ev.false_alerts / max(ev.series_weeks, 1e-9))}")


def _stamps(ts_us: np.ndarray) -> list[Any]:
    import pandas as pd

    return list(pd.to_datetime(ts_us, unit="us", utc=True))


def _fmt(value: float) -> str:
    return "n/a" if value != value else f"{value:.3f}"
