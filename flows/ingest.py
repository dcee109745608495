"""The `ingest` flow: landing files, scrape targets and samples passed in, written exactly once."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, TypeVar

import pandas as pd
from prefect import flow, get_run_logger
from prefect.artifacts import acreate_markdown_artifact, acreate_table_artifact
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic.json_schema import SkipJsonSchema

from flows.guard import exclusive
from flows.naming import run_name
from metricmill.secrets import redact
from metricmill.settings import Settings, load_settings
from tasks.ingest import SourceOutcome, ingest_records, prepare_store, scrape_target
from tasks.ingest_files import claim_landing, group_files, ingest_files
from tasks.write_order import write_order

T = TypeVar("T")


@flow(
    name="ingest",
    flow_run_name=run_name("ingest"),
    description="Land new files, scrape targets and caller samples; quarantine bad rows.",
    log_prints=False,
    # Files share series rows and the GIL: a hundred files at once only queue on locks.
    # (Prefect 3.8's decorator types its task_runner as TaskRunner[PrefectFuture], which the
    # invariant generic rejects for its own default runner class.)
    task_runner=ThreadPoolTaskRunner(max_workers=2),  # type: ignore[arg-type]
)
@exclusive("ingest")  # one run at a time; a run that finds another in progress is Skipped
async def ingest(
    # A DataFrame is accepted from Python; it stays out of the schema, so the UI's form is the
    # list of sample objects.
    samples: list[dict[str, Any]] | SkipJsonSchema[pd.DataFrame] | None = None,
    landing: bool = True,
    scrape: bool = True,
    database_url: str | None = None,
    home: str | None = None,
) -> list[dict[str, Any]]:
    """Run one micro-batch over every source; returns one summary row per source.

    Args:
        samples: Samples to write in this run besides the other sources: a list of objects
            with metric (or name), labels, ts (or timestamp) and value. Empty: none.
        landing: Take the settled files waiting in the landing directory.
        scrape: Scrape each configured target (scrape_targets) once.
        database_url: Database URL (sqlite:///PATH or postgresql://USER@HOST:PORT/DB, no
            password: that comes from METRICMILL_DATABASE_PASSWORD or a Secret block). Empty:
            METRICMILL_DATABASE_URL, else the SQLite file in the home directory.
        home: metricmill home directory (landing, archive, quarantine, metricmill.toml).
            Empty: METRICMILL_HOME, else ~/.metricmill.

    The flow is a coroutine only so that a run ends when its work does: Prefect 3.8 ends a
    synchronous flow run by joining its heartbeat thread, which sleeps in one-second steps, so
    every run would take up to a second more (an empty run 1.13 s against 0.28 s). Its work is
    synchronous and runs inline, as in any other flow. From synchronous code:
    `asyncio.run(ingest(...))`, or `run_to_end(ingest(..., return_state=True))`.
    """
    logger = get_run_logger()
    settings = load_settings(database_url=database_url, home=home)
    settings.ensure_dirs()
    prepare_store(settings)
    outcomes: list[SourceOutcome] = []
    if samples is not None and len(samples):  # a DataFrame has no truth value
        outcomes.append(ingest_records(settings, samples))
    if landing:
        outcomes.extend(_ingest_landing(settings))
    errors: dict[str, str] = {}
    if scrape:
        outcomes.extend(_scrape_all(settings, errors))
    rows = [{**o.row(), "error": errors.get(o.source, "")} for o in outcomes]
    await _publish(outcomes, rows)
    logger.info("ingested %d sources, %d rows", len(outcomes), sum(o.rows_in for o in outcomes))
    return rows


def run_to_end(run: Awaitable[T]) -> T:
    """A call of `ingest` made from synchronous code, awaited: its rows, or with
    `return_state=True` its final state (Prefect types that call as an Awaitable, which
    `asyncio.run` does not take)."""

    async def end() -> T:
        return await run

    return asyncio.run(end())


def _ingest_landing(settings: Settings) -> list[SourceOutcome]:
    """The landing directory's settled files: claimed, then written group by group."""
    logger = get_run_logger()
    if settings.ingest_max_parallel_runs > settings.ingest_parallel_runs:
        logger.warning(
            "ingest_max_parallel_runs = %d applies to PostgreSQL only: one run at a time on SQLite",
            settings.ingest_max_parallel_runs,
        )
    outcomes: list[SourceOutcome] = []
    # One claim takes every settled file; with parallel runs, a claim is this run's share
    # and the run comes back for more until the landing directory is empty.
    while True:
        claim = claim_landing(settings)
        if claim.busy:
            logger.warning("another ingest run is working on the landing directory: no file taken")
        try:
            outcomes.extend(_ingest_claimed(claim.files, settings))
        finally:
            claim.release()
        if settings.ingest_parallel_runs == 1 or not claim.files:
            return outcomes


def _scrape_all(settings: Settings, errors: dict[str, str]) -> list[SourceOutcome]:
    """Each configured target scraped once, side by side. One failing target (after its
    retries) must not fail the run nor hide the others: it gets a summary row with its error
    (in `errors`) and the run carries on."""
    logger = get_run_logger()
    outcomes: list[SourceOutcome] = []
    scrapes = [(t.url, scrape_target.submit(settings, t)) for t in settings.scrape_targets]
    for url, future in scrapes:
        try:
            outcomes.append(future.result())
        except Exception as exc:
            failed = SourceOutcome(source=f"scrape:{redact(url)}", kind="scrape")
            errors[failed.source] = redact(f"{type(exc).__name__}: {exc}".splitlines()[0])
            logger.error("scrape of %s failed: %s", url, errors[failed.source])
            outcomes.append(failed)
    return outcomes


async def _publish(outcomes: list[SourceOutcome], rows: list[dict[str, Any]]) -> None:
    """The run's artifacts: the summary table and the quality report of each batch."""
    guarded = [o.source for o in outcomes if o.file_quarantined == "cardinality_limit"]
    if guarded:
        get_run_logger().warning("cardinality guard quarantined %s", ", ".join(guarded))
    # Both at once, with the run's own (asynchronous) client: the run's last step.
    summary = acreate_table_artifact(
        key="ingest-summary",
        table=rows or [{"source": "(nothing new)"}],
        description="Per source: rows in, written, overwritten, replays, quarantined, rows/s",
    )
    quality = "\n\n".join(
        f"### {o.source}\n\n{o.quality_markdown}" for o in outcomes if o.quality_markdown
    )
    report = acreate_markdown_artifact(
        key="ingest-quality",
        markdown=quality or "No rows were checked in this run.",
        description="Great Expectations results for each batch of this run",
    )
    await asyncio.gather(summary, report)


def _ingest_claimed(files: list[Path], settings: Settings) -> list[SourceOutcome]:
    """A task per group of claimed files: each group is checked and written as one unit, the
    groups written one after the other in landing order."""
    outcomes: list[SourceOutcome] = []
    failures: list[BaseException] = []
    with write_order() as order_key:
        groups = [
            ingest_files.submit(settings, g, order_key=order_key, turn=turn)
            for turn, g in enumerate(group_files(files))
        ]
        for group in groups:  # every group ends before the turnstile goes
            try:
                outcomes.extend(group.result())
            except Exception as exc:
                failures.append(exc)
    if failures:
        raise failures[0]  # the first: later groups only waited for it
    return outcomes
