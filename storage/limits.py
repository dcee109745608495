"""Bounds on what one landed file may make a reader do, checked while the bytes stream in.

A hostile or broken file (a gzip bomb, a line of a gigabyte, labels nested thousands deep, a
million labels on a row, millions of junk lines) must cost a bounded amount of memory and
time, then end in quarantine with a reason code, never as a RecursionError or an
out-of-memory kill. Each bound is a setting (see README, "Limits"); every breach raises
`UnreadableFile` with its own reason.
"""

from __future__ import annotations

import io
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from metricmill.errors import MetricmillError

if TYPE_CHECKING:
    from metricmill.settings import Settings

_CHUNK = 1 << 22  # bytes decompressed (or read) per step: the most held beyond the output


class FileReason:
    """Reason codes of whole files a reader refuses (the quarantine `.reason` file's line)."""

    UNREADABLE_FILE = "unreadable_file"
    TOO_LARGE = "too_large"
    LINE_TOO_LONG = "line_too_long"
    TOO_DEEP = "too_deep"
    TOO_MANY_LABELS = "too_many_labels"
    TOO_MANY_BAD_LINES = "too_many_bad_lines"


class UnreadableFile(MetricmillError):
    """A file is not samples in a format metricmill reads, or cannot be decoded at all.

    `reason` is the quarantine reason code the ingest flow files it under (the `.reason` file's
    first line); a reader that knows better (a size or depth bound) passes its own.
    """

    def __init__(self, message: str, *, reason: str = FileReason.UNREADABLE_FILE) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class ReadLimits:
    """What one file may hold; the defaults are the settings' defaults."""

    max_file_bytes: int = 1 << 30  # decompressed
    max_line_bytes: int = 1 << 20
    max_nesting_depth: int = 32
    max_row_labels: int = 1000
    max_bad_lines: int = 10_000

    @classmethod
    def from_settings(cls, settings: Settings) -> ReadLimits:
        return cls(
            max_file_bytes=settings.max_file_bytes,
            max_line_bytes=settings.max_line_bytes,
            max_nesting_depth=settings.max_nesting_depth,
            max_row_labels=settings.max_row_labels,
            max_bad_lines=settings.max_bad_lines,
        )


DEFAULT_LIMITS = ReadLimits()


class _LineGuard:
    """Fails as soon as the bytes seen so far hold a line longer than the bound."""

    def __init__(self, name: str, limit: int) -> None:
        self.name, self.limit, self.run = name, limit, 0

    def feed(self, chunk: bytes | memoryview) -> None:
        block = bytes(chunk) if isinstance(chunk, memoryview) else chunk
        first = block.find(b"\n")
        if first < 0:
            self.run += len(block)
        else:
            last = block.rfind(b"\n")
            if self.run + first > self.limit:
                self._fail()
            if last - first - 1 > self.limit:  # a longer line may sit between the two
                self._check_inside(block, first + 1, last)
            self.run = len(block) - last - 1
        if self.run > self.limit:
            self._fail()

    def _check_inside(self, block: bytes, start: int, stop: int) -> None:
        """Any line in block[start:stop] (whole lines) longer than the bound, found without
        splitting: a line longer than the bound holds a whole window of half its length free
        of newlines, so windows of that size are probed with find, and only a free one is
        measured exactly."""
        stride = max(self.limit // 2, 1)
        at = start
        while at < stop:
            end = min(at + stride, stop)
            if end - at == stride and block.find(b"\n", at, end) < 0:
                begin = block.rfind(b"\n", start - 1, at) + 1
                finish = block.find(b"\n", end, stop + 1)
                if finish - begin > self.limit:
                    self._fail()
                at = finish + 1
            else:
                at = end

    def _fail(self) -> None:
        raise UnreadableFile(
            f"{self.name}: a line is longer than {self.limit} bytes (METRICMILL_MAX_LINE_BYTES)",
            reason=FileReason.LINE_TOO_LONG,
        )


def _too_large(name: str, limit: int) -> UnreadableFile:
    return UnreadableFile(
        f"{name}: more than {limit} bytes decompressed (METRICMILL_MAX_FILE_BYTES)",
        reason=FileReason.TOO_LARGE,
    )


def _gunzip(name: str, source: IO[bytes]) -> Iterator[bytes]:
    """Decompressed blocks of at most _CHUNK bytes, however well the input compresses;
    concatenated gzip members are read one after the other, as gzip(1) does."""
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    pending = b""
    started = False
    try:
        while True:
            if not pending:
                pending = source.read(_CHUNK)
                if not pending:
                    break
            started = True
            block = inflater.decompress(pending, _CHUNK)
            pending = inflater.unconsumed_tail
            if block:
                yield block
            if inflater.eof:
                rest = inflater.unused_data + pending
                pending = rest.lstrip(b"\x00")  # padding after the last member is allowed
                inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
                started = False
        if started:
            tail = inflater.flush()
            if tail:
                yield tail
            if not inflater.eof:
                raise UnreadableFile(f"{name}: cannot decode file: truncated gzip stream")
    except zlib.error as exc:
        raise UnreadableFile(f"{name}: cannot decode file: not gzip ({exc})") from None


def read_bounded(path: Path, data: bytes | None, limits: ReadLimits) -> bytes:
    """The file's content (gunzipped for a .gz name), read within the size and line bounds.

    `data` is the file's bytes when the caller has them already."""
    name = path.name
    gzipped = path.suffix.lower() == ".gz"
    guard = _LineGuard(name, limits.max_line_bytes)
    if data is not None and not gzipped:
        if len(data) > limits.max_file_bytes:
            raise _too_large(name, limits.max_file_bytes)
        view = memoryview(data)
        for start in range(0, len(data), _CHUNK):
            guard.feed(view[start : start + _CHUNK])
        return data
    if not gzipped and path.stat().st_size > limits.max_file_bytes:
        raise _too_large(name, limits.max_file_bytes)
    output = io.BytesIO()
    with io.BytesIO(data) if data is not None else path.open("rb") as source:
        blocks = _gunzip(name, source) if gzipped else iter(lambda: source.read(_CHUNK), b"")
        for block in blocks:
            if output.tell() + len(block) > limits.max_file_bytes:
                raise _too_large(name, limits.max_file_bytes)
            guard.feed(block)
            output.write(block)
    return output.getvalue()


_STRUCTURE = re.compile(rb'[\[\]{}"\\]')


def nesting_depth(line: bytes) -> int:
    """How deep JSON text nests arrays and objects (brackets inside strings do not count)."""
    depth = deepest = 0
    in_string = False
    skip_to = -1
    for found in _STRUCTURE.finditer(line):
        at = found.start()
        if at < skip_to:
            continue  # the character after a backslash
        char = line[at]
        if in_string:
            if char == 0x5C:  # backslash
                skip_to = at + 2
            elif char == 0x22:
                in_string = False
        elif char == 0x22:
            in_string = True
        elif char in (0x5B, 0x7B):
            depth += 1
            deepest = max(deepest, depth)
        elif char in (0x5D, 0x7D):
            depth -= 1
    return deepest


def check_depth(name: str, line: bytes, limits: ReadLimits) -> None:
    """UnreadableFile (too_deep) if the JSON text nests deeper than the bound; cheap when it
    holds fewer brackets than the bound allows."""
    limit = limits.max_nesting_depth
    if line.count(b"[") + line.count(b"{") <= limit or nesting_depth(line) <= limit:
        return
    raise UnreadableFile(
        f"{name}: JSON nested deeper than {limit} levels (METRICMILL_MAX_NESTING_DEPTH)",
        reason=FileReason.TOO_DEEP,
    )


def too_many_labels(name: str, count: int, limits: ReadLimits) -> UnreadableFile:
    return UnreadableFile(
        f"{name}: a row has {count} labels, more than {limits.max_row_labels} "
        "(METRICMILL_MAX_ROW_LABELS)",
        reason=FileReason.TOO_MANY_LABELS,
    )


# The text of rejected lines kept for the quarantine table, per file, at most.
BAD_LINE_BYTES = 64 << 20


class BadLines:
    """Lines a reader rejects, up to the bound; past it the file is refused as a whole."""

    def __init__(self, name: str, limits: ReadLimits) -> None:
        self.name, self.limit = name, limits.max_bad_lines
        self.rows: list[tuple[dict[str, Any], str]] = []
        self.size = 0

    def add(self, row: dict[str, Any], reason: str, size: int) -> None:
        self.rows.append((row, reason))
        self.size += size
        if len(self.rows) > self.limit or self.size > BAD_LINE_BYTES:
            raise UnreadableFile(
                f"{self.name}: more than {self.limit} lines cannot be read "
                "(METRICMILL_MAX_BAD_LINES)",
                reason=FileReason.TOO_MANY_BAD_LINES,
            )
