"""Retention rules, legal holds, and applying them: archive raw data to Parquet, verify, delete.

A rule says how long series whose metric matches a glob (and whose labels equal the given
ones) keep data at one level (raw, 1m, 5m, 1h, 1d). The highest priority matching rule of a
level wins; unmatched series get the level's default from settings. A legal-hold rule keeps
every level of the series it matches, whatever their rules say. Cut-offs fall on UTC
midnights. Rows inside a pending rollup range are never deleted until rolled up.
"""

from storage.retention.applying import apply, preview
from storage.retention.archiving import archive_table
from storage.retention.planning import (
    Group,
    Plan,
    default_days,
    held_mask,
    load_series,
    match_mask,
    plan,
    raw_cutoffs,
)
from storage.retention.report import Outcome, RetentionReport
from storage.retention.rules import (
    LEVEL_TABLES,
    LEVELS,
    MAX_RETENTION_DAYS,
    RetentionRule,
    RetentionRuleError,
    add_rule,
    glob_regex,
    list_rules,
    remove_rule,
    validate_rule,
)

__all__ = [
    "Group",
    "LEVELS",
    "LEVEL_TABLES",
    "MAX_RETENTION_DAYS",
    "Outcome",
    "Plan",
    "RetentionReport",
    "RetentionRule",
    "RetentionRuleError",
    "add_rule",
    "apply",
    "archive_table",
    "default_days",
    "glob_regex",
    "held_mask",
    "list_rules",
    "load_series",
    "match_mask",
    "plan",
    "preview",
    "raw_cutoffs",
    "remove_rule",
    "validate_rule",
]
