"""The `detect` flow (every 5 minutes): score new points, hand them to the alert rules, then
advance the watermarks — only after the alerts are stored, so a failed run is scored again."""

from __future__ import annotations

from typing import Any

import pandas as pd
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect_dask import DaskTaskRunner

from flows.guard import exclusive
from flows.naming import run_name
from metricmill.secrets import redact
from metricmill.selectors import parse_selector
from metricmill.settings import Settings, load_settings
from storage.store import Store
from tasks.alerting import flow_run_link, process_scores
from tasks.detect import empty_scores, score_shard
from tasks.notify import load_channels


@task(name="advance-watermarks")
def advance(settings: Settings, marks: pd.DataFrame, late_marks: list[int]) -> int:
    """Record how far each series has been scored, and drop the late-sample marks read."""
    with Store.open(settings=settings) as store:
        store.detection.clear_late(late_marks)
        return store.detection.advance_watermarks(marks)


@task(name="plot-opened-alerts")
def plot_opened_alerts(settings: Settings, alert_ids: list[int]) -> None:
    """The `detect-alert-plots` artifact: each alert this run opened, drawn as
    `metricmill alerts show ID --plot` draws it (series, expected band, alert span)."""
    from tasks.alert_plot import alerts_markdown  # imported only when alerts open

    with Store.open(settings=settings) as store:
        markdown = alerts_markdown(store, alert_ids)
    create_markdown_artifact(
        key="detect-alert-plots",
        markdown=markdown,
        description=f"The series of each alert opened by this run ({len(alert_ids)})",
    )


@flow(
    name="detect",
    flow_run_name=run_name("detect"),
    description="Score new points against baselines and models; open, update, resolve alerts.",
    log_prints=False,
)
@exclusive("detect")  # one run at a time; a run that finds another in progress is Skipped
def detect(
    database_url: str | None = None, home: str | None = None, series: str | None = None
) -> dict[str, Any]:
    """Score every series' points newer than its watermark and apply the alert rules.

    Args:
        database_url: Database URL (sqlite:///PATH or postgresql://USER@HOST:PORT/DB, no
            password: that comes from METRICMILL_DATABASE_PASSWORD or a Secret block). Empty:
            METRICMILL_DATABASE_URL, else the SQLite file in the home directory.
        home: metricmill home directory (landing, archive, quarantine, metricmill.toml).
            Empty: METRICMILL_HOME, else ~/.metricmill.
        series: Score only the series this label selector matches, e.g.
            http_server_errors_per_minute{env="prod"} or {host="web-04"}; the others keep
            their watermarks for the next run. Empty: every series.
    """
    logger = get_run_logger()
    settings = load_settings(database_url=database_url, home=home)
    selector = series.strip() if series and series.strip() else None
    if selector:
        parse_selector(selector)  # a malformed selector fails the run before anything changes
    # A notification block that does not exist is a setup mistake: say so before scoring.
    load_channels(settings)
    shards = settings.detect_shards
    if settings.detect_dask_address or shards > 1:
        runner = (
            DaskTaskRunner(address=settings.detect_dask_address)
            if settings.detect_dask_address
            else DaskTaskRunner(cluster_kwargs={"n_workers": shards, "processes": False})
        )
        # The runner is chosen from settings at run time, so it is entered here rather than
        # named in the decorator; one task per shard of series (series_id % shards).
        with runner:
            futures = [
                runner.submit(
                    score_shard,
                    {"settings": settings, "shard": s, "shards": shards, "series": selector},
                )
                for s in range(shards)
            ]
            results = [f.result() for f in futures]
    else:
        results = [score_shard(settings, series=selector)]
    frames = [r.scores for r in results if len(r.scores)]
    scores = (
        pd.concat(frames, ignore_index=True).sort_values(["series_id", "ts_us"], kind="stable")
        if frames
        else empty_scores()
    ).reset_index(drop=True)
    per_series = pd.concat([r.per_series for r in results], ignore_index=True)
    per_series = per_series.drop_duplicates("series_id").sort_values("series_id")
    summary = process_scores(settings, scores, series=per_series, flow_run_url=flow_run_link())
    marks = pd.concat([r.marks for r in results], ignore_index=True)
    advanced = advance(settings, marks, [i for r in results for i in r.late_marks])
    report = {
        "series": sum(r.series for r in results),
        "points": sum(r.points for r in results),
        "scored": len(scores),
        "no_baseline": sorted(i for r in results for i in r.no_baseline),
        "high_scores": int((scores["score"] >= 0.7).sum()),
        "fired": summary.fired,
        "resolved": summary.resolved,
        "open_alerts": summary.open_alerts,
        "watermarks": advanced,
        "shards": len(results),
        "notes": [n for r in results for n in r.notes],
    }
    create_markdown_artifact(
        key="detect-summary", markdown=summary_markdown(report), description="What detect did"
    )
    transitions = summary.transitions
    opened = (
        [int(i) for i in transitions.loc[transitions["event"] == "firing", "alert_id"]]
        if len(transitions)
        else []
    )
    if opened:
        try:
            plot_opened_alerts(settings, opened)
        except Exception as exc:  # the alerts are stored and sent: a picture must not fail the run
            logger.warning("could not attach the alert pictures: %s", redact(str(exc)))
    logger.info("detect: %d points of %d series scored", report["scored"], report["series"])
    return report


def summary_markdown(report: dict[str, Any]) -> str:
    """The run's artifact."""
    waiting = report["no_baseline"]
    lines = [
        "## Detect",
        "",
        "| | |",
        "|---|---|",
        f"| series with new points | {report['series']} |",
        f"| points scored | {report['scored']} |",
        f"| points with score >= 0.7 | {report['high_scores']} |",
        f"| alerts fired / resolved | {report['fired']} / {report['resolved']} |",
        f"| open alerts | {report['open_alerts']} |",
        f"| shards | {report['shards']} |",
        "",
        f"Series without a baseline yet (not scored, no alerts): {len(waiting)}"
        + (": " + ", ".join(map(str, waiting[:50])) if waiting else ""),
    ]
    lines += [f"- {note}" for note in report["notes"]]
    return "\n".join(lines)


if __name__ == "__main__":
    detect()
