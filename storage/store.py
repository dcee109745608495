"""The one storage API above every backend: write, query, inspect, export."""

from __future__ import annotations

import fnmatch
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from metricmill.errors import MetricmillError, QueryError, SchemaError
from metricmill.selectors import Selector, parse_selector
from metricmill.settings import MEMORY_URL, Settings, load_settings
from metricmill.timeutil import parse_duration, parse_time
from metricmill.types import US_PER_SECOND, Reason, WriteReport, datetime_to_us, us_to_datetime
from storage.aggregates import STATS_FOR, aggregate
from storage.alert_facade import Alerts
from storage.archive import with_archive
from storage.backend import Backend
from storage.export import ExportFormat, confined_path, write_export
from storage.facades import Detection, Ops, Quarantine, Retention, Rollups
from storage.frames import PreparedBatch
from storage.health import store_health, store_stats
from storage.normalise import prepare
from storage.postgres import PostgresBackend, TimescaleMode
from storage.records import Health
from storage.rollup import (
    QUERY_LEVELS,
    ROLLUP_LEVELS,
    RollupReport,
    RollupStatus,
    resolved_stats,
)
from storage.schema import LATEST_VERSION
from storage.sqlite import SQLiteBackend

Agg = Literal["avg", "min", "max", "sum", "count", "last", "stddev", "rate", "increase"]
AGGREGATIONS: tuple[str, ...] = (
    *("avg", "min", "max", "sum", "count", "last", "stddev", "rate", "increase"),
)
DEFAULT_RANGE = timedelta(hours=1)
_OUTPUT_COLUMNS = ["metric", "labels", "ts", "value"]


def open_backend(url: str, timescaledb: TimescaleMode = "auto") -> Backend:
    if url.startswith("sqlite:///") or url == MEMORY_URL:
        return SQLiteBackend(url)
    return PostgresBackend(url, timescaledb=timescaledb)


def _to_us_array(ts_us: pd.Series) -> pd.DatetimeIndex:
    return pd.to_datetime(ts_us.to_numpy(dtype="int64"), unit="us", utc=True)


class Store:
    """Samples, series and everything derived from them, on SQLite or PostgreSQL/TimescaleDB."""

    def __init__(self, backend: Backend, settings: Settings) -> None:
        self.backend = backend
        self.settings = settings

    @classmethod
    def open(
        cls,
        url: str | None = None,
        *,
        settings: Settings | None = None,
        timescaledb: TimescaleMode | None = None,
        init: bool = True,
    ) -> Store:
        """Connect (and, unless init=False, create or upgrade the schema)."""
        overrides: dict[str, Any] = {"database_url": url, "timescaledb": timescaledb}
        if settings is None:
            settings = load_settings(**overrides)
        elif url is not None or timescaledb is not None:
            settings = settings.model_copy(
                update={k: v for k, v in overrides.items() if v is not None}
            )
            settings.database_url = Settings._normalise_url(settings.database_url)
        store = cls(open_backend(settings.database_url, settings.timescaledb), settings)
        if init:
            try:
                store.init()
            except BaseException:
                store.close()
                raise
        return store

    @classmethod
    def memory(cls) -> Store:
        """A throwaway in-memory store for notebooks and quick tests."""
        return cls.open(MEMORY_URL)

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.backend.close()

    # -- one facade per concern (what the tasks, flows and CLI call; never the backend) ------
    @cached_property
    def alerts(self) -> Alerts:
        """Alerts, the rule engine's state, alert rules, silences and notifications."""
        return Alerts(self.backend)

    @cached_property
    def retention(self) -> Retention:
        """Retention rules, applying them, the Parquet archive and chunk compression."""
        return Retention(self)

    @cached_property
    def detection(self) -> Detection:
        """Baselines, detector models, detect watermarks and late-data marks."""
        return Detection(self)

    @cached_property
    def rollups(self) -> Rollups:
        """Running the rollups, their status, and reading written rollup rows back."""
        return Rollups(self.backend, self.settings.rollup_chunk_hours)

    @cached_property
    def quarantine(self) -> Quarantine:
        """Quarantined rows and batches: `store.quarantine(limit=...)`, `.entry`, ..."""
        return Quarantine(self.backend)

    @cached_property
    def ops(self) -> Ops:
        """The operator's snapshot and the TimescaleDB setup."""
        return Ops(self.backend)

    @property
    def backend_name(self) -> str:
        if self.backend.timescale:
            return "timescaledb"
        return self.backend.name

    # -- schema ---------------------------------------------------------------------------
    def init(self, target: int = LATEST_VERSION) -> tuple[int, int]:
        """Create or upgrade the schema; a second call is a no-op. (version before, after)."""
        current = self.backend.schema_version()
        if current is not None and current > LATEST_VERSION:
            raise SchemaError(
                f"database schema version {current} is newer than this metricmill "
                f"understands ({LATEST_VERSION}); upgrade metricmill"
            )
        return self.backend.migrate(target)

    def schema_version(self) -> int | None:
        return self.backend.schema_version()

    # -- writes ---------------------------------------------------------------------------
    def write_samples(
        self,
        frame: pd.DataFrame | Iterable[Mapping[str, Any]],
        *,
        source: str = "api",
        batch_id: str | None = None,
        rejected: Sequence[tuple[dict[str, Any], str]] = (),
        max_new_series: int | None = None,
    ) -> WriteReport:
        """Write a batch exactly once; bad rows are quarantined with a reason, the rest land.

        `rejected` are rows an earlier check (the data-quality suite) set aside: they are
        quarantined in the same transaction. With `max_new_series`, a batch that would create
        more new series than that is quarantined whole and nothing of it is written.
        """
        batch = prepare(frame)
        batch.add_rejected(list(rejected))
        return self.write_batch(
            batch, source=source, batch_id=batch_id, max_new_series=max_new_series
        )

    def write_batch(
        self,
        batch: PreparedBatch,
        *,
        source: str = "api",
        batch_id: str | None = None,
        max_new_series: int | None = None,
    ) -> WriteReport:
        """Write a batch a verdict has already been given on (`storage.normalise.encode`):
        its kept rows land and its rejected rows are quarantined, exactly once; nothing is
        checked again. `write_samples` without the checking."""
        report = WriteReport(batch_id=batch_id or batch.content_hash, source=source)
        report.rows_in = batch.rows_in
        if batch.rows_in == 0:
            return report
        counts = self.backend.write_prepared(
            batch, batch_id=report.batch_id, source=source, max_new_series=max_new_series
        )
        report.replay = counts.replay
        if counts.replay:
            return report
        if counts.guarded_new_series:
            report.guarded_new_series = counts.guarded_new_series
            report.rejected = Counter({Reason.CARDINALITY_LIMIT: batch.rows_in})
            return report
        report.new_series = counts.new_series
        report.written = counts.written
        report.overwritten = counts.overwritten
        report.unchanged = counts.unchanged
        report.rejected = Counter(reason for _, reason in batch.rejected)
        if len(batch.ts_us):
            report.min_ts = us_to_datetime(int(batch.ts_us.min()))
            report.max_ts = us_to_datetime(int(batch.ts_us.max()))
        return report

    def committed_batches(self, batch_ids: Sequence[str]) -> dict[str, int]:
        """Of these batch ids, the committed ones and their rows in (writing them is a replay)."""
        return self.backend.committed_batches(batch_ids)

    def record_failures(self, failures: Sequence[tuple[str, str, str]]) -> None:
        """Note in the ledger why these batches (id, source, error) could not be written."""
        self.backend.record_failures(failures)

    def failed_batches(self) -> list[tuple[str, str, str, int]]:
        """(batch id, source, last error, failures) of batches whose writes failed."""
        return self.backend.failed_batches()

    def write_sample_parts(
        self,
        frame: pd.DataFrame,
        *,
        parts: np.ndarray,
        batch_ids: Sequence[str],
        sources: Sequence[str],
        rejected: Sequence[Sequence[tuple[dict[str, Any], str]]] = (),
        max_new_series: int | None = None,
    ) -> list[WriteReport]:
        """Several batches in one frame (`parts`: each row's batch number), each written
        exactly once as `write_samples` would in order, in one transaction; a report each.

        The per-series work (label canonicalisation, series lookup) is done once for all.
        `rejected[i]` are the rows an earlier check set aside from batch i.
        """
        batch = prepare(frame, parts=parts, n_parts=len(batch_ids))
        for number, rows in enumerate(rejected):
            batch.add_rejected(list(rows), number)
        return self.write_batch_parts(
            batch, batch_ids=batch_ids, sources=sources, max_new_series=max_new_series
        )

    def write_batch_parts(
        self,
        batch: PreparedBatch,
        *,
        batch_ids: Sequence[str],
        sources: Sequence[str],
        max_new_series: int | None = None,
    ) -> list[WriteReport]:
        """`write_sample_parts` for a batch of parts a verdict has already been given on."""
        assert batch.part_rows_in is not None
        counts = self.backend.write_parts(
            batch, batch_ids=batch_ids, sources=sources, max_new_series=max_new_series
        )
        reports = []
        for number, (count, batch_id, source) in enumerate(
            zip(counts, batch_ids, sources, strict=True)
        ):
            report = WriteReport(batch_id=batch_id, source=source)
            report.rows_in = int(batch.part_rows_in[number])
            report.replay = count.replay
            reports.append(report)
            if count.replay:
                continue
            if count.guarded_new_series:
                report.guarded_new_series = count.guarded_new_series
                report.rejected = Counter({Reason.CARDINALITY_LIMIT: report.rows_in})
                continue
            report.new_series = count.new_series
            report.written = count.written
            report.overwritten = count.overwritten
            report.unchanged = count.unchanged
            report.rejected = Counter(
                reason
                for (_, reason), part in zip(batch.rejected, batch.rejected_parts, strict=True)
                if part == number
            )
            assert batch.parts is not None
            ts = batch.ts_us[batch.parts == number]
            if len(ts):
                report.min_ts = us_to_datetime(int(ts.min()))
                report.max_ts = us_to_datetime(int(ts.max()))
        return reports

    # -- rollups -------------------------------------------------------------------------
    def rollup(self, *, max_chunks: int | None = None) -> RollupReport:
        """Recompute the pending ranges at 1m, 5m, 1h and 1d (`store.rollups.run`)."""
        return self.rollups.run(max_chunks=max_chunks)

    def rollup_status(self) -> RollupStatus:
        """Pending ranges and the lag of the newest rolled-up bucket (`store.rollups.status`)."""
        return self.rollups.status()

    # -- reads ----------------------------------------------------------------------------

    def _window(self, start: str | datetime | None, end: str | datetime | None) -> tuple[int, int]:
        now = datetime.now(UTC)
        end_dt = parse_time(end, now=now) or now
        start_dt = parse_time(start, now=now) or (end_dt - DEFAULT_RANGE)
        if start_dt >= end_dt:
            raise QueryError(f"start {start_dt.isoformat()} is not before end {end_dt.isoformat()}")
        return datetime_to_us(start_dt), datetime_to_us(end_dt)

    def _matching_series(
        self, metric: str | None, selector: str | Mapping[str, str] | Selector | None
    ) -> tuple[str, dict[int, dict[str, str]]]:
        parsed = parse_selector(selector)
        name = metric or parsed.metric
        if not name:
            raise QueryError('no metric given: name one, e.g. cpu_usage or cpu_usage{host="a"}')
        if parsed.metric and metric and parsed.metric != metric:
            raise QueryError(f"selector names metric {parsed.metric!r} but {metric!r} was asked")
        # Label equalities narrow the read in the database, so a query of one series of a
        # metric with 100,000 does not parse them all; an empty value also matches a missing
        # label, so it is only matched here. No candidate left: tell an unknown metric apart.
        having = {k: v for k, v in parsed.equalities.items() if v != ""}
        candidates = self.backend.find_series(name, having)
        if not candidates and (not having or not self.backend.metric_exists(name)):
            raise QueryError(f"unknown metric {name!r}")
        return name, {sid: labels for sid, _, labels in candidates if parsed.matches(labels)}

    def query(
        self,
        metric: str | None,
        selector: str | Mapping[str, str] | Selector | None = None,
        start: str | datetime | None = None,
        end: str | datetime | None = None,
        step: str | int | float | timedelta | None = None,
        agg: str | None = None,
        level: str | None = None,
        include_archive: bool = False,
    ) -> pd.DataFrame:
        """Raw points in [start, end), or per-step aggregates (avg by default) when step is set.

        include_archive: also read archived (Parquet) data where the database holds none.

        Buckets are aligned to the Unix epoch; each point's ts is its bucket's start. Steps are
        read from the coarsest rollup level that divides the step (raw samples for what is not
        rolled up yet); `level` forces one of raw, 1m, 5m, 1h, 1d (alone: its own buckets).
        """
        if level is not None and level not in QUERY_LEVELS:
            raise QueryError(f"unknown level {level!r}: use one of {', '.join(QUERY_LEVELS)}")
        if level in ROLLUP_LEVELS and step is None:
            step = timedelta(microseconds=ROLLUP_LEVELS[level])
        start_us, end_us = self._window(start, end)
        if agg is not None and agg not in AGGREGATIONS:
            raise QueryError(f"unknown aggregation {agg!r}: use one of {', '.join(AGGREGATIONS)}")
        if agg is not None and step is None:
            raise QueryError("an aggregation needs a step, e.g. --step 5m")
        name, matched = self._matching_series(metric, selector)
        if not matched:
            return pd.DataFrame(columns=_OUTPUT_COLUMNS)
        ids = sorted(matched)
        if step is None:
            points = self.backend.raw_points(ids, start_us, end_us)
            if include_archive:
                points = with_archive(
                    self.backend, self.settings, points, name, matched, (start_us, end_us), None
                )
            values = points["value"].astype("float64")
        else:
            step_us = int(parse_duration(step) / timedelta(microseconds=1))
            if step_us < US_PER_SECOND // 1000:
                raise QueryError("step must be at least 1ms")
            columns = None if include_archive else STATS_FOR.get(agg or "avg")
            points = resolved_stats(self.backend, ids, start_us, end_us, step_us, level, columns)
            if include_archive:
                points = with_archive(
                    self.backend, self.settings, points, name, matched, (start_us, end_us), step_us
                )
            values = aggregate(points, agg or "avg", step_us=step_us)
        return pd.DataFrame(
            {
                "metric": name,
                "labels": points["series_id"].map(matched),
                "ts": _to_us_array(points["ts_us"]),
                "value": values.to_numpy(dtype="float64") if len(points) else [],
            }
        )[_OUTPUT_COLUMNS]

    def latest(
        self, metric: str | None, selector: str | Mapping[str, str] | Selector | None = None
    ) -> pd.DataFrame:
        """The newest sample of every matching series."""
        name, matched = self._matching_series(metric, selector)
        if not matched:
            return pd.DataFrame(columns=_OUTPUT_COLUMNS)
        points = self.backend.latest_points(sorted(matched))
        return pd.DataFrame(
            {
                "metric": name,
                "labels": points["series_id"].map(matched),
                "ts": _to_us_array(points["ts_us"]),
                "value": points["value"].astype("float64"),
            }
        )[_OUTPUT_COLUMNS]

    def series(
        self,
        pattern: str | None = None,
        selector: str | Mapping[str, str] | Selector | None = None,
    ) -> pd.DataFrame:
        """Series whose metric matches the glob `pattern` and whose labels match `selector`."""
        parsed = parse_selector(selector)
        exact = parsed.metric if pattern is None else None
        if (
            pattern is not None
            and parsed.metric
            and not fnmatch.fnmatchcase(parsed.metric, pattern)
        ):
            return pd.DataFrame(
                columns=["series_id", "metric", "labels", "first_seen", "last_seen"]
            )
        rows = [
            (sid, metric, labels)
            for sid, metric, labels in self.backend.find_series(exact)
            if (pattern is None or fnmatch.fnmatchcase(metric, pattern))
            and (parsed.metric is None or metric == parsed.metric)
            and parsed.matches(labels)
        ]
        info = self.backend.series_info([r[0] for r in rows]) if rows else []
        seen = {int(r[0]): (r[3], r[4]) for r in info}

        def when(us: Any) -> datetime | None:
            return None if us is None else us_to_datetime(int(us))

        return pd.DataFrame(
            {
                "series_id": [r[0] for r in rows],
                "metric": [r[1] for r in rows],
                "labels": [r[2] for r in rows],
                "first_seen": [when(seen[r[0]][0]) for r in rows],
                "last_seen": [when(seen[r[0]][1]) for r in rows],
            }
        )

    def series_labels(self, series_ids: Sequence[int]) -> dict[int, tuple[str, dict[str, str]]]:
        """series_id -> (metric, labels) of these series (unknown ids are absent)."""
        if not len(series_ids):
            return {}
        info = self.backend.series_info([int(i) for i in series_ids])
        return {int(r[0]): (str(r[1]), self.backend.parse_labels(r[2])) for r in info}

    def stats(self) -> dict[str, Any]:
        """Rows and bytes per table, series count, oldest and newest sample."""
        return store_stats(self)

    def health(self) -> Health:
        """Connectivity, schema version, WAL/TimescaleDB status and a write probe."""
        return store_health(self)

    # -- export ---------------------------------------------------------------------------
    def export(
        self,
        path: str | Path,
        *,
        metric: str | None,
        selector: str | Mapping[str, str] | Selector | None = None,
        start: str | datetime | None = None,
        end: str | datetime | None = None,
        step: str | int | float | timedelta | None = None,
        agg: str | None = None,
        format: ExportFormat | None = None,
    ) -> tuple[Path, int]:
        """Write a query's result under the export directory; returns (path, rows)."""
        target = confined_path(self.settings.exports, path)
        fmt = format or target.suffix.lstrip(".").lower()
        if fmt not in ("json", "csv", "parquet"):
            raise MetricmillError(
                f"cannot tell the export format from {str(path)!r}: use --format json|csv|parquet"
            )
        frame = self.query(metric, selector, start, end, step=step, agg=agg)
        write_export(frame, target, fmt)  # type: ignore[arg-type]
        return target, len(frame)
