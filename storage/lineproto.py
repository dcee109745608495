"""InfluxDB line protocol → a metricmill sample frame (metric, labels, ts, value).

Grammar: ``measurement[,tag=value...] field=value[,field=value...] [timestamp]``.

* Each numeric field becomes one sample: metric ``<measurement>_<field>``, or just
  ``<measurement>`` when the field key is exactly ``value``. Tags become labels.
* Escapes: in the measurement ``\\,`` and ``\\ ``; in tag keys, tag values and field keys ``\\,``,
  ``\\=`` and ``\\ ``. As InfluxDB parses it, a backslash before any other character (a second
  backslash included) is kept as a literal backslash: ``\\\\`` stays two backslashes, and
  ``\\\\ east`` is a backslash then an escaped space (``\\ east``).
* Measurement, tag keys, tag values and field keys must be printable: a control character
  (C0, DEL, C1; tab and vertical tab included) rejects the line, as InfluxDB does.
* A double-quoted string field may hold a newline: the point runs on to its closing quote (a
  quote in the measurement or tags is literal and opens nothing). A string never closed makes
  its own line malformed, and the lines after it are read as usual.
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
  ``now``, truncated to ``precision`` (as InfluxDB stamps such points). Out-of-range instants
  (before 1970, from 2262 on) are passed through for the storage
  layer to reject; only instants that datetime64[us] cannot represent at all are rejected here
  (``timestamp_out_of_range``). A non-integer timestamp is ``invalid_timestamp``.
* Blank lines and comment lines (first non-blank character ``#``) are ignored; CRLF line endings
  and a leading UTF-8 BOM are accepted.

Rows with identical tag sets share one labels dict object (it lets the storage layer canonicalise
each label set once); treat the dicts as read-only.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pandas as pd

from metricmill.types import Reason, datetime_to_us
from storage.frames import LineRejected, sample_frame
from storage.limits import FileReason, UnreadableFile

MALFORMED_LINE = Reason.MALFORMED_LINE
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

_BOOLEANS = frozenset(("t", "T", "true", "True", "TRUE", "f", "F", "false", "False", "FALSE"))
_FLOAT_FIRST = "-.0123456789"
_FLOAT_LAST = ".0123456789"
_INF = float("inf")

# (characters a backslash escapes, next stop-or-backslash finder) per element
_Element = tuple[str, Callable[[str, int], re.Match[str] | None]]
_MEASUREMENT: _Element = (", ", re.compile(r"[, \\]").search)
_KEY: _Element = (",= ", re.compile(r"[,= \\]").search)
# Not printable (Go's unicode.IsPrint is false): C0 controls, DEL and C1 controls.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]").search
_STRING_SPECIAL = re.compile(r'["\\]').search
_VALUE_END = re.compile(r"[, ]").search


@dataclass
class LineProtocolResult:
    """Parsed samples, rejected lines with reasons, and counts of skipped non-numeric fields."""

    frame: pd.DataFrame
    rejected: list[tuple[dict[str, Any], str]] = field(default_factory=list)
    skipped_fields: dict[str, int] = field(default_factory=lambda: {"string": 0, "boolean": 0})


def _scan(line: str, i: int, element: _Element) -> tuple[str, int]:
    """Unescape from ``i`` up to the element's first unescaped stop character (or the end)."""
    escapes, special = element
    parts: list[str] = []
    while True:
        found = special(line, i)
        if found is None:
            parts.append(line[i:])
            return "".join(parts), len(line)
        j = found.start()
        if line[j] != "\\":
            parts.append(line[i:j])
            return "".join(parts), j
        following = line[j + 1 : j + 2]
        if following and following in escapes:
            parts.append(line[i:j])
            parts.append(following)
            i = j + 2
        else:  # a backslash before anything else is literal
            parts.append(line[i : j + 1])
            i = j + 1


def _parse_slow(
    line: str,
) -> tuple[str, dict[str, str], list[tuple[str, str, str | None]], str | None]:
    """(measurement, tags, [(field key, "=", raw value or None for a string)], timestamp token)."""
    n = len(line)
    measurement, i = _scan(line, 0, _MEASUREMENT)
    if not measurement:
        raise LineRejected(MALFORMED_LINE)
    tags: dict[str, str] = {}
    while i < n and line[i] == ",":
        key, i = _scan(line, i + 1, _KEY)
        if not key or i >= n or line[i] != "=":
            raise LineRejected(MALFORMED_LINE)
        value, i = _scan(line, i + 1, _KEY)
        if not value or (i < n and line[i] == "=") or key in tags:
            raise LineRejected(MALFORMED_LINE)
        tags[key] = value
    while i < n and line[i] == " ":
        i += 1
    if i >= n:
        raise LineRejected(MALFORMED_LINE)  # no field set

    fields: list[tuple[str, str, str | None]] = []
    while True:
        key, i = _scan(line, i, _KEY)
        if not key or i >= n or line[i] != "=":
            raise LineRejected(MALFORMED_LINE)
        i += 1
        if i < n and line[i] == '"':
            j = i + 1
            while True:
                found = _STRING_SPECIAL(line, j)
                if found is None:
                    raise LineRejected(MALFORMED_LINE)  # unterminated string
                j = found.start()
                if line[j] == '"':
                    break
                j += 2  # a backslash and the character it escapes (or keeps)
            fields.append((key, "=", None))
            i = j + 1
        else:
            found = _VALUE_END(line, i)
            j = n if found is None else found.start()
            if j == i:
                raise LineRejected(MALFORMED_LINE)
            fields.append((key, "=", line[i:j]))
            i = j
        if i >= n:
            return measurement, tags, fields, None
        if line[i] == ",":
            i += 1
            continue
        if line[i] == " ":
            break
        raise LineRejected(MALFORMED_LINE)  # junk after a closing quote

    while i < n and line[i] == " ":
        i += 1
    if i >= n:
        return measurement, tags, fields, None
    end = line.find(" ", i)
    if end == -1:
        return measurement, tags, fields, line[i:]
    if line[end:].strip(" "):
        raise LineRejected(MALFORMED_LINE)  # a fourth section
    return measurement, tags, fields, line[i:end]


def _field_set_start(line: str) -> int:
    """Where the field set begins: after the first unescaped space past the measurement."""
    n = len(line)
    i = 0
    while i < n and line[i] in " \t":
        i += 1
    while i < n and line[i] != " ":  # measurement and tags: a backslash escapes one character
        i += 2 if line[i] == "\\" else 1
    return i


def _inside_string(text: str, start: int, in_string: bool) -> bool:
    """Whether a double-quoted string is open at the end of text[start:]."""
    n = len(text)
    i = start
    while i < n:
        char = text[i]
        if in_string and char == "\\":
            i += 2
            continue
        if char == '"':
            in_string = not in_string
        i += 1
    return in_string


# A string field may run over newlines for this many characters at most.
_MAX_STRING_SPAN = 1 << 20


def _logical_lines(text: str) -> Iterator[tuple[int, str]]:
    """(first line number, line) for each point, a newline inside a string field kept."""
    physical = text.split("\n")
    if '"' not in text:
        yield from enumerate(physical, 1)
        return
    number, total = 0, len(physical)
    while number < total:
        first = number
        line = physical[number]
        number += 1
        if '"' in line and _inside_string(line, _field_set_start(line), False):
            pieces, ahead, span = [line], number, len(line)
            while ahead < total and span <= _MAX_STRING_SPAN:
                following = physical[ahead]
                pieces.append(following)
                ahead += 1
                span += len(following) + 1
                if not _inside_string(following, 0, True):
                    line, number = "\n".join(pieces), ahead
                    break
            # never closed: this line alone is malformed, and the next ones are read as lines
        yield first + 1, line


def _check_printable(measurement: str, tags: dict[str, str], keys: list[str]) -> None:
    if (
        _CONTROL(measurement)
        or any(_CONTROL(k) or _CONTROL(v) for k, v in tags.items())
        or any(_CONTROL(k) for k in keys)
    ):
        raise LineRejected(MALFORMED_LINE)


def _parse_head(head: str) -> tuple[str, dict[str, str]] | None:
    """Measurement and tags of an escape-free series head (``cpu,host=a``); None if not plain."""
    items = head.split(",")
    measurement = items[0]
    if not measurement or measurement[0] in "#\t":  # comment, or leading blank (stripped)
        return None
    tags: dict[str, str] = {}
    for item in items[1:]:
        key, _, value = item.partition("=")
        if not key or not value or "=" in value:
            return None
        tags[key] = value
    if len(tags) != len(items) - 1:
        return None  # duplicate tag key
    return measurement, tags


def _field_number(token: str) -> float | None:
    """An integer (``12i``) or unsigned (``7u``) field as float, None for a boolean; else raises."""
    suffix = token[-1:]
    if suffix == "i" or suffix == "u":
        digits = token[:-1]
        unsigned_digits = digits[1:] if suffix == "i" and digits[:1] == "-" else digits
        if unsigned_digits.isascii() and unsigned_digits.isdigit():
            integer = int(digits)
            low, high = (_INT64_MIN, _INT64_MAX) if suffix == "i" else (0, _UINT64_MAX)
            if low <= integer <= high:
                return float(integer)
        raise LineRejected(MALFORMED_LINE)
    if token in _BOOLEANS:
        return None
    raise LineRejected(MALFORMED_LINE)


def parse_line_protocol(
    text: str,
    *,
    precision: str = "ns",
    now: datetime | None = None,
    max_bad_lines: int | None = None,
) -> LineProtocolResult:
    """Parse line protocol text; bad lines come back in ``rejected`` with a reason code.

    Rejected entries are ``({"line": <text without line ending>, "line_no": <1-based>}, reason)``
    with reason ``malformed_line``, ``invalid_timestamp`` or ``timestamp_out_of_range``. More
    than ``max_bad_lines`` of them raise UnreadableFile (``too_many_bad_lines``).

    Long on purpose: the loop body runs once per line on the receiver's hot path, with the
    list appends bound to locals; splitting it into per-line or per-field helpers costs a
    call each and was measurably slower on benchmarks/receive.py. Its steps are marked: the
    escape-free fast path with the cached series head, the general parser, the fields, the
    timestamp, and the all-or-nothing rejection of a line.
    """
    if precision not in _PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(_PRECISIONS)}, not {precision!r}")
    multiplier, divisor = _PRECISIONS[precision]
    now_us = datetime_to_us(now if now is not None else datetime.now(UTC))
    now_us -= now_us % multiplier  # "now" at the precision's resolution
    if text.startswith("\ufeff"):
        text = text[1:]

    metrics: list[str] = []
    labels: list[dict[str, str]] = []
    stamps: list[int] = []
    values: list[float] = []
    rejected: list[tuple[dict[str, Any], str]] = []
    n_strings = n_booleans = 0
    # series head text -> (measurement, tags, field key -> metric name); None: not escape-free
    head_cache: dict[str, tuple[str, dict[str, str], dict[str, str]] | None] = {}
    metric_names: dict[str, dict[str, str]] = {}  # measurement -> field key -> metric name
    add_metric, add_labels, add_stamp, add_value = (
        metrics.append,
        labels.append,
        stamps.append,
        values.append,
    )

    for line_no, raw in _logical_lines(text):
        line = raw[:-1] if raw[-1:] == "\r" else raw
        mark = len(values)
        try:
            fields: tuple[tuple[str, str, str | None], ...] | list[tuple[str, str, str | None]]
            # Fast path: nothing escaped or quoted, single spaces between the sections.
            parts = line.split(" ")
            n_parts = len(parts)
            series = None
            if (
                1 < n_parts < 4
                and parts[1]
                and "\\" not in line
                and '"' not in line
                and not _CONTROL(line)
            ):
                head = parts[0]
                series = head_cache.get(head)
                if series is None and head not in head_cache:
                    plain = _parse_head(head)
                    if plain is not None:
                        names = metric_names.setdefault(plain[0], {})
                        series = (plain[0], plain[1], names)
                    head_cache[head] = series
            if series is not None:
                measurement, tags, names = series
                field_text = parts[1]
                if "," in field_text:
                    fields = [item.partition("=") for item in field_text.split(",")]
                else:
                    fields = (field_text.partition("="),)
                ts_token = parts[2] if n_parts == 3 and parts[2] else None
            else:
                body = line.lstrip(" \t")
                if not body or body[0] == "#":
                    continue
                measurement, tags, fields, ts_token = _parse_slow(body)
                _check_printable(measurement, tags, [key for key, _, _ in fields])
                names = metric_names.setdefault(measurement, {})

            line_strings = line_booleans = 0
            for key, sep, token in fields:
                if not key or not sep:
                    raise LineRejected(MALFORMED_LINE)
                if token is None:
                    line_strings += 1
                    continue
                if (
                    token[-1:] in _FLOAT_LAST
                    and token[:1] in _FLOAT_FIRST
                    and token.isascii()
                    and "_" not in token
                ):
                    # float syntax; with these first/last characters Python's float() agrees
                    try:
                        number = float(token)
                    except ValueError:
                        raise LineRejected(MALFORMED_LINE) from None
                    if number in (_INF, -_INF):
                        raise LineRejected(MALFORMED_LINE)  # overflow: no infinity in the protocol
                else:
                    integral = _field_number(token)  # integer, unsigned, boolean or invalid
                    if integral is None:
                        line_booleans += 1
                        continue
                    number = integral
                metric = names.get(key)
                if metric is None:
                    metric = names[key] = measurement if key == "value" else f"{measurement}_{key}"
                add_metric(metric)
                add_labels(tags)
                add_value(number)

            if ts_token is None:
                ts = now_us
            elif ts_token.isascii() and (
                ts_token.isdigit() or (ts_token[0] == "-" and ts_token[1:].isdigit())
            ):
                ts = int(ts_token) * multiplier // divisor
                if ts < _US_MIN or ts > _US_MAX:
                    raise LineRejected(TIMESTAMP_OUT_OF_RANGE)
            else:
                raise LineRejected(MALFORMED_LINE if "=" in ts_token else INVALID_TIMESTAMP)
            added = len(values) - mark
            if added == 1:
                add_stamp(ts)
            elif added:
                stamps.extend([ts] * added)
        except LineRejected as error:
            if len(values) > mark:  # the line is rejected as a whole
                del metrics[mark:], labels[mark:], stamps[mark:], values[mark:]
            rejected.append(({"line": line, "line_no": line_no}, error.reason))
            if max_bad_lines is not None and len(rejected) > max_bad_lines:
                raise UnreadableFile(
                    f"more than {max_bad_lines} lines cannot be read (METRICMILL_MAX_BAD_LINES)",
                    reason=FileReason.TOO_MANY_BAD_LINES,
                ) from None
            continue
        n_strings += line_strings
        n_booleans += line_booleans

    return LineProtocolResult(
        frame=sample_frame(metrics, labels, stamps, values),
        rejected=rejected,
        skipped_fields={"string": n_strings, "boolean": n_booleans},
    )
