"""What the Prefect API knows about metricmill, for `metricmill status` and `metricmill doctor`.

Nothing here starts Prefect's ephemeral server (which takes tens of seconds): without a
configured PREFECT_API_URL these functions say so and return.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

import httpx
from prefect import get_client
from prefect.client.schemas.filters import (
    FlowFilter,
    FlowFilterName,
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import StateType
from prefect.client.schemas.sorting import FlowRunSort
from prefect.settings import PREFECT_API_URL


@dataclass(frozen=True)
class LastRun:
    name: str
    state: str  # the state's name: Completed, Skipped, Failed, Running, ...
    state_type: str
    started: datetime | None
    message: str


def api_url() -> str | None:
    value = PREFECT_API_URL.value()
    return str(value).rstrip("/") if value else None


def api_problem(timeout: float = 3.0) -> str | None:
    """None when the Prefect API answers; else what is wrong, in one line."""
    url = api_url()
    if url is None:
        return "PREFECT_API_URL is not set (flow runs go to a temporary local server)"
    try:
        response = httpx.get(f"{url}/health", timeout=timeout)
    except httpx.HTTPError as exc:
        return f"cannot reach the Prefect API at {url}: {type(exc).__name__}"
    if response.status_code != 200:
        return f"the Prefect API at {url} answered {response.status_code}"
    return None


def last_runs(flow_names: Iterable[str]) -> dict[str, LastRun | None]:
    """The newest run of each flow that has left the Scheduled state, or None if none has."""
    found: dict[str, LastRun | None] = {}
    with get_client(sync_client=True) as client:
        for name in flow_names:
            runs = client.read_flow_runs(
                flow_filter=FlowFilter(name=FlowFilterName(any_=[name])),
                flow_run_filter=FlowRunFilter(
                    state=FlowRunFilterState(
                        type=FlowRunFilterStateType(not_any_=[StateType.SCHEDULED])
                    )
                ),
                sort=FlowRunSort.EXPECTED_START_TIME_DESC,
                limit=1,
            )
            if not runs:
                found[name] = None
                continue
            run, state = runs[0], runs[0].state
            found[name] = LastRun(
                name=run.name,
                state=(state.name or "?") if state else "?",
                state_type=state.type.value if state else "?",
                started=run.start_time or run.expected_start_time,
                message=(state.message or "") if state else "",
            )
    return found


def missing_blocks(names: Iterable[str]) -> list[str]:
    """Of the block names given ("type-slug/name" or "name"), those Prefect does not have."""
    with get_client(sync_client=True) as client:
        documents = client.read_block_documents(include_secrets=False, limit=200)
    have = {doc.name for doc in documents if doc.name}
    have |= {f"{doc.block_type.slug}/{doc.name}" for doc in documents if doc.block_type}
    return [name for name in names if name not in have]
