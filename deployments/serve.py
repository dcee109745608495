"""Every flow as a scheduled deployment, served from one process (`metricmill serve`).

Each deployment has a concurrency limit of 1 that cancels a newcomer while a run is active;
the flows' database lock (flows/guard.py) also stops manual and ad-hoc runs from overlapping.
Runs that piled up while `serve` or the Prefect server was down are skipped except the newest:
`sweep_piled_runs` cancels the older ones before serving starts and then every half minute,
and a piled run that starts anyway skips itself (flows/guard.py).

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
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from types import FrameType
from typing import Any, cast

from prefect import Flow, get_client
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.deployments.runner import RunnerDeployment
from prefect.exceptions import ObjectNotFound
from prefect.runner import Runner
from prefect.states import Cancelled

from deployments.schedules import SCHEDULES, FlowSchedule
from flows.guard import SKIPPED, due_scheduled_runs

logger = logging.getLogger("metricmill.serve")

ONE_AT_A_TIME = ConcurrencyLimitConfig(
    limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW
)
SWEEP_SECONDS = 30.0
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
    names: Iterable[str] | None = None,
) -> tuple[list[RunnerDeployment], list[str]]:
    """(deployments of the flows that exist, names of the flows left out because they do not)."""
    deployments: list[RunnerDeployment] = []
    missing: list[str] = []
    for schedule in selected(names):
        flow = load_flow(schedule.flow)
        if flow is None:
            missing.append(schedule.flow)
            continue
        deployment = cast(
            RunnerDeployment,
            flow.to_deployment(
                name=schedule.deployment,
                cron=schedule.cron,
                description=schedule.description,
                tags=list(schedule.tags),
                concurrency_limit=ONE_AT_A_TIME,
            ),
        )
        deployments.append(deployment)
    return deployments, missing


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
            newest = due[0]
            for run in due[1:]:
                client.set_flow_run_state(
                    run.id,
                    Cancelled(
                        name=SKIPPED,
                        message=f"skipped: piled up; the newer run {newest.name} does the work",
                    ),
                )
                cancelled += 1
            logger.warning("%s: skipped %d piled-up runs, kept %s", full_name, len(due) - 1,
                           newest.name)  # fmt: skip
    return cancelled


def _sweep_forever(full_names: Sequence[str], stop: threading.Event) -> None:
    while not stop.wait(SWEEP_SECONDS):
        try:
            sweep_piled_runs(full_names)
        except Exception as exc:  # the server may be down for a while: try again later
            logger.warning("could not check for piled-up runs: %s", exc)


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
    """Prefect's Runner, stopped by SIGTERM as by Ctrl-C (it installs this in start())."""

    def handle_sigterm(self, *args: Any, **kwargs: Any) -> None:
        signum = args[0] if args else signal.SIGTERM
        frame = args[1] if len(args) > 1 else None
        _stop_on_signal(signum, frame)


def serve_all(names: Iterable[str] | None = None, *, limit: int | None = None) -> str | None:
    """Serve the flows' deployments until SIGTERM or SIGINT; returns that signal's name (None
    when there was nothing to serve)."""
    deployments, missing = build_deployments(names)
    for name in missing:
        logger.warning("flow %r is not available yet (no flows/%s.py): not served", name, name)
    if not deployments:
        return None
    _Stopped.signal = None
    previous = {sig: signal.signal(sig, _stop_on_signal) for sig in (signal.SIGTERM,)}
    full_names = [d.full_name for d in deployments]
    stop = threading.Event()
    try:
        sweep_piled_runs(full_names)
        sweeper = threading.Thread(
            target=_sweep_forever, args=(full_names, stop), name="piled-run-sweeper", daemon=True
        )
        sweeper.start()
        runner = _Runner(pause_on_shutdown=False, limit=limit)
        for deployment in deployments:
            runner.add_deployment(deployment)
        asyncio.run(runner.start())
    except KeyboardInterrupt:
        pass
    finally:
        stop.set()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return _Stopped.signal or "SIGINT"
