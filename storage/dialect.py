"""What differs per database, asked of one object: the root of every backend.

Like the query components of Prefect's server (one class per SQL dialect), `Dialect` lists
every question whose answer is written differently per database: the connection's plumbing,
SQL fragments (a bound µs integer as a stored timestamp and back, id lists, buckets, booleans,
the time now) and the few statements that take another shape per database (a counted delete,
a bulk insert of columns, the locks of a deleting transaction, TimescaleDB's housekeeping).
storage/sqlite.py answers for SQLite, storage/postgres/ for PostgreSQL and TimescaleDB. Code
elsewhere in storage/ asks the backend in hand and never branches on its name.

Fragments are constants of the backend class, never user input: composing them into
statement text is safe. Statements use `%s` placeholders; SQLite turns them into `?`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar, Literal

import numpy as np
import pandas as pd

from storage.schema import LATEST_VERSION

# How insert_columns stores a column: its PostgreSQL array type, or a µs integer as a timestamp.
ColumnKind = Literal["bigint", "integer", "text", "float", "ts"]


class Dialect:
    """The per-database contract; subclasses fill in every method that raises here."""

    name: ClassVar[str]
    # SQL fragments, overridden per backend. {col} is filled with constant column names only.
    ts_in: ClassVar[str] = "%s"  # a bound µs integer as a stored timestamp
    ts_out: ClassVar[str] = "{col}"  # a stored timestamp as µs integer
    ids_in: ClassVar[str] = "= ANY(%s)"  # membership in a bound list of ids
    greatest: ClassVar[str] = "GREATEST"  # the scalar function of the larger of two values
    now: ClassVar[str] = "now()"  # the current time as a stored timestamp

    def __init__(self, url: str) -> None:
        self.url = url

    # -- the connection -----------------------------------------------------------------
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

    def rollback_quietly(self) -> None:
        """Clear a failed statement's state (PostgreSQL aborts the transaction)."""

    def migrate(self, target: int = LATEST_VERSION) -> tuple[int, int]:
        """Bring the schema up to `target`; (version before, version after)."""
        raise NotImplementedError

    # -- values and fragments -----------------------------------------------------------
    def id_list(self, ids: list[int]) -> Any:
        """A list of ids as the one parameter `ids_in` binds."""
        return ids

    def parse_labels(self, value: Any) -> dict[str, str]:
        return value if isinstance(value, dict) else json.loads(value)

    def sql_bool(self, value: bool) -> Any:
        """A boolean as a bound parameter of a BOOLEAN column."""
        return bool(value)

    def plus_us(self, column: str, us: int) -> str:
        """`column` (a stored timestamp) plus a constant number of microseconds."""
        raise NotImplementedError

    def labels_hold(self, pairs: Mapping[str, str]) -> tuple[str, list[Any]]:
        """An SQL condition (values bound) true where a series' labels hold these pairs; it
        may narrow less than asked (callers still match labels themselves)."""
        raise NotImplementedError

    # -- statements of another shape per database ---------------------------------------
    def delete_counted(self, table: str, where: str, params: Sequence[Any]) -> int:
        """DELETE FROM a constant table name WHERE a composed condition; how many rows went."""
        raise NotImplementedError

    def insert_columns(
        self,
        table: str,
        columns: Sequence[tuple[str, ColumnKind]],
        values: Sequence[Sequence[Any]],
        *,
        on_conflict: str = "",
    ) -> None:
        """INSERT a row per position of the column value lists (`values[i]` is the list of
        `columns[i]`; "ts" columns hold µs integers), with an optional ON CONFLICT clause.
        Here: one executemany. PostgreSQL binds each column as one array instead."""
        cells = ", ".join(self.ts_in if kind == "ts" else "%s" for _, kind in columns)
        names = ", ".join(name for name, _ in columns)
        self.executemany(
            f"INSERT INTO {table} ({names}) VALUES ({cells}) {on_conflict}",  # noqa: S608
            list(zip(*(_python_values(v) for v in values), strict=True)),
        )

    def lock_for_deleting(self, first: str | None = None) -> None:
        """Start of a deleting retention transaction: wait for rollup transactions and keep
        new retention rules out until commit. `first`: a LOCK statement to take before the
        transaction's snapshot. Here nothing: the transaction's write lock already does it."""

    # -- TimescaleDB ---------------------------------------------------------------------
    @property
    def timescale(self) -> bool:
        """True when the TimescaleDB extension is in use."""
        return False

    def timescale_jobs(self) -> list[tuple[str, str, bool]]:
        """TimescaleDB background jobs: (policy, hypertable, scheduled); [] elsewhere."""
        return []

    def compressed_hypertables(self) -> list[tuple[str, bool]]:
        """(hypertable, compression enabled) for every hypertable; [] elsewhere."""
        return []

    # -- what the operator sees ----------------------------------------------------------
    def latest_points(self, ids: list[int]) -> pd.DataFrame:
        """series_id, ts_us, value of each series' newest sample."""
        raise NotImplementedError

    def table_bytes(self) -> dict[str, int]:
        raise NotImplementedError

    def health_details(self) -> dict[str, Any]:
        raise NotImplementedError


def _python_values(column: Sequence[Any]) -> Sequence[Any]:
    """insert_columns' column as Python values: a numpy array's NaN as None (NULL)."""
    if not isinstance(column, np.ndarray):
        return column
    values = column.astype(object)
    if column.dtype.kind == "f":
        values[np.isnan(column)] = None
    return values.tolist()
