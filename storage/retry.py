"""Riding out a database that goes away for a moment: a restart, a failover, a dropped link.

`with_database_retries(attempt)` calls `attempt()` again after each delay while it fails with
a connection refused, an admin shutdown or a closed connection: about a minute in all, longer
than a PostgreSQL restart takes. Anything else is raised at once (never retry bad data).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import psycopg

from metricmill.errors import DatabaseUnavailable

T = TypeVar("T")

DATABASE_RETRY_DELAYS = (1.0, 2.0, 4.0, 8.0, 15.0, 15.0, 15.0)
DATABASE_AWAY: tuple[type[BaseException], ...] = (
    DatabaseUnavailable,  # refused or timed out while connecting
    psycopg.OperationalError,  # admin shutdown, server closed the connection
    psycopg.InterfaceError,  # the connection is closed
)


def with_database_retries(
    attempt: Callable[[], T],
    *,
    on_retry: Callable[[BaseException, float], None] | None = None,
    delays: tuple[float, ...] = DATABASE_RETRY_DELAYS,
) -> T:
    """`attempt()`, tried again after each delay while the database is away."""
    for delay in delays:
        try:
            return attempt()
        except DATABASE_AWAY as exc:
            if on_retry is not None:
                on_retry(exc, delay)
            time.sleep(delay)
    return attempt()
