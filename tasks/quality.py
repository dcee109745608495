"""Apply the ingest-batch quality contract to a micro-batch before it is written.

`validate_batch` runs the Great Expectations suite (`expectations.ingest_batch`) once per batch;
`validate_batch_pandas` applies the same checks as plain vectorised pandas/numpy (for the
benchmark and as a cross-check). Both return a `QualityResult`: the rows that pass, the rejected
rows (JSON-safe, with the reason of the first failing expectation), and a summary.

great_expectations is imported lazily (on the first GX validation), and its context and suites
are built once per process.
"""

from __future__ import annotations

import functools
import json
import math
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from itertools import chain
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from expectations import quiet_ephemeral_context
from expectations.ingest_batch import (
    CHECKS,
    CONFLICTING,
    FLOAT_MAX,
    LABEL_COUNT,
    LABEL_LIMIT_EXCEEDED,
    MAX_LABEL_KEY_LEN,
    MAX_LABEL_VALUE_LEN,
    METRIC_NAME_PATTERN,
    REASON_ORDER,
    SUITE_NAME,
    SUITE_VERSION,
    TS_MAX_PARAM,
    TS_MIN_PARAM,
    BatchUnusable,
    Check,
    QualityLimits,
    build_suite,
    check_required_columns,
    suite_parameters,
)
from metricmill.types import Reason
from storage.frames import canonical_label_sets, typed_timestamps

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
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


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

    def typed_good(self) -> pd.DataFrame:
        """The good rows with ts as datetime64[us, UTC] and value as float64, read once here
        rather than again by the store (other columns as received)."""
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


# -- shared preparation -----------------------------------------------------------------------
@dataclass
class _Prepared:
    frame: pd.DataFrame  # the batch, RangeIndex
    checked: pd.DataFrame  # what the suite sees: metric, value, ts + helper columns
    ts_us: np.ndarray  # epoch µs of checked["ts"] (NaT: int64 min)


def _label_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return value if isinstance(value, str) else str(value)


def _label_facts(obj: Any) -> tuple[str, int, int, int]:
    """(identity key, label count, longest key, longest value) of one label object."""
    mapping: Any = obj
    if obj is None or (isinstance(obj, float) and math.isnan(obj)):
        mapping = {}
    elif isinstance(obj, str):
        text = obj.strip()
        try:
            mapping = json.loads(text) if text else {}
        except ValueError:
            mapping = None
    if not isinstance(mapping, Mapping):
        # unusable labels: the store rejects them (invalid_labels); here only an identity
        return "\x00invalid:" + repr(obj), 0, 0, 0
    if not mapping:
        return "[]", 0, 0, 0
    pairs = sorted((str(k), _label_text(v)) for k, v in mapping.items())
    key = json.dumps(pairs, ensure_ascii=False, separators=(",", ":"))
    return (
        key,
        len(pairs),
        max(len(k) for k, _ in pairs),
        max(len(v) for _, v in pairs),
    )


@dataclass
class _LabelColumns:
    """Per row: label count, longest key and value, and a label-set identity code."""

    count: np.ndarray
    max_key_len: np.ndarray
    max_value_len: np.ndarray
    identity: np.ndarray  # int64 codes; equal codes = same canonical label set
    identities: int  # number of distinct codes


def _label_columns(label_objs: np.ndarray) -> _LabelColumns:
    """Label facts computed once per distinct label object (by id(), as storage.frames does).

    Fast path when every distinct object is a dict of str to str (NDJSON/CSV input): whole-list
    maps and numpy reductions instead of a Python loop body per object. Otherwise one
    `_label_facts` call per distinct object.
    """
    n = len(label_objs)
    object_ids = np.fromiter(map(id, label_objs), dtype=np.int64, count=n)
    _, first_row, obj_of_row = np.unique(object_ids, return_index=True, return_inverse=True)
    objs = label_objs[first_row].tolist()
    m = len(objs)
    facts = _plain_label_facts(objs)
    if facts is None:
        per_obj = [_label_facts(obj) for obj in objs]
        keys = np.array([f[0] for f in per_obj], dtype=object)
        facts = (
            pd.factorize(keys)[0] if m else np.zeros(0, dtype=np.int64),
            np.fromiter((f[1] for f in per_obj), dtype=np.int64, count=m),
            np.fromiter((f[2] for f in per_obj), dtype=np.int64, count=m),
            np.fromiter((f[3] for f in per_obj), dtype=np.int64, count=m),
        )
    identity, count, key_len, value_len = facts
    identity = np.asarray(identity, dtype=np.int64)
    return _LabelColumns(
        count=count[obj_of_row],
        max_key_len=key_len[obj_of_row],
        max_value_len=value_len[obj_of_row],
        identity=identity[obj_of_row],
        identities=int(identity.max()) + 1 if m else 0,
    )


def _plain_label_facts(
    objs: list[Any],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """(identity code, count, longest key, longest value) per object, or None unless every
    object is a dict with str keys and values."""
    m = len(objs)
    if m == 0 or set(map(type, objs)) != {dict}:
        return None
    flat_keys = list(chain.from_iterable(objs))
    flat_values = list(chain.from_iterable(map(dict.values, objs)))
    if not set(map(type, flat_keys)) <= {str} or not set(map(type, flat_values)) <= {str}:
        return None
    count = np.fromiter(map(len, objs), dtype=np.int64, count=m)
    key_len = np.zeros(m, dtype=np.int64)
    value_len = np.zeros(m, dtype=np.int64)
    filled = count > 0
    if filled.any():
        starts = (np.cumsum(count) - count)[filled]
        lengths = np.fromiter(map(len, flat_keys), dtype=np.int64, count=len(flat_keys))
        key_len[filled] = np.maximum.reduceat(lengths, starts)
        lengths = np.fromiter(map(len, flat_values), dtype=np.int64, count=len(flat_values))
        value_len[filled] = np.maximum.reduceat(lengths, starts)
    # identity: the store's canonical JSON (remembered across batches, so the store's own
    # canonicalisation of the same sets finds it ready)
    canonical_sets, _ = canonical_label_sets(objs)
    if not pd.isna(canonical_sets).any():
        return np.asarray(pd.factorize(canonical_sets)[0]), count, key_len, value_len
    # (text the store rejects: group equal item tuples, then canonicalise once per group)
    items = pd.Series(list(map(tuple, map(dict.items, objs))), dtype=object)
    raw_codes, raw_uniques = pd.factorize(items)
    canonical = np.array(
        [json.dumps(sorted(u), ensure_ascii=False, separators=(",", ":")) for u in raw_uniques],
        dtype=object,
    )
    canonical_codes, _ = pd.factorize(canonical)
    return np.asarray(canonical_codes)[raw_codes], count, key_len, value_len


def _metric_column(column: pd.Series) -> pd.Series:
    """Metric names as a string column (other objects as their text, missing stays missing)."""
    if isinstance(column.dtype, pd.StringDtype):
        return column.astype("str")
    raw = column.to_numpy(dtype=object)
    try:
        codes, uniques = pd.factorize(raw, use_na_sentinel=True)
    except TypeError:  # unhashable objects: per row
        return pd.Series([None if _is_missing(v) else str(v) for v in raw], dtype="str")
    names = np.array([u if isinstance(u, str) else str(u) for u in uniques] + [None], dtype=object)
    return pd.Series(names[codes], dtype="str")


def _is_missing(value: Any) -> bool:
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def _value_column(column: pd.Series) -> np.ndarray:
    if pd.api.types.is_float_dtype(column) and column.dtype == np.float64:
        return column.to_numpy()
    if pd.api.types.is_numeric_dtype(column) and not pd.api.types.is_bool_dtype(column):
        return column.to_numpy(dtype="float64", na_value=np.nan)
    return pd.to_numeric(column, errors="coerce").to_numpy(dtype="float64", na_value=np.nan)


def _ts_column(column: pd.Series) -> pd.Series:
    """Sample times as datetime64[us, UTC], read by the store's own rule (storage.frames)."""
    return typed_timestamps(column)


def _conflicting(
    series: np.ndarray, ts_us: np.ndarray, values: np.ndarray, parts: np.ndarray | None = None
) -> np.ndarray:
    """True for rows whose (part, series, ts) group holds different finite values."""
    n = len(values)
    out = np.zeros(n, dtype=bool)
    candidates = np.flatnonzero(np.isfinite(values) & (ts_us != np.iinfo(np.int64).min))
    if len(candidates) < 2:
        return out
    s, t, v = series[candidates], ts_us[candidates], values[candidates]
    p = np.zeros(len(candidates), dtype=np.int64) if parts is None else parts[candidates]
    order = np.lexsort((t, s, p))
    s, t, v, p = s[order], t[order], v[order], p[order]
    start = np.empty(len(order), dtype=bool)
    start[0] = True
    start[1:] = (s[1:] != s[:-1]) | (t[1:] != t[:-1]) | (p[1:] != p[:-1])
    if start.all():
        return out
    starts = np.flatnonzero(start)
    group = np.cumsum(start) - 1
    differs = np.minimum.reduceat(v, starts) != np.maximum.reduceat(v, starts)
    out[candidates[order[differs[group]]]] = True
    return out


def _prepare(
    frame: pd.DataFrame, limits: QualityLimits, parts: np.ndarray | None = None
) -> _Prepared:
    """The batch with a RangeIndex, and the checked frame the suite runs on."""
    check_required_columns(frame.columns)
    if not (
        isinstance(frame.index, pd.RangeIndex) and frame.index.start == 0 and frame.index.step == 1
    ):
        frame = frame.reset_index(drop=True)
    metric = _metric_column(frame["metric"])
    values = _value_column(frame["value"])
    ts = _ts_column(frame["ts"])
    ts_us = ts.to_numpy(dtype="datetime64[us]").view(np.int64)  # NaT -> int64 min

    # labels: one look per distinct label object (rows built from one dict share it), not per row
    labels = _label_columns(frame["labels"].to_numpy(dtype=object))

    # series identity = metric + canonical labels
    metric_codes, _ = pd.factorize(metric, use_na_sentinel=True)
    series = (metric_codes.astype(np.int64) + 1) * (labels.identities + 1) + labels.identity

    checked = pd.DataFrame(
        {
            "metric": metric.array,
            "value": values,
            "ts": ts.array,
            LABEL_COUNT: labels.count,
            MAX_LABEL_KEY_LEN: labels.max_key_len,
            MAX_LABEL_VALUE_LEN: labels.max_value_len,
            LABEL_LIMIT_EXCEEDED: _label_limit_exceeded(labels, limits),
            CONFLICTING: _conflicting(series, ts_us, values, parts),
        }
    )
    return _Prepared(frame=frame, checked=checked, ts_us=ts_us)


def _label_limit_exceeded(labels: _LabelColumns, limits: QualityLimits) -> pd.Series:
    """ "" or the reason code of the first label limit exceeded (count, key, value length)."""
    code = np.select(
        [
            labels.count > limits.max_labels,
            labels.max_key_len > limits.max_label_name_length,
            labels.max_value_len > limits.max_label_value_length,
        ],
        [
            Reason.TOO_MANY_LABELS,
            Reason.LABEL_NAME_TOO_LONG,
            Reason.LABEL_VALUE_TOO_LONG,
        ],
        default="",
    )
    return pd.Series(code.astype(object), dtype="str")


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


def _row_reasons(
    prepared: _Prepared, check: Check, rows: np.ndarray, newest_us: int
) -> np.ndarray | str:
    """The reason code per failing row of `check` (one code for single-reason checks)."""
    if len(check.reasons) == 1:
        return check.reasons[0]
    if check.column == "ts":  # (in future, too old) by the side of the window
        future, too_old = check.reasons
        return np.where(prepared.ts_us[rows] > newest_us, future, too_old).astype(object)
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
        good_ts_us=prepared.ts_us[kept],
        good_values=prepared.checked["value"].to_numpy(dtype=np.float64)[kept],
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
    frame: pd.DataFrame, limits: QualityLimits | None = None, *, parts: np.ndarray | None = None
) -> QualityResult:
    """Run the GX suite once over the batch; rejected rows carry their first failing reason.

    `parts` (an int per row) marks a frame made of several batches (one per landed file):
    conflicting values are then looked for within each part only.

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
    return _result(prepared, failures, _us(parameters[TS_MAX_PARAM]), engine="great_expectations")


# -- the same checks in plain pandas ----------------------------------------------------------
def validate_batch_pandas(
    frame: pd.DataFrame, limits: QualityLimits | None = None, *, parts: np.ndarray | None = None
) -> QualityResult:
    """The suite's checks as vectorised pandas/numpy, with GX's semantics (checks other than
    not-null skip missing values). Same result shape as `validate_batch`."""
    limits = limits or QualityLimits()
    prepared = _prepare(frame, limits, parts)
    c = prepared.checked
    parameters = suite_parameters(limits)
    oldest = _us(parameters[TS_MIN_PARAM])
    newest = _us(parameters[TS_MAX_PARAM])

    codes, names = pd.factorize(c["metric"], use_na_sentinel=True)
    pattern = re.compile(METRIC_NAME_PATTERN)
    name_ok = np.array([pattern.search(str(name)) is not None for name in names] + [True])
    values = c["value"].to_numpy()
    value_null = np.isnan(values)
    ts_us = prepared.ts_us
    ts_null = c["ts"].isna().to_numpy()
    masks = [
        ~name_ok[codes],  # code -1 (missing) picks the appended True: nulls are not matched
        value_null,
        ~value_null & ~((values >= -FLOAT_MAX) & (values <= FLOAT_MAX)),
        ts_null,
        ~ts_null & ((ts_us > newest) | (ts_us < oldest)),
        c[LABEL_LIMIT_EXCEEDED].to_numpy(dtype=object) != "",
        c[CONFLICTING].to_numpy(dtype=bool),
    ]
    failures = []
    for check, mask in zip(CHECKS, masks, strict=True):
        rows = np.flatnonzero(mask)
        entry = {
            "expectation_type": check.expectation_type,
            "column": check.column,
            "reason": check.reason,
            "unexpected_count": len(rows),
            "success": not len(rows),
        }
        failures.append((entry, rows))
    return _result(prepared, failures, newest, engine="pandas")


def _us(moment: datetime) -> int:
    """Epoch microseconds of an aware datetime (exact, as GX compares at µs resolution)."""
    return (moment - _EPOCH) // timedelta(microseconds=1)
