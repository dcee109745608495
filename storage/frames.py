"""Samples as frames and batches: the shapes a batch takes between the readers and a backend.

`to_frame` gives any caller's samples the standard columns; `timestamps_us` and `epoch_to_us`
are the one rule for reading a sample time; `PreparedBatch` is what a backend writes (built by
`storage.normalise.encode`). Label sets are read in `storage.labels` (re-exported here for the
modules that canonicalise a single set).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd

from metricmill.errors import MetricmillError
from metricmill.types import MAX_TS_US
from storage.labels import canonical_label_sets as canonical_label_sets
from storage.labels import canonical_labels as canonical_labels

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


def to_frame(samples: pd.DataFrame | Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """A DataFrame with columns metric, labels, ts, value (aliases name/timestamp/time accepted)."""
    if isinstance(samples, pd.DataFrame):
        frame = samples
    else:
        # Arrow-backed strings cannot hold what we must quarantine (lone surrogates):
        # keep Python objects; storage.normalise reads values and times column-wise.
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
