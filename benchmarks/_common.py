"""Helpers shared by the benchmarks: machine description, timing, medians, throwaway PostgreSQL.

The benchmarks are scripts (``uv run python benchmarks/<name>.py``); each puts the project root
on sys.path before importing this module, so ``from benchmarks._common import ...`` works.
"""

from __future__ import annotations

import itertools
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit, urlunsplit

import psycopg
from psycopg import sql

from metricmill.devtools.pgcluster import PgCluster, find_pg_bindir, timescaledb_problem

T = TypeVar("T")

PSQL = "/usr/bin/psql"
SQLITE3 = "/usr/bin/sqlite3"


# --------------------------------------------------------------------------- output


def log(message: str) -> None:
    """Progress to stderr, so stdout keeps only the results."""
    print(message, file=sys.stderr, flush=True)


def ratio_line(name: str, value: float) -> str:
    """The machine-readable headline: ``RATIO <name> <value with 2 decimals>``."""
    return f"RATIO {name} {value:.2f}"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain left/right aligned text table (numbers right-aligned)."""
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    numeric = [
        all(_looks_numeric(row[i]) for row in cells[1:]) if rows else False
        for i in range(len(headers))
    ]

    def render(row: list[str]) -> str:
        parts = [
            cell.rjust(widths[i]) if numeric[i] else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([render(cells[0]), rule, *(render(row) for row in cells[1:])])


def _looks_numeric(text: str) -> bool:
    try:
        float(text.replace(",", ""))
    except ValueError:
        return False
    return True


# --------------------------------------------------------------------------- timing


def timed(fn: Callable[..., T], *args: Any, **kwargs: Any) -> tuple[float, T]:
    """(wall-clock seconds, result) of one call, measured with perf_counter."""
    started = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - started, result


def median(values: Sequence[float]) -> float:
    if not values:
        raise ValueError("median of no values")
    return float(statistics.median(values))


def rate(rows: int, seconds: float) -> float:
    """Rows per second; infinite for a zero duration rather than a crash."""
    return rows / seconds if seconds > 0 else float("inf")


# --------------------------------------------------------------------------- machine


def _meminfo_total() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                kib = int(line.split()[1])
                return f"{kib / 1024 / 1024:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    return "unknown"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and ":" in line:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _load_average() -> str:
    """Other work on the machine skews timings; say how busy it was when the run started."""
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def sqlite_shell_version(shell: str = SQLITE3) -> str:
    try:
        done = subprocess.run(
            [shell, "--version"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unavailable"
    return done.stdout.split()[0] if done.returncode == 0 and done.stdout.split() else "unknown"


def pg_server_version(url: str) -> str:
    with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
        row = conn.execute("SHOW server_version").fetchone()
    return str(row[0]) if row else "unknown"


def machine_lines(extra: dict[str, str] | None = None) -> list[str]:
    """cores, memory, CPU model, Python and whatever the caller adds (server versions...)."""
    import sqlite3

    info = {
        "cores": str(os.cpu_count()),
        "memory": _meminfo_total(),
        "cpu": _cpu_model(),
        "python": f"{platform.python_version()} ({platform.python_implementation()})",
        "platform": platform.platform(),
        "python sqlite3 library": sqlite3.sqlite_version,
        "load average (1/5/15 min)": _load_average(),
        **(extra or {}),
    }
    width = max(len(k) for k in info)
    return ["machine:", *(f"  {key.ljust(width)}  {value}" for key, value in info.items())]


def print_machine(extra: dict[str, str] | None = None) -> None:
    print("\n".join(machine_lines(extra)), flush=True)


# --------------------------------------------------------------------------- PostgreSQL


def url_with_database(url: str, dbname: str) -> str:
    """The same libpq URL pointing at another database (query options kept)."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + quote(dbname, safe="")))


class PgServer:
    """A PostgreSQL server the benchmark may create and drop databases on."""

    _counter = itertools.count(1)

    def __init__(self, admin_url: str, *, cluster: PgCluster | None = None) -> None:
        self.admin_url = admin_url
        self.cluster = cluster

    def url(self, dbname: str) -> str:
        return url_with_database(self.admin_url, dbname)

    def version(self) -> str:
        return pg_server_version(self.admin_url)

    def _admin(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.admin_url, autocommit=True, connect_timeout=10)

    def create_database(self, name: str) -> None:
        with self._admin() as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))

    def drop_database(self, name: str) -> None:
        with self._admin() as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )

    @contextmanager
    def fresh_database(self, prefix: str) -> Iterator[str]:
        """A new, empty database for the duration of the block; yields its URL, then drops it."""
        name = f"{prefix}_{os.getpid()}_{next(self._counter)}"
        self.create_database(name)
        try:
            yield self.url(name)
        finally:
            self.drop_database(name)


@contextmanager
def throwaway_pg(
    pg_url: str | None = None, *, preload_timescaledb: bool = False
) -> Iterator[PgServer]:
    """A PostgreSQL server for one benchmark: the one at pg_url, or a private throwaway cluster.

    The private cluster (metricmill.devtools.pgcluster.PgCluster, fsync off) lives in a
    temporary directory that is removed again, with the server stopped, however the block ends
    (exceptions and Ctrl-C included).
    """
    if pg_url is not None:
        yield PgServer(pg_url)
        return
    bindir = find_pg_bindir()
    if bindir is None:
        raise RuntimeError("PostgreSQL server binaries not found; pass --pg-url")
    if preload_timescaledb:
        problem = timescaledb_problem(bindir)
        if problem is not None:
            raise RuntimeError(f"TimescaleDB is not usable: {problem}")
    base = Path(tempfile.mkdtemp(prefix="metricmill-bench-pg-"))
    cluster = PgCluster(base, bindir=bindir, preload_timescaledb=preload_timescaledb)
    try:
        cluster.start()
        yield PgServer(cluster.url("postgres"), cluster=cluster)
    finally:
        try:
            cluster.close()
        finally:
            shutil.rmtree(base, ignore_errors=True)


@contextmanager
def prefect_server_on(server: PgServer) -> Iterator[str]:
    """A Prefect API server whose database is a fresh one on `server`; yields its API URL,
    which flows of this process and of processes forked from it use.

    For benchmarks that start flow runs at the same moment from several processes: the Prefect
    test harness keeps its state in SQLite, where of two runs starting at once one waits about
    2 s for the other's write (measured: 9 of 10 pairs of empty flows; none of 10 with the
    database on PostgreSQL), which the benchmark would count as the runs' own time.
    """
    import prefect.settings
    from prefect.server.api.server import SubprocessASGIServer

    with server.fresh_database("prefect") as url:
        database = url.replace("postgresql://", "postgresql+asyncpg://", 1)
        updates = {
            prefect.settings.PREFECT_SERVER_DATABASE_CONNECTION_URL: database,
            prefect.settings.PREFECT_SERVER_ANALYTICS_ENABLED: False,
        }
        with prefect.settings.temporary_settings(updates=updates):
            api = SubprocessASGIServer()
            api.start(timeout=600)
            try:
                with prefect.settings.temporary_settings(
                    updates={prefect.settings.PREFECT_API_URL: api.api_url}
                ):
                    yield api.api_url
            finally:
                api.stop()
