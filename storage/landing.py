"""The landing directory: atomic claims that survive kill -9, then done/ or quarantine/.

A run claims files by renaming them into `processing/<claim>/`, a directory whose `.lock`
the run holds with flock for as long as it lives. A claim whose lock can be taken belongs to
a dead run: the next run adopts its files. Exactly-once is the ledger's job (file hash as
batch id); this module only makes sure every file is processed by one live run at a time and
ends in done/ or quarantine/.
"""

from __future__ import annotations

import fcntl
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

IN_PROGRESS_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload")


@dataclass
class Claim:
    """A set of files this process owns until release()."""

    directory: Path
    files: list[Path] = field(default_factory=list)
    _lock: IO[bytes] | None = None

    def release(self) -> None:
        """Drop the claim; files still in it (a failed step) are adopted by the next run."""
        _remove_if_empty(self.directory)
        if self._lock is not None:
            self._lock.close()
            self._lock = None


def _remove_if_empty(directory: Path) -> None:
    """Remove a claim directory holding nothing but its lock; tolerate a racing remover."""
    try:
        if any(p.name != ".lock" for p in directory.iterdir()):
            return
        (directory / ".lock").unlink(missing_ok=True)
        directory.rmdir()
    except (FileNotFoundError, OSError):
        pass  # another run removed it, or a file arrived: either way it is not ours to drop


def _take_lock(directory: Path) -> IO[bytes] | None:
    try:
        handle = open(directory / ".lock", "ab")  # noqa: SIM115 - held for the claim's lifetime
    except FileNotFoundError:
        return None  # the directory went away under us: nothing to take
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle


def _ready(path: Path, settle_seconds: float, now: float) -> bool:
    if path.name.startswith(".") or path.name.endswith(IN_PROGRESS_SUFFIXES):
        return False
    try:
        stat = path.stat()
    except FileNotFoundError:
        return False
    return now - stat.st_mtime >= settle_seconds


def claim_files(landing: Path, *, settle_seconds: float, limit: int | None = None) -> Claim:
    """Claim settled files from `landing` and adopt the files of claims left by dead runs."""
    processing = landing / "processing"
    processing.mkdir(parents=True, exist_ok=True)
    # Lock the claim under a hidden name first, then publish it: other runs never see an
    # unlocked claim directory (they would take it for a dead run's).
    name = f"{int(time.time())}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    hidden = processing / f".new-{name}"
    hidden.mkdir()
    lock = _take_lock(hidden)
    assert lock is not None, "a fresh claim directory is ours alone"
    claim_dir = processing / name
    os.rename(hidden, claim_dir)
    claim = Claim(claim_dir, _lock=lock)
    for orphan in _orphaned_claims(processing, exclude=claim_dir):
        try:
            leftovers = sorted(orphan.iterdir())
        except FileNotFoundError:
            continue  # emptied and removed by another run between its lock and ours
        for path in leftovers:
            if path.name == ".lock":
                continue
            target = claim_dir / path.name
            try:
                os.replace(path, target)
            except FileNotFoundError:
                continue
            claim.files.append(target)
    now = time.time()
    for path in sorted(p for p in landing.iterdir() if p.is_file()):
        if limit is not None and len(claim.files) >= limit:
            break
        if not _ready(path, settle_seconds, now):
            continue
        target = claim_dir / path.name
        try:
            os.rename(path, target)  # atomic: exactly one run wins a file
        except FileNotFoundError:
            continue
        claim.files.append(target)
    return claim


def _orphaned_claims(processing: Path, *, exclude: Path) -> Iterator[Path]:
    for directory in sorted(processing.iterdir()):
        if directory == exclude or directory.name.startswith(".") or not directory.is_dir():
            continue
        handle = _take_lock(directory)
        if handle is None:
            continue  # a live run owns it, or it is gone
        try:
            yield directory
        finally:
            _remove_if_empty(directory)
            handle.close()


def _unique_target(directory: Path, name: str, tag: str) -> Path:
    target = directory / name
    if not target.exists():
        return target
    stem, dot, suffix = name.partition(".")
    return directory / f"{stem}.{tag}{dot}{suffix}"


def move_done(path: Path, landing: Path, *, tag: str) -> Path:
    """Move a processed file to landing/done/ (a name clash gets the batch tag added)."""
    done = landing / "done"
    done.mkdir(parents=True, exist_ok=True)
    target = _unique_target(done, path.name, tag)
    os.replace(path, target)
    return target


def move_quarantined(path: Path, quarantine: Path, *, reason: str, detail: str, tag: str) -> Path:
    """Move an unusable file to the quarantine directory with a `.reason` file beside it."""
    quarantine.mkdir(parents=True, exist_ok=True)
    target = _unique_target(quarantine, path.name, tag)
    reason_file = target.with_name(target.name + ".reason")
    reason_file.write_text(f"{reason}\n{detail}\n", encoding="utf-8")
    os.replace(path, target)
    return target
