"""Retention tasks: apply the rules (archive, verify, delete) and compress old chunks."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from prefect import get_run_logger, task

from metricmill.settings import Settings, secret_setting
from storage.archive import Anonymizer, ArchiveError
from storage.retention import RetentionReport
from storage.store import Store
from tasks.ingest import is_transient

SUMMARY_COLUMNS = (
    "kind", "level", "rule", "cutoff", "series", "deleted", "archived", "held",
    "chunks_dropped", "file", "rows", "sha256",
)  # fmt: skip


def anonymization_key(settings: Settings) -> bytes | None:
    """The HMAC key: METRICMILL_ANONYMIZE_KEY, else the Prefect Secret block it names."""
    try:
        key = secret_setting(settings.anonymize_key, settings.anonymize_key_block)
    except ValueError as exc:
        raise ArchiveError(str(exc)) from None
    return key.encode("utf-8") if key else None


def anonymizer_for(settings: Settings) -> Anonymizer:
    """The configured anonymizer; refuses (ArchiveError) when no key is configured."""
    return Anonymizer.from_settings(settings, anonymization_key(settings))


def cutoff_day(settings: Settings, now: datetime | None = None) -> str:
    """The UTC day before which raw samples under the default rule go."""
    today = (now or datetime.now(UTC)).date()
    return f"{today - timedelta(days=settings.retention_days):%Y-%m-%d}"


def summary_rows(report: RetentionReport) -> list[dict[str, Any]]:
    """One row per rule and level, then one per archive file, with the same columns."""
    rows = [
        dict.fromkeys(SUMMARY_COLUMNS, "") | {"kind": "rule"} | o.row() for o in report.outcomes
    ]
    for item in report.files:
        rows.append(
            dict.fromkeys(SUMMARY_COLUMNS, "")
            | {"kind": "file", "file": item.path, "rows": item.rows, "sha256": item.sha256}
        )
    return [{k: row.get(k, "") for k in SUMMARY_COLUMNS} for row in rows]


@task(retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=is_transient)
def run_retention(settings: Settings, dry_run: bool = False) -> dict[str, Any]:
    """Preview or apply the retention rules; returns the summary and its table rows."""
    logger = get_run_logger()
    with Store.open(settings=settings) as store:
        if dry_run:
            report = store.retention.preview()
        else:
            anonymizer = anonymizer_for(settings) if settings.archive_anonymize else None
            report = store.retention.apply(anonymizer=anonymizer)
    summary = report.summary()
    logger.info(
        "retention%s: %d rows deleted, %d archived in %d files, %d kept by legal hold",
        " (dry run)" if dry_run else "",
        summary["deleted"],
        summary["archived"],
        summary["files"],
        summary["held"],
    )
    return {**summary, "table": summary_rows(report)}


@task(retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=is_transient)
def compress_chunks(settings: Settings) -> int:
    """TimescaleDB only: compress sample and rollup chunks older than compress_after_days
    (a late sample still rolls up into a compressed rollup chunk: TimescaleDB takes DML on
    compressed chunks)."""
    with Store.open(settings=settings) as store:
        return store.retention.compress_old_chunks(settings.compress_after_days)
