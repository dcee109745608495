"""Prometheus text exposition format (version 0.0.4) → a metricmill sample frame.

Sample lines are ``name[{label="value",...}] value [timestamp_ms]``; blanks and tabs may separate
the tokens (and surround braces, commas and ``=`` inside the label set; a trailing comma is
allowed). Label values unescape ``\\\\``, ``\\"`` and ``\\n``; any other escape, an invalid
metric or label name, a duplicate label name, an unparseable value or extra tokens reject the
line with ``malformed_line``, as does a ``__name__`` label (the name is the one before the
braces). Values are floats; ``+Inf`` and ``-Inf`` are kept as floats (the storage layer rejects
non-finite values with its own reason), while a ``NaN`` sample (a summary with no observations,
very common) is skipped and counted in ``skipped_nan``, as line protocol skips string fields.
The optional
timestamp is integer milliseconds (non-integer: ``invalid_timestamp``; beyond what
datetime64[us] can hold: ``timestamp_out_of_range``); without one the sample is stamped
``scrape_time``.

``# TYPE name type`` lines fill ``families`` (counter, gauge, histogram, summary, untyped); a
malformed TYPE line, an unknown type, a second TYPE line giving a different type for the same
family, or a TYPE line after samples of its family is rejected with ``malformed_line`` (the
first type is kept; a late one is not recorded). ``# HELP`` and all other
comments are ignored, as are blank lines; CRLF line endings and a leading UTF-8 BOM are accepted.
Histogram and summary series already appear flat in the text (``_bucket`` with ``le``, ``_sum``,
``_count``; ``{quantile=...}``) and are kept as written; ``le="+Inf"`` stays a string label. In
a typed histogram, a ``_bucket`` sample needs an ``le`` that is a float, and bucket and
``_count`` values must not be negative; in a typed summary, a quantile sample needs a
``quantile`` that is a float, and ``_count`` must not be negative. Otherwise the line is
``malformed_line``, as Prometheus refuses such a scrape.

Input may be bytes (what a scrape answered): each line must be UTF-8, and one that is not is
rejected with ``invalid_unicode`` rather than stored with replacement characters.

As in Prometheus, a label with an empty value is the same as no label, so empty-valued labels
are dropped. ``extra_labels`` (target labels such as ``instance`` and ``job``) are then added to
every sample that does not already carry that label.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import pandas as pd

from metricmill.types import Reason, datetime_to_us
from storage.frames import LineRejected, sample_frame

MALFORMED_LINE = Reason.MALFORMED_LINE
INVALID_UNICODE = Reason.INVALID_UNICODE
INVALID_TIMESTAMP = Reason.INVALID_TIMESTAMP
TIMESTAMP_OUT_OF_RANGE = Reason.TIMESTAMP_OUT_OF_RANGE

METRIC_TYPES = frozenset({"counter", "gauge", "histogram", "summary", "untyped"})

# datetime64[us] covers int64 except its minimum, which is NaT.
_US_MIN = -(2**63) + 1
_US_MAX = 2**63 - 1

_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_NAME_AND_BLANKS = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)[ \t]*")
_LABEL_PAIR = re.compile(
    r'[ \t]*([a-zA-Z_][a-zA-Z0-9_]*)[ \t]*=[ \t]*"([^"\\]*(?:\\.[^"\\]*)*)"[ \t]*'
)
_VALUE_AND_TIMESTAMP = re.compile(r"([^ \t]+)(?:[ \t]+([^ \t]+))?[ \t]*")
_ESCAPE = re.compile(r"\\(.)")
_UNESCAPED = {"\\": "\\", '"': '"', "n": "\n"}
_TIMESTAMP = re.compile(r"[+-]?[0-9]+")


@dataclass
class ExpositionResult:
    """Parsed samples, rejected lines with reasons, and metric family types from ``# TYPE``."""

    frame: pd.DataFrame
    rejected: list[tuple[dict[str, Any], str]] = field(default_factory=list)
    families: dict[str, str] = field(default_factory=dict)
    skipped_nan: int = 0


def _unescape_match(match: re.Match[str]) -> str:
    replacement = _UNESCAPED.get(match.group(1))
    if replacement is None:
        raise LineRejected(MALFORMED_LINE)  # only \\, \" and \n are escapes in label values
    return replacement


def _skip_blanks(line: str, i: int) -> int:
    n = len(line)
    while i < n and line[i] in " \t":
        i += 1
    return i


def _parse_sample(line: str) -> tuple[str, dict[str, str], str, str | None]:
    """(metric name, labels, value token, timestamp token or None) of a sample line."""
    head = _NAME_AND_BLANKS.match(line)
    if head is None:
        raise LineRejected(MALFORMED_LINE)
    name = head.group(1)
    i = head.end()
    labels: dict[str, str] = {}
    if line[i : i + 1] == "{":
        i += 1
        while True:
            i = _skip_blanks(line, i)
            if line[i : i + 1] == "}":
                i += 1
                break
            pair = _LABEL_PAIR.match(line, i)
            if pair is None:
                raise LineRejected(MALFORMED_LINE)
            key, raw = pair.groups()
            if key in labels:
                raise LineRejected(MALFORMED_LINE)  # duplicate label name
            labels[key] = _ESCAPE.sub(_unescape_match, raw) if "\\" in raw else raw
            i = pair.end()
            following = line[i : i + 1]
            if following == ",":
                i += 1
            elif following == "}":
                i += 1
                break
            else:
                raise LineRejected(MALFORMED_LINE)
        i = _skip_blanks(line, i)
    elif i == len(name):
        raise LineRejected(MALFORMED_LINE)  # name not followed by a blank or a label set
    tail = _VALUE_AND_TIMESTAMP.fullmatch(line, i)
    if tail is None:
        raise LineRejected(MALFORMED_LINE)  # no value, or more than value and timestamp
    return name, labels, tail.group(1), tail.group(2)


def _parse_value(token: str) -> float:
    # Go's ParseFloat reads NaN, [+-]Inf and decimal/scientific numbers; Python's float() also
    # takes digit-group underscores, which the format does not have.
    if "_" in token:
        raise LineRejected(MALFORMED_LINE)
    try:
        return float(token)
    except ValueError:
        raise LineRejected(MALFORMED_LINE) from None


_FAMILY_SUFFIXES = ("_bucket", "_sum", "_count")


def _check_family(
    name: str, labels: dict[str, str], value: float, families: dict[str, str]
) -> None:
    """The histogram and summary rules for a sample of a typed family (see the module doc)."""
    family, suffix = name, ""
    if name not in families:
        for ending in _FAMILY_SUFFIXES:
            if name.endswith(ending) and name[: -len(ending)] in families:
                family, suffix = name[: -len(ending)], ending
                break
        else:
            return
    kind = families[family]
    if kind == "histogram":
        if suffix == "_bucket":
            bound = labels.get("le")
            if bound is None or not _is_float(bound) or value < 0:
                raise LineRejected(MALFORMED_LINE)
        elif suffix == "_count" and value < 0:
            raise LineRejected(MALFORMED_LINE)
    elif kind == "summary":
        if not suffix:
            quantile = labels.get("quantile")
            if quantile is None or not _is_float(quantile):
                raise LineRejected(MALFORMED_LINE)
        elif suffix == "_count" and value < 0:
            raise LineRejected(MALFORMED_LINE)


def _is_float(text: str) -> bool:
    try:
        _parse_value(text)
    except LineRejected:
        return False
    return True


def _text_lines(source: str | bytes) -> list[str | bytes]:
    """The lines of the page; bytes lines stay bytes until each is decoded on its own."""
    if isinstance(source, bytes):
        if source.startswith(b"\xef\xbb\xbf"):
            source = source[3:]
        return list(source.split(b"\n"))
    if source.startswith("\ufeff"):
        source = source[1:]
    return list(source.split("\n"))


def _read_comment(body: str, families: dict[str, str], sampled: set[str]) -> None:
    """A comment line: a ``# TYPE`` line records its family's type in ``families`` (or is
    rejected: malformed, after samples of its family, or contradicting an earlier one); any
    other comment is ignored."""
    words = body[1:].split(None, 3)
    if not words or words[0] != "TYPE":
        return
    if len(words) != 3 or not _METRIC_NAME.fullmatch(words[1]) or words[2] not in METRIC_TYPES:
        raise LineRejected(MALFORMED_LINE)
    family = words[1]
    if family not in families and (
        family in sampled or any(family + e in sampled for e in _FAMILY_SUFFIXES)
    ):
        raise LineRejected(MALFORMED_LINE)  # a TYPE line after its samples
    if families.setdefault(family, words[2]) != words[2]:
        raise LineRejected(MALFORMED_LINE)  # conflicting second TYPE line


def _timestamp_us(token: str) -> int:
    """A sample's timestamp token (integer milliseconds) in microseconds."""
    if not _TIMESTAMP.fullmatch(token):
        raise LineRejected(INVALID_TIMESTAMP)
    ts = int(token) * 1000
    if ts < _US_MIN or ts > _US_MAX:
        raise LineRejected(TIMESTAMP_OUT_OF_RANGE)
    return ts


def parse_exposition(
    text: str | bytes, *, scrape_time: datetime, extra_labels: dict[str, str] | None = None
) -> ExpositionResult:
    """Parse exposition text; bad lines come back in ``rejected`` with a reason code.

    Rejected entries are ``({"line": <text without line ending>, "line_no": <1-based>}, reason)``
    with reason ``malformed_line``, ``invalid_unicode``, ``invalid_timestamp`` or
    ``timestamp_out_of_range``. ``scrape_time`` may be naive (taken as UTC).
    """
    scrape_us = datetime_to_us(scrape_time)
    extra = {k: v for k, v in (extra_labels or {}).items() if v != ""}

    metrics: list[str] = []
    labels: list[dict[str, str]] = []
    stamps: list[int] = []
    values: list[float] = []
    rejected: list[tuple[dict[str, Any], str]] = []
    families: dict[str, str] = {}
    sampled: set[str] = set()  # names of the samples seen so far
    skipped_nan = 0

    for line_no, source in enumerate(_text_lines(text), 1):
        if isinstance(source, bytes):
            try:
                raw = source.decode("utf-8")
            except UnicodeDecodeError:
                shown = source.decode("utf-8", "backslashreplace").removesuffix("\r")
                rejected.append(({"line": shown, "line_no": line_no}, INVALID_UNICODE))
                continue
        else:
            raw = source
        line = raw[:-1] if raw[-1:] == "\r" else raw
        body = line.strip(" \t")
        if not body:
            continue
        try:
            if body[0] == "#":
                _read_comment(body, families, sampled)
                continue

            name, sample_labels, value_token, ts_token = _parse_sample(body)
            if "__name__" in sample_labels:
                raise LineRejected(MALFORMED_LINE)
            value = _parse_value(value_token)
            sampled.add(name)
            if value != value:  # NaN
                skipped_nan += 1
                continue
            if families:
                _check_family(name, sample_labels, value, families)
            ts = scrape_us if ts_token is None else _timestamp_us(ts_token)
        except LineRejected as error:
            rejected.append(({"line": line, "line_no": line_no}, error.reason))
            continue

        if "" in sample_labels.values():
            sample_labels = {k: v for k, v in sample_labels.items() if v != ""}
        for key, extra_value in extra.items():
            sample_labels.setdefault(key, extra_value)
        metrics.append(name)
        labels.append(sample_labels)
        stamps.append(ts)
        values.append(value)

    return ExpositionResult(
        frame=sample_frame(metrics, labels, stamps, values),
        rejected=rejected,
        families=families,
        skipped_nan=skipped_nan,
    )
