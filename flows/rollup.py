"""The `rollup` flow: pending ranges recomputed at 1m, 5m, 1h and 1d, then checked."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from flows.guard import exclusive
from flows.naming import run_name
from metricmill.settings import load_settings
from tasks.ingest import prepare_store
from tasks.rollup import check_rollup_output, roll_up


@flow(
    name="rollup",
    flow_run_name=run_name("rollup"),
    description="Recompute pending ranges at 1m, 5m, 1h and 1d; check the rows written.",
    log_prints=False,
)
@exclusive("rollup")  # one run at a time; a run that finds another in progress is Skipped
def rollup(
    database_url: str | None = None,
    home: str | None = None,
    max_chunks: int | None = None,
) -> list[dict[str, Any]]:
    """One rollup run; returns one summary row per level.

    Args:
        database_url: Database URL (sqlite:///PATH or postgresql://USER@HOST:PORT/DB, no
            password: that comes from METRICMILL_DATABASE_PASSWORD or a Secret block). Empty:
            METRICMILL_DATABASE_URL, else the SQLite file in the home directory.
        home: metricmill home directory (landing, archive, quarantine, metricmill.toml).
            Empty: METRICMILL_HOME, else ~/.metricmill.
        max_chunks: At most this many chunk transactions (rollup_chunk_hours of data each)
            in this run; the rest stays pending for the next. Empty: everything pending.
    """
    logger = get_run_logger()
    settings = load_settings(database_url=database_url, home=home)
    prepare_store(settings)
    report = roll_up(settings, max_chunks)
    checks = check_rollup_output(settings, {lv: w.spans for lv, w in report.levels.items()})
    checked = {c.level: c.rows for c in checks}
    newest = report.newest_bucket.isoformat() if report.newest_bucket else ""
    lag = round(report.lag_seconds, 1) if report.lag_seconds is not None else None
    rows = [
        {
            **row,
            "rows_checked": checked.get(row["level"], 0),
            "newest_1m_bucket": newest,
            "lag_seconds": lag,
            "chunks": report.chunks,
            "pending_left": report.pending_left,
        }
        for row in report.rows()
    ]
    create_table_artifact(
        key="rollup-summary",
        table=rows,
        description=(
            f"Per level: ranges recomputed and rows written; {report.chunks} transaction(s), "
            f"{report.pending_left} pending range(s) left, newest 1m bucket {newest or 'none'} "
            f"(lag {lag if lag is not None else '-'} s)"
        ),
    )
    logger.info(
        "rollup: %d chunk(s), %d row(s) written, lag %s s",
        report.chunks,
        sum(w.rows for w in report.levels.values()),
        lag,
    )
    return rows
