"""Rollup tasks: recompute the pending ranges, then hold what was written to its contract."""

from __future__ import annotations

from prefect import get_run_logger, task

from expectations.rollup_output import RollupCheck, validate_rollup_output
from metricmill.settings import Settings
from storage.rollup import LEVELS, RollupReport, Span
from storage.store import Store
from tasks.ingest import is_transient


@task(retries=3, retry_delay_seconds=[1, 3, 9], retry_condition_fn=is_transient)
def roll_up(settings: Settings, max_chunks: int | None = None) -> RollupReport:
    """Recompute pending ranges at every level, a bounded chunk per transaction."""
    with Store.open(settings=settings) as store:
        report = store.rollups.run(max_chunks=max_chunks)
    get_run_logger().info(
        "rolled up %d chunk(s) in %.2fs: %s; %d pending range(s) left",
        report.chunks,
        report.seconds,
        ", ".join(f"{lv} {w.rows} rows" for lv, w in report.levels.items()),
        report.pending_left,
    )
    return report


@task(retries=3, retry_delay_seconds=[1, 3, 9], retry_condition_fn=is_transient)
def check_rollup_output(settings: Settings, spans: dict[str, list[Span]]) -> list[RollupCheck]:
    """Fetch each level's written rows back (one query per level) and validate them once."""
    checks = []
    with Store.open(settings=settings) as store:
        for level in LEVELS:
            if not spans.get(level):
                continue
            rows = store.rollups.written_rows(
                level, spans[level], limit=settings.rollup_check_max_rows
            )
            checks.append(validate_rollup_output(rows, level))
    return checks
