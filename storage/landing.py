"""The landing directory: ordered, atomic claims that survive kill -9, then done/ or quarantine/.

A run claims files by renaming them into `processing/<claim>/`, a directory whose `.lock`
the run holds with flock for as long as it lives. A claim whose lock can be taken belongs to
a dead run: the next run adopts it whole (directory, lock and all). Exactly-once is the
ledger's job (file hash as batch id); this module makes sure every file is processed by one
live run at a time, in landing order, and ends in done/ or quarantine/.

Landing order, the order in which files are written (a later file wins a (series, ts) that
an earlier one also holds): files claimed by an earlier run come first, claim by claim in the
order the claims were made; within a claim, by modification time, then name. Only one run at
a time claims from a landing directory (it holds `processing/.lock`): a second run finds it busy
and takes no file, so files landed later can never be written before files claimed earlier.

Parallel runs (`claim_files(..., parallel=N)`, N > 1: `ingest_max_parallel_runs` on a
PostgreSQL server): a run holds `processing/.lock` only while it claims, and takes its share of
the settled files, `ceil(ready / (N - runs holding claims now))` of them (at most `limit`), in
landing order; it comes back for more when it is done with them. Runs then write side by side:
landing order holds within a run's claim, not between the claims of different runs (see
DESIGN.md, "Parallel ingest").

Each claim keeps `.attempts` (JSON: file name -> runs that died while decoding it): a file that
keeps killing the runs that take it up can be set aside instead of blocking the files behind it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import stat
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

from metricmill.errors import MetricmillError

IN_PROGRESS_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload")
_ATTEMPTS = ".attempts"
_CLAIMS_LOCK = ".lock"  # processing/.lock: held by the run claiming from this landing


class LandingError(MetricmillError):
    """The landing tree is not usable as it is (a directory that is a symlink, say)."""


REASON_SUFFIX = ".reason"  # beside a quarantined file: its reason code, then the detail


def real_directory(path: Path) -> Path:
    """`path` as a directory of its own (created if missing): never a symlink to elsewhere."""
    with contextlib.suppress(FileExistsError):  # a file or a link there: told below
        path.mkdir(parents=True, exist_ok=True)
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode):
        kind = "a symlink" if stat.S_ISLNK(info.st_mode) else "not a directory"
        raise LandingError(f"{path} is {kind}; it must be a real directory")
    return path


@dataclass
class Claim:
    """The claim directories this process owns until release(): its own and adopted ones.

    `files` are in landing order. `busy` is True when another run holds the landing directory
    (this claim then holds no file)."""

    directories: list[Path] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    busy: bool = False
    _locks: list[IO[bytes]] = field(default_factory=list)

    def release(self) -> None:
        """Drop the claim; files still in it (a failed step) are adopted by the next run."""
        for directory in self.directories:
            _remove_if_empty(directory)
        for handle in reversed(self._locks):
            handle.close()
        self._locks = []


_attempts_guard = threading.Lock()  # the run's task threads update one claim's counts


# The key under which a file's clearance is kept: file names never hold a "/".
_CLEARED = "/cleared"


def attempts(path: Path) -> int:
    """How many runs died while decoding this claimed file (since it was last cleared)."""
    return int(_read_attempts(path.parent).get(path.name, 0))


def attempts_in(directory: Path) -> dict[str, int]:
    """`attempts` of every file of a claim directory that has any, by name (one read)."""
    return {
        name: n
        for name, n in _read_attempts(directory).items()
        if not name.endswith(_CLEARED) and isinstance(n, int) and n > 0
    }


def cleared(path: Path) -> bool:
    """Whether a separate process decoded this file after runs kept dying on it."""
    return bool(_read_attempts(path.parent).get(path.name + _CLEARED, 0))


def clear_attempts(path: Path) -> None:
    """A separate process decoded the file: the runs that died on it did not die of it. Its
    count starts again, and the clearance is kept (a file cleared once is not retried alone
    twice)."""
    with _attempts_guard:
        counts = _read_attempts(path.parent)
        counts.pop(path.name, None)
        counts[path.name + _CLEARED] = 1
        _write_attempts(path.parent, counts)


def count_attempt(paths: list[Path], step: int = 1) -> None:
    """Count one more attempt at these claimed files (`step=-1`: take it back once the attempt
    ended). Counts live in the claim directory, so they go with the files when a run adopts it."""
    with _attempts_guard:
        for directory in {p.parent for p in paths}:
            counts = _read_attempts(directory)
            for path in paths:
                if path.parent == directory:
                    count = int(counts.pop(path.name, 0)) + step
                    if count > 0:  # a file at 0 leaves the list: it stays as short as the
                        counts[path.name] = count  # files being decoded and the poison ones
            _write_attempts(directory, counts)


def _read_attempts(directory: Path) -> dict[str, int]:
    try:
        data = json.loads((directory / _ATTEMPTS).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_attempts(directory: Path, counts: dict[str, int]) -> None:
    alive = {name: n for name, n in counts.items() if (directory / name.split("/")[0]).exists()}
    temporary = directory / f"{_ATTEMPTS}.{uuid.uuid4().hex[:8]}"
    temporary.write_text(json.dumps(alive), encoding="utf-8")
    os.replace(temporary, directory / _ATTEMPTS)


_BOOKKEEPING = frozenset((".lock", _ATTEMPTS))


def _remove_if_empty(directory: Path) -> None:
    """Remove a claim directory holding nothing but its bookkeeping (dot files: a landed file
    starting with a dot is never claimed); tolerate a racing remover."""
    try:
        entries = list(directory.iterdir())
        if any(not p.name.startswith(".") for p in entries):
            return
        for entry in entries:
            if entry.name != ".lock":
                entry.unlink(missing_ok=True)
        (directory / ".lock").unlink(missing_ok=True)
        directory.rmdir()
    except (FileNotFoundError, OSError):
        pass  # another run removed it, or a file arrived: either way it is not ours to drop


def _take_lock(path: Path) -> IO[bytes] | None:
    try:
        handle = open(path, "ab")  # noqa: SIM115 - held for the claim's lifetime
    except FileNotFoundError:
        return None  # the directory went away under us: nothing to take
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle


def _ready(entry: os.DirEntry[str], settle_seconds: float, now: float) -> bool:
    """A settled file, or a symlink (claimed so that it is quarantined, never opened)."""
    name = entry.name
    if name.startswith(".") or name.endswith(IN_PROGRESS_SUFFIXES):
        return False
    try:
        if entry.is_symlink():
            return True
        if not entry.is_file(follow_symlinks=False):
            return False
        return now - entry.stat(follow_symlinks=False).st_mtime >= settle_seconds
    except FileNotFoundError:
        return False


def _claim_key(directory: Path) -> tuple[int, str]:
    """Claims sort by when they were made: the name starts with the time (seconds in claims
    made before this format, nanoseconds since)."""
    head = directory.name.split("-", 1)[0]
    stamp = int(head) if head.isdigit() else 0
    return (stamp * 1_000_000_000 if stamp < 10**12 else stamp, directory.name)


def landing_order(paths: list[Path]) -> list[Path]:
    """Files of one claim in landing order: modification time, then name."""

    def key(path: Path) -> tuple[int, str]:
        try:
            return (os.lstat(path).st_mtime_ns, path.name)
        except FileNotFoundError:
            return (0, path.name)

    return sorted(paths, key=key)


# How long a parallel run waits for another to finish claiming before it gives up (busy).
CLAIM_WAIT_SECONDS = 30.0


def _wait_for_lock(path: Path, seconds: float) -> IO[bytes] | None:
    """The lock at `path`, waiting up to `seconds` while another process holds it."""
    deadline = time.monotonic() + seconds
    while True:
        handle = _take_lock(path)
        if handle is not None or time.monotonic() >= deadline:
            return handle
        time.sleep(0.005)


def claim_files(
    landing: Path, *, settle_seconds: float, limit: int | None = None, parallel: int = 1
) -> Claim:
    """Claim settled files from `landing` and adopt the claims left by dead runs; with
    `parallel` > 1, only this run's share of them (see above)."""
    real_directory(landing)
    processing = real_directory(landing / "processing")
    real_directory(landing / "done")  # refused before any file is taken, not after its write
    if parallel > 1:
        claims_lock = _wait_for_lock(processing / _CLAIMS_LOCK, CLAIM_WAIT_SECONDS)
    else:
        claims_lock = _take_lock(processing / _CLAIMS_LOCK)
    if claims_lock is None:
        return Claim(busy=True)  # another run is claiming from, and working on, this landing
    try:
        claim = _claim_locked(landing, processing, settle_seconds, limit, parallel)
    except BaseException:
        claims_lock.close()
        raise
    if parallel > 1:
        claims_lock.close()  # claimed: the next run may take its share now
    else:
        claim._locks.insert(0, claims_lock)  # held for the run: nobody else claims meanwhile
    return claim


def _claim_locked(
    landing: Path, processing: Path, settle_seconds: float, limit: int | None, parallel: int
) -> Claim:
    claim = Claim()
    for orphan in sorted(_orphaned_claims(processing), key=lambda o: _claim_key(o[0])):
        directory, handle = orphan
        claim.directories.append(directory)
        claim._locks.append(handle)
        leftovers = [
            p
            for p in directory.iterdir()
            if p.name not in _BOOKKEEPING and not p.name.startswith(".")
        ]
        claim.files += landing_order(leftovers)
    # Lock the claim under a hidden name first, then publish it: other runs never see an
    # unlocked claim directory (they would take it for a dead run's).
    name = f"{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    hidden = processing / f".new-{name}"
    hidden.mkdir()
    lock = _take_lock(hidden / ".lock")
    assert lock is not None, "a fresh claim directory is ours alone"
    claim_dir = processing / name
    os.rename(hidden, claim_dir)
    claim.directories.append(claim_dir)
    claim._locks.append(lock)
    now = time.time()
    with os.scandir(landing) as entries:
        ready = [Path(e.path) for e in entries if _ready(e, settle_seconds, now)]
    if parallel > 1:  # this run's share, adopted files included; the others take the rest
        share = -(-len(ready) // max(parallel - _runs_working(processing, claim), 1))
        limit = max(share if limit is None else min(limit, share), len(claim.files), 1)
    taken: list[Path] = []
    for path in landing_order(ready):
        if limit is not None and len(claim.files) + len(taken) >= limit:
            break
        target = claim_dir / path.name
        try:
            os.rename(path, target)  # atomic: exactly one run wins a file
        except FileNotFoundError:
            continue
        taken.append(target)
    claim.files += taken
    return claim


def _runs_working(processing: Path, claim: Claim) -> int:
    """How many other runs hold claims now (by the process id in the claim names): every claim
    directory left after this run adopted the orphans belongs to a live run."""
    ours = set(claim.directories)
    return len(
        {
            d.name.split("-")[1] if d.name.count("-") >= 2 else d.name
            for d in processing.iterdir()
            if not d.name.startswith(".") and d.is_dir() and d not in ours
        }
    )


def _orphaned_claims(processing: Path) -> Iterator[tuple[Path, IO[bytes]]]:
    """Claim directories whose run is gone, each with its lock now held by the caller."""
    for directory in processing.iterdir():
        if directory.name.startswith(".") or not directory.is_dir() or directory.is_symlink():
            continue
        handle = _take_lock(directory / ".lock")
        if handle is None:
            continue  # a live run owns it, or it is gone
        if not directory.exists():
            handle.close()
            continue
        yield directory, handle


def _flock_held(path: Path) -> bool:
    """Whether some process holds a flock on `path`, read from /proc/locks: looking must not
    take the lock, even for a moment (a run starting then would pass over that claim)."""
    try:
        info = os.stat(path)
        table = Path("/proc/locks").read_text(encoding="ascii")
    except OSError:
        return True  # cannot tell: assume a live owner
    device = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
    return any(
        len(fields) > 5 and fields[1] == "FLOCK" and fields[5] == device
        for fields in (line.split() for line in table.splitlines())
    )


def stale_files(landing: Path) -> list[tuple[Path, int]]:
    """Files in processing/ that no live run is working on, or that a run died decoding:
    `(path, attempts)`, for `status` and `doctor`."""
    processing = landing / "processing"
    if not processing.is_dir() or processing.is_symlink():
        return []
    found: list[tuple[Path, int]] = []
    for directory in sorted(processing.iterdir(), key=_claim_key):
        if directory.name.startswith(".") or not directory.is_dir() or directory.is_symlink():
            continue
        counts = _read_attempts(directory)
        orphaned = not _flock_held(directory / ".lock")
        for path in sorted(directory.iterdir()):
            if path.name in _BOOKKEEPING or path.name.startswith("."):
                continue
            tries = int(counts.get(path.name, 0))
            if orphaned or tries > 0:
                found.append((path, tries))
    return found


def _unique_target(directory: Path, name: str, tag: str) -> Path:
    target = directory / name
    if not target.exists():
        return target
    stem, dot, suffix = name.partition(".")
    return directory / f"{stem}.{tag}{dot}{suffix}"


def move_done(path: Path, landing: Path, *, tag: str) -> Path:
    """Move a processed file to landing/done/ (a name clash gets the batch tag added)."""
    done = real_directory(landing / "done")
    target = _unique_target(done, path.name, tag)
    os.replace(path, target)
    return target


def move_quarantined(path: Path, quarantine: Path, *, reason: str, detail: str, tag: str) -> Path:
    """Move an unusable file to the quarantine directory with a `.reason` file beside it."""
    real_directory(quarantine)
    target = _unique_target(quarantine, path.name, tag)
    reason_file = target.with_name(target.name + REASON_SUFFIX)
    # Never through a link someone left in the quarantine directory.
    fd = os.open(reason_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(f"{reason}\n{detail}\n")
    os.replace(path, target)
    return target


# -- the quarantine directory: a file, and beside it NAME.reason holding `code\ndetail\n` --
REASON_SUFFIX = ".reason"


@dataclass(frozen=True)
class QuarantinedFile:
    """A file in the quarantine directory, with the reason written beside it."""

    path: Path
    reason: str
    detail: str

    @property
    def reason_file(self) -> Path:
        return self.path.with_name(self.path.name + REASON_SUFFIX)

    @property
    def since(self) -> datetime | None:
        """When it was quarantined (its reason file was written)."""
        try:
            return datetime.fromtimestamp(self.reason_file.stat().st_mtime, UTC)
        except FileNotFoundError:
            return None


def quarantined_files(directory: Path) -> list[QuarantinedFile]:
    """The files in a quarantine directory, each with its reason (oldest name first)."""
    if not directory.is_dir():
        return []
    paths = sorted(
        p for p in directory.iterdir() if p.is_file() and not p.name.endswith(REASON_SUFFIX)
    )
    return [read_quarantined_file(p) for p in paths]


def read_quarantined_file(path: Path) -> QuarantinedFile:
    """A quarantined file and what its `.reason` file says (first line: the code; then detail)."""
    reason_file = path.with_name(path.name + REASON_SUFFIX)
    try:
        text = reason_file.read_text(encoding="utf-8")
    except FileNotFoundError:
        text = ""
    reason, _, detail = text.partition("\n")
    return QuarantinedFile(path, reason.strip() or "(no .reason file)", " ".join(detail.split()))


def find_quarantined_file(directory: Path, name: str) -> QuarantinedFile | None:
    """The quarantined file called `name` (a bare file name, not a path), if there is one."""
    if not name or Path(name).name != name or name.endswith(REASON_SUFFIX):
        return None
    path = directory / name
    return read_quarantined_file(path) if path.is_file() else None
