"""What an alert run tells people: the message text, which messages silences hold back, and
which open alerts are due a repeat.

Called by `tasks.alerting.process_scores` after the transitions are committed; reads and the
silence marks go through `store.alerts`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, cast

import numpy as np
import pandas as pd

from metricmill.selectors import parse_selector
from storage.store import Store
from tasks.alert_engine import AlertRule
from tasks.notify import Channel, Message

# (alert id, event), the message, the channels it goes to (None: all)
Outgoing = tuple[tuple[int, str], Message, set[str] | None]


def records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """The frame's rows as dicts."""
    return cast(list[dict[str, Any]], frame.to_dict("records"))


def describe(metric: str, labels: dict[str, str]) -> str:
    """metric{k="v", ...} with the labels sorted."""
    inner = ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return f"{metric}{{{inner}}}"


def fmt(value: Any) -> str:
    """A number for people (n/a for a missing one)."""
    return (
        "n/a" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:.6g}"
    )


def iso(ts_us: int) -> str:
    """µs since the epoch as an ISO UTC time to the second."""
    return datetime.fromtimestamp(ts_us / 1e6, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def alert_message(alert: dict[str, Any], event: str, link: str | None) -> Message:
    """The text of one alert notification."""
    detail = alert.get("detail") or {}
    series = describe(detail.get("metric", "?"), detail.get("labels", {}))
    headline = {"firing": "FIRING", "escalated": "ESCALATED", "resolved": "RESOLVED"}
    state = headline.get(event, "STILL FIRING")
    lines = [
        f"series: {series}",
        f"rule: {alert['rule']} ({alert['severity']})",
        f"value: {fmt(alert['value'])}  expected: {fmt(alert['expected'])} "
        f"[{fmt(alert['expected_low'])} .. {fmt(alert['expected_high'])}]",
        f"score: {fmt(alert['score'])}",
        f"since: {iso(int(alert['started_at']))}",
    ]
    if detail.get("kind") in ("level shift", "outage"):
        lines.insert(1, f"what: {detail['kind']}")
    if event == "resolved" and alert.get("resolved_at") is not None:
        lines.append(f"resolved: {iso(int(alert['resolved_at']))}")
    lines.append(f"alert: #{alert['alert_id']}")
    if link:
        lines.append(f"flow run: {link}")
    what = f" ({detail['kind']})" if detail.get("kind") in ("level shift", "outage") else ""
    return Message(
        subject=f"[metricmill] {state} {alert['severity']}: {series}{what}",
        body="\n".join(lines),
    )


def silencer(store: Store, now_us: int) -> Callable[[dict[str, Any]], int | None]:
    """A function from an alert's detail to the id of the active silence matching its series
    (None when none does); matchers go through RE2 (metricmill.selectors)."""
    active = [(s, parse_selector(s.matcher)) for s in store.alerts.silences(active_at_us=now_us)]

    def silence_for(detail: dict[str, Any]) -> int | None:
        metric, labels = detail.get("metric"), detail.get("labels", {})
        for silence, selector in active:
            if (selector.metric is None or selector.metric == metric) and selector.matches(labels):
                return silence.silence_id
        return None

    return silence_for


def notifications_due(
    store: Store,
    transitions: pd.DataFrame,
    rules: Sequence[AlertRule],
    channels: Sequence[Channel],
    now_us: int,
    link: str | None,
) -> tuple[list[Outgoing], list[tuple[int, str]]]:
    """(messages to send, (alert_id, event) pairs held back by a silence): one message per
    transition, then the repeats due."""
    silence_for = silencer(store, now_us)
    messages, silenced, announced = _transition_messages(store, transitions, silence_for, link)
    if channels:
        messages += _repeats_due(store, rules, channels, announced, silence_for, now_us, link)
    return messages, silenced


def _transition_messages(
    store: Store,
    transitions: pd.DataFrame,
    silence_for: Callable[[dict[str, Any]], int | None],
    link: str | None,
) -> tuple[list[Outgoing], list[tuple[int, str]], set[int]]:
    """A message per transition not held back by a silence (an escalation of an acknowledged
    alert is not sent); records which silence holds back each new alert. Returns the
    messages, the held-back (alert_id, event) pairs and the alerts announced."""
    messages: list[Outgoing] = []
    silenced: list[tuple[int, str]] = []
    announced: set[int] = set()
    if not len(transitions):
        return messages, silenced, announced
    frame = store.alerts.for_fingerprints(transitions["fingerprint"].tolist())
    stored = {int(r["alert_id"]): r for r in records(frame)}
    newly_silenced: dict[int, int] = {}
    for row in records(transitions):
        alert = stored.get(int(row["alert_id"]))
        if alert is None:
            continue
        # A silence holds back messages while it is active; the alert records which one.
        silence_id = silence_for(alert["detail"])
        announced.add(int(row["alert_id"]))
        if silence_id is not None:
            if row["event"] == "firing":
                newly_silenced[int(row["alert_id"])] = silence_id
            silenced.append((int(row["alert_id"]), str(row["event"])))
            continue
        if row["event"] == "escalated" and alert["status"] == "acknowledged":
            continue
        snapshot = dict(alert, severity=row["severity"], value=row["value"], score=row["score"])
        if row["event"] == "resolved":
            snapshot["resolved_at"] = int(row["ts_us"])
        key = (int(row["alert_id"]), str(row["event"]))
        messages.append((key, alert_message(snapshot, row["event"], link), None))
    store.alerts.mark_silenced(newly_silenced)
    return messages, silenced, announced


def _repeats_due(
    store: Store,
    rules: Sequence[AlertRule],
    channels: Sequence[Channel],
    announced: set[int],
    silence_for: Callable[[dict[str, Any]], int | None],
    now_us: int,
    link: str | None,
) -> list[Outgoing]:
    """Repeats: open, unacknowledged alerts no active silence matches, whose last delivery to
    a channel is older than the rule's repeat interval. A channel that never got the alert
    (its firing message failed in an earlier run, or a silence has ended) gets it now, so
    neither a flaky channel nor a silence can lose an alert that is still firing."""
    intervals = {r.name: round(r.repeat_interval_seconds * 1_000_000) for r in rules}
    firing = store.alerts.find(status="firing", limit=1_000_000)
    firing = firing[firing["rule"].isin(list(intervals)) & ~firing["alert_id"].isin(announced)]
    if firing.empty:
        return []
    last = store.alerts.last_delivered(firing["alert_id"].tolist())
    messages: list[Outgoing] = []
    for alert in records(firing):
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
    return messages
