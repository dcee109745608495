"""NDJSON read line by line: one JSON object per line, any spelling of the keys, any value."""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pandas as pd

from metricmill.types import Reason
from storage.limits import (
    DEFAULT_LIMITS,
    BadLines,
    ReadLimits,
    UnreadableFile,
    check_depth,
    too_many_labels,
)

# The quarantine reason of a line that cannot be decoded (as for Influx line protocol input).
MALFORMED_LINE = Reason.MALFORMED_LINE
_ALIASES = (("name", "metric"), ("timestamp", "ts"), ("time", "ts"))
# A JSON object with none of these keys is not a sample: a malformed line, not a row.
_SAMPLE_KEYS = frozenset(("metric", "name", "labels", "ts", "timestamp", "time", "value"))
NDJSON_COLUMNS = ("metric", "labels", "ts", "value")


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


def plain_bytes(raw: bytes) -> bytes:
    """The text without a UTF-8 byte-order mark, its line ends as \\n."""
    if raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8) :]
    if b"\r" in raw:
        raw = raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    return raw


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
    name = path.name
    try:
        records = _Records.read(plain_bytes(raw), name, labels_memo, limits)
    except UnicodeDecodeError as exc:
        raise UnreadableFile(f"{name}: cannot decode file: {exc}") from None
    if records.rejected and not records.rows:
        raise UnreadableFile(f"{name}: not NDJSON: no line is a JSON object of a sample")
    frame = records.frame()
    frame.attrs["rejected"] = records.rejected
    return frame


class _Records:
    """The sample records of a file's lines, the lines that are none, and whether every
    record has the same keys in the same spelling (`layout`)."""

    def __init__(self, rows: list[dict[str, Any]], rejected: list[Any], layout: Any) -> None:
        self.rows = rows
        self.rejected = rejected
        self.layout = layout  # the keys of every record, or None when they differ

    @classmethod
    def read(
        cls, raw: bytes, name: str, labels_memo: dict[Any, Any] | None, limits: ReadLimits
    ) -> _Records:
        """Each line decoded once: a record (its labels dict shared through `labels_memo`)
        or a malformed line; bounds checked as the lines come."""
        memo: dict[Any, Any] = {} if labels_memo is None else labels_memo
        rows: list[dict[str, Any]] = []
        bad = BadLines(name, limits)
        layout: Any = None  # the keys of the first record, while every record has the same
        uniform = True
        max_labels = limits.max_row_labels
        shallow = raw.count(b"[") + raw.count(b"{") <= limits.max_nesting_depth
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
        return cls(rows, bad.rows, layout if uniform else None)

    def frame(self) -> pd.DataFrame:
        """The records as object columns, keys spelled the standard way."""
        rows = self.rows
        if self.layout is not None:
            # One spelling for every record: the column of each name is found once.
            source = canonical_keys({key: key for key in self.layout})
            if source.keys() <= set(NDJSON_COLUMNS):
                return pd.DataFrame(
                    {name: [r[key] for r in rows] for name, key in source.items()},
                    dtype=object,
                )
        rows = [canonical_keys(r) for r in rows]
        keys = set().union(*(r.keys() for r in rows))
        if keys <= set(NDJSON_COLUMNS):
            # Columns straight from the records (faster than DataFrame's list-of-dicts path);
            # a key no record has is no column, as there.
            columns = {
                key: [r.get(key, np.nan) for r in rows] for key in NDJSON_COLUMNS if key in keys
            }
            return pd.DataFrame(columns, dtype=object)
        # Object columns: JSON may carry text Arrow strings cannot hold (lone surrogates).
        return pd.DataFrame(rows, dtype=object)


def canonical_keys(record: dict[str, Any]) -> dict[str, Any]:
    """Aliases (name, timestamp, time) renamed per line, as lines may differ in spelling."""
    for alias, key in _ALIASES:
        if alias in record and key not in record:
            record[key] = record.pop(alias)
    return record
