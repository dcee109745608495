"""`metricmill demo`: the whole pipeline on realistic data, as real Prefect flow runs.

History is landed as files in every supported format and ingested, rolled up and learned from;
then a few "live" hours with injected incidents arrive, are ingested and rolled up, and detect
scores them; retention archives the older half of the history. The summary scores the alerts
against the incidents that were injected.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

import pandas as pd
import typer
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.text import Text

from metricmill.cli.common import GlobalOptions, out, row, settings_from, table
from metricmill.demo import DemoData, Incident, generate, land_files
from metricmill.errors import MetricmillError
from metricmill.settings import Settings
from storage.archive_root import archive_root

demo_app: typer.Typer = typer.Typer()

# Incidents count as found by an alert on their metric and host that starts in this window.
EARLY = timedelta(minutes=10)
LATE = timedelta(minutes=30)


@dataclass
class DemoOutcome:
    settings: Settings
    data: DemoData
    files: list[Path]
    runs: list[tuple[str, str, float]] = field(default_factory=list)  # flow, state, seconds
    results: dict[str, Any] = field(default_factory=dict)
    found: list[tuple[Incident, str]] = field(default_factory=list)
    missed: list[Incident] = field(default_factory=list)
    false_alerts: list[str] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    baselines: int = 0
    archive_files: int = 0
    elapsed: float = 0.0
    retention_days: int = 7


@contextmanager
def demo_environment(settings: Settings, retention_days: int, lookback: int, verbose: bool) -> (
    Iterator[None]
):  # fmt: skip
    """The settings the demo's flow runs read from the environment, restored afterwards."""
    values = {
        "METRICMILL_HOME": str(settings.home),
        "METRICMILL_DATABASE_URL": settings.database_url,
        "METRICMILL_SETTLE_SECONDS": "0",  # the demo's files are complete when written
        "METRICMILL_DETECT_LOOKBACK_MINUTES": str(lookback),
        # Generous while history is ingested (older rows would be quarantined as too old);
        # the retention step then runs with `retention_days` (see run_pipeline).
        "METRICMILL_RETENTION_DAYS": str(retention_days * 4 + 3),
        # The history is a backfill of a known size (about 30k samples an hour per 50 hosts):
        # day-long rollup transactions, not the default's six hours.
        "METRICMILL_ROLLUP_CHUNK_HOURS": "24",
    }
    if not verbose:
        values["PREFECT_LOGGING_LEVEL"] = "WARNING"
    else:  # GX's INFO lines too (tasks/quality.py quiets them when nobody set a level)
        logging.getLogger("great_expectations").setLevel(logging.INFO)
    # The temporary server's usage report only fails, loudly, on machines without internet.
    values["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    if not os.environ.get("PREFECT_API_URL"):
        # Flow runs go to Prefect's temporary local server; on a busy machine it starts slowly.
        values["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "180"
    saved = {k: os.environ.get(k) for k in values}
    keep = {k for k in values if k.startswith("PREFECT_") and saved[k] is not None}
    os.environ.update({k: v for k, v in values.items() if k not in keep})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def run_flow(outcome: DemoOutcome, progress: Progress, label: str, call: Callable[[], Any]) -> Any:
    """Run one flow (a real Prefect flow run); a run that does not complete stops the demo."""
    task = progress.add_task(label, total=None)
    started = time.perf_counter()
    state = call()
    seconds = time.perf_counter() - started
    outcome.runs.append((label, state.name, seconds))
    progress.update(task, description=f"{label}: {state.name} ({seconds:.1f} s)", total=1,
                    completed=1)  # fmt: skip
    if not state.is_completed() or state.name == "Skipped":
        raise MetricmillError(f"demo stopped: {label} ended {state.name}: {state.message}")
    return state.result()


def _pending_ranges(settings: Settings) -> int:
    from storage.store import Store

    with Store.open(settings=settings) as store:
        return store.rollups.pending_ranges()


def run_with_rollups(
    outcome: DemoOutcome, progress: Progress, label: str, ingest_call: Callable[[], Any],
    rollup_call: Callable[[], Any],
) -> tuple[Any, list[Any]]:  # fmt: skip
    """The ingest flow run, with rollup flow runs following it one after another (as the
    scheduled rollup deployment does on a server), and one more after it to finish.

    The rollup's SQL then works while the ingest parses and checks its next files: the two
    cores both work. Both flows are built for this; the database orders their transactions."""
    from prefect.states import State

    finished = threading.Event()
    rollup_states: list[State[Any]] = []
    rollup_error: list[BaseException] = []
    task = progress.add_task("rollup (following the ingest)", total=None)
    seconds = [0.0]

    def follow() -> None:
        try:
            while True:
                done = finished.is_set()  # read before the run: its last run sees all rows
                if _pending_ranges(outcome.settings):
                    started = time.perf_counter()
                    state = rollup_call()
                    seconds[0] += time.perf_counter() - started
                    rollup_states.append(state)
                    progress.update(task, description=f"rollup: {len(rollup_states)} run(s), "
                                    f"{seconds[0]:.1f} s")  # fmt: skip
                    if not state.is_completed() or state.name == "Skipped":
                        return
                elif done:
                    return
                else:
                    finished.wait(0.5)
        except BaseException as exc:  # reported by the caller, in its thread
            rollup_error.append(exc)

    follower = threading.Thread(target=follow, name="demo-rollup", daemon=True)
    follower.start()
    try:
        ingested = run_flow(outcome, progress, label, ingest_call)
    finally:
        finished.set()
        follower.join()
    if rollup_error:
        raise rollup_error[0]
    bad = [s for s in rollup_states if not s.is_completed() or s.name == "Skipped"]
    outcome.runs.append(
        (f"rollup ×{len(rollup_states)}", str(bad[0].name) if bad else "Completed", seconds[0])
    )
    progress.update(task, total=1, completed=1)
    if bad:
        raise MetricmillError(f"demo stopped: rollup ended {bad[0].name}: {bad[0].message}")
    return ingested, [s.result() for s in rollup_states]


# What the pipeline imports, 20 s and more on a small machine: the first flows and Great
# Expectations (for the ingest check) while the data is landed, the others (PyOD and
# scikit-learn for baselines) while the history is ingested.
WARM_UP_FIRST = ("flows.ingest", "flows.rollup", "great_expectations")
WARM_UP_LATER = ("flows.baseline", "flows.detect", "flows.retention")


def warm_up(modules: tuple[str, ...]) -> None:
    """Import the modules in a thread. Whatever fails here fails again, reported, where the
    pipeline imports it."""
    import importlib

    def imports() -> None:
        for name in modules:
            try:
                importlib.import_module(name)
            except Exception:
                return

    threading.Thread(target=imports, name="demo-imports", daemon=True).start()


def start_prefect_server() -> threading.Thread | None:
    """Start what takes long before the first flow run, in threads, while the data is
    generated and landed: the first imports and, without PREFECT_API_URL, Prefect's temporary
    server (its process takes 15-20 s to answer)."""
    warm_up(WARM_UP_FIRST)
    if os.environ.get("PREFECT_API_URL"):
        return None

    def start() -> None:
        try:
            from prefect.server.api.server import SubprocessASGIServer

            SubprocessASGIServer().start()
        except Exception:
            return  # the first flow run starts it again, and reports what fails

    thread = threading.Thread(target=start, name="demo-prefect-server", daemon=True)
    thread.start()
    return thread


def run_pipeline(
    outcome: DemoOutcome, progress: Progress, server: threading.Thread | None = None
) -> None:
    settings, data = outcome.settings, outcome.data
    step = progress.add_task("land history files (NDJSON, CSV, Parquet, line protocol, gzip)")
    outcome.files = land_files(data, settings.landing, data.times[0].to_pydatetime(),
                               data.live_start)  # fmt: skip
    progress.update(step, total=1, completed=1)
    # Imported where needed (start_prefect_server began importing them in the background).
    from flows.ingest import ingest, run_to_end
    from flows.rollup import rollup
    from tasks.ingest import prepare_store

    results = outcome.results
    prepare_store.fn(settings)  # the schema, before two flows open the database side by side
    if server is not None:
        server.join()  # before the first flow run, which would otherwise start a second one
    warm_up(WARM_UP_LATER)
    results["ingest"], results["rollup"] = run_with_rollups(
        outcome, progress, "ingest history",
        lambda: run_to_end(ingest(scrape=False, return_state=True)),
        lambda: rollup(return_state=True),
    )  # fmt: skip
    from flows.baseline import baseline
    from flows.detect import detect
    from flows.retention import retention

    results["baseline"] = run_flow(outcome, progress, "baseline",
                                   lambda: baseline(return_state=True))  # fmt: skip
    step = progress.add_task("land the live hours (with incidents)")
    outcome.files += land_files(data, settings.landing, data.live_start,
                                data.times[-1].to_pydatetime() + timedelta(minutes=1))  # fmt: skip
    progress.update(step, total=1, completed=1)
    results["ingest live"] = run_flow(
        outcome,
        progress,
        "ingest live",
        lambda: run_to_end(ingest(scrape=False, return_state=True)),
    )
    results["rollup live"] = run_flow(outcome, progress, "rollup live",
                                      lambda: rollup(return_state=True))  # fmt: skip
    results["detect"] = run_flow(outcome, progress, "detect",
                                 lambda: detect(return_state=True))  # fmt: skip
    os.environ["METRICMILL_RETENTION_DAYS"] = str(outcome.retention_days)
    results["retention"] = run_flow(outcome, progress, "retention",
                                    lambda: retention(return_state=True))  # fmt: skip


def score_alerts(outcome: DemoOutcome) -> None:
    """Match alerts to the injected incidents: found, missed, and alerts with no incident."""
    from storage.store import Store

    with Store.open(settings=outcome.settings) as store:
        alerts = store.alerts.find(limit=1_000_000)
        series = store.series()
        outcome.stats = store.stats()
        outcome.baselines = int(outcome.stats["tables"].get("baselines", {}).get("rows", 0))
    info = {
        int(sid): (metric, labels)
        for sid, metric, labels in zip(
            series["series_id"], series["metric"], series["labels"], strict=True
        )  # fmt: skip
    }
    matched: set[int] = set()
    for incident in outcome.data.incidents:
        hit = None
        for alert_id, sid, started in zip(
            alerts["alert_id"], alerts["series_id"], alerts["started_at"], strict=True
        ):
            metric, labels = info.get(int(sid), ("?", {}))
            when = pd.Timestamp(int(started), unit="us", tz="UTC")
            if (
                metric == incident.metric
                and labels.get("host") == incident.host
                and incident.start - EARLY <= when <= incident.end + LATE
            ):
                matched.add(int(alert_id))
                hit = hit or f"alert {alert_id} at {when:%H:%M}"
        if hit:
            outcome.found.append((incident, hit))
        else:
            outcome.missed.append(incident)
    for alert_id, sid in zip(alerts["alert_id"], alerts["series_id"], strict=True):
        if int(alert_id) not in matched:
            metric, labels = info.get(int(sid), ("?", {}))
            outcome.false_alerts.append(f"{metric}{{host={labels.get('host', '?')}}}")
    outcome.archive_files = len(archive_root(outcome.settings).parts())


def print_summary(outcome: DemoOutcome, prefix: str) -> None:
    console = out()
    data, stats = outcome.data, outcome.stats
    summary = table("", "", title="metricmill demo: what happened", show_header=False)
    row(summary, "generated", f"{data.samples:,} samples: {len(data.hosts)} hosts × "
        f"{data.series // len(data.hosts)} metrics, 1-minute resolution, "
        f"{len(data.times) // 1440} days")  # fmt: skip
    kinds = sorted({p.name.split(".", 1)[1] for p in outcome.files})
    row(summary, "landed files", f"{len(outcome.files)} ({', '.join(kinds)})")
    row(
        summary, "samples stored", f"{stats.get('samples', 0):,} in {stats.get('series', 0)} series"
    )
    levels = ("rollup_1m", "rollup_5m", "rollup_1h", "rollup_1d")
    rollups = {k: v["rows"] for k, v in stats.get("tables", {}).items() if k in levels}
    row(summary, "rollups", ", ".join(f"{k}: {v:,}" for k, v in rollups.items()))
    row(summary, "baselines learned", f"{outcome.baselines:,} (series × seasonal slot)")
    found, total = len(outcome.found), len(data.incidents)
    row(summary, "incidents found", f"{found} of {total}")
    row(summary, "incidents missed", len(outcome.missed))
    shown = ", ".join(sorted(set(outcome.false_alerts))[:4])
    more = "" if len(set(outcome.false_alerts)) <= 4 else ", …"
    row(summary, "false alerts", f"{len(outcome.false_alerts)}" + (f" ({shown}{more})" if shown
        else ""))  # fmt: skip
    row(summary, "archive files written", outcome.archive_files)
    row(summary, "database", f"{outcome.settings.masked_database_url} ({stats.get('backend')})")
    row(summary, "took", f"{outcome.elapsed:.1f} s")
    console.print(summary)

    grid = table("incident", "host", "metric", "from (UTC)", "result", title="injected incidents")
    hits = {id(i): how for i, how in outcome.found}
    for incident in data.incidents:
        row(grid, incident.what, incident.host, incident.metric, f"{incident.start:%Y-%m-%d %H:%M}",
            f"found: {hits[id(incident)]}" if id(incident) in hits else "missed")  # fmt: skip
    console.print(grid)
    runs = table("flow run", "state", "seconds", title="flow runs (Prefect)")
    for label, state, seconds in outcome.runs:
        row(runs, label, state, f"{seconds:.1f}")
    console.print(runs)
    console.print(Text("next steps", style="bold"))
    incident = data.incidents[0]
    for command in (
        "uv run prefect server start   # then open http://127.0.0.1:4200 to browse the runs "
        "(for later runs: export PREFECT_API_URL=http://127.0.0.1:4200/api)",
        f"{prefix} alerts list",
        f"{prefix} query '{incident.metric}{{host=\"{incident.host}\"}}' --start -4h --step 5m "
        "--agg max",
        f"{prefix} status",
        f"{prefix} serve   # every flow on its schedule",
    ):
        console.print(Text(f"  {command}"), soft_wrap=True)


@demo_app.command()
def demo(
    ctx: typer.Context,
    home: Annotated[
        Path | None, typer.Option(help="Home for the demo (default: a new temporary one).")
    ] = None,
    database: Annotated[
        str | None,
        typer.Option(help="Run against this database instead, e.g. postgresql://USER@HOST/DB."),
    ] = None,
    # The default (10M samples) runs in under 3 minutes on two cores; --hosts 4 --days 4 in 1.
    hosts: Annotated[int, typer.Option(min=2, max=1000)] = 50,
    days: Annotated[int, typer.Option(min=3, max=60)] = 14,
    verbose: Annotated[bool, typer.Option(help="Show Prefect's flow and task logs.")] = False,
) -> None:
    """Generate realistic metrics with incidents and run the whole pipeline as Prefect flows."""
    started = time.perf_counter()
    options = ctx.find_object(GlobalOptions) or GlobalOptions()
    chosen = home or options.home
    home = (chosen or Path(tempfile.mkdtemp(prefix="metricmill-demo-"))).expanduser().resolve()
    url = database or options.database or f"sqlite:///{home / 'metrics.db'}"
    settings = settings_from(ctx, home=home, database_url=url)
    settings.ensure_dirs()
    live_minutes, retention_days = 180, max(days // 2, 1)
    with demo_environment(settings, retention_days, live_minutes + 30, verbose):
        server = start_prefect_server()  # boots while the data is generated and landed
        data = generate(hosts, days, live_minutes=live_minutes)
        outcome = DemoOutcome(settings=settings, data=data, files=[],
                              retention_days=retention_days)  # fmt: skip
        console = out()
        console.print(Text(f"metricmill demo in {home}", style="bold"))
        progress = Progress(
            SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console
        )
        with progress:
            run_pipeline(outcome, progress, server)
    score_alerts(outcome)
    outcome.elapsed = time.perf_counter() - started
    prefix = f"uv run metricmill --home {home}"
    if database or options.database:
        prefix += " --database URL"
    print_summary(outcome, prefix)
