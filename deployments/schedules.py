"""The default schedule of every flow (DESIGN.md, "Flows"): one place that serve and prefect.yaml
follow (tests/test_deployments.py checks prefect.yaml against this table).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FlowSchedule:
    """One flow as a deployment: where its function lives, when it runs, how the UI shows it."""

    flow: str  # the flow's name: module flows/<flow>.py defines the function <flow>
    deployment: str
    cron: str  # UTC
    description: str
    tags: tuple[str, ...]

    @property
    def full_name(self) -> str:
        """`flow/deployment`, as Prefect's API and CLI name a deployment."""
        return f"{self.flow}/{self.deployment}"

    @property
    def entrypoint(self) -> str:
        return f"flows/{self.flow}.py:{self.flow}"


SCHEDULES: tuple[FlowSchedule, ...] = (
    FlowSchedule(
        flow="ingest",
        deployment="every-minute",
        cron="* * * * *",
        description="Every minute: land new files from the landing directory, scrape the "
        "configured targets, validate, write exactly once, quarantine bad rows.",
        tags=("metricmill", "ingest"),
    ),
    FlowSchedule(
        flow="rollup",
        # A minute after each 5-minute boundary: the ingest run of the boundary minute (which
        # writes the last minute of the 5m bucket just closed) has had that minute to finish,
        # instead of starting alongside this run and missing it every time.
        deployment="every-5-minutes",
        cron="1-59/5 * * * *",
        description="Every 5 minutes, a minute past each boundary (after that minute's ingest): "
        "recompute the pending time ranges at 1m, 5m, 1h and 1d.",
        tags=("metricmill", "rollup"),
    ),
    FlowSchedule(
        flow="retention",
        deployment="daily",
        cron="30 2 * * *",
        description="Daily at 02:30 UTC: archive expired data to Parquet, verify it, delete it; "
        "legal holds are kept.",
        tags=("metricmill", "retention"),
    ),
    FlowSchedule(
        flow="baseline",
        deployment="nightly",
        cron="0 3 * * *",
        description="Nightly at 03:00 UTC: learn each series' daily and weekly baseline "
        "from the rollups.",
        tags=("metricmill", "detection"),
    ),
    FlowSchedule(
        flow="detect",
        # Two minutes after each rollup run starts, so it scores freshly rolled-up buckets.
        deployment="every-5-minutes",
        cron="3-59/5 * * * *",
        description="Every 5 minutes: score recent data against baselines and models; open, "
        "update and resolve alerts; notify.",
        tags=("metricmill", "detection", "alerts"),
    ),
)

FLOW_NAMES: tuple[str, ...] = tuple(s.flow for s in SCHEDULES)


def schedule_for(flow: str) -> FlowSchedule:
    for schedule in SCHEDULES:
        if schedule.flow == flow:
            return schedule
    raise KeyError(flow)
