"""Archiving on the way out: a day of a table's rows written, read back and verified before
its rows are deleted; whole TimescaleDB chunks archived and dropped at once."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from psycopg import sql

from metricmill.errors import MetricmillError
from metricmill.types import us_to_datetime
from storage.archive import (
    DAY_US,
    Anonymizer,
    ArchivedFile,
    ArchiveRows,
    Checkpoint,
    archive_root,
    build_table,
    partition_dir,
    record_manifest,
    remove_orphans,
    write_verified,
)
from storage.backend import Backend
from storage.postgres.timescale import (
    chunks_before,
    drop_boundary,
    drop_chunk_range,
    drop_chunks_before,
)

if TYPE_CHECKING:
    from storage.store import Store

from storage.retention.planning import Group, Plan
from storage.retention.report import Outcome, RetentionReport
from storage.retention.rules import LEVEL_TABLES
from storage.retention.sql import TIME_COLUMN, delete_rows, lock_holds, min_ts, older_than


def archive_group(
    store: Store,
    planned: Plan,
    group: Group,
    outcome: Outcome,
    report: RetentionReport,
    anonymizer: Anonymizer | None,
    checkpoint: Checkpoint | None,
) -> None:
    """Per metric and UTC day: select, write, verify, record, delete — one transaction each."""
    backend = store.backend
    members = planned.series[planned.series["series_id"].isin(group.ids)]
    lock_days = group_lock_days(group, store.settings.archive_lock_days)
    for metric, chosen in members.groupby("metric", sort=True):
        ids = chosen["series_id"].tolist()
        first = backend.execute(
            f"SELECT {backend.ts_out.format(col='min(ts)')} FROM samples "  # noqa: S608
            f"WHERE series_id {backend.ids_in} AND ts < {backend.ts_in}",
            (backend.id_list(ids), group.cutoff_us),
        )[0][0]
        if first is None:
            continue
        for day in range(int(first) - int(first) % DAY_US, group.cutoff_us, DAY_US):
            archived, deleted, item = _archive_day(
                store, planned, str(metric), ids, day, group.cutoff_us, lock_days,
                anonymizer, checkpoint,
            )  # fmt: skip
            outcome.archived += archived
            outcome.deleted += deleted
            if item is not None:
                report.files.append(item)


def _archive_day(
    store: Store,
    planned: Plan,
    metric: str,
    ids: list[int],
    day_us: int,
    cutoff_us: int,
    lock_days: int,
    anonymizer: Anonymizer | None,
    checkpoint: Checkpoint | None,
) -> tuple[int, int, ArchivedFile | None]:
    backend = store.backend
    end_us = min(day_us + DAY_US, cutoff_us)
    with backend.transaction():
        held = lock_holds(backend, planned.series)
        free = [i for i in ids if i not in held]
        if not free:
            return 0, 0, None
        where = older_than(backend, "raw", lower=True)
        params = [backend.id_list(free), day_us, end_us]
        archived, item = _write_verified_day(
            store, planned, metric, day_us, where, params, lock_days, anonymizer, checkpoint
        )
        if item is None:
            return 0, 0, None
        deleted = delete_rows(backend, "samples", where, params)
        if deleted != archived:
            raise MetricmillError(
                f"{metric} {us_to_datetime(day_us):%Y-%m-%d}: {deleted} rows matched the delete "
                f"but {archived} were archived; rolled back, the next run retries"
            )
    return archived, deleted, item


def _write_verified_day(
    store: Store,
    planned: Plan,
    metric: str,
    day_us: int,
    where: str,
    params: list[Any],
    lock_days: int,
    anonymizer: Anonymizer | None,
    checkpoint: Checkpoint | None,
) -> tuple[int, ArchivedFile | None]:
    """Inside the caller's transaction: one metric-day's rows (`where` over samples) written to
    their Parquet file (under a compliance lock of `lock_days` after the day, when above 0),
    read back and verified, stray files of the partition removed, and the manifest row
    recorded. (rows, file); (0, None) when there are no rows."""
    backend, root = store.backend, archive_root(store.settings)
    rows = backend.read_columns(
        f"SELECT {{columns}} FROM samples WHERE {where}",  # noqa: S608
        [
            ("series_id", "samples.series_id", "int"),
            ("ts", "samples.ts", "ts"),
            ("value", "samples.value", "float"),
        ],
        params,
    )
    if not len(rows["series_id"]):
        return 0, None
    sid, ts, values = rows["series_id"], rows["ts"], rows["value"]
    prepared = archive_table(planned.series, sid, ts, values, anonymizer)
    item = write_verified(
        root,
        metric,
        day_us,
        prepared,
        anonymized=anonymizer is not None,
        checkpoint=checkpoint,
        lock_days=lock_days,
    )
    remove_orphans(backend, root, partition_dir(metric, day_us), keep=item.path)
    if checkpoint is not None:
        checkpoint("verified", {"path": item.path})
    record_manifest(backend, item)
    return len(sid), item


def group_lock_days(group: Group, default: int) -> int:
    """Days a group's archive files are locked for: its rule's own, else `default` (the
    `archive_lock_days` setting); the default group (no rule) takes the setting."""
    return default if group.rule is None else group.rule.lock_days(default)


def archive_table(
    series: pd.DataFrame,
    sid: np.ndarray,
    ts: np.ndarray,
    values: np.ndarray,
    anonymizer: Anonymizer | None = None,
) -> ArchiveRows:
    """Rows (series id, ts µs, value) with their series' keys and labels, ready to archive."""
    if len(sid) and np.all(sid[1:] >= sid[:-1]):  # key order, as selected: no sort needed
        starts = np.flatnonzero(np.concatenate(([True], sid[1:] != sid[:-1])))
        uniques = sid[starts]
        codes = np.repeat(np.arange(len(starts)), np.diff(np.append(starts, len(sid))))
    else:
        uniques, codes = np.unique(sid, return_inverse=True)
    info = series.set_index("series_id").loc[uniques]
    return build_table(
        info["series_key"].tolist(), info["labels"].tolist(), codes, ts, values, anonymizer
    )


def archive_whole_chunks(
    store: Store,
    planned: Plan,
    groups: list[Group],
    outcomes: Mapping[int, Outcome],
    report: RetentionReport,
    anonymizer: Anonymizer | None,
    checkpoint: Checkpoint | None,
) -> None:
    """TimescaleDB, raw level: each whole day chunk in which every series is past its cut-off
    is archived (per metric: written, read back, verified, recorded) and dropped with
    drop_chunks, in one transaction that locks the chunk against writers first — so no late
    sample can land between the archive and the drop. A chunk with held series, series newer
    than the plan, or a pending rollup range in it is left to the row-by-row path."""
    backend = store.backend
    if not groups or not any(g.archive for g in groups):
        return
    scope = _chunk_scope(backend, planned, groups)
    for schema, name, start, end in chunks_before(backend, "samples", scope.limit):
        if start % DAY_US or end - start != DAY_US:
            continue  # not one UTC day (a changed chunk interval): row by row
        with backend.transaction():
            counts = _chunk_counts_if_whole(backend, planned, scope, schema, name, start, end)
            if counts is None:
                continue
            archived = 0
            for metric, ids in scope.by_metric.items():
                present = [i for i in ids if i in counts]
                if present:
                    # one file per metric holds the series of every rule present: the
                    # longest lock among them
                    lock_days = max(
                        group_lock_days(scope.group_of[i], store.settings.archive_lock_days)
                        for i in present
                    )
                    archived += _archive_chunk_metric(
                        store, planned, metric, present, start, end, lock_days, report,
                        anonymizer, checkpoint,
                    )  # fmt: skip
            expected = sum(n for s, n in counts.items() if s in scope.archived_ids)
            if archived != expected:
                raise MetricmillError(
                    f"chunk {us_to_datetime(start):%Y-%m-%d}: {archived} rows archived but "
                    f"{expected} are in it; rolled back, the next run retries"
                )
            if drop_chunk_range(backend, "samples", start, end) != 1:
                raise MetricmillError(
                    f"chunk {us_to_datetime(start):%Y-%m-%d} was not dropped; rolled back"
                )
        _count_dropped_chunk(counts, scope, outcomes)


@dataclass
class _ChunkScope:
    """What whole-chunk archiving covers: chunks before `limit` (the earliest cut-off, and
    the first day of any planned series no group covers); each covered series' group; the ids
    archived, per metric; the newest series id the plan knows."""

    limit: int
    group_of: dict[int, Group]
    archived_ids: set[int]
    by_metric: dict[str, list[int]]
    newest_id: int


def _chunk_scope(backend: Backend, planned: Plan, groups: list[Group]) -> _ChunkScope:
    """The scope of whole-chunk archiving for these groups of the plan."""
    limit = min(g.cutoff_us for g in groups)
    covered = np.concatenate([g.ids for g in groups])
    others = np.setdiff1d(planned.series["series_id"].to_numpy(), covered)
    if len(others):
        earliest = min_ts(backend, "samples", others)
        if earliest is not None:
            limit = min(limit, earliest - earliest % DAY_US)
    archived_ids = {int(i) for g in groups if g.archive for i in g.ids}
    members = planned.series[planned.series["series_id"].isin(sorted(archived_ids))]
    return _ChunkScope(
        limit=limit,
        group_of={int(i): g for g in groups for i in g.ids},
        archived_ids=archived_ids,
        by_metric={
            str(m): c["series_id"].tolist() for m, c in members.groupby("metric", sort=True)
        },
        newest_id=int(planned.series["series_id"].max()) if len(planned.series) else 0,
    )


def _chunk_counts_if_whole(
    backend: Backend,
    planned: Plan,
    scope: _ChunkScope,
    schema: str,
    name: str,
    start: int,
    end: int,
) -> dict[int, int] | None:
    """In the caller's transaction: lock the chunk against writers, then its rows per series;
    None (leave it to the row-by-row path) when it is empty, has a pending rollup range, or
    holds a series that is held, newer than the plan or in no group."""
    lock = (
        sql.SQL("LOCK TABLE {} IN SHARE MODE")
        .format(sql.Identifier(schema, name))
        .as_string(backend.conn)  # type: ignore[attr-defined]
    )
    held = lock_holds(backend, planned.series, first=lock)
    counts = {
        int(sid): int(n)
        for sid, n in backend.execute(
            "SELECT series_id, count(*) FROM samples "  # noqa: S608
            f"WHERE ts >= {backend.ts_in} AND ts < {backend.ts_in} GROUP BY series_id",
            (start, end),
        )
    }
    pending = backend.execute(
        "SELECT count(*) FROM rollup_pending "  # noqa: S608
        f"WHERE start_ts < {backend.ts_in} AND end_ts > {backend.ts_in}",
        (end, start),
    )[0][0]
    group_of = scope.group_of
    strangers = [s for s in counts if s not in group_of or s in held or s > scope.newest_id]
    if not counts or pending or strangers:
        return None
    return counts


def _archive_chunk_metric(
    store: Store,
    planned: Plan,
    metric: str,
    ids: list[int],
    start: int,
    end: int,
    lock_days: int,
    report: RetentionReport,
    anonymizer: Anonymizer | None,
    checkpoint: Checkpoint | None,
) -> int:
    """Archive one metric's rows of the chunk [start, end) (verified, recorded in `report`);
    the number of rows archived."""
    backend = store.backend
    where = (
        f"samples.series_id {backend.ids_in} AND samples.ts >= {backend.ts_in} "
        f"AND samples.ts < {backend.ts_in}"
    )
    params = [backend.id_list(ids), start, end]
    rows, item = _write_verified_day(
        store, planned, metric, start, where, params, lock_days, anonymizer, checkpoint
    )
    if item is not None:
        report.files.append(item)
    return rows


def _count_dropped_chunk(
    counts: dict[int, int], scope: _ChunkScope, outcomes: Mapping[int, Outcome]
) -> None:
    """Add a dropped chunk's rows to the outcome of each group they belong to (and the
    chunk, once per group)."""
    touched: set[int] = set()
    for sid, n in counts.items():
        group = scope.group_of[sid]
        outcome = outcomes[id(group)]
        outcome.deleted += n
        if group.archive:
            outcome.archived += n
        if id(group) not in touched:
            outcome.chunks_dropped += 1
            touched.add(id(group))


def drop_whole_chunks(
    backend: Backend,
    planned: Plan,
    level: str,
    groups: list[Group],
    outcomes: Mapping[int, Outcome],
) -> None:
    """TimescaleDB: drop whole chunks older than every cut-off of the level, when no held,
    kept or pending data lies in them; the DELETEs that follow handle the rest."""
    table = LEVEL_TABLES[level]
    if not groups or any(g.archive for g in groups):
        return  # archived data left row by row above
    covered = np.concatenate([g.ids for g in groups])
    if len(covered) < len(planned.series):
        others = np.setdiff1d(planned.series["series_id"].to_numpy(), covered)
        earliest = min_ts(backend, table, others)
    else:
        earliest = None
    limit = min(g.cutoff_us for g in groups)
    if earliest is not None:
        limit = min(limit, earliest - earliest % DAY_US)
    with backend.transaction():
        held = lock_holds(backend, planned.series)
        newest_id = int(planned.series["series_id"].max()) if len(planned.series) else 0
        late = backend.execute(
            f"SELECT {backend.ts_out.format(col=f'min({TIME_COLUMN[level]})')} FROM {table} "  # noqa: S608
            f"WHERE series_id > %s OR series_id {backend.ids_in}",
            (newest_id, backend.id_list(sorted(held))),
        )[0][0]
        pending = backend.execute(
            f"SELECT {backend.ts_out.format(col='min(start_ts)')} FROM rollup_pending"  # noqa: S608
        )[0][0]
        for bound in (late, pending):
            if bound is not None:
                limit = min(limit, int(bound) - int(bound) % DAY_US)
        boundary = drop_boundary(backend, table, limit)
        if boundary is None:
            return
        counts = dict(
            backend.execute(
                f"SELECT series_id, count(*) FROM {table} "  # noqa: S608
                f"WHERE {TIME_COLUMN[level]} < {backend.ts_in} GROUP BY series_id",
                (boundary,),
            )
        )
        dropped = drop_chunks_before(backend, table, boundary)
    for group in groups:
        outcome = outcomes[id(group)]
        outcome.deleted += sum(int(counts.get(int(i), 0)) for i in group.ids)
        outcome.chunks_dropped += dropped
