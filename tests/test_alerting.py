"""Alert rules: the pure engine (for, keep-firing-for, tiers, chunking) and the persisted
lifecycle (one open alert per fingerprint, updates while firing, auto-resolve, incidents)."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pandas as pd
import pytest

from metricmill.settings import load_settings
from storage import alerts as db
from storage.store import Store
from tasks.alert_engine import evaluate, high_mask
from tasks.alerting import (
    AlertRule,
    alert_flags,
    alert_timeline,
    incident_windows,
    process_scores,
)
from tests.dbtargets import DbTarget
from tests.settings_env import isolate_settings

T0 = 1_700_000_000_000_000
MIN = 60_000_000


def scores_frame(
    series: dict[int, list[float]], *, step: int = MIN, **extra: float
) -> pd.DataFrame:
    """One row per minute and series; value = 10 * score so the deviation tracks the score."""
    rows = []
    for sid, values in series.items():
        for i, score in enumerate(values):
            rows.append(
                (sid, T0 + i * step, 10.0 * score, 0.0, -1.0, 1.0, score, score, score, 5.0)
            )
    frame = pd.DataFrame(
        rows,
        columns=[
            "series_id",
            "ts_us",
            "value",
            "expected",
            "lower",
            "upper",
            "stat_score",
            "model_score",
            "score",
            "baseline_level",
        ],
    )
    for name, value in extra.items():
        frame[name] = value
    return frame


def oracle(rule: AlertRule, scores: pd.DataFrame) -> tuple[list[tuple], np.ndarray]:
    """The state machine one sample at a time: what the vectorised engine must reproduce."""
    high = high_mask(rule, scores)
    for_us, keep_us = round(rule.for_seconds * 1e6), round(rule.keep_firing_for_seconds * 1e6)
    events, flags = [], np.zeros(len(scores), np.int8)
    state: dict[int, tuple[str, int, int, str | None]] = {}
    previous: dict[int, int] = {}
    rows = zip(scores["series_id"], scores["ts_us"], scores["score"], strict=True)
    for i, (sid, ts, score) in enumerate(rows):
        phase, since, last_high, sev = state.get(sid, ("normal", 0, 0, None))
        # a row stands for the interval since the series' previous row
        interval = ts - previous[sid] if sid in previous else 0
        previous[sid] = ts
        crit = bool(high[i]) and score >= rule.critical_threshold
        if phase == "firing":
            if high[i]:
                last_high = ts
                if crit and sev == "warning":
                    sev = "critical"
                    events.append((sid, ts, "escalated", sev, since))
            elif ts >= last_high + keep_us:
                events.append((sid, ts, "resolved", str(sev), since))
                phase = "normal"
        elif high[i]:
            starts = phase == "normal"
            if starts:
                phase, since = "pending", ts
            last_high = ts
            if ts - since >= for_us or (starts and interval >= for_us):
                phase, sev = "firing", "critical" if crit else "warning"
                events.append((sid, ts, "firing", sev, since))
        else:
            phase = "normal"
        flags[i] = phase == "firing"
        state[sid] = (phase, since, last_high, sev)
    order = {"firing": 0, "escalated": 1, "resolved": 2}
    return sorted(events, key=lambda e: (e[0], e[1], order[e[2]])), flags


def event_tuples(events: pd.DataFrame) -> list[tuple]:
    cols = ["series_id", "ts_us", "event", "severity", "since_us"]
    return [tuple(r) for r in events[cols].itertuples(index=False)]


# -- the pure engine ------------------------------------------------------------------------
def test_fires_only_after_the_for_duration_and_reports_since_the_first_high_row() -> None:
    rule = AlertRule(for_seconds=180, keep_firing_for_seconds=600)
    short = [0.1, 0.8, 0.8, 0.8, 0.1, 0.1]  # high for 2 minutes only
    long = [0.1, 0.8, 0.8, 0.8, 0.8, 0.8]  # the 4th high row is 3 minutes after the first
    events, state = alert_timeline(rule, scores_frame({1: short, 2: long}))
    assert event_tuples(events) == [(2, T0 + 4 * MIN, "firing", "warning", T0 + MIN)]
    assert state.set_index("series_id")["phase"].to_dict() == {1: "normal", 2: "firing"}


def test_short_dips_keep_firing_and_a_long_one_resolves_after_keep_firing_for() -> None:
    rule = AlertRule(for_seconds=0, keep_firing_for_seconds=300)
    scores = [0.8, 0.1, 0.1, 0.8] + [0.1] * 7
    events, _ = alert_timeline(rule, scores_frame({7: scores}))
    # one alert across the 2-minute dip; resolved 5 minutes after the last high row (index 3)
    assert event_tuples(events) == [
        (7, T0, "firing", "warning", T0),
        (7, T0 + 8 * MIN, "resolved", "warning", T0),
    ]
    assert alert_flags(rule, scores_frame({7: scores})).tolist() == [1] * 8 + [0] * 3


def test_a_critical_score_while_firing_escalates_once() -> None:
    rule = AlertRule(for_seconds=0, keep_firing_for_seconds=60)
    events, _ = alert_timeline(rule, scores_frame({3: [0.75, 0.95, 0.97, 0.1]}))
    assert event_tuples(events) == [
        (3, T0, "firing", "warning", T0),
        (3, T0 + MIN, "escalated", "critical", T0),
        (3, T0 + 3 * MIN, "resolved", "critical", T0),
    ]


def test_small_deviations_low_baselines_and_missing_scores_never_count_as_high() -> None:
    frame = scores_frame({1: [0.9] * 5, 2: [0.9] * 5})
    frame.loc[frame["series_id"] == 2, "baseline_level"] = 0.5
    frame.loc[2, "score"] = np.nan
    rule = AlertRule(for_seconds=0, min_baseline_level=1.0)
    assert high_mask(rule, frame).tolist() == [True, True, False, True, True] + [False] * 5
    quiet = AlertRule(for_seconds=0, min_abs_deviation=9.5)  # |value - expected| is 9
    events, _ = alert_timeline(quiet, frame)
    assert events.empty


@pytest.mark.parametrize("seed", range(4))
def test_what_a_rule_needs_per_series_may_come_beside_the_rows(seed: int) -> None:
    """The detect flow hands thresholds, budget and level once per series (SERIES_COLUMNS);
    the engine must decide exactly as with the same values repeated on every row, and a
    series the frame lacks gets the rule's own threshold."""
    rng = np.random.default_rng(seed)
    frame = scores_frame({sid: list(rng.random(60)) for sid in range(1, 7)})
    per_series = pd.DataFrame(
        {
            "series_id": np.arange(1, 6),  # series 6 has none
            "baseline_level": rng.choice([0.5, 5.0], 5),
            "alert_budget": rng.choice([0.5, 2.0], 5),
            "threshold_both": rng.uniform(0.5, 0.95, 5),
            "threshold_up": rng.uniform(0.5, 0.95, 5),
            "threshold_down": rng.uniform(0.5, 0.95, 5),
        }
    )
    frame = frame.drop(columns="baseline_level")
    frame["sign"] = rng.choice([-1.0, 1.0], len(frame))
    per_row = frame.merge(per_series, on="series_id", how="left")
    for rule in (
        AlertRule(for_seconds=60, keep_firing_for_seconds=120, threshold=0.6),
        AlertRule(for_seconds=0, direction="up", alert_budget_per_week=1.0),
        AlertRule(for_seconds=0, direction="down", min_baseline_level=1.0),
    ):
        beside = evaluate(rule, frame, series=per_series)
        repeated = evaluate(rule, per_row)
        assert high_mask(rule, frame, per_series).tolist() == high_mask(rule, per_row).tolist()
        assert beside.flags.tolist() == repeated.flags.tolist()
        pd.testing.assert_frame_equal(beside.events, repeated.events)
        pd.testing.assert_frame_equal(beside.state, repeated.state)
    # Thresholds high enough to silence series 1 to 5; series 6 keeps the rule's 0.6.
    silent = per_series.assign(threshold_both=1.5)  # above any score
    flags = evaluate(AlertRule(for_seconds=0, threshold=0.6), frame, series=silent).flags
    alerting = set(frame.loc[flags == 1, "series_id"])
    assert alerting == {6}


@pytest.mark.parametrize("seed", range(6))
def test_engine_matches_the_sample_by_sample_state_machine(seed: int) -> None:
    rng = np.random.default_rng(seed)
    series = {
        sid: list(rng.random(int(rng.integers(1, 80))) ** rng.uniform(0.3, 2))
        for sid in range(1, 9)
    }
    frame = scores_frame(series)
    frame.loc[rng.random(len(frame)) < 0.05, "score"] = np.nan
    rule = AlertRule(
        for_seconds=float(rng.choice([0, 60, 180])),
        keep_firing_for_seconds=float(rng.choice([0, 120, 300])),
        threshold=0.6,
        critical_threshold=0.9,
    )
    expected_events, expected_flags = oracle(rule, frame)
    events, _ = alert_timeline(rule, frame)
    assert event_tuples(events) == expected_events
    assert alert_flags(rule, frame).tolist() == expected_flags.tolist()
    assert len(expected_events) > 0


@pytest.mark.parametrize("seed", range(6))
def test_chunked_evaluation_gives_the_events_and_state_of_one_pass(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    series = {sid: list(rng.random(90) ** 0.5) for sid in range(1, 6)}
    frame = scores_frame(series)
    rule = AlertRule(for_seconds=120, keep_firing_for_seconds=240, threshold=0.6)
    whole_events, whole_state = alert_timeline(rule, frame)
    cuts = np.sort(rng.choice(np.arange(1, 90), size=4, replace=False))
    bounds = [T0 - 1, *(T0 + int(c) * MIN for c in cuts), T0 + 90 * MIN]
    state, parts = None, []
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        chunk = frame[(frame["ts_us"] > lo) & (frame["ts_us"] <= hi)]
        events, state = alert_timeline(rule, chunk, state)
        parts.append(events)
    again, same_state = alert_timeline(rule, chunk, state)  # a replayed chunk changes nothing
    assert again.empty
    chunked = pd.concat(parts, ignore_index=True)
    assert state is not None
    assert sorted(event_tuples(chunked)) == sorted(event_tuples(whole_events))
    assert len(whole_events) > 0
    pd.testing.assert_frame_equal(state, whole_state)
    pd.testing.assert_frame_equal(same_state, whole_state)


# -- the persisted lifecycle ----------------------------------------------------------------
def _store_series(url: str, timescaledb: str, hosts: list[str]) -> list[int]:
    stamp = datetime.fromtimestamp(T0 / 1e6, UTC)
    with Store.open(url, timescaledb=timescaledb) as store:  # type: ignore[arg-type]
        store.write_samples(
            [{"metric": "cpu", "labels": {"host": h}, "ts": stamp, "value": 1.0} for h in hosts]
        )
        found = {labels["host"]: sid for sid, _, labels in store.backend.find_series("cpu")}
    return [found[h] for h in hosts]


def _alerts(url: str, timescaledb: str) -> pd.DataFrame:
    with Store.open(url, timescaledb=timescaledb) as store:  # type: ignore[arg-type]
        return db.list_alerts(store.backend, limit=100).sort_values("alert_id")


def test_lifecycle_persists_one_open_alert_updates_it_and_resolves_it(
    db_target: DbTarget, monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    isolate_settings(monkeypatch, home=tmp_path)
    a, b = _store_series(db_target.url, db_target.timescaledb, ["a", "b"])
    settings = load_settings(
        database_url=db_target.url,
        timescaledb=db_target.timescaledb,
        alert_for_seconds=120,
        alert_keep_firing_for_seconds=180,
    )
    high_then_normal = [0.1, 0.8, 0.8, 0.8, 0.85, 0.95, 0.9] + [0.1] * 5
    frame = scores_frame({a: high_then_normal, b: [0.1] * 12})
    first = process_scores(settings, frame[frame["ts_us"] < T0 + 5 * MIN])
    assert (first.fired, first.resolved, first.open_alerts) == (1, 0, 1)
    second = process_scores(
        settings, frame[(frame["ts_us"] >= T0 + 5 * MIN) & (frame["ts_us"] < T0 + 7 * MIN)]
    )
    assert (second.fired, second.escalated, second.open_alerts) == (0, 1, 1)
    alerts = _alerts(db_target.url, db_target.timescaledb)
    assert len(alerts) == 1  # one open alert per fingerprint, updated in place
    alert = alerts.iloc[0]
    assert alert["fingerprint"] == f"anomaly:{a}" and alert["status"] == "firing"
    assert (alert["severity"], alert["score"], alert["value"]) == ("critical", 0.9, 9.0)
    assert alert["started_at"] == T0 + MIN and alert["updated_at"] == T0 + 6 * MIN
    assert alert["detail"] == {"metric": "cpu", "labels": {"host": "a"}, "kind": "point"}

    with Store.open(db_target.url, timescaledb=db_target.timescaledb) as store:  # type: ignore[arg-type]
        db.set_status(
            store.backend,
            int(alert["alert_id"]),
            status="acknowledged",
            now_us=T0 + 7 * MIN,
            incident=True,
        )
    third = process_scores(settings, frame)  # rows already seen are skipped
    assert (third.fired, third.resolved, third.open_alerts) == (0, 1, 0)
    alert = _alerts(db_target.url, db_target.timescaledb).iloc[0]
    assert alert["status"] == "resolved" and alert["resolved_at"] == T0 + 9 * MIN
    assert alert["acknowledged_at"] == T0 + 7 * MIN
    with Store.open(db_target.url, timescaledb=db_target.timescaledb) as store:  # type: ignore[arg-type]
        windows = incident_windows(store)
        state = db.load_state(store.backend, rule="anomaly", series_ids=[a, b])
    assert windows.to_dict("records") == [
        {"series_id": a, "start_us": T0 + MIN, "end_us": T0 + 9 * MIN + 1}
    ]
    assert state["phase"].tolist() == ["normal", "normal"]
    assert state["last_ts_us"].tolist() == [T0 + 11 * MIN] * 2

    again = frame.assign(ts_us=frame["ts_us"] + 12 * MIN)
    fourth = process_scores(settings, again)  # the same shape again: a second, new alert
    assert fourth.fired == 1 and fourth.resolved == 1
    assert _alerts(db_target.url, db_target.timescaledb)["status"].tolist() == ["resolved"] * 2


def test_rules_from_the_database_match_metrics_by_glob(
    monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    isolate_settings(monkeypatch, home=tmp_path)
    url = f"sqlite:///{tmp_path}/m.db"
    (a,) = _store_series(url, "off", ["a"])
    settings = load_settings(database_url=url, alert_rule_enabled=False)
    with Store.open(url) as store:
        for name, pattern in (("cpu-fast", "cp?"), ("mem", "mem_*")):
            db.upsert_rule(
                store.backend,
                {
                    "name": name,
                    "metric_pattern": pattern,
                    "threshold": 0.5,
                    "critical_threshold": 0.9,
                    "for_seconds": 0.0,
                    "keep_firing_for_seconds": 60.0,
                    "min_abs_deviation": 0.0,
                    "min_baseline_level": 0.0,
                    "repeat_interval_seconds": 3600.0,
                },
            )
    summary = process_scores(settings, scores_frame({a: [0.6, 0.6]}))
    assert summary.fired == 1
    assert _alerts(url, "off")["fingerprint"].tolist() == [f"cpu-fast:{a}"]
