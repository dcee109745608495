"""The seed-001 async API (create_metrics_storage_system, MetricValue): a thin layer over Store.

Every call runs the synchronous Store method in a worker thread, one call at a time per system
(a Store holds a single connection). Retention rules (add_retention_rule,
apply_retention_policy, get_retention_summary) are the retention flow's storage calls.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal, TypeVar

import pandas as pd

from metricmill.errors import MetricmillError
from metricmill.selectors import Selector, parse_selector
from metricmill.settings import load_settings
from metricmill.types import MAX_TS_US, WriteReport, us_to_datetime
from storage.store import Store

StorageType = Literal["memory", "sqlite", "postgresql", "timescaledb"]
STORAGE_TYPES: tuple[str, ...] = ("memory", "sqlite", "postgresql", "timescaledb")
_KNOWN_KEYS = frozenset(
    {
        "storage_type",
        "storage_config",
        "retention_enabled",
        "setup_default_retention",
        "auto_cleanup",
        "cleanup_interval_hours",
    }
)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_END_OF_TIME = us_to_datetime(MAX_TS_US)
T = TypeVar("T")


@dataclass
class MetricValue:
    """One sample. `unit` is accepted for compatibility; it is not stored."""

    name: str
    value: float
    timestamp: datetime
    labels: dict[str, str] = field(default_factory=dict)
    unit: str | None = None


@dataclass(frozen=True)
class StorageConfig:
    """The seed's configuration dictionary, checked."""

    storage_type: StorageType = "sqlite"
    storage_config: Mapping[str, Any] = field(default_factory=dict)
    retention_enabled: bool = True
    setup_default_retention: bool = True
    auto_cleanup: bool = False
    cleanup_interval_hours: float = 24.0

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> StorageConfig:
        unknown = sorted(set(config) - _KNOWN_KEYS)
        if unknown:
            raise MetricmillError(
                f"unknown storage system option(s) {', '.join(unknown)}: "
                f"use {', '.join(sorted(_KNOWN_KEYS))}"
            )
        storage_type = config.get("storage_type", "sqlite")
        if storage_type not in STORAGE_TYPES:
            raise MetricmillError(
                f"unknown storage_type {storage_type!r}: use one of {', '.join(STORAGE_TYPES)}"
            )
        return cls(**config)


def create_metrics_storage_system(config: Mapping[str, Any] | None = None) -> MetricsStorageSystem:
    """A storage system for `config` (storage_type memory|sqlite|postgresql|timescaledb)."""
    return MetricsStorageSystem(StorageConfig.from_dict(config or {}))


def _open_store(config: StorageConfig) -> Store:
    options = config.storage_config
    if config.storage_type == "memory":
        return Store.memory()
    if config.storage_type == "sqlite":
        db_path = options.get("db_path")
        if db_path is None:
            db_path = load_settings().home / "metrics.db"
        return Store.open(f"sqlite:///{Path(db_path).expanduser().resolve()}", timescaledb="off")
    url = options.get("url") or options.get("dsn")
    if not url:
        raise MetricmillError(
            f"storage_type {config.storage_type!r} needs storage_config "
            "{'url': 'postgresql://USER@HOST:PORT/DB'}"
        )
    if config.storage_type == "timescaledb":
        return Store.open(str(url), timescaledb="require")
    return Store.open(str(url), timescaledb=options.get("timescaledb", "auto"))


def _points(frame: pd.DataFrame) -> Iterator[tuple[Any, ...]]:
    """(metric, labels, ts, value) for each row of a query result."""
    return zip(*(frame[c].tolist() for c in ("metric", "labels", "ts", "value")), strict=True)


def _selector(metric_name: str, labels: Mapping[str, str] | None) -> Selector:
    return Selector(metric_name, parse_selector(dict(labels or {})).matchers)


class MetricsStorageSystem:
    """Store, query, inspect and export metrics; call `initialize()` first, `cleanup()` last."""

    def __init__(self, config: StorageConfig) -> None:
        self.config = config
        self.retention_enabled = config.retention_enabled
        self.setup_default_retention = config.setup_default_retention
        self.auto_cleanup = config.auto_cleanup
        self.cleanup_interval_hours = config.cleanup_interval_hours
        self._store: Store | None = None
        self._lock = threading.Lock()
        self._last_retention: dict[str, Any] | None = None

    @property
    def store(self) -> Store:
        if self._store is None:
            raise MetricmillError("the storage system is not initialized: await initialize()")
        return self._store

    async def _call(self, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        def locked() -> T:
            with self._lock:
                return function(*args, **kwargs)

        return await asyncio.to_thread(locked)

    async def initialize(self) -> None:
        """Connect and create or upgrade the schema."""
        if self._store is None:
            self._store = await self._call(_open_store, self.config)

    async def cleanup(self) -> None:
        """Close the connection; the system can be initialized again."""
        if self._store is not None:
            store, self._store = self._store, None
            await self._call(store.close)

    # -- writes ---------------------------------------------------------------------------
    async def store_metric(self, metric: MetricValue) -> WriteReport:
        return await self.store_metrics([metric])

    async def store_metrics(self, metrics: list[MetricValue]) -> WriteReport:
        """Write the samples as one batch; rejected ones are quarantined and counted."""
        rows = [
            {"metric": m.name, "labels": m.labels, "ts": m.timestamp, "value": m.value}
            for m in metrics
        ]
        # Each call is a new write (last write wins), not a replay of an earlier identical call.
        batch_id = f"api-{uuid.uuid4().hex}"
        return await self._call(
            self.store.write_samples, rows, source="api:storage_system", batch_id=batch_id
        )

    # -- reads ----------------------------------------------------------------------------
    def _known(self, metric_name: str) -> bool:
        return not self.store.series(None, Selector(metric_name)).empty

    def _query(self, metric_name: str, labels: Mapping[str, str] | None, **kwargs: Any) -> Any:
        if not self._known(metric_name):
            return pd.DataFrame(columns=["metric", "labels", "ts", "value"])
        return self.store.query(None, _selector(metric_name, labels), **kwargs)

    async def query_metrics(
        self,
        metric_name: str,
        start_time: datetime,
        end_time: datetime,
        labels: Mapping[str, str] | None = None,
    ) -> list[MetricValue]:
        """Raw samples in [start_time, end_time); naive times are UTC."""
        frame = await self._call(self._query, metric_name, labels, start=start_time, end=end_time)
        return [
            MetricValue(metric, float(value), ts.to_pydatetime(), dict(labels))
            for metric, labels, ts, value in _points(frame)
        ]

    async def query_latest(
        self, metric_name: str, labels: Mapping[str, str] | None = None
    ) -> MetricValue | None:
        """The newest sample among the matching series, or None."""

        def latest() -> pd.DataFrame:
            if not self._known(metric_name):
                return pd.DataFrame()
            return self.store.latest(None, _selector(metric_name, labels))

        frame = await self._call(latest)
        if frame.empty:
            return None
        metric, labels, ts, value = max(_points(frame), key=lambda point: point[2])
        return MetricValue(metric, float(value), ts.to_pydatetime(), dict(labels))

    async def query_range(
        self,
        metric_name: str,
        start_time: datetime,
        end_time: datetime,
        step: timedelta | str | float,
        aggregation: str = "avg",
        labels: Mapping[str, str] | None = None,
    ) -> list[dict[str, Any]]:
        """One point per series and step bucket: {"timestamp", "value", "labels"}."""
        frame = await self._call(
            self._query,
            metric_name,
            labels,
            start=start_time,
            end=end_time,
            step=step,
            agg=aggregation,
        )
        return [
            {"timestamp": ts.to_pydatetime(), "value": float(value), "labels": dict(labels)}
            for _, labels, ts, value in _points(frame)
        ]

    # -- inspection and export ------------------------------------------------------------
    async def get_storage_stats(self) -> dict[str, Any]:
        stats = await self._call(self.store.stats)
        return {"storage_type": self.config.storage_type, **stats}

    async def health_check(self) -> dict[str, Any]:
        health = await self._call(self.store.health)
        return {
            "status": "healthy" if health.ok else "unhealthy",
            "ok": health.ok,
            "backend": health.backend_name,
            "schema_version": health.schema_version,
            "details": health.details,
            "problems": health.problems,
        }

    async def export_metrics(
        self,
        output_path: str | Path,
        metric_name: str,
        start_time: datetime | None = None,
        end_time: datetime | None = None,
        format: Literal["json", "csv", "parquet"] = "json",
        labels: Mapping[str, str] | None = None,
    ) -> str:
        """Write the samples to `output_path` under the export directory; returns the full path."""
        path, _ = await self._call(
            self.store.export,
            output_path,
            metric=None,
            selector=_selector(metric_name, labels),
            start=start_time or _EPOCH,
            end=end_time or _END_OF_TIME,
            format=format,
        )
        return str(path)

    # -- retention ------------------------------------------------------------------------
    def add_retention_rule(
        self,
        metric_pattern: str,
        retention_days: int | None = None,
        labels: Mapping[str, str] | None = None,
        priority: int = 0,
        *,
        level: str = "raw",
        archive: bool = True,
        legal_hold: bool = False,
    ) -> dict[str, Any]:
        """Store a retention rule (or, with legal_hold=True, a hold); returns it with its id."""
        with self._lock:
            rule = self.store.retention.add_rule(
                metric_pattern,
                retention_days,
                labels,
                priority,
                level=level,
                archive=archive,
                legal_hold=legal_hold,
            )
        return rule.as_dict()

    async def apply_retention_policy(self) -> dict[str, Any]:
        """Archive and delete what the rules let go (nothing when retention is disabled)."""
        if not self.retention_enabled:
            return {"skipped": "retention_enabled is False"}
        report = await self._call(self.store.retention.apply)
        self._last_retention = report.summary()
        return self._last_retention

    def get_retention_summary(self) -> dict[str, Any]:
        """The rules, the per-level defaults and what the last apply_retention_policy did."""
        with self._lock:
            rules = [r.as_dict() for r in self.store.retention.rules()]
            retention = self.store.retention
        return {
            "enabled": self.retention_enabled,
            "rules": rules,
            "defaults_days": {
                level: retention.default_days(level) for level in ("raw", "1m", "5m", "1h", "1d")
            },
            "last_run": self._last_retention,
        }
