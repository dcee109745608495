"""The `metricmill` application: the global options, the core commands (init, ingest,
query, series, stats, health, export) and the command groups of the sibling modules.

A user's mistake (bad selector, unknown metric, unreachable database, invalid setting, unreadable
file) is reported as one `error: ...` line on stderr with exit code 1, never a traceback.
"""

import csv
import io
import json
from pathlib import Path
from typing import Annotated, Any

import pandas as pd
import typer
from typer.core import TyperGroup

from metricmill.cli.alerts import alerts_app
from metricmill.cli.backtest import backtest_app
from metricmill.cli.common import (
    ExportFormat,
    FormatOption,
    GlobalOptions,
    ListFormat,
    OutputFormat,
    check_range,
    columns,
    combined_selector,
    counted,
    echo,
    fail,
    format_labels,
    format_number,
    format_time,
    one_line,
    open_store,
    out,
    print_records,
    print_stats,
    printable,
    row,
    settings_from,
    table,
)
from metricmill.cli.demo import demo_app
from metricmill.cli.doctor import doctor_app
from metricmill.cli.notify import notify_app
from metricmill.cli.ops import ops_app
from metricmill.cli.quarantine import quarantine_app
from metricmill.cli.receive import receive_app
from metricmill.cli.retention import archive_app, retention_app
from metricmill.errors import MetricmillError
from metricmill.settings import MEMORY_URL
from metricmill.types import WriteReport
from storage.readers import read_samples_file
from storage.records import Health
from storage.store import Store


class _Commands(TyperGroup):
    """Turns a user's mistake into one `error:` line and exit code 1, wherever it is raised."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except (MetricmillError, OSError) as exc:  # OSError: paths the user gave
            fail(exc)


app = typer.Typer(
    cls=_Commands,
    name="metricmill",
    help="Time-series metrics: ingest, query, inspect and export.",
    no_args_is_help=True,
    add_completion=False,
    # Locals can hold database passwords; a real bug still shows a plain traceback.
    pretty_exceptions_show_locals=False,
)


@app.callback()
def main(
    ctx: typer.Context,
    home: Annotated[
        Path | None, typer.Option(help="metricmill home directory (METRICMILL_HOME).")
    ] = None,
    database: Annotated[
        str | None,
        typer.Option(
            help="Database URL: sqlite:///PATH, memory:// or postgresql://USER@HOST:PORT/DB "
            "(METRICMILL_DATABASE_URL)."
        ),
    ] = None,
) -> None:
    """Time-series metrics on SQLite, PostgreSQL or TimescaleDB."""
    ctx.obj = GlobalOptions(home=home, database=database)


@app.command()
def init(ctx: typer.Context) -> None:
    """Create or upgrade the database schema (running it again changes nothing)."""
    settings = settings_from(ctx)
    with Store.open(settings=settings, init=False) as store:
        before, after = store.init()
        backend = store.backend_name
    if settings.database_url != MEMORY_URL:
        settings.ensure_dirs()
    change = "up to date" if before == after else "upgraded"
    typer.echo(f"backend:  {backend}")
    typer.echo(f"schema:   version {before} -> {after} ({change})")
    typer.echo(f"database: {settings.masked_database_url}")
    typer.echo(f"home:     {settings.home}")


@app.command()
def ingest(
    ctx: typer.Context,
    files: Annotated[list[Path], typer.Argument(help="NDJSON or CSV files, optionally .gz.")],
) -> None:
    """Write sample files to the store, one batch per file; a re-sent file is a replay."""
    results: list[tuple[str, WriteReport]] = []
    failed = 0
    with open_store(ctx) as store:
        for path in files:
            try:
                frame = read_samples_file(path)
                report = store.write_samples(
                    frame, source=f"file:{path.name}", rejected=frame.attrs.get("rejected", ())
                )
                results.append((str(path), report))
            except (MetricmillError, OSError) as exc:
                failed += 1
                shown = printable(str(path))
                echo(f"error: {shown}: {one_line(exc).removeprefix(f'{shown}: ')}", err=True)
    if results:
        print_ingest(results)
    if failed:
        raise typer.Exit(1)


def print_ingest(results: list[tuple[str, WriteReport]]) -> None:
    grid = table(
        "file", "rows in", "new series", "written", "overwritten", "unchanged", "rejected",
        "replay", title="ingest",
    )  # fmt: skip
    for name, report in results:
        rejected = "\n".join(f"{k}: {v}" for k, v in sorted(report.rejected.items()))
        row(
            grid, name, report.rows_in, report.new_series, report.written, report.overwritten,
            report.unchanged, rejected or "0", "yes (skipped)" if report.replay else "no",
        )  # fmt: skip
    out().print(grid)


@app.command()
def query(
    ctx: typer.Context,
    target: Annotated[
        str, typer.Argument(metavar="METRIC_OR_SELECTOR", help='e.g. cpu or cpu{host="a"}')
    ],
    selector: Annotated[str | None, typer.Option(help='Extra matchers: {env!="dev"}')] = None,
    start: Annotated[str | None, typer.Option(help="ISO time, epoch, now, -2h (end-1h)")] = None,
    end: Annotated[str | None, typer.Option(help="ISO time, epoch, now, -5m (now)")] = None,
    step: Annotated[str | None, typer.Option(help="Bucket width: 30s, 5m, 1h")] = None,
    agg: Annotated[
        str | None,
        typer.Option(help="avg, min, max, sum, count, last, stddev, rate, increase (with --step)"),
    ] = None,
    format: Annotated[OutputFormat, typer.Option("--format")] = OutputFormat.table,
    limit: Annotated[int | None, typer.Option(help="First N rows only")] = None,
    level: Annotated[
        str | None, typer.Option(help="Force a resolution: raw, 1m, 5m, 1h, 1d (default: best)")
    ] = None,
) -> None:
    """Samples in [start, end), raw or aggregated per step (read from rollups where they fit)."""
    if limit is not None:
        check_range("--limit", limit, 1, 10**12)
    with open_store(ctx) as store:
        frame = store.query(
            None, combined_selector(target, selector), start, end, step, agg, level=level
        )
    if limit is not None:
        frame = frame.head(limit)
    print_points(frame, format)


def print_points(frame: pd.DataFrame, fmt: OutputFormat) -> None:
    points = columns(frame, "metric", "labels", "ts", "value")
    if fmt is OutputFormat.json:
        for metric, labels, ts, value in points:
            record = {"metric": metric, "labels": labels, "ts": ts.isoformat(), "value": value}
            echo(json.dumps(record, ensure_ascii=False))
        return
    if fmt is OutputFormat.csv:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["metric", "labels", "ts", "value"])
        for metric, labels, ts, value in points:
            text = json.dumps(labels, sort_keys=True, ensure_ascii=False)
            writer.writerow([metric, text, ts.isoformat(), repr(float(value))])
        typer.echo(printable(buffer.getvalue(), keep_newlines=True), nl=False)
        return
    if frame.empty:
        typer.echo("no samples in this window")
        return
    grid = table("series", "ts", "value", caption=counted(len(frame), "row"))
    for metric, labels, ts, value in points:
        row(grid, f"{metric}{format_labels(labels)}", format_time(ts), format_number(value))
    out().print(grid)


@app.command()
def series(
    ctx: typer.Context,
    pattern: Annotated[str | None, typer.Argument(help="Metric name glob, e.g. 'cpu_*'")] = None,
    selector: Annotated[str | None, typer.Option(help='Label matchers: {host="a"}')] = None,
    format: FormatOption = ListFormat.table,
) -> None:
    """Known series, with when each was first and last seen."""
    with open_store(ctx) as store:
        frame = store.series(pattern, selector)
    records = [
        {
            "id": int(series_id),
            "metric": metric,
            "labels": labels,
            "first_seen": None if first is None or first is pd.NaT else format_time(first),
            "last_seen": None if last is None or last is pd.NaT else format_time(last),
        }
        for series_id, metric, labels, first, last in columns(
            frame, "series_id", "metric", "labels", "first_seen", "last_seen"
        )
    ]
    if format is not ListFormat.table:
        print_records(format, records, ["id", "metric", "labels", "first_seen", "last_seen"])
        return
    grid = table("id", "series", "first seen", "last seen", caption=counted(len(frame), "series"))
    for r in records:
        row(
            grid,
            r["id"],
            f"{r['metric']}{format_labels(r['labels'])}",
            r["first_seen"] or "-",
            r["last_seen"] or "-",
        )
    out().print(grid)


@app.command()
def stats(ctx: typer.Context) -> None:
    """Series, samples, time span and size per table."""
    with open_store(ctx) as store:
        print_stats(store.stats())


@app.command()
def health(ctx: typer.Context) -> None:
    """Connectivity, schema version, WAL/TimescaleDB status and a write probe; exit 1 if not ok."""
    with open_store(ctx, init=False) as store:
        result = store.health()
    print_health(result)
    if not result.ok:
        raise typer.Exit(1)


def print_health(result: Health) -> None:
    grid = table("", "", title=f"health: {'ok' if result.ok else 'NOT OK'}", show_header=False)
    row(grid, "backend", result.backend_name)
    row(grid, "schema version", result.schema_version)
    for key, value in result.details.items():
        row(grid, key, ", ".join(value) if isinstance(value, list) else value)
    for problem in result.problems:
        row(grid, "problem", problem)
    out().print(grid)


@app.command()
def export(
    ctx: typer.Context,
    target: Annotated[str, typer.Argument(metavar="METRIC_OR_SELECTOR")],
    output: Annotated[str, typer.Option(help="Path relative to the export directory")],
    format: Annotated[
        ExportFormat | None, typer.Option("--format", help="Default: from the file suffix")
    ] = None,
    start: Annotated[str | None, typer.Option()] = None,
    end: Annotated[str | None, typer.Option()] = None,
    step: Annotated[str | None, typer.Option()] = None,
    agg: Annotated[str | None, typer.Option()] = None,
) -> None:
    """Write a query's result to JSON, CSV or Parquet under the export directory."""
    with open_store(ctx) as store:
        path, rows = store.export(
            output,
            metric=None,
            selector=combined_selector(target, None),
            start=start,
            end=end,
            step=step,
            agg=agg,
            format=None if format is None else format.value,
        )
    typer.echo(f"exported {rows} rows to {path}")


# -- the command groups ---------------------------------------------------------------------
app.add_typer(quarantine_app, name="quarantine")
app.add_typer(ops_app)
app.add_typer(doctor_app)
app.add_typer(demo_app)
app.add_typer(retention_app, name="retention")
app.add_typer(archive_app, name="archive")
app.add_typer(backtest_app)
app.add_typer(alerts_app, name="alerts")
app.add_typer(notify_app, name="notify")
app.add_typer(receive_app)
