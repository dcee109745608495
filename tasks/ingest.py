"""Ingestion tasks: what a source did (`SourceOutcome`), the store made ready, and the two
sources of one batch each: samples a caller passes, and a scrape. Landed files are
`tasks.ingest_files`; the one pass a batch takes to the store is `tasks.ingest_check`."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pandas as pd
from prefect import task
from prefect.client.schemas.objects import TaskRun
from prefect.states import State
from prefect.tasks import Task

from expectations.ingest_batch import QualityLimits
from metricmill.secrets import redact
from metricmill.settings import ScrapeTarget, Settings
from metricmill.types import WriteReport
from storage.exposition import parse_exposition
from storage.frames import to_frame
from storage.store import Store
from tasks.ingest_check import encode_one, judge, mark_past_their_rule
from tasks.quality import QualityResult, validate_batch, validate_batch_pandas
from tasks.write_order import TRANSIENT_ERRORS


class TransientError(RuntimeError):
    """A failure worth retrying: a 5xx, a timeout, a dropped connection."""


class CheckFailed(RuntimeError):
    """The quality check itself failed on a file's rows (not a row it rejected)."""


RETRYABLE: tuple[type[BaseException], ...] = (TransientError, *TRANSIENT_ERRORS)


def is_transient(task: Task[Any, Any], task_run: TaskRun, state: State[Any]) -> bool:
    """retry_condition_fn: retry lost connections, 5xx and timeouts — never bad data."""
    try:
        state.result()
    except RETRYABLE:
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

    def take(self, report: WriteReport) -> None:
        """What the write of this source did."""
        self.rows_in = report.rows_in
        self.replay = report.replay
        self.written = report.written
        self.overwritten = report.overwritten
        self.unchanged = report.unchanged
        self.new_series = report.new_series
        self.quarantined = Counter(report.rejected)

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
    check: Callable[..., QualityResult] = validate_batch,
) -> bool:
    """One batch in one pass (`tasks.ingest_check`): judged, encoded, written exactly once.
    False when the cardinality guard quarantined the whole batch."""
    verdict = judge(frame, quality_limits(settings), check=check)
    outcome.quality_markdown = verdict.markdown
    with Store.open(settings=settings) as store:
        mark_past_their_rule(store, verdict)
        report = store.write_batch(
            encode_one(verdict, pre_rejected),
            source=outcome.source,
            batch_id=batch_id,
            max_new_series=settings.max_new_series_per_batch,
        )
    outcome.take(report)
    return not report.guarded_new_series


# Long enough to ride out a database restart at the start of a run.
@task(retries=5, retry_delay_seconds=[2, 5, 10, 20, 30], retry_condition_fn=is_transient)
def prepare_store(settings: Settings) -> None:
    """Create or upgrade the schema once, before the run's tasks open the store side by side
    (on a new database, concurrent first connections race to create the TimescaleDB extension)."""
    Store.open(settings=settings).close()


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
def scrape_target(settings: Settings, target: ScrapeTarget | str) -> SourceOutcome:
    """One Prometheus exposition scrape, stamped at scrape time unless the text has timestamps;
    samples get the target's `instance`, `job` and labels unless they carry their own."""
    started = time.perf_counter()
    if isinstance(target, str):
        target = ScrapeTarget(url=target)
    url = target.url
    outcome = SourceOutcome(source=f"scrape:{redact(url)}", kind="scrape")  # summary: no password
    scrape_time = datetime.now(UTC)
    response = httpx.get(url, timeout=settings.scrape_timeout_seconds)
    if response.status_code >= 500:
        raise TransientError(f"{url} answered {response.status_code}")
    response.raise_for_status()
    address = httpx.URL(url)
    port = address.port or (443 if address.scheme == "https" else 80)
    parsed = parse_exposition(
        response.content,  # bytes: a line that is not UTF-8 is rejected, not stored as U+FFFD
        scrape_time=scrape_time,
        extra_labels={
            "instance": f"{address.host}:{port}",
            "job": target.job,
            **target.labels,
        },
    )
    outcome.skipped_fields = parsed.skipped_nan  # NaN samples: skipped and counted
    # The ingest-batch rules evaluated with pandas (expectations.ingest_batch.failing_rows, held
    # equal to the GX suite by tests/test_quality.py): a served run is a fresh process, and
    # importing Great Expectations and building its context would cost seconds before every
    # scrape's write.
    _write(
        settings,
        parsed.frame,
        outcome,
        batch_id=None,
        pre_rejected=parsed.rejected,
        check=validate_batch_pandas,
    )
    outcome.seconds = time.perf_counter() - started
    return outcome
