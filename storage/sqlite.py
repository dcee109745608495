"""The embedded backend: one SQLite file in WAL mode (or memory), integer µs timestamps."""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from metricmill.errors import DatabaseUnavailable
from metricmill.settings import MEMORY_URL
from storage.backend import Backend
from storage.frames import PreparedBatch
from storage.schema import LATEST_VERSION, SQLITE_TYPES, migrations
from storage.write_rows import (
    SeriesIds,
    WriteCounts,
    batch_spans,
    hour_ranges,
    late_marks,
    series_seen_changes,
    sorted_rows,
)

_CHUNK = 500  # ids per IN-list when looking up series keys
_PLAIN_LABEL = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@lru_cache(maxsize=256)
def _qmark(sql: str) -> str:
    return re.sub(r"%s", "?", sql)


class SQLiteBackend(Backend):
    name = "sqlite"
    ids_in = "IN (SELECT value FROM json_each(%s))"
    greatest = "max"
    now = SQLITE_TYPES.now

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.memory = url == MEMORY_URL
        self.path = None if self.memory else Path(url.removeprefix("sqlite:///"))
        try:
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            self.conn = sqlite3.connect(
                ":memory:" if self.path is None else str(self.path),
                isolation_level=None,
                timeout=60,
                check_same_thread=False,
            )
            if not self.memory:
                self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=NORMAL")
            self.conn.execute("PRAGMA temp_store=MEMORY")
            self.conn.execute("PRAGMA cache_size=-65536")
        except (sqlite3.Error, OSError) as exc:
            raise DatabaseUnavailable(f"cannot open SQLite database {self.path}: {exc}") from None
        self._depth = 0

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self.conn.execute(_qmark(sql), tuple(params)).fetchall()

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        self.conn.executemany(_qmark(sql), rows)

    @contextmanager
    def transaction(self) -> Iterator[None]:
        if self._depth:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        self.conn.execute("BEGIN IMMEDIATE")
        self._depth = 1
        try:
            yield
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        else:
            self.conn.execute("COMMIT")
        finally:
            self._depth = 0

    def close(self) -> None:
        self.conn.close()

    def migrate(self, target: int = LATEST_VERSION) -> tuple[int, int]:
        steps = migrations(
            SQLITE_TYPES, "strftime('%Y-%m-%dT%H:%M:%fZ', {col} / 1000000.0, 'unixepoch')"
        )
        with self.transaction():
            self.conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_version "
                "(version INTEGER PRIMARY KEY, applied_at INTEGER NOT NULL)"
            )
            before = self.schema_version() or 0
            for version in range(before + 1, target + 1):
                for statement in steps[version]:
                    self.conn.execute(statement)
                self.conn.execute(
                    "INSERT INTO schema_version VALUES "
                    "(?, CAST((julianday('now') - 2440587.5) * 86400000000.0 AS INTEGER))",
                    (version,),
                )
        return before, max(before, target)

    # -- dialect --------------------------------------------------------------------------
    def id_list(self, ids: list[int]) -> Any:
        return "[" + ",".join(str(int(i)) for i in ids) + "]"

    def sql_bool(self, value: bool) -> Any:
        return int(bool(value))

    def plus_us(self, column: str, us: int) -> str:
        return f"({column} + {int(us)})"

    def labels_hold(self, pairs: Mapping[str, str]) -> tuple[str, list[Any]]:
        """One json_extract per plain label name (names that need quoting in a JSON path are
        left to the caller's own match)."""
        clauses, params = [], []
        for name, value in pairs.items():
            if _PLAIN_LABEL.fullmatch(name):
                clauses.append("json_extract(labels, %s) = %s")
                params += [f"$.{name}", value]
        return " AND ".join(clauses), params

    def delete_counted(self, table: str, where: str, params: Sequence[Any]) -> int:
        self.execute(f"DELETE FROM {table} WHERE {where}", params)  # noqa: S608
        return int(self.execute("SELECT changes()")[0][0])

    def latest_points(self, ids: list[int]) -> pd.DataFrame:
        # SQLite returns the bare column from the row holding max(ts).
        rows = self.execute(
            f"SELECT series_id, max(ts), value FROM samples WHERE series_id {self.ids_in} "  # noqa: S608
            "GROUP BY series_id ORDER BY series_id",
            (self.id_list(ids),),
        )
        return pd.DataFrame(rows, columns=["series_id", "ts_us", "value"])

    def _resolve_series(self, batch: PreparedBatch, max_new_series: int | None) -> SeriesIds | int:
        """Ids and spans of the batch's series, creating the new ones — or, when that would
        create more than max_new_series, the number of new series (nothing is created)."""
        keys = [s.key for s in batch.series]
        out = SeriesIds.empty(len(keys))
        position = {key: pos for pos, key in enumerate(keys)}
        found = np.zeros(len(keys), dtype=bool)
        for offset in range(0, len(keys), _CHUNK):
            chunk = keys[offset : offset + _CHUNK]
            marks = ",".join("?" * len(chunk))
            for key, sid, first, last in self.conn.execute(
                "SELECT series_key, series_id, first_seen, last_seen FROM series "  # noqa: S608
                f"WHERE series_key IN ({marks})",
                chunk,
            ):
                pos = position[key]
                out.ids[pos], found[pos] = sid, True
                if first is not None and last is not None:
                    out.first_us[pos], out.last_us[pos] = first, last
        missing = np.flatnonzero(~found)
        if max_new_series is not None and len(missing) > max_new_series:
            return len(missing)
        if len(missing):
            lo, hi = batch_spans(batch)
            self.conn.executemany(
                "INSERT INTO series (series_key, metric, labels, first_seen, last_seen) "
                "VALUES (?, ?, ?, ?, ?)",
                [
                    (*self.series_defs_params([batch.series[pos]])[0], int(lo[pos]), int(hi[pos]))
                    for pos in missing
                ],
            )
            first_new = self.conn.execute(
                "SELECT series_id FROM series WHERE series_key = ?", (keys[missing[0]],)
            ).fetchone()[0]
            # One transaction, one writer: the ids of this executemany are consecutive.
            out.ids[missing] = first_new + np.arange(len(missing))
            out.is_new[missing] = True
        return out

    def write_ledger(self, values: tuple[Any, ...]) -> None:
        self.insert_ledger(values)

    def write_prepared(
        self,
        batch: PreparedBatch,
        *,
        batch_id: str,
        source: str,
        max_new_series: int | None = None,
    ) -> WriteCounts:
        counts = WriteCounts()
        with self.transaction():
            status = self.batch_status(batch_id)
            if status == "committed":
                counts.replay = True
                return counts
            if status is not None:  # quarantined whole earlier: a replay may now land it
                self.execute("DELETE FROM ingest_batches WHERE batch_id = %s", (batch_id,))
            known = self._resolve_series(batch, max_new_series)
            if self.guarded(
                known, batch, counts, batch_id=batch_id, source=source, limit=max_new_series
            ):
                return counts
            assert not isinstance(known, int)
            counts.new_series = known.new_series
            ids, ts, values, may_exist = sorted_rows(batch, known)
            fresh = ~may_exist
            # BEGIN IMMEDIATE holds the write lock, so rows outside their series' seen span
            # are certainly new: a plain INSERT, no conflict handling.
            self.conn.executemany(
                "INSERT INTO samples (series_id, ts, value) VALUES (?, ?, ?)",
                zip(ids[fresh].tolist(), ts[fresh].tolist(), values[fresh].tolist(), strict=True),
            )
            counts.written = int(fresh.sum())
            if may_exist.any():
                counts.written += self._upsert_staged(
                    ids[may_exist], ts[may_exist], values[may_exist], counts
                )
            counts.unchanged += batch.in_batch_duplicates
            changed = series_seen_changes(known, batch)
            late = late_marks(known, batch)
            if len(late):
                self.conn.executemany(
                    "INSERT INTO detect_late (series_id, from_ts) VALUES (?, ?)",
                    zip(late[:, 0].tolist(), late[:, 1].tolist(), strict=True),
                )
            self.conn.executemany(
                "UPDATE series SET first_seen = ?, last_seen = ? WHERE series_id = ?",
                zip(
                    changed[:, 1].tolist(),
                    changed[:, 2].tolist(),
                    changed[:, 0].tolist(),
                    strict=True,
                ),
            )
            self.record_side_rows(
                batch, batch_id=batch_id, source=source, ranges=hour_ranges(batch.ts_us)
            )
            self.write_ledger(self.ledger_values(batch, counts, batch_id=batch_id, source=source))
        return counts

    def _upsert_staged(
        self, ids: np.ndarray, ts: np.ndarray, values: np.ndarray, counts: WriteCounts
    ) -> int:
        """Upsert rows that may already exist; returns how many were new."""
        self.conn.execute(
            "CREATE TEMP TABLE IF NOT EXISTS sample_stage "
            "(series_id INTEGER, ts INTEGER, value REAL)"
        )
        self.conn.execute("DELETE FROM sample_stage")
        self.conn.executemany(
            "INSERT INTO sample_stage VALUES (?, ?, ?)",
            zip(ids.tolist(), ts.tolist(), values.tolist(), strict=True),
        )
        existing, same = self.conn.execute(
            "SELECT count(*), coalesce(sum(t.value = s.value), 0) FROM sample_stage s "
            "JOIN samples t ON t.series_id = s.series_id AND t.ts = s.ts"
        ).fetchone()
        self.conn.execute(
            "INSERT INTO samples (series_id, ts, value) SELECT series_id, ts, value "
            "FROM sample_stage WHERE true ON CONFLICT (series_id, ts) DO UPDATE "
            "SET value = excluded.value WHERE samples.value IS NOT excluded.value"
        )
        self.conn.execute("DELETE FROM sample_stage")
        counts.overwritten = existing - same
        counts.unchanged = same
        return len(ids) - int(existing)

    def table_bytes(self) -> dict[str, int]:
        try:
            rows = self.execute("SELECT name, sum(pgsize) FROM dbstat GROUP BY name")
        except sqlite3.Error:
            page_count = self.execute("PRAGMA page_count")[0][0]
            page_size = self.execute("PRAGMA page_size")[0][0]
            return {"(whole database)": int(page_count) * int(page_size)}
        return {name: int(size) for name, size in rows}

    def health_details(self) -> dict[str, Any]:
        return {
            "path": str(self.path) if self.path else ":memory:",
            "journal_mode": self.execute("PRAGMA journal_mode")[0][0],
            "synchronous": {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}.get(
                self.execute("PRAGMA synchronous")[0][0], "?"
            ),
            "sqlite_version": sqlite3.sqlite_version,
        }
