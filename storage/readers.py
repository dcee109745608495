"""Sample files as DataFrames for `Store.write_samples`: NDJSON and CSV, optionally gzipped.

Readers only decode; validating rows (and quarantining the bad ones) is the store's job. Records
that cannot be decoded travel in `frame.attrs["rejected"]`, ready for `write_samples(rejected=)`.
A file that cannot be decoded as a whole, or breaks a bound of `storage.limits.ReadLimits`
(size, line length, nesting depth, labels per row, bad lines), raises `UnreadableFile` with a
reason code; a missing one FileNotFoundError. Bounds are checked while the bytes stream in.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from metricmill.types import Reason
from storage.limits import (
    DEFAULT_LIMITS,
    BadLines,
    FileReason,
    ReadLimits,
    UnreadableFile,
    check_depth,
    read_bounded,
    too_many_labels,
)
from storage.lineproto import parse_line_protocol

__all__ = ["DecodedFile", "ReadLimits", "UnreadableFile", "read_landed_file", "read_samples_file"]

_METRIC_COLUMNS = ("metric", "name")
_TIME_COLUMNS = ("timestamp", "ts", "time")
# The quarantine reason of a line that cannot be decoded (as for Influx line protocol input).
MALFORMED_LINE = Reason.MALFORMED_LINE
_ALIASES = (("name", "metric"), ("timestamp", "ts"), ("time", "ts"))
_NDJSON_SUFFIXES = (".ndjson", ".jsonl", ".json")
_CSV_SUFFIXES = (".csv",)
_LINE_PROTOCOL_SUFFIXES = (".lp", ".line", ".influx")
# A JSON object with none of these keys is not a sample: a malformed line, not a row.
_SAMPLE_KEYS = frozenset(("metric", "name", "labels", "ts", "timestamp", "time", "value"))


def read_samples_file(path: str | Path, *, limits: ReadLimits = DEFAULT_LIMITS) -> pd.DataFrame:
    """Samples from an NDJSON or CSV file (or its .gz), chosen by the file name."""
    path = Path(path)
    reader = _reader_for(path)
    return reader(read_bounded(path, None, limits), path, limits)


def _reader_for(path: Path) -> Callable[[bytes, Path, ReadLimits], pd.DataFrame]:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes.pop()
    last = suffixes[-1] if suffixes else ""
    if last in _NDJSON_SUFFIXES:
        return _ndjson_file
    if last in _CSV_SUFFIXES:
        return csv_frame
    raise UnreadableFile(
        f"{path}: unknown file type {last or '(none)'!r}: expected .ndjson, .jsonl or .csv "
        "(optionally .gz)"
    )


def _ndjson_file(raw: bytes, path: Path, limits: ReadLimits) -> pd.DataFrame:
    return ndjson_frame(raw, path, limits=limits)


def _loads(line: bytes) -> Any:
    """orjson, with the json module's leniency (NaN/Infinity literals, lone surrogates, huge
    integers) for the lines orjson refuses. Invalid UTF-8 raises UnicodeDecodeError."""
    try:
        return orjson.loads(line)
    except orjson.JSONDecodeError:
        text = line.decode("utf-8")
        try:
            return json.loads(text)
        except ValueError:
            return None


def _lines(raw: bytes) -> Iterator[bytes]:
    """The lines of `raw`, one at a time (a list of them all would double the memory)."""
    start, end = 0, len(raw)
    find = raw.find
    while start <= end:
        stop = find(b"\n", start)
        if stop < 0:
            yield raw[start:]
            return
        yield raw[start:stop]
        start = stop + 1


def ndjson_frame(
    raw: bytes,
    path: Path,
    labels_memo: dict[Any, Any] | None = None,
    *,
    limits: ReadLimits = DEFAULT_LIMITS,
) -> pd.DataFrame:
    """One JSON object per line: metric (or name), labels, ts (or timestamp), value.

    Blank lines are skipped. Lines that are not JSON objects holding at least one sample key
    are not rows: they are listed in `frame.attrs["rejected"]` as
    ({"line": number, "text": line}, "malformed_line") for the store to quarantine. A file in
    which no line is an object is unreadable; so is one breaking a bound of `limits`.

    Equal label objects are made one shared dict (through `labels_memo`, which callers may
    share across files), so later steps do their per-label-set work once per distinct set.
    """
    if raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8) :]
    if b"\r" in raw:
        raw = raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    name = path.name
    memo: dict[Any, Any] = {} if labels_memo is None else labels_memo
    rows: list[dict[str, Any]] = []
    bad = BadLines(name, limits)
    layout: Any = None  # the keys of the first record, while every record has the same
    uniform = True
    max_labels = limits.max_row_labels
    shallow = raw.count(b"[") + raw.count(b"{") <= limits.max_nesting_depth
    try:
        for number, line in enumerate(_lines(raw), start=1):
            if not line or line.isspace():
                continue
            if not shallow:
                check_depth(name, line, limits)
            record = _loads(line)
            if type(record) is not dict or record.keys().isdisjoint(_SAMPLE_KEYS):
                text = line.decode("utf-8").strip()
                bad.add({"line": number, "text": text}, MALFORMED_LINE, len(line))
                continue
            if layout is None:
                layout = record.keys()
            elif uniform and record.keys() != layout:
                uniform = False
            labels = record.get("labels")
            if type(labels) is dict:
                if len(labels) > max_labels:
                    raise too_many_labels(name, len(labels), limits)
                try:  # noqa: SIM105 - a hot loop: no context manager per line
                    record["labels"] = memo.setdefault(tuple(labels.items()), labels)
                except TypeError:  # a nested (unhashable) value: left as it is
                    pass
            rows.append(record)
    except UnicodeDecodeError as exc:
        raise UnreadableFile(f"{name}: cannot decode file: {exc}") from None
    rejected = bad.rows
    if rejected and not rows:
        raise UnreadableFile(f"{name}: not NDJSON: no line is a JSON object of a sample")
    if uniform and layout is not None:
        # One spelling for every record: the column of each name is found once.
        source = _canonical_keys({key: key for key in layout})
        if source.keys() <= set(_NDJSON_COLUMNS):
            frame = pd.DataFrame(
                {name: [r[key] for r in rows] for name, key in source.items()},
                dtype=object,
            )
            frame.attrs["rejected"] = rejected
            return frame
    rows = [_canonical_keys(r) for r in rows]
    keys = set().union(*(r.keys() for r in rows))
    if keys <= set(_NDJSON_COLUMNS):
        # Columns straight from the records (faster than DataFrame's list-of-dicts path);
        # a key no record has is no column, as there.
        columns = {
            key: [r.get(key, np.nan) for r in rows] for key in _NDJSON_COLUMNS if key in keys
        }
        frame = pd.DataFrame(columns, dtype=object)
    else:
        # Object columns: JSON may carry text Arrow strings cannot hold (lone surrogates).
        frame = pd.DataFrame(rows, dtype=object)
    frame.attrs["rejected"] = rejected
    return frame


_STRING_TYPES = (pa.string(), pa.large_string())


def _arrow_ndjson_frame(
    data: bytes, labels_memo: dict[Any, Any] | None, limits: ReadLimits = DEFAULT_LIMITS
) -> pd.DataFrame | None:
    """The common NDJSON file parsed by Arrow (in C++, without the GIL), or None when the file
    is not that plain case and `ndjson_frame` must read it line by line.

    The plain case: every line an object with the same four keys (metric, labels, ts and
    value, or their aliases), a text metric, a numeric value, ts all text or all numbers,
    labels objects of text values; no null, no \\u escape (lone surrogates), no NaN literal;
    no array and no object beyond the record and its labels (deeper JSON is left to the line
    reader, which bounds its depth).
    """
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8) :]
    newline = data.find(b"\n")
    head = data[: newline if newline >= 0 else len(data)].strip()
    if not head.startswith(b"{") or b"null" in data or b"\\u" in data or b"[" in data:
        return None
    if data.count(b"{") > 2 * (data.count(b"\n") + 1):
        return None  # an object nested in a record: not the plain case
    try:
        first = orjson.loads(head)
    except orjson.JSONDecodeError:
        return None
    if type(first) is not dict or len(first) != 4:
        return None
    source = _canonical_keys({key: key for key in first})
    if source.keys() != set(_NDJSON_COLUMNS) or type(first[source["labels"]]) is not dict:
        return None
    ts_value = first[source["ts"]]
    if type(ts_value) is str:
        ts_type = pa.string()
    elif type(ts_value) is int:
        ts_type = pa.int64()
    elif type(ts_value) is float:
        ts_type = pa.float64()
    else:
        return None
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
    labels_column = table.column(source["labels"])
    if (
        pa.types.is_struct(labels_column.type)
        and labels_column.type.num_fields > limits.max_row_labels
    ):
        return None  # the line reader says which row breaks the bound
    labels = _arrow_labels(labels_column, labels_memo)
    if labels is None:
        return None
    ts = table.column(source["ts"])
    frame = pd.DataFrame(
        {
            # text as Python objects, like ndjson_frame's columns (not Arrow-backed strings)
            "metric": pd.Series(
                table.column(source["metric"]).to_numpy(zero_copy_only=False), dtype=object
            ),
            "labels": labels,
            "ts": pd.Series(
                ts.to_numpy(zero_copy_only=False), dtype=object if ts_type == pa.string() else None
            ),
            "value": table.column(source["value"]).to_numpy(zero_copy_only=False),
        }
    )
    frame = frame[list(source)]  # the columns in the order ndjson_frame gives them
    frame.attrs["rejected"] = []
    return frame


def _arrow_labels(column: pa.ChunkedArray, memo: dict[Any, Any] | None) -> np.ndarray | None:
    """One shared dict per distinct label set (an absent key is no label), or None unless the
    column is objects of text values.

    Each row's set is first spelled as one string by Arrow (label names, then the values joined
    by NUL; absent: \\x01; neither can be in JSON text unescaped), so Python sees each distinct
    spelling once, and `memo` (shared by the files read together) maps it to its dict.
    """
    if not pa.types.is_struct(column.type):
        return None
    column = column.combine_chunks()
    fields = [column.type.field(i) for i in range(column.type.num_fields)]
    if any(f.type not in _STRING_TYPES for f in fields):
        return None
    names = [f.name for f in fields]
    prefix = "\x02".join(names) + "\x03"
    if fields:
        spelled = pc.binary_join_element_wise(
            *[column.field(i).cast(pa.string()) for i in range(len(fields))],
            "\x00",
            null_handling="replace",
            null_replacement="\x01",
        )
        encoded = pc.dictionary_encode(spelled)
        spellings = encoded.dictionary.to_pylist()
        codes = encoded.indices.to_numpy(zero_copy_only=False)
    else:
        spellings, codes = [""], np.zeros(len(column), dtype=np.int64)
    shared: dict[Any, Any] = {} if memo is None else memo
    dicts = np.empty(len(spellings), dtype=object)
    for index, spelling in enumerate(spellings):
        key = prefix + spelling
        found = shared.get(key)
        if found is None:
            values = spelling.split("\x00") if fields else []
            found = shared[key] = {
                name: value for name, value in zip(names, values, strict=True) if value != "\x01"
            }
        dicts[index] = found
    return dicts[codes]


def _canonical_keys(record: dict[str, Any]) -> dict[str, Any]:
    """Aliases (name, timestamp, time) renamed per line, as lines may differ in spelling."""
    for alias, key in _ALIASES:
        if alias in record and key not in record:
            record[key] = record.pop(alias)
    return record


_NDJSON_COLUMNS = ("metric", "labels", "ts", "value")


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


@dataclass
class DecodedFile:
    """A landed file as samples, the lines rejected while decoding, and skipped fields."""

    frame: pd.DataFrame
    rejected: list[tuple[dict[str, Any], str]]
    skipped_fields: int = 0


def read_landed_file(
    path: Path,
    *,
    precision: str = "ns",
    data: bytes | None = None,
    labels_memo: dict[Any, Any] | None = None,
    limits: ReadLimits = DEFAULT_LIMITS,
) -> DecodedFile:
    """Any landing-directory format, chosen by the file name (gzip allowed), within `limits`.

    `data` is the file's bytes when the caller has read them already (None: the file is read
    here, streaming); `labels_memo` is shared by the files decoded together (see
    `ndjson_frame`)."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes.pop()
    kind = suffixes[-1] if suffixes else ""
    if (len(data) if data is not None else path.stat().st_size) == 0:
        raise UnreadableFile(f"{path.name}: empty file")
    if kind == ".parquet":
        frame = read_parquet_samples(path, limits)
        return DecodedFile(frame, list(frame.attrs.get("rejected", [])))
    reader = None if kind in _LINE_PROTOCOL_SUFFIXES else _reader_for(path)
    raw = read_bounded(path, data, limits)
    if reader is None:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise UnreadableFile(f"{path.name}: cannot decode file: {exc}") from None
        del raw
        parsed = parse_line_protocol(text, precision=precision, max_bad_lines=limits.max_bad_lines)
        widest = max((len(t) for t in {id(t): t for t in parsed.frame["labels"]}.values()),
                     default=0)  # fmt: skip
        if widest > limits.max_row_labels:
            raise too_many_labels(path.name, widest, limits)
        return DecodedFile(parsed.frame, parsed.rejected, sum(parsed.skipped_fields.values()))
    if reader is _ndjson_file:
        fast = _arrow_ndjson_frame(raw, labels_memo, limits)
        frame = fast if fast is not None else ndjson_frame(raw, path, labels_memo, limits=limits)
    else:
        frame = reader(raw, path, limits)
    return DecodedFile(frame, list(frame.attrs.get("rejected", [])))
