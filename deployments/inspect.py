"""What the Prefect API knows about metricmill, for `metricmill status` and `metricmill doctor`.

Nothing here starts Prefect's ephemeral server (which takes tens of seconds): without a
configured PREFECT_API_URL these functions say so and return.
"""

from __future__ import annotations

import os
import sys
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx


@dataclass(frozen=True)
class LastRun:
    name: str
    state: str  # the state's name: Completed, Skipped, Failed, Running, ...
    state_type: str
    started: datetime | None
    message: str


def api_url() -> str | None:
    """PREFECT_API_URL as Prefect would read it, without importing Prefect (seconds of start-up
    that `status` does not need): from Prefect's own settings when it is loaded already (a flow
    run, a test harness), else the environment, else the active profile in profiles.toml."""
    if "prefect.settings" in sys.modules:
        from prefect.settings import PREFECT_API_URL

        value = PREFECT_API_URL.value()
    else:
        value = os.environ.get("PREFECT_API_URL") or _profile_setting("PREFECT_API_URL")
    return str(value).rstrip("/") if value else None


def _profile_setting(name: str) -> str | None:
    """One setting of the active Prefect profile (PREFECT_PROFILE, or the file's `active`)."""
    home = Path(os.environ.get("PREFECT_HOME") or "~/.prefect").expanduser()
    path = Path(os.environ.get("PREFECT_PROFILES_PATH") or home / "profiles.toml").expanduser()
    try:
        contents = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None
    active = os.environ.get("PREFECT_PROFILE") or contents.get("active")
    profiles = contents.get("profiles")
    if not isinstance(active, str) or not isinstance(profiles, dict):
        return None
    profile = profiles.get(active)
    value = profile.get(name) if isinstance(profile, dict) else None
    return str(value) if value else None


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
    """The newest run of each flow that has left the Scheduled state, or None if none has.

    Asked over Prefect's REST API (`POST /flow_runs/filter`) with httpx: the Prefect client
    would cost `metricmill status` seconds of imports."""
    url = api_url()
    if url is None:
        raise RuntimeError("PREFECT_API_URL is not set")
    found: dict[str, LastRun | None] = {}
    with httpx.Client(base_url=url, timeout=10.0) as client:
        for name in flow_names:
            response = client.post(
                "/flow_runs/filter",
                json={
                    "flows": {"name": {"any_": [name]}},
                    "flow_runs": {"state": {"type": {"not_any_": ["SCHEDULED"]}}},
                    "sort": "EXPECTED_START_TIME_DESC",
                    "limit": 1,
                },
            )
            response.raise_for_status()
            runs = response.json()
            found[name] = _last_run(runs[0]) if runs else None
    return found


def _last_run(run: dict[str, Any]) -> LastRun:
    state = run.get("state") or {}
    started = run.get("start_time") or run.get("expected_start_time")
    return LastRun(
        name=str(run.get("name") or "?"),
        state=str(state.get("name") or "?"),
        state_type=str(state.get("type") or "?"),
        started=datetime.fromisoformat(started) if started else None,
        message=str(state.get("message") or ""),
    )


def missing_blocks(names: Iterable[str]) -> list[str]:
    """Of the block names given ("type-slug/name" or "name"), those Prefect does not have."""
    from prefect import get_client

    with get_client(sync_client=True) as client:
        documents = client.read_block_documents(include_secrets=False, limit=200)
    have = {doc.name for doc in documents if doc.name}
    have |= {f"{doc.block_type.slug}/{doc.name}" for doc in documents if doc.block_type}
    return [name for name in names if name not in have]
