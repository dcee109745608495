"""Parquet files: the CSV columns, the footer checked against the bounds before any data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from metricmill.types import Reason
from storage.limits import (
    DEFAULT_LIMITS,
    FileReason,
    ReadLimits,
    UnreadableFile,
    too_many_labels,
)
from storage.readers.csv_file import labels_from_columns


def read_parquet_samples(path: Path, limits: ReadLimits = DEFAULT_LIMITS) -> pd.DataFrame:
    """The CSV columns, as Parquet: metric (or name), ts (or timestamp, time), value, and a
    labels column or one column per label.

    The footer is checked before any data is read: the uncompressed size against
    max_file_bytes, the nesting of the schema against max_nesting_depth, the number of label
    columns against max_row_labels. A value that is a list or a map is `invalid_value`."""
    name = path.name
    try:
        meta = pq.ParquetFile(path).metadata
        schema = meta.schema.to_arrow_schema()
    except Exception as exc:  # pyarrow raises several types for a file that is not Parquet
        raise UnreadableFile(f"{name}: not a Parquet file: {exc}") from None
    size = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
    if size > limits.max_file_bytes:
        raise UnreadableFile(
            f"{name}: {size} bytes uncompressed, more than {limits.max_file_bytes} "
            "(METRICMILL_MAX_FILE_BYTES)",
            reason=FileReason.TOO_LARGE,
        )
    if _type_depth(schema) > limits.max_nesting_depth:
        raise UnreadableFile(
            f"{name}: columns nested deeper than {limits.max_nesting_depth} levels "
            "(METRICMILL_MAX_NESTING_DEPTH)",
            reason=FileReason.TOO_DEEP,
        )
    if len(schema) - 3 > limits.max_row_labels:  # beside metric, ts, value
        raise too_many_labels(name, len(schema) - 3, limits)
    try:
        frame = pd.read_parquet(path)
    except Exception as exc:
        raise UnreadableFile(f"{name}: not a Parquet file: {exc}") from None
    for column, aliases in (("metric", ("name",)), ("ts", ("timestamp", "time"))):
        alias = next((a for a in aliases if a in frame.columns), None)
        if column not in frame.columns and alias is not None:
            frame = frame.rename(columns={alias: column})
    rejected: list[tuple[dict[str, Any], str]] = []
    if "value" in frame.columns and frame["value"].dtype == object:
        nested = frame["value"].map(lambda v: isinstance(v, list | tuple | dict | np.ndarray))
        if nested.any():
            rejected = [
                ({str(k): _plain(v) for k, v in record.items()}, Reason.INVALID_VALUE)
                for record in frame[nested.to_numpy()].to_dict(orient="records")
            ]
            frame = frame[~nested.to_numpy()].reset_index(drop=True)
    if "labels" in frame.columns or not {"metric", "ts", "value"} <= set(frame.columns):
        frame.attrs["rejected"] = rejected
        return frame  # a missing column is the quality check's to report
    label_columns = [c for c in frame.columns if c not in ("metric", "ts", "value")]
    result = frame[["metric", "ts", "value"]].assign(
        labels=labels_from_columns(frame, label_columns)
    )
    result.attrs["rejected"] = rejected
    return result


def _plain(value: Any) -> Any:
    """A Parquet cell as JSON-friendly Python (arrays as lists)."""
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _type_depth(schema: pa.Schema) -> int:
    """How deep the schema nests lists, structs and maps (without recursion)."""
    deepest = 0
    stack: list[tuple[pa.DataType, int]] = [(f.type, 1) for f in schema]
    while stack:
        kind, depth = stack.pop()
        deepest = max(deepest, depth)
        stack.extend((kind.field(i).type, depth + 1) for i in range(kind.num_fields))
    return deepest
