"""Operator commands: `metricmill serve` and `metricmill status` (`doctor` has its own module).

Registered by metricmill/cli/main.py with `app.add_typer(ops_app)` (no group name: the commands
sit at the top level). Prefect is imported inside the commands: it is slow to import.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import typer
from rich.text import Text

from metricmill.cli.common import (
    GlobalOptions,
    format_time,
    one_line,
    out,
    print_stats,
    row,
    settings_from,
    table,
)
from metricmill.errors import MetricmillError
from metricmill.settings import (
    MEMORY_URL,
    Settings,
)
from metricmill.types import datetime_to_us
from storage.landing import quarantined_files

ops_app: typer.Typer = typer.Typer()


# -- serve ------------------------------------------------------------------------------------
@ops_app.command()
def serve(
    ctx: typer.Context,
    flow: Annotated[
        list[str] | None,
        typer.Option("--flow", help="Serve only this flow (repeatable); default: all."),
    ] = None,
    limit: Annotated[
        int | None, typer.Option(min=1, help="At most N runs at once in this process.")
    ] = None,
    every: Annotated[
        int | None,
        typer.Option(
            min=5,
            metavar="SECONDS",
            help="Run the served flows every SECONDS instead of on their schedules (trials).",
        ),
    ] = None,
) -> None:
    """Serve every flow as a scheduled deployment until Ctrl-C or SIGTERM (see the Prefect UI)."""
    from deployments.schedules import SCHEDULES
    from deployments.serve import build_deployments, serve_all

    options = ctx.find_object(GlobalOptions) or GlobalOptions()
    settings = settings_from(ctx)
    if settings.database_url == MEMORY_URL:
        raise MetricmillError("serve needs a database file or server, not an in-memory database")
    settings.ensure_dirs()
    # Served runs are child processes: they read the settings from the environment. Only the
    # values the user gave are passed on (never written into Prefect as parameters).
    if options.home is not None:
        os.environ["METRICMILL_HOME"] = str(settings.home)
    if options.database is not None:
        os.environ["METRICMILL_DATABASE_URL"] = options.database
    interval = timedelta(seconds=every) if every else None
    try:
        deployments, missing = build_deployments(flow, every=interval)
    except ValueError as exc:
        raise MetricmillError(str(exc)) from None
    console = out()
    from deployments.inspect import api_problem

    problem = api_problem()
    if problem:
        console.print(
            Text(f"warning: {problem}; runs will not be visible in a Prefect UI", "yellow")
        )
    by_flow = {s.flow: s for s in SCHEDULES}
    for deployment in deployments:
        schedule = by_flow[deployment.flow_name or ""]
        when = f"every {every} s" if every else f"cron {schedule.cron!r} UTC"
        console.print(f"serving {deployment.full_name}  ({when})")
    for name in missing:
        console.print(Text(f"warning: flow {name!r} is not available yet: not served", "yellow"))
    if not deployments:
        raise MetricmillError("no flow to serve")
    if not problem:
        from deployments.inspect import api_url

        ui = (api_url() or "").removesuffix("/api")
        console.print(f"Prefect UI: {ui}/deployments; stop with Ctrl-C or SIGTERM")
    stopped_by = serve_all(flow, limit=limit, every=interval)
    console.print(f"metricmill serve: stopped ({stopped_by})")


# -- status -----------------------------------------------------------------------------------
def ago(when: datetime | None, now: datetime) -> str:
    if when is None:
        return "-"
    seconds = max((now - when).total_seconds(), 0.0)
    if seconds < 120:
        text = f"{seconds:.0f}s"
    elif seconds < 7200:
        text = f"{seconds / 60:.0f}m"
    elif seconds < 172800:
        text = f"{seconds / 3600:.1f}h"
    else:
        text = f"{seconds / 86400:.1f}d"
    return f"{format_time(when)} ({text} ago)"


@ops_app.command()
def status(ctx: typer.Context) -> None:
    """Last run of each flow, ingest and rollup lag, open alerts, quarantine, storage."""
    from deployments.schedules import SCHEDULES
    from storage.locks import lock_holders
    from storage.store import Store

    settings = settings_from(ctx)
    now = datetime.now(UTC)
    with Store.open(settings=settings) as store:
        snap = store.ops.snapshot(now_us=datetime_to_us(now))
        info = store.stats()
    running = set(lock_holders(settings))
    console = out()

    runs, problem = flow_runs([s.flow for s in SCHEDULES])
    rows: list[tuple[str, ...]] = []
    for schedule in SCHEDULES:
        last = runs.get(schedule.flow)
        note = "running now (holds its lock)" if schedule.flow in running else ""
        if last is None:
            rows.append((schedule.flow, schedule.cron, "-", "-", "-", note))
            continue
        note = "; ".join(x for x in (note, last.message) if x)
        started = format_time(last.started)
        rows.append((schedule.flow, schedule.cron, last.name, last.state, started, note))
    with_notes = any(r[-1] for r in rows)  # no always-empty column
    flows = table(
        "flow",
        "schedule (UTC)",
        "last run",
        "state",
        "started",
        *(["note"] if with_notes else []),
        title="flows" + (f" — Prefect API: {problem}" if problem else ""),
    )
    for cells in rows:
        row(flows, *(cells if with_notes else cells[:-1]))
    console.print(flows)

    pipeline = table("", "", title="pipeline", show_header=False)
    row(pipeline, "last batch written", ago(snap.last_batch_at, now))
    row(pipeline, "batches in the last 24h", snap.batches_24h)
    row(pipeline, "newest sample", ago(snap.newest_sample, now))
    row(pipeline, "newest 1m rollup bucket", ago(snap.newest_rollup_1m, now))
    pending = f"{snap.pending_ranges}"
    if snap.pending_ranges:
        pending += (
            f" (data from {format_time(snap.oldest_pending_start)}, "
            f"waiting since {ago(snap.oldest_pending_since, now)})"
        )
    row(pipeline, "pending rollup ranges", pending)
    alerts = ", ".join(f"{sev}: {n}" for sev, n in sorted(snap.open_alerts.items())) or "none"
    row(pipeline, "open alerts", alerts)
    files = quarantined_files(settings.quarantine)
    row(pipeline, "quarantine", f"{snap.quarantined_rows} rows pending replay, {len(files)} files")
    stuck, errors = stuck_files(settings)
    if stuck:
        row(pipeline, "stuck in processing", stuck)
        if errors:
            row(pipeline, "last write errors", errors)
    from metricmill.cli.receive import receiver_status

    row(pipeline, "push receiver backlog", receiver_status(settings))
    console.print(pipeline)
    print_stats(info)


def flow_runs(names: list[str]) -> tuple[dict[str, Any], str | None]:
    """Last runs by flow from the Prefect API, or ({}, why not)."""
    from deployments.inspect import api_problem, last_runs

    problem = api_problem()
    if problem:
        return {}, problem
    try:
        return last_runs(names), None
    except Exception as exc:  # an API that answers /health but fails a query: still report
        return {}, one_line(exc)


def stuck_files(settings: Settings) -> tuple[str, str]:
    """("" or a summary of files that runs left in landing/processing/, the last errors the
    ledger holds for them)."""
    from storage.landing import stale_files
    from storage.store import Store

    stale = stale_files(settings.landing)
    if not stale:
        return "", ""
    tries = max(n for _, n in stale)
    summary = (
        f"{len(stale)} files left in {settings.landing / 'processing'} by runs that did not "
        f"finish them (runs that died decoding one: {tries}; the next run takes them up, "
        "a file is quarantined after 3)"
    )
    names = {f"file:{path.name}" for path, _ in stale}
    try:
        with Store.open(settings=settings, init=False) as store:
            failed = [f for f in store.failed_batches() if f[1] in names]
    except MetricmillError:
        failed = []
    errors = "; ".join(f"{source[5:]}: {error} (failed {n}x)" for _, source, error, n in failed)
    return summary, errors
