"""Operator commands: `metricmill serve`, `metricmill status` and `metricmill doctor`.

Registered in metricmill/cli.py with `app.add_typer(ops_app)` (no group name: the commands
sit at the top level). Prefect is imported inside the commands: it is slow to import.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.text import Text

from metricmill.cli import (
    GlobalOptions,
    format_time,
    one_line,
    out,
    print_stats,
    quarantined_files,
    row,
    settings_from,
    table,
)
from metricmill.errors import MetricmillError
from metricmill.settings import (
    MEMORY_URL,
    Settings,
    config_file_path,
    load_settings_past_errors,
)
from metricmill.types import datetime_to_us

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
    from storage.ops import snapshot
    from storage.store import Store

    settings = settings_from(ctx)
    now = datetime.now(UTC)
    with Store.open(settings=settings) as store:
        snap = snapshot(store.backend, now_us=datetime_to_us(now))
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
    files = quarantined_files(settings)
    row(pipeline, "quarantine", f"{snap.quarantined_rows} rows pending replay, {len(files)} files")
    stuck, errors = stuck_files(settings)
    if stuck:
        row(pipeline, "stuck in processing", stuck)
        if errors:
            row(pipeline, "last write errors", errors)
    from metricmill.cli_receive import receiver_status

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


# -- doctor -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Check:
    name: str
    ok: bool | None  # None: not applicable / informational
    detail: str
    fix: str = ""


def check_directories(settings: Settings) -> list[Check]:
    checks = []
    dirs = [
        ("home", "METRICMILL_HOME", settings.home),
        ("landing directory", "METRICMILL_LANDING_DIR", settings.landing),
        ("archive directory", "METRICMILL_ARCHIVE_DIR", settings.archive_dir),
        ("quarantine directory", "METRICMILL_QUARANTINE_DIR", settings.quarantine),
        ("export directory", "METRICMILL_EXPORT_DIR", settings.exports),
    ]
    for label, env, path in dirs:
        if isinstance(path, str):  # the archive in object storage: write a probe object there
            checks.append(check_archive_store(settings))
            continue
        assert path is not None
        problem = writable_problem(path)
        fix = f"make {path} writable for this user (chmod/chown), or set {env} elsewhere"
        checks.append(
            Check(label, problem is None, problem or str(path), "" if not problem else fix)
        )
    return checks


def check_archive_store(settings: Settings) -> Check:
    from storage.archive_root import ArchiveError, archive_root

    try:
        archive_root(settings).probe(lock=settings.archive_lock_days > 0)
    except ArchiveError as exc:
        fix = "check METRICMILL_ARCHIVE_S3_ENDPOINT, _REGION, the keys and the bucket"
        return Check("archive (object store)", False, one_line(exc), fix)
    return Check("archive (object store)", True, str(settings.archive_url))


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


def check_landing(settings: Settings) -> list[Check]:
    from storage.landing import LandingError, real_directory

    checks: list[Check] = []
    if not settings.landing.is_dir():
        return checks  # the directory check above says what is wrong with it
    for sub in ("processing", "done"):
        try:
            real_directory(settings.landing / sub)
        except (LandingError, OSError) as exc:
            checks.append(
                Check(f"landing/{sub}", False, one_line(exc), "replace it by a real directory")
            )
    summary, errors = stuck_files(settings)
    if summary:
        detail = summary + (f"; last errors: {errors}" if errors else "")
        checks.append(
            Check(
                "landing backlog",
                False,
                detail,
                "see the ingest run's logs; `metricmill status` lists the files",
            )
        )
    else:
        checks.append(Check("landing backlog", True, "no file left in processing/"))
    return checks


def writable_problem(path: Path) -> str | None:
    """None when files can be created in `path` (created first if missing)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".doctor-"):
            pass
    except OSError as exc:
        return f"{path} is not writable: {exc.strerror or type(exc).__name__}"
    return None


def check_database(settings: Settings) -> list[Check]:
    from storage.ops import compressed_hypertables, timescale_jobs
    from storage.postgres import PostgresBackend
    from storage.schema import LATEST_VERSION
    from storage.store import Store

    url = settings.masked_database_url
    try:
        store = Store.open(settings=settings, init=False)
    except MetricmillError as exc:
        return [
            Check(
                "database",
                False,
                one_line(exc),
                "start the database or fix METRICMILL_DATABASE_URL / --database "
                "(postgresql://USER@HOST:PORT/DB or sqlite:///PATH)",
            )
        ]
    with store:
        checks = [Check("database", True, f"{url} ({store.backend_name})")]
        version = store.schema_version()
        checks.append(
            Check(
                "schema",
                version == LATEST_VERSION,
                f"version {version}, this metricmill needs {LATEST_VERSION}",
                "" if version == LATEST_VERSION else "run `metricmill init`",
            )
        )
        # Without the tables a write probe can only fail for that same reason: skip it.
        health = store.health() if version == LATEST_VERSION else None
        probe = [p for p in health.problems if p.startswith("write probe")] if health else []
        checks.append(
            Check(
                "database writes",
                None if health is None else not probe,
                probe[0] if probe else ("write probe ok" if health else "not checked (no schema)"),
                "grant this user INSERT on the metricmill tables" if probe else "",
            )
        )
        backend = store.backend
        if not isinstance(backend, PostgresBackend):
            checks.append(Check("TimescaleDB", None, "not applicable (SQLite)"))
            return checks
        if not backend.timescale:
            needed = settings.timescaledb == "require"
            checks.append(
                Check(
                    "TimescaleDB",
                    False if needed else None,
                    f"off ({backend.timescale_note or 'disabled by METRICMILL_TIMESCALEDB=off'})",
                    "install timescaledb, add it to shared_preload_libraries, restart "
                    "PostgreSQL, then run `metricmill init`"
                    if needed
                    else "",
                )
            )
            return checks
        checks.append(Check("TimescaleDB", True, f"extension {backend.timescale_version}"))
        hypertables = compressed_hypertables(backend)
        missing = [h for h, compressed in hypertables if not compressed]
        checks.append(
            Check(
                "hypertables",
                bool(hypertables) and not missing,
                f"{len(hypertables)} hypertables"
                + (f"; compression off on {', '.join(missing)}" if missing else ", compression on"),
                "" if hypertables and not missing else "run `metricmill init` to convert tables",
            )
        )
        jobs = timescale_jobs(backend)
        unscheduled = [f"{p} on {h}" for p, h, scheduled in jobs if not scheduled]
        checks.append(
            Check(
                "TimescaleDB policies",
                None if not jobs else not unscheduled,
                ", ".join(sorted({f"{p} on {h}" for p, h, _ in jobs})) or "no background policies",
                f"resume them: SELECT alter_job(job_id, scheduled => true) for {unscheduled}"
                if unscheduled
                else "",
            )
        )
    return checks


def block_names(settings: Settings) -> list[str]:
    """Every Prefect block a setting names (settings ending in _block or _blocks)."""
    names: list[str] = []
    for field_name in type(settings).model_fields:
        value = getattr(settings, field_name)
        if field_name.endswith("_block") and isinstance(value, str) and value:
            names.append(value)
        elif field_name.endswith("_blocks") and isinstance(value, list | tuple):
            names.extend(str(v) for v in value if v)
    return names


def check_prefect(settings: Settings) -> list[Check]:
    from deployments.inspect import api_problem, missing_blocks

    names = block_names(settings)
    problem = api_problem()
    if problem:
        checks = [
            Check(
                "Prefect API",
                None,
                problem,
                "for the UI and schedules: export PREFECT_API_URL=http://127.0.0.1:4200/api "
                "and PREFECT_SERVER_ANALYTICS_ENABLED=false, then `prefect server start`",
            )
        ]
        if names:
            checks.append(
                Check(
                    "notification blocks",
                    False,
                    f"cannot check {', '.join(names)}",
                    "set PREFECT_API_URL to the server that holds the blocks",
                )
            )
        return checks
    checks = [Check("Prefect API", True, "reachable")]
    if not names:
        return [*checks, Check("notification blocks", None, "none configured")]
    try:
        absent = missing_blocks(names)
    except Exception as exc:
        return [*checks, Check("notification blocks", False, one_line(exc), "check the server")]
    checks.append(
        Check(
            "notification blocks",
            not absent,
            f"missing: {', '.join(absent)}" if absent else f"found: {', '.join(names)}",
            "create them in the Prefect UI (Blocks) or with `prefect block create`, or fix "
            "the block names in the settings"
            if absent
            else "",
        )
    )
    return checks


@ops_app.command()
def doctor(ctx: typer.Context) -> None:
    """Check settings, database, TimescaleDB, notification blocks and directories; exit 1 on a
    failed check, each with the fix."""
    checks: list[Check] = []
    try:
        settings = settings_from(ctx)
    except MetricmillError as exc:
        checks.append(
            Check(
                "settings",
                False,
                one_line(exc),
                "fix the named METRICMILL_* variable or its key in metricmill.toml",
            )
        )
        # The other checks still run, with the invalid settings at their defaults.
        options = ctx.find_object(GlobalOptions) or GlobalOptions()
        fallback, defaulted = load_settings_past_errors(
            home=options.home, database_url=options.database
        )
        if fallback is None:
            checks.append(
                Check("other checks", None, "not run: the settings cannot be read at all")
            )
            print_checks(checks)
            raise typer.Exit(1) from None
        names = ", ".join(f"METRICMILL_{name.upper()}" for name in defaulted)
        checks.append(Check("settings used", None, f"defaults in place of {names}"))
        checks.extend(run_checks(fallback))
        print_checks(checks)
        raise typer.Exit(1) from None
    config = config_file_path(settings.home)
    source = f"file {config}" if config else "environment and defaults, no metricmill.toml"
    checks.append(Check("settings", True, f"valid (home {settings.home}; {source})"))
    checks.extend(run_checks(settings))
    print_checks(checks)
    if any(c.ok is False for c in checks):
        raise typer.Exit(1)


def run_checks(settings: Settings) -> list[Check]:
    """Every check after the settings one: directories, database, landing, Prefect."""
    checks: list[Check] = []
    if settings.database_url != MEMORY_URL:
        checks.extend(check_directories(settings))
    checks.extend(check_database(settings))
    if settings.database_url != MEMORY_URL:
        checks.extend(check_landing(settings))
    checks.extend(check_prefect(settings))
    return checks


def print_checks(checks: list[Check]) -> None:
    failed = sum(c.ok is False for c in checks)
    grid = table(
        "check",
        "result",
        "detail",
        title=f"doctor: {'all checks passed' if not failed else f'{failed} failed'}",
    )
    for check in checks:
        result = {True: "ok", False: "FAIL", None: "-"}[check.ok]
        row(grid, check.name, result, check.detail)
    console = out()
    console.print(grid)
    for check in checks:
        if check.ok is False and check.fix:
            console.print(Text(f"fix {check.name}: {check.fix}"), soft_wrap=True)
