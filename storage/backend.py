"""What every backend shares: the ledger, series lookup and query SQL, written once.

Statements use `%s` placeholders; the SQLite backend turns them into `?`. The few fragments
that differ per backend (timestamp in/out, id lists, buckets) are constants of the backend
class, never user input, so composing them into statement text is safe.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from storage.frames import PreparedBatch, SeriesDef
from storage.schema import LATEST_VERSION, ROLLUP_TABLES

_PLAIN_LABEL = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass
class WriteCounts:
    written: int = 0
    overwritten: int = 0
    unchanged: int = 0
    new_series: int = 0
    replay: bool = False
    guarded_new_series: int = 0  # > 0: the batch was quarantined whole by the cardinality guard


NO_TS = np.iinfo(np.int64).min  # a series with no samples yet


@dataclass
class SeriesIds:
    """Database ids of a batch's series, and the time span each already covers."""

    ids: np.ndarray
    first_us: np.ndarray
    last_us: np.ndarray
    is_new: np.ndarray  # inserted by this batch, already carrying the batch's span

    @property
    def new_series(self) -> int:
        return int(self.is_new.sum())

    @classmethod
    def empty(cls, n: int) -> SeriesIds:
        return cls(
            ids=np.zeros(n, dtype=np.int64),
            first_us=np.full(n, NO_TS, dtype=np.int64),
            last_us=np.full(n, NO_TS, dtype=np.int64),
            is_new=np.zeros(n, dtype=bool),
        )


def sorted_rows(
    batch: PreparedBatch, known: SeriesIds
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(series_id, ts, value, may_exist) in primary-key order.

    A row can only collide with a stored sample when its ts lies inside its series'
    [first_seen, last_seen]; everything else (the append-only common case) is new for sure.
    """
    ids = known.ids[batch.codes]
    order = np.lexsort((batch.ts_us, ids))
    ts = batch.ts_us[order]
    codes = batch.codes[order]
    first, last = known.first_us[codes], known.last_us[codes]
    may_exist = (last != NO_TS) & (ts >= first) & (ts <= last)
    return ids[order], ts, batch.values[order], may_exist


def batch_spans(batch: PreparedBatch) -> tuple[np.ndarray, np.ndarray]:
    """Per series of the batch: its earliest and latest accepted timestamp (µs)."""
    n = len(batch.series)
    lo = np.full(n, np.iinfo(np.int64).max, dtype=np.int64)
    hi = np.full(n, np.iinfo(np.int64).min, dtype=np.int64)
    np.minimum.at(lo, batch.codes, batch.ts_us)
    np.maximum.at(hi, batch.codes, batch.ts_us)
    return lo, hi


def series_seen_changes(known: SeriesIds, batch: PreparedBatch) -> np.ndarray:
    """Rows (series_id, first_seen, last_seen) for stored series whose span grows.

    New series were inserted with their span already; series with no samples yet
    (NO_TS) are updated too.
    """
    lo, hi = batch_spans(batch)
    has_old = known.last_us != NO_TS
    new_lo = np.where(has_old, np.minimum(lo, known.first_us), lo)
    new_hi = np.where(has_old, np.maximum(hi, known.last_us), hi)
    grows = (hi >= lo) & ~known.is_new
    grows &= ~has_old | (new_lo != known.first_us) | (new_hi != known.last_us)
    return np.column_stack([known.ids[grows], new_lo[grows], new_hi[grows]])


def late_marks(known: SeriesIds, batch: PreparedBatch) -> np.ndarray:
    """Rows (series_id, earliest ts) for stored series that get samples at or before their
    last sample so far: late data or overwrites, which detection has to look back at."""
    lo, _ = batch_spans(batch)
    late = ~known.is_new & (known.last_us != NO_TS) & (lo <= known.last_us)
    return np.column_stack([known.ids[late], lo[late]])


def unique_sorted(values: np.ndarray) -> np.ndarray:
    """np.unique of an int array by sorting: numpy's hash-table unique (taken when only the
    values are asked for) is about ten times slower on a batch's many distinct keys."""
    ordered = np.sort(values, kind="stable")
    if len(ordered) < 2:
        return ordered
    return ordered[np.concatenate(([True], ordered[1:] != ordered[:-1]))]


def hour_ranges(ts_us: np.ndarray) -> list[tuple[int, int]]:
    """The touched hours of a batch, merged into half-open [start, end) ranges in µs."""
    if len(ts_us) == 0:
        return []
    hour = 3_600_000_000
    hours = unique_sorted(ts_us // hour)
    breaks = np.flatnonzero(np.diff(hours) != 1)
    starts = np.concatenate(([hours[0]], hours[breaks + 1]))
    ends = np.concatenate((hours[breaks], [hours[-1]])) + 1
    return [(int(s) * hour, int(e) * hour) for s, e in zip(starts, ends, strict=True)]


def row_json(row: dict[str, Any]) -> str:
    """A rejected row as JSON text; escapes what UTF-8 cannot carry (lone surrogates)."""
    text = json.dumps(row, default=str, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(row, default=str, ensure_ascii=True)
    return text


class Backend:
    """Base class: a live connection plus the SQL that is the same everywhere."""

    name: ClassVar[str]
    # SQL fragments, overridden per backend. {col} / {p} are filled with constants only.
    ts_in: ClassVar[str] = "%s"  # a bound µs integer as a stored timestamp
    ts_out: ClassVar[str] = "{col}"  # a stored timestamp as µs integer
    ids_in: ClassVar[str] = "= ANY(%s)"  # membership in a bound list of ids

    def __init__(self, url: str) -> None:
        self.url = url

    # -- to be provided by each backend -------------------------------------------------
    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        raise NotImplementedError

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        raise NotImplementedError

    @contextmanager
    def transaction(self) -> Iterator[None]:
        raise NotImplementedError
        yield

    def close(self) -> None:
        raise NotImplementedError

    def migrate(self, target: int = LATEST_VERSION) -> tuple[int, int]:
        """Bring the schema up to `target`; (version before, version after)."""
        raise NotImplementedError

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

    def committed_batches(self, batch_ids: Sequence[str]) -> dict[str, int]:
        """Of these batch ids, the committed ones with their rows in (a committed batch never
        changes again: its replay needs no reading nor checking)."""
        found: dict[str, int] = {}
        ids = list(dict.fromkeys(batch_ids))
        for offset in range(0, len(ids), 500):
            chunk = ids[offset : offset + 500]
            marks = ", ".join(["%s"] * len(chunk))
            for batch_id, rows_in in self.execute(
                "SELECT batch_id, rows_in FROM ingest_batches "  # noqa: S608 - placeholders only
                f"WHERE status = 'committed' AND batch_id IN ({marks})",
                chunk,
            ):
                found[batch_id] = int(rows_in)
        return found

    def write_ledger(self, values: tuple[Any, ...]) -> None:
        """Record the batch's ledger row (inside the write transaction)."""
        raise NotImplementedError

    def guarded(
        self,
        known: SeriesIds | int,
        batch: PreparedBatch,
        counts: WriteCounts,
        *,
        batch_id: str,
        source: str,
        limit: int | None,
    ) -> bool:
        """True when series resolution stopped at the cardinality guard (then recorded here)."""
        if not isinstance(known, int):
            return False
        assert limit is not None
        self.quarantine_whole_batch(batch, batch_id=batch_id, source=source, new=known, limit=limit)
        counts.guarded_new_series = known
        return True

    def quarantine_whole_batch(
        self, batch: PreparedBatch, *, batch_id: str, source: str, new: int, limit: int
    ) -> None:
        """The cardinality guard's verdict: the batch is kept in quarantine, nothing written."""
        # Keep the accepted samples so `quarantine replay` can land them once allowed.
        stamps = pd.to_datetime(batch.ts_us, unit="us", utc=True).map(lambda t: t.isoformat())
        samples = [
            {
                "metric": batch.series[c].metric,
                "labels": batch.series[c].labels,
                "ts": t,
                "value": v,
            }
            for c, t, v in zip(batch.codes.tolist(), stamps, batch.values.tolist(), strict=True)
        ]
        self.executemany(
            "INSERT INTO quarantine (batch_id, source, reason, detail, row_data) "
            "VALUES (%s, %s, %s, %s, %s)",
            [
                (
                    batch_id,
                    source,
                    "cardinality_limit",
                    f"batch would create {new} new series; the limit is {limit}",
                    row_json({"rows": batch.rows_in, "new_series": new, "samples": samples}),
                )
            ],
        )
        self.write_ledger(
            (batch_id, source, "quarantined", batch.rows_in, 0, 0, 0, batch.rows_in, 0, None, None)
        )

    def bucket_expr(self, step_us: int) -> str:
        raise NotImplementedError

    def table_bytes(self) -> dict[str, int]:
        raise NotImplementedError

    def health_details(self) -> dict[str, Any]:
        raise NotImplementedError

    def parse_labels(self, value: Any) -> dict[str, str]:
        return value if isinstance(value, dict) else json.loads(value)

    # -- shared --------------------------------------------------------------------------
    def schema_version(self) -> int | None:
        try:
            rows = self.execute("SELECT max(version) FROM schema_version")
        except Exception:  # the table does not exist yet
            self.rollback_quietly()
            return None
        return rows[0][0] if rows else None

    def rollback_quietly(self) -> None:
        """Clear a failed statement's state (PostgreSQL aborts the transaction)."""

    def record_failures(self, failures: Sequence[tuple[str, str, str]]) -> None:
        """(batch id, source, error) of files whose write failed: a 'failed' ledger row with
        the error and how many times it failed (a committed row is never touched). A later
        write of the batch replaces the row."""
        for batch_id, source, error in failures:
            with self.transaction():
                rows = self.execute(
                    "SELECT status, detail FROM ingest_batches WHERE batch_id = %s", (batch_id,)
                )
                if rows and rows[0][0] == "committed":
                    continue
                detail = rows[0][1] if rows else None
                if isinstance(detail, str):
                    detail = json.loads(detail)
                times = int(detail.get("failures", 0)) if isinstance(detail, dict) else 0
                text = json.dumps({"error": error, "failures": times + 1})
                if rows:
                    self.execute(
                        "UPDATE ingest_batches SET status = 'failed', source = %s, detail = %s "
                        "WHERE batch_id = %s",
                        (source, text, batch_id),
                    )
                else:
                    self.execute(
                        "INSERT INTO ingest_batches (batch_id, source, status, detail) "
                        "VALUES (%s, %s, 'failed', %s)",
                        (batch_id, source, text),
                    )

    def failed_batches(self) -> list[tuple[str, str, str, int]]:
        """(batch id, source, last error, failures) of the ledger's failed batches."""
        try:
            rows = self.execute(
                "SELECT batch_id, source, detail FROM ingest_batches WHERE status = 'failed' "
                "ORDER BY created_at"
            )
        except Exception:  # no schema yet (doctor on a new database): nothing failed
            self.rollback_quietly()
            return []
        out = []
        for batch_id, source, detail in rows:
            data = json.loads(detail) if isinstance(detail, str) else detail or {}
            out.append((batch_id, source, str(data.get("error", "")), int(data.get("failures", 0))))
        return out

    def batch_status(self, batch_id: str) -> str | None:
        rows = self.execute("SELECT status FROM ingest_batches WHERE batch_id = %s", (batch_id,))
        return rows[0][0] if rows else None

    def record_side_rows(
        self,
        batch: PreparedBatch,
        *,
        batch_id: str,
        source: str,
        ranges: list[tuple[int, int]],
    ) -> None:
        """Pending rollup ranges and quarantined rows: part of the caller's transaction."""
        if ranges:
            self.executemany(
                "INSERT INTO rollup_pending (start_ts, end_ts, batch_id) "  # noqa: S608
                f"VALUES ({self.ts_in}, {self.ts_in}, %s)",
                [(s, e, batch_id) for s, e in ranges],
            )
        if batch.rejected:
            self.executemany(
                "INSERT INTO quarantine (batch_id, source, reason, row_data) "
                "VALUES (%s, %s, %s, %s)",
                [(batch_id, source, reason, row_json(row)) for row, reason in batch.rejected],
            )

    def ledger_values(
        self, batch: PreparedBatch, counts: WriteCounts, *, batch_id: str, source: str
    ) -> tuple[Any, ...]:
        min_ts = int(batch.ts_us.min()) if len(batch.ts_us) else None
        max_ts = int(batch.ts_us.max()) if len(batch.ts_us) else None
        return (
            batch_id,
            source,
            "committed",
            batch.rows_in,
            counts.written,
            counts.overwritten,
            counts.unchanged,
            len(batch.rejected),
            counts.new_series,
            min_ts,
            max_ts,
        )

    def insert_ledger(self, values: tuple[Any, ...]) -> None:
        """Insert a finished ledger row."""
        self.execute(
            "INSERT INTO ingest_batches (batch_id, source, status, rows_in, written, "  # noqa: S608
            "overwritten, unchanged, quarantined, new_series, min_ts, max_ts) VALUES "
            f"(%s, %s, %s, %s, %s, %s, %s, %s, %s, {self.ts_in}, {self.ts_in})",
            values,
        )

    # -- quarantine ----------------------------------------------------------------------
    def quarantine_rows(
        self, *, entry_id: int | None = None, limit: int = 100, pending_only: bool = False
    ) -> list[tuple[Any, ...]]:
        """(id, batch_id, source, reason, detail, row_data, created_at µs, replayed_at µs)."""
        where = ["TRUE" if self.name == "postgresql" else "1 = 1"]
        params: list[Any] = []
        if entry_id is not None:
            where.append("id = %s")
            params.append(entry_id)
        if pending_only:
            where.append("replayed_at IS NULL")
        params.append(limit)
        return self.execute(
            "SELECT id, batch_id, source, reason, detail, row_data, "  # noqa: S608
            f"{self.ts_out.format(col='created_at')}, {self.ts_out.format(col='replayed_at')} "
            f"FROM quarantine WHERE {' AND '.join(where)} ORDER BY id DESC LIMIT %s",
            params,
        )

    def mark_replayed(self, entry_id: int, now_us: int) -> None:
        with self.transaction():
            self.execute(
                f"UPDATE quarantine SET replayed_at = {self.ts_in} WHERE id = %s",  # noqa: S608
                (now_us, entry_id),
            )

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

    def labels_hold(self, pairs: Mapping[str, str]) -> tuple[str, list[Any]]:
        """An SQL condition (values bound) true where a series' labels hold these pairs; here
        one json_extract per plain label name (names that need quoting in a JSON path are
        left to the caller's own match)."""
        clauses, params = [], []
        for name, value in pairs.items():
            if _PLAIN_LABEL.fullmatch(name):
                clauses.append("json_extract(labels, %s) = %s")
                params += [f"$.{name}", value]
        return " AND ".join(clauses), params

    def series_info(self, ids: list[int]) -> list[tuple[Any, ...]]:
        return self.execute(
            f"SELECT series_id, metric, labels, {self.ts_out.format(col='first_seen')}, "  # noqa: S608
            f"{self.ts_out.format(col='last_seen')} FROM series "
            f"WHERE series_id {self.ids_in} ORDER BY series_id",
            (self.id_list(ids),),
        )

    def id_list(self, ids: list[int]) -> Any:
        return ids

    def read_columns(
        self, template: str, columns: Sequence[tuple[str, str, str]], params: Sequence[Any]
    ) -> dict[str, np.ndarray]:
        """Run `template` (a SELECT whose select list is the placeholder `{columns}`, with no
        ORDER BY) and return one numpy array per column, rows ordered by the first two
        columns. `columns` holds (name, SQL expression, kind): kind "int" (int64), "float"
        (float64) or "ts" (a stored timestamp, returned as int64 µs).

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
        )
        return pd.DataFrame(arrays)

    def bucket_stats(
        self, ids: list[int], start_us: int, end_us: int, step_us: int
    ) -> pd.DataFrame:
        """Per series and bucket: count, sum, sum of squares, min, max and the last value."""
        bucket = self.bucket_expr(step_us)
        rows = self.execute(
            f"""WITH g AS (
                SELECT series_id, {bucket} AS bucket, count(*) AS n, sum(value) AS s,
                       sum(value * value) AS ss, min(value) AS mn, max(value) AS mx,
                       max(ts) AS last_ts
                FROM samples
                WHERE series_id {self.ids_in} AND ts >= {self.ts_in} AND ts < {self.ts_in}
                GROUP BY series_id, {bucket})
            SELECT g.series_id, {self.ts_out.format(col="g.bucket")}, g.n, g.s, g.ss, g.mn, g.mx,
                   t.value
            FROM g JOIN samples t ON t.series_id = g.series_id AND t.ts = g.last_ts
            ORDER BY g.series_id, g.bucket""",  # noqa: S608
            (self.id_list(ids), start_us, end_us),
        )
        return pd.DataFrame(
            rows, columns=["series_id", "ts_us", "count", "sum", "sum_sq", "min", "max", "last"]
        )

    def latest_points(self, ids: list[int]) -> pd.DataFrame:
        raise NotImplementedError

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

    def write_probe(self) -> None:
        """Write a ledger row and roll it back: proves the database accepts writes."""
        try:
            with self.transaction():
                self.execute(
                    "INSERT INTO ingest_batches (batch_id, source, status) VALUES (%s, %s, %s)",
                    ("health-probe", "health", "probe"),
                )
                raise _RollbackProbe
        except _RollbackProbe:
            pass

    @staticmethod
    def series_defs_params(series: list[SeriesDef]) -> list[tuple[str, str, str]]:
        return [(s.key, s.metric, s.labels_json) for s in series]


class _RollbackProbe(Exception):
    """Raised inside the probe transaction so it rolls back."""
