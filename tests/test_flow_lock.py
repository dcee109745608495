"""A flow run's advisory lock across a database restart: the session that held it is gone, so
the run takes it again before writing, or stops if another run holds it now; releasing it on a
dead session never turns a success into a failure; writes ride out a restart."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import psycopg
import pytest

from metricmill.devtools.pgcluster import PgCluster
from metricmill.settings import Settings, load_settings
from storage.locks import LockLost, ensure_flow_lock, flow_lock, lock_holders
from storage.retry import with_database_retries
from storage.store import Store
from tests.dbtargets import DbTarget
from tests.settings_env import isolate_settings


@pytest.fixture
def settings(pg_only_target: DbTarget, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Settings:
    isolate_settings(monkeypatch)
    return load_settings(database_url=pg_only_target.url, home=tmp_path)


def _end_lock_sessions(url: str) -> None:
    """What a restart does to the lock: the session holding it ends."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name LIKE 'metricmill flow lock %%' AND pid <> pg_backend_pid()"
        )
    time.sleep(0.2)


def test_a_lost_lock_is_taken_again_before_writing(settings: Settings) -> None:
    with flow_lock(settings, "ingest") as held:
        assert held
        _end_lock_sessions(settings.database_url)
        assert lock_holders(settings) == []
        ensure_flow_lock(settings, "ingest")
        assert lock_holders(settings) == ["ingest"]
    assert lock_holders(settings) == []


def test_a_run_whose_lock_another_run_took_stops(settings: Settings) -> None:
    with flow_lock(settings, "ingest") as held:
        assert held
        _end_lock_sessions(settings.database_url)
        other = threading.Event()
        done = threading.Event()

        def second_run() -> None:
            with flow_lock(settings, "ingest") as second_held:
                assert second_held
                other.set()
                done.wait(30)

        thread = threading.Thread(target=second_run)
        thread.start()
        try:
            assert other.wait(30)
            with pytest.raises(LockLost, match="another run holds it"):
                ensure_flow_lock(settings, "ingest")
        finally:
            done.set()
            thread.join(30)


def test_releasing_a_lock_whose_session_died_is_not_an_error(settings: Settings) -> None:
    with flow_lock(settings, "rollup") as held:
        assert held
        _end_lock_sessions(settings.database_url)
    with flow_lock(settings, "rollup") as again:  # and it is free for the next run
        assert again


def test_a_write_rides_out_a_restart(pg_cluster: PgCluster, tmp_path: Path) -> None:
    cluster = PgCluster(tmp_path / "restart-pg", bindir=pg_cluster.bindir, durable=True)
    cluster.start()
    try:
        cluster.create_database("r")
        url = cluster.url("r")
        Store.open(url, timescaledb="off").close()
        cluster.stop(mode="immediate")
        restarter = threading.Timer(3.0, cluster.start)
        restarter.start()
        retries: list[str] = []

        def count() -> int:
            with Store.open(url, timescaledb="off") as store:
                return int(store.backend.execute("SELECT count(*) FROM samples")[0][0])

        assert with_database_retries(count, on_retry=lambda e, d: retries.append(str(e))) == 0
        restarter.join()
        assert retries and "Connection refused" in retries[0]
    finally:
        cluster.close()
