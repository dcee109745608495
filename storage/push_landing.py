"""Pushed samples made durable as landing files: the receiver's only write.

A request's samples become one NDJSON file (the landing format the ingest flow reads fastest:
`{"metric", "labels", "ts", "value"}` per line, ts as ISO 8601 with microseconds, so no unit has
to be guessed). It is written under a hidden `.tmp` name, fsynced, renamed to its final name and
the directory fsynced: once `land_batch` returns, the file survives a crash of the receiver or
of the machine, and the ingest flow takes it like any dropped file.

The bytes depend only on the request, and the file is named after their SHA-256: a sender's
retry of the same body is the same file, which the ingest flow's ledger reports as a replay and
writes nothing for.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import orjson

from storage.locks import pid_alive

TEMP_PREFIX = ".receive-"
_FINAL_PREFIX = "push-"
# Years 1 to 9999 render as ISO 8601; instants beyond are outside storage's range anyway.
_MIN_US = -62_135_596_800_000_000
_MAX_US = 253_402_300_799_999_999


@dataclass
class SeriesPoints:
    """Samples of one series: metric, labels (read-only, may be shared), µs times, values."""

    metric: str
    labels: dict[str, str]
    ts_us: Sequence[int]
    values: Sequence[float]


@dataclass
class PushBatch:
    """What one request carried, ready to land.

    `rejected` are texts that could not be decoded as samples (a malformed line protocol line,
    with its reason); they are landed too, as lines that are not JSON objects, so the ingest
    flow quarantines each one as `malformed_line` with its text. `ignored` counts what the
    format carries but metricmill does not store (exemplars, metadata, staleness markers...).
    """

    source: str
    series: list[SeriesPoints] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    ignored: dict[str, int] = field(default_factory=dict)

    @property
    def samples(self) -> int:
        return sum(len(s.values) for s in self.series)

    def ignore(self, what: str, count: int = 1) -> None:
        if count:
            self.ignored[what] = self.ignored.get(what, 0) + count


def _number(value: float) -> str:
    if value - value == 0:  # finite
        return repr(value)
    # Not JSON, but the ingest flow's reader takes these literals: the row is quarantined as
    # non_finite_value instead of vanishing.
    return "NaN" if value != value else ("Infinity" if value > 0 else "-Infinity")


def _iso_times(stamps: set[int]) -> dict[int, str]:
    """ISO 8601 text (µs, Z) of each distinct instant; pushed series mostly share their times."""
    usable = [t for t in stamps if _MIN_US <= t <= _MAX_US]
    texts = np.datetime_as_string(np.array(usable, dtype="datetime64[us]"), unit="us")
    iso = {t: f"{text}Z" for t, text in zip(usable, texts.tolist(), strict=True)}
    for t in stamps:
        if t not in iso:
            iso[t] = f"{t}us"  # stays visible in quarantine (invalid_timestamp)
    return iso


def ndjson_bytes(batch: PushBatch) -> bytes:
    """The batch as landing-file bytes: the same batch gives the same bytes."""
    iso = _iso_times(set().union(*(s.ts_us for s in batch.series))) if batch.series else {}
    dumps = orjson.dumps
    number = _number
    lines: list[str] = []
    extend = lines.extend
    for series in batch.series:
        head = (
            b'{"metric":'
            + dumps(series.metric)
            + b',"labels":'
            + dumps(series.labels, option=orjson.OPT_SORT_KEYS)
            + b',"ts":"'
        ).decode()
        extend(
            f'{head}{iso[ts]}","value":{number(v)}}}'
            for ts, v in zip(series.ts_us, series.values, strict=True)
        )
    lines.extend(dumps(text).decode() for text in batch.rejected)
    return ("\n".join(lines) + "\n").encode("utf-8") if lines else b""


@dataclass(frozen=True)
class Landed:
    """A landed file: its path and how many bytes it holds."""

    path: Path
    size: int


def land_batch(batch: PushBatch, landing: Path) -> Landed | None:
    """Write the batch durably into `landing` (None when it holds nothing to land)."""
    data = ndjson_bytes(batch)
    if not data:
        return None
    digest = hashlib.sha256(data).hexdigest()[:32]
    final = landing / f"{_FINAL_PREFIX}{batch.source}-{digest}.ndjson"
    temp = landing / f"{TEMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex}.tmp"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        temp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.rename(temp, final)  # atomic: the ingest flow never sees half a file
    _fsync_directory(landing)
    return Landed(final, len(data))


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_temp_files(landing: Path) -> int:
    """Delete temp files of receivers that died mid-write (never acknowledged); their count."""
    removed = 0
    for path in landing.glob(f"{TEMP_PREFIX}*.tmp"):
        pid_text = path.name[len(TEMP_PREFIX) :].split("-", 1)[0]
        if pid_text.isdigit() and not pid_alive(int(pid_text)):
            path.unlink(missing_ok=True)
            removed += 1
    return removed


@dataclass(frozen=True)
class Backlog:
    """Files waiting in the landing directory (and in claims not yet finished), and bytes."""

    files: int
    bytes: int


def _waiting(paths: Iterable[os.DirEntry[str]]) -> Iterable[os.DirEntry[str]]:
    for entry in paths:
        if entry.name.startswith(".") or not entry.is_file(follow_symlinks=False):
            continue
        yield entry


def landing_backlog(landing: Path) -> Backlog:
    """What the ingest flow has yet to take: landing/ and landing/processing/<claim>/ files."""
    files = size = 0
    directories = [landing]
    processing = landing / "processing"
    with contextlib.suppress(FileNotFoundError):
        directories += [Path(e.path) for e in os.scandir(processing) if e.is_dir()]
    for directory in directories:
        try:
            entries = list(os.scandir(directory))
        except FileNotFoundError:
            continue
        for entry in _waiting(entries):
            try:
                size += entry.stat(follow_symlinks=False).st_size
            except FileNotFoundError:
                continue  # taken by a run meanwhile
            files += 1
    return Backlog(files, size)


class BacklogGauge:
    """`landing_backlog`, measured at most every `interval` seconds, plus bytes landed since."""

    def __init__(self, landing: Path, *, interval: float = 1.0) -> None:
        self._landing = landing
        self._interval = interval
        self._measured_at = -math.inf
        self._backlog = Backlog(0, 0)
        self._since = 0

    def current(self) -> int:
        now = time.monotonic()
        if now - self._measured_at >= self._interval:
            self._backlog = landing_backlog(self._landing)
            self._measured_at = now
            self._since = 0
        return self._backlog.bytes + self._since

    def add(self, size: int) -> None:
        self._since += size
