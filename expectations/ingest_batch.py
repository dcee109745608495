"""The ingest-batch data-quality contract: what a micro-batch of samples must satisfy to be written.

This module is the one place the rules that reject a row of an ingested batch are declared:
`CHECKS`, as data (expectation type, column, arguments, reason codes). Two engines evaluate
that one declaration: Great Expectations (`build_suite`, run by `tasks.quality.validate_batch`)
and a vectorised pandas twin (`failing_rows`, run by `validate_batch_pandas` where importing GX
would cost more than the batch: the served scrape path). tests/test_quality.py holds the two
equal. What the tables cannot hold at all (no metric, text that is not a number, NUL
characters, a time outside 1970-2262, unusable labels) is not a contract rule: it is stated by
`storage.normalise` while the batch is read, and it decides only for rows the suite passed.

The suite runs on a *checked frame* built from the normalised batch (`tasks.quality`): the
columns metric, value, ts as read, plus helper columns that GX cannot compute itself (it cannot look
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

import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import pandas as pd

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
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


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
    """One rule of the suite, declared once: the GX expectation (type, column, arguments) and
    the row reasons it gives. `build_suite` makes the GX expectation of it and
    `failing_rows` evaluates the same declaration with pandas/numpy."""

    expectation_type: str
    column: str
    reasons: tuple[str, ...]  # the row reasons it can give, in priority order
    arguments: Mapping[str, Any] = MappingProxyType({})  # besides column and meta

    @property
    def reason(self) -> str:
        """The expectation's meta reason: its code, or codes joined by "|"."""
        return "|".join(self.reasons)

    @property
    def gx_class(self) -> str:
        """The GX expectation class name (expect_column_values_to_... in CamelCase)."""
        return "".join(word.capitalize() for word in self.expectation_type.split("_"))


_R = Reason
# Suite order: the first failing check names a row's reason.
CHECKS: tuple[Check, ...] = (
    Check(
        "expect_column_values_to_match_regex",
        "metric",
        (_R.INVALID_METRIC_NAME,),
        MappingProxyType({"regex": METRIC_NAME_PATTERN}),
    ),
    Check("expect_column_values_to_not_be_null", "value", (_R.NON_FINITE_VALUE,)),
    Check(
        "expect_column_values_to_be_between",
        "value",
        (_R.NON_FINITE_VALUE,),
        MappingProxyType({"min_value": -FLOAT_MAX, "max_value": FLOAT_MAX}),
    ),
    Check("expect_column_values_to_not_be_null", "ts", (_R.INVALID_TIMESTAMP,)),
    Check(
        "expect_column_values_to_be_between",
        "ts",
        (_R.TIMESTAMP_IN_FUTURE, _R.TIMESTAMP_TOO_OLD),
        MappingProxyType(
            {"min_value": {"$PARAMETER": TS_MIN_PARAM}, "max_value": {"$PARAMETER": TS_MAX_PARAM}}
        ),
    ),
    Check(
        "expect_column_values_to_be_in_set",
        LABEL_LIMIT_EXCEEDED,
        (_R.TOO_MANY_LABELS, _R.LABEL_NAME_TOO_LONG, _R.LABEL_VALUE_TOO_LONG),
        MappingProxyType({"value_set": [""]}),
    ),
    Check(
        "expect_column_values_to_be_in_set",
        CONFLICTING,
        (_R.CONFLICTING_VALUES,),
        MappingProxyType({"value_set": [False]}),
    ),
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
    """The GX suite for `limits`: one expectation per declared `Check`, in `CHECKS` order
    (imports great_expectations)."""
    import great_expectations as gx

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
    for check in CHECKS:
        expectation = getattr(gx.expectations, check.gx_class)
        suite.add_expectation(
            expectation(column=check.column, meta={"reason": check.reason}, **check.arguments)
        )
    return suite


# -- the same declaration evaluated with pandas/numpy ------------------------------------------
def failing_rows(check: Check, column: pd.Series, parameters: Mapping[str, Any]) -> np.ndarray:
    """Positions of the rows of `column` that fail `check`, with GX's semantics: every
    expectation but not-null skips missing values; `$PARAMETER` arguments come from
    `parameters`. The pandas twin of the GX suite: vectorised, no GX import."""
    arguments = {
        name: parameters[value["$PARAMETER"]] if isinstance(value, Mapping) else value
        for name, value in check.arguments.items()
    }
    missing = column.isna().to_numpy()
    kind = check.expectation_type
    if kind == "expect_column_values_to_not_be_null":
        failing = missing
    elif kind == "expect_column_values_to_match_regex":
        codes, names = pd.factorize(column, use_na_sentinel=True)
        pattern = re.compile(arguments["regex"])
        matched = [pattern.search(str(name)) is not None for name in names]
        failing = ~np.array([*matched, True])[codes]  # code -1 (missing) is not matched
    elif kind == "expect_column_values_to_be_between":
        low, high = arguments["min_value"], arguments["max_value"]
        if isinstance(column.dtype, pd.DatetimeTZDtype):
            numbers = column.to_numpy(dtype="datetime64[us]").view(np.int64)
            low, high = epoch_us(low), epoch_us(high)
        else:
            numbers = column.to_numpy(dtype=np.float64, na_value=np.nan)
        with np.errstate(invalid="ignore"):
            failing = ~missing & ((numbers < low) | (numbers > high))
    elif kind == "expect_column_values_to_be_in_set":
        failing = ~missing & ~column.isin(list(arguments["value_set"])).to_numpy()
    else:
        raise NotImplementedError(f"no pandas evaluation for {kind}")
    return np.flatnonzero(failing)


def epoch_us(moment: datetime) -> int:
    """Epoch microseconds of an aware datetime (exact, as GX compares at µs resolution)."""
    return (moment - _EPOCH) // timedelta(microseconds=1)
