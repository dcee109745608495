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
