"""What every backend shares: the write entry points, series lookup and query SQL, written
once on top of the ledger (storage/ledger.py) and the per-database dialect (storage/dialect.py).

The write path's arithmetic lives in storage/write_rows.py; its names are importable from here
too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from storage.frames import PreparedBatch, SeriesDef
from storage.ledger import Ledger
from storage.schema import ROLLUP_TABLES
from storage.write_rows import (
    NO_TS,
    SeriesIds,
    WriteCounts,
    batch_spans,
    hour_ranges,
    late_marks,
    row_json,
    series_seen_changes,
    sorted_rows,
    unique_sorted,
)

__all__ = [
    "NO_TS",
    "Backend",
    "SeriesIds",
    "WriteCounts",
    "batch_spans",
    "hour_ranges",
    "late_marks",
    "row_json",
    "series_seen_changes",
    "sorted_rows",
    "unique_sorted",
]


class Backend(Ledger):
    """Base class: a live connection plus the SQL that is the same everywhere."""

    def write_prepared(
        self,
        batch: PreparedBatch,
        *,
        batch_id: str,
        source: str,
        max_new_series: int | None = None,
    ) -> WriteCounts:
        raise NotImplementedError

    def write_parts(
        self,
        batch: PreparedBatch,
        *,
        batch_ids: Sequence[str],
        sources: Sequence[str],
        max_new_series: int | None = None,
    ) -> list[WriteCounts]:
        """Write each part of a batch prepared in parts as its own ledger batch, in part
        order, all in one transaction; a backend may do the parts' common work once."""
        with self.transaction():
            return [
                self.write_prepared(
                    batch.part(number),
                    batch_id=batch_id,
                    source=source,
                    max_new_series=max_new_series,
                )
                for number, (batch_id, source) in enumerate(zip(batch_ids, sources, strict=True))
            ]

    def schema_version(self) -> int | None:
        try:
            rows = self.execute("SELECT max(version) FROM schema_version")
        except Exception:  # the table does not exist yet
            self.rollback_quietly()
            return None
        return rows[0][0] if rows else None

    # -- reads ---------------------------------------------------------------------------
    def find_series(
        self, metric: str | None, having: Mapping[str, str] | None = None
    ) -> list[tuple[int, str, dict[str, str]]]:
        """(series_id, metric, labels) of a metric's series (all series without one). With
        `having`, the database may leave out series whose labels do not hold those pairs (a
        narrowing for speed: callers still match the labels themselves)."""
        where, params = [], []
        if metric is not None:
            where.append("metric = %s")
            params.append(metric)
        if having:
            clause, values = self.labels_hold(having)
            if clause:
                where.append(clause)
                params.extend(values)
        condition = f" WHERE {' AND '.join(where)}" if where else ""
        rows = self.execute(
            f"SELECT series_id, metric, labels FROM series{condition} ORDER BY series_id",  # noqa: S608
            params,
        )
        return [(int(r[0]), r[1], self.parse_labels(r[2])) for r in rows]

    def metric_exists(self, metric: str) -> bool:
        return bool(self.execute("SELECT 1 FROM series WHERE metric = %s LIMIT 1", (metric,)))

    def series_info(self, ids: list[int]) -> list[tuple[Any, ...]]:
        return self.execute(
            f"SELECT series_id, metric, labels, {self.ts_out.format(col='first_seen')}, "  # noqa: S608
            f"{self.ts_out.format(col='last_seen')} FROM series "
            f"WHERE series_id {self.ids_in} ORDER BY series_id",
            (self.id_list(ids),),
        )

    def read_columns(
        self,
        template: str,
        columns: Sequence[tuple[str, str, str]],
        params: Sequence[Any],
        *,
        by_key: bool = False,
    ) -> dict[str, np.ndarray]:
        """Run `template` (a SELECT whose select list is the placeholder `{columns}`, with no
        ORDER BY) and return one numpy array per column, rows ordered by the first two
        columns. `columns` holds (name, SQL expression, kind): kind "int" (int64), "float"
        (float64) or "ts" (a stored timestamp, returned as int64 µs). `by_key`: the rows are
        those of a list of series, found through the primary key, never by reading the whole
        table (see the PostgreSQL override).

        Here: ordinary rows, transposed once. PostgreSQL overrides this with COPY BINARY read
        straight into numpy (no per-value Python objects).
        """
        select = ", ".join(
            self.ts_out.format(col=expr) if kind == "ts" else expr for _, expr, kind in columns
        )
        order = ", ".join(expr for _, expr, _ in columns[:2])
        rows = self.execute(f"{template.replace('{columns}', select)} ORDER BY {order}", params)
        dtypes = [(name, "float64" if kind == "float" else "int64") for name, _, kind in columns]
        try:  # one structured array built in C: a third of the time of transposing the rows
            table = np.array(rows, dtype=dtypes)
            return {name: np.ascontiguousarray(table[name]) for name, _ in dtypes}
        except (TypeError, ValueError, OverflowError):  # a NULL: column by column, NULL as NaN
            read = list(zip(*rows, strict=True)) if rows else [() for _ in columns]
            return {
                name: np.asarray(values, dtype=dtype)
                for (name, dtype), values in zip(dtypes, read, strict=True)
            }

    def raw_points(self, ids: list[int], start_us: int, end_us: int) -> pd.DataFrame:
        arrays = self.read_columns(
            f"SELECT {{columns}} FROM samples WHERE series_id {self.ids_in} "  # noqa: S608
            f"AND ts >= {self.ts_in} AND ts < {self.ts_in}",
            [("series_id", "series_id", "int"), ("ts_us", "ts", "ts"), ("value", "value", "float")],
            (self.id_list(ids), start_us, end_us),
            by_key=True,
        )
        return pd.DataFrame(arrays)

    def table_counts(self) -> dict[str, int]:
        tables = [
            "series",
            "samples",
            *ROLLUP_TABLES.values(),
            "rollup_pending",
            "ingest_batches",
            "quarantine",
            "baselines",
            "detector_models",
            "alerts",
            "notifications",
            "retention_rules",
            "archive_manifest",
        ]
        return {
            table: int(self.execute(f"SELECT count(*) FROM {table}")[0][0])  # noqa: S608
            for table in tables
        }

    def sample_bounds(self) -> tuple[int | None, int | None]:
        row = self.execute(
            f"SELECT {self.ts_out.format(col='min(ts)')}, "  # noqa: S608
            f"{self.ts_out.format(col='max(ts)')} FROM samples"
        )[0]
        return (None if row[0] is None else int(row[0]), None if row[1] is None else int(row[1]))

    @staticmethod
    def series_defs_params(series: list[SeriesDef]) -> list[tuple[str, str, str]]:
        return [(s.key, s.metric, s.labels_json) for s in series]
