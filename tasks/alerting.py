"""Alert rules applied to anomaly scores: the pure engine, and the persistent lifecycle.

`process_scores` is what the detect flow calls with each run's scores. Order matters: rules
are evaluated and every transition (and the carried state) is committed in one transaction
first; only then are silences applied, notifications sent and recorded, and Prefect events
emitted. A failure after the commit can lose a message, never an alert.
"""

from __future__ import annotations

import fnmatch
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pandas as pd

from metricmill.settings import Settings
from storage.records import AlertUpdate, NewAlert, NotificationRecord, RuleOutcome, TransitionRound
from storage.store import Store
from tasks.alert_engine import AlertRule, alert_flags, alert_timeline, evaluate, late_events
from tasks.alert_notices import describe, fmt, iso, notifications_due, records
from tasks.calibration import KIND_NAMES
from tasks.notify import Channel, deliver, load_channels

__all__ = [
    "AlertRule",
    "AlertSummary",
    "alert_flags",
    "alert_timeline",
    "incident_windows",
    "load_rules",
    "process_scores",
]

EVENT_NAMES = {
    "firing": "metricmill.alert.firing",
    "escalated": "metricmill.alert.escalated",
    "resolved": "metricmill.alert.resolved",
}
_log = logging.getLogger(__name__)


@dataclass
class AlertSummary:
    """What one `process_scores` call did."""

    series: int = 0
    fired: int = 0
    escalated: int = 0
    resolved: int = 0
    silenced: int = 0
    repeats: int = 0
    open_alerts: int = 0
    notifications: Counter[str] = field(default_factory=Counter)  # outcome -> count
    events_emitted: int = 0
    transitions: pd.DataFrame = field(default_factory=pd.DataFrame)


def _logger() -> Any:
    try:
        from prefect.logging import get_run_logger

        return get_run_logger()
    except Exception:  # outside a flow or task run
        return _log


def default_rule(settings: Settings) -> AlertRule:
    return AlertRule(
        name="anomaly",
        metric_pattern="*",
        threshold=settings.alert_threshold,
        critical_threshold=settings.alert_critical_threshold,
        for_seconds=settings.alert_for_seconds,
        keep_firing_for_seconds=settings.alert_keep_firing_for_seconds,
        min_abs_deviation=settings.alert_min_abs_deviation,
        min_baseline_level=settings.alert_min_baseline_level,
        repeat_interval_seconds=settings.alert_repeat_interval_seconds,
    )  # direction both; the budget is the one the baselines were fitted with


def load_rules(settings: Settings, store: Store) -> list[AlertRule]:
    """The settings' default rule (unless disabled) and the CLI-managed rules; a CLI rule
    with the default's name replaces it."""
    rules: dict[str, AlertRule] = {}
    if settings.alert_rule_enabled:
        rules["anomaly"] = default_rule(settings)
    for stored in store.alerts.rules():
        rules[stored["name"]] = AlertRule(**stored)
    return list(rules.values())


def incident_windows(store: Store) -> pd.DataFrame:
    """(series_id, start_us, end_us) of alerts confirmed as incidents (left out of training)."""
    return store.alerts.incident_windows()


def flow_run_link() -> str | None:
    """PREFECT_UI_URL/runs/flow-run/<id> of the current flow run, if any."""
    from prefect.context import FlowRunContext, TaskRunContext
    from prefect.settings import PREFECT_UI_URL

    flow_ctx, task_ctx = FlowRunContext.get(), TaskRunContext.get()
    if flow_ctx is not None and flow_ctx.flow_run is not None:
        run_id: Any = flow_ctx.flow_run.id
    elif task_ctx is not None:
        run_id = task_ctx.task_run.flow_run_id
    else:
        run_id = None
    ui = PREFECT_UI_URL.value()
    return f"{ui.rstrip('/')}/runs/flow-run/{run_id}" if run_id and ui else None


def _matching_series(rule: AlertRule, meta: dict[int, tuple[str, dict[str, str]]]) -> np.ndarray:
    by_metric: dict[str, list[int]] = {}
    for sid, (metric, _) in meta.items():
        by_metric.setdefault(metric, []).append(sid)
    hits = [
        sid
        for metric, ids in by_metric.items()
        if fnmatch.fnmatchcase(metric, rule.metric_pattern)
        for sid in ids
    ]
    return np.array(sorted(hits), dtype=np.int64)


def _floats(frame: pd.DataFrame, name: str) -> list[float | None]:
    if name not in frame.columns:
        return [None] * len(frame)
    values = frame[name].to_numpy(dtype=np.float64, na_value=np.nan)
    return [None if np.isnan(v) else float(v) for v in values]


def _rounds(
    rule: AlertRule, events: pd.DataFrame, meta: dict[int, tuple[str, dict[str, str]]]
) -> tuple[TransitionRound, ...]:
    """One rule's transitions as typed records, in rounds: a series' k-th transition of the
    run is in round k, so writing round after round keeps each series' order."""
    if not len(events):
        return ()
    rounds = events.groupby("series_id", sort=False).cumcount().to_numpy()
    return tuple(
        _round(rule, events[rounds == number], meta) for number in range(int(rounds.max()) + 1)
    )


def _round(
    rule: AlertRule, part: pd.DataFrame, meta: dict[int, tuple[str, dict[str, str]]]
) -> TransitionRound:
    """The transitions of one round (each series at most once): new, escalated, resolved."""
    value, score = _floats(part, "value"), _floats(part, "score")
    expected, low, high = (_floats(part, c) for c in ("expected", "lower", "upper"))
    at = part["ts_us"].astype("int64").tolist()
    kind = part["event"].tolist()
    kinds = part["kind"].tolist() if "kind" in part else [0] * len(part)
    sids = [int(s) for s in part["series_id"].tolist()]
    fps = [f"{rule.name}:{sid}" for sid in sids]
    opened = tuple(
        NewAlert(
            fingerprint=fps[i],
            rule=rule.name,
            series_id=sid,
            severity=part["severity"].iloc[i],
            started_us=int(part["since_us"].iloc[i]),
            at_us=at[i],
            value=value[i],
            expected=expected[i],
            expected_low=low[i],
            expected_high=high[i],
            score=score[i],
            detail={
                "metric": meta[sid][0],
                "labels": meta[sid][1],
                "kind": KIND_NAMES.get(int(kinds[i]), "point"),
            },
        )
        for i, sid in enumerate(sids)
        if kind[i] == "firing"
    )
    updates = {
        event: tuple(
            AlertUpdate(fps[i], at[i], value[i], score[i])
            for i in range(len(kind))
            if kind[i] == event
        )
        for event in ("escalated", "resolved")
    }
    return TransitionRound(opened, updates["escalated"], updates["resolved"])


def _refreshes(rule: AlertRule, scores: pd.DataFrame, flags: np.ndarray) -> tuple[AlertUpdate, ...]:
    """The latest values (at each series' last firing score) of the alerts still firing."""
    firing_rows = np.flatnonzero(flags == 1)
    if not len(firing_rows):
        return ()
    latest = scores.iloc[firing_rows].groupby("series_id", sort=False).tail(1)
    at = latest["ts_us"].astype("int64").tolist()
    value, score = _floats(latest, "value"), _floats(latest, "score")
    expected, low, high = (_floats(latest, c) for c in ("expected", "lower", "upper"))
    return tuple(
        AlertUpdate(
            fingerprint=f"{rule.name}:{sid}",
            at_us=at[i],
            value=value[i],
            score=score[i],
            expected=expected[i],
            expected_low=low[i],
            expected_high=high[i],
        )
        for i, sid in enumerate(latest["series_id"].tolist())
    )


def _tagged(rule: AlertRule, events: pd.DataFrame) -> pd.DataFrame:
    """Transitions with their rule and fingerprint columns (for the summary and messages)."""
    fps = [f"{rule.name}:{s}" for s in events["series_id"].tolist()]
    return events.assign(rule=rule.name, fingerprint=fps)


def _alert_spans(store: Store, rule: AlertRule, scores: pd.DataFrame, now_us: int) -> pd.DataFrame:
    """series_id, start_us, end_us of the alerts this rule raised on the scores' series
    (an open alert's end is now)."""
    ids = np.unique(scores["series_id"].to_numpy(np.int64))
    stored = store.alerts.for_fingerprints([f"{rule.name}:{i}" for i in ids.tolist()])
    if not len(stored):
        return pd.DataFrame(
            {c: pd.Series(dtype="int64") for c in ("series_id", "start_us", "end_us")}
        )
    end = pd.to_numeric(stored["resolved_at"], errors="coerce").fillna(now_us)
    return pd.DataFrame(
        {
            "series_id": stored["series_id"].astype("int64"),
            "start_us": pd.to_numeric(stored["started_at"]).astype("int64"),
            "end_us": end.astype("int64"),
        }
    )


def _attach_alert_ids(store: Store, transitions: pd.DataFrame) -> pd.DataFrame:
    """Each transition with the id of the alert it belongs to (matched on start time)."""
    stored = store.alerts.for_fingerprints(transitions["fingerprint"].tolist())
    by_start = {
        (fp, int(start)): int(aid)
        for fp, start, aid in zip(
            stored["fingerprint"], stored["started_at"], stored["alert_id"], strict=True
        )
    }
    newest = stored.groupby("fingerprint")["alert_id"].max().to_dict()
    ids = [
        by_start.get((fp, int(since)), newest.get(fp, -1))
        for fp, since in zip(transitions["fingerprint"], transitions["since_us"], strict=True)
    ]
    return transitions.assign(alert_id=np.array(ids, dtype=np.int64))


def _emit(transitions: pd.DataFrame, alerts: dict[int, dict[str, Any]], link: str | None) -> int:
    """One Prefect event per transition; never fails the run (the alert is stored already)."""
    from prefect.events import emit_event
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        # No API to send to: emitting would start a throwaway local server for nothing.
        return 0
    sent = 0
    for row in records(transitions):
        alert = alerts.get(int(row["alert_id"]), {})
        detail = alert.get("detail") or {}
        try:
            emitted = emit_event(
                event=EVENT_NAMES[str(row["event"])],
                resource={
                    "prefect.resource.id": f"metricmill.alert.{row['alert_id']}",
                    "prefect.resource.name": str(row["fingerprint"]),
                    "metricmill.rule": str(row["rule"]),
                    "metricmill.severity": str(row["severity"]),
                    "metricmill.metric": str(detail.get("metric", "")),
                },
                related=[
                    {
                        "prefect.resource.id": f"metricmill.series.{row['series_id']}",
                        "prefect.resource.role": "series",
                    }
                ],
                payload={
                    "alert_id": int(row["alert_id"]),
                    "series_id": int(row["series_id"]),
                    "labels": detail.get("labels", {}),
                    "value": None if pd.isna(row["value"]) else float(row["value"]),
                    "expected": None if pd.isna(row["expected"]) else float(row["expected"]),
                    "lower": None if pd.isna(row["lower"]) else float(row["lower"]),
                    "upper": None if pd.isna(row["upper"]) else float(row["upper"]),
                    "score": None if pd.isna(row["score"]) else float(row["score"]),
                    "at": iso(int(row["ts_us"])),
                    "since": iso(int(row["since_us"])),
                    "silenced": alert.get("silence_id") is not None,
                    "flow_run": link,
                },
            )
        except Exception as exc:
            _logger().warning(
                "could not emit %s for alert %s: %s", row["event"], row["alert_id"], exc
            )
            continue
        sent += emitted is not None
    return sent


def _publish_open(store: Store) -> None:
    """The `alerts-open` table artifact, when running inside a flow or task run."""
    try:
        from prefect.artifacts import create_table_artifact
        from prefect.context import get_run_context

        get_run_context()
    except Exception:
        return
    frame = store.alerts.find(status="open", limit=500)
    table = [
        {
            "alert": int(r["alert_id"]),
            "rule": r["rule"],
            "series": describe(r["detail"].get("metric", "?"), r["detail"].get("labels", {})),
            "severity": r["severity"],
            "status": r["status"],
            "since": iso(int(r["started_at"])),
            "value": fmt(r["value"]),
            "expected": f"{fmt(r['expected_low'])} .. {fmt(r['expected_high'])}",
            "score": fmt(r["score"]),
            "silenced": r["silence_id"] is not None and not pd.isna(r["silence_id"]),
        }
        for r in records(frame)
    ]
    create_table_artifact(
        table=table or [{"alert": "none open"}],
        key="alerts-open",
        description=f"{len(table)} open alert(s)",
    )


def process_scores(
    settings: Settings,
    scores: pd.DataFrame,
    *,
    series: pd.DataFrame | None = None,
    flow_run_url: str | None = None,
    now: datetime | None = None,
) -> AlertSummary:
    """Apply every alert rule to `scores` (with `series`: what the rules need per series,
    tasks.alert_engine.SERIES_COLUMNS); persist transitions, then notify and emit events."""
    channels = load_channels(settings)  # a missing block fails here, before any change
    now_us = round((now or datetime.now(UTC)).timestamp() * 1_000_000)
    link = flow_run_url or flow_run_link()
    with Store.open(settings=settings) as store:
        rules = load_rules(settings, store)
        summary = _evaluate_rules(store, rules, scores, now_us, series)
        _notify(store, settings, summary, rules, channels, now_us, link)
        if len(summary.transitions):
            stored = store.alerts.for_fingerprints(summary.transitions["fingerprint"].tolist())
            by_id = {int(r["alert_id"]): r for r in records(stored)}
            summary.events_emitted = _emit(summary.transitions, by_id, link)
        summary.open_alerts = store.alerts.count_open()
        _publish_open(store)
    return summary


def _evaluate_rules(
    store: Store,
    rules: Sequence[AlertRule],
    scores: pd.DataFrame,
    now_us: int,
    series: pd.DataFrame | None = None,
) -> AlertSummary:
    """Evaluate the rules on the scores and commit every transition and the carried state in
    one transaction (`store.alerts.apply_rules`); the summary's transitions and counts."""
    summary = AlertSummary()
    meta = store.series_labels(np.unique(scores["series_id"].to_numpy(dtype=np.int64)).tolist())
    summary.series = len(meta)
    parts: list[pd.DataFrame] = []

    def judge(rule: AlertRule) -> RuleOutcome | None:
        """One rule on its series' scores (late samples first), from its carried state."""
        matched = _matching_series(rule, meta)
        if not len(matched):
            return None
        sub = scores[scores["series_id"].isin(matched)]
        state = store.alerts.load_state(rule.name, matched.tolist())
        result = evaluate(rule, sub, state, series)
        rounds: tuple[TransitionRound, ...] = ()
        if not result.fresh.all():  # samples that landed behind the watermark
            spans = _alert_spans(store, rule, sub, now_us)
            late = late_events(rule, sub, result.fresh, state, spans, series)
            if len(late):
                rounds = _rounds(rule, late, meta)
                parts.append(_tagged(rule, late))
        if len(result.events):
            parts.append(_tagged(rule, result.events))
        return RuleOutcome(
            rule=rule.name,
            rounds=rounds + _rounds(rule, result.events, meta),
            refreshed=_refreshes(rule, sub, result.flags),
            state=result.state,
        )

    store.alerts.apply_rules(rules, judge)
    transitions = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    if len(transitions):
        transitions = _attach_alert_ids(store, transitions)
    summary.transitions = transitions
    counts = Counter(transitions["event"]) if len(transitions) else Counter()
    summary.fired, summary.escalated = counts["firing"], counts["escalated"]
    summary.resolved = counts["resolved"]
    return summary


def _notify(
    store: Store,
    settings: Settings,
    summary: AlertSummary,
    rules: Sequence[AlertRule],
    channels: Sequence[Channel],
    now_us: int,
    link: str | None,
) -> None:
    """Send what is due (transitions, repeats), record every attempt and every message a
    silence held back, and log the deliveries that failed."""
    messages, silenced = notifications_due(
        store, summary.transitions, rules, channels, now_us, link
    )
    summary.silenced = len({alert_id for alert_id, _ in silenced})
    summary.repeats = sum(1 for (_, event), _, _ in messages if event == "repeat")
    deliveries = deliver(channels, messages, settings)
    sent = [
        NotificationRecord(d.key[0], d.channel, d.key[1], d.attempts, d.outcome, d.error, now_us)
        for d in deliveries
    ]
    held = [
        NotificationRecord(alert_id, channel.ref, event, 0, "silenced", None, now_us)
        for alert_id, event in silenced
        for channel in channels
    ]
    store.alerts.record_notifications(sent + held)
    summary.notifications = Counter(r.outcome for r in sent + held)
    for d in deliveries:
        if d.outcome != "sent":
            _logger().warning(
                "notification %s of alert %s on %s %s after %d attempt(s): %s",
                d.key[1],
                d.key[0],
                d.channel,
                d.outcome,
                d.attempts,
                d.error,
            )
