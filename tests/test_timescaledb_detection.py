"""TimescaleDB is detected at connect time, never assumed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from metricmill.devtools.pgcluster import PgCluster, find_pg_bindir, timescaledb_installed
from metricmill.errors import SchemaError
from storage.store import Store


def test_installed_but_not_preloaded_extension_is_reported_not_used(tmp_path: Path) -> None:
    bindir = find_pg_bindir()
    if bindir is None:
        if os.environ.get("METRICMILL_REQUIRE_POSTGRES") == "1":
            pytest.fail("PostgreSQL server binaries not found")
        pytest.skip("PostgreSQL server binaries not found (set METRICMILL_PG_BINDIR)")
    if not timescaledb_installed(bindir):
        if os.environ.get("METRICMILL_REQUIRE_TIMESCALEDB") == "1":
            pytest.fail("TimescaleDB extension files are not installed")
        pytest.skip("TimescaleDB extension files are not installed for this PostgreSQL")
    with PgCluster(tmp_path, bindir=bindir, preload_timescaledb=False) as cluster:
        cluster.create_database("plain")
        with Store.open(cluster.url("plain"), timescaledb="auto") as store:
            assert store.backend_name == "postgresql"
            health = store.health()
            assert health.ok
            assert "not preloaded" in health.details["timescaledb"]
            store.write_samples([{"metric": "up", "ts": "2024-01-01T00:00:00Z", "value": 1}])
            assert store.stats()["samples"] == 1
        with pytest.raises(SchemaError, match="shared_preload_libraries"):
            Store.open(cluster.url("plain"), timescaledb="require")
