"""Preview and apply retention: per rule and level, archive what must be kept, then delete."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING

from metricmill.settings import Settings
from metricmill.types import us_to_datetime
from storage.archive import (
    DAY_US,
    Anonymizer,
    Checkpoint,
    archive_root,
    probe_writable,
)
from storage.backend import Backend

if TYPE_CHECKING:
    from storage.store import Store

from storage.retention.archiving import (
    archive_group,
    archive_whole_chunks,
    drop_whole_chunks,
    group_lock_days,
)
from storage.retention.planning import Group, Plan, plan
from storage.retention.report import Outcome, RetentionReport
from storage.retention.rules import LEVEL_TABLES, LEVELS
from storage.retention.sql import count_rows, delete_rows, lock_holds, older_than


def _outcome(group: Group) -> Outcome:
    return Outcome(
        level=group.level,
        rule=group.rule_name,
        days=group.days,
        cutoff=f"{us_to_datetime(group.cutoff_us):%Y-%m-%d}",
        series=len(group.ids),
    )


def _table_rows(backend: Backend) -> dict[str, int]:
    return {
        table: int(backend.execute(f"SELECT count(*) FROM {table}")[0][0])  # noqa: S608
        for table in LEVEL_TABLES.values()
    }


def preview(store: Store, now: datetime | None = None) -> RetentionReport:
    """Rows each rule and level would delete, archive, or keep by legal hold; nothing changes."""
    backend = store.backend
    planned = plan(backend, store.settings, now)
    report = RetentionReport(True, _cutoff_day(store.settings, planned))
    report.table_rows = _table_rows(backend)
    for group in planned.groups:
        outcome = _outcome(group)
        outcome.deleted = count_rows(backend, group.level, group.ids, group.cutoff_us)
        outcome.archived = outcome.deleted if group.archive else 0
        outcome.held = count_rows(backend, group.level, group.held_ids, group.cutoff_us)
        report.outcomes.append(outcome)
    return report


def _cutoff_day(settings: Settings, planned: Plan) -> str:
    return f"{us_to_datetime(planned.today_us - settings.retention_days * DAY_US):%Y-%m-%d}"


def apply(
    store: Store,
    now: datetime | None = None,
    *,
    anonymizer: Anonymizer | None = None,
    checkpoint: Checkpoint | None = None,
) -> RetentionReport:
    """Archive (verified) and delete what the rules let go; held series stay untouched.

    Each archive file is written, read back and checked inside the transaction that deletes
    its rows, so a crash leaves either both or neither. Raises ArchiveError (nothing more is
    deleted) when the archive cannot be written or does not verify.
    """
    backend, settings = store.backend, store.settings
    planned = plan(backend, settings, now)
    report = RetentionReport(False, _cutoff_day(settings, planned))
    report.table_rows = _table_rows(backend)
    if checkpoint is not None:
        checkpoint("planned", {"groups": len(planned.groups)})
    if any(g.archive and len(g.ids) for g in planned.groups):
        locking = any(
            group_lock_days(g, settings.archive_lock_days) > 0
            for g in planned.groups
            if g.archive and len(g.ids)
        )
        probe_writable(archive_root(settings), lock=locking)
    outcomes = {id(g): _outcome(g) for g in planned.groups}
    for group in planned.groups:
        outcomes[id(group)].held = count_rows(backend, group.level, group.held_ids, group.cutoff_us)
    for level in LEVELS:
        groups = [g for g in planned.groups if g.level == level and len(g.ids)]
        if level == "raw" and backend.timescale:
            archive_whole_chunks(store, planned, groups, outcomes, report, anonymizer, checkpoint)
        for group in (g for g in groups if g.archive):
            outcome = outcomes[id(group)]
            archive_group(store, planned, group, outcome, report, anonymizer, checkpoint)
        if backend.timescale:
            drop_whole_chunks(backend, planned, level, groups, outcomes)
        for group in (g for g in groups if not g.archive):
            outcomes[id(group)].deleted += _delete_group(backend, planned, group)
    report.outcomes = [outcomes[id(g)] for g in planned.groups]
    return report


def _delete_group(backend: Backend, planned: Plan, group: Group) -> int:
    with backend.transaction():
        held = lock_holds(backend, planned.series)
        ids = [int(i) for i in group.ids if int(i) not in held]
        if not ids:
            return 0
        return delete_rows(
            backend,
            LEVEL_TABLES[group.level],
            older_than(backend, group.level),
            [backend.id_list(ids), group.cutoff_us],
        )
