"""Shared fixtures: a session-wide throwaway PostgreSQL cluster and per-test database targets.

``db_target`` runs a test once per backend (sqlite, postgres, timescaledb); ``pg_only_target``
only for the server backends. Without PostgreSQL binaries the server cases are skipped, unless
METRICMILL_REQUIRE_POSTGRES=1 (set by CI) turns the skip into a failure; likewise for
TimescaleDB and METRICMILL_REQUIRE_TIMESCALEDB=1.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest

from metricmill.devtools.pgcluster import (
    PgCluster,
    find_pg_bindir,
    timescaledb_installed,
    timescaledb_problem,
)
from tests.dbtargets import DbTarget

REQUIRE_POSTGRES_ENV = "METRICMILL_REQUIRE_POSTGRES"
REQUIRE_TIMESCALEDB_ENV = "METRICMILL_REQUIRE_TIMESCALEDB"


def _required(env_var: str) -> bool:
    return os.environ.get(env_var, "").strip().lower() in {"1", "true", "yes", "on"}


def _skip_unless_required(reason: str, env_var: str) -> NoReturn:
    if _required(env_var):
        pytest.fail(f"{reason} [{env_var}=1]", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def pg_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PgCluster]:
    """One PostgreSQL server for the whole session, with timescaledb preloaded if installed."""
    bindir = find_pg_bindir()
    if bindir is None:
        _skip_unless_required(
            "PostgreSQL server binaries not found (set METRICMILL_PG_BINDIR)",
            REQUIRE_POSTGRES_ENV,
        )
    preload = timescaledb_installed(bindir)
    with PgCluster(
        tmp_path_factory.mktemp("pgcluster"), bindir=bindir, preload_timescaledb=preload
    ) as cluster:
        yield cluster


def _server_target(request: pytest.FixtureRequest, name: str) -> Iterator[DbTarget]:
    cluster: PgCluster = request.getfixturevalue("pg_cluster")
    if name == "timescaledb" and not cluster.preload_timescaledb:
        problem = timescaledb_problem(cluster.bindir) or "not preloaded by the test cluster"
        _skip_unless_required(
            f"TimescaleDB extension is not installed for this PostgreSQL ({problem})",
            REQUIRE_TIMESCALEDB_ENV,
        )
    dbname = f"t_{uuid.uuid4().hex[:12]}"
    cluster.create_database(dbname)
    try:
        yield DbTarget(name, cluster.url(dbname), "require" if name == "timescaledb" else "off")
    finally:
        cluster.drop_database(dbname)


@pytest.fixture(params=["sqlite", "postgres", "timescaledb"])
def db_target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[DbTarget]:
    """A fresh empty database, once per backend; server databases are dropped afterwards."""
    if request.param == "sqlite":
        yield DbTarget("sqlite", f"sqlite:///{tmp_path}/metrics.db", "off")
    else:
        yield from _server_target(request, request.param)


@pytest.fixture(params=["postgres", "timescaledb"])
def pg_only_target(request: pytest.FixtureRequest) -> Iterator[DbTarget]:
    """Like db_target, for tests that need a PostgreSQL server (no sqlite case)."""
    yield from _server_target(request, request.param)


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[None]:
    """One temporary Prefect API server (and database) for the whole session, for flow runs.

    Starting it takes a while on a loaded machine, hence the generous timeout and the session
    scope: tests that run flows depend on this fixture and share the server.
    """
    # Imported here: sessions that run no flow do not pay for importing Prefect's test tools.
    from prefect.testing.utilities import prefect_test_harness

    # The throwaway server must not phone home (its heartbeat also contends for its SQLite).
    previous = os.environ.get("PREFECT_SERVER_ANALYTICS_ENABLED")
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    try:
        with prefect_test_harness(server_startup_timeout=180):
            yield
    finally:
        if previous is None:
            os.environ.pop("PREFECT_SERVER_ANALYTICS_ENABLED", None)
        else:
            os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = previous


# --------------------------------------------------------------------------- scheduling
# The suite runs on two xdist workers, one test file at a time each (`--dist loadfile`), and the
# files are handed out in collection order (`--no-loadscope-reorder` in pyproject). Longest
# first keeps both workers busy to the end: a long file handed out last would run alone while
# the other worker idles. The seconds below are each file's measured time on one worker (all of
# its tests and fixtures, a loaded two-core machine); only the order they give matters, so a file
# need not be listed until it is slow. Unlisted files follow, most tests first.
FILE_SECONDS: dict[str, float] = {
    # Measured on 2026-12-02 (load ~15 on two cores, so ~5x an idle machine's); the reliability
    # file errored in that run and is placed by its kill trials (tens of forked flow runs).
    "test_ingest_reliability.py": 600,
    "test_ui_e2e.py": 490,
    "test_storage_write.py": 440,
    "test_readme_commands.py": 420,  # its module fixture runs the demo
    "test_archive.py": 400,
    "test_serve_signals.py": 360,
    "test_deployments.py": 340,
    "test_ingest_flow.py": 310,
    "test_serve_restart.py": 310,
    "test_quality.py": 300,
    "test_demo.py": 300,
    "test_cli_startup.py": 265,
    "test_receive_peers.py": 250,
    "test_archive_spark.py": 210,
    "test_detect.py": 185,
    "test_read_limits.py": 185,
    "test_cli.py": 165,
    "test_write_parts.py": 135,
    "test_retention.py": 120,
    "test_rollup_query.py": 100,
    "test_rollup.py": 90,
    "test_receive.py": 90,
    "test_retention_chunks.py": 85,
    "test_demo_timescaledb.py": 80,
    "test_storage_query.py": 80,
    "test_ops_cli.py": 75,
    "test_landing.py": 57,
    "test_hostile_corpus.py": 54,
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Order the test files longest first; the tests of a file keep their order."""
    per_file: dict[str, int] = {}
    for item in items:
        name = item.path.name
        per_file[name] = per_file.get(name, 0) + 1

    def weight(item: pytest.Item) -> tuple[float, int]:
        name = item.path.name
        return (-FILE_SECONDS.get(name, 0.0), -per_file[name])

    items.sort(key=weight)  # stable: files stay whole and in order inside
