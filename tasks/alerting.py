"""Alert rules applied to anomaly scores: the pure engine, and the persistent lifecycle.

`process_scores` is what the detect flow calls with each run's scores. Order matters: rules
are evaluated and every transition (and the carried state) is committed in one transaction
first; only then are silences applied, notifications sent and recorded, and Prefect events
emitted. A failure after the commit can lose a message, never an alert.
"""

from __future__ import annotations

import fnmatch
import json
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

import numpy as np
import pandas as pd

from metricmill.selectors import parse_selector
from metricmill.settings import Settings
from storage import alerts as db
from storage.backend import Backend
from storage.store import Store
from tasks.alert_engine import AlertRule, alert_flags, alert_timeline, evaluate, late_events
from tasks.calibration import KIND_NAMES
from tasks.notify import Channel, Message, deliver, load_channels

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


def _records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    return cast(list[dict[str, Any]], frame.to_dict("records"))


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


def load_rules(settings: Settings, backend: Backend) -> list[AlertRule]:
    """The settings' default rule (unless disabled) and the CLI-managed rules; a CLI rule
    with the default's name replaces it."""
    rules: dict[str, AlertRule] = {}
    if settings.alert_rule_enabled:
        rules["anomaly"] = default_rule(settings)
    for stored in db.list_rules(backend):
        rules[stored["name"]] = AlertRule(**stored)
    return list(rules.values())


def incident_windows(store: Store) -> pd.DataFrame:
    """(series_id, start_us, end_us) of alerts confirmed as incidents (left out of training)."""
    return db.incident_windows(store.backend)


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


def _describe(metric: str, labels: dict[str, str]) -> str:
    inner = ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return f"{metric}{{{inner}}}"


def _fmt(value: Any) -> str:
    return (
        "n/a" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:.6g}"
    )


def _iso(ts_us: int) -> str:
    return datetime.fromtimestamp(ts_us / 1e6, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def alert_message(alert: dict[str, Any], event: str, link: str | None) -> Message:
    """The text of one alert notification."""
    detail = alert.get("detail") or {}
    series = _describe(detail.get("metric", "?"), detail.get("labels", {}))
    headline = {"firing": "FIRING", "escalated": "ESCALATED", "resolved": "RESOLVED"}
    state = headline.get(event, "STILL FIRING")
    lines = [
        f"series: {series}",
        f"rule: {alert['rule']} ({alert['severity']})",
        f"value: {_fmt(alert['value'])}  expected: {_fmt(alert['expected'])} "
        f"[{_fmt(alert['expected_low'])} .. {_fmt(alert['expected_high'])}]",
        f"score: {_fmt(alert['score'])}",
        f"since: {_iso(int(alert['started_at']))}",
    ]
    if detail.get("kind") in ("level shift", "outage"):
        lines.insert(1, f"what: {detail['kind']}")
    if event == "resolved" and alert.get("resolved_at") is not None:
        lines.append(f"resolved: {_iso(int(alert['resolved_at']))}")
    lines.append(f"alert: #{alert['alert_id']}")
    if link:
        lines.append(f"flow run: {link}")
    what = f" ({detail['kind']})" if detail.get("kind") in ("level shift", "outage") else ""
    return Message(
        subject=f"[metricmill] {state} {alert['severity']}: {series}{what}",
        body="\n".join(lines),
    )


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


def _persist(
    backend: Backend,
    rule: AlertRule,
    events: pd.DataFrame,
    scores: pd.DataFrame,
    flags: np.ndarray,
    meta: dict[int, tuple[str, dict[str, str]]],
) -> None:
    """Write one rule's transitions, in per-series order, and refresh firing alerts."""
    if len(events):
        fingerprints = [f"{rule.name}:{sid}" for sid in events["series_id"].tolist()]
        events = events.assign(fingerprint=fingerprints)
        rounds = events.groupby("series_id", sort=False).cumcount().to_numpy()
        for number in range(int(rounds.max()) + 1):
            part = events[rounds == number]
            value, score = _floats(part, "value"), _floats(part, "score")
            expected, low, high = (_floats(part, c) for c in ("expected", "lower", "upper"))
            at = part["ts_us"].astype("int64").tolist()
            kind = part["event"].tolist()
            kinds = part["kind"].tolist() if "kind" in part else [0] * len(part)
            fps = part["fingerprint"].tolist()
            opened = [
                (
                    fps[i],
                    rule.name,
                    int(sid),
                    part["severity"].iloc[i],
                    int(part["since_us"].iloc[i]),
                    at[i],
                    value[i],
                    expected[i],
                    low[i],
                    high[i],
                    score[i],
                    json.dumps(
                        {
                            "metric": meta[sid][0],
                            "labels": meta[sid][1],
                            "kind": KIND_NAMES.get(int(kinds[i]), "point"),
                        },
                        sort_keys=True,
                    ),
                    None,
                )
                for i, sid in enumerate(part["series_id"].tolist())
                if kind[i] == "firing"
            ]
            db.open_alerts(backend, opened)
            db.escalate_alerts(
                backend,
                [
                    (at[i], value[i], score[i], fps[i])
                    for i in range(len(kind))
                    if kind[i] == "escalated"
                ],
            )
            db.resolve_alerts(
                backend,
                [
                    (at[i], at[i], value[i], score[i], fps[i])
                    for i in range(len(kind))
                    if kind[i] == "resolved"
                ],
            )
    firing_rows = np.flatnonzero(flags == 1)
    if len(firing_rows):
        latest = scores.iloc[firing_rows].groupby("series_id", sort=False).tail(1)
        at = latest["ts_us"].astype("int64").tolist()
        value, score = _floats(latest, "value"), _floats(latest, "score")
        expected, low, high = (_floats(latest, c) for c in ("expected", "lower", "upper"))
        db.refresh_alerts(
            backend,
            [
                (
                    at[i],
                    value[i],
                    expected[i],
                    low[i],
                    high[i],
                    score[i],
                    f"{rule.name}:{sid}",
                    at[i],
                )
                for i, sid in enumerate(latest["series_id"].tolist())
            ],
        )


def _alert_spans(
    backend: Backend, rule: AlertRule, scores: pd.DataFrame, now_us: int
) -> pd.DataFrame:
    """series_id, start_us, end_us of the alerts this rule raised on the scores' series
    (an open alert's end is now)."""
    ids = np.unique(scores["series_id"].to_numpy(np.int64))
    stored = db.alerts_for_fingerprints(backend, [f"{rule.name}:{i}" for i in ids.tolist()])
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


def _attach_alert_ids(backend: Backend, transitions: pd.DataFrame) -> pd.DataFrame:
    """Each transition with the id of the alert it belongs to (matched on start time)."""
    stored = db.alerts_for_fingerprints(backend, transitions["fingerprint"].tolist())
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


def _silencer(backend: Backend, now_us: int) -> Any:
    active = [(s, parse_selector(s.matcher)) for s in db.silences(backend, active_at_us=now_us)]

    def silence_for(detail: dict[str, Any]) -> int | None:
        metric, labels = detail.get("metric"), detail.get("labels", {})
        for silence, selector in active:
            if (selector.metric is None or selector.metric == metric) and selector.matches(labels):
                return silence.silence_id
        return None

    return silence_for


def _emit(transitions: pd.DataFrame, alerts: dict[int, dict[str, Any]], link: str | None) -> int:
    """One Prefect event per transition; never fails the run (the alert is stored already)."""
    from prefect.events import emit_event
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        # No API to send to: emitting would start a throwaway local server for nothing.
        return 0
    sent = 0
    for row in _records(transitions):
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
                    "at": _iso(int(row["ts_us"])),
                    "since": _iso(int(row["since_us"])),
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


def _publish_open(backend: Backend) -> None:
    """The `alerts-open` table artifact, when running inside a flow or task run."""
    try:
        from prefect.artifacts import create_table_artifact
        from prefect.context import get_run_context

        get_run_context()
    except Exception:
        return
    frame = db.list_alerts(backend, status="open", limit=500)
    table = [
        {
            "alert": int(r["alert_id"]),
            "rule": r["rule"],
            "series": _describe(r["detail"].get("metric", "?"), r["detail"].get("labels", {})),
            "severity": r["severity"],
            "status": r["status"],
            "since": _iso(int(r["started_at"])),
            "value": _fmt(r["value"]),
            "expected": f"{_fmt(r['expected_low'])} .. {_fmt(r['expected_high'])}",
            "score": _fmt(r["score"]),
            "silenced": r["silence_id"] is not None and not pd.isna(r["silence_id"]),
        }
        for r in _records(frame)
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
    flow_run_url: str | None = None,
    now: datetime | None = None,
) -> AlertSummary:
    """Apply every alert rule to `scores`; persist transitions, then notify and emit events."""
    channels = load_channels(settings)  # a missing block fails here, before any change
    now_us = round((now or datetime.now(UTC)).timestamp() * 1_000_000)
    link = flow_run_url or flow_run_link()
    summary = AlertSummary()
    with Store.open(settings=settings) as store:
        backend = store.backend
        rules = load_rules(settings, backend)
        ids = np.unique(scores["series_id"].to_numpy(dtype=np.int64))
        meta = {
            int(r[0]): (str(r[1]), backend.parse_labels(r[2]))
            for r in (backend.series_info(ids.tolist()) if len(ids) else [])
        }
        summary.series = len(meta)
        parts = []
        with backend.transaction():
            for rule in rules:
                matched = _matching_series(rule, meta)
                if not len(matched):
                    continue
                sub = scores[scores["series_id"].isin(matched)]
                state = db.load_state(backend, rule=rule.name, series_ids=matched.tolist())
                result = evaluate(rule, sub, state)
                if not result.fresh.all():  # samples that landed behind the watermark
                    late = late_events(
                        rule, sub, result.fresh, state, _alert_spans(backend, rule, sub, now_us)
                    )
                    if len(late):
                        _persist(backend, rule, late, sub, np.zeros(0, np.int8), meta)
                        fps = [f"{rule.name}:{s}" for s in late["series_id"].tolist()]
                        parts.append(late.assign(rule=rule.name, fingerprint=fps))
                _persist(backend, rule, result.events, sub, result.flags, meta)
                db.save_state(backend, rule=rule.name, state=result.state)
                if len(result.events):
                    fps = [f"{rule.name}:{s}" for s in result.events["series_id"].tolist()]
                    parts.append(result.events.assign(rule=rule.name, fingerprint=fps))
        transitions = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
        if len(transitions):
            transitions = _attach_alert_ids(backend, transitions)
        summary.transitions = transitions
        counts = Counter(transitions["event"]) if len(transitions) else Counter()
        summary.fired, summary.escalated = counts["firing"], counts["escalated"]
        summary.resolved = counts["resolved"]

        messages, silenced = _notifications_due(backend, transitions, rules, channels, now_us, link)
        summary.silenced = len({alert_id for alert_id, _ in silenced})
        summary.repeats = sum(1 for (_, event), _, _ in messages if event == "repeat")
        deliveries = deliver(channels, messages, settings)
        records = [
            (d.key[0], d.channel, d.key[1], d.attempts, d.outcome, d.error, now_us)
            for d in deliveries
        ]
        records += [
            (alert_id, channel.ref, event, 0, "silenced", None, now_us)
            for alert_id, event in silenced
            for channel in channels
        ]
        db.record_notifications(backend, records)
        summary.notifications = Counter(r[4] for r in records)
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
        if len(transitions):
            stored = db.alerts_for_fingerprints(backend, transitions["fingerprint"].tolist())
            by_id = {int(r["alert_id"]): r for r in _records(stored)}
            summary.events_emitted = _emit(transitions, by_id, link)
        summary.open_alerts = db.count_open(backend)
        _publish_open(backend)
    return summary


def _notifications_due(
    backend: Backend,
    transitions: pd.DataFrame,
    rules: Sequence[AlertRule],
    channels: Sequence[Channel],
    now_us: int,
    link: str | None,
) -> tuple[list[tuple[tuple[int, str], Message, set[str] | None]], list[tuple[int, str]]]:
    """(messages to send, (alert_id, event) pairs held back by a silence)."""
    silence_for = _silencer(backend, now_us)
    messages: list[tuple[tuple[int, str], Message, set[str] | None]] = []
    silenced: list[tuple[int, str]] = []
    announced: set[int] = set()
    stored: dict[int, dict[str, Any]] = {}
    if len(transitions):
        frame = db.alerts_for_fingerprints(backend, transitions["fingerprint"].tolist())
        stored = {int(r["alert_id"]): r for r in _records(frame)}
        newly_silenced = []
        for row in _records(transitions):
            alert = stored.get(int(row["alert_id"]))
            if alert is None:
                continue
            # A silence holds back messages while it is active; the alert records which one.
            silence_id = silence_for(alert["detail"])
            announced.add(int(row["alert_id"]))
            if silence_id is not None:
                if row["event"] == "firing":
                    newly_silenced.append((silence_id, int(row["alert_id"])))
                silenced.append((int(row["alert_id"]), str(row["event"])))
                continue
            if row["event"] == "escalated" and alert["status"] == "acknowledged":
                continue
            snapshot = dict(alert, severity=row["severity"], value=row["value"], score=row["score"])
            if row["event"] == "resolved":
                snapshot["resolved_at"] = int(row["ts_us"])
            messages.append(
                (
                    (int(row["alert_id"]), str(row["event"])),
                    alert_message(snapshot, row["event"], link),
                    None,
                )
            )
        if newly_silenced:
            with backend.transaction():
                db.mark_silenced(backend, newly_silenced)
    if not channels:
        return messages, silenced
    # Repeats: open, unacknowledged alerts no active silence matches, whose last delivery to a
    # channel is older than the rule's repeat interval. A channel that never got the alert (its
    # firing message failed in an earlier run, or a silence has ended) gets it now, so neither
    # a flaky channel nor a silence can lose an alert that is still firing.
    intervals = {r.name: round(r.repeat_interval_seconds * 1_000_000) for r in rules}
    firing = db.list_alerts(backend, status="firing", limit=1_000_000)
    firing = firing[firing["rule"].isin(list(intervals)) & ~firing["alert_id"].isin(announced)]
    if firing.empty:
        return messages, silenced
    last = db.last_delivered(backend, firing["alert_id"].tolist())
    for alert in _records(firing):
        alert_id = int(alert["alert_id"])
        if silence_for(alert["detail"]) is not None:
            continue
        due = {
            c.ref
            for c in channels
            if now_us - last.get((alert_id, c.ref), -(2**62)) >= intervals[alert["rule"]]
        }
        if due:
            messages.append(((alert_id, "repeat"), alert_message(alert, "repeat", link), due))
    return messages, silenced
