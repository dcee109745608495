"""Turn a caller's samples into a clean, vectorised batch: series codes, epoch µs, floats, rejects.

Labels are canonicalised once per distinct label object (not per row); everything else is
numpy/pandas over whole columns.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from itertools import chain
from typing import Any

import numpy as np
import pandas as pd

from metricmill.errors import MetricmillError
from metricmill.types import MAX_TS_US, MIN_TS_US, Reason

_ALIASES = {"name": "metric", "timestamp": "ts", "time": "ts"}
_SURROGATE = "[\ud800-\udfff]"


@dataclass(frozen=True)
class SeriesDef:
    """One distinct series in a batch."""

    metric: str
    labels_json: str
    key: str

    @property
    def labels(self) -> dict[str, str]:
        return json.loads(self.labels_json)


@dataclass
class PreparedBatch:
    """Accepted rows (one per series and timestamp) plus every rejected row with its reason."""

    series: list[SeriesDef]
    codes: np.ndarray  # int64 index into `series`, one per accepted row
    ts_us: np.ndarray  # int64
    values: np.ndarray  # float64
    rows_in: int
    in_batch_duplicates: int = 0
    rejected: list[tuple[dict[str, Any], str]] = field(default_factory=list)
    # A batch of several parts (one per landed file, each its own ledger batch) prepared
    # together, so per-series work is done once: the part of every accepted and rejected row,
    # and per part its rows in and identical repeats. None for a batch of one part.
    parts: np.ndarray | None = None
    rejected_parts: list[int] = field(default_factory=list)
    part_rows_in: np.ndarray | None = None
    part_duplicates: np.ndarray | None = None

    @property
    def n_parts(self) -> int:
        return 1 if self.part_rows_in is None else len(self.part_rows_in)

    def add_rejected(self, rows: list[tuple[dict[str, Any], str]], part: int = 0) -> None:
        """Rows an earlier step set aside, counted in (the part's) rows in."""
        self.rejected.extend(rows)
        self.rows_in += len(rows)
        if self.part_rows_in is not None:
            self.rejected_parts.extend([part] * len(rows))
            self.part_rows_in[part] += len(rows)

    def as_parts(self) -> PreparedBatch:
        """This batch as a batch of parts (one part, numbered 0, when it is not one already)."""
        if self.parts is not None:
            return self
        return replace(
            self,
            parts=np.zeros(len(self.codes), dtype=np.int64),
            rejected_parts=[0] * len(self.rejected),
            part_rows_in=np.array([self.rows_in], dtype=np.int64),
            part_duplicates=np.array([self.in_batch_duplicates], dtype=np.int64),
        )

    def part(self, number: int) -> PreparedBatch:
        """One part as a batch of its own (its series only)."""
        if self.parts is None:
            assert number == 0
            return self
        assert self.part_rows_in is not None and self.part_duplicates is not None
        mask = self.parts == number
        used, codes = np.unique(self.codes[mask], return_inverse=True)
        return PreparedBatch(
            series=[self.series[u] for u in used.tolist()],
            codes=codes.astype(np.int64),
            ts_us=self.ts_us[mask],
            values=self.values[mask],
            rows_in=int(self.part_rows_in[number]),
            in_batch_duplicates=int(self.part_duplicates[number]),
            rejected=[r for r, p in zip(self.rejected, self.rejected_parts, strict=True)
                      if p == number],
        )  # fmt: skip

    def select_parts(self, keep: np.ndarray) -> tuple[PreparedBatch, np.ndarray]:
        """The rows of the parts where `keep` is True (part numbers unchanged), and for each
        series of the result its index in this batch's series."""
        assert self.parts is not None and self.part_rows_in is not None
        assert self.part_duplicates is not None
        rows = keep[self.parts]
        used, codes = np.unique(self.codes[rows], return_inverse=True)
        chosen = [i for i, p in enumerate(self.rejected_parts) if keep[p]]
        batch = PreparedBatch(
            series=[self.series[u] for u in used.tolist()],
            codes=codes.astype(np.int64),
            ts_us=self.ts_us[rows],
            values=self.values[rows],
            rows_in=int(self.part_rows_in[keep].sum()),
            in_batch_duplicates=int(self.part_duplicates[keep].sum()),
            rejected=[self.rejected[i] for i in chosen],
            parts=self.parts[rows],
            rejected_parts=[self.rejected_parts[i] for i in chosen],
            part_rows_in=np.where(keep, self.part_rows_in, 0),
            part_duplicates=np.where(keep, self.part_duplicates, 0),
        )
        return batch, used

    @property
    def content_hash(self) -> str:
        """Stable over row order and label key order: the batch's idempotency key."""
        digest = hashlib.sha256()
        keys = np.array([s.key for s in self.series], dtype=object)
        order = np.argsort(keys, kind="stable") if len(keys) else np.array([], dtype=np.int64)
        rank = np.empty(len(keys), dtype=np.int64)
        rank[order] = np.arange(len(keys))
        for position in order:
            digest.update(self.series[position].key.encode())
        row_rank = rank[self.codes] if len(self.codes) else self.codes
        row_order = np.lexsort((self.ts_us, row_rank))
        digest.update(row_rank[row_order].astype("<i8").tobytes())
        digest.update(self.ts_us[row_order].astype("<i8").tobytes())
        digest.update(self.values[row_order].astype("<f8").tobytes())
        for raw, reason in sorted(
            (json.dumps(raw, sort_keys=True, default=str), reason) for raw, reason in self.rejected
        ):
            digest.update(f"{reason}\x00{raw}\x00".encode("utf-8", "surrogatepass"))
        return digest.hexdigest()


class LineRejected(Exception):
    """A text-format parser's verdict on one line: the reason code it is quarantined with."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def sample_frame(
    metrics: list[str], labels: list[dict[str, str]], ts_us: list[int], values: list[float]
) -> pd.DataFrame:
    """Parsed samples as a frame: metric, labels (dict per row), ts (datetime64[us, UTC]), value."""
    label_col = np.empty(len(labels), dtype=object)
    label_col[:] = labels
    ts = pd.Series(np.array(ts_us, dtype=np.int64).view("datetime64[us]")).dt.tz_localize("UTC")
    return pd.DataFrame(
        {
            "metric": pd.Series(metrics, dtype=object),
            "labels": label_col,
            "ts": ts,
            "value": np.array(values, dtype=np.float64),
        }
    )


def series_key(metric: str, labels_json: str) -> str:
    return hashlib.sha256(f"{metric}\x00{labels_json}".encode()).hexdigest()


def canonical_labels(labels: Any) -> tuple[str | None, str | None]:
    """(canonical JSON, None) for a usable label set, else (None, reason)."""
    if labels is None or (isinstance(labels, float) and math.isnan(labels)):
        return "{}", None
    if isinstance(labels, str):
        text = labels.strip()
        if not text:
            return "{}", None
        try:
            labels = json.loads(text)
        except ValueError:
            return None, Reason.INVALID_LABELS
    if not isinstance(labels, Mapping):
        return None, Reason.INVALID_LABELS
    clean: dict[str, str] = {}
    for key, value in labels.items():
        if not isinstance(key, str) or not key:
            return None, Reason.INVALID_LABELS
        if isinstance(value, bool):
            text_value = "true" if value else "false"
        elif isinstance(value, str | int | float):
            text_value = str(value)
        else:
            return None, Reason.INVALID_LABELS
        for part in (key, text_value):
            if "\x00" in part:
                return None, Reason.NUL_CHARACTER
            try:
                part.encode("utf-8")
            except UnicodeEncodeError:
                return None, Reason.INVALID_UNICODE
        clean[key] = text_value
    return json.dumps(clean, sort_keys=True, ensure_ascii=False, separators=(",", ":")), None


_CANONICAL_JSON = json.JSONEncoder(sort_keys=True, ensure_ascii=False, separators=(",", ":"))
# canonical JSON of label sets of text (their items as given -> JSON), shared by batches: the
# same series come back batch after batch. Emptied when full.
_CANONICAL_CACHE: dict[tuple[tuple[str, str], ...], str] = {}
_CANONICAL_CACHE_SIZE = 200_000


def canonical_label_sets(objs: list[Any]) -> tuple[np.ndarray, np.ndarray]:
    """`canonical_labels` of each object: (canonical JSON or None, reason or None) arrays.

    Dicts of text keys and values (what readers give) that are all usable are done together:
    one check of the text for NUL and lone surrogates, one encoder, remembered across calls.
    Anything else goes through `canonical_labels` one object at a time."""
    m = len(objs)
    canon = np.empty(m, dtype=object)
    reasons = np.full(m, None, dtype=object)
    if m and set(map(type, objs)) == {dict}:
        keys = list(chain.from_iterable(objs))
        values = list(chain.from_iterable(map(dict.values, objs)))
        if set(map(type, keys)) <= {str} and set(map(type, values)) <= {str} and all(keys):
            text = "\x01".join(keys) + "\x01" + "\x01".join(values)
            usable = "\x00" not in text
            if usable:
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError:
                    usable = False
            if usable:
                cache = _CANONICAL_CACHE
                if len(cache) + m > _CANONICAL_CACHE_SIZE:
                    cache.clear()
                encode = _CANONICAL_JSON.encode
                for pos, obj in enumerate(objs):
                    items = tuple(obj.items())
                    found = cache.get(items)
                    if found is None:
                        found = cache[items] = encode(obj)
                    canon[pos] = found
                return canon, reasons
    for pos, obj in enumerate(objs):
        canon[pos], reasons[pos] = canonical_labels(obj)
    return canon, reasons


def to_frame(samples: pd.DataFrame | Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """A DataFrame with columns metric, labels, ts, value (aliases name/timestamp/time accepted)."""
    if isinstance(samples, pd.DataFrame):
        frame = samples
    else:
        # Arrow-backed strings cannot hold what we must quarantine (lone surrogates):
        # keep Python objects; prepare() converts values and timestamps column-wise.
        frame = pd.DataFrame(list(samples), dtype=object)
    for alias, column in _ALIASES.items():
        if alias in frame.columns:
            # Rows may spell a column either way: fill the canonical one from the alias.
            merged = (
                frame[alias] if column not in frame.columns else frame[column].fillna(frame[alias])
            )
            frame = frame.drop(columns=[alias]).assign(**{column: merged})
    if len(frame) == 0:
        return pd.DataFrame({"metric": [], "labels": [], "ts": [], "value": []})
    missing = [c for c in ("metric", "ts", "value") if c not in frame.columns]
    if missing:
        raise MetricmillError(
            f"samples have no {', '.join(missing)} column(s); "
            "expected metric, ts (or timestamp), value and optional labels"
        )
    if "labels" not in frame.columns:
        frame = frame.assign(labels=None)
    return frame


def epoch_to_us(numbers: np.ndarray) -> np.ndarray:
    """Epoch numbers to µs, the unit guessed per value from its size (as most collectors do).

    |x| < 1e11 is seconds, < 1e14 milliseconds, < 1e17 microseconds, else nanoseconds; so a
    file mixing precisions still lands each sample at its instant. Non-finite values give
    MAX_TS_US + 1 (out of range).
    """
    x = np.asarray(numbers, dtype="float64")
    magnitude = np.abs(x)
    scale = np.select(
        [magnitude < 1e11, magnitude < 1e14, magnitude < 1e17], [1e6, 1e3, 1.0], default=1e-3
    )
    with np.errstate(invalid="ignore", over="ignore"):
        scaled = np.round(x * scale)
    unusable = ~np.isfinite(scaled) | (np.abs(scaled) >= 2**62)
    return np.where(unusable, np.float64(MAX_TS_US + 1), scaled).astype(np.int64)


def with_parsed_timestamps(frame: pd.DataFrame) -> pd.DataFrame:
    """The frame with a text `ts` column as datetime64[us, UTC] when every value is an ISO 8601
    instant with a zone (Arrow parses it in C). Otherwise the frame as it came: the row-wise
    rules of timestamps_us then decide, and a rejected row keeps its text.

    Files are concatenated before one quality check: a text column meeting a datetime column
    would become an object column of boxed Timestamps, by far the slowest part of a run."""
    column = frame["ts"] if "ts" in frame.columns else None
    if (
        column is None
        or not len(column)
        or not (column.dtype == object or pd.api.types.is_string_dtype(column.dtype))
    ):
        return frame
    import pyarrow as pa
    import pyarrow.compute as pc

    try:
        text = pa.array(column.to_numpy(dtype=object), type=pa.string())
        if text.null_count:
            return frame
        parsed = pc.cast(text, pa.timestamp("us", tz="UTC"))
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        return frame
    return frame.assign(ts=pd.Series(parsed.to_pandas(), index=frame.index))


def typed_timestamps(column: pd.Series) -> pd.Series:
    """Sample times as datetime64[us, UTC] by `timestamps_us`'s rule (unparseable: NaT)."""
    us, unparseable = timestamps_us(column)
    parsed = pd.Series(us.astype("datetime64[us]"), index=column.index).dt.tz_localize("UTC")
    return parsed.mask(unparseable)


def timestamps_us(column: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """(epoch µs, unparseable mask): datetimes (naive = UTC), ISO strings or epoch numbers."""
    if pd.api.types.is_bool_dtype(column):
        return np.zeros(len(column), dtype=np.int64), np.ones(len(column), dtype=bool)
    if pd.api.types.is_numeric_dtype(column):
        numbers = column.to_numpy(dtype="float64", na_value=np.nan)
        return epoch_to_us(numbers), np.isnan(numbers)
    if isinstance(column.dtype, pd.DatetimeTZDtype):
        parsed = column.dt.tz_convert("UTC").dt.tz_localize(None)
        values = parsed.to_numpy(dtype="datetime64[us]")
        return values.view("int64").copy(), np.isnat(values)
    if pd.api.types.is_datetime64_dtype(column):
        values = column.to_numpy(dtype="datetime64[us]")
        return values.view("int64").copy(), np.isnat(values)
    # Mixed column: numbers are epoch values, everything else is parsed as ISO 8601. The type
    # test runs once per distinct type, not per row.
    raw = column.to_numpy(dtype=object)
    type_codes, types = pd.factorize(np.fromiter(map(type, raw), dtype=object, count=len(raw)))
    numeric_type = np.array(
        [
            issubclass(t, int | float | np.integer | np.floating) and not issubclass(t, bool)
            for t in types
        ],
        dtype=bool,
    )
    is_number = numeric_type[type_codes] if len(raw) else np.zeros(0, dtype=bool)
    us = np.zeros(len(column), dtype=np.int64)
    bad = np.zeros(len(column), dtype=bool)
    if is_number.any():
        numbers = column[is_number].to_numpy(dtype="float64")
        us[is_number] = epoch_to_us(numbers)
        bad[is_number] = np.isnan(numbers)
    if (~is_number).any():
        text = column[~is_number]
        parsed = pd.to_datetime(text, utc=True, errors="coerce", format="ISO8601")
        values = parsed.dt.tz_localize(None).to_numpy(dtype="datetime64[us]")
        us[~is_number] = values.view("int64")
        bad[~is_number] = np.isnat(values)
    return us, bad


def _raw_row(frame: pd.DataFrame, index: int) -> dict[str, Any]:
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


def prepare(
    samples: pd.DataFrame | Iterable[Mapping[str, Any]],
    *,
    parts: np.ndarray | None = None,
    n_parts: int = 1,
) -> PreparedBatch:
    """Validate and encode a batch; bad rows are set aside with a reason, never dropped.

    With `parts` (a part number in [0, n_parts) per row), the rows are several batches prepared
    together: a repeat or a conflict is one within a part, and the result keeps each row's part.
    """
    frame = to_frame(samples).reset_index(drop=True)
    n = len(frame)
    part_of = np.zeros(n, dtype=np.int64) if parts is None else np.asarray(parts, dtype=np.int64)
    if len(part_of) != n:
        raise ValueError(f"{len(part_of)} part numbers for {n} rows")
    values, reason = _value_reasons(frame["value"])

    def reject(mask: np.ndarray, code: str | np.ndarray) -> None:
        free = mask & pd.isna(reason)
        reason[free] = code if isinstance(code, str) else code[free]

    # metric names: validated once per distinct name
    metric_codes_all, metric_names = pd.factorize(frame["metric"].to_numpy(dtype=object))
    name_reason = np.array([_metric_reason(m) for m in metric_names] + [Reason.MISSING_METRIC])
    per_row = name_reason[metric_codes_all]  # code -1 (missing) picks the appended reason
    reject(per_row != None, per_row)  # noqa: E711 - elementwise comparison on an object array

    # timestamps
    ts_us, unparseable = timestamps_us(frame["ts"])
    reject(unparseable, Reason.INVALID_TIMESTAMP)
    reject((ts_us < MIN_TS_US) | (ts_us >= MAX_TS_US), Reason.TIMESTAMP_OUT_OF_RANGE)

    # labels: canonicalised once per distinct object, not per row
    label_objs = frame["labels"].to_numpy(dtype=object)
    object_ids = np.fromiter(map(id, label_objs), dtype=np.int64, count=n)
    _, first_index, obj_codes = np.unique(object_ids, return_index=True, return_inverse=True)
    canon_per_obj, reason_per_obj = canonical_label_sets(label_objs[first_index].tolist())
    label_reason = reason_per_obj[obj_codes]
    reject(label_reason != None, label_reason)  # noqa: E711

    good_idx = np.flatnonzero(pd.isna(reason))
    # label-set codes in order of first appearance among the good rows, found per object
    good_objs = obj_codes[good_idx]
    seen_objs, first_seen = np.unique(good_objs, return_index=True)
    by_appearance = seen_objs[np.argsort(first_seen, kind="stable")]
    set_codes, label_uniques = pd.factorize(canon_per_obj[by_appearance])
    code_of_obj = np.zeros(len(canon_per_obj), dtype=np.int64)
    code_of_obj[by_appearance] = set_codes
    label_codes = code_of_obj[good_objs]
    width = max(len(label_uniques), 1)
    pair = metric_codes_all[good_idx].astype(np.int64) * width + label_codes
    pair_uniques, codes = np.unique(pair, return_inverse=True)
    series = []
    for value in pair_uniques:
        metric, labels_json = str(metric_names[value // width]), str(label_uniques[value % width])
        series.append(SeriesDef(metric, labels_json, series_key(metric, labels_json)))
    codes = codes.astype(np.int64)
    g_ts = ts_us[good_idx]
    g_val = values[good_idx]
    g_part = part_of[good_idx]

    # one row per (part, series, ts): identical repeats collapse, conflicting values are rejected
    order = np.lexsort((g_ts, codes, g_part))
    s_codes, s_ts, s_val, s_part = codes[order], g_ts[order], g_val[order], g_part[order]
    same_key = (s_codes[1:] == s_codes[:-1]) & (s_ts[1:] == s_ts[:-1]) & (s_part[1:] == s_part[:-1])
    group_start = np.concatenate(([True], ~same_key))[: len(s_codes)]
    group_id = np.cumsum(group_start) - 1
    n_groups = int(group_id[-1]) + 1 if len(group_id) else 0
    group_min = np.full(n_groups, np.inf)
    group_max = np.full(n_groups, -np.inf)
    if same_key.any():
        np.minimum.at(group_min, group_id, s_val)
        np.maximum.at(group_max, group_id, s_val)
        conflicting = (group_min != group_max)[group_id]
    else:
        conflicting = np.zeros(len(s_codes), dtype=bool)
    if conflicting.any():
        reason[good_idx[order[conflicting]]] = Reason.CONFLICTING_VALUES
    keep = group_start & ~conflicting
    repeated = ~group_start & ~conflicting
    duplicates = int(repeated.sum())

    # series whose every row was rejected as conflicting are not created
    used, kept_codes = np.unique(s_codes[keep], return_inverse=True)
    rejected_idx = np.flatnonzero(~pd.isna(reason))
    rejected = [(_raw_row(frame, int(i)), str(reason[i])) for i in rejected_idx]
    return PreparedBatch(
        series=[series[i] for i in used],
        codes=kept_codes.astype(np.int64),
        ts_us=s_ts[keep],
        values=s_val[keep],
        rows_in=n,
        in_batch_duplicates=duplicates,
        rejected=rejected,
        **(
            {}
            if parts is None
            else {
                "parts": s_part[keep],
                "rejected_parts": part_of[rejected_idx].tolist(),
                "part_rows_in": np.bincount(part_of, minlength=n_parts).astype(np.int64),
                "part_duplicates": np.bincount(s_part[repeated], minlength=n_parts).astype(
                    np.int64
                ),
            }
        ),
    )
