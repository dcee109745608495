"""The concerns of a `Store` besides samples: `store.retention`, `store.detection`,
`store.rollups`, `store.quarantine` and `store.ops` (`store.alerts` is storage/alert_facade.py).

Each is a thin class bound to one store's connection (and settings), one method per thing the
tasks, flows and CLI ask; the SQL stays in the concern's own module. Code above storage/
calls these and never the backend: it neither sees a connection nor opens a transaction.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from metricmill.types import datetime_to_us, us_to_datetime
from storage import detection, ops
from storage.archive import (
    Anonymizer,
    Checkpoint,
    archive_root,
    export_to_parquet,
    manifest,
    verify_archive,
)
from storage.backend import Backend
from storage.postgres import timescale
from storage.records import TimescaleStatus
from storage.retention import (
    RetentionReport,
    RetentionRule,
    add_rule,
    apply,
    default_days,
    list_rules,
    preview,
    raw_cutoffs,
    remove_rule,
)
from storage.rollup import RollupReport, RollupStatus, Span, rollup_status_of, run_rollup
from storage.rollup import written_rows as rollup_written_rows
from storage.schema import ROLLUP_TABLES

if TYPE_CHECKING:
    from storage.store import Store

QUARANTINE_COLUMNS = (
    "id", "batch_id", "source", "reason", "detail", "row", "created_at", "replayed_at",
)  # fmt: skip


class Retention:
    """Retention rules and legal holds, applying them, the Parquet archive, compression."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def rules(self) -> list[RetentionRule]:
        """Every rule, by level, highest priority first."""
        return list_rules(self._store.backend)

    def add_rule(
        self,
        metric_pattern: str,
        retention_days: int | None = None,
        labels: Mapping[str, str] | None = None,
        priority: int = 0,
        *,
        level: str = "raw",
        archive: bool = True,
        legal_hold: bool = False,
        archive_lock_days: int | None = None,
    ) -> RetentionRule:
        """Validate and store a rule (RetentionRuleError when it is bad); returns it.
        `archive_lock_days`: its archive files' compliance lock (None: the setting's)."""
        return add_rule(
            self._store.backend, metric_pattern, retention_days, labels, priority,
            level=level, archive=archive, legal_hold=legal_hold,
            archive_lock_days=archive_lock_days,
        )  # fmt: skip

    def remove_rule(self, rule_id: int) -> RetentionRule:
        """Remove a rule (RetentionRuleError when there is none); returns what was removed."""
        return remove_rule(self._store.backend, rule_id)

    def default_days(self, level: str) -> int | None:
        """How long unmatched series keep `level` under the settings (None: forever)."""
        return default_days(self._store.settings, level)

    def preview(self, now: datetime | None = None) -> RetentionReport:
        """What applying would delete, archive and keep by legal hold; nothing changes."""
        return preview(self._store, now)

    def apply(
        self,
        now: datetime | None = None,
        *,
        anonymizer: Anonymizer | None = None,
        checkpoint: Checkpoint | None = None,
    ) -> RetentionReport:
        """Archive (verified) and delete what the rules let go; held series stay."""
        return apply(self._store, now, anonymizer=anonymizer, checkpoint=checkpoint)

    def raw_cutoffs(
        self, metrics: np.ndarray, labels: np.ndarray, now: datetime | None = None
    ) -> np.ndarray | None:
        """Per incoming row, the oldest time (µs) a raw rule stricter than the default keeps;
        None when no such rule exists (see storage.retention.planning.raw_cutoffs)."""
        return raw_cutoffs(self._store.backend, self._store.settings, metrics, labels, now)

    def manifest(self, metric: str | None = None) -> pd.DataFrame:
        """The archive files recorded (of one metric, or all)."""
        return manifest(self._store.backend, metric)

    def verify_archive(self) -> list[tuple[str, str]]:
        """(path, problem) for every archive file that does not match its manifest row."""
        return verify_archive(self._store.backend, archive_root(self._store.settings))

    def export_parquet(
        self,
        output: str | Path | None,
        start: datetime,
        end: datetime,
        *,
        metric: str | None = None,
        anonymizer: Anonymizer | None = None,
    ) -> tuple[Path, int]:
        """Raw samples in [start, end) as one Parquet file under the export directory."""
        return export_to_parquet(
            self._store.backend, self._store.settings, output, start, end,
            metric=metric, anonymizer=anonymizer,
        )  # fmt: skip

    def compress_old_chunks(self, days: int | None = None) -> int:
        """On TimescaleDB, compress sample and rollup chunks that ended more than `days`
        (default: the compress_after_days setting) ago; the number compressed. Elsewhere
        there are no chunks: 0, and nothing is done."""
        backend = self._store.backend
        if not getattr(backend, "timescale", False):
            return 0
        after = self._store.settings.compress_after_days if days is None else days
        return sum(
            timescale.compress_old_chunks(backend, after, table)
            for table in ("samples", *ROLLUP_TABLES.values())
        )


class Detection:
    """Baselines, detector models, watermarks and late marks: the bulk reads and writes of
    baseline and detect runs (storage/detection.py)."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def series_metrics(self, series_ids: Sequence[int] | None = None) -> pd.DataFrame:
        """series_id and metric name of every series (or of the given ones)."""
        return detection.series_metrics(self._store, series_ids)

    def history(
        self,
        *,
        start_us: int,
        end_us: int,
        level: str = "5m",
        series_ids: Sequence[int] | None = None,
    ) -> pd.DataFrame:
        """Per-bucket history of the series from a rollup level, in one query."""
        return detection.history(
            self._store, start_us=start_us, end_us=end_us, level=level, series_ids=series_ids
        )

    def series_with_history(self, *, start_us: int, end_us: int, level: str = "5m") -> list[int]:
        """Series with at least one bucket of `level` in [start, end)."""
        return detection.series_with_history(
            self._store, start_us=start_us, end_us=end_us, level=level
        )

    def write_baselines(self, frame: pd.DataFrame) -> int:
        """Replace the baselines of the series in `frame`; the rows written."""
        return detection.write_baselines(self._store, frame)

    def read_baselines(self, series_ids: Sequence[int] | None = None) -> pd.DataFrame:
        """The stored baselines (of the given series, or all)."""
        return detection.read_baselines(self._store, series_ids)

    def read_scoring_baselines(
        self, series_ids: Sequence[int] | None = None
    ) -> tuple[pd.DataFrame, pd.DataFrame]:
        """What scoring needs of the stored baselines: (a row per series and slot, a row per
        series); see `BaselineTable.from_reads`."""
        return detection.read_scoring_baselines(self._store, series_ids)

    def write_models(self, models: Sequence[dict[str, Any]]) -> None:
        """Store fitted detector models (replacing those of the same scope and detector)."""
        detection.write_models(self._store, models)

    def read_models(self, scopes: Sequence[str] | None = None) -> pd.DataFrame:
        """The stored detector models (of the given scopes, or all)."""
        return detection.read_models(self._store, scopes)

    def read_watermarks(self) -> pd.DataFrame:
        """series_id, ts_us: how far detection has scored each series."""
        return detection.read_watermarks(self._store)

    def series_to_score(self, *, floor_us: int) -> list[int]:
        """Series with samples newer than their watermark (and than `floor_us`)."""
        return detection.series_to_score(self._store, floor_us=floor_us)

    def read_late(self, series_ids: Sequence[int]) -> pd.DataFrame:
        """The late-data marks (id, series_id, from_us) of these series."""
        return detection.read_late(self._store, series_ids)

    def clear_late(self, mark_ids: Sequence[int]) -> int:
        """Delete the late-data marks a run has read; how many."""
        return detection.clear_late(self._store, mark_ids)

    def recent_points(
        self,
        *,
        series_ids: Sequence[int],
        floor_us: int,
        context_us: int,
        late: pd.DataFrame | None = None,
    ) -> pd.DataFrame:
        """Raw points newer than each series' watermark, with `context_us` of context."""
        return detection.recent_points(
            self._store, series_ids=series_ids, floor_us=floor_us, context_us=context_us,
            late=late,
        )  # fmt: skip

    def advance_watermarks(self, marks: pd.DataFrame) -> int:
        """Move the series' watermarks forward to `marks` (never back); how many moved."""
        return detection.advance_watermarks(self._store, marks)


class Rollups:
    """The rollup levels: recomputing pending ranges, their status, reading rows back."""

    def __init__(self, backend: Backend, chunk_hours: int) -> None:
        self._backend = backend
        self._chunk_hours = chunk_hours

    def run(self, *, max_chunks: int | None = None) -> RollupReport:
        """Recompute the pending ranges at 1m, 5m, 1h and 1d, in bounded transactions."""
        return run_rollup(self._backend, chunk_hours=self._chunk_hours, max_chunks=max_chunks)

    def status(self) -> RollupStatus:
        """Pending ranges and the lag of the newest rolled-up bucket."""
        return rollup_status_of(self._backend)

    def pending_ranges(self) -> int:
        """How many ranges wait to be rolled up (one count, cheaper than `status`)."""
        return int(self._backend.execute("SELECT count(*) FROM rollup_pending")[0][0])

    def written_rows(self, level: str, spans: list[Span], limit: int) -> pd.DataFrame:
        """A level's rows in the spans (newest first, at most `limit`), in one query."""
        return rollup_written_rows(self._backend, level, spans, limit)


class Quarantine:
    """Rows and batches set aside with a reason code; `store.quarantine(...)` lists them."""

    def __init__(self, backend: Backend) -> None:
        self._backend = backend

    def __call__(self, *, limit: int = 100, pending_only: bool = False) -> pd.DataFrame:
        """The newest quarantined rows and batches, with their reason codes."""
        rows = self._backend.quarantine_rows(limit=limit, pending_only=pending_only)
        return pd.DataFrame([_quarantine_record(r) for r in rows], columns=list(QUARANTINE_COLUMNS))

    def entry(self, entry_id: int) -> dict[str, Any] | None:
        """One quarantine entry with the row as received, or None."""
        rows = self._backend.quarantine_rows(entry_id=entry_id, limit=1)
        return _quarantine_record(rows[0]) if rows else None

    def mark_replayed(self, entry_id: int) -> None:
        """Note that an entry has been written again (it stays, for the record)."""
        self._backend.mark_replayed(entry_id, datetime_to_us(datetime.now(UTC)))


class Ops:
    """What an operator asks the database (storage/ops.py) and the TimescaleDB setup."""

    def __init__(self, backend: Backend) -> None:
        self._backend = backend

    def snapshot(self, *, now_us: int) -> ops.Snapshot:
        """Ingest and rollup lag, open alerts, quarantine: a handful of aggregate queries."""
        return ops.snapshot(self._backend, now_us=now_us)

    def timescale(self) -> TimescaleStatus:
        """Whether the database is a PostgreSQL server and TimescaleDB is in use there."""
        return TimescaleStatus(
            server=self._backend.name == "postgresql",
            version=getattr(self._backend, "timescale_version", None),
            note=getattr(self._backend, "timescale_note", ""),
        )

    def timescale_jobs(self) -> list[tuple[str, str, bool]]:
        """TimescaleDB background jobs: (policy, hypertable, scheduled); [] elsewhere."""
        return ops.timescale_jobs(self._backend)

    def compressed_hypertables(self) -> list[tuple[str, bool]]:
        """(hypertable, compression enabled) of every hypertable; [] elsewhere."""
        return ops.compressed_hypertables(self._backend)


def _quarantine_record(row: tuple[Any, ...]) -> dict[str, Any]:
    """One quarantine row as a record: the row as received parsed back from JSON."""
    entry_id, batch_id, source, reason, detail, row_data, created, replayed = row
    try:
        parsed = json.loads(row_data) if row_data else None
    except ValueError:
        parsed = row_data
    return {
        "id": int(entry_id),
        "batch_id": batch_id,
        "source": source,
        "reason": reason,
        "detail": detail,
        "row": parsed,
        "created_at": None if created is None else us_to_datetime(int(created)),
        "replayed_at": None if replayed is None else us_to_datetime(int(replayed)),
    }
