"""PostgreSQL's COPY BINARY format, both ways, in one numpy pass: sample rows out (the write
path's COPY FROM STDIN) and rows of arrays in (the query paths' COPY TO STDOUT)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# PostgreSQL's binary timestamps count µs from 2000-01-01.
PG_EPOCH_US = 946_684_800_000_000
_COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + (0).to_bytes(4, "big") + (0).to_bytes(4, "big")
_COPY_TRAILER = (-1).to_bytes(2, "big", signed=True)
_SAMPLE_FIELDS = [
    ("fields", ">i2"),
    ("len_id", ">i4"),
    ("series_id", ">i8"),
    ("len_ts", ">i4"),
    ("ts", ">i8"),
    ("len_value", ">i4"),
    ("value", ">f8"),
]
_SAMPLE_ROW = np.dtype(_SAMPLE_FIELDS)
# The same row plus the int4 number of the batch part (file) it came from.
_PART_ROW = np.dtype([*_SAMPLE_FIELDS, ("len_part", ">i4"), ("part", ">i4")])


def binary_copy_payload(
    series_ids: np.ndarray,
    ts_us: np.ndarray,
    values: np.ndarray,
    parts: np.ndarray | None = None,
) -> bytes:
    """Rows (bigint, timestamptz, float8[, int4 part]) in COPY BINARY format, one numpy pass."""
    rows = np.empty(len(series_ids), dtype=_SAMPLE_ROW if parts is None else _PART_ROW)
    rows["fields"] = 3 if parts is None else 4
    rows["len_id"] = 8
    rows["series_id"] = series_ids
    rows["len_ts"] = 8
    rows["ts"] = ts_us - PG_EPOCH_US
    rows["len_value"] = 8
    rows["value"] = values
    if parts is not None:
        rows["len_part"] = 4
        rows["part"] = parts
    return _COPY_HEADER + rows.tobytes() + _COPY_TRAILER


def binary_array(values: np.ndarray, element_oid: int) -> bytes:
    """A one-dimensional array of 8-byte elements (float8: 701, int8: 20) in PostgreSQL's
    binary array format, one numpy pass: no element NULL."""
    if len(values) == 0:
        return b"".join(n.to_bytes(4, "big") for n in (0, 0, element_oid))
    header = b"".join(n.to_bytes(4, "big") for n in (1, 0, element_oid, len(values), 1))
    kind = ">f8" if element_oid == 701 else ">i8"
    items = np.empty(len(values), dtype=[("len", ">i4"), ("v", kind)])
    items["len"] = 8
    items["v"] = values
    return header + items.tobytes()


def parse_array_copy(data: bytes, kinds: Sequence[str]) -> list[np.ndarray] | None:
    """Decode COPY BINARY rows whose fields are one-dimensional arrays of 8-byte values into
    one flat column per field; None when an element is NULL (the layout is not fixed then).
    A NULL array is an aggregate over no rows: an empty column."""
    view = memoryview(data)
    if len(data) < 21:
        return None
    pos = 19 + int.from_bytes(view[15:19], "big")
    element = {
        kind: np.dtype([("len", ">i4"), ("v", ">f8" if kind == "float" else ">i8")])
        for kind in ("int", "float", "ts")
    }
    parts: list[list[np.ndarray]] = [[] for _ in kinds]
    while True:
        fields = int.from_bytes(view[pos : pos + 2], "big", signed=True)
        pos += 2
        if fields == -1:
            break
        if fields != len(kinds):
            return None
        for i, kind in enumerate(kinds):
            size = int.from_bytes(view[pos : pos + 4], "big", signed=True)
            if size < 0:  # array_agg over no rows is NULL (never over some): no values
                pos += 4
                parts[i].append(np.empty(0, dtype=element[kind])["v"])
                continue
            body = view[pos + 4 : pos + 4 + size]
            pos += 4 + size
            dims, has_null = (int.from_bytes(body[k : k + 4], "big") for k in (0, 4))
            if has_null or dims != 1:
                return None
            count = int.from_bytes(body[12:16], "big")
            values = np.frombuffer(body[20:], dtype=element[kind], count=count)
            if count and not (values["len"] == 8).all():
                return None
            parts[i].append(values["v"])
    columns = []
    for kind, pieces in zip(kinds, parts, strict=True):
        joined = np.concatenate(pieces) if pieces else np.empty(0, dtype=">i8")
        if kind == "float":
            columns.append(joined.astype("float64"))
        elif kind == "ts":
            columns.append(joined.astype("int64") + PG_EPOCH_US)
        else:
            columns.append(joined.astype("int64"))
    return columns
