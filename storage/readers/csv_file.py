"""CSV files: metric, timestamp, value, and a labels JSON column or one column per label."""

from __future__ import annotations

import codecs
import csv
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from storage.limits import (
    DEFAULT_LIMITS,
    ReadLimits,
    UnreadableFile,
    check_depth,
    too_many_labels,
)

_METRIC_COLUMNS = ("metric", "name")
_TIME_COLUMNS = ("timestamp", "ts", "time")


def csv_frame(raw: bytes, path: Path, limits: ReadLimits = DEFAULT_LIMITS) -> pd.DataFrame:
    """Columns metric, timestamp, value, then a `labels` JSON column or one column per label.

    Cells are read as text so label values stay exactly as written; an empty label cell means
    the row does not have that label.
    """
    if raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8) :]
    try:
        raw.decode("utf-8")  # pandas would replace what is not UTF-8; refuse it instead
        frame = pd.read_csv(io.BytesIO(raw), dtype=str, keep_default_na=False, na_filter=False)
    except UnicodeDecodeError as exc:
        raise UnreadableFile(f"{path.name}: cannot decode file: {exc}") from None
    except pd.errors.EmptyDataError:
        return pd.DataFrame()
    except (pd.errors.ParserError, csv.Error) as exc:
        first_line = str(exc).strip().splitlines()[0]
        raise UnreadableFile(f"{path}: not CSV: {first_line}") from None
    if len(frame.columns) - 3 > limits.max_row_labels:  # beside metric, timestamp, value
        raise too_many_labels(path.name, len(frame.columns) - 3, limits)
    frame.columns = [str(c).strip() for c in frame.columns]
    metric_col = next((c for c in _METRIC_COLUMNS if c in frame.columns), None)
    time_col = next((c for c in _TIME_COLUMNS if c in frame.columns), None)
    missing = [
        name for name, found in (("metric", metric_col), ("timestamp", time_col)) if found is None
    ] + ([] if "value" in frame.columns else ["value"])
    if missing:
        raise UnreadableFile(
            f"{path}: CSV header has no {', '.join(missing)} column(s); "
            "expected metric, timestamp, value and a labels column or label columns"
        )
    assert metric_col is not None and time_col is not None
    if "labels" in frame.columns:
        labels: pd.Series = frame["labels"]
        _check_json_cells(path.name, labels, limits)
    else:
        labels = labels_from_columns(
            frame, [c for c in frame.columns if c not in (metric_col, time_col, "value")]
        )
    return pd.DataFrame(
        {
            "metric": frame[metric_col],
            "labels": labels,
            "ts": _csv_timestamps(frame[time_col]),
            "value": frame["value"],
        }
    )


def _check_json_cells(name: str, cells: pd.Series, limits: ReadLimits) -> None:
    """A JSON labels column within the depth and labels-per-row bounds (before anything parses
    it: the json module recurses, and would raise RecursionError on deep enough text)."""
    brackets = cells.str.count(r"[\[{]").to_numpy()
    for text in cells[brackets > limits.max_nesting_depth].tolist():
        check_depth(name, text.encode("utf-8", "surrogatepass"), limits)
    colons = cells.str.count(":").to_numpy()
    for text in cells[colons > limits.max_row_labels].tolist():
        try:
            parsed = json.loads(text)
        except ValueError:
            continue  # not JSON: the store rejects the row (invalid_labels)
        if isinstance(parsed, dict) and len(parsed) > limits.max_row_labels:
            raise too_many_labels(name, len(parsed), limits)


def _csv_timestamps(column: pd.Series) -> pd.Series:
    """Epoch seconds when every filled cell is a number, else the text as written (ISO 8601)."""
    numbers = pd.to_numeric(column, errors="coerce")
    filled = column.str.strip() != ""
    if filled.any() and numbers[filled].notna().all():
        return numbers
    return column


def labels_from_columns(frame: pd.DataFrame, columns: list[str]) -> pd.Series:
    """One label dict per row from label columns; an empty or null cell means no such label.

    Rows with the same label values share one dict object, built once per distinct
    combination (a file holds few series and many rows; the checks and the series lookup
    downstream also work once per distinct object)."""
    n = len(frame)
    if not columns or n == 0:
        return pd.Series([{} for _ in range(n)], index=frame.index, dtype=object)
    group = frame[columns].groupby(columns, dropna=False, sort=False).ngroup().to_numpy()
    _, first = np.unique(group, return_index=True)
    distinct = frame[columns].iloc[first].to_dict(orient="records")
    shared = np.empty(len(distinct), dtype=object)
    for code, row in zip(group[first], distinct, strict=True):
        shared[code] = {str(k): str(v) for k, v in row.items() if not _empty_cell(v)}
    return pd.Series(shared[group], index=frame.index, dtype=object)


def _empty_cell(value: Any) -> bool:
    if value is None:
        return True
    return bool(pd.api.types.is_scalar(value) and (value == "" or pd.isna(value)))
