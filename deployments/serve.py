"""Every flow as a scheduled deployment, served from one process (`metricmill serve`).

Each deployment has a concurrency limit of 1 that cancels a newcomer while a run is active
(ingest on a PostgreSQL server: `ingest_max_parallel_runs`);
the flows' database lock (flows/guard.py) also stops manual and ad-hoc runs from overlapping.
Runs that piled up while `serve` or the Prefect server was down are skipped except the newest:
each time the runner fetches the runs it is about to claim, `claim_newest` keeps the newest of
each deployment and cancels the older ones as Skipped, naming it; a piled run that starts anyway
(on a worker) skips itself (flows/guard.py). A stopped serve gives back the runs it had claimed
and not started, and a starting one those of a serve that died (`release_orphaned_runs`): each
would hold its deployment's one slot for minutes, and the server would cancel the kept run.

SIGTERM (what systemd sends) stops it as Ctrl-C does: the runner's main task is cancelled,
its runs and client close in order, and `serve_all` returns the signal's name for the one line
the CLI prints. (Prefect's own SIGTERM handler calls the runner's async stop from a signal
handler and exits mid-flight: a screenful of "coroutine 'Runner.astop' was never awaited".)
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import signal
import threading
from collections import defaultdict
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from types import FrameType
from typing import Any, cast
from uuid import UUID

import anyio
import anyio.to_thread
from prefect import Flow, get_client
from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterDeploymentId,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import (
    ConcurrencyLimitConfig,
    ConcurrencyLimitStrategy,
    FlowRun,
    StateType,
)
from prefect.deployments.runner import RunnerDeployment
from prefect.exceptions import ObjectNotFound
from prefect.runner import Runner
from prefect.states import Cancelled, Crashed, Scheduled

from deployments.forms import form_schema
from deployments.schedules import SCHEDULES, FlowSchedule
from flows.guard import SKIPPED, due_scheduled_runs, parallel_runs
from flows.naming import run_name_of
from metricmill.settings import Settings, load_settings
from storage.locks import lock_holders

logger = logging.getLogger("metricmill.serve")

ONE_AT_A_TIME = ConcurrencyLimitConfig(
    limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW
)
SWEEP_SECONDS = 30.0
PREFETCH = timedelta(seconds=10)  # how far ahead the runner claims runs (Prefect's default)
# A live runner moves a claimed run on within seconds of its start time; after this, it has none.
ORPHAN_GRACE = timedelta(seconds=30)
ACTIVE = (StateType.PENDING, StateType.RUNNING, StateType.CANCELLING)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def load_flow(name: str) -> Flow[..., object] | None:
    """The flow function `flows.<name>.<name>`, or None while that module does not exist yet."""
    module_name = f"flows.{name}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise  # the module exists but something it imports is missing: a real error
        return None
    found = getattr(module, name, None)
    return found if isinstance(found, Flow) else None


def selected(names: Iterable[str] | None) -> list[FlowSchedule]:
    """The schedules of the named flows (all when names is None), in the table's order."""
    if names is None:
        return list(SCHEDULES)
    wanted = set(names)
    unknown = wanted - {s.flow for s in SCHEDULES}
    if unknown:
        known = ", ".join(s.flow for s in SCHEDULES)
        raise ValueError(f"unknown flow {', '.join(sorted(unknown))}: choose from {known}")
    return [s for s in SCHEDULES if s.flow in wanted]


def build_deployments(
    names: Iterable[str] | None = None, *, every: timedelta | None = None
) -> tuple[list[RunnerDeployment], list[str]]:
    """(deployments of the flows that exist, names of the flows left out because they do not).

    `every`: a fixed interval for every deployment instead of its cron (trials and tests).
    """
    deployments: list[RunnerDeployment] = []
    missing: list[str] = []
    settings = load_settings()
    for schedule in selected(names):
        flow = load_flow(schedule.flow)
        if flow is None:
            missing.append(schedule.flow)
            continue
        deployment = cast(
            RunnerDeployment,
            flow.to_deployment(
                name=schedule.deployment,
                cron=None if every else schedule.cron,
                interval=every,
                description=schedule.description,
                tags=list(schedule.tags),
                concurrency_limit=concurrency_of(schedule.flow, settings),
            ),
        )
        # Optional parameters as plain inputs on the UI's custom-run form (deployments/forms.py).
        deployment._parameter_openapi_schema = form_schema(deployment._parameter_openapi_schema)
        deployments.append(deployment)
    return deployments, missing


def concurrency_of(flow: str, settings: Settings) -> ConcurrencyLimitConfig:
    """A deployment's concurrency limit: one run at a time, except ingest on a PostgreSQL
    server, which runs up to `ingest_max_parallel_runs` at once (the flow's lock has as many
    slots: flows/guard.py). A newcomer past the limit is cancelled."""
    runs = parallel_runs(settings, flow)
    if runs == 1:
        return ONE_AT_A_TIME
    return ConcurrencyLimitConfig(
        limit=runs, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW
    )


def _runs_in(client: SyncPrefectClient, deployment_id: UUID, kind: StateType) -> list[FlowRun]:
    return client.read_flow_runs(
        flow_run_filter=FlowRunFilter(
            deployment_id=FlowRunFilterDeploymentId(any_=[deployment_id]),
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[kind])),
        ),
        limit=200,
    )


def release_orphaned_runs(
    full_names: Sequence[str], *, now: datetime | None = None, grace: timedelta = ORPHAN_GRACE
) -> int:
    """Give back the deployment concurrency slot of runs no process works on; returns how many.

    A stopped `serve` leaves behind the run its runner had claimed ahead of its start time
    (Pending, nothing started) and, if it was killed, a run still marked Running. Each holds
    its deployment's one slot for the lease's five minutes: the server then cancels every run
    that turns late ("Deployment concurrency limit reached") and the run kept by the sweep is
    cancelled when it asks for the slot. A Pending run older than `grace` that never started
    goes back to Scheduled at its own time (it counts as piled up again); a Running run whose
    flow lock nobody holds (storage/locks.py: the lock dies with its process) ends Crashed.
    """
    now = now or datetime.now(UTC)
    settings = load_settings()
    held = set(lock_holders(settings))
    released = 0
    with get_client(sync_client=True) as client:
        for full_name in full_names:
            try:
                deployment = client.read_deployment_by_name(full_name)
            except ObjectNotFound:
                continue
            flow = full_name.split("/", 1)[0]
            for run in _runs_in(client, deployment.id, StateType.PENDING):
                due = run.expected_start_time
                if run.start_time is not None or due is None or due > now - grace:
                    continue
                client.set_flow_run_state(
                    run.id, Scheduled(scheduled_time=due, name="Late"), force=True
                )
                released += 1
                logger.warning("%s: %s was claimed by a runner that stopped: scheduled again",
                               full_name, run_name_of(flow, run))  # fmt: skip
            if flow in held:
                continue
            for run in _runs_in(client, deployment.id, StateType.RUNNING):
                if run.start_time is not None and run.start_time > now - grace:
                    continue
                client.set_flow_run_state(
                    run.id,
                    Crashed(message="no process runs it any more (its serve stopped)"),
                    force=True,
                )
                released += 1
                logger.warning("%s: %s lost its process: marked Crashed", full_name,
                               run_name_of(flow, run))  # fmt: skip
    return released


def _skip_older(client: SyncPrefectClient, flow: str, due: list[FlowRun]) -> str:
    """Cancel every run of `due` (one deployment's, newest first) but the first, as Skipped
    with a message naming the first; returns that name. Runs get their final names first
    (flows/naming.py), so the name in the messages is the one the kept run runs under."""
    newest = due[0]
    kept = run_name_of(flow, newest)
    if kept != newest.name:
        client.set_flow_run_name(newest.id, kept)
    message = f"skipped: piled up; the newer run {kept} does the work"
    for run in due[1:]:
        name = run_name_of(flow, run)
        if name != run.name:
            client.set_flow_run_name(run.id, name)
        client.set_flow_run_state(
            run.id,
            Cancelled(name=SKIPPED, message=message),
        )
    return kept


def sweep_piled_runs(full_names: Sequence[str], *, now: datetime | None = None) -> int:
    """Cancel due scheduled runs of each deployment except its newest; returns how many."""
    now = now or datetime.now(UTC)
    cancelled = 0
    with get_client(sync_client=True) as client:
        for full_name in full_names:
            try:
                deployment = client.read_deployment_by_name(full_name)
            except ObjectNotFound:
                continue  # registered by this serve for the first time: nothing piled up
            due = due_scheduled_runs(deployment.id, after=_EPOCH, now=now)
            if len(due) < 2:
                continue
            kept = _skip_older(client, full_name.split("/", 1)[0], due)
            cancelled += len(due) - 1
            logger.warning("%s: skipped %d piled-up runs, kept %s", full_name, len(due) - 1,
                           kept)  # fmt: skip
    return cancelled


def claim_newest(runs: list[FlowRun]) -> list[FlowRun]:
    """Of the runs the runner is about to claim, the newest of each deployment; the older ones
    are skipped (`_skip_older`). Done on the runner's own list, so the run the messages name is
    the one it claims: a sweep of its own, a moment apart, could keep a run that the runner then
    loses to the next one it fetched ahead ("Deployment concurrency limit reached"). While a
    run of the deployment holds its slot, nothing is skipped: the limit cancels the newcomers.
    """
    groups: dict[UUID | None, list[FlowRun]] = defaultdict(list)
    for run in runs:
        groups[run.deployment_id].append(run)
    claimed: list[FlowRun] = []
    with get_client(sync_client=True) as client:
        for deployment_id, group in groups.items():
            if deployment_id is None or len(group) < 2:
                claimed.extend(group)
                continue
            if any(_runs_in(client, deployment_id, kind) for kind in ACTIVE):
                claimed.extend(group)
                continue
            deployment = client.read_deployment(deployment_id)
            flow = client.read_flow(deployment.flow_id).name
            group.sort(key=lambda r: r.expected_start_time or _EPOCH, reverse=True)
            kept = _skip_older(client, flow, group)
            logger.warning("%s/%s: skipped %d piled-up runs, kept %s", flow, deployment.name,
                           len(group) - 1, kept)  # fmt: skip
            claimed.append(group[0])
    return claimed


def _sweep_forever(full_names: Sequence[str], stop: threading.Event) -> None:
    while True:
        try:
            sweep_piled_runs(full_names)
        except Exception as exc:  # the server may be down for a while: try again later
            logger.warning("could not check for piled-up runs: %s", exc)
        if stop.wait(SWEEP_SECONDS):
            return


class _Stopped:
    """Which signal stopped serving (None until one did)."""

    signal: str | None = None


def _stop_on_signal(signum: int, frame: FrameType | None) -> None:
    """SIGTERM and SIGINT: cancel the runner the way asyncio cancels it on Ctrl-C."""
    if _Stopped.signal is None:
        _Stopped.signal = signal.Signals(signum).name
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler) and handler is not _stop_on_signal:
        handler(signal.SIGINT, frame)  # asyncio.run's: cancels the main task (a 2nd: raises)
    else:
        raise KeyboardInterrupt


class _Runner(Runner):
    """Prefect's Runner, stopped by SIGTERM as by Ctrl-C (it installs this in start()), that
    claims only the newest of a deployment's piled-up runs (`claim_newest`)."""

    claims_newest: bool = False

    async def __aenter__(self) -> _Runner:
        await super().__aenter__()
        # Prefect 3.8's poller (pinned in uv.lock); on another version serve falls back to
        # sweeping at start and every half minute.
        poller = getattr(self, "_scheduled_run_poller", None)
        fetch = getattr(poller, "_get_scheduled_flow_runs", None)
        if poller is not None and fetch is not None:

            async def fetch_newest() -> list[FlowRun]:
                runs = await fetch()
                return await anyio.to_thread.run_sync(claim_newest, list(runs))

            poller._get_scheduled_flow_runs = fetch_newest
            self.claims_newest = True
        return self

    def handle_sigterm(self, *args: Any, **kwargs: Any) -> None:
        signum = args[0] if args else signal.SIGTERM
        frame = args[1] if len(args) > 1 else None
        _stop_on_signal(signum, frame)


def serve_all(
    names: Iterable[str] | None = None,
    *,
    limit: int | None = None,
    every: timedelta | None = None,
) -> str | None:
    """Serve the flows' deployments until SIGTERM or SIGINT; returns that signal's name (None
    when there was nothing to serve)."""
    deployments, missing = build_deployments(names, every=every)
    for name in missing:
        logger.warning("flow %r is not available yet (no flows/%s.py): not served", name, name)
    if not deployments:
        return None
    _Stopped.signal = None
    previous = {sig: signal.signal(sig, _stop_on_signal) for sig in (signal.SIGTERM,)}
    # Started with SIGINT ignored (`nohup metricmill serve &` from a script: a background job
    # inherits SIGINT ignored), Python keeps it ignored and asyncio.run installs no handler of
    # its own: `kill -INT` would do nothing. Ctrl-C and SIGINT stop serve, whoever started it.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, signal.default_int_handler)
    full_names = [d.full_name for d in deployments]
    stop = threading.Event()
    try:
        release_orphaned_runs(full_names)
        runner = _Runner(
            pause_on_shutdown=False, limit=limit, prefetch_seconds=PREFETCH.total_seconds()
        )
        for deployment in deployments:
            runner.add_deployment(deployment)

        async def run() -> None:
            async def fall_back() -> None:
                await anyio.sleep(SWEEP_SECONDS / 6)
                if not runner.claims_newest:
                    logger.warning("piled-up runs: sweeping every %.0f s", SWEEP_SECONDS)
                    threading.Thread(
                        target=_sweep_forever, args=(full_names, stop), daemon=True
                    ).start()

            async with anyio.create_task_group() as group:
                group.start_soon(fall_back)
                await runner.start()

        asyncio.run(run())
    except KeyboardInterrupt:
        pass
    finally:
        stop.set()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    # The runs this runner claimed and did not start keep the deployments' slots: give them
    # back now rather than leave the next `serve` (and the late runs meanwhile) without one.
    try:
        release_orphaned_runs(full_names, grace=timedelta(0), now=datetime.now(UTC) + PREFETCH)
    except Exception as exc:  # the server may be gone too: the next serve releases them
        logger.warning("could not release the runs this serve had claimed: %s", exc)
    return _Stopped.signal or "SIGINT"
