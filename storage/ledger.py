"""The ingest ledger and the quarantine, in SQL every backend shares.

A batch's ledger row (`ingest_batches`, keyed by the batch's content hash) says whether it
committed, failed (with the error and how often) or was quarantined whole by the cardinality
guard; the rows it set aside wait in `quarantine` until replayed. `Ledger` sits between the
per-database `Dialect` and `Backend`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import pandas as pd

from metricmill.types import Reason
from storage.dialect import Dialect
from storage.frames import PreparedBatch
from storage.write_rows import SeriesIds, WriteCounts, row_json


class Ledger(Dialect):
    """Ledger rows, failures, side rows of a write (pending rollups, quarantine) and replay."""

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
                    Reason.CARDINALITY_LIMIT,
                    f"batch would create {new} new series; the limit is {limit}",
                    row_json({"rows": batch.rows_in, "new_series": new, "samples": samples}),
                )
            ],
        )
        self.write_ledger(
            (batch_id, source, "quarantined", batch.rows_in, 0, 0, 0, batch.rows_in, 0, None, None)
        )

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
        where: list[str] = []
        params: list[Any] = []
        if entry_id is not None:
            where.append("id = %s")
            params.append(entry_id)
        if pending_only:
            where.append("replayed_at IS NULL")
        params.append(limit)
        condition = f" WHERE {' AND '.join(where)}" if where else ""
        return self.execute(
            "SELECT id, batch_id, source, reason, detail, row_data, "  # noqa: S608
            f"{self.ts_out.format(col='created_at')}, {self.ts_out.format(col='replayed_at')} "
            f"FROM quarantine{condition} ORDER BY id DESC LIMIT %s",
            params,
        )

    def mark_replayed(self, entry_id: int, now_us: int) -> None:
        with self.transaction():
            self.execute(
                f"UPDATE quarantine SET replayed_at = {self.ts_in} WHERE id = %s",  # noqa: S608
                (now_us, entry_id),
            )

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


class _RollbackProbe(Exception):
    """Raised inside the probe transaction so it rolls back."""
