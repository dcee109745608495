"""Normalise a batch once, then encode what the rules kept.

`normalise` reads every column of a batch into the type the tables store, exactly once: metric
names, values (float64), sample times (epoch µs), label sets (canonical JSON, per distinct
object). It states, per row, what the tables cannot hold (`Normalised.unreadable`: a reason
code) and the facts the quality rules read: label sizes and whether a row's series already has
another value at its time in the batch (`Normalised.conflicting`). It issues no verdict.

`encode` turns the rows a verdict kept into the `PreparedBatch` a backend writes: series
definitions and codes, identical repeats collapsed. It checks nothing.

Verdicts come from one of two places, never both: the ingest-batch rules
(`expectations.ingest_batch`, run by the ingest tasks), or, for callers that write samples
directly (`Store.write_samples`), `storage_verdicts`: only what the tables cannot hold.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from metricmill.types import MAX_TS_US, MIN_TS_US, Reason
from storage.frames import PreparedBatch, SeriesDef, series_key, timestamps_us, to_frame
from storage.labels import LabelSets, read_label_sets

# the epoch µs of a time that could not be read (NaT's integer form)
UNREAD_TS = np.iinfo(np.int64).min


@dataclass
class Normalised:
    """A batch read once: typed columns, facts for the rules, and what cannot be stored."""

    frame: pd.DataFrame  # the rows as received (RangeIndex), for the quarantine
    metric_codes: np.ndarray  # int64 per row into `metric_names` (-1: missing)
    metric_names: np.ndarray  # the distinct metric values as received
    values: np.ndarray  # float64 (NaN: not a number)
    ts_us: np.ndarray  # int64 epoch µs (UNREAD_TS: not a time)
    labels: LabelSets
    unreadable: np.ndarray  # object per row: why the tables cannot hold it, or None
    series: np.ndarray  # int64 per row: series identity among readable rows (-1 otherwise)
    conflicting: np.ndarray  # bool per row: its series has another value at its time
    parts: np.ndarray  # int64 per row: its batch (landed file) in a batch of several
    n_parts: int
    several: bool  # made of parts (each its own ledger batch)

    def __len__(self) -> int:
        return len(self.frame)

    def metric_text(self) -> pd.Series:
        """Metric names as text (other objects as their text, missing stays missing)."""
        names = [u if isinstance(u, str) else str(u) for u in self.metric_names]
        return text_column(names, self.metric_codes)

    def typed_ts(self) -> pd.Series:
        """Sample times as datetime64[us, UTC] (NaT where unreadable)."""
        return pd.Series(self.ts_us.view("datetime64[us]")).dt.tz_localize("UTC")


def text_column(names: Sequence[str | None], codes: np.ndarray) -> pd.Series:
    """`names[code]` per row as a text Series (dtype "str"; a code of -1 is missing), taken
    in Arrow from the few names: a Series of the rows' Python strings is converted string by
    string (about 50 ms for a group of 170,000 rows, twice per group in the check)."""
    table = pa.array([*names, None], pa.large_string())
    picks = np.where(codes < 0, len(names), codes)
    return pd.Series(pd.array(table.take(pa.array(picks)), dtype="str"))


def normalise(
    samples: pd.DataFrame | Iterable[Mapping[str, Any]],
    *,
    parts: np.ndarray | None = None,
    n_parts: int = 1,
) -> Normalised:
    """Read a batch into stored types once (see the module docstring).

    With `parts` (a part number in [0, n_parts) per row), the rows are several batches read
    together: a conflict is one within a part."""
    frame = to_frame(samples)
    if not (
        isinstance(frame.index, pd.RangeIndex) and frame.index.start == 0 and frame.index.step == 1
    ):
        frame = frame.reset_index(drop=True)
    n = len(frame)
    part_of = np.zeros(n, dtype=np.int64) if parts is None else np.asarray(parts, dtype=np.int64)
    if len(part_of) != n:
        raise ValueError(f"{len(part_of)} part numbers for {n} rows")
    values, reason = _value_reasons(frame["value"])

    def unreadable(mask: np.ndarray, code: str | np.ndarray) -> None:
        free = mask & pd.isna(reason)
        reason[free] = code if isinstance(code, str) else code[free]

    metric_codes, metric_names, metric_reasons = _metrics(frame["metric"])
    unreadable(metric_reasons != None, metric_reasons)  # noqa: E711 - elementwise on objects
    us, unparseable = timestamps_us(frame["ts"])
    unreadable(unparseable, Reason.INVALID_TIMESTAMP)
    unreadable((us < MIN_TS_US) | (us >= MAX_TS_US), Reason.TIMESTAMP_OUT_OF_RANGE)
    labels = read_label_sets(frame["labels"].to_numpy(dtype=object))
    label_reasons = labels.reasons[labels.of_row]
    unreadable(label_reasons != None, label_reasons)  # noqa: E711

    series = _series_identity(metric_codes, labels, pd.isna(reason))
    ts_us = np.where(unparseable, UNREAD_TS, us)
    return Normalised(
        frame=frame,
        metric_codes=metric_codes,
        metric_names=metric_names,
        values=values,
        ts_us=ts_us,
        labels=labels,
        unreadable=reason,
        series=series,
        conflicting=conflicting_rows(series, ts_us, values, part_of),
        parts=part_of,
        n_parts=n_parts,
        several=parts is not None,
    )


def _metrics(column: pd.Series) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(code per row, distinct names, reason per row or None): each name looked at once."""
    raw = column.to_numpy(dtype=object)
    odd = None
    try:
        codes, names = pd.factorize(raw)
    except TypeError:  # unhashable objects (lists, dicts): never a name; grouped by their text
        odd = np.fromiter((not isinstance(v, Hashable) for v in raw), dtype=bool, count=len(raw))
        raw = raw.copy()
        raw[odd] = [str(v) for v in raw[odd]]
        codes, names = pd.factorize(raw)
    name_reason = np.array([_metric_reason(m) for m in names] + [Reason.MISSING_METRIC])
    per_row = name_reason[codes].astype(object)  # code -1 (missing) picks the appended reason
    if odd is not None:
        per_row[odd] = Reason.MISSING_METRIC
    return np.asarray(codes, dtype=np.int64), np.asarray(names, dtype=object), per_row


def _metric_reason(metric: Any) -> str | None:
    if not isinstance(metric, str) or not metric:
        return Reason.MISSING_METRIC
    if "\x00" in metric:
        return Reason.NUL_CHARACTER
    try:
        metric.encode("utf-8")
    except UnicodeEncodeError:
        return Reason.INVALID_UNICODE
    return None


def _value_reasons(raw_values: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """(float64 values, reason per row or None)."""
    n = len(raw_values)
    reasons = np.full(n, None, dtype=object)
    if pd.api.types.is_numeric_dtype(raw_values) and not pd.api.types.is_bool_dtype(raw_values):
        values = raw_values.to_numpy(dtype="float64", na_value=np.nan)
        reasons[~np.isfinite(values)] = Reason.NON_FINITE_VALUE
        return values, reasons
    # Mixed or text column: numbers and numeric strings ("1.5", "NaN", "inf") are values.
    values = pd.to_numeric(raw_values, errors="coerce").to_numpy(dtype="float64", na_value=np.nan)
    non_finite = ~np.isfinite(values)
    if non_finite.any():
        # Only the non-finite rows are inspected: spelled NaN/inf, or not a number at all?
        spelled = raw_values[non_finite].map(
            lambda v: (
                (isinstance(v, float | np.floating) and not isinstance(v, bool))
                or (
                    isinstance(v, str)
                    and v.strip().lower().lstrip("+-") in {"nan", "inf", "infinity"}
                )
            )
        )
        spelled_non_finite = np.zeros(n, dtype=bool)
        spelled_non_finite[non_finite] = spelled.to_numpy(dtype=bool)
        reasons[non_finite & spelled_non_finite] = Reason.NON_FINITE_VALUE
        reasons[non_finite & ~spelled_non_finite] = Reason.INVALID_VALUE
    return values, reasons


def _series_identity(
    metric_codes: np.ndarray, labels: LabelSets, readable: np.ndarray
) -> np.ndarray:
    """An int64 per readable row, equal for rows of one series (metric + canonical labels);
    -1 for the others."""
    label_codes = np.zeros(0, dtype=np.int64)
    if len(labels.of_row):
        label_codes = np.asarray(pd.factorize(labels.canonical)[0], dtype=np.int64)[labels.of_row]
    width = int(label_codes.max()) + 2 if len(label_codes) else 1
    series = metric_codes.astype(np.int64) * width + label_codes
    return np.where(readable, series, -1)


def conflicting_rows(
    series: np.ndarray, ts_us: np.ndarray, values: np.ndarray, parts: np.ndarray
) -> np.ndarray:
    """True for readable rows whose (part, series, time) holds different values (identical
    repeats are not conflicts): the one definition of a conflict in a batch."""
    out = np.zeros(len(series), dtype=bool)
    candidates = np.flatnonzero(series >= 0)
    if len(candidates) < 2:
        return out
    s, t, v, p = series[candidates], ts_us[candidates], values[candidates], parts[candidates]
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


def storage_verdicts(batch: Normalised) -> np.ndarray:
    """For direct writes: per row the reason the tables cannot take it (unreadable, else a
    conflicting value), or None."""
    reasons = batch.unreadable.copy()
    reasons[batch.conflicting & pd.isna(reasons)] = Reason.CONFLICTING_VALUES
    return reasons


def encode(
    batch: Normalised,
    reasons: np.ndarray,
    rejected: list[tuple[dict[str, Any], str]],
) -> PreparedBatch:
    """The rows whose reason is None as a `PreparedBatch` (series defined, identical repeats
    collapsed), with `rejected` (the other rows as the quarantine shows them, in row order).

    Checks nothing: every row kept must be readable and conflict-free (a verdict said so)."""
    n = len(batch)
    good_idx = np.flatnonzero(pd.isna(reasons))
    labels = batch.labels
    # label-set codes in order of first appearance among the good rows, found per object
    good_objs = labels.of_row[good_idx]
    seen_objs, first_seen = np.unique(good_objs, return_index=True)
    by_appearance = seen_objs[np.argsort(first_seen, kind="stable")]
    set_codes, label_uniques = pd.factorize(labels.canonical[by_appearance])
    code_of_obj = np.zeros(len(labels.canonical), dtype=np.int64)
    code_of_obj[by_appearance] = set_codes
    width = max(len(label_uniques), 1)
    pair = batch.metric_codes[good_idx] * width + code_of_obj[good_objs]
    pair_uniques, codes = np.unique(pair, return_inverse=True)
    series = []
    for value in pair_uniques.tolist():
        metric = str(batch.metric_names[value // width])
        labels_json = str(label_uniques[value % width])
        series.append(SeriesDef(metric, labels_json, series_key(metric, labels_json)))
    codes = codes.astype(np.int64).reshape(-1)
    g_ts, g_val = batch.ts_us[good_idx], batch.values[good_idx]
    g_part = batch.parts[good_idx]
    # one row per (part, series, ts): identical repeats collapse
    order = np.lexsort((g_ts, codes, g_part))
    s_codes, s_ts, s_val, s_part = codes[order], g_ts[order], g_val[order], g_part[order]
    same_key = (s_codes[1:] == s_codes[:-1]) & (s_ts[1:] == s_ts[:-1]) & (s_part[1:] == s_part[:-1])
    keep = np.concatenate(([True], ~same_key))[: len(s_codes)]
    # series none of whose rows were kept are not created
    used, kept_codes = np.unique(s_codes[keep], return_inverse=True)
    prepared = PreparedBatch(
        series=[series[i] for i in used.tolist()],
        codes=kept_codes.astype(np.int64).reshape(-1),
        ts_us=s_ts[keep],
        values=s_val[keep],
        rows_in=n,
        in_batch_duplicates=int((~keep).sum()),
        rejected=rejected,
    )
    if not batch.several:
        return prepared
    rejected_idx = np.flatnonzero(pd.notna(reasons))
    prepared.parts = s_part[keep]
    prepared.rejected_parts = batch.parts[rejected_idx].tolist()
    prepared.part_rows_in = np.bincount(batch.parts, minlength=batch.n_parts).astype(np.int64)
    prepared.part_duplicates = np.bincount(s_part[~keep], minlength=batch.n_parts).astype(np.int64)
    return prepared


def prepare(
    samples: pd.DataFrame | Iterable[Mapping[str, Any]],
    *,
    parts: np.ndarray | None = None,
    n_parts: int = 1,
) -> PreparedBatch:
    """Samples written directly (not through the ingest rules): normalised, the rows the
    tables cannot hold set aside with their reason (`storage_verdicts`), the rest encoded."""
    batch = normalise(samples, parts=parts, n_parts=n_parts)
    reasons = storage_verdicts(batch)
    rows = np.flatnonzero(pd.notna(reasons))
    rejected = [(raw_row(batch.frame, int(i)), str(reasons[i])) for i in rows.tolist()]
    return encode(batch, reasons, rejected)


def raw_row(frame: pd.DataFrame, index: int) -> dict[str, Any]:
    """The row as received, JSON-safe, for the quarantine table."""
    row: dict[str, Any] = {}
    for column, value in frame.iloc[index].items():
        if isinstance(value, float) and math.isnan(value) and column != "value":
            row[str(column)] = None
        elif isinstance(value, float) and not math.isfinite(value):
            row[str(column)] = (
                "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
            )
        elif isinstance(value, pd.Timestamp):
            row[str(column)] = value.isoformat()
        elif value is None or isinstance(value, str | int | float | bool | dict | list):
            row[str(column)] = value
        else:
            row[str(column)] = str(value)
    return row
