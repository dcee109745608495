"""The `retention` flow: archive and delete what the rules let go, honour legal holds."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from flows.guard import exclusive
from flows.naming import run_name
from metricmill.settings import load_settings
from tasks.ingest import prepare_store
from tasks.retention import compress_chunks, run_retention


@flow(
    name="retention",
    flow_run_name=run_name("retention"),
    description="Archive raw samples to verified Parquet, delete expired data, keep legal holds.",
    log_prints=False,
)
@exclusive("retention")  # one run at a time; a run that finds another in progress is Skipped
def retention(
    database_url: str | None = None,
    home: str | None = None,
    dry_run: bool = False,
) -> dict[str, Any]:
    """Apply the retention rules once (or, with dry_run, say what they would do).

    Args:
        database_url: Database URL (sqlite:///PATH or postgresql://USER@HOST:PORT/DB, no
            password: that comes from METRICMILL_DATABASE_PASSWORD or a Secret block). Empty:
            METRICMILL_DATABASE_URL, else the SQLite file in the home directory.
        home: metricmill home directory (landing, archive, quarantine, metricmill.toml).
            Empty: METRICMILL_HOME, else ~/.metricmill.
        dry_run: Only report what the rules would archive and delete (the
            retention-preview artifact); change nothing.
    """
    logger = get_run_logger()
    settings = load_settings(database_url=database_url, home=home)
    settings.ensure_dirs()
    prepare_store(settings)
    result = run_retention(settings, dry_run)
    result["compressed_chunks"] = 0 if dry_run else compress_chunks(settings)
    create_table_artifact(
        key="retention-summary",
        table=result["table"] or [{"kind": "(no series)"}],
        description=(
            "Rows archived and deleted per rule and level, rows kept by legal hold, "
            "and the archive files written with their sha256"
            + (" (dry run: nothing changed)" if dry_run else "")
        ),
    )
    logger.info("compressed %d chunks", result["compressed_chunks"])
    return result
