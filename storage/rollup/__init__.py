"""Rollups: recompute the pending ranges level by level, and read stats at any resolution.

The package, one idea a module, each importing only those before it:

* `levels`: the levels and how they chain, the stored columns, time spans.
* `dialects`: the SQL that differs per backend (SQLite, PostgreSQL, TimescaleDB).
* `status`: how far behind the rollups are; the rows a run wrote.
* `run`: the rollup run (claiming pending ranges, recompute-and-replace per level, chunks).
* `query`: which level serves a step query, and the stats it reads.

What the rest of the project uses is re-exported here: `from storage.rollup import ...`.
"""

from storage.rollup.dialects import Dialect, PostgresDialect, TimescaleDialect, dialect_for
from storage.rollup.levels import (
    DAY_US,
    HOUR_US,
    LEVELS,
    QUERY_LEVELS,
    SOURCE,
    STAT_COLUMNS,
    STATS_FRAME_COLUMNS,
    Span,
    merge_spans,
    widen,
)
from storage.rollup.query import (
    QueryPlan,
    counter_increase,
    plan_query,
    resolved_stats,
    step_stats,
)
from storage.rollup.run import LevelWork, RollupReport, run_rollup
from storage.rollup.status import RollupStatus, rollup_status_of, written_rows
from storage.schema import ROLLUP_LEVELS

__all__ = [
    "DAY_US",
    "HOUR_US",
    "LEVELS",
    "QUERY_LEVELS",
    "ROLLUP_LEVELS",
    "SOURCE",
    "STATS_FRAME_COLUMNS",
    "STAT_COLUMNS",
    "Dialect",
    "LevelWork",
    "PostgresDialect",
    "QueryPlan",
    "RollupReport",
    "RollupStatus",
    "Span",
    "TimescaleDialect",
    "counter_increase",
    "dialect_for",
    "merge_spans",
    "plan_query",
    "resolved_stats",
    "rollup_status_of",
    "run_rollup",
    "step_stats",
    "widen",
    "written_rows",
]
