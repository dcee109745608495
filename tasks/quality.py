"""Apply the ingest-batch rules to a normalised micro-batch before it is written.

A batch is read once by `storage.normalise.normalise`; the checked frame the rules run on is
built from that reading (no column is parsed again). `validate_batch` evaluates the rules with
Great Expectations (`expectations.ingest_batch.build_suite`), `validate_batch_pandas` the same
declaration with pandas (`expectations.ingest_batch.failing_rows`). Both return a
`QualityResult`: the rows that pass, the rejected rows (JSON-safe, with the reason of the first
failing rule), the verdict per row, the normalised batch, and a summary.

great_expectations is imported lazily (on the first GX validation), and its context and suites
are built once per process.
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from expectations import quiet_ephemeral_context
from expectations.ingest_batch import (
    CHECKS,
    CONFLICTING,
    LABEL_COUNT,
    LABEL_LIMIT_EXCEEDED,
    MAX_LABEL_KEY_LEN,
    MAX_LABEL_VALUE_LEN,
    REASON_ORDER,
    SUITE_NAME,
    SUITE_VERSION,
    TS_MAX_PARAM,
    BatchUnusable,
    Check,
    QualityLimits,
    build_suite,
    check_required_columns,
    epoch_us,
    failing_rows,
    suite_parameters,
)
from metricmill.types import Reason
from storage.labels import LabelSets
from storage.normalise import Normalised, normalise, text_column

if TYPE_CHECKING:
    import great_expectations as gx
    from great_expectations.core.batch_definition import BatchDefinition

__all__ = [
    "BatchUnusable",
    "QualityCheckError",
    "QualityLimits",
    "QualityResult",
    "validate_batch",
    "validate_batch_pandas",
]

_DATASOURCE = "metricmill_quality"
_ASSET = "ingest_batch"
_BATCH_DEFINITION = "whole_batch"
_gx_lock = threading.Lock()


class QualityCheckError(RuntimeError):
    """An expectation could not be evaluated (GX raised inside it): the batch was not checked."""


@dataclass
class QualityResult:
    """Rows that passed, rejected rows with their reason, and a per-expectation summary."""

    good: pd.DataFrame
    rejected: list[tuple[dict[str, Any], str]]
    summary: dict[str, Any]
    # the position in the checked frame of each rejected row (aligned with `rejected`)
    rejected_positions: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    # the good rows' times (epoch µs) and values as the checks read them
    good_ts_us: np.ndarray | None = None
    good_values: np.ndarray | None = None
    # per row of the batch: the reason of the first rule it fails, or None
    reasons: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=object))
    # the batch as normalised once (the write path encodes it; nothing reads it again)
    batch: Normalised | None = None

    def typed_good(self) -> pd.DataFrame:
        """The good rows with ts as datetime64[us, UTC] and value as float64, as the batch was
        read (other columns as received). The write path encodes `batch` instead."""
        if self.good_ts_us is None or self.good_values is None:
            return self.good
        ts = pd.Series(self.good_ts_us.view("datetime64[us]"), index=self.good.index)
        return self.good.assign(ts=ts.dt.tz_localize("UTC"), value=self.good_values)

    def markdown(self) -> str:
        """A short markdown report (e.g. for a Prefect artifact)."""
        s = self.summary
        lines = [
            f"### Data quality: suite `{s['suite']}` v{s['suite_version']} ({s['engine']})",
            "",
            f"Rows in: **{s['rows_in']}**, good: **{s['rows_good']}**, "
            f"rejected: **{s['rows_rejected']}**",
            "",
            "| # | expectation | column | reason | unexpected | ok |",
            "|---:|---|---|---|---:|:---:|",
        ]
        for number, e in enumerate(s["expectations"], start=1):
            ok = "yes" if e["success"] else "**no**"
            lines.append(
                f"| {number} | {e['expectation_type']} | {e['column']} | {e['reason']} "
                f"| {e['unexpected_count']} | {ok} |"
            )
        if s["rejected_by_reason"]:
            lines += ["", "| rejected by reason (first failure) | rows |", "|---|---:|"]
            lines += [
                f"| {reason} | {count} |" for reason, count in s["rejected_by_reason"].items()
            ]
        return "\n".join(lines) + "\n"


# -- the checked frame ---------------------------------------------------------------------
def _checked_frame(batch: Normalised, limits: QualityLimits) -> pd.DataFrame:
    """What the rules see: metric (text), value, ts as normalised, plus the helper columns."""
    labels = batch.labels
    return pd.DataFrame(
        {
            "metric": batch.metric_text().array,
            "value": batch.values,
            "ts": batch.typed_ts().array,
            LABEL_COUNT: labels.count[labels.of_row],
            MAX_LABEL_KEY_LEN: labels.longest_name[labels.of_row],
            MAX_LABEL_VALUE_LEN: labels.longest_value[labels.of_row],
            LABEL_LIMIT_EXCEEDED: _label_limit_exceeded(labels, limits),
            CONFLICTING: batch.conflicting,
        }
    )


def _normalised(
    frame: pd.DataFrame | Normalised, parts: np.ndarray | None
) -> tuple[Normalised, pd.DataFrame]:
    """The batch read once (a frame is normalised here), and its rows as received."""
    if isinstance(frame, Normalised):
        return frame, frame.frame
    check_required_columns(frame.columns)
    n_parts = int(parts.max()) + 1 if parts is not None and len(parts) else 1
    batch = normalise(frame, parts=parts, n_parts=n_parts)
    return batch, batch.frame


def _label_limit_exceeded(labels: LabelSets, limits: QualityLimits) -> pd.Series:
    """ "" or the reason code of the first label limit exceeded (count, key, value length)."""
    code = np.select(
        [
            labels.count > limits.max_labels,
            labels.longest_name > limits.max_label_name_length,
            labels.longest_value > limits.max_label_value_length,
        ],
        [
            Reason.TOO_MANY_LABELS,
            Reason.LABEL_NAME_TOO_LONG,
            Reason.LABEL_VALUE_TOO_LONG,
        ],
        default="",
    )
    return text_column(code.tolist(), labels.of_row)


def _is_missing(value: Any) -> bool:
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def _json_safe(value: Any) -> Any:
    if value is None or isinstance(value, str | bool):
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        number = float(value)
        return number if math.isfinite(number) else repr(number)
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, pd.Timestamp | datetime):
        if pd.isna(value):
            return None
        try:
            return value.isoformat()
        except (ValueError, NotImplementedError, OverflowError):  # beyond Python's year 9999
            return str(pd.Timestamp(value).asm8)
    if _is_missing(value):
        return None
    return str(value)


def rejected_rows(frame: pd.DataFrame, reasons: np.ndarray) -> list[tuple[dict[str, Any], str]]:
    """(row as received, reason) for each row of `frame` whose reason is not None."""
    return _rejected_rows(frame, reasons)


def _rejected_rows(frame: pd.DataFrame, reasons: np.ndarray) -> list[tuple[dict[str, Any], str]]:
    rows = np.flatnonzero(pd.notna(reasons))
    if not len(rows):
        return []
    has_source = "source_row" in frame.columns
    columns = [c for c in frame.columns if c != "source_row"]
    records = frame.iloc[rows][columns].to_dict(orient="records")
    sources = frame["source_row"].to_numpy(dtype=object)[rows] if has_source else None
    out: list[tuple[dict[str, Any], str]] = []
    for position, (row, record) in enumerate(zip(rows, records, strict=True)):
        source = sources[position] if sources is not None else None
        if isinstance(source, Mapping):
            safe = _json_safe(source)
        else:
            safe = {str(k): _json_safe(v) for k, v in record.items()}
        out.append((safe, str(reasons[row])))
    return out


@dataclass
class _Prepared:
    batch: Normalised  # the batch read once
    frame: pd.DataFrame  # its rows as received (RangeIndex)
    checked: pd.DataFrame  # what the rules see


def _prepare(
    frame: pd.DataFrame | Normalised, limits: QualityLimits, parts: np.ndarray | None
) -> _Prepared:
    batch, rows = _normalised(frame, parts)
    return _Prepared(batch=batch, frame=rows, checked=_checked_frame(batch, limits))


def _row_reasons(
    prepared: _Prepared, check: Check, rows: np.ndarray, newest_us: int
) -> np.ndarray | str:
    """The reason code per failing row of `check` (one code for single-reason checks)."""
    if len(check.reasons) == 1:
        return check.reasons[0]
    if check.column == "ts":  # (in future, too old) by the side of the window
        future, too_old = check.reasons
        return np.where(prepared.batch.ts_us[rows] > newest_us, future, too_old).astype(object)
    if check.column == LABEL_LIMIT_EXCEEDED:  # the helper holds the code
        return prepared.checked[LABEL_LIMIT_EXCEEDED].to_numpy(dtype=object)[rows]
    raise AssertionError(f"no row-reason rule for {check}")


def _result(
    prepared: _Prepared,
    failures: list[tuple[dict[str, Any], np.ndarray]],
    newest_us: int,
    engine: str,
) -> QualityResult:
    """Assemble a QualityResult from (summary entry, failing row positions) per check, in
    `CHECKS` order: a row's reason is that of the first check it fails."""
    frame = prepared.frame
    n = len(frame)
    reasons = np.full(n, None, dtype=object)
    for check, (_, rows) in zip(CHECKS, failures, strict=True):
        if len(rows):
            row_reasons = _row_reasons(prepared, check, rows, newest_us)
            free = pd.isna(reasons[rows])
            reasons[rows[free]] = row_reasons if isinstance(row_reasons, str) else row_reasons[free]
    bad = pd.notna(reasons)
    rejected = _rejected_rows(frame, reasons)
    positions = np.flatnonzero(bad)
    good = frame.loc[~bad] if bad.any() else frame
    by_reason: dict[str, int] = {}
    for _, reason in rejected:
        by_reason[reason] = by_reason.get(reason, 0) + 1
    summary = {
        "suite": SUITE_NAME,
        "suite_version": SUITE_VERSION,
        "engine": engine,
        "success": not rejected,
        "rows_in": n,
        "rows_good": len(good),
        "rows_rejected": len(rejected),
        "rejected_by_reason": {r: by_reason[r] for r in REASON_ORDER if r in by_reason},
        "expectations": [entry for entry, _ in failures],
    }
    kept = ~bad
    return QualityResult(
        good=good,
        rejected=rejected,
        summary=summary,
        rejected_positions=positions,
        good_ts_us=prepared.batch.ts_us[kept],
        good_values=prepared.batch.values[kept],
        reasons=reasons,
        batch=prepared.batch,
    )


# -- Great Expectations ---------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _gx_batch_definition() -> BatchDefinition:
    """One ephemeral context + pandas dataframe asset per process (building them is slow)."""
    context = quiet_ephemeral_context()  # imports GX
    from great_expectations.data_context.types.base import ProgressBarsConfig

    # no tqdm bars on stderr for every validation
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    asset = context.data_sources.add_pandas(_DATASOURCE).add_dataframe_asset(_ASSET)
    return asset.add_batch_definition_whole_dataframe(_BATCH_DEFINITION)


@functools.lru_cache(maxsize=16)
def _gx_suite(limits: QualityLimits) -> gx.ExpectationSuite:
    """Cached per limits; `now` is not part of the key (the window is a suite parameter)."""
    return build_suite(limits)


def _raised(exception_info: Any) -> str | None:
    """The message of an exception GX caught while evaluating an expectation, if any."""
    if not exception_info:
        return None
    infos = [exception_info]
    if isinstance(exception_info, Mapping) and "raised_exception" not in exception_info:
        infos = list(exception_info.values())
    for info in infos:
        if isinstance(info, Mapping) and info.get("raised_exception"):
            return str(info.get("exception_message") or "unknown error")
    return None


def _index_positions(index_list: Any) -> np.ndarray:
    if not index_list:
        return np.array([], dtype=np.int64)
    if isinstance(index_list[0], Mapping):  # [{"index": i}] form (unexpected_index_column_names)
        index_list = [item.get("index") for item in index_list]
    return np.asarray(index_list, dtype=np.int64)


def validate_batch(
    frame: pd.DataFrame | Normalised,
    limits: QualityLimits | None = None,
    *,
    parts: np.ndarray | None = None,
) -> QualityResult:
    """Run the GX suite once over the batch; rejected rows carry their first failing reason.

    `frame` is a normalised batch, or a frame normalised here. `parts` (an int per row, with a
    frame) marks a frame made of several batches (one per landed file): conflicting values are
    then looked for within each part only.

    Raises `BatchUnusable` if a required column is missing, `QualityCheckError` if GX could not
    evaluate an expectation.
    """
    limits = limits or QualityLimits()
    prepared = _prepare(frame, limits, parts)
    parameters = suite_parameters(limits)
    with _gx_lock:
        batch_definition = _gx_batch_definition()
        suite = _gx_suite(limits)
        batch = batch_definition.get_batch(batch_parameters={"dataframe": prepared.checked})
        outcome = batch.validate(
            suite, result_format="COMPLETE", expectation_parameters=dict(parameters)
        )
    if len(outcome.results) != len(CHECKS):
        raise QualityCheckError(
            f"suite {SUITE_NAME} v{SUITE_VERSION}: {len(outcome.results)} results for "
            f"{len(CHECKS)} expectations"
        )
    failures: list[tuple[dict[str, Any], np.ndarray]] = []
    for check, item in zip(CHECKS, outcome.results, strict=True):
        config = item.expectation_config
        assert config is not None
        column = str(config.kwargs.get("column"))
        reason = str((config.meta or {}).get("reason"))
        if (config.type, column, reason) != (check.expectation_type, check.column, check.reason):
            raise QualityCheckError(
                f"suite {SUITE_NAME} v{SUITE_VERSION}: result for {config.type} on {column} "
                f"where {check.expectation_type} on {check.column} was expected"
            )
        problem = _raised(item.exception_info)
        if problem is not None:
            raise QualityCheckError(
                f"suite {SUITE_NAME} v{SUITE_VERSION}: {config.type} on {column} failed to run: "
                f"{problem}"
            )
        result = item.result or {}
        entry = {
            "expectation_type": config.type,
            "column": column,
            "reason": reason,
            "unexpected_count": int(result.get("unexpected_count") or 0),
            "success": bool(item.success),
        }
        failures.append((entry, _index_positions(result.get("unexpected_index_list"))))
    return _result(
        prepared, failures, epoch_us(parameters[TS_MAX_PARAM]), engine="great_expectations"
    )


# -- the same declaration in plain pandas ---------------------------------------------------
def validate_batch_pandas(
    frame: pd.DataFrame | Normalised,
    limits: QualityLimits | None = None,
    *,
    parts: np.ndarray | None = None,
) -> QualityResult:
    """The suite's declared checks evaluated with vectorised pandas/numpy
    (`expectations.ingest_batch.failing_rows`, GX's semantics). Same result as
    `validate_batch`, without importing GX."""
    limits = limits or QualityLimits()
    prepared = _prepare(frame, limits, parts)
    parameters = suite_parameters(limits)
    failures = []
    for check in CHECKS:
        rows = failing_rows(check, prepared.checked[check.column], parameters)
        entry = {
            "expectation_type": check.expectation_type,
            "column": check.column,
            "reason": check.reason,
            "unexpected_count": len(rows),
            "success": not len(rows),
        }
        failures.append((entry, rows))
    return _result(prepared, failures, epoch_us(parameters[TS_MAX_PARAM]), engine="pandas")
