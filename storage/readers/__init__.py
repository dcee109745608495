"""Landed files as sample frames: NDJSON, CSV, Parquet and Influx line protocol, optionally
gzipped; the first step of a sample's path (then `storage.normalise`).

Readers only decode; judging rows is the ingest rules' job (`tasks.ingest_check`). Records
that cannot be decoded travel in `frame.attrs["rejected"]` (`DecodedFile.rejected`). A file
that cannot be decoded as a whole, or breaks a bound of `storage.limits.ReadLimits` (size,
line length, nesting depth, labels per row, bad lines), raises `UnreadableFile` with a reason
code; a missing one FileNotFoundError. Bounds are checked while the bytes stream in.

One module per format: `ndjson` (line by line) and `ndjson_arrow` (the plain case, parsed by
Arrow), `csv_file`, `parquet_file`; line protocol is `storage.lineproto`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from storage.limits import (
    DEFAULT_LIMITS,
    ReadLimits,
    UnreadableFile,
    read_bounded,
    too_many_labels,
)
from storage.lineproto import parse_line_protocol
from storage.readers.csv_file import csv_frame
from storage.readers.ndjson import ndjson_frame
from storage.readers.ndjson_arrow import arrow_ndjson_frame
from storage.readers.parquet_file import read_parquet_samples

__all__ = ["DecodedFile", "ReadLimits", "UnreadableFile", "read_landed_file", "read_samples_file"]

_NDJSON_SUFFIXES = (".ndjson", ".jsonl", ".json")
_CSV_SUFFIXES = (".csv",)
_LINE_PROTOCOL_SUFFIXES = (".lp", ".line", ".influx")


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
        fast = arrow_ndjson_frame(raw, labels_memo, limits)
        frame = fast if fast is not None else ndjson_frame(raw, path, labels_memo, limits=limits)
    else:
        frame = reader(raw, path, limits)
    return DecodedFile(frame, list(frame.attrs.get("rejected", [])))
