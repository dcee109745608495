"""What an operator asks the database: how far behind ingestion and rollups are, what is open,
what was set aside, and what TimescaleDB is doing in the background.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from metricmill.types import us_to_datetime
from storage.backend import Backend

OPEN_ALERT_STATUSES = ("firing", "acknowledged")


@dataclass
class Snapshot:
    last_batch_at: datetime | None  # when the newest committed batch was written
    newest_sample: datetime | None
    batches_24h: int
    pending_ranges: int
    oldest_pending_start: datetime | None  # the earliest data time still to roll up
    oldest_pending_since: datetime | None  # when that range was recorded
    newest_rollup_1m: datetime | None
    open_alerts: dict[str, int] = field(default_factory=dict)  # severity -> count
    quarantined_rows: int = 0  # not replayed yet


def _when(value: Any) -> datetime | None:
    return None if value is None else us_to_datetime(int(value))


def snapshot(backend: Backend, *, now_us: int) -> Snapshot:
    """The operator's numbers, read in a handful of aggregate queries."""
    out = backend.ts_out.format
    ts_in = backend.ts_in
    batches = backend.execute(
        f"SELECT {out(col='max(created_at)')}, "  # noqa: S608
        f"sum(CASE WHEN created_at >= {ts_in} THEN 1 ELSE 0 END) "
        "FROM ingest_batches WHERE status = 'committed'",
        (now_us - 86_400_000_000,),
    )[0]
    newest_sample = backend.execute(f"SELECT {out(col='max(ts)')} FROM samples")[0][0]  # noqa: S608
    pending = backend.execute(
        f"SELECT count(*), {out(col='min(start_ts)')}, {out(col='min(created_at)')} "  # noqa: S608
        "FROM rollup_pending"
    )[0]
    rollup = backend.execute(f"SELECT {out(col='max(bucket)')} FROM rollup_1m")[0][0]  # noqa: S608
    alerts = backend.execute(
        "SELECT severity, count(*) FROM alerts WHERE status IN (%s, %s) GROUP BY severity",
        OPEN_ALERT_STATUSES,
    )
    quarantined = backend.execute("SELECT count(*) FROM quarantine WHERE replayed_at IS NULL")[0]
    return Snapshot(
        last_batch_at=_when(batches[0]),
        newest_sample=_when(newest_sample),
        batches_24h=int(batches[1] or 0),
        pending_ranges=int(pending[0]),
        oldest_pending_start=_when(pending[1]),
        oldest_pending_since=_when(pending[2]),
        newest_rollup_1m=_when(rollup),
        open_alerts={str(s): int(n) for s, n in alerts},
        quarantined_rows=int(quarantined[0]),
    )


def timescale_jobs(backend: Backend) -> list[tuple[str, str, bool]]:
    """TimescaleDB background jobs: (policy, hypertable, scheduled); [] elsewhere."""
    return backend.timescale_jobs()


def compressed_hypertables(backend: Backend) -> list[tuple[str, bool]]:
    """(hypertable, compression enabled) for every hypertable; [] when not TimescaleDB."""
    return backend.compressed_hypertables()
