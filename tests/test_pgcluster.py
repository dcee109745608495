"""The throwaway PostgreSQL cluster and the database target fixtures."""

from __future__ import annotations

import uuid
from pathlib import Path

import psycopg
import pytest

from metricmill.devtools.pgcluster import PgCluster, find_pg_bindir, timescaledb_problem
from tests.dbtargets import DbTarget


def test_cluster_answers_select_1(pg_cluster: PgCluster) -> None:
    assert pg_cluster.host == "127.0.0.1"
    assert pg_cluster.url() == f"postgresql://postgres@127.0.0.1:{pg_cluster.port}/postgres"
    with psycopg.connect(pg_cluster.url()) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        listen = conn.execute("SHOW listen_addresses").fetchone()
        assert listen == ("127.0.0.1",)


def _database_exists(cluster: PgCluster, name: str) -> bool:
    with psycopg.connect(cluster.url()) as conn:
        row = conn.execute("SELECT count(*) FROM pg_database WHERE datname = %s", (name,))
        found = row.fetchone()
        return found is not None and found[0] == 1


def test_created_database_is_isolated_and_dropped(pg_cluster: PgCluster) -> None:
    first, second = (f"t_{uuid.uuid4().hex[:12]}" for _ in range(2))
    pg_cluster.create_database(first)
    pg_cluster.create_database(second)
    try:
        with psycopg.connect(pg_cluster.url(first), autocommit=True) as conn:
            conn.execute("CREATE TABLE only_here (x int)")
        with psycopg.connect(pg_cluster.url(second), autocommit=True) as conn:
            found = conn.execute("SELECT to_regclass('only_here')").fetchone()
            assert found == (None,)
        # A connection still open does not prevent the drop.
        lingering = psycopg.connect(pg_cluster.url(first), autocommit=True)
        pg_cluster.drop_database(first)
        assert not _database_exists(pg_cluster, first)
        lingering.close()
        pg_cluster.drop_database(first)  # dropping a missing database is fine
    finally:
        pg_cluster.drop_database(first)
        pg_cluster.drop_database(second)
    assert not _database_exists(pg_cluster, second)


def test_database_names_are_identifiers_not_sql(pg_cluster: PgCluster) -> None:
    name = 'odd "name"; DROP DATABASE postgres'
    pg_cluster.create_database(name)
    try:
        assert _database_exists(pg_cluster, name)
    finally:
        pg_cluster.drop_database(name)
    assert not _database_exists(pg_cluster, name)
    assert _database_exists(pg_cluster, "postgres")


def test_restart_keeps_data(tmp_path: Path, pg_cluster: PgCluster) -> None:
    # A cluster of its own: restarting the session one would disturb other tests.
    with PgCluster(tmp_path / "pg", bindir=pg_cluster.bindir) as cluster:
        port = cluster.port
        with psycopg.connect(cluster.url(), autocommit=True) as conn:
            conn.execute("CREATE TABLE kept (v text)")
            conn.execute("INSERT INTO kept VALUES ('still here')")
        cluster.restart()
        assert cluster.port == port
        with psycopg.connect(cluster.url()) as conn:
            assert conn.execute("SELECT v FROM kept").fetchall() == [("still here",)]
        cluster.stop()
        cluster.stop()  # stopping twice is harmless
        assert not cluster.running


def test_db_target_is_usable(db_target: DbTarget, tmp_path: Path) -> None:
    assert db_target.timescaledb == ("require" if db_target.name == "timescaledb" else "off")
    if db_target.name == "sqlite":
        prefix = "sqlite:///"
        assert db_target.url.startswith(prefix)
        path = Path(db_target.url.removeprefix(prefix))
        assert path.is_absolute()
        assert path.parent == tmp_path
        return
    with psycopg.connect(db_target.url, autocommit=True) as conn:
        dbname = conn.execute("SELECT current_database()").fetchone()
        assert dbname is not None and dbname[0].startswith("t_")
        conn.execute("CREATE TABLE probe (x int)")
        conn.execute("INSERT INTO probe VALUES (1)")
        assert conn.execute("SELECT x FROM probe").fetchall() == [(1,)]
        if db_target.timescaledb == "require":
            conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")


@pytest.mark.parametrize("bad_mode", ["", "slow"])
def test_stop_rejects_unknown_mode(pg_cluster: PgCluster, bad_mode: str) -> None:
    with pytest.raises(ValueError, match="stop mode"):
        pg_cluster.stop(bad_mode)


def _fake_bindir(root: Path, version_line: str) -> Path:
    bindir = root / "bin"
    bindir.mkdir(parents=True)
    for program in ("initdb", "pg_ctl", "postgres"):
        script = bindir / program
        script.write_text(f"#!/bin/sh\necho '{version_line}'\n")
        script.chmod(0o755)
    return bindir


def test_bindir_override_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bindir = _fake_bindir(tmp_path, "postgres (PostgreSQL) 99.1")
    monkeypatch.setenv("METRICMILL_PG_BINDIR", str(bindir))
    assert find_pg_bindir() == bindir
    monkeypatch.setenv("METRICMILL_PG_BINDIR", str(tmp_path / "nowhere"))
    with pytest.raises(RuntimeError, match="METRICMILL_PG_BINDIR"):
        find_pg_bindir()


def test_timescaledb_problem_names_the_missing_control_file(tmp_path: Path) -> None:
    bindir = _fake_bindir(tmp_path, "postgres (PostgreSQL) 99.1")
    assert timescaledb_problem(bindir) == (
        "/usr/share/postgresql/99/extension/timescaledb.control not found"
    )
