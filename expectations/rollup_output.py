"""The rollup-output data-quality contract: what every bucket a rollup run writes must satisfy.

A rollup is recomputed from data that already passed the ingest contract, so a violation here
is a bug (or a damaged table), never bad input: `validate_rollup_output` raises
`RollupOutputError` and the run fails loudly.

The suite runs on a *checked frame* built from the rows of one level (see `checked_frame`):
the stored columns plus helper columns GX cannot compute itself (it has no cross-column
arithmetic):

- ``avg_minus_min`` and ``max_minus_avg``: (avg - min) and (max - avg), relative to the
  bucket's magnitude; float rounding may make them a hair negative, hence the tolerance;
- ``variance_rel``: (sum_sq / count - avg²) relative to the mean square;
- ``bucket_offset``: bucket modulo the level's width (0 when aligned);
- ``ts_outside``: True where first_ts/last_ts are out of order or outside the bucket.

great_expectations is imported lazily (first validation); its context and the suite are built
once per process.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    import great_expectations as gx
    from great_expectations.core.batch_definition import BatchDefinition

SUITE_NAME = "rollup_output"
SUITE_VERSION = "1"
TOLERANCE = 1e-9  # relative: what float rounding of sums may cost
LEVEL_WIDTHS_US: dict[str, int] = {
    "1m": 60_000_000,
    "5m": 300_000_000,
    "1h": 3_600_000_000,
    "1d": 86_400_000_000,
}
REQUIRED_COLUMNS: tuple[str, ...] = (
    "series_id",
    "bucket",
    "count",
    "sum",
    "sum_sq",
    "min",
    "max",
    "first_ts",
    "last_ts",
)

_DATASOURCE = "metricmill_rollup_quality"
_ASSET = "rollup_output"
_BATCH_DEFINITION = "whole_frame"
_gx_lock = threading.Lock()


class RollupOutputError(RuntimeError):
    """Rollup output broke the contract: a bug or a damaged table, not bad input."""


@dataclass
class RollupCheck:
    """The outcome of one level's validation."""

    level: str
    rows: int
    failures: dict[str, int]  # expectation label -> unexpected rows (only failing ones)

    @property
    def ok(self) -> bool:
        return not self.failures


def checked_frame(rows: pd.DataFrame, level: str) -> pd.DataFrame:
    """The stored columns plus the helper columns the suite reads (vectorised)."""
    width = LEVEL_WIDTHS_US[level]
    count = rows["count"].to_numpy(dtype="float64")
    total = rows["sum"].to_numpy(dtype="float64")
    low = rows["min"].to_numpy(dtype="float64")
    high = rows["max"].to_numpy(dtype="float64")
    with np.errstate(divide="ignore", invalid="ignore"):
        avg = np.where(count > 0, total / count, np.nan)
        mean_sq = np.where(count > 0, rows["sum_sq"].to_numpy(dtype="float64") / count, np.nan)
        scale = np.maximum.reduce(
            [np.abs(low), np.abs(high), np.abs(avg), np.full_like(avg, 1e-300)]
        )
        sq_scale = np.maximum.reduce([np.abs(mean_sq), avg * avg, np.full_like(avg, 1e-300)])
        avg_minus_min = (avg - low) / scale
        max_minus_avg = (high - avg) / scale
        variance_rel = (mean_sq - avg * avg) / sq_scale
    bucket = rows["bucket"].to_numpy(dtype="int64")
    first_ts = rows["first_ts"].to_numpy(dtype="int64")
    last_ts = rows["last_ts"].to_numpy(dtype="int64")
    outside = (first_ts < bucket) | (last_ts >= bucket + width) | (first_ts > last_ts)
    return pd.DataFrame(
        {
            "series_id": rows["series_id"].to_numpy(dtype="int64"),
            "bucket": bucket,
            "count": rows["count"].to_numpy(dtype="int64"),
            "min": low,
            "max": high,
            "avg_minus_min": avg_minus_min,
            "max_minus_avg": max_minus_avg,
            "variance_rel": variance_rel,
            "bucket_offset": bucket % width,
            "ts_outside": outside,
        }
    )


def _labels() -> list[str]:
    return [
        "count > 0",
        "min <= max",
        "min <= avg",
        "avg <= max",
        "variance >= 0",
        "bucket aligned to level",
        "first/last ts inside bucket",
    ]


def build_suite() -> gx.ExpectationSuite:
    """The suite, one expectation per `_labels()` entry in that order (imports GX)."""
    import great_expectations as gx

    expect = gx.expectations
    labels = _labels()
    expectations = [
        expect.ExpectColumnValuesToBeBetween(column="count", min_value=1),
        expect.ExpectColumnPairValuesAToBeGreaterThanB(
            column_A="max", column_B="min", or_equal=True
        ),
        expect.ExpectColumnValuesToBeBetween(column="avg_minus_min", min_value=-TOLERANCE),
        expect.ExpectColumnValuesToBeBetween(column="max_minus_avg", min_value=-TOLERANCE),
        expect.ExpectColumnValuesToBeBetween(column="variance_rel", min_value=-TOLERANCE),
        expect.ExpectColumnValuesToBeBetween(column="bucket_offset", min_value=0, max_value=0),
        expect.ExpectColumnValuesToBeInSet(column="ts_outside", value_set=[False]),
    ]
    suite = gx.ExpectationSuite(
        name=SUITE_NAME, meta={"suite_version": SUITE_VERSION, "tolerance": TOLERANCE}
    )
    for label, expectation in zip(labels, expectations, strict=True):
        expectation.meta = {"check": label}
        suite.add_expectation(expectation)
    return suite


@functools.lru_cache(maxsize=1)
def _batch_definition() -> BatchDefinition:
    from expectations import quiet_ephemeral_context

    context = quiet_ephemeral_context()  # imports GX
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    asset = context.data_sources.add_pandas(_DATASOURCE).add_dataframe_asset(_ASSET)
    return asset.add_batch_definition_whole_dataframe(_BATCH_DEFINITION)


@functools.lru_cache(maxsize=1)
def _suite() -> gx.ExpectationSuite:
    return build_suite()


def _raised(info: Any) -> bool:
    """True when GX caught an exception while evaluating an expectation."""
    if not isinstance(info, Mapping) or not info:
        return False
    infos = [info] if "raised_exception" in info else list(info.values())
    return any(isinstance(i, Mapping) and i.get("raised_exception") for i in infos)


def validate_rollup_output(rows: pd.DataFrame, level: str) -> RollupCheck:
    """Validate one level's rows with the GX suite (one validation); raise on any violation."""
    missing = [c for c in REQUIRED_COLUMNS if c not in rows.columns]
    if missing:
        raise RollupOutputError(f"rollup rows lack column(s) {', '.join(missing)}")
    if rows.empty:
        return RollupCheck(level=level, rows=0, failures={})
    frame = checked_frame(rows, level)
    with _gx_lock:
        batch = _batch_definition().get_batch(batch_parameters={"dataframe": frame})
        outcome = batch.validate(_suite(), result_format="SUMMARY")
    failures: dict[str, int] = {}
    for item in outcome.results:
        config = item.expectation_config
        label = str((config.meta or {}).get("check")) if config is not None else "?"
        if _raised(item.exception_info):
            raise RollupOutputError(f"suite {SUITE_NAME}: {label} could not be evaluated")
        if not item.success:
            failures[label] = int((item.result or {}).get("unexpected_count") or 0)
    check = RollupCheck(level=level, rows=len(frame), failures=failures)
    if failures:
        details = ", ".join(f"{label}: {n} rows" for label, n in failures.items())
        raise RollupOutputError(
            f"rollup {level} output broke suite {SUITE_NAME} v{SUITE_VERSION} ({details}); "
            "this is a bug or a damaged table, not bad input"
        )
    return check


def describe(checks: list[RollupCheck]) -> dict[str, Any]:
    """Rows checked per level, for logs and artifacts."""
    return {c.level: c.rows for c in checks}
