"""What `Store.stats()` and `Store.health()` report: table sizes, sample bounds, connectivity,
the schema version, backend details and a write probe."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from metricmill.types import us_to_datetime
from storage.records import Health
from storage.schema import LATEST_VERSION
from storage.sqlite import SQLiteBackend

if TYPE_CHECKING:
    from storage.store import Store


def store_stats(store: Store) -> dict[str, Any]:
    """Rows and bytes per table, series count, oldest and newest sample."""
    counts = store.backend.table_counts()
    sizes = store.backend.table_bytes()
    oldest, newest = store.backend.sample_bounds()
    return {
        "backend": store.backend_name,
        "schema_version": store.schema_version(),
        "series": counts["series"],
        "samples": counts["samples"],
        "oldest_sample": None if oldest is None else us_to_datetime(oldest),
        "newest_sample": None if newest is None else us_to_datetime(newest),
        "tables": {
            table: {"rows": rows, "bytes": sizes.get(table)} for table, rows in counts.items()
        },
        "bytes_total": sum(sizes.values()),
    }


def store_health(store: Store) -> Health:
    """Connectivity, schema version, WAL/TimescaleDB status and a write probe."""
    problems: list[str] = []
    started = time.perf_counter()
    version = store.schema_version()
    details: dict[str, Any] = {"url": store.settings.masked_database_url}
    details["round_trip_ms"] = round((time.perf_counter() - started) * 1000, 2)
    details.update(store.backend.health_details())
    if version != LATEST_VERSION:
        problems.append(
            f"schema version {version}, expected {LATEST_VERSION}: run `metricmill init`"
        )
    sqlite_file = isinstance(store.backend, SQLiteBackend) and not store.backend.memory
    if sqlite_file and str(details.get("journal_mode", "")).lower() != "wal":
        problems.append("SQLite is not in WAL mode")
    probe_started = time.perf_counter()
    try:
        store.backend.write_probe()
        details["write_probe_ms"] = round((time.perf_counter() - probe_started) * 1000, 2)
    except Exception as exc:  # a failed probe is a finding, not a crash
        problems.append(f"write probe failed: {str(exc).splitlines()[0]}")
    return Health(
        ok=not problems,
        backend_name=store.backend_name,
        schema_version=version,
        details=details,
        problems=problems,
    )
