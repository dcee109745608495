"""`metricmill quarantine list|show|replay`: the rows and files the ingest flow set aside."""

import hashlib
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import pandas as pd
import typer

from metricmill.cli.common import (
    MAX_ID,
    FormatOption,
    GlobalOptions,
    ListFormat,
    check_range,
    columns,
    counted,
    echo,
    format_time,
    json_default,
    out,
    print_records,
    printable,
    row,
    settings_from,
    table,
)
from metricmill.errors import MetricmillError
from metricmill.secrets import PASSWORD_ENV, split_password
from metricmill.settings import Settings
from metricmill.types import Reason
from storage.landing import QuarantinedFile, find_quarantined_file, quarantined_files
from storage.store import Store

quarantine_app = typer.Typer(
    help="Rows and files the ingest flow set aside: list, show, replay.", no_args_is_help=True
)

_SAMPLE_KEYS = ({"metric", "name"}, {"ts", "timestamp", "time"}, {"value"})


def quarantine_entry_or_fail(store: Store, target: str) -> dict[str, Any]:
    wanted = int(target) if target.isascii() and target.isdecimal() else None
    entry = store.quarantine.entry(wanted) if wanted is not None and wanted <= MAX_ID else None
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
            for item in quarantined_files(settings.quarantine)
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
    files = quarantined_files(settings.quarantine)
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
    found = find_quarantined_file(settings.quarantine, target)
    if found is not None:
        echo(f"file:   {printable(str(found.path))}")
        echo(f"reason: {printable(found.reason)}")
        echo(f"detail: {printable(found.detail) or '-'}")
        return
    with Store.open(settings=settings) as store:
        entry = quarantine_entry_or_fail(store, target)
    echo(json.dumps(entry, indent=2, ensure_ascii=False, default=json_default))


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
    found = find_quarantined_file(settings.quarantine, target)
    if found is not None:
        replay_file(settings, options, found)
    else:
        replay_entry(settings, options, target)


def run_ingest_flow(settings: Settings, options: GlobalOptions, **kwargs: Any) -> dict[str, Any]:
    """The ingest flow's summary rows by source; a failed run is a one-line error."""
    # Prefect is slow to import: only when used
    from flows.ingest import ingest as ingest_flow
    from flows.ingest import run_to_end

    # The database URL only as the user gave it, less its password: flow parameters are stored
    # by Prefect. The password reaches the run through the environment.
    url, password = split_password(options.database) if options.database else (None, None)
    with password_in_environment(password):
        state = run_to_end(
            ingest_flow(
                scrape=False,
                home=str(settings.home),
                database_url=url,
                return_state=True,
                **kwargs,
            )
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
            store.quarantine.mark_replayed(int(entry_id))


def replay_entry(settings: Settings, options: GlobalOptions, target: str) -> None:
    with Store.open(settings=settings) as store:
        entry = quarantine_entry_or_fail(store, target)
    entry_id, data = entry["id"], entry["row"]
    if entry["replayed_at"] is not None:
        raise MetricmillError(
            f"entry {entry_id} was replayed at {format_time(entry['replayed_at'])}: "
            "see `metricmill quarantine list` for what is still pending"
        )
    if entry["reason"] == Reason.CARDINALITY_LIMIT and isinstance(data, dict) and "samples" in data:
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
        store.quarantine.mark_replayed(entry_id)
    typer.echo(f"entry {entry_id}: {describe_outcome(summary)}")
