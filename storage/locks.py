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

`flow_lock(settings, name, slots=N)` lets N runs of the flow work at once (parallel ingest on a
PostgreSQL server, `ingest_max_parallel_runs`): N advisory locks, slot 0 keyed as above and slot
i by `hashtext('name/i')`; a run takes the first free one, and skips when all N are held. On
SQLite there is one slot whatever N says (one writer per database file).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from metricmill.errors import DatabaseUnavailable, MetricmillError
from metricmill.settings import MEMORY_URL, Settings, mask_url
from storage.retry import with_database_retries

# The advisory lock's first key: the namespace of metricmill's flow locks ("mm" in ASCII), so
# other applications' advisory locks on the same database never collide with ours.
FLOW_LOCK_SPACE = 0x6D6D

# Transaction-level advisory locks (one bigint key each; every id metricmill uses is here).
# `init`s on one database migrate one at a time.
SCHEMA_LOCK = 7423001
# First connections create the TimescaleDB extension one at a time (the catalog would race).
EXTENSION_LOCK = 7423002
# Rollup transactions, and retention's deleting transactions, one at a time. Shared on purpose:
# a retention transaction reads rollup_pending to keep unrolled rows, so it must not run while a
# rollup transaction has claimed ranges it has not yet written.
ROLLUP_RETENTION_LOCK = 7423004
_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
_APP_PREFIX = "metricmill flow lock "  # the holder's application_name, for lock_holders
_memory_locks: dict[str, threading.Lock] = {}
_memory_guard = threading.Lock()
log = logging.getLogger(__name__)


def lock_file_path(database_url: str, name: str) -> Path:
    """Where the SQLite lock of flow `name` lives: beside the database file."""
    database = Path(database_url.removeprefix("sqlite:///"))
    return database.with_name(f"{database.name}.{name}.lock")


def slot_key(name: str, slot: int) -> str:
    """The text hashed into the advisory lock's second key for slot `slot` of flow `name`."""
    return name if slot == 0 else f"{name}/{slot}"


@contextmanager
def flow_lock(settings: Settings, name: str, *, slots: int = 1) -> Iterator[bool]:
    """Hold one of flow `name`'s `slots` locks for the block: True if taken, False if other
    runs hold them all."""
    if not _NAME.match(name):
        raise ValueError(f"not a flow lock name: {name!r}")
    if slots < 1:
        raise ValueError(f"a flow lock has at least one slot, not {slots}")
    url = settings.database_url
    if url == MEMORY_URL:
        with _memory_lock(name) as held:
            yield held
    elif url.startswith("sqlite:///"):
        with _file_lock(lock_file_path(url, name)) as held:
            yield held
    else:
        with _advisory_lock(url, name, slots) as held:
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


class LockLost(MetricmillError):
    """This run's flow lock went away (the database restarted) and another run holds it now."""


@dataclass
class _AdvisoryHolder:
    """The connection a run holds its advisory lock on, and how to get the lock back."""

    url: str
    name: str
    conn: psycopg.Connection[Any] | None
    slots: int = 1
    key: str = ""  # slot_key of the slot held (or last held)

    def _connect(self) -> psycopg.Connection[Any]:
        try:
            return psycopg.connect(
                self.url,
                autocommit=True,
                connect_timeout=10,
                application_name=f"{_APP_PREFIX}{self.name}",
            )
        except psycopg.OperationalError as exc:
            text = str(exc).strip()
            first_line = text.splitlines()[0] if text else type(exc).__name__
            raise DatabaseUnavailable(
                f"cannot connect to {mask_url(self.url)}: {first_line}"
            ) from None

    def take(self) -> bool:
        """Try for a free slot on a fresh connection (kept while it is held): the slot held
        before if any, then the others in order."""
        conn = self._connect()
        keys = [slot_key(self.name, slot) for slot in range(self.slots)]
        if self.key in keys:
            keys.remove(self.key)
            keys.insert(0, self.key)
        for key in keys:
            row = conn.execute(
                "SELECT pg_try_advisory_lock(%s, hashtext(%s))", (FLOW_LOCK_SPACE, key)
            ).fetchone()
            if row and row[0]:
                self.conn, self.key = conn, key
                return True
        conn.close()
        return False

    def ensure(self) -> None:
        """Still held, or taken again: a restart of the server ends every session, and with it
        the lock. Raises LockLost when another run took it meanwhile."""
        if self.conn is not None and not self.conn.closed:
            try:
                # Re-entrant: taking it again on the holding session succeeds; undo the count.
                row = self.conn.execute(
                    "SELECT pg_try_advisory_lock(%s, hashtext(%s))", (FLOW_LOCK_SPACE, self.key)
                ).fetchone()
                if row and row[0]:
                    self.conn.execute(
                        "SELECT pg_advisory_unlock(%s, hashtext(%s))", (FLOW_LOCK_SPACE, self.key)
                    )
                    return
            except psycopg.Error:
                pass
            self.close()
        if not with_database_retries(self.take):
            raise LockLost(
                f"the {self.name} flow lock was lost (the database restarted?) and another "
                "run holds it now (every slot of it); this run stops before writing"
            )

    def close(self) -> None:
        if self.conn is None:
            return
        try:
            if not self.conn.closed:
                self.conn.execute(
                    "SELECT pg_advisory_unlock(%s, hashtext(%s))", (FLOW_LOCK_SPACE, self.key)
                )
        except psycopg.Error as exc:
            # The session is gone, and its locks with it: nothing to release. Never let this
            # turn the run's outcome into a failure.
            log.info("releasing the %s flow lock: its session is gone (%s)", self.name, exc)
        finally:
            with contextlib.suppress(psycopg.Error):
                self.conn.close()
            self.conn = None


# The advisory locks this run holds: a context variable, so the run's tasks (which run in
# copies of the flow's context) find the run's own lock, never another run's in the process.
_holders: ContextVar[dict[tuple[str, str], _AdvisoryHolder]] = ContextVar("flow_locks")


@contextmanager
def _advisory_lock(url: str, name: str, slots: int = 1) -> Iterator[bool]:
    holder = _AdvisoryHolder(url, name, None, slots)
    if not with_database_retries(holder.take):
        yield False
        return
    token = _holders.set({**_holders.get({}), (url, name): holder})
    try:
        yield True
    finally:
        _holders.reset(token)
        holder.close()


def ensure_flow_lock(settings: Settings, name: str) -> None:
    """Before a write: make sure this process still holds flow `name`'s lock, taking it again
    after a database restart; LockLost if another run has it now. A file lock cannot be lost;
    outside a run holding the lock (a script writing directly) this does nothing."""
    holder = _holders.get({}).get((settings.database_url, name))
    if holder is not None:
        holder.ensure()


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
    return pid > 0 and pid_alive(pid)


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (ours to signal or not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
