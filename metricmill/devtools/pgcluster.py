"""A throwaway PostgreSQL cluster for tests and benchmarks.

The cluster is created with ``initdb`` in a directory of its own, listens on a free TCP port on
127.0.0.1 only (plus a unix socket inside its directory), trusts every local connection as the
``postgres`` superuser and trades durability for speed (``fsync=off``). Nothing here is meant for
data anyone wants to keep.

PostgreSQL refuses to run as root. When this process is root, ``initdb`` and ``pg_ctl`` run as
the ``postgres`` OS user through ``runuser``, and the cluster directory is handed to that user.

Finding the server binaries and the TimescaleDB extension is metricmill/devtools/pginstall.py's
part (its find_pg_bindir, timescaledb_installed and timescaledb_problem are importable here too).
"""

from __future__ import annotations

import atexit
import logging
import os
import shlex
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from urllib.parse import quote

import psycopg
from psycopg import sql

from metricmill.devtools.pginstall import (
    BINDIR_ENV,
    find_pg_bindir,
    timescaledb_installed,
    timescaledb_problem,
)

__all__ = [
    "PgCluster",
    "find_pg_bindir",
    "timescaledb_installed",
    "timescaledb_problem",
]

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
SUPERUSER = "postgres"
OS_USER = "postgres"
# sun_path is 108 bytes on Linux; leave room for the terminating NUL.
MAX_SOCKET_PATH = 100
LOG_TAIL_LINES = 40
STOP_MODES = ("smart", "fast", "immediate")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _running_as_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def _chown_tree(root: Path, uid: int, gid: int) -> None:
    os.chown(root, uid, gid)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in (*dirnames, *filenames):
            os.chown(os.path.join(dirpath, name), uid, gid, follow_symlinks=False)


class PgCluster:
    """A private PostgreSQL server: ``with PgCluster(path) as pg: pg.url()``.

    base_dir holds the data directory, the unix socket directory and the server log. When
    running as root and the ``postgres`` OS user cannot reach base_dir (pytest's temporary
    directories are 0700 root), or when base_dir is too deep for a unix socket path, the cluster
    lives in a fresh /tmp/metricmill-pg-* directory instead, removed again by close().
    """

    def __init__(
        self,
        base_dir: Path,
        *,
        bindir: Path | None = None,
        preload_timescaledb: bool = False,
        durable: bool = False,
    ) -> None:
        self.base_dir = Path(base_dir).absolute()
        # durable: fsync, synchronous_commit and full-page writes on, as a production server
        # runs: a crash test on a cluster that may drop acknowledged commits proves nothing.
        self.durable = durable
        found = bindir if bindir is not None else find_pg_bindir()
        if found is None:
            raise RuntimeError(f"PostgreSQL server binaries not found (set {BINDIR_ENV})")
        self.bindir = Path(found)
        self.preload_timescaledb = preload_timescaledb
        self._as_root = _running_as_root()
        self._work_dir: Path | None = None
        self._own_work_dir = False
        self._port: int | None = None
        self._running = False
        self._atexit_registered = False

    # ------------------------------------------------------------------ locations

    @property
    def work_dir(self) -> Path:
        """Directory actually holding the cluster (base_dir or a /tmp fallback)."""
        if self._work_dir is None:
            raise RuntimeError("the cluster has not been started")
        return self._work_dir

    @property
    def data_dir(self) -> Path:
        return self.work_dir / "data"

    @property
    def socket_dir(self) -> Path:
        return self.work_dir / "socket"

    @property
    def log_file(self) -> Path:
        return self.work_dir / "server.log"

    @property
    def host(self) -> str:
        return HOST

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the cluster has not been started")
        return self._port

    @property
    def running(self) -> bool:
        return self._running

    def url(self, dbname: str = "postgres") -> str:
        """libpq/SQLAlchemy style URL of a database on this cluster."""
        return f"postgresql://{SUPERUSER}@{HOST}:{self.port}/{quote(dbname, safe='')}"

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Create the cluster if needed and start the server; a no-op when already running."""
        if self._running:
            return
        self._prepare_work_dir()
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb()
        if self._port is None:
            self._port = _free_port()
        attempts = 3
        for attempt in range(1, attempts + 1):
            log_offset = self.log_file.stat().st_size if self.log_file.exists() else 0
            done = self._run(self._pg_ctl_start_command())
            if done.returncode == 0:
                break
            new_log = self._read_log(log_offset)
            port_taken = "could not bind" in new_log or "already in use" in new_log
            if port_taken and attempt < attempts:
                log.debug("port %s was taken, retrying with another", self._port)
                self._port = _free_port()
                continue
            raise RuntimeError(
                f"PostgreSQL failed to start (pg_ctl exit status {done.returncode}):\n"
                f"{done.stdout}{done.stderr}\n{self._log_tail()}"
            )
        self._running = True
        if not self._atexit_registered:
            atexit.register(self._stop_quietly)
            self._atexit_registered = True
        try:
            self.wait_ready()
        except BaseException:
            self._stop_quietly()
            raise
        log.debug("PostgreSQL running at %s (%s)", self.url(), self.work_dir)

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Block until the server answers ``SELECT 1`` over TCP; RuntimeError after timeout."""
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while True:
            try:
                with psycopg.connect(self.url(), connect_timeout=2, autocommit=True) as conn:
                    conn.execute("SELECT 1")
                return
            except psycopg.Error as exc:
                last_error = exc
            if time.monotonic() >= deadline:
                raise RuntimeError(
                    f"PostgreSQL at {HOST}:{self.port} did not become ready within "
                    f"{timeout:.0f}s: {last_error}\n{self._log_tail()}"
                )
            time.sleep(0.1)

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (pg_ctl stop -m mode). Safe to call when it is not running."""
        if mode not in STOP_MODES:
            raise ValueError(f"stop mode must be one of {', '.join(STOP_MODES)}, not {mode!r}")
        if self._work_dir is None or not (self.data_dir / "postmaster.pid").exists():
            self._running = False
            return
        done = self._run(
            [
                str(self.bindir / "pg_ctl"),
                "stop",
                "-D",
                str(self.data_dir),
                "-m",
                mode,
                "-w",
                "-t",
                "60",
            ]
        )
        output = done.stdout + done.stderr
        if done.returncode != 0 and "Is server running?" not in output:
            raise RuntimeError(
                f"pg_ctl stop failed (exit status {done.returncode}):\n{output}\n{self._log_tail()}"
            )
        self._running = False

    def restart(self) -> None:
        """Stop and start the server again, keeping its data and its port."""
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop the server and remove the /tmp fallback directory if one was used."""
        self.stop()
        if self._own_work_dir and self._work_dir is not None:
            shutil.rmtree(self._work_dir, ignore_errors=True)
            self._work_dir = None
            self._own_work_dir = False
        if self._atexit_registered:
            atexit.unregister(self._stop_quietly)
            self._atexit_registered = False

    def __enter__(self) -> PgCluster:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ databases

    def _admin_connection(self) -> psycopg.Connection:
        return psycopg.connect(self.url("postgres"), autocommit=True, connect_timeout=10)

    def create_database(self, name: str) -> None:
        with self._admin_connection() as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))

    def drop_database(self, name: str) -> None:
        """Drop a database, disconnecting whoever is still using it. Missing is fine."""
        with self._admin_connection() as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = %s AND pid <> pg_backend_pid()",
                (name,),
            )
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )

    # ------------------------------------------------------------------ internals

    def _prepare_work_dir(self) -> None:
        if self._work_dir is not None:
            return
        self.base_dir.mkdir(parents=True, exist_ok=True)
        work_dir = self.base_dir
        socket_file = work_dir / "socket" / ".s.PGSQL.65535"
        if len(os.fsencode(socket_file)) > MAX_SOCKET_PATH or (
            self._as_root and not self._postgres_can_reach(work_dir.parent)
        ):
            work_dir = Path(tempfile.mkdtemp(prefix="metricmill-pg-", dir="/tmp"))
            self._own_work_dir = True
            log.debug("%s is unusable for the cluster, using %s", self.base_dir, work_dir)
        work_dir.chmod(0o755)
        (work_dir / "socket").mkdir(exist_ok=True)
        if self._as_root:
            import pwd

            entry = pwd.getpwnam(OS_USER)
            _chown_tree(work_dir, entry.pw_uid, entry.pw_gid)
        self._work_dir = work_dir

    def _postgres_can_reach(self, directory: Path) -> bool:
        """Whether the postgres OS user can traverse every component of directory."""
        done = subprocess.run(
            self._as_postgres(["test", "-x", str(directory)]),
            capture_output=True,
            timeout=30,
            check=False,
        )
        return done.returncode == 0

    def _as_postgres(self, command: Sequence[str]) -> list[str]:
        if not self._as_root:
            return list(command)
        runuser = shutil.which("runuser")
        if runuser is None:
            raise RuntimeError(
                "running as root, but runuser (util-linux) is missing: "
                f"PostgreSQL cannot run as root and must be started as the {OS_USER} user"
            )
        return [runuser, "-u", OS_USER, "--", *command]

    def _run(self, command: Sequence[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self._as_postgres(command),
            cwd=self.work_dir,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )

    def _initdb(self) -> None:
        done = self._run(
            [
                str(self.bindir / "initdb"),
                "-D",
                str(self.data_dir),
                "-A",
                "trust",
                "-U",
                SUPERUSER,
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ]
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"initdb failed (exit status {done.returncode}):\n{done.stdout}{done.stderr}"
            )

    def _server_options(self) -> list[str]:
        settings = {
            "listen_addresses": HOST,
            "port": str(self.port),
            "unix_socket_directories": str(self.socket_dir),
            "fsync": "on" if self.durable else "off",
            "synchronous_commit": "on" if self.durable else "off",
            "full_page_writes": "on" if self.durable else "off",
            "max_connections": "200",
            "shared_buffers": "256MB",
        }
        if self.preload_timescaledb:
            settings["shared_preload_libraries"] = "timescaledb"
            settings["timescaledb.telemetry_level"] = "off"
        options: list[str] = []
        for name, value in settings.items():
            options += ["-c", f"{name}={value}"]
        return options

    def _pg_ctl_start_command(self) -> list[str]:
        return [
            str(self.bindir / "pg_ctl"),
            "start",
            "-w",
            "-t",
            "60",
            "-D",
            str(self.data_dir),
            "-l",
            str(self.log_file),
            # pg_ctl hands -o to a shell, so quote each argument for it.
            "-o",
            shlex.join(self._server_options()),
        ]

    def _read_log(self, offset: int = 0) -> str:
        try:
            with self.log_file.open("rb") as fh:
                fh.seek(offset)
                return fh.read().decode("utf-8", errors="replace")
        except OSError:
            return ""

    def _log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        if self._work_dir is None:
            return "(no server log)"
        text = self._read_log()
        if not text:
            return f"(server log {self.log_file} is empty or missing)"
        tail = "\n".join(text.splitlines()[-lines:])
        return f"last lines of {self.log_file}:\n{tail}"

    def _stop_quietly(self) -> None:
        try:
            self.stop()
        except Exception as exc:  # best effort at interpreter exit
            log.warning("could not stop PostgreSQL in %s: %s", self._work_dir, exc)
