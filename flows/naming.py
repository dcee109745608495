"""Flow run names that stay put and tell the runs apart (one rule for every flow).

- A run the Prefect server's scheduler created: `<flow>-<scheduled start, to the second>Z`, e.g.
  `ingest-2026-12-02T06:04:00Z`. The slot, not the moment the run happens to start: a served run
  starts a few seconds early (the runner fetches runs ahead) or late (piled up), and two slots of
  one deployment never share a name.
- A run created by hand from a deployment (the UI, `prefect deployment run`, the API): keeps the
  name it was created with, the one the UI or CLI already showed.
- A direct call of the flow function (the demo, tests, Python): no deployment and no slot, so
  `<flow>-<start, to the second>Z-<last 6 hex digits of the run id>`. The id's end, not its start:
  Prefect's ids are UUIDv7, whose leading digits are a clock that changes every few hours.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

from prefect.client.schemas.objects import FlowRun
from prefect.context import FlowRunContext


def _utc_seconds(when: datetime) -> str:
    return f"{when.astimezone(UTC):%Y-%m-%dT%H:%M:%S}Z"


def slot_name(flow: str, run: FlowRun) -> str | None:
    """The name a scheduler-created run gets (None for any other run)."""
    if run.deployment_id is None or not run.auto_scheduled or run.expected_start_time is None:
        return None
    return f"{flow}-{_utc_seconds(run.expected_start_time)}"


def run_name_of(flow: str, run: FlowRun, *, now: datetime | None = None) -> str:
    """The name `run` goes by once it starts (see the module's docstring)."""
    slot = slot_name(flow, run)
    if slot is not None:
        return slot
    if run.deployment_id is not None:
        return run.name  # created by hand: the name already shown to whoever created it
    started = run.start_time or now or datetime.now(UTC)
    return f"{flow}-{_utc_seconds(started)}-{run.id.hex[-6:]}"


def run_name(flow: str) -> Callable[[], str]:
    """For `@flow(flow_run_name=run_name("ingest"))`: names the current run by the rule above."""

    def name() -> str:
        context = FlowRunContext.get()
        if context is None or context.flow_run is None:  # not inside a run: nothing to tell apart
            return f"{flow}-{_utc_seconds(datetime.now(UTC))}"
        return run_name_of(flow, context.flow_run)

    name.__qualname__ = name.__name__ = f"{flow}_run_name"
    return name
