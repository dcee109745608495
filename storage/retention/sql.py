"""SQL pieces shared by preview, apply and archiving: cut-off predicates, counted deletes,
and the lock that holds new rules back while a deleting transaction runs."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from storage.backend import Backend
from storage.retention.planning import held_mask
from storage.retention.rules import LEVEL_TABLES, list_rules
from storage.schema import ROLLUP_LEVELS

TIME_COLUMN = {"raw": "ts", **{level: "bucket" for level in ROLLUP_LEVELS}}


_WIDTH_US = {"raw": 1, **ROLLUP_LEVELS}


def older_than(backend: Backend, level: str, *, lower: bool = False) -> str:
    """WHERE for one group's rows older than the cut-off, outside pending rollup ranges.

    Parameters: the id list, [the lower bound,] the cut-off."""
    table, col = LEVEL_TABLES[level], TIME_COLUMN[level]
    column = f"{table}.{col}"
    low = f"AND {column} >= {backend.ts_in} " if lower else ""
    return (
        f"{table}.series_id {backend.ids_in} {low}AND {column} < {backend.ts_in} "  # noqa: S608
        "AND NOT EXISTS (SELECT 1 FROM rollup_pending p "
        f"WHERE p.start_ts < {backend.plus_us(column, _WIDTH_US[level])} AND p.end_ts > {column})"
    )


def delete_rows(backend: Backend, table: str, where: str, params: list[Any]) -> int:
    return backend.delete_counted(table, where, params)


def count_rows(backend: Backend, level: str, ids: np.ndarray, cutoff_us: int) -> int:
    if not len(ids):
        return 0
    rows = backend.execute(
        f"SELECT count(*) FROM {LEVEL_TABLES[level]} WHERE {older_than(backend, level)}",  # noqa: S608
        (backend.id_list([int(i) for i in ids]), cutoff_us),
    )
    return int(rows[0][0])


def lock_holds(backend: Backend, series: pd.DataFrame, first: str | None = None) -> set[int]:
    """Start of every deleting transaction: block new rules until commit, re-read the holds.

    `first`: a LOCK statement to take before the transaction's snapshot (PostgreSQL)."""
    backend.lock_for_deleting(first)
    held = held_mask(series, list_rules(backend))
    return set(series["series_id"].to_numpy()[held].tolist())


def min_ts(backend: Backend, table: str, ids: np.ndarray) -> int | None:
    column = "ts" if table == "samples" else "bucket"
    value = backend.execute(
        f"SELECT {backend.ts_out.format(col=f'min({column})')} FROM {table} "  # noqa: S608
        f"WHERE series_id {backend.ids_in}",
        (backend.id_list([int(i) for i in ids]),),
    )[0][0]
    return None if value is None else int(value)
