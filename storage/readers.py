"""Sample files as DataFrames for `Store.write_samples`: NDJSON and CSV, optionally gzipped.

Readers only decode; validating rows (and quarantining the bad ones) is the store's job. Records
that cannot be decoded travel in `frame.attrs["rejected"]`, ready for `write_samples(rejected=)`.
A file that cannot be decoded as a whole raises `UnreadableFile`; a missing one FileNotFoundError.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pandas as pd

from metricmill.errors import MetricmillError
from metricmill.types import Reason
from storage.lineproto import parse_line_protocol

_METRIC_COLUMNS = ("metric", "name")
_TIME_COLUMNS = ("timestamp", "ts", "time")
# The quarantine reason of a line that cannot be decoded (as for Influx line protocol input).
MALFORMED_LINE = Reason.MALFORMED_LINE
_ALIASES = (("name", "metric"), ("timestamp", "ts"), ("time", "ts"))
_NDJSON_SUFFIXES = (".ndjson", ".jsonl", ".json")
_CSV_SUFFIXES = (".csv",)
_LINE_PROTOCOL_SUFFIXES = (".lp", ".line", ".influx")


class UnreadableFile(MetricmillError):
    """A file is not NDJSON or CSV samples, or cannot be decoded at all."""


def read_samples_file(path: str | Path) -> pd.DataFrame:
    """Samples from an NDJSON or CSV file (or its .gz), chosen by the file name."""
    path = Path(path)
    reader = _reader_for(path)
    try:
        with _open_text(path) as handle:
            return reader(handle, path)
    except (UnicodeDecodeError, gzip.BadGzipFile, EOFError) as exc:
        raise UnreadableFile(f"{path}: cannot decode file: {exc}") from None


def _reader_for(path: Path) -> Callable[[IO[str], Path], pd.DataFrame]:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes.pop()
    last = suffixes[-1] if suffixes else ""
    if last in _NDJSON_SUFFIXES:
        return read_ndjson
    if last in _CSV_SUFFIXES:
        return read_csv
    raise UnreadableFile(
        f"{path}: unknown file type {last or '(none)'!r}: expected .ndjson, .jsonl or .csv "
        "(optionally .gz)"
    )


def _open_text(path: Path) -> IO[str]:
    if path.suffix.lower() == ".gz":
        return gzip.open(path, "rt", encoding="utf-8-sig", newline="")
    return path.open("r", encoding="utf-8-sig", newline="")


def read_ndjson(handle: IO[str], path: Path) -> pd.DataFrame:
    """One JSON object per line: metric (or name), labels, ts (or timestamp), value.

    Blank lines are skipped. Lines that are not JSON objects are not rows: they are listed in
    `frame.attrs["rejected"]` as ({"line": number, "text": line}, "malformed_line") for the
    store to quarantine. A file in which no line is an object is unreadable.
    """
    rows: list[dict[str, Any]] = []
    rejected: list[tuple[dict[str, Any], str]] = []
    for number, line in enumerate(handle, start=1):
        text = line.strip()
        if not text:
            continue
        try:
            record = json.loads(text)
        except ValueError:
            record = None
        if isinstance(record, dict):
            rows.append(_canonical_keys(record))
        else:
            rejected.append(({"line": number, "text": text}, MALFORMED_LINE))
    if rejected and not rows:
        raise UnreadableFile(f"{path}: not NDJSON: no line is a JSON object")
    # Object columns: JSON may carry text Arrow strings cannot hold (lone surrogates).
    frame = pd.DataFrame(rows, dtype=object)
    frame.attrs["rejected"] = rejected
    return frame


def _canonical_keys(record: dict[str, Any]) -> dict[str, Any]:
    """Aliases (name, timestamp, time) renamed per line, as lines may differ in spelling."""
    for alias, key in _ALIASES:
        if alias in record and key not in record:
            record[key] = record.pop(alias)
    return record


def read_csv(handle: IO[str], path: Path) -> pd.DataFrame:
    """Columns metric, timestamp, value, then a `labels` JSON column or one column per label.

    Cells are read as text so label values stay exactly as written; an empty label cell means
    the row does not have that label.
    """
    try:
        frame = pd.read_csv(
            io.StringIO(handle.read()), dtype=str, keep_default_na=False, na_filter=False
        )
    except pd.errors.EmptyDataError:
        return pd.DataFrame()
    except (pd.errors.ParserError, csv.Error) as exc:
        first_line = str(exc).strip().splitlines()[0]
        raise UnreadableFile(f"{path}: not CSV: {first_line}") from None
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


def _csv_timestamps(column: pd.Series) -> pd.Series:
    """Epoch seconds when every filled cell is a number, else the text as written (ISO 8601)."""
    numbers = pd.to_numeric(column, errors="coerce")
    filled = column.str.strip() != ""
    if filled.any() and numbers[filled].notna().all():
        return numbers
    return column


def labels_from_columns(frame: pd.DataFrame, columns: list[str]) -> pd.Series:
    """One label dict per row from label columns; an empty or null cell means no such label."""
    return pd.Series(
        [
            {str(k): str(v) for k, v in row.items() if not _empty_cell(v)}
            for row in frame[columns].to_dict(orient="records")
        ],
        index=frame.index,
        dtype=object,
    )


def _empty_cell(value: Any) -> bool:
    if value is None:
        return True
    return bool(pd.api.types.is_scalar(value) and (value == "" or pd.isna(value)))


def read_parquet_samples(path: Path) -> pd.DataFrame:
    """The CSV columns, as Parquet: metric (or name), ts (or timestamp, time), value, and a
    labels column or one column per label."""
    try:
        frame = pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several types for a file that is not Parquet
        raise UnreadableFile(f"{path.name}: not a Parquet file: {exc}") from None
    for column, aliases in (("metric", ("name",)), ("ts", ("timestamp", "time"))):
        alias = next((a for a in aliases if a in frame.columns), None)
        if column not in frame.columns and alias is not None:
            frame = frame.rename(columns={alias: column})
    if "labels" in frame.columns or not {"metric", "ts", "value"} <= set(frame.columns):
        return frame  # a missing column is the quality check's to report
    label_columns = [c for c in frame.columns if c not in ("metric", "ts", "value")]
    return frame[["metric", "ts", "value"]].assign(labels=labels_from_columns(frame, label_columns))


@dataclass
class DecodedFile:
    """A landed file as samples, the lines rejected while decoding, and skipped fields."""

    frame: pd.DataFrame
    rejected: list[tuple[dict[str, Any], str]]
    skipped_fields: int = 0


def read_landed_file(path: Path, *, precision: str = "ns") -> DecodedFile:
    """Any landing-directory format, chosen by the file name (gzip allowed)."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes.pop()
    kind = suffixes[-1] if suffixes else ""
    if path.stat().st_size == 0:
        raise UnreadableFile(f"{path.name}: empty file")
    if kind == ".parquet":
        return DecodedFile(read_parquet_samples(path), [])
    if kind in _LINE_PROTOCOL_SUFFIXES:
        try:
            raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
            text = raw.decode("utf-8")
        except (OSError, EOFError, UnicodeDecodeError) as exc:
            raise UnreadableFile(f"{path.name}: cannot decode file: {exc}") from None
        parsed = parse_line_protocol(text, precision=precision)
        return DecodedFile(parsed.frame, parsed.rejected, sum(parsed.skipped_fields.values()))
    frame = read_samples_file(path)
    return DecodedFile(frame, list(frame.attrs.get("rejected", [])))
