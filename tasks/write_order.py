"""The order of an ingest run's reads and writes, and riding out a database that goes away
meanwhile.

A run's groups of landed files are written one after the other in landing order (`turnstile`):
a later file wins a (series, ts) that an earlier file also holds, whichever task thread finishes
checking first. A group whose earlier group failed does not write either: its files stay in
processing/ and the next run takes them up in order.

They are also read and checked one after the other, in the same order (`check_turnstile`), each
while the group before it writes. Two groups decoding and checking at once only share the GIL
(and GX's lock) and reach their writes together, so that no check overlapped a write: on the
ingest benchmark the flow took a second less this way.

Writes go through `storage.retry.with_database_retries`, which rides out a database restart.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import httpx

from storage.retry import DATABASE_AWAY, with_database_retries

__all__ = [
    "TRANSIENT_ERRORS",
    "EarlierGroupFailed",
    "check_turnstile",
    "turnstile",
    "with_database_retries",
]

# A group waits at most this long for the groups before it (a run's tasks all start at once).
TURN_TIMEOUT_SECONDS = 6 * 3600.0

TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    *DATABASE_AWAY,
    httpx.TransportError,
    TimeoutError,
)


class EarlierGroupFailed(RuntimeError):
    """An earlier group of this run was not written: this one waits for the next run."""


class Turnstile:
    """Lets group i write only once groups 0..i-1 are done, and says whether they all were
    written."""

    def __init__(self) -> None:
        self._done: dict[int, bool] = {}
        self._changed = threading.Condition()

    def wait(self, turn: int, timeout: float = TURN_TIMEOUT_SECONDS) -> bool:
        """Block until every earlier turn is done; True when all of them succeeded."""
        with self._changed:
            ready = self._changed.wait_for(
                lambda: all(t in self._done for t in range(turn)), timeout=timeout
            )
            return ready and all(self._done[t] for t in range(turn))

    def finish(self, turn: int, ok: bool) -> None:
        with self._changed:
            self._done.setdefault(turn, ok)
            self._changed.notify_all()


_turnstiles: dict[str, tuple[Turnstile, Turnstile]] = {}  # key: (writes, checks)
_registry = threading.Lock()


@contextmanager
def write_order() -> Iterator[str]:
    """The turnstiles of one run's groups (writes, checks); tasks find them by the key yielded."""
    key = uuid.uuid4().hex
    with _registry:
        _turnstiles[key] = (Turnstile(), Turnstile())
    try:
        yield key
    finally:
        with _registry:
            _turnstiles.pop(key, None)


def turnstile(key: str | None) -> Turnstile:
    """The run's turnstile of writes. A task run on its own (no key) has no turn to wait for; a
    key whose run has ended lets nothing through."""
    if key is None:
        return Turnstile()
    with _registry:
        found = _turnstiles.get(key)
    return found[0] if found is not None else _Closed()


def check_turnstile(key: str | None) -> Turnstile:
    """The run's turnstile of reads and checks: a group's turn comes when the groups before it
    have checked (whether or not that went well: it only orders the work). Without a key, or
    once the run has ended, nothing to wait for."""
    with _registry:
        found = _turnstiles.get(key) if key is not None else None
    return found[1] if found is not None else _Open()


class _Closed(Turnstile):
    def wait(self, turn: int, timeout: float = TURN_TIMEOUT_SECONDS) -> bool:
        return False


class _Open(Turnstile):
    def wait(self, turn: int, timeout: float = TURN_TIMEOUT_SECONDS) -> bool:
        return True
