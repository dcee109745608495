"""The typed records that cross the storage boundary (what `Store` and its facades take and give).

Rows going into storage are frozen dataclasses with named fields, never positional tuples:
the facades turn them into the statements' parameters. This module imports nothing of the
project, so anything above storage/ may name these types.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pandas as pd


@dataclass
class Health:
    """What `Store.health()` found: connectivity, schema version, backend details, problems."""

    ok: bool
    backend_name: str  # sqlite, postgresql or timescaledb
    schema_version: int | None
    details: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class NewAlert:
    """A firing transition: a new open alert for `fingerprint` (or, when one is open already
    because the carried state was lost, that alert's latest values)."""

    fingerprint: str
    rule: str
    series_id: int
    severity: str
    started_us: int  # the first anomalous sample of the episode
    at_us: int  # the sample that made it fire
    value: float | None
    expected: float | None
    expected_low: float | None
    expected_high: float | None
    score: float | None
    detail: Mapping[str, Any]  # metric, labels, kind: stored as JSON
    silence_id: int | None = None


@dataclass(frozen=True)
class AlertUpdate:
    """New values for the open alert of `fingerprint` at data time `at_us` (an escalation, a
    resolution or a refresh of a firing alert; the expected band only for a refresh)."""

    fingerprint: str
    at_us: int
    value: float | None
    score: float | None
    expected: float | None = None
    expected_low: float | None = None
    expected_high: float | None = None


@dataclass(frozen=True)
class TransitionRound:
    """Transitions of which each series has at most one: written together, in this order."""

    opened: tuple[NewAlert, ...] = ()
    escalated: tuple[AlertUpdate, ...] = ()
    resolved: tuple[AlertUpdate, ...] = ()


@dataclass(frozen=True)
class RuleOutcome:
    """What evaluating one alert rule changes: its transitions in rounds (a series' k-th
    transition of the run is in round k, so each series' transitions keep their order), then
    the refreshed values of alerts still firing, then the rule's carried engine state."""

    rule: str
    rounds: tuple[TransitionRound, ...] = ()
    refreshed: tuple[AlertUpdate, ...] = ()
    state: pd.DataFrame | None = None  # series_id, phase, since_us, last_high_us, severity, ...


@dataclass(frozen=True)
class NotificationRecord:
    """One delivery attempt of an alert's message to a channel (or one held back)."""

    alert_id: int
    channel: str
    event: str  # firing, escalated, resolved or repeat
    attempts: int
    outcome: str  # sent, rejected, failed, silenced
    error: str | None
    sent_us: int


@dataclass(frozen=True)
class TimescaleStatus:
    """Whether TimescaleDB applies to a store: a PostgreSQL server, and the extension in use."""

    server: bool  # a PostgreSQL server (on SQLite TimescaleDB does not apply)
    version: str | None  # the extension's version when in use
    note: str = ""  # why it is not in use, when known

    @property
    def enabled(self) -> bool:
        """TimescaleDB is in use: hypertables, compression, chunk drops."""
        return self.version is not None
