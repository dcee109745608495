"""InfluxDB line protocol → a metricmill sample frame (metric, labels, ts, value).

Grammar: ``measurement[,tag=value...] field=value[,field=value...] [timestamp]``.

* Each numeric field becomes one sample: metric ``<measurement>_<field>``, or just
  ``<measurement>`` when the field key is exactly ``value``. Tags become labels.
* Escapes: in the measurement ``\\,`` and ``\\ ``; in tag keys, tag values and field keys ``\\,``,
  ``\\=`` and ``\\ ``. As in InfluxDB's documentation, ``\\\\`` is one literal backslash
  everywhere, and a backslash before any other character is kept as a literal backslash.
* Field values: floats (``1``, ``-3``, ``1.5``, ``.5``, ``1e3``), integers (``12i``), unsigned
  integers (``7u``) become float64 samples (integers beyond 2**53 lose precision). Booleans
  (``t``/``true``/...) and double-quoted strings are skipped and counted in ``skipped_fields``.
  A line whose fields are all skipped yields no sample and is not rejected.
* Line protocol has no NaN or infinity literal: a field value ``NaN``/``inf``, an integer outside
  the int64 (``i``) or uint64 (``u``) range, a float that overflows to infinity, or any other
  unparseable field value rejects the whole line with ``malformed_line`` (InfluxDB also rejects
  the line as a whole; no partial lines are kept).
* Timestamps are integers in ``precision`` (ns, us, ms or s), converted to microseconds with
  integer arithmetic (floor, so sub-microsecond digits are dropped). A missing timestamp means
  ``now``. Out-of-range instants (before 1970, from 2262 on) are passed through for the storage
  layer to reject; only instants that datetime64[us] cannot represent at all are rejected here
  (``timestamp_out_of_range``). A non-integer timestamp is ``invalid_timestamp``.
* Blank lines and comment lines (first non-blank character ``#``) are ignored; CRLF line endings
  and a leading UTF-8 BOM are accepted.

Rows with identical tag sets share one labels dict object (it lets the storage layer canonicalise
each label set once); treat the dicts as read-only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pandas as pd

from metricmill.types import Reason, datetime_to_us

MALFORMED_LINE = "malformed_line"
INVALID_TIMESTAMP = Reason.INVALID_TIMESTAMP
TIMESTAMP_OUT_OF_RANGE = Reason.TIMESTAMP_OUT_OF_RANGE

# datetime64[us] covers int64 except its minimum, which is NaT.
_US_MIN = -(2**63) + 1
_US_MAX = 2**63 - 1
_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1
_UINT64_MAX = 2**64 - 1

# precision -> (multiplier, divisor) to microseconds
_PRECISIONS: dict[str, tuple[int, int]] = {
    "ns": (1, 1000),
    "us": (1, 1),
    "ms": (1000, 1),
    "s": (1_000_000, 1),
}

# Lines without backslashes or quotes: measurement, tags, fields, optional timestamp.
_FAST_LINE = re.compile(r"([^ ,]+)((?:,[^ ,=]+=[^ ,=]+)*) +([^ ]+)(?: +([^ ]+))? *")
_FIELD_VALUE = re.compile(
    r"(-?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)"  # 1: float
    r"|(-?[0-9]+)i"  # 2: integer
    r"|([0-9]+)u"  # 3: unsigned
    r"|(t|T|true|True|TRUE|f|F|false|False|FALSE)"  # 4: boolean
)
_INTEGER = re.compile(r"-?[0-9]+")

_MEASUREMENT_ESCAPES = frozenset(", \\")
_KEY_ESCAPES = frozenset(",= \\")


@dataclass
class LineProtocolResult:
    """Parsed samples, rejected lines with their reason, and counts of skipped non-numeric fields."""

    frame: pd.DataFrame
    rejected: list[tuple[dict[str, Any], str]] = field(default_factory=list)
    skipped_fields: dict[str, int] = field(default_factory=lambda: {"string": 0, "boolean": 0})


class _LineError(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def sample_frame(
    metrics: list[str], labels: list[dict[str, str]], ts_us: list[int], values: list[float]
) -> pd.DataFrame:
    """Columns metric, labels (dict per row), ts (datetime64[us, UTC]) and value (float64)."""
    label_col = np.empty(len(labels), dtype=object)
    label_col[:] = labels
    ts = pd.Series(np.array(ts_us, dtype=np.int64).view("datetime64[us]")).dt.tz_localize(UTC)
    return pd.DataFrame(
        {
            "metric": pd.Series(metrics, dtype=object),
            "labels": label_col,
            "ts": ts,
            "value": np.array(values, dtype=np.float64),
        }
    )


def _scan(line: str, i: int, escapes: frozenset[str], stops: str) -> tuple[str, int]:
    """Unescape from ``i`` up to the first unescaped character in ``stops`` (or the end)."""
    n = len(line)
    parts: list[str] = []
    start = i
    while i < n:
        c = line[i]
        if c == "\\" and i + 1 < n and line[i + 1] in escapes:
            parts.append(line[start:i])
            parts.append(line[i + 1])
            i += 2
            start = i
            continue
        if c in stops:
            break
        i += 1
    parts.append(line[start:i])
    return "".join(parts), i


def _parse_slow(line: str) -> tuple[str, dict[str, str], list[tuple[str, str | None]], str | None]:
    """(measurement, tags, [(field key, raw value or None for strings)], timestamp token)."""
    n = len(line)
    measurement, i = _scan(line, 0, _MEASUREMENT_ESCAPES, ", ")
    if not measurement:
        raise _LineError(MALFORMED_LINE)
    tags: dict[str, str] = {}
    while i < n and line[i] == ",":
        key, i = _scan(line, i + 1, _KEY_ESCAPES, ",= ")
        if not key or i >= n or line[i] != "=":
            raise _LineError(MALFORMED_LINE)
        value, i = _scan(line, i + 1, _KEY_ESCAPES, ",= ")
        if not value or (i < n and line[i] == "=") or key in tags:
            raise _LineError(MALFORMED_LINE)
        tags[key] = value
    while i < n and line[i] == " ":
        i += 1
    if i >= n:
        raise _LineError(MALFORMED_LINE)  # no field set

    fields: list[tuple[str, str | None]] = []
    while True:
        key, i = _scan(line, i, _KEY_ESCAPES, ",= ")
        if not key or i >= n or line[i] != "=":
            raise _LineError(MALFORMED_LINE)
        i += 1
        if i < n and line[i] == '"':
            j = i + 1
            while j < n:
                c = line[j]
                if c == "\\" and j + 1 < n and line[j + 1] in '"\\':
                    j += 2
                elif c == '"':
                    break
                else:
                    j += 1
            if j >= n:
                raise _LineError(MALFORMED_LINE)  # unterminated string
            fields.append((key, None))
            i = j + 1
        else:
            j = i
            while j < n and line[j] not in ", ":
                j += 1
            if j == i:
                raise _LineError(MALFORMED_LINE)
            fields.append((key, line[i:j]))
            i = j
        if i >= n:
            return measurement, tags, fields, None
        if line[i] == ",":
            i += 1
            continue
        if line[i] == " ":
            break
        raise _LineError(MALFORMED_LINE)  # junk after a closing quote

    while i < n and line[i] == " ":
        i += 1
    if i >= n:
        return measurement, tags, fields, None
    end = line.find(" ", i)
    if end == -1:
        return measurement, tags, fields, line[i:]
    if line[end:].strip(" "):
        raise _LineError(MALFORMED_LINE)  # a fourth section
    return measurement, tags, fields, line[i:end]


def _fast_tags(tag_text: str) -> dict[str, str]:
    tags: dict[str, str] = {}
    pairs = tag_text[1:].split(",")
    for pair in pairs:
        key, _, value = pair.partition("=")
        tags[key] = value
    if len(tags) != len(pairs):
        raise _LineError(MALFORMED_LINE)  # duplicate tag key
    return tags


def _fast_fields(field_text: str) -> list[tuple[str, str | None]]:
    fields: list[tuple[str, str | None]] = []
    for item in field_text.split(","):
        key, sep, value = item.partition("=")
        if not key or not sep or not value:
            raise _LineError(MALFORMED_LINE)
        fields.append((key, value))
    return fields


def parse_line_protocol(
    text: str, *, precision: str = "ns", now: datetime | None = None
) -> LineProtocolResult:
    """Parse line protocol text; bad lines come back in ``rejected`` with a reason code.

    Rejected entries are ``({"line": <text without line ending>, "line_no": <1-based>}, reason)``
    with reason ``malformed_line``, ``invalid_timestamp`` or ``timestamp_out_of_range``.
    """
    if precision not in _PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(_PRECISIONS)}, not {precision!r}")
    multiplier, divisor = _PRECISIONS[precision]
    now_us = datetime_to_us(now if now is not None else datetime.now(UTC))
    if text.startswith("\ufeff"):
        text = text[1:]

    metrics: list[str] = []
    labels: list[dict[str, str]] = []
    stamps: list[int] = []
    values: list[float] = []
    rejected: list[tuple[dict[str, Any], str]] = []
    skipped = {"string": 0, "boolean": 0}
    tag_cache: dict[str, dict[str, str]] = {}
    metric_cache: dict[tuple[str, str], str] = {}
    fast_line = _FAST_LINE.fullmatch
    field_value = _FIELD_VALUE.fullmatch

    for line_no, raw in enumerate(text.split("\n"), 1):
        line = raw[:-1] if raw.endswith("\r") else raw
        body = line.lstrip(" \t")
        if not body or body[0] == "#":
            continue
        try:
            match = None if "\\" in body or '"' in body else fast_line(body)
            if match is not None:
                measurement, tag_text, field_text, ts_token = match.groups()
                tags = tag_cache.get(tag_text)
                if tags is None:
                    tags = _fast_tags(tag_text) if tag_text else {}
                    tag_cache[tag_text] = tags
                fields = _fast_fields(field_text)
            else:
                measurement, tags, fields, ts_token = _parse_slow(body)

            if ts_token is None:
                ts = now_us
            elif _INTEGER.fullmatch(ts_token):
                ts = int(ts_token) * multiplier // divisor
                if ts < _US_MIN or ts > _US_MAX:
                    raise _LineError(TIMESTAMP_OUT_OF_RANGE)
            else:
                raise _LineError(MALFORMED_LINE if "=" in ts_token else INVALID_TIMESTAMP)

            line_values: list[tuple[str, float]] = []
            n_strings = n_booleans = 0
            for key, token in fields:
                if token is None:
                    n_strings += 1
                    continue
                parsed = field_value(token)
                if parsed is None:
                    raise _LineError(MALFORMED_LINE)
                kind = parsed.lastindex
                if kind == 1:
                    number = float(token)
                    if number in (float("inf"), float("-inf")):
                        raise _LineError(MALFORMED_LINE)
                elif kind == 2:
                    integer = int(parsed.group(2))
                    if integer < _INT64_MIN or integer > _INT64_MAX:
                        raise _LineError(MALFORMED_LINE)
                    number = float(integer)
                elif kind == 3:
                    integer = int(parsed.group(3))
                    if integer > _UINT64_MAX:
                        raise _LineError(MALFORMED_LINE)
                    number = float(integer)
                else:
                    n_booleans += 1
                    continue
                metric = metric_cache.get((measurement, key))
                if metric is None:
                    metric = measurement if key == "value" else f"{measurement}_{key}"
                    metric_cache[(measurement, key)] = metric
                line_values.append((metric, number))
        except _LineError as error:
            rejected.append(({"line": line, "line_no": line_no}, error.reason))
            continue

        skipped["string"] += n_strings
        skipped["boolean"] += n_booleans
        for metric, number in line_values:
            metrics.append(metric)
            labels.append(tags)
            stamps.append(ts)
            values.append(number)

    return LineProtocolResult(
        frame=sample_frame(metrics, labels, stamps, values),
        rejected=rejected,
        skipped_fields=skipped,
    )
