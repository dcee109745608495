"""SQL for alerts, the rule engine's carried state, rules, silences and notifications.

Every function takes the backend first; timestamps cross this boundary as integer µs.
Writes are bulk (executemany); the caller owns the transaction around a group of them. Code
above storage/ calls these through `store.alerts` (storage/alert_facade.py), which takes typed
records and holds the transactions.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import pandas as pd

from storage.backend import Backend

OPEN = ("firing", "acknowledged")
RULE_FIELDS = (
    "name",
    "metric_pattern",
    "threshold",
    "critical_threshold",
    "for_seconds",
    "keep_firing_for_seconds",
    "min_abs_deviation",
    "min_baseline_level",
    "repeat_interval_seconds",
    "direction",
    "alert_budget_per_week",
)
ALERT_COLUMNS = (
    "alert_id",
    "fingerprint",
    "rule",
    "series_id",
    "severity",
    "status",
    "started_at",
    "updated_at",
    "acknowledged_at",
    "resolved_at",
    "value",
    "expected",
    "expected_low",
    "expected_high",
    "score",
    "incident",
    "silence_id",
    "detail",
)


@dataclass(frozen=True)
class Silence:
    silence_id: int
    matcher: str
    starts_us: int
    ends_us: int
    comment: str | None


def _out(backend: Backend, col: str) -> str:
    return backend.ts_out.format(col=col)


def _in(backend: Backend, param: str = "%s") -> str:
    return backend.ts_in.replace("%s", param)


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)


# -- carried engine state -----------------------------------------------------------------
def load_state(backend: Backend, *, rule: str, series_ids: Sequence[int]) -> pd.DataFrame:
    """The engine state of `rule` for these series (series without a row are absent)."""
    rows = backend.execute(
        f"SELECT series_id, phase, {_out(backend, 'since')}, {_out(backend, 'last_high')}, "  # noqa: S608
        f"severity, {_out(backend, 'last_ts')} FROM alert_state "
        f"WHERE rule = %s AND series_id {backend.ids_in} ORDER BY series_id",
        (rule, backend.id_list([int(i) for i in series_ids])),
    )
    frame = pd.DataFrame(
        rows,
        columns=["series_id", "phase", "since_us", "last_high_us", "severity", "last_ts_us"],
    )
    return frame.astype(
        {
            "series_id": "int64",
            "phase": object,
            "since_us": "Int64",
            "last_high_us": "Int64",
            "severity": object,
            "last_ts_us": "int64",
        }
    )


def save_state(backend: Backend, *, rule: str, state: pd.DataFrame) -> None:
    """Upsert the engine state of `rule` for the series in `state`."""
    if state.empty:
        return
    rows = [
        (rule, int(sid), phase, _opt_int(since), _opt_int(high), sev, int(last))
        for sid, phase, since, high, sev, last in zip(
            state["series_id"].tolist(),
            state["phase"].tolist(),
            state["since_us"].astype(object).where(state["since_us"].notna(), None).tolist(),
            state["last_high_us"]
            .astype(object)
            .where(state["last_high_us"].notna(), None)
            .tolist(),
            state["severity"].tolist(),
            state["last_ts_us"].tolist(),
            strict=True,
        )
    ]
    backend.executemany(
        "INSERT INTO alert_state (rule, series_id, phase, since, last_high, severity, last_ts) "  # noqa: S608
        f"VALUES (%s, %s, %s, {_in(backend)}, {_in(backend)}, %s, {_in(backend)}) "
        "ON CONFLICT (rule, series_id) DO UPDATE SET phase = excluded.phase, "
        "since = excluded.since, last_high = excluded.last_high, "
        "severity = excluded.severity, last_ts = excluded.last_ts",
        rows,
    )


# -- rules --------------------------------------------------------------------------------
def list_rules(backend: Backend) -> list[dict[str, Any]]:
    rows = backend.execute(
        f"SELECT {', '.join(RULE_FIELDS)} FROM alert_rules ORDER BY name"  # noqa: S608
    )
    return [dict(zip(RULE_FIELDS, row, strict=True)) for row in rows]


def upsert_rule(backend: Backend, rule: dict[str, Any]) -> None:
    values = [rule.get(f) for f in RULE_FIELDS]
    values[RULE_FIELDS.index("direction")] = rule.get("direction") or "both"
    updates = ", ".join(f"{f} = excluded.{f}" for f in RULE_FIELDS[1:])
    with backend.transaction():
        backend.execute(
            f"INSERT INTO alert_rules ({', '.join(RULE_FIELDS)}) "  # noqa: S608
            f"VALUES ({', '.join(['%s'] * len(RULE_FIELDS))}) "
            f"ON CONFLICT (name) DO UPDATE SET {updates}",
            values,
        )


def delete_rule(backend: Backend, name: str) -> bool:
    with backend.transaction():
        found = backend.execute("SELECT 1 FROM alert_rules WHERE name = %s", (name,))
        backend.execute("DELETE FROM alert_rules WHERE name = %s", (name,))
    return bool(found)


# -- alert transitions ---------------------------------------------------------------------
def open_alerts(backend: Backend, rows: Sequence[Sequence[Any]]) -> None:
    """Insert firing alerts: (fingerprint, rule, series_id, severity, started µs, at µs, value,
    expected, low, high, score, detail json, silence_id). A fingerprint that already has an
    open alert (state lost or reset) updates that alert instead: one open alert per fingerprint.
    """
    if not rows:
        return
    ts = _in(backend)
    backend.executemany(
        "INSERT INTO alerts (fingerprint, rule, series_id, severity, status, started_at, "  # noqa: S608
        "updated_at, value, expected, expected_low, expected_high, score, detail, silence_id) "
        f"VALUES (%s, %s, %s, %s, 'firing', {ts}, {ts}, %s, %s, %s, %s, %s, %s, %s) "
        "ON CONFLICT (fingerprint) WHERE status <> 'resolved' DO UPDATE SET "
        "severity = excluded.severity, updated_at = excluded.updated_at, "
        "value = excluded.value, expected = excluded.expected, "
        "expected_low = excluded.expected_low, expected_high = excluded.expected_high, "
        "score = excluded.score",
        rows,
    )


def escalate_alerts(backend: Backend, rows: Sequence[Sequence[Any]]) -> None:
    """(at µs, value, score, fingerprint): the open alert becomes critical."""
    backend.executemany(
        f"UPDATE alerts SET severity = 'critical', updated_at = {_in(backend)}, value = %s, "  # noqa: S608
        "score = %s WHERE fingerprint = %s AND status <> 'resolved'",
        rows,
    )


def resolve_alerts(backend: Backend, rows: Sequence[Sequence[Any]]) -> None:
    """(at µs, at µs, value, score, fingerprint): the open alert is resolved."""
    ts = _in(backend)
    backend.executemany(
        f"UPDATE alerts SET status = 'resolved', resolved_at = {ts}, updated_at = {ts}, "  # noqa: S608
        "value = %s, score = %s WHERE fingerprint = %s AND status <> 'resolved'",
        rows,
    )


def refresh_alerts(backend: Backend, rows: Sequence[Sequence[Any]]) -> None:
    """(at µs, value, expected, low, high, score, fingerprint, at µs): latest firing values."""
    ts = _in(backend)
    backend.executemany(
        f"UPDATE alerts SET updated_at = {ts}, value = %s, expected = %s, "  # noqa: S608
        "expected_low = %s, expected_high = %s, score = %s "
        f"WHERE fingerprint = %s AND status <> 'resolved' AND updated_at <= {ts}",
        rows,
    )


def _alert_select(backend: Backend) -> str:
    cols = [
        "alert_id",
        "fingerprint",
        "rule",
        "series_id",
        "severity",
        "status",
        _out(backend, "started_at"),
        _out(backend, "updated_at"),
        _out(backend, "acknowledged_at"),
        _out(backend, "resolved_at"),
        "value",
        "expected",
        "expected_low",
        "expected_high",
        "score",
        "incident",
        "silence_id",
        "detail",
    ]
    return f"SELECT {', '.join(cols)} FROM alerts"  # noqa: S608 - constant columns


def _alert_frame(backend: Backend, rows: list[tuple[Any, ...]]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=list(ALERT_COLUMNS))
    frame["incident"] = frame["incident"].astype(bool)
    frame["detail"] = pd.Series(
        [d if isinstance(d, dict) else json.loads(d) if d else {} for d in frame["detail"]],
        index=frame.index,
        dtype=object,
    )
    return frame


def alerts_for_fingerprints(backend: Backend, fingerprints: Sequence[str]) -> pd.DataFrame:
    """Every alert (open or not) of these fingerprints, oldest first."""
    found: list[tuple[Any, ...]] = []
    unique = sorted(set(fingerprints))
    for offset in range(0, len(unique), 500):
        chunk = unique[offset : offset + 500]
        marks = ", ".join(["%s"] * len(chunk))
        found += backend.execute(
            f"{_alert_select(backend)} WHERE fingerprint IN ({marks}) ORDER BY alert_id",
            chunk,
        )
    return _alert_frame(backend, found)


def list_alerts(
    backend: Backend, *, status: str | None = None, rule: str | None = None, limit: int = 100
) -> pd.DataFrame:
    """Newest alerts first; status 'open' means firing or acknowledged."""
    where, params = ["1 = 1"], []
    if status == "open":
        where.append("status <> 'resolved'")
    elif status is not None:
        where.append("status = %s")
        params.append(status)
    if rule is not None:
        where.append("rule = %s")
        params.append(rule)
    rows = backend.execute(
        f"{_alert_select(backend)} WHERE {' AND '.join(where)} ORDER BY alert_id DESC LIMIT %s",
        [*params, limit],
    )
    return _alert_frame(backend, rows)


def count_open(backend: Backend) -> int:
    return int(backend.execute("SELECT count(*) FROM alerts WHERE status <> 'resolved'")[0][0])


def get_alert(backend: Backend, alert_id: int) -> dict[str, Any] | None:
    rows = backend.execute(f"{_alert_select(backend)} WHERE alert_id = %s", (alert_id,))
    if not rows:
        return None
    return cast(dict[str, Any], _alert_frame(backend, rows).iloc[0].to_dict())


def set_status(
    backend: Backend, alert_id: int, *, status: str, now_us: int, incident: bool
) -> None:
    """Acknowledge or resolve one alert by hand (optionally marking it a confirmed incident)."""
    ts = _in(backend)
    stamp = "acknowledged_at" if status == "acknowledged" else "resolved_at"
    with backend.transaction():
        backend.execute(
            f"UPDATE alerts SET status = %s, {stamp} = {ts}, "  # noqa: S608
            "incident = CASE WHEN %s THEN %s ELSE incident END WHERE alert_id = %s",
            (status, now_us, incident, True, alert_id),
        )


def incident_windows(backend: Backend) -> pd.DataFrame:
    """(series_id, start_us, end_us) of alerts confirmed as incidents, half-open: from the
    first anomalous sample through the alert's last data update (resolved by hand or not, that
    is data time, unlike resolved_at, which is wall-clock time for a manual resolve)."""
    rows = backend.execute(
        f"SELECT series_id, {_out(backend, 'started_at')}, "  # noqa: S608
        f"{_out(backend, 'updated_at')} + 1 FROM alerts "
        "WHERE incident = %s AND series_id IS NOT NULL ORDER BY series_id, started_at",
        (True,),
    )
    frame = pd.DataFrame(rows, columns=["series_id", "start_us", "end_us"])
    return frame.astype("int64")


# -- silences -----------------------------------------------------------------------------
def add_silence(
    backend: Backend, *, matcher: str, starts_us: int, ends_us: int, comment: str | None
) -> int:
    ts = _in(backend)
    with backend.transaction():
        backend.execute(
            "INSERT INTO silences (matcher, starts_at, ends_at, comment) "  # noqa: S608
            f"VALUES (%s, {ts}, {ts}, %s)",
            (matcher, starts_us, ends_us, comment),
        )
        return int(backend.execute("SELECT max(id) FROM silences")[0][0])


def silences(backend: Backend, *, active_at_us: int | None = None) -> list[Silence]:
    """All silences, or only those active at a moment."""
    where, params = "", []
    if active_at_us is not None:
        ts = _in(backend)
        where = f" WHERE starts_at <= {ts} AND ends_at > {ts}"
        params = [active_at_us, active_at_us]
    rows = backend.execute(
        f"SELECT id, matcher, {_out(backend, 'starts_at')}, {_out(backend, 'ends_at')}, "  # noqa: S608
        f"comment FROM silences{where} ORDER BY id",
        params,
    )
    return [Silence(int(r[0]), r[1], int(r[2]), int(r[3]), r[4]) for r in rows]


def mark_silenced(backend: Backend, rows: Sequence[tuple[int, int]]) -> None:
    """(silence_id, alert_id) pairs."""
    backend.executemany("UPDATE alerts SET silence_id = %s WHERE alert_id = %s", rows)


# -- notifications ------------------------------------------------------------------------
def record_notifications(backend: Backend, rows: Sequence[Sequence[Any]]) -> None:
    """(alert_id, channel, event, attempts, outcome, error, sent µs) per delivery attempt."""
    if not rows:
        return
    with backend.transaction():
        backend.executemany(
            "INSERT INTO notifications (alert_id, channel, event, attempts, outcome, error, "  # noqa: S608
            f"sent_at) VALUES (%s, %s, %s, %s, %s, %s, {_in(backend)})",
            rows,
        )


def last_delivered(backend: Backend, alert_ids: Sequence[int]) -> dict[tuple[int, str], int]:
    """(alert_id, channel) -> when a firing or repeat message last reached it (µs); a channel
    that rejected it (4xx) counts as reached, so it is not re-sent before the repeat interval."""
    if not alert_ids:
        return {}
    rows = backend.execute(
        f"SELECT alert_id, channel, {_out(backend, 'max(sent_at)')} FROM notifications "  # noqa: S608
        f"WHERE alert_id {backend.ids_in} AND outcome IN ('sent', 'rejected') "
        "AND event IN ('firing', 'repeat') GROUP BY alert_id, channel",
        (backend.id_list([int(i) for i in alert_ids]),),
    )
    return {(int(a), str(c)): int(t) for a, c, t in rows}


def notifications_for(backend: Backend, alert_id: int) -> pd.DataFrame:
    rows = backend.execute(
        "SELECT channel, event, attempts, outcome, error, "  # noqa: S608
        f"{_out(backend, 'sent_at')} FROM notifications WHERE alert_id = %s ORDER BY id",
        (alert_id,),
    )
    return pd.DataFrame(
        rows, columns=["channel", "event", "attempts", "outcome", "error", "sent_at"]
    )
