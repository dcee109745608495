"""Ingestion tasks: decode a source, apply the quality contract, write exactly once."""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import psycopg
from prefect import task
from prefect.client.schemas.objects import TaskRun
from prefect.states import State
from prefect.tasks import Task

from expectations.ingest_batch import BatchUnusable, QualityLimits
from metricmill.settings import Settings
from storage.exposition import parse_exposition
from storage.frames import to_frame
from storage.landing import Claim, claim_files, move_done, move_quarantined
from storage.readers import UnreadableFile, read_landed_file
from storage.store import Store
from tasks.quality import validate_batch


class TransientError(RuntimeError):
    """A failure worth retrying: a 5xx, a timeout, a dropped connection."""


def is_transient(task: Task[Any, Any], task_run: TaskRun, state: State[Any]) -> bool:
    """retry_condition_fn: retry lost connections, 5xx and timeouts — never bad data."""
    try:
        state.result()
    except (TransientError, psycopg.OperationalError, httpx.TransportError, TimeoutError):
        return True
    except Exception:
        return False
    return False


@dataclass
class SourceOutcome:
    """What one file, scrape or programmatic batch did: a row of the run's summary table."""

    source: str
    kind: str
    rows_in: int = 0
    written: int = 0
    overwritten: int = 0
    unchanged: int = 0
    new_series: int = 0
    replay: bool = False
    quarantined: Counter[str] = field(default_factory=Counter)
    skipped_fields: int = 0
    file_quarantined: str | None = None
    seconds: float = 0.0
    quality_markdown: str = ""

    def row(self) -> dict[str, Any]:
        data = asdict(self)
        data["quarantined"] = ", ".join(f"{k}: {v}" for k, v in sorted(self.quarantined.items()))
        data["rows_per_s"] = round(self.rows_in / self.seconds) if self.seconds else 0
        data.pop("quality_markdown")
        return data


def quality_limits(settings: Settings) -> QualityLimits:
    return QualityLimits(
        max_future_skew=timedelta(seconds=settings.max_future_skew_seconds),
        retention_days=settings.retention_days,
        max_labels=settings.max_labels,
        max_label_name_length=settings.max_label_name_length,
        max_label_value_length=settings.max_label_value_length,
    )


def _write(
    settings: Settings,
    frame: pd.DataFrame,
    outcome: SourceOutcome,
    *,
    batch_id: str | None,
    pre_rejected: list[tuple[dict, str]],
) -> bool:
    """Validate and write; False when the cardinality guard quarantined the whole batch."""
    checked = validate_batch(frame, quality_limits(settings)) if len(frame) else None
    good = checked.good if checked is not None else frame
    rejected = pre_rejected + (checked.rejected if checked is not None else [])
    if checked is not None:
        outcome.quality_markdown = checked.markdown()
    with Store.open(settings=settings) as store:
        report = store.write_samples(
            good,
            source=outcome.source,
            batch_id=batch_id,
            rejected=rejected,
            max_new_series=settings.max_new_series_per_batch,
        )
    outcome.rows_in = report.rows_in
    outcome.replay = report.replay
    outcome.written = report.written
    outcome.overwritten = report.overwritten
    outcome.unchanged = report.unchanged
    outcome.new_series = report.new_series
    outcome.quarantined = Counter(report.rejected)
    return not report.guarded_new_series


@task(retries=3, retry_delay_seconds=[1, 3, 9], retry_condition_fn=is_transient)
def prepare_store(settings: Settings) -> None:
    """Create or upgrade the schema once, before the run's tasks open the store side by side
    (on a new database, concurrent first connections race to create the TimescaleDB extension)."""
    Store.open(settings=settings).close()


@task
def claim_landing(settings: Settings) -> Claim:
    """Claim settled files in the landing directory (and adopt those of dead runs)."""
    return claim_files(settings.landing, settle_seconds=settings.settle_seconds)


@task(retries=3, retry_delay_seconds=[1, 3, 9], retry_condition_fn=is_transient)
def ingest_file(settings: Settings, path: Path) -> SourceOutcome:
    """One landed file: decode, check, write once, then move it to done/ or quarantine/."""
    started = time.perf_counter()
    outcome = SourceOutcome(source=f"file:{path.name}", kind="landing")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    try:
        decoded = read_landed_file(path, precision=settings.line_protocol_precision)
        frame, pre_rejected = decoded.frame, decoded.rejected
        outcome.skipped_fields = decoded.skipped_fields
        landed = _write(settings, frame, outcome, batch_id=digest, pre_rejected=pre_rejected)
    except (UnreadableFile, BatchUnusable) as exc:
        reason = "unusable_batch" if isinstance(exc, BatchUnusable) else "unreadable_file"
        outcome.file_quarantined = reason
        move_quarantined(path, settings.quarantine, reason=reason, detail=str(exc), tag=digest[:12])
    else:
        if landed:
            move_done(path, settings.landing, tag=digest[:12])
        else:
            outcome.file_quarantined = "cardinality_limit"
            move_quarantined(
                path,
                settings.quarantine,
                reason="cardinality_limit",
                detail=f"more than {settings.max_new_series_per_batch} new series",
                tag=digest[:12],
            )
    outcome.seconds = time.perf_counter() - started
    return outcome


@task(retries=3, retry_delay_seconds=[1, 3, 9], retry_condition_fn=is_transient)
def ingest_records(
    settings: Settings, samples: list[dict[str, Any]] | pd.DataFrame
) -> SourceOutcome:
    """Samples handed in by a caller (a flow parameter or Python)."""
    started = time.perf_counter()
    outcome = SourceOutcome(source="programmatic", kind="programmatic")
    frame = to_frame(samples)  # aliases resolved; a missing column is a clear error
    _write(settings, frame, outcome, batch_id=None, pre_rejected=[])
    outcome.seconds = time.perf_counter() - started
    return outcome


@task(retries=3, retry_delay_seconds=[1, 3, 9], retry_condition_fn=is_transient)
def scrape_target(settings: Settings, url: str) -> SourceOutcome:
    """One Prometheus exposition scrape, stamped at scrape time unless the text has timestamps."""
    started = time.perf_counter()
    outcome = SourceOutcome(source=f"scrape:{url}", kind="scrape")
    scrape_time = datetime.now(UTC)
    response = httpx.get(url, timeout=settings.scrape_timeout_seconds)
    if response.status_code >= 500:
        raise TransientError(f"{url} answered {response.status_code}")
    response.raise_for_status()
    target = httpx.URL(url)
    parsed = parse_exposition(
        response.text,
        scrape_time=scrape_time,
        extra_labels={"instance": f"{target.host}:{target.port}", "job": "scrape"},
    )
    _write(settings, parsed.frame, outcome, batch_id=None, pre_rejected=parsed.rejected)
    outcome.seconds = time.perf_counter() - started
    return outcome
