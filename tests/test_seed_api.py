# ruff: noqa: E402, F841, I001, W293 - the seed example is kept verbatim, whitespace included
"""The seed-001 API: its "Basic Usage" example, verbatim but for the imports, on every backend.

Below the example: the same code with only its config dict swapped, then query_range and
export_metrics, which the example's "Advanced Queries" section uses.
"""

# fmt: off
import asyncio
from datetime import datetime, timedelta
from metricmill.storage_system import MetricValue, create_metrics_storage_system

async def main():
    # Create storage system
    storage_system = create_metrics_storage_system({
        "storage_type": "memory",  # Use in-memory storage
        "auto_cleanup": True,
        "cleanup_interval_hours": 1
    })
    
    # Initialize storage system
    await storage_system.initialize()
    
    try:
        # Store a metric
        metric = MetricValue(
            name="container_cpu_usage_percent",
            value=42.0,
            timestamp=datetime.now(),
            labels={"container_id": "container_123", "host": "host_1"},
            unit="percent"
        )
        await storage_system.store_metric(metric)
        
        # Query metrics
        metrics = await storage_system.query_metrics(
            metric_name="container_cpu_usage_percent",
            start_time=datetime.now() - timedelta(hours=1),
            end_time=datetime.now(),
            labels={"container_id": "container_123"}
        )
        
        # Get latest metric value
        latest = await storage_system.query_latest(
            metric_name="container_cpu_usage_percent",
            labels={"container_id": "container_123"}
        )
        
        # Get storage statistics
        stats = await storage_system.get_storage_stats()
        
    finally:
        # Clean up
        await storage_system.cleanup()

if __name__ == "__main__":
    asyncio.run(main())
# fmt: on


# ---------------------------------------------------------------------------------------------
import json
import types
from collections.abc import Callable, Coroutine, Iterator, Mapping
from datetime import UTC
from pathlib import Path
from typing import Any

import pytest

from metricmill.errors import ExportPathError, MetricmillError
from metricmill.storage_system import MetricsStorageSystem
from tests.dbtargets import DbTarget

BASE = datetime(2024, 1, 1, tzinfo=UTC)
SEED_LABELS = {"container_id": "container_123", "host": "host_1"}


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("METRICMILL_HOME", str(home))
    monkeypatch.delenv("METRICMILL_DATABASE_URL", raising=False)
    monkeypatch.delenv("METRICMILL_EXPORT_DIR", raising=False)
    return home


def config_for(target: DbTarget) -> dict[str, Any]:
    """The seed's storage_type/storage_config for a test database."""
    if target.name == "sqlite":
        return {"storage_type": "sqlite", "storage_config": {"db_path": target.url[10:]}}
    if target.name == "timescaledb":
        return {"storage_type": "timescaledb", "storage_config": {"url": target.url}}
    return {
        "storage_type": "postgresql",
        "storage_config": {"url": target.url, "timescaledb": "off"},
    }


def with_config(example: Callable[[], Any], overrides: Mapping[str, Any]) -> Callable[[], Any]:
    """The example's own code, unchanged, with its config dict updated by `overrides`."""

    def create(config: dict[str, Any]) -> MetricsStorageSystem:
        return create_metrics_storage_system({**config, **overrides})

    namespace = {**example.__globals__, "create_metrics_storage_system": create}
    return types.FunctionType(example.__code__, namespace, example.__name__)


def run_keeping_locals(coroutine: Coroutine[Any, Any, None]) -> dict[str, Any]:
    """Run the example to the end and hand back its local variables (it returns nothing)."""
    frame = coroutine.cr_frame
    asyncio.run(coroutine)
    return dict(frame.f_locals)


def assert_seed_results(found: dict[str, Any]) -> None:
    [stored] = found["metrics"]
    assert stored.name == "container_cpu_usage_percent"
    assert stored.value == 42.0
    assert stored.labels == SEED_LABELS
    assert stored.timestamp.replace(tzinfo=None) == found["metric"].timestamp
    latest = found["latest"]
    assert (latest.value, latest.labels) == (42.0, SEED_LABELS)
    assert found["stats"]["samples"] == 1
    assert found["stats"]["series"] == 1


def test_seed_example_verbatim_on_memory() -> None:
    found = run_keeping_locals(main())
    assert found["stats"]["storage_type"] == "memory"
    assert_seed_results(found)


def test_seed_example_on_every_backend(db_target: DbTarget) -> None:
    found = run_keeping_locals(with_config(main, config_for(db_target))())
    assert found["stats"]["backend"] == db_target.name.replace("postgres", "postgresql")
    assert_seed_results(found)


# -- beyond the basic example -----------------------------------------------------------------
def initialized(config: dict[str, Any]) -> Iterator[MetricsStorageSystem]:
    storage = create_metrics_storage_system(config)
    asyncio.run(storage.initialize())
    yield storage
    asyncio.run(storage.cleanup())


@pytest.fixture
def system(db_target: DbTarget) -> Iterator[MetricsStorageSystem]:
    """An initialized system on each db_target backend."""
    yield from initialized(config_for(db_target))


@pytest.fixture
def memory_system() -> Iterator[MetricsStorageSystem]:
    yield from initialized({"storage_type": "memory"})


def ten_minutes(host: str, offset: float = 0.0) -> list[MetricValue]:
    return [
        MetricValue("system_load_1m", i + offset, BASE + timedelta(minutes=i), {"host": host})
        for i in range(10)
    ]


def test_query_range_aggregates_per_step(system: MetricsStorageSystem) -> None:
    check_query_range(system)


def test_query_range_aggregates_per_step_in_memory(memory_system: MetricsStorageSystem) -> None:
    check_query_range(memory_system)


def check_query_range(system: MetricsStorageSystem) -> None:
    async def scenario() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        await system.store_metrics(ten_minutes("a") + ten_minutes("b", offset=100))
        averages = await system.query_range(
            metric_name="system_load_1m",
            start_time=BASE,
            end_time=BASE + timedelta(hours=1),
            step=timedelta(minutes=5),
            aggregation="avg",
            labels={"host": "a"},
        )
        peaks = await system.query_range(
            "system_load_1m", BASE, BASE + timedelta(hours=1), timedelta(minutes=5), "max"
        )
        return averages, peaks

    averages, peaks = asyncio.run(scenario())
    assert averages == [
        {"timestamp": BASE, "value": 2.0, "labels": {"host": "a"}},
        {"timestamp": BASE + timedelta(minutes=5), "value": 7.0, "labels": {"host": "a"}},
    ]
    assert [(p["labels"]["host"], p["value"]) for p in peaks] == [
        ("a", 4.0), ("a", 9.0), ("b", 104.0), ("b", 109.0)
    ]  # fmt: skip


def test_export_metrics_to_relative_paths(system: MetricsStorageSystem, home: Path) -> None:
    check_export(system, home)


def test_export_metrics_to_relative_paths_in_memory(
    memory_system: MetricsStorageSystem, home: Path
) -> None:
    check_export(memory_system, home)


def check_export(system: MetricsStorageSystem, home: Path) -> None:
    async def scenario() -> tuple[str, str]:
        await system.store_metrics(ten_minutes("a"))
        as_json = await system.export_metrics(
            output_path="metrics_export.json",
            metric_name="system_load_1m",
            start_time=BASE - timedelta(days=7),
            format="json",
        )
        as_csv = await system.export_metrics(
            "nested/load.csv", "system_load_1m", format="csv", labels={"host": "a"}
        )
        return as_json, as_csv

    as_json, as_csv = asyncio.run(scenario())
    assert as_json == str(home / "exports" / "metrics_export.json")
    rows = json.loads(Path(as_json).read_text(encoding="utf-8"))
    assert [r["value"] for r in rows] == [float(i) for i in range(10)]
    assert rows[0]["labels"] == {"host": "a"} and rows[0]["ts"] == BASE.isoformat()
    assert as_csv == str(home / "exports" / "nested" / "load.csv")
    lines = Path(as_csv).read_text(encoding="utf-8").splitlines()
    assert lines[0] == "metric,labels,ts,value" and len(lines) == 11


@pytest.mark.parametrize("output_path", ["../outside.json", "/tmp/outside.json"])
def test_export_metrics_stays_in_the_export_dir(output_path: str) -> None:
    async def scenario() -> None:
        storage = create_metrics_storage_system({"storage_type": "memory"})
        await storage.initialize()
        try:
            await storage.store_metrics(ten_minutes("a"))
            await storage.export_metrics(output_path, "system_load_1m")
        finally:
            await storage.cleanup()

    with pytest.raises(ExportPathError):
        asyncio.run(scenario())


def test_unknown_metric_reads_as_empty_and_latest_as_none() -> None:
    async def scenario() -> tuple[list[MetricValue], MetricValue | None, list[dict[str, Any]]]:
        storage = create_metrics_storage_system({"storage_type": "memory"})
        await storage.initialize()
        try:
            day = (BASE, BASE + timedelta(days=1))
            return (
                await storage.query_metrics("nothing_here", *day),
                await storage.query_latest("nothing_here"),
                await storage.query_range("nothing_here", *day, timedelta(minutes=5)),
            )
        finally:
            await storage.cleanup()

    assert asyncio.run(scenario()) == ([], None, [])


def test_latest_is_the_newest_among_matching_series() -> None:
    async def scenario() -> MetricValue | None:
        storage = create_metrics_storage_system({"storage_type": "memory"})
        await storage.initialize()
        try:
            await storage.store_metrics(ten_minutes("a") + ten_minutes("b")[:5])
            return await storage.query_latest("system_load_1m")
        finally:
            await storage.cleanup()

    latest = asyncio.run(scenario())
    assert latest is not None
    assert (latest.value, latest.labels, latest.timestamp) == (
        9.0, {"host": "a"}, BASE + timedelta(minutes=9)
    )  # fmt: skip


def test_health_check_reports_healthy(system: MetricsStorageSystem) -> None:
    health = asyncio.run(system.health_check())
    assert health["status"] == "healthy" and health["problems"] == []


def test_a_later_write_of_the_same_sample_wins() -> None:
    async def scenario() -> list[MetricValue]:
        storage = create_metrics_storage_system({"storage_type": "memory"})
        await storage.initialize()
        try:
            for value in (1.0, 2.0, 1.0):
                await storage.store_metric(MetricValue("m", value, BASE, {}))
            return await storage.query_metrics("m", BASE, BASE + timedelta(seconds=1))
        finally:
            await storage.cleanup()

    assert [m.value for m in asyncio.run(scenario())] == [1.0]


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"storage_type": "file"}, "unknown storage_type 'file'"),
        ({"storage_type": "memory", "storage_typo": 1}, "unknown storage system option"),
        ({"storage_type": "postgresql"}, "needs storage_config"),
    ],
)
def test_bad_config_is_a_clear_error(config: dict[str, Any], expected: str) -> None:
    with pytest.raises(MetricmillError, match=expected):
        asyncio.run(create_metrics_storage_system(config).initialize())


def test_methods_before_initialize_say_so() -> None:
    storage = create_metrics_storage_system({"storage_type": "memory"})
    with pytest.raises(MetricmillError, match="initialize"):
        asyncio.run(storage.get_storage_stats())
