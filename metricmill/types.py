"""Shared types: what a write reports, the reason codes for rejected rows, time units."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

# Timestamps are stored as integer microseconds since the Unix epoch (PostgreSQL's resolution).
US_PER_SECOND = 1_000_000
# Accepted sample times: [1970-01-01, 2262-04-11) — the range pandas and every backend agree on.
MIN_TS_US = 0
MAX_TS_US = (2**63 - 1) // 1000


class Reason:
    """Reason codes recorded with every rejected (quarantined) row: the one vocabulary of the
    readers, the write path and the Great Expectations suite."""

    NON_FINITE_VALUE = "non_finite_value"
    INVALID_VALUE = "invalid_value"
    MISSING_METRIC = "missing_metric"
    INVALID_TIMESTAMP = "invalid_timestamp"
    TIMESTAMP_OUT_OF_RANGE = "timestamp_out_of_range"
    INVALID_LABELS = "invalid_labels"
    NUL_CHARACTER = "nul_character"
    INVALID_UNICODE = "invalid_unicode"
    CONFLICTING_VALUES = "conflicting_values_in_batch"
    CARDINALITY_LIMIT = "cardinality_limit"
    MALFORMED_LINE = "malformed_line"
    # the ingest-batch suite's own checks (expectations/ingest_batch.py)
    INVALID_METRIC_NAME = "invalid_metric_name"
    TIMESTAMP_IN_FUTURE = "timestamp_in_future"
    TIMESTAMP_TOO_OLD = "timestamp_too_old"
    TOO_MANY_LABELS = "too_many_labels"
    LABEL_NAME_TOO_LONG = "label_name_too_long"
    LABEL_VALUE_TOO_LONG = "label_value_too_long"


@dataclass
class WriteReport:
    """What one write_samples call did."""

    batch_id: str
    source: str
    rows_in: int = 0
    new_series: int = 0
    written: int = 0
    overwritten: int = 0
    unchanged: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    replay: bool = False
    guarded_new_series: int = 0
    min_ts: datetime | None = None
    max_ts: datetime | None = None

    @property
    def rejected_total(self) -> int:
        return sum(self.rejected.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "batch_id": self.batch_id,
            "source": self.source,
            "rows_in": self.rows_in,
            "new_series": self.new_series,
            "written": self.written,
            "overwritten": self.overwritten,
            "unchanged": self.unchanged,
            "rejected": dict(self.rejected),
            "replay": self.replay,
            "guarded_new_series": self.guarded_new_series,
            "min_ts": self.min_ts.isoformat() if self.min_ts else None,
            "max_ts": self.max_ts.isoformat() if self.max_ts else None,
        }


def us_to_datetime(us: int) -> datetime:
    """Epoch microseconds to an aware UTC datetime."""
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=int(us))


def datetime_to_us(value: datetime) -> int:
    """An aware or naive (taken as UTC) datetime to epoch microseconds."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    delta = value - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * US_PER_SECOND + delta.microseconds
