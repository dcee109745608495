"""One run at a time per flow, whoever started it: a lock the database's own machinery holds.

- PostgreSQL / TimescaleDB: a session advisory lock, `pg_try_advisory_lock(FLOW_LOCK_SPACE,
  hashtext(name))`, taken on a connection of its own and held for the whole run. Workers on
  other machines see it; the server releases it when the holder's session ends, so a run that
  was killed never leaves it behind.
- SQLite: an exclusive `flock` on a lock file beside the database file (`metrics.db.ingest.lock`).
  The kernel releases it when the holder exits, however it exits, so a dead owner never blocks
  the next run. An SQLite file is only ever shared by processes of one machine, which is exactly
  what `flock` covers. An in-memory database lives in one process: a process-wide lock suffices.

`flow_lock(settings, name)` yields True when this run holds the lock, False when another run
does; the caller then skips its work.
"""

from __future__ import annotations

import fcntl
import os
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg

from metricmill.errors import DatabaseUnavailable
from metricmill.settings import MEMORY_URL, Settings, mask_url

# The advisory lock's first key: the namespace of metricmill's flow locks ("mm" in ASCII), so
# other applications' advisory locks on the same database never collide with ours.
FLOW_LOCK_SPACE = 0x6D6D
_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
_APP_PREFIX = "metricmill flow lock "  # the holder's application_name, for lock_holders
_memory_locks: dict[str, threading.Lock] = {}
_memory_guard = threading.Lock()


def lock_file_path(database_url: str, name: str) -> Path:
    """Where the SQLite lock of flow `name` lives: beside the database file."""
    database = Path(database_url.removeprefix("sqlite:///"))
    return database.with_name(f"{database.name}.{name}.lock")


@contextmanager
def flow_lock(settings: Settings, name: str) -> Iterator[bool]:
    """Hold flow `name`'s lock for the block: True if taken, False if another run holds it."""
    if not _NAME.match(name):
        raise ValueError(f"not a flow lock name: {name!r}")
    url = settings.database_url
    if url == MEMORY_URL:
        with _memory_lock(name) as held:
            yield held
    elif url.startswith("sqlite:///"):
        with _file_lock(lock_file_path(url, name)) as held:
            yield held
    else:
        with _advisory_lock(url, name) as held:
            yield held


@contextmanager
def _memory_lock(name: str) -> Iterator[bool]:
    with _memory_guard:
        lock = _memory_locks.setdefault(name, threading.Lock())
    held = lock.acquire(blocking=False)
    try:
        yield held
    finally:
        if held:
            lock.release()


@contextmanager
def _file_lock(path: Path) -> Iterator[bool]:
    path.parent.mkdir(parents=True, exist_ok=True)
    # flock, not fcntl/lockf: its locks belong to the open file, so two runs in one process
    # (threads) exclude each other too, and closing one descriptor cannot drop another's lock.
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        # Who holds it, for a person looking at the file; the lock itself is the flock.
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        try:
            yield True
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextmanager
def _advisory_lock(url: str, name: str) -> Iterator[bool]:
    try:
        conn = psycopg.connect(
            url, autocommit=True, connect_timeout=10, application_name=f"{_APP_PREFIX}{name}"
        )
    except psycopg.OperationalError as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DatabaseUnavailable(f"cannot connect to {mask_url(url)}: {first_line}") from None
    with conn:
        row = conn.execute(
            "SELECT pg_try_advisory_lock(%s, hashtext(%s))", (FLOW_LOCK_SPACE, name)
        ).fetchone()
        held = bool(row and row[0])
        try:
            yield held
        finally:
            if held and not conn.closed:
                conn.execute("SELECT pg_advisory_unlock(%s, hashtext(%s))", (FLOW_LOCK_SPACE, name))


def lock_holders(settings: Settings) -> list[str]:
    """Flow names whose lock is held right now (for `metricmill status`)."""
    url = settings.database_url
    if url == MEMORY_URL:
        return sorted(n for n, lock in _memory_locks.items() if lock.locked())
    if url.startswith("sqlite:///"):
        held = []
        database = Path(url.removeprefix("sqlite:///"))
        for path in sorted(database.parent.glob(f"{database.name}.*.lock")):
            name = path.name.removeprefix(f"{database.name}.").removesuffix(".lock")
            # Read, never take: taking it, even briefly, could make a starting run skip.
            if _holder_alive(path):
                held.append(name)
        return held
    with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
        rows = conn.execute(
            "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
            "WHERE l.locktype = 'advisory' AND l.classid = %s AND l.granted",
            (FLOW_LOCK_SPACE,),
        ).fetchall()
    return sorted(r[0].removeprefix(_APP_PREFIX) for r in rows if str(r[0]).startswith(_APP_PREFIX))


def _holder_alive(path: Path) -> bool:
    """Whether the lock file names a live process (the holder writes its pid, clears it)."""
    try:
        pid = int(path.read_text(encoding="ascii").strip() or 0)
    except (OSError, ValueError):
        return False
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
