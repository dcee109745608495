"""What every command group shares: global options, output formats, one-line errors,
names made printable, tables and record output, settings and store from the context."""

import csv
import io
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, NoReturn

import pandas as pd
import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from metricmill.errors import MetricmillError, QueryError
from metricmill.secrets import redact
from metricmill.selectors import Selector, parse_selector
from metricmill.settings import Settings, load_settings
from storage.store import Store


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


# Row ids in the database are 64-bit signed integers.
MAX_ID = 2**63 - 1


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
            echo(json.dumps(record, ensure_ascii=False, default=json_default))
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


def columns(frame: pd.DataFrame, *names: str) -> Iterator[tuple[Any, ...]]:
    """The frame's rows as plain tuples of the named columns."""
    return zip(*(frame[name].tolist() for name in names), strict=True)


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


def json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)
