"""The `metricmill` command line: init, ingest, query, series, stats, health, export, demo,
and `quarantine list|show|replay` for the rows and files the ingest flow set aside.

A user's mistake (bad selector, unknown metric, unreachable database, invalid setting, unreadable
file) is reported as one `error: ...` line on stderr with exit code 1, never a traceback.
"""

import csv
import hashlib
import io
import json
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, NoReturn

import pandas as pd
import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text
from typer.core import TyperGroup

from metricmill.errors import MetricmillError, QueryError
from metricmill.secrets import PASSWORD_ENV, redact, split_password
from metricmill.selectors import Selector, parse_selector
from metricmill.settings import MEMORY_URL, Settings, load_settings
from metricmill.types import WriteReport
from storage.backend import Health
from storage.readers import read_samples_file
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


@dataclass(frozen=True)
class GlobalOptions:
    home: Path | None = None
    database: str | None = None


class OutputFormat(StrEnum):
    table = "table"
    csv = "csv"
    json = "json"


class ExportFormat(StrEnum):
    json = "json"
    csv = "csv"
    parquet = "parquet"


# -- plumbing ---------------------------------------------------------------------------------
# Characters a terminal may act on rather than show: C0 controls and DEL, C1 controls (0x9b is
# a CSI on some terminals), and the bidirectional overrides and isolates that reorder text.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_UNPRINTABLE_KEEP_NEWLINES = re.compile(
    "[\x00-\x09\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]"
)


def printable(text: str, *, keep_newlines: bool = False) -> str:
    """Text as it may reach a terminal: every name the CLI prints (file, metric, label, rule)
    goes through here, its control characters spelled as escapes (ESC is shown as \\u001b).
    The escapes are JSON's, so JSON output stays valid JSON."""
    pattern = _UNPRINTABLE_KEEP_NEWLINES if keep_newlines else _UNPRINTABLE
    return pattern.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def echo(text: str, *, err: bool = False) -> None:
    """typer.echo for lines that hold names: control characters escaped."""
    typer.echo(printable(text, keep_newlines=True), err=err)


def one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        where = f"{exc.filename}: " if exc.filename else ""
        text = f"{where}{exc.strerror}"
    else:
        text = str(exc) or type(exc).__name__
    return printable(redact(" ".join(text.split())))


def check_range(option: str, value: float, low: float, high: float) -> None:
    """One `error:` line naming the option when a number is outside [low, high] or not finite."""
    if not (low <= value <= high):  # also False for NaN
        raise MetricmillError(f"{option}: must be between {low:,} and {high:,}, not {value}")


def fail(exc: BaseException) -> NoReturn:
    typer.echo(f"error: {one_line(exc)}", err=True)
    raise typer.Exit(1)


def out() -> Console:
    # Created per use so it writes to the sys.stdout of the moment (CliRunner swaps it).
    return Console(highlight=False, soft_wrap=False)


def settings_from(ctx: typer.Context, **overrides: Any) -> Settings:
    options = ctx.find_object(GlobalOptions) or GlobalOptions()
    base: dict[str, Any] = {"home": options.home, "database_url": options.database}
    return load_settings(**(base | overrides))


@contextmanager
def open_store(ctx: typer.Context, *, init: bool = True) -> Iterator[Store]:
    with Store.open(settings=settings_from(ctx), init=init) as store:
        yield store


def format_labels(labels: dict[str, str]) -> str:
    inner = ", ".join(f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in sorted(labels.items()))
    return "{" + inner + "}"


def format_time(value: Any) -> str:
    """A time as tables show it: UTC, to the second (`2026-12-02T11:05:07Z`)."""
    if value is None or value is pd.NaT:
        return "-"
    stamp = pd.Timestamp(value)
    stamp = stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")
    return stamp.strftime("%Y-%m-%dT%H:%M:%SZ")


def format_number(value: Any) -> str:
    """The one number format of tables: integers with thousands separators, other values to
    four significant digits (`7.331`, `0.0001234`); `-` for none. JSON and CSV keep every digit."""
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    number = float(value)
    if number.is_integer() and abs(number) < 1e15:
        return f"{int(number):,}"
    if 1000 <= abs(number) < 1e15:  # large: whole units (tenths below 100,000)
        return f"{number:,.1f}" if abs(number) < 1e5 else f"{number:,.0f}"
    if 1e-4 <= abs(number) < 1000:
        return f"{number:.4g}"
    return f"{number:.4g}"


def counted(count: int, noun: str, plural: str | None = None) -> str:
    """`1 row`, `2 rows`, `1 series`, `3 entries`."""
    return f"{count:,} {noun if count == 1 else (plural or noun + 's')}"


class ListFormat(StrEnum):
    table = "table"
    json = "json"
    csv = "csv"


FormatOption = Annotated[
    ListFormat,
    typer.Option(
        "--format", help="table, json (one object per line) or csv (a header, then rows)."
    ),
]


def print_records(fmt: ListFormat, records: list[dict[str, Any]], columns: list[str]) -> None:
    """A list command's rows as JSON lines or CSV (the table is printed by the command)."""
    if fmt is ListFormat.json:
        for record in records:
            echo(json.dumps(record, ensure_ascii=False, default=_json_default))
        return
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for record in records:
        writer.writerow(
            [
                json.dumps(v, sort_keys=True, ensure_ascii=False)
                if isinstance(v, dict | list)
                else ("" if v is None else v)
                for v in (record.get(c) for c in columns)
            ]
        )
    typer.echo(printable(buffer.getvalue(), keep_newlines=True), nl=False)


# Columns that never wrap (times, ids, numbers): a narrow terminal folds the others instead,
# and a "series" column takes the room that is left.
_NO_WRAP = {
    "id", "ts", "value", "first seen", "last seen", "since", "started", "created", "replayed",
    "quarantined", "rows", "bytes", "score", "severity", "status", "state",
}  # fmt: skip


def table(*columns: str, title: str | None = None, **kwargs: Any) -> Table:
    grid = Table(title=title, **kwargs)
    for column in columns:
        if column in _NO_WRAP:
            grid.add_column(column, no_wrap=True)
        elif column == "series":
            grid.add_column(column, overflow="fold", ratio=1, min_width=16)
        else:
            grid.add_column(column, overflow="fold")
    return grid


def row(grid: Table, *cells: Any) -> None:
    # Text, not str: label values such as "[x]" must not be read as rich markup.
    grid.add_row(*(Text(printable(str(c), keep_newlines=True)) for c in cells))


def combined_selector(target: str, extra: str | None) -> Selector:
    """The positional `metric{...}` and --selector `{...}` as one selector."""
    first = parse_selector(target)
    if not extra:
        return first
    second = parse_selector(extra)
    if first.metric and second.metric and first.metric != second.metric:
        raise QueryError(f"two metrics given: {first.metric!r} and {second.metric!r}")
    return Selector(first.metric or second.metric, first.matchers + second.matchers)


# -- commands ---------------------------------------------------------------------------------
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


def columns(frame: pd.DataFrame, *names: str) -> Iterator[tuple[Any, ...]]:
    """The frame's rows as plain tuples of the named columns."""
    return zip(*(frame[name].tolist() for name in names), strict=True)


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


def print_stats(info: dict[str, Any]) -> None:
    summary = table("", "", title="storage", show_header=False)
    row(summary, "backend", info["backend"])
    row(summary, "schema version", info["schema_version"])
    row(summary, "series", format_number(info["series"]))
    row(summary, "samples stored", format_number(info["samples"]))
    row(summary, "oldest sample", format_time(info["oldest_sample"]))
    row(summary, "newest sample", format_time(info["newest_sample"]))
    row(summary, "bytes on disk", f"{info['bytes_total']:,}")
    tables = table("table", "rows", "bytes", title="tables")
    for name, counts in info["tables"].items():
        size = "-" if counts["bytes"] is None else f"{counts['bytes']:,}"
        row(tables, name, f"{counts['rows']:,}", size)
    console = out()
    console.print(summary)
    console.print(tables)


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
    row(grid, "backend", result.backend)
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


# -- quarantine -------------------------------------------------------------------------------
quarantine_app = typer.Typer(
    help="Rows and files the ingest flow set aside: list, show, replay.", no_args_is_help=True
)
app.add_typer(quarantine_app, name="quarantine")

_REASON_SUFFIX = ".reason"
_SAMPLE_KEYS = ({"metric", "name"}, {"ts", "timestamp", "time"}, {"value"})


@dataclass(frozen=True)
class QuarantinedFile:
    """A file in the quarantine directory, with the reason written beside it."""

    path: Path
    reason: str
    detail: str

    @property
    def reason_file(self) -> Path:
        return self.path.with_name(self.path.name + _REASON_SUFFIX)

    @property
    def since(self) -> datetime | None:
        """When it was quarantined (its reason file was written)."""
        try:
            return datetime.fromtimestamp(self.reason_file.stat().st_mtime, UTC)
        except FileNotFoundError:
            return None


def quarantined_files(settings: Settings) -> list[QuarantinedFile]:
    directory = settings.quarantine
    if not directory.is_dir():
        return []
    paths = sorted(
        p for p in directory.iterdir() if p.is_file() and not p.name.endswith(_REASON_SUFFIX)
    )
    return [read_quarantined_file(p) for p in paths]


def read_quarantined_file(path: Path) -> QuarantinedFile:
    reason_file = path.with_name(path.name + _REASON_SUFFIX)
    try:
        text = reason_file.read_text(encoding="utf-8")
    except FileNotFoundError:
        text = ""
    reason, _, detail = text.partition("\n")
    return QuarantinedFile(path, reason.strip() or "(no .reason file)", " ".join(detail.split()))


def find_quarantined_file(settings: Settings, name: str) -> QuarantinedFile | None:
    """The quarantined file called `name` (a bare file name, not a path), if there is one."""
    if not name or Path(name).name != name or name.endswith(_REASON_SUFFIX):
        return None
    path = settings.quarantine / name
    return read_quarantined_file(path) if path.is_file() else None


# Ids are 64-bit integers in every backend: a larger number names nothing.
MAX_ID = 2**63 - 1


def quarantine_entry_or_fail(store: Store, target: str) -> dict[str, Any]:
    wanted = int(target) if target.isascii() and target.isdecimal() else None
    entry = store.quarantine_entry(wanted) if wanted is not None and wanted <= MAX_ID else None
    if entry is None:
        raise MetricmillError(
            f"no quarantined file or entry {target!r}: see `metricmill quarantine list --all`"
        )
    return entry


def preview(value: Any, width: int = 80) -> str:
    """One line of at most `width` characters (quarantined rows can hold megabytes)."""
    if value is None:
        return "-"
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


@quarantine_app.command("list")
def quarantine_list(
    ctx: typer.Context,
    all_: Annotated[
        bool, typer.Option("--all", help="Also rows already replayed (default: pending only).")
    ] = False,
    limit: Annotated[int, typer.Option(help="Newest N table entries.")] = 100,
    format: FormatOption = ListFormat.table,
) -> None:
    """Quarantined rows and batches (newest first) and the files in the quarantine directory."""
    settings = settings_from(ctx)
    check_range("--limit", limit, 1, 1_000_000)
    with Store.open(settings=settings) as store:
        entries = store.quarantine(limit=limit, pending_only=not all_)
    if format is not ListFormat.table:  # table entries, then files (kind tells them apart)
        records: list[dict[str, Any]] = [
            {"kind": "row", "id": int(entry_id), "source": source, "reason": reason,
             "detail": detail or None, "row": data, "created": format_time(created),
             "replayed": None if replayed is None or replayed is pd.NaT else format_time(replayed)}
            for entry_id, source, reason, detail, data, created, replayed in columns(
                entries, "id", "source", "reason", "detail", "row", "created_at", "replayed_at"
            )
        ]  # fmt: skip
        records += [
            {"kind": "file", "id": item.path.name, "source": str(item.path),
             "reason": item.reason, "detail": item.detail or None, "row": None,
             "created": format_time(item.since), "replayed": None}
            for item in quarantined_files(settings)
        ]  # fmt: skip
        names = ["kind", "id", "source", "reason", "detail", "row", "created", "replayed"]
        print_records(format, records, names)
        return
    rows = table(
        "id", "source", "reason", "detail", "created", "replayed",
        title="quarantined rows", caption=counted(len(entries), "entry", "entries"),
    )  # fmt: skip
    for entry_id, source, reason, detail, data, created, replayed in columns(
        entries, "id", "source", "reason", "detail", "row", "created_at", "replayed_at"
    ):
        shown = detail if detail else preview(data)
        row(rows, entry_id, source, reason, shown, format_time(created), format_time(replayed))
    files = quarantined_files(settings)
    grid = table(
        "file", "reason", "detail", "quarantined",
        title=f"quarantined files in {settings.quarantine}", caption=counted(len(files), "file"),
    )  # fmt: skip
    for item in files:
        row(grid, item.path.name, item.reason, preview(item.detail, 100), format_time(item.since))
    console = out()
    console.print(rows)
    console.print(grid)


@quarantine_app.command("show")
def quarantine_show(
    ctx: typer.Context,
    target: Annotated[str, typer.Argument(metavar="ID", help="Entry id or quarantined file name")],
) -> None:
    """One entry as JSON (the row as received), or a quarantined file's reason and path."""
    settings = settings_from(ctx)
    found = find_quarantined_file(settings, target)
    if found is not None:
        echo(f"file:   {printable(str(found.path))}")
        echo(f"reason: {printable(found.reason)}")
        echo(f"detail: {printable(found.detail) or '-'}")
        return
    with Store.open(settings=settings) as store:
        entry = quarantine_entry_or_fail(store, target)
    echo(json.dumps(entry, indent=2, ensure_ascii=False, default=_json_default))


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


@quarantine_app.command("replay")
def quarantine_replay(
    ctx: typer.Context,
    target: Annotated[str, typer.Argument(metavar="ID", help="Entry id or quarantined file name")],
) -> None:
    """Run the ingest flow again over a quarantined file or entry (after fixing its cause).

    A file (edited in place, or with a limit raised) moves back to the landing directory and
    the flow ingests the landing directory. A table entry's row (for a batch stopped by the
    cardinality guard: its samples) goes through the flow as caller samples, and the entry is
    marked replayed whatever the outcome (a row still bad is quarantined again, as a new entry).
    """
    settings = settings_from(ctx)
    options = ctx.find_object(GlobalOptions) or GlobalOptions()
    found = find_quarantined_file(settings, target)
    if found is not None:
        replay_file(settings, options, found)
    else:
        replay_entry(settings, options, target)


def run_ingest_flow(settings: Settings, options: GlobalOptions, **kwargs: Any) -> dict[str, Any]:
    """The ingest flow's summary rows by source; a failed run is a one-line error."""
    from flows.ingest import ingest as ingest_flow  # Prefect is slow to import: only when used

    # The database URL only as the user gave it, less its password: flow parameters are stored
    # by Prefect. The password reaches the run through the environment.
    url, password = split_password(options.database) if options.database else (None, None)
    with password_in_environment(password):
        state = ingest_flow(
            scrape=False,
            home=str(settings.home),
            database_url=url,
            return_state=True,
            **kwargs,
        )
    rows = state.result() if state.is_completed() else None
    if not isinstance(rows, list):  # failed, or Skipped: another ingest run was in progress
        raise MetricmillError(f"ingest flow run ended {state.name}: {state.message}")
    return {r["source"]: r for r in rows}


@contextmanager
def password_in_environment(password: str | None) -> Iterator[None]:
    """METRICMILL_DATABASE_PASSWORD set for an in-process flow run, then restored."""
    if password is None:
        yield
        return
    previous = os.environ.get(PASSWORD_ENV)
    os.environ[PASSWORD_ENV] = password
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(PASSWORD_ENV, None)
        else:
            os.environ[PASSWORD_ENV] = previous


def describe_outcome(summary: dict[str, Any]) -> str:
    if summary.get("file_quarantined"):
        return f"quarantined again: {summary['file_quarantined']}"
    if summary.get("replay"):
        return "already written before (replay): nothing written"
    text = f"written: {summary['written']} of {summary['rows_in']} rows"
    if summary.get("quarantined"):
        text += f"; quarantined again: {summary['quarantined']}"
    return text


def replay_file(settings: Settings, options: GlobalOptions, item: QuarantinedFile) -> None:
    name = item.path.name
    landed = settings.landing / name
    if landed.exists():
        raise MetricmillError(f"{landed} already exists: a file of that name waits in landing")
    settings.landing.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(item.path.read_bytes()).hexdigest()
    os.replace(item.path, landed)
    item.reason_file.unlink(missing_ok=True)
    # Asked for by name, the file is complete: do not let the settle time hold it back.
    settled = time.time() - settings.settle_seconds - 1
    if landed.stat().st_mtime > settled:
        os.utime(landed, (settled, settled))
    echo(f"moved {printable(name)} back to {settings.landing}")
    summary = run_ingest_flow(settings, options, landing=True).get(f"file:{name}")
    if summary is None:
        echo(f"{printable(name)}: not picked up by this run; it waits in {settings.landing}")
        return
    echo(f"{printable(name)}: {describe_outcome(summary)}")
    if summary.get("file_quarantined"):
        return
    with Store.open(settings=settings) as store:  # the guard's entry for this file is done with
        pending = store.quarantine(limit=1_000_000, pending_only=True)
        for entry_id in pending.loc[pending["batch_id"] == digest, "id"].tolist():
            store.mark_replayed(int(entry_id))


def replay_entry(settings: Settings, options: GlobalOptions, target: str) -> None:
    with Store.open(settings=settings) as store:
        entry = quarantine_entry_or_fail(store, target)
    entry_id, data = entry["id"], entry["row"]
    if entry["replayed_at"] is not None:
        raise MetricmillError(
            f"entry {entry_id} was replayed at {format_time(entry['replayed_at'])}: "
            "see `metricmill quarantine list` for what is still pending"
        )
    if entry["reason"] == "cardinality_limit" and isinstance(data, dict) and "samples" in data:
        samples = list(data["samples"])
    else:
        samples = [data]
    if not samples or not all(
        isinstance(s, dict) and all(keys & s.keys() for keys in _SAMPLE_KEYS) for s in samples
    ):
        raise MetricmillError(
            f"entry {entry_id} ({entry['reason']}) holds no sample to replay: "
            "fix its source and ingest that again"
        )
    summary = run_ingest_flow(settings, options, samples=samples, landing=False)["programmatic"]
    with Store.open(settings=settings) as store:
        store.mark_replayed(entry_id)
    typer.echo(f"entry {entry_id}: {describe_outcome(summary)}")


# -- operator commands: serve, status, doctor (their module imports this one, hence last) ----
from metricmill.cli_ops import ops_app  # noqa: E402

app.add_typer(ops_app)

# -- the demo (its module imports this one, hence last) ----
from metricmill.cli_demo import demo_app  # noqa: E402

app.add_typer(demo_app)

# -- retention and archive (their module imports this one, hence last) ----------------------
from metricmill.cli_retention import archive_app, retention_app  # noqa: E402

app.add_typer(retention_app, name="retention")
app.add_typer(archive_app, name="archive")

# -- backtest (its module imports this one, hence last) ----------------------------------------
from metricmill.cli_backtest import backtest_app  # noqa: E402

app.add_typer(backtest_app)

# -- alerts and notifications (their module imports this one, hence last) ----------------------
from metricmill.cli_alerts import alerts_app, notify_app  # noqa: E402

app.add_typer(alerts_app, name="alerts")
app.add_typer(notify_app, name="notify")

# -- the push receiver (its module imports this one, hence last) -------------------------------
from metricmill.cli_receive import receive_app  # noqa: E402

app.add_typer(receive_app)
