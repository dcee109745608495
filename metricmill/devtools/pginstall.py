"""Finding a PostgreSQL installation for the throwaway clusters of tests and benchmarks: its
server binaries (METRICMILL_PG_BINDIR, pg_config, Debian's versioned directories, PATH) and
whether the TimescaleDB extension is installed for that server (metricmill/devtools/pgcluster.py
runs the clusters)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

BINDIR_ENV = "METRICMILL_PG_BINDIR"
SERVER_PROGRAMS = ("initdb", "pg_ctl", "postgres")
DEBIAN_LIB_ROOT = Path("/usr/lib/postgresql")
DEBIAN_SHARE_ROOT = Path("/usr/share/postgresql")


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def _has_server_programs(bindir: Path) -> bool:
    return all(_is_executable(bindir / name) for name in SERVER_PROGRAMS)


def _run_pg_config(pg_config: Path | str, *flags: str) -> list[str] | None:
    """Output lines of ``pg_config <flags>``, or None when it cannot be run."""
    try:
        done = subprocess.run(
            [str(pg_config), *flags],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except OSError:
        return None
    except subprocess.TimeoutExpired:
        return None
    lines = done.stdout.splitlines()
    if done.returncode != 0 or len(lines) != len(flags):
        return None
    return [line.strip() for line in lines]


def _major_key(name: str) -> tuple[int, ...] | None:
    """Sort key for a Debian version directory name such as "15" or "9.6"."""
    if not re.fullmatch(r"\d+(\.\d+)?", name):
        return None
    return tuple(int(part) for part in name.split("."))


def find_pg_bindir() -> Path | None:
    """Locate a directory holding the PostgreSQL server programs (initdb, pg_ctl, postgres).

    Looks, in order, at the environment variable METRICMILL_PG_BINDIR, at ``pg_config --bindir``
    and at Debian's /usr/lib/postgresql/<major>/bin, highest major first. Returns None when
    none has them. A METRICMILL_PG_BINDIR that lacks them is a mistake and raises RuntimeError
    rather than being silently ignored.
    """
    override = os.environ.get(BINDIR_ENV, "").strip()
    if override:
        bindir = Path(override).expanduser()
        if not _has_server_programs(bindir):
            missing = [n for n in SERVER_PROGRAMS if not _is_executable(bindir / n)]
            raise RuntimeError(
                f"{BINDIR_ENV}={override} does not contain the PostgreSQL server programs "
                f"(missing: {', '.join(missing)})"
            )
        return bindir

    pg_config = shutil.which("pg_config")
    if pg_config is not None:
        out = _run_pg_config(pg_config, "--bindir")
        if out is not None:
            bindir = Path(out[0])
            if _has_server_programs(bindir):
                return bindir

    if DEBIAN_LIB_ROOT.is_dir():
        versions: list[tuple[tuple[int, ...], Path]] = []
        for entry in DEBIAN_LIB_ROOT.iterdir():
            key = _major_key(entry.name)
            if key is not None:
                versions.append((key, entry / "bin"))
        for _key, bindir in sorted(versions, reverse=True):
            if _has_server_programs(bindir):
                return bindir
    return None


def _server_major(bindir: Path) -> str | None:
    """Major version of the server in bindir ("15", or "9.6" for old releases)."""
    try:
        done = subprocess.run(
            [str(bindir / "postgres"), "--version"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"\(PostgreSQL\)\s+(\d+)(?:\.(\d+))?", done.stdout)
    if match is None:
        return None
    major = int(match.group(1))
    if major < 10 and match.group(2) is not None:
        return f"{major}.{match.group(2)}"
    return str(major)


def _extension_dirs(bindir: Path) -> list[tuple[Path, Path]]:
    """Candidate (sharedir, pkglibdir) pairs belonging to the server in bindir."""
    candidates: list[tuple[Path, Path]] = []
    own_pg_config = bindir / "pg_config"
    if _is_executable(own_pg_config):
        out = _run_pg_config(own_pg_config, "--sharedir", "--pkglibdir")
        if out is not None:
            candidates.append((Path(out[0]), Path(out[1])))
    major = _server_major(bindir)
    if major is None and bindir.name == "bin" and bindir.parent.parent == DEBIAN_LIB_ROOT:
        major = bindir.parent.name
    if major is not None:
        debian = (DEBIAN_SHARE_ROOT / major, DEBIAN_LIB_ROOT / major / "lib")
        if debian not in candidates:
            candidates.append(debian)
    return candidates


def timescaledb_problem(bindir: Path) -> str | None:
    """Why the timescaledb extension is unusable with the server in bindir; None if it is usable.

    Usable means both the control file (<sharedir>/extension/timescaledb.control) and a
    timescaledb*.so library in the server's pkglibdir exist.
    """
    candidates = _extension_dirs(bindir)
    if not candidates:
        return f"cannot tell where the extensions of the PostgreSQL in {bindir} live"
    problems: list[str] = []
    for sharedir, pkglibdir in candidates:
        control = sharedir / "extension" / "timescaledb.control"
        if not control.is_file():
            problems.append(f"{control} not found")
        elif not any(pkglibdir.glob("timescaledb*.so")):
            problems.append(f"no timescaledb*.so in {pkglibdir}")
        else:
            return None
    return problems[0]


def timescaledb_installed(bindir: Path) -> bool:
    """Whether the timescaledb extension files exist for the server in bindir."""
    return timescaledb_problem(bindir) is None
