"""The ingest-batch data-quality contract: what a micro-batch of samples must satisfy to be written.

The suite runs on a *checked frame* derived from the batch (see `tasks.quality`): the columns
metric, value, ts as given, plus helper columns that GX cannot compute itself (it cannot look
inside the dict-valued labels column, nor across rows):

- ``label_count``, ``max_label_key_len``, ``max_label_value_len``: per row, from its label set;
- ``label_limit_exceeded``: "" or the reason code of the first label limit the row exceeds
  (count, then key length, then value length);
- ``conflicting``: True where another row of the same series (metric + canonical labels) and
  timestamp has a different value (identical repeats are not conflicts).

Every expectation carries ``meta={"reason": <code>}``; a row failing several is quarantined with
the reason of the first one in suite order (`CHECKS` order). Two expectations stand for more than
one reason code (``"a|b"``), to keep the suite short (GX costs ~30 ms per expectation per batch,
whatever the row count): the timestamp window (above the max: ``timestamp_in_future``, below the
min: ``timestamp_too_old``) and the label limits (the code is the helper column's value).

The timestamp window depends on the time of validation, so its bounds are suite parameters
(`TS_MIN_PARAM`, `TS_MAX_PARAM`) supplied per run by `suite_parameters`, which lets one built
suite be reused for every batch.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, NamedTuple

from metricmill.errors import MetricmillError
from metricmill.types import Reason

if TYPE_CHECKING:
    import great_expectations as gx

SUITE_NAME = "ingest_batch"
SUITE_VERSION = "1"

REQUIRED_COLUMNS: tuple[str, ...] = ("metric", "labels", "ts", "value")
# The Prometheus metric-name pattern. `\Z` rather than `$`: with Python regex semantics (which
# pandas uses for this pattern) `$` also matches before a trailing newline, so "cpu\n" would pass.
METRIC_NAME_PATTERN = r"^[a-zA-Z_:][a-zA-Z0-9_:]*\Z"
FLOAT_MAX = sys.float_info.max

# helper columns derived before validation
LABEL_COUNT = "label_count"
MAX_LABEL_KEY_LEN = "max_label_key_len"
MAX_LABEL_VALUE_LEN = "max_label_value_len"
LABEL_LIMIT_EXCEEDED = "label_limit_exceeded"
CONFLICTING = "conflicting"
HELPER_COLUMNS: tuple[str, ...] = (
    LABEL_COUNT,
    MAX_LABEL_KEY_LEN,
    MAX_LABEL_VALUE_LEN,
    LABEL_LIMIT_EXCEEDED,
    CONFLICTING,
)

# suite parameters ($PARAMETER) filled in per validation run
TS_MIN_PARAM = "ts_min"
TS_MAX_PARAM = "ts_max"


class BatchUnusable(MetricmillError):
    """The batch as a whole cannot be checked (e.g. a required column is missing)."""


@dataclass(frozen=True)
class QualityLimits:
    """Bounds the contract enforces. Hashable; `now` is not part of equality or the hash, so a
    suite cached per limits serves every `now` (the time window is passed at validation)."""

    max_future_skew: timedelta = timedelta(minutes=10)
    retention_days: int = 30
    max_labels: int = 32
    max_label_name_length: int = 128
    max_label_value_length: int = 2048
    now: datetime | None = field(default=None, compare=False)

    def reference_time(self) -> datetime:
        """`now` (naive taken as UTC), or the current time."""
        if self.now is None:
            return datetime.now(UTC)
        return self.now if self.now.tzinfo is not None else self.now.replace(tzinfo=UTC)

    @property
    def retention_horizon(self) -> datetime:
        """The oldest accepted sample time."""
        return self.reference_time() - timedelta(days=self.retention_days)

    def ts_bounds(self) -> tuple[datetime, datetime]:
        """(oldest, newest) accepted sample time, from one reading of the clock."""
        now = self.reference_time()
        return now - timedelta(days=self.retention_days), now + self.max_future_skew


class Check(NamedTuple):
    """One expectation of the suite, as the summary and the pandas cross-check describe it."""

    expectation_type: str
    column: str
    reasons: tuple[str, ...]  # the row reasons it can give, in priority order

    @property
    def reason(self) -> str:
        """The expectation's meta reason: its code, or codes joined by "|"."""
        return "|".join(self.reasons)


_R = Reason
# Suite order: the first failing check names a row's reason.
CHECKS: tuple[Check, ...] = (
    Check("expect_column_values_to_match_regex", "metric", (_R.INVALID_METRIC_NAME,)),
    Check("expect_column_values_to_not_be_null", "value", (_R.NON_FINITE_VALUE,)),
    Check("expect_column_values_to_be_between", "value", (_R.NON_FINITE_VALUE,)),
    Check("expect_column_values_to_not_be_null", "ts", (_R.INVALID_TIMESTAMP,)),
    Check(
        "expect_column_values_to_be_between",
        "ts",
        (_R.TIMESTAMP_IN_FUTURE, _R.TIMESTAMP_TOO_OLD),
    ),
    Check(
        "expect_column_values_to_be_in_set",
        LABEL_LIMIT_EXCEEDED,
        (_R.TOO_MANY_LABELS, _R.LABEL_NAME_TOO_LONG, _R.LABEL_VALUE_TOO_LONG),
    ),
    Check("expect_column_values_to_be_in_set", CONFLICTING, (_R.CONFLICTING_VALUES,)),
)
REASON_ORDER: tuple[str, ...] = tuple(
    dict.fromkeys(reason for check in CHECKS for reason in check.reasons)
)


def check_required_columns(columns: Iterable[Any]) -> None:
    """Raise `BatchUnusable` unless every required column is present."""
    present = {str(c) for c in columns}
    missing = [c for c in REQUIRED_COLUMNS if c not in present]
    if missing:
        raise BatchUnusable(
            f"batch has no {', '.join(missing)} column(s) "
            f"(has: {', '.join(sorted(present)) or 'none'}); "
            f"suite {SUITE_NAME} v{SUITE_VERSION} needs {', '.join(REQUIRED_COLUMNS)}"
        )


def suite_parameters(limits: QualityLimits) -> dict[str, datetime]:
    """The per-run values of the suite's $PARAMETERs (the accepted time window)."""
    oldest, newest = limits.ts_bounds()
    return {TS_MIN_PARAM: oldest, TS_MAX_PARAM: newest}


def build_suite(limits: QualityLimits) -> gx.ExpectationSuite:
    """The suite for `limits`, in `CHECKS` order (imports great_expectations)."""
    import great_expectations as gx

    expect = gx.expectations

    def meta(*reasons: str) -> dict[str, Any]:
        return {"reason": "|".join(reasons)}

    r = Reason
    expectations = [
        expect.ExpectColumnValuesToMatchRegex(
            column="metric", regex=METRIC_NAME_PATTERN, meta=meta(r.INVALID_METRIC_NAME)
        ),
        expect.ExpectColumnValuesToNotBeNull(column="value", meta=meta(r.NON_FINITE_VALUE)),
        expect.ExpectColumnValuesToBeBetween(
            column="value", min_value=-FLOAT_MAX, max_value=FLOAT_MAX, meta=meta(r.NON_FINITE_VALUE)
        ),
        expect.ExpectColumnValuesToNotBeNull(column="ts", meta=meta(r.INVALID_TIMESTAMP)),
        expect.ExpectColumnValuesToBeBetween(
            column="ts",
            min_value={"$PARAMETER": TS_MIN_PARAM},
            max_value={"$PARAMETER": TS_MAX_PARAM},
            meta=meta(r.TIMESTAMP_IN_FUTURE, r.TIMESTAMP_TOO_OLD),
        ),
        expect.ExpectColumnValuesToBeInSet(
            column=LABEL_LIMIT_EXCEEDED,
            value_set=[""],
            meta=meta(r.TOO_MANY_LABELS, r.LABEL_NAME_TOO_LONG, r.LABEL_VALUE_TOO_LONG),
        ),
        expect.ExpectColumnValuesToBeInSet(
            column=CONFLICTING, value_set=[False], meta=meta(r.CONFLICTING_VALUES)
        ),
    ]
    suite = gx.ExpectationSuite(
        name=SUITE_NAME,
        meta={
            "suite_version": SUITE_VERSION,
            "limits": {
                "max_future_skew_seconds": limits.max_future_skew.total_seconds(),
                "retention_days": limits.retention_days,
                "max_labels": limits.max_labels,
                "max_label_name_length": limits.max_label_name_length,
                "max_label_value_length": limits.max_label_value_length,
            },
        },
    )
    for expectation in expectations:
        suite.add_expectation(expectation)
    return suite
