"""Whether a flow run should do its work: no overlap with another run, no work for a stale run.

Every flow function is decorated with `@exclusive("name")` (under `@flow`), which runs its body
inside `exclusive_run(settings, name)`:

- another run of the same flow holds the flow's database lock (storage/locks.py): a manual run
  while a scheduled one is busy, a second worker, a second `serve`: this run skips (ingest on a
  PostgreSQL server: `ingest_max_parallel_runs` runs may hold a slot of its lock each, and the
  next one skips);
- this run is a scheduled run of a deployment and a newer scheduled run of the same deployment
  is already due (runs piled up while the server or `serve` was down): this run skips, and the
  newest one does the work. Every flow catches up from the database, so one run is enough.

A skipped run ends Completed, in a state named "Skipped" whose message says why; it is not a
failure and raises no alert.
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, ParamSpec, TypeVar, overload
from uuid import UUID

from prefect import get_client, get_run_logger
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterDeploymentId,
    FlowRunFilterExpectedStartTime,
    FlowRunFilterId,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.client.schemas.sorting import FlowRunSort
from prefect.context import FlowRunContext, SyncClientContext
from prefect.states import Completed, State

from flows.naming import run_name_of
from metricmill.settings import Settings, load_settings
from storage.locks import flow_lock

SKIPPED = "Skipped"
P = ParamSpec("P")
R = TypeVar("R")


def due_scheduled_runs(
    deployment_id: UUID, *, after: datetime, now: datetime, exclude: UUID | None = None
) -> list[FlowRun]:
    """Runs of a deployment still waiting to start, due in (after, now], newest first."""
    flow_run_filter = FlowRunFilter(
        deployment_id=FlowRunFilterDeploymentId(any_=[deployment_id]),
        state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED])),
        expected_start_time=FlowRunFilterExpectedStartTime.model_validate(
            {"after_": after, "before_": now}
        ),
    )
    if exclude is not None:
        flow_run_filter.id = FlowRunFilterId(not_any_=[exclude])
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_run_filter=flow_run_filter,
            sort=FlowRunSort.EXPECTED_START_TIME_DESC,
            # An explicit limit: this Prefect's server rejects the client's default (null).
            limit=200,
        )
    # `after_` is inclusive: keep only runs strictly newer than `after`.
    return [r for r in runs if r.expected_start_time is None or r.expected_start_time > after]


def newer_run_due() -> FlowRun | None:
    """A newer scheduled run of this run's deployment that is already due, if any."""
    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        return None
    run = context.flow_run
    if run.deployment_id is None or run.expected_start_time is None:
        return None  # a run of the flow function itself: only the lock applies
    newer = due_scheduled_runs(
        run.deployment_id, after=run.expected_start_time, now=datetime.now(UTC), exclude=run.id
    )
    return newer[0] if newer else None


@contextmanager
def exclusive_run(settings: Settings, name: str) -> Iterator[str | None]:
    """None while this run may work (the flow's lock is held); else why it skips."""
    newer = newer_run_due()
    if newer is not None:
        # By the name it will run under (it is renamed when it starts: flows/naming.py).
        yield f"skipped: piled up; the newer run {run_name_of(name, newer)} does the work"
        return
    slots = parallel_runs(settings, name)
    with flow_lock(settings, name, slots=slots) as held:
        if held:
            yield None
        elif slots > 1:
            yield f"skipped: {slots} other {name} runs are in progress (ingest_max_parallel_runs)"
        else:
            yield f"skipped: another {name} run is in progress"


def parallel_runs(settings: Settings, name: str) -> int:
    """How many runs of flow `name` may work at once: ingest runs up to
    `ingest_max_parallel_runs` on a PostgreSQL server; every other flow, one."""
    return settings.ingest_parallel_runs if name == "ingest" else 1


def skipped(reason: str) -> State[None]:
    """The final state of a run that had nothing to do: Completed, named Skipped, with why."""
    get_run_logger().warning("%s", reason)
    return Completed(name=SKIPPED, message=reason)


class _Exclusive:
    """The decorator `exclusive(name)` returns; typed so that a coroutine flow stays one."""

    def __init__(self, name: str) -> None:
        self.name = name

    @overload
    def __call__(
        self, fn: Callable[P, Coroutine[Any, Any, R]]
    ) -> Callable[P, Coroutine[Any, Any, R | State[None]]]: ...

    @overload
    def __call__(self, fn: Callable[P, R]) -> Callable[P, R | State[None]]: ...

    def __call__(self, fn: Callable[P, Any]) -> Callable[P, Any]:
        name = self.name
        signature = inspect.signature(fn)

        def settings_of(*args: Any, **kwargs: Any) -> Settings:
            bound = signature.bind(*args, **kwargs)
            return load_settings(
                database_url=bound.arguments.get("database_url"), home=bound.arguments.get("home")
            )

        @functools.wraps(fn)
        def run_sync(*args: P.args, **kwargs: P.kwargs) -> Any:
            with exclusive_run(settings_of(*args, **kwargs), name) as skip:
                if skip:
                    return skipped(skip)
                return fn(*args, **kwargs)

        @functools.wraps(fn)
        async def run_async(*args: P.args, **kwargs: P.kwargs) -> Any:
            # A coroutine run's client is asynchronous; its synchronous parts (this lock's
            # look-ups, the tasks it calls, artifacts) share one synchronous client, as a
            # synchronous run's do, instead of each building its own (~30 ms of CPU apiece).
            with (
                SyncClientContext.get_or_create(),
                exclusive_run(settings_of(*args, **kwargs), name) as skip,
            ):
                if skip:
                    return skipped(skip)
                return await fn(*args, **kwargs)

        # The ingest flow is a coroutine (flows/ingest.py says why); the others are not.
        run: Any = run_async if inspect.iscoroutinefunction(fn) else run_sync
        # Prefect builds the parameter model from the signature, resolving names in the
        # wrapper's module: hand it the annotations already resolved in the flow's own module.
        hints = typing.get_type_hints(fn, include_extras=True)
        run.__signature__ = signature.replace(
            parameters=[
                p.replace(annotation=hints.get(p.name, p.annotation))
                for p in signature.parameters.values()
            ],
            return_annotation=hints.get("return", signature.return_annotation),
        )
        run.__annotations__ = hints
        return typing.cast(Callable[P, Any], run)


def exclusive(name: str) -> _Exclusive:
    """Run the decorated flow function only while it holds flow `name`'s lock (see above).

    The settings come from the function's `database_url` and `home` arguments, as the flow
    itself loads them. Goes under `@flow`: the signature (and so the UI's form) is unchanged.
    """
    return _Exclusive(name)
