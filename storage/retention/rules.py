"""Retention rules: validate, add, list and remove them (legal holds included)."""

from __future__ import annotations

import fnmatch
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from metricmill.errors import MetricmillError
from storage.backend import Backend
from storage.schema import ROLLUP_LEVELS, ROLLUP_TABLES

if TYPE_CHECKING:
    pass


LEVELS: tuple[str, ...] = ("raw", *ROLLUP_LEVELS)


LEVEL_TABLES: dict[str, str] = {"raw": "samples", **ROLLUP_TABLES}


_GLOB = re.compile(r"[A-Za-z0-9_:*?\[\]!-]+")


_LABEL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


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
    # Days an archived file stays under a compliance lock after its day ends (object stores);
    # None: the `archive_lock_days` setting.
    archive_lock_days: int | None = None

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
            "archive_lock_days": self.archive_lock_days,
        }

    @property
    def archives(self) -> bool:
        """Whether this rule archives what it deletes (raw data, archive on, not a hold)."""
        return self.archive and self.level == "raw" and not self.legal_hold

    def lock_days(self, default: int) -> int:
        """Days this rule's archive files are locked for: its own, else `default`."""
        return default if self.archive_lock_days is None else self.archive_lock_days


def _label_text(labels: Mapping[str, str]) -> str:
    return "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}" if labels else ""


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
    archive: bool = True,
    archive_lock_days: int | None = None,
) -> dict[str, str]:
    """Checks a rule's fields; returns its labels as a plain dict of strings."""
    glob_regex(metric_pattern)
    if level not in LEVELS:
        raise RetentionRuleError(f"unknown level {level!r}: use one of {', '.join(LEVELS)}")
    _check_lock_days(archive_lock_days, level=level, archive=archive, legal_hold=legal_hold)
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


def _check_lock_days(lock_days: int | None, *, level: str, archive: bool, legal_hold: bool) -> None:
    """A rule's own archive lock only means something where the rule archives: raw data,
    archive on, no legal hold (a hold keeps the rows, nothing is archived)."""
    if lock_days is None:
        return
    if isinstance(lock_days, bool) or not isinstance(lock_days, int):
        raise RetentionRuleError(f"archive_lock_days must be a whole number, not {lock_days!r}")
    if not 0 <= lock_days <= MAX_RETENTION_DAYS:
        raise RetentionRuleError(
            f"archive_lock_days must be between 0 and {MAX_RETENTION_DAYS}, not {lock_days}"
        )
    if legal_hold or level != "raw" or not archive:
        raise RetentionRuleError(
            "archive_lock_days applies to a rule that archives raw data (level raw, archive on, "
            "no legal hold): this rule archives nothing"
        )


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
    archive_lock_days: int | None = None,
) -> RetentionRule:
    """Validate and store a rule; returns it with its id."""
    clean = validate_rule(
        metric_pattern, retention_days, labels, priority, level, legal_hold,
        archive, archive_lock_days,
    )  # fmt: skip
    with backend.transaction():
        rows = backend.execute(
            "INSERT INTO retention_rules (metric_pattern, labels, level, retention_days, "
            "priority, archive, legal_hold, archive_lock_days) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s) RETURNING rule_id",
            (
                metric_pattern,
                json.dumps(clean, sort_keys=True),
                level,
                retention_days,
                priority,
                backend.sql_bool(archive),
                backend.sql_bool(legal_hold),
                archive_lock_days,
            ),
        )
    return RetentionRule(
        int(rows[0][0]), metric_pattern, clean, level, retention_days, priority, archive,
        legal_hold, archive_lock_days,
    )  # fmt: skip


def list_rules(backend: Backend) -> list[RetentionRule]:
    rows = backend.execute(
        "SELECT rule_id, metric_pattern, labels, level, retention_days, priority, archive, "
        "legal_hold, archive_lock_days FROM retention_rules "
        "ORDER BY level, priority DESC, rule_id"
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
            None if r[8] is None else int(r[8]),
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
