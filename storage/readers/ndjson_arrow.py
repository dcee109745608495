"""The common NDJSON file parsed by Arrow (in C++, without the GIL)."""

from __future__ import annotations

import codecs
import io
from typing import Any

import numpy as np
import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pa_json

from storage.limits import DEFAULT_LIMITS, ReadLimits
from storage.readers.ndjson import NDJSON_COLUMNS, canonical_keys

_STRING_TYPES = (pa.string(), pa.large_string())
_KNOWN = object()  # with the label names: the memo key of the spellings known to a group


def arrow_ndjson_frame(
    data: bytes, labels_memo: dict[Any, Any] | None, limits: ReadLimits = DEFAULT_LIMITS
) -> pd.DataFrame | None:
    """The common NDJSON file parsed by Arrow, or None when the file is not that plain case
    and `ndjson_frame` must read it line by line.

    The plain case: every line an object with the same four keys (metric, labels, ts and
    value, or their aliases), a text metric, a numeric value, ts all text or all numbers,
    labels objects of text values; no null, no \\u escape (lone surrogates), no NaN literal;
    no array and no object beyond the record and its labels (deeper JSON is left to the line
    reader, which bounds its depth).
    """
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8) :]
    layout = _plain_layout(data)
    if layout is None:
        return None
    source, ts_type = layout
    table = _read_table(data, source, ts_type)
    if table is None:
        return None
    labels_column = table.column(source["labels"])
    if (
        pa.types.is_struct(labels_column.type)
        and labels_column.type.num_fields > limits.max_row_labels
    ):
        return None  # the line reader says which row breaks the bound
    labels = _arrow_labels(labels_column, labels_memo)
    if labels is None:
        return None
    frame = _table_frame(table, source, ts_type, labels)
    frame.attrs["rejected"] = []
    return frame


def _plain_layout(data: bytes) -> tuple[dict[str, str], pa.DataType] | None:
    """From a quick look at the bytes and the first line: the key of each standard column
    and the type of the times, or None when the file cannot be the plain case."""
    newline = data.find(b"\n")
    head = data[: newline if newline >= 0 else len(data)].strip()
    escaped = b"\\" in data and b"\\u" in data  # a byte search first: most files have no \\
    if not head.startswith(b"{") or b"null" in data or escaped or b"[" in data:
        return None
    if data.count(b"{") > 2 * (data.count(b"\n") + 1):
        return None  # an object nested in a record: not the plain case
    try:
        first = orjson.loads(head)
    except orjson.JSONDecodeError:
        return None
    if type(first) is not dict or len(first) != 4:
        return None
    source = canonical_keys({key: key for key in first})
    if source.keys() != set(NDJSON_COLUMNS) or type(first[source["labels"]]) is not dict:
        return None
    ts_value = first[source["ts"]]
    if type(ts_value) is str:
        return source, pa.string()
    if type(ts_value) is int:
        return source, pa.int64()
    if type(ts_value) is float:
        return source, pa.float64()
    return None


def _read_table(data: bytes, source: dict[str, str], ts_type: pa.DataType) -> pa.Table | None:
    """The whole file as one Arrow table of the expected columns without a null, or None."""
    schema = pa.schema(
        [
            (source["metric"], pa.string()),
            (source["ts"], ts_type),
            (source["value"], pa.float64()),
        ]
    )
    try:
        table = pa_json.read_json(
            io.BytesIO(data),
            read_options=pa_json.ReadOptions(block_size=max(1 << 20, len(data) + 1)),
            parse_options=pa_json.ParseOptions(
                explicit_schema=schema, unexpected_field_behavior="infer"
            ),
        )
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None
    if set(table.column_names) != set(source.values()) or any(
        table.column(name).null_count for name in table.column_names
    ):
        return None
    return table


def _table_frame(
    table: pa.Table, source: dict[str, str], ts_type: pa.DataType, labels: np.ndarray
) -> pd.DataFrame:
    """The table as the frame `ndjson_frame` would give (text as Python objects)."""
    ts = table.column(source["ts"])
    frame = pd.DataFrame(
        {
            # text as Python objects, like ndjson_frame's columns (not Arrow-backed strings)
            "metric": pd.Series(_shared_text(table.column(source["metric"])), dtype=object),
            "labels": labels,
            "ts": pd.Series(_shared_text(ts), dtype=object)
            if ts_type == pa.string()
            else ts.to_numpy(),
            "value": table.column(source["value"]).to_numpy(zero_copy_only=False),
        }
    )
    return frame[list(source)]  # the columns in the order ndjson_frame gives them


def _shared_text(column: pa.ChunkedArray) -> np.ndarray:
    """A text column (no null) as Python strings, one object per distinct text: a file's few
    metric names and scrape times are made (and later hashed) once, not once per row."""
    encoded = pc.dictionary_encode(column.combine_chunks())
    distinct = np.asarray(encoded.dictionary.to_pylist(), dtype=object)
    return distinct[encoded.indices.to_numpy(zero_copy_only=False)]


def _arrow_labels(column: pa.ChunkedArray, memo: dict[Any, Any] | None) -> np.ndarray | None:
    """One shared dict per distinct label set (an absent key is no label), or None unless the
    column is objects of text values.

    Each row's values are first spelled as one string by Arrow (by label name, joined by NUL;
    absent: \\x01; neither can be in JSON text unescaped), and the spellings are looked up in
    Arrow among those `memo` (shared by the files read together) already knows for these
    label names: Python sees only the sets new to the group, and equal sets share one dict
    across its files whose lines have the same keys.
    """
    if not pa.types.is_struct(column.type):
        return None
    column = column.combine_chunks()
    fields = sorted(
        (column.type.field(i) for i in range(column.type.num_fields)), key=lambda f: f.name
    )
    if any(f.type not in _STRING_TYPES for f in fields):
        return None
    names = tuple(f.name for f in fields)
    if fields:
        spelled = pc.binary_join_element_wise(
            *[column.field(name).cast(pa.string()) for name in names],
            "\x00",
            null_handling="replace",
            null_replacement="\x01",
        )
    else:
        spelled = pa.nulls(len(column), pa.string()).fill_null("")
    encoded = pc.dictionary_encode(spelled)
    spellings = encoded.dictionary
    shared: dict[Any, Any] = {} if memo is None else memo
    known_spellings, known_dicts = shared.get(
        (_KNOWN, names), (pa.array([], pa.string()), np.empty(0, dtype=object))
    )
    at = pc.index_in(spellings, value_set=known_spellings).fill_null(-1)
    positions = at.to_numpy(zero_copy_only=False).astype(np.int64)
    new = np.flatnonzero(positions < 0)
    if len(new):
        fresh = pc.take(spellings, pa.array(new))
        made = np.empty(len(new), dtype=object)
        for index, spelling in enumerate(fresh.to_pylist()):  # a loop per new label set
            values = spelling.split("\x00") if names else []
            made[index] = {
                name: value for name, value in zip(names, values, strict=True) if value != "\x01"
            }
        positions[new] = len(known_dicts) + np.arange(len(new))
        known_dicts = np.concatenate([known_dicts, made])
        shared[(_KNOWN, names)] = (pa.concat_arrays([known_spellings, fresh]), known_dicts)
    codes = encoded.indices.to_numpy(zero_copy_only=False)
    return known_dicts[positions[codes]]
