"""`metricmill doctor`: every check of a home, its database, landing directory and Prefect,
each with a fix when it fails. Prefect is imported inside the checks: it is slow to import.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.text import Text

from metricmill.cli.common import (
    GlobalOptions,
    one_line,
    out,
    row,
    settings_from,
    table,
)
from metricmill.cli.ops import stuck_files
from metricmill.errors import MetricmillError
from metricmill.settings import (
    MEMORY_URL,
    Settings,
    config_file_path,
    load_settings_past_errors,
)

if TYPE_CHECKING:
    from storage.store import Store

doctor_app: typer.Typer = typer.Typer()


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
    """Connect, then check the schema, a write probe and (on PostgreSQL) TimescaleDB."""
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
        checks += _schema_checks(store)
        checks += _timescale_checks(store, settings)
    return checks


def _schema_checks(store: Store) -> list[Check]:
    """The schema version, and a write probe when the schema is there."""
    from storage.schema import LATEST_VERSION

    version = store.schema_version()
    checks = [
        Check(
            "schema",
            version == LATEST_VERSION,
            f"version {version}, this metricmill needs {LATEST_VERSION}",
            "" if version == LATEST_VERSION else "run `metricmill init`",
        )
    ]
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
    return checks


def _timescale_checks(store: Store, settings: Settings) -> list[Check]:
    """TimescaleDB: not applicable on SQLite; off (a problem when required); else the
    extension, compression on every hypertable, and its background policies."""
    status = store.ops.timescale()
    if not status.server:
        return [Check("TimescaleDB", None, "not applicable (SQLite)")]
    if not status.enabled:
        needed = settings.timescaledb == "require"
        return [
            Check(
                "TimescaleDB",
                False if needed else None,
                f"off ({status.note or 'disabled by METRICMILL_TIMESCALEDB=off'})",
                "install timescaledb, add it to shared_preload_libraries, restart "
                "PostgreSQL, then run `metricmill init`"
                if needed
                else "",
            )
        ]
    checks = [Check("TimescaleDB", True, f"extension {status.version}")]
    hypertables = store.ops.compressed_hypertables()
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
    jobs = store.ops.timescale_jobs()
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


@doctor_app.command()
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
