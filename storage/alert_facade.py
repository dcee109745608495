"""`store.alerts`: alerts, the rule engine's carried state, rules, silences, notifications.

A thin class over the SQL of storage/alerts.py, bound to one backend. Rows go in as the typed
records of storage/records.py; every write that must be atomic opens its transaction here, so
nothing above storage/ holds one.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import pandas as pd

from storage import alerts as sql
from storage.alerts import Silence
from storage.backend import Backend
from storage.records import AlertUpdate, NewAlert, NotificationRecord, RuleOutcome

R = TypeVar("R")


class Alerts:
    """Alerts and everything around them, on one store's connection."""

    def __init__(self, backend: Backend) -> None:
        self._backend = backend

    # -- rules ----------------------------------------------------------------------------
    def rules(self) -> list[dict[str, Any]]:
        """The CLI-managed alert rules, by name (fields as in storage.alerts.RULE_FIELDS)."""
        return sql.list_rules(self._backend)

    def upsert_rule(self, rule: Mapping[str, Any]) -> None:
        """Add a rule, or replace the one of the same name."""
        sql.upsert_rule(self._backend, dict(rule))

    def delete_rule(self, name: str) -> bool:
        """Remove a stored rule; False when there was none of that name."""
        return sql.delete_rule(self._backend, name)

    # -- the engine's unit of work --------------------------------------------------------
    def load_state(self, rule: str, series_ids: Sequence[int]) -> pd.DataFrame:
        """The carried engine state of `rule` for these series (series without one absent)."""
        return sql.load_state(self._backend, rule=rule, series_ids=series_ids)

    def apply_rules(
        self, rules: Iterable[R], judge: Callable[[R], RuleOutcome | None]
    ) -> list[RuleOutcome]:
        """Judge each rule and write what it changed, all in one transaction.

        `judge(rule)` may read through this facade (`load_state`, `for_fingerprints`): it sees
        the transaction's view, including what earlier rules wrote. Its outcome is written
        before the next rule is judged: each round's new alerts, escalations and resolutions,
        then the refreshed firing alerts, then the carried state. An error anywhere rolls the
        whole run back, so alerts and the state that produced them never disagree.
        """
        outcomes = []
        with self._backend.transaction():
            for rule in rules:
                outcome = judge(rule)
                if outcome is not None:
                    self._write_outcome(outcome)
                    outcomes.append(outcome)
        return outcomes

    def _write_outcome(self, outcome: RuleOutcome) -> None:
        """One rule's transitions, refreshes and state (inside the caller's transaction)."""
        for part in outcome.rounds:
            sql.open_alerts(self._backend, [_opened_row(a) for a in part.opened])
            sql.escalate_alerts(
                self._backend, [(u.at_us, u.value, u.score, u.fingerprint) for u in part.escalated]
            )
            sql.resolve_alerts(
                self._backend,
                [(u.at_us, u.at_us, u.value, u.score, u.fingerprint) for u in part.resolved],
            )
        if outcome.refreshed:
            sql.refresh_alerts(self._backend, [_refresh_row(u) for u in outcome.refreshed])
        if outcome.state is not None:
            sql.save_state(self._backend, rule=outcome.rule, state=outcome.state)

    # -- alerts ---------------------------------------------------------------------------
    def get(self, alert_id: int) -> dict[str, Any] | None:
        """One alert (columns as storage.alerts.ALERT_COLUMNS), or None."""
        return sql.get_alert(self._backend, alert_id)

    def find(
        self, *, status: str | None = None, rule: str | None = None, limit: int = 100
    ) -> pd.DataFrame:
        """Newest alerts first; status 'open' means firing or acknowledged, None all."""
        return sql.list_alerts(self._backend, status=status, rule=rule, limit=limit)

    def for_fingerprints(self, fingerprints: Sequence[str]) -> pd.DataFrame:
        """Every alert (open or not) of these fingerprints, oldest first."""
        return sql.alerts_for_fingerprints(self._backend, fingerprints)

    def count_open(self) -> int:
        """How many alerts are firing or acknowledged."""
        return sql.count_open(self._backend)

    def set_status(self, alert_id: int, *, status: str, now_us: int, incident: bool) -> None:
        """Acknowledge or resolve one alert by hand (optionally marking it an incident)."""
        sql.set_status(self._backend, alert_id, status=status, now_us=now_us, incident=incident)

    def incident_windows(self) -> pd.DataFrame:
        """(series_id, start_us, end_us) of alerts confirmed as incidents (left out of
        training), half-open, in data time."""
        return sql.incident_windows(self._backend)

    # -- silences -------------------------------------------------------------------------
    def add_silence(
        self, *, matcher: str, starts_us: int, ends_us: int, comment: str | None
    ) -> int:
        """Store a silence; returns its id."""
        return sql.add_silence(
            self._backend, matcher=matcher, starts_us=starts_us, ends_us=ends_us, comment=comment
        )

    def silences(self, *, active_at_us: int | None = None) -> list[Silence]:
        """All silences, or only those active at a moment."""
        return sql.silences(self._backend, active_at_us=active_at_us)

    def mark_silenced(self, silence_of: Mapping[int, int]) -> None:
        """Record which silence (value) held back each alert (key), in one transaction."""
        if not silence_of:
            return
        with self._backend.transaction():
            sql.mark_silenced(self._backend, [(s, a) for a, s in silence_of.items()])

    # -- notifications --------------------------------------------------------------------
    def record_notifications(self, records: Sequence[NotificationRecord]) -> None:
        """Store delivery attempts (and messages held back), in one transaction."""
        sql.record_notifications(
            self._backend,
            [
                (r.alert_id, r.channel, r.event, r.attempts, r.outcome, r.error, r.sent_us)
                for r in records
            ],
        )

    def last_delivered(self, alert_ids: Sequence[int]) -> dict[tuple[int, str], int]:
        """(alert_id, channel) -> when a firing or repeat message last reached it (µs)."""
        return sql.last_delivered(self._backend, alert_ids)

    def notifications_for(self, alert_id: int) -> pd.DataFrame:
        """The delivery attempts of one alert, oldest first."""
        return sql.notifications_for(self._backend, alert_id)


def _opened_row(alert: NewAlert) -> tuple[Any, ...]:
    """The parameters of storage.alerts.open_alerts for one new alert."""
    return (
        alert.fingerprint,
        alert.rule,
        alert.series_id,
        alert.severity,
        alert.started_us,
        alert.at_us,
        alert.value,
        alert.expected,
        alert.expected_low,
        alert.expected_high,
        alert.score,
        json.dumps(dict(alert.detail), sort_keys=True),
        alert.silence_id,
    )


def _refresh_row(update: AlertUpdate) -> tuple[Any, ...]:
    """The parameters of storage.alerts.refresh_alerts for one firing alert."""
    return (
        update.at_us,
        update.value,
        update.expected,
        update.expected_low,
        update.expected_high,
        update.score,
        update.fingerprint,
        update.at_us,
    )
