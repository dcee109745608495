"""Retention rules, legal holds, and applying them: archive raw data to Parquet, verify, delete.

A rule says how long series whose metric matches a glob (and whose labels equal the given
ones) keep data at one level (raw, 1m, 5m, 1h, 1d). The highest priority matching rule of a
level wins; unmatched series get the level's default from settings. A legal-hold rule keeps
every level of the series it matches, whatever their rules say. Cut-offs fall on UTC
midnights. Rows inside a pending rollup range are never deleted until rolled up.
"""

from __future__ import annotations

import fnmatch
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from psycopg import sql

from metricmill.errors import MetricmillError
from metricmill.settings import Settings
from metricmill.types import datetime_to_us, us_to_datetime
from storage.archive import (
    DAY_US,
    Anonymizer,
    ArchivedFile,
    ArchiveRows,
    Checkpoint,
    archive_root,
    build_table,
    partition_dir,
    probe_writable,
    record_manifest,
    remove_orphans,
    write_verified,
)
from storage.backend import Backend
from storage.schema import ROLLUP_LEVELS, ROLLUP_TABLES
from storage.timescale import chunks_before, drop_boundary, drop_chunk_range, drop_chunks_before

if TYPE_CHECKING:
    from storage.store import Store

LEVELS: tuple[str, ...] = ("raw", *ROLLUP_LEVELS)
LEVEL_TABLES: dict[str, str] = {"raw": "samples", **ROLLUP_TABLES}
_TIME_COLUMN = {"raw": "ts", **{level: "bucket" for level in ROLLUP_LEVELS}}
_WIDTH_US = {"raw": 1, **ROLLUP_LEVELS}
_GLOB = re.compile(r"[A-Za-z0-9_:*?\[\]!-]+")
_LABEL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_RULES_LOCK = 7423004  # advisory lock: one retention transaction at a time (PostgreSQL)


class RetentionRuleError(MetricmillError):
    """A retention rule that cannot be used (bad glob, days, level, labels)."""


@dataclass(frozen=True)
class RetentionRule:
    rule_id: int
    metric_pattern: str
    labels: dict[str, str]
    level: str
    retention_days: int | None
    priority: int
    archive: bool
    legal_hold: bool

    @property
    def name(self) -> str:
        return f"#{self.rule_id} {self.metric_pattern}{_label_text(self.labels)}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "rule_id": self.rule_id,
            "metric_pattern": self.metric_pattern,
            "labels": self.labels,
            "level": self.level,
            "retention_days": self.retention_days,
            "priority": self.priority,
            "archive": self.archive,
            "legal_hold": self.legal_hold,
        }


def _label_text(labels: Mapping[str, str]) -> str:
    return "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}" if labels else ""


# -- rules -----------------------------------------------------------------------------------
def glob_regex(pattern: str) -> re.Pattern[str]:
    """The compiled regex of a metric glob; a clear error for one that cannot be a glob."""
    if not isinstance(pattern, str) or not pattern.strip():
        raise RetentionRuleError("metric_pattern is empty: give a glob such as 'container_cpu_*'")
    if not _GLOB.fullmatch(pattern):
        raise RetentionRuleError(
            f"bad glob {pattern!r}: use metric name characters and * ? [...] only"
        )
    depth = 0
    for char in pattern:
        depth += {"[": 1, "]": -1}.get(char, 0)
        if depth not in (0, 1):
            raise RetentionRuleError(f"bad glob {pattern!r}: unbalanced [ ]")
    if depth:
        raise RetentionRuleError(f"bad glob {pattern!r}: '[' without its ']'")
    try:
        return re.compile(fnmatch.translate(pattern))
    except re.error as exc:
        raise RetentionRuleError(f"bad glob {pattern!r}: {exc}") from None


MAX_RETENTION_DAYS = 36_500


def validate_rule(
    metric_pattern: str,
    retention_days: int | None,
    labels: Mapping[str, str] | None,
    priority: int,
    level: str,
    legal_hold: bool,
) -> dict[str, str]:
    """Checks a rule's fields; returns its labels as a plain dict of strings."""
    glob_regex(metric_pattern)
    if level not in LEVELS:
        raise RetentionRuleError(f"unknown level {level!r}: use one of {', '.join(LEVELS)}")
    if legal_hold:
        if retention_days is not None:
            raise RetentionRuleError(
                "a legal hold keeps matching data until it is removed: give no retention_days"
            )
    elif retention_days is None:
        raise RetentionRuleError("give retention_days (a positive number) or legal_hold=True")
    elif isinstance(retention_days, bool) or not isinstance(retention_days, int):
        raise RetentionRuleError(f"retention_days must be a whole number, not {retention_days!r}")
    elif retention_days <= 0:
        raise RetentionRuleError(f"retention_days must be positive, not {retention_days}")
    elif retention_days > MAX_RETENTION_DAYS:
        raise RetentionRuleError(
            f"retention_days must be at most {MAX_RETENTION_DAYS} (a century), not {retention_days}"
        )
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise RetentionRuleError(f"priority must be a whole number, not {priority!r}")
    clean: dict[str, str] = {}
    for key, value in dict(labels or {}).items():
        if not isinstance(key, str) or not _LABEL_NAME.fullmatch(key):
            raise RetentionRuleError(f"bad label name {key!r} in the rule's labels")
        if not isinstance(value, str):
            raise RetentionRuleError(f"label {key!r} must equal a string, not {value!r}")
        clean[key] = value
    return clean


def add_rule(
    backend: Backend,
    metric_pattern: str,
    retention_days: int | None = None,
    labels: Mapping[str, str] | None = None,
    priority: int = 0,
    *,
    level: str = "raw",
    archive: bool = True,
    legal_hold: bool = False,
) -> RetentionRule:
    """Validate and store a rule; returns it with its id."""
    clean = validate_rule(metric_pattern, retention_days, labels, priority, level, legal_hold)
    with backend.transaction():
        rows = backend.execute(
            "INSERT INTO retention_rules (metric_pattern, labels, level, retention_days, "
            "priority, archive, legal_hold) VALUES (%s, %s, %s, %s, %s, %s, %s) "
            "RETURNING rule_id",
            (
                metric_pattern,
                json.dumps(clean, sort_keys=True),
                level,
                retention_days,
                priority,
                _bool(backend, archive),
                _bool(backend, legal_hold),
            ),
        )
    return RetentionRule(
        int(rows[0][0]), metric_pattern, clean, level, retention_days, priority, archive, legal_hold
    )


def _bool(backend: Backend, value: bool) -> bool | int:
    return bool(value) if backend.name == "postgresql" else int(bool(value))


def list_rules(backend: Backend) -> list[RetentionRule]:
    rows = backend.execute(
        "SELECT rule_id, metric_pattern, labels, level, retention_days, priority, archive, "
        "legal_hold FROM retention_rules ORDER BY level, priority DESC, rule_id"
    )
    return [
        RetentionRule(
            int(r[0]),
            r[1],
            backend.parse_labels(r[2]),
            r[3],
            None if r[4] is None else int(r[4]),
            int(r[5]),
            bool(r[6]),
            bool(r[7]),
        )
        for r in rows
    ]


def remove_rule(backend: Backend, rule_id: int) -> RetentionRule:
    found = [r for r in list_rules(backend) if r.rule_id == rule_id]
    if not found:
        raise RetentionRuleError(f"no retention rule {rule_id}: see `metricmill retention list`")
    with backend.transaction():
        backend.execute("DELETE FROM retention_rules WHERE rule_id = %s", (rule_id,))
    return found[0]


# -- matching --------------------------------------------------------------------------------
def load_series(backend: Backend) -> pd.DataFrame:
    rows = backend.execute("SELECT series_id, metric, labels, series_key FROM series")
    return pd.DataFrame(
        {
            "series_id": np.array([int(r[0]) for r in rows], dtype=np.int64),
            "metric": [r[1] for r in rows],
            "labels": [backend.parse_labels(r[2]) for r in rows],
            "series_key": [r[3] for r in rows],
        }
    )


def match_mask(series: pd.DataFrame, labels: pd.DataFrame, rule: RetentionRule) -> np.ndarray:
    """Which series a rule matches: one vectorised regex over metric names, label equalities."""
    if series.empty:  # no series yet: its empty metric column has no string type to match
        return np.zeros(0, dtype=bool)
    regex = glob_regex(rule.metric_pattern)
    mask = series["metric"].str.fullmatch(regex).to_numpy(dtype=bool, copy=True)
    for key, value in rule.labels.items():
        if key not in labels.columns:
            return np.zeros(len(series), dtype=bool)
        mask &= (labels[key] == value).to_numpy(dtype=bool)
    return mask


def _label_frame(series: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame.from_records(series["labels"].tolist(), index=series.index)


def held_mask(series: pd.DataFrame, rules: list[RetentionRule]) -> np.ndarray:
    labels = _label_frame(series)
    mask = np.zeros(len(series), dtype=bool)
    for rule in rules:
        if rule.legal_hold:
            mask |= match_mask(series, labels, rule)
    return mask


def default_days(settings: Settings, level: str) -> int | None:
    days = {
        "raw": settings.retention_days,
        "1m": settings.retention_1m_days,
        "5m": settings.retention_5m_days,
        "1h": settings.retention_1h_days,
        "1d": settings.retention_1d_days,
    }[level]
    return days or None


@dataclass
class Group:
    """The series of one level that one rule (or the default) governs."""

    level: str
    rule: RetentionRule | None  # None: the level's default
    days: int
    cutoff_us: int
    archive: bool
    ids: np.ndarray  # not held at planning time
    held_ids: np.ndarray

    @property
    def rule_name(self) -> str:
        return "default" if self.rule is None else self.rule.name


@dataclass
class Plan:
    now_us: int
    today_us: int
    series: pd.DataFrame
    groups: list[Group]
    kept_forever: dict[str, np.ndarray]  # level -> ids no rule lets go


def plan(backend: Backend, settings: Settings, now: datetime | None = None) -> Plan:
    """Which series each level's rules govern, with their cut-offs (UTC midnights)."""
    now_us = datetime_to_us(now or datetime.now(UTC))
    today_us = now_us - now_us % DAY_US
    series = load_series(backend)
    rules = list_rules(backend)
    labels = _label_frame(series)
    held = held_mask(series, rules)
    ids = series["series_id"].to_numpy()
    groups: list[Group] = []
    forever: dict[str, np.ndarray] = {}
    for level in LEVELS:
        chosen = sorted(
            (r for r in rules if r.level == level and not r.legal_hold),
            key=lambda r: (-r.priority, r.rule_id),
        )
        owner = np.full(len(series), -1, dtype=np.int64)
        for position, rule in enumerate(chosen):
            owner[(owner == -1) & match_mask(series, labels, rule)] = position
        keep: list[np.ndarray] = []
        for position in [-1, *range(len(chosen))]:
            members = owner == position
            if not members.any():
                continue
            owned: RetentionRule | None = None if position == -1 else chosen[position]
            days = default_days(settings, level) if owned is None else owned.retention_days
            if days is None:
                keep.append(ids[members])
                continue
            groups.append(
                Group(
                    level=level,
                    rule=owned,
                    days=days,
                    # nothing is older than 1970: a rule of a million days keeps everything
                    cutoff_us=max(today_us - days * DAY_US, 0),
                    archive=level == "raw" and (owned is None or owned.archive),
                    ids=ids[members & ~held],
                    held_ids=ids[members & held],
                )
            )
        forever[level] = np.concatenate([*keep, ids[held]]) if keep else ids[held]
    return Plan(now_us, today_us, series, groups, forever)


def raw_cutoffs(
    backend: Backend,
    settings: Settings,
    metrics: np.ndarray,
    labels: np.ndarray,
    now: datetime | None = None,
) -> np.ndarray | None:
    """Per incoming row (metric, labels as received): the oldest time (µs) its series' raw
    rule keeps, where a rule keeps less than the default `retention_days` — older rows would
    land in hours retention has already archived (and a rollup would rebuild those hours from
    the late rows alone). int64 min where the default (checked by the quality suite), a longer
    rule or a legal hold applies; None when no raw rule is stricter than the default."""
    from storage.frames import canonical_labels

    rules = list_rules(backend)
    default = default_days(settings, "raw")
    stricter = [
        r
        for r in rules
        if r.level == "raw" and not r.legal_hold and r.retention_days is not None
        and (default is None or r.retention_days < default)
    ]  # fmt: skip
    if not stricter or not len(metrics):
        return None
    # One lookup per distinct (metric, label object): rows decoded together share objects.
    keys = pd.MultiIndex.from_arrays(
        [pd.Series(metrics, dtype=object), pd.Series(map(id, labels), dtype="int64")]
    )
    codes, uniques = pd.factorize(keys)
    first = np.unique(codes, return_index=True)[1]
    texts = [canonical_labels(labels[i])[0] for i in first]
    series = pd.DataFrame(
        {
            "metric": [str(metrics[i]) for i in first],
            "labels": [json.loads(t) if t is not None else {} for t in texts],
        }
    )
    frame = _label_frame(series)
    chosen = sorted(
        (r for r in rules if r.level == "raw" and not r.legal_hold),
        key=lambda r: (-r.priority, r.rule_id),
    )
    days = np.full(len(series), -1, dtype=np.int64)  # -1: the default
    for rule in chosen:
        free = days == -1
        days[free & match_mask(series, frame, rule)] = (
            rule.retention_days if rule.retention_days is not None else 0
        )
    strict = (days > 0) & ((default is None) | (days < (default or 0)))
    strict &= ~held_mask(series, rules)
    now_us = datetime_to_us(now or datetime.now(UTC))
    today_us = now_us - now_us % DAY_US
    per_series = np.where(strict, today_us - days * DAY_US, np.iinfo(np.int64).min)
    return per_series[codes]


# -- SQL pieces ------------------------------------------------------------------------------
def _plus(backend: Backend, column: str, us: int) -> str:
    if backend.name == "sqlite":
        return f"({column} + {int(us)})"
    return f"({column} + interval '{int(us)} microseconds')"


def _older_than(backend: Backend, level: str, *, lower: bool = False) -> str:
    """WHERE for one group's rows older than the cut-off, outside pending rollup ranges.

    Parameters: the id list, [the lower bound,] the cut-off."""
    table, col = LEVEL_TABLES[level], _TIME_COLUMN[level]
    column = f"{table}.{col}"
    low = f"AND {column} >= {backend.ts_in} " if lower else ""
    return (
        f"{table}.series_id {backend.ids_in} {low}AND {column} < {backend.ts_in} "  # noqa: S608
        "AND NOT EXISTS (SELECT 1 FROM rollup_pending p "
        f"WHERE p.start_ts < {_plus(backend, column, _WIDTH_US[level])} AND p.end_ts > {column})"
    )


def _delete(backend: Backend, table: str, where: str, params: list[Any]) -> int:
    if backend.name == "sqlite":
        backend.execute(f"DELETE FROM {table} WHERE {where}", params)  # noqa: S608
        return int(backend.execute("SELECT changes()")[0][0])
    rows = backend.execute(
        f"WITH gone AS (DELETE FROM {table} WHERE {where} RETURNING 1) "  # noqa: S608
        "SELECT count(*) FROM gone",
        params,
    )
    return int(rows[0][0])


def _count(backend: Backend, level: str, ids: np.ndarray, cutoff_us: int) -> int:
    if not len(ids):
        return 0
    rows = backend.execute(
        f"SELECT count(*) FROM {LEVEL_TABLES[level]} WHERE {_older_than(backend, level)}",  # noqa: S608
        (backend.id_list([int(i) for i in ids]), cutoff_us),
    )
    return int(rows[0][0])


def _lock_holds(backend: Backend, series: pd.DataFrame, first: str | None = None) -> set[int]:
    """Start of every deleting transaction: block new rules until commit, re-read the holds.

    `first`: a LOCK statement to take before the transaction's snapshot (PostgreSQL)."""
    if backend.name == "postgresql":
        backend.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        if first is not None:
            backend.execute(first)  # before any SELECT: the snapshot sees what it waited for
        backend.execute("LOCK TABLE retention_rules IN SHARE MODE")
        backend.execute("SELECT pg_advisory_xact_lock(%s)", (_RULES_LOCK,))
    held = held_mask(series, list_rules(backend))
    return set(series["series_id"].to_numpy()[held].tolist())


# -- preview and apply -----------------------------------------------------------------------
@dataclass
class Outcome:
    """One row of a retention summary: a rule (or default) at one level."""

    level: str
    rule: str
    days: int
    cutoff: str
    series: int
    deleted: int = 0
    archived: int = 0
    held: int = 0
    chunks_dropped: int = 0

    def row(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class RetentionReport:
    dry_run: bool
    cutoff_day: str
    outcomes: list[Outcome] = field(default_factory=list)
    files: list[ArchivedFile] = field(default_factory=list)
    table_rows: dict[str, int] = field(default_factory=dict)
    compressed_chunks: int = 0

    def deleted_fraction(self) -> dict[str, float]:
        """Per table: the share of its rows this run deletes (or would delete)."""
        gone: dict[str, int] = {}
        for o in self.outcomes:
            gone[LEVEL_TABLES[o.level]] = gone.get(LEVEL_TABLES[o.level], 0) + o.deleted
        return {t: n / self.table_rows[t] for t, n in gone.items() if self.table_rows.get(t)}

    def summary(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "cutoff_day": self.cutoff_day,
            "deleted": sum(o.deleted for o in self.outcomes),
            "archived": sum(o.archived for o in self.outcomes),
            "held": sum(o.held for o in self.outcomes),
            "files": len(self.files),
            "compressed_chunks": self.compressed_chunks,
            "rules": [o.row() for o in self.outcomes],
        }


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
        outcome.deleted = _count(backend, group.level, group.ids, group.cutoff_us)
        outcome.archived = outcome.deleted if group.archive else 0
        outcome.held = _count(backend, group.level, group.held_ids, group.cutoff_us)
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
        probe_writable(archive_root(settings), lock=settings.archive_lock_days > 0)
    outcomes = {id(g): _outcome(g) for g in planned.groups}
    for group in planned.groups:
        outcomes[id(group)].held = _count(backend, group.level, group.held_ids, group.cutoff_us)
    for level in LEVELS:
        groups = [g for g in planned.groups if g.level == level and len(g.ids)]
        if level == "raw" and getattr(backend, "timescale", False):
            _archive_whole_chunks(store, planned, groups, outcomes, report, anonymizer, checkpoint)
        for group in (g for g in groups if g.archive):
            outcome = outcomes[id(group)]
            _archive_group(store, planned, group, outcome, report, anonymizer, checkpoint)
        if getattr(backend, "timescale", False):
            _drop_whole_chunks(backend, planned, level, groups, outcomes)
        for group in (g for g in groups if not g.archive):
            outcomes[id(group)].deleted += _delete_group(backend, planned, group)
    report.outcomes = [outcomes[id(g)] for g in planned.groups]
    return report


def _delete_group(backend: Backend, planned: Plan, group: Group) -> int:
    with backend.transaction():
        held = _lock_holds(backend, planned.series)
        ids = [int(i) for i in group.ids if int(i) not in held]
        if not ids:
            return 0
        return _delete(
            backend,
            LEVEL_TABLES[group.level],
            _older_than(backend, group.level),
            [backend.id_list(ids), group.cutoff_us],
        )


def _archive_group(
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
                store, planned, str(metric), ids, day, group.cutoff_us, anonymizer, checkpoint
            )
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
    anonymizer: Anonymizer | None,
    checkpoint: Checkpoint | None,
) -> tuple[int, int, ArchivedFile | None]:
    backend = store.backend
    end_us = min(day_us + DAY_US, cutoff_us)
    with backend.transaction():
        held = _lock_holds(backend, planned.series)
        free = [i for i in ids if i not in held]
        if not free:
            return 0, 0, None
        where = _older_than(backend, "raw", lower=True)
        params = [backend.id_list(free), day_us, end_us]
        archived, item = _write_verified_day(
            store, planned, metric, day_us, where, params, anonymizer, checkpoint
        )
        if item is None:
            return 0, 0, None
        deleted = _delete(backend, "samples", where, params)
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
    anonymizer: Anonymizer | None,
    checkpoint: Checkpoint | None,
) -> tuple[int, ArchivedFile | None]:
    """Inside the caller's transaction: one metric-day's rows (`where` over samples) written to
    their Parquet file, read back and verified, stray files of the partition removed, and the
    manifest row recorded. (rows, file); (0, None) when there are no rows."""
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
        lock_days=store.settings.archive_lock_days,
    )
    remove_orphans(backend, root, partition_dir(metric, day_us), keep=item.path)
    if checkpoint is not None:
        checkpoint("verified", {"path": item.path})
    record_manifest(backend, item)
    return len(sid), item


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


def _archive_whole_chunks(
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
    limit = min(g.cutoff_us for g in groups)
    covered = np.concatenate([g.ids for g in groups])
    others = np.setdiff1d(planned.series["series_id"].to_numpy(), covered)
    if len(others):
        earliest = _min_ts(backend, "samples", others)
        if earliest is not None:
            limit = min(limit, earliest - earliest % DAY_US)
    group_of = {int(i): g for g in groups for i in g.ids}
    archived_ids = {int(i) for g in groups if g.archive for i in g.ids}
    members = planned.series[planned.series["series_id"].isin(sorted(archived_ids))]
    by_metric = {str(m): c["series_id"].tolist() for m, c in members.groupby("metric", sort=True)}
    newest_id = int(planned.series["series_id"].max()) if len(planned.series) else 0
    for schema, name, start, end in chunks_before(backend, "samples", limit):
        if start % DAY_US or end - start != DAY_US:
            continue  # not one UTC day (a changed chunk interval): row by row
        with backend.transaction():
            lock = (
                sql.SQL("LOCK TABLE {} IN SHARE MODE")
                .format(sql.Identifier(schema, name))
                .as_string(backend.conn)  # type: ignore[attr-defined]
            )
            held = _lock_holds(backend, planned.series, first=lock)
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
            strangers = [s for s in counts if s not in group_of or s in held or s > newest_id]
            if not counts or pending or strangers:
                continue
            archived = 0
            for metric, ids in by_metric.items():
                present = [i for i in ids if i in counts]
                if not present:
                    continue
                where = (
                    f"samples.series_id {backend.ids_in} AND samples.ts >= {backend.ts_in} "
                    f"AND samples.ts < {backend.ts_in}"
                )
                params = [backend.id_list(present), start, end]
                rows, item = _write_verified_day(
                    store, planned, metric, start, where, params, anonymizer, checkpoint
                )
                archived += rows
                if item is not None:
                    report.files.append(item)
            expected = sum(n for s, n in counts.items() if s in archived_ids)
            if archived != expected:
                raise MetricmillError(
                    f"chunk {us_to_datetime(start):%Y-%m-%d}: {archived} rows archived but "
                    f"{expected} are in it; rolled back, the next run retries"
                )
            if drop_chunk_range(backend, "samples", start, end) != 1:
                raise MetricmillError(
                    f"chunk {us_to_datetime(start):%Y-%m-%d} was not dropped; rolled back"
                )
        touched: set[int] = set()
        for sid, n in counts.items():
            group = group_of[sid]
            outcome = outcomes[id(group)]
            outcome.deleted += n
            if group.archive:
                outcome.archived += n
            if id(group) not in touched:
                outcome.chunks_dropped += 1
                touched.add(id(group))


def _drop_whole_chunks(
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
        earliest = _min_ts(backend, table, others)
    else:
        earliest = None
    limit = min(g.cutoff_us for g in groups)
    if earliest is not None:
        limit = min(limit, earliest - earliest % DAY_US)
    with backend.transaction():
        held = _lock_holds(backend, planned.series)
        newest_id = int(planned.series["series_id"].max()) if len(planned.series) else 0
        late = backend.execute(
            f"SELECT {backend.ts_out.format(col=f'min({_TIME_COLUMN[level]})')} FROM {table} "  # noqa: S608
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
                f"WHERE {_TIME_COLUMN[level]} < {backend.ts_in} GROUP BY series_id",
                (boundary,),
            )
        )
        dropped = drop_chunks_before(backend, table, boundary)
    for group in groups:
        outcome = outcomes[id(group)]
        outcome.deleted += sum(int(counts.get(int(i), 0)) for i in group.ids)
        outcome.chunks_dropped += dropped


def _min_ts(backend: Backend, table: str, ids: np.ndarray) -> int | None:
    column = "ts" if table == "samples" else "bucket"
    value = backend.execute(
        f"SELECT {backend.ts_out.format(col=f'min({column})')} FROM {table} "  # noqa: S608
        f"WHERE series_id {backend.ids_in}",
        (backend.id_list([int(i) for i in ids]),),
    )[0][0]
    return None if value is None else int(value)
