"""The Store's facades on real databases (SQLite file, PostgreSQL, TimescaleDB): the alerts'
unit of work is all or nothing and writes the typed records as given, the others answer as
the module functions under them do, and what does not apply is a no-op."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest

from metricmill.settings import load_settings
from storage.records import (
    AlertUpdate,
    NewAlert,
    NotificationRecord,
    RuleOutcome,
    TransitionRound,
)
from storage.store import Store
from tests.dbtargets import DbTarget
from tests.settings_env import isolate_settings

T0 = 1_700_000_000_000_000
MIN = 60_000_000


@pytest.fixture
def store(db_target: DbTarget, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Store]:
    isolate_settings(monkeypatch, home=tmp_path)
    settings = load_settings(database_url=db_target.url, timescaledb=db_target.timescaledb)
    with Store.open(settings=settings) as opened:
        yield opened


def _series(store: Store) -> int:
    """One stored series (cpu{host="a"}); its id."""
    store.write_samples([{"metric": "cpu", "labels": {"host": "a"}, "ts": T0, "value": 1.0}])
    [sid] = store.series("cpu")["series_id"].tolist()
    return int(sid)


def _new(sid: int, rule: str = "r1", at: int = T0, score: float = 0.8) -> NewAlert:
    return NewAlert(
        fingerprint=f"{rule}:{sid}",
        rule=rule,
        series_id=sid,
        severity="warning",
        started_us=at - MIN,
        at_us=at,
        value=8.0,
        expected=1.0,
        expected_low=0.5,
        expected_high=1.5,
        score=score,
        detail={"metric": "cpu", "labels": {"host": "a"}, "kind": "point"},
    )


def _state(sid: int, phase: str, last_ts: int) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "series_id": [sid],
            "phase": [phase],
            "since_us": pd.array([T0 - MIN], dtype="Int64"),
            "last_high_us": pd.array([last_ts], dtype="Int64"),
            "severity": ["warning"],
            "last_ts_us": [last_ts],
        }
    )


def test_apply_rules_writes_rounds_refreshes_and_state_as_given(store: Store) -> None:
    sid = _series(store)
    outcome = RuleOutcome(
        rule="r1",
        rounds=(TransitionRound(opened=(_new(sid),)),),
        refreshed=(
            AlertUpdate(
                f"r1:{sid}", T0 + MIN, 9.0, 0.85, expected=2.0, expected_low=1.0, expected_high=3.0
            ),
        ),  # fmt: skip
        state=_state(sid, "firing", T0 + MIN),
    )
    written = store.alerts.apply_rules(["r1"], lambda rule: outcome)

    assert written == [outcome]
    [alert] = store.alerts.find(status="open").to_dict("records")
    assert (alert["fingerprint"], alert["rule"], alert["series_id"]) == (f"r1:{sid}", "r1", sid)
    assert (alert["status"], alert["severity"], alert["started_at"]) == (
        "firing",
        "warning",
        T0 - MIN,
    )
    # The refresh came after the opening: its values are the ones stored.
    assert (alert["updated_at"], alert["value"], alert["score"]) == (T0 + MIN, 9.0, 0.85)
    assert (alert["expected"], alert["expected_low"], alert["expected_high"]) == (2.0, 1.0, 3.0)
    assert alert["detail"] == {"metric": "cpu", "labels": {"host": "a"}, "kind": "point"}
    state = store.alerts.load_state("r1", [sid])
    assert state[["phase", "last_ts_us"]].values.tolist() == [["firing", T0 + MIN]]

    # Round after round keeps a series' order: escalated, then resolved, in one run.
    later = RuleOutcome(
        rule="r1",
        rounds=(
            TransitionRound(escalated=(AlertUpdate(f"r1:{sid}", T0 + 2 * MIN, 10.0, 0.95),)),
            TransitionRound(resolved=(AlertUpdate(f"r1:{sid}", T0 + 3 * MIN, 1.0, 0.1),)),
        ),
    )
    store.alerts.apply_rules(["r1"], lambda rule: later)
    done = store.alerts.get(int(alert["alert_id"]))
    assert done is not None
    assert (done["severity"], done["status"], done["resolved_at"]) == (
        "critical",
        "resolved",
        T0 + 3 * MIN,
    )
    assert (done["value"], done["score"]) == (1.0, 0.1)
    assert store.alerts.count_open() == 0


def test_apply_rules_is_all_or_nothing(store: Store) -> None:
    sid = _series(store)

    def judge(rule: str) -> RuleOutcome | None:
        if rule == "broken":
            raise RuntimeError("the engine failed on the second rule")
        if rule == "nothing":
            return None
        return RuleOutcome(
            rule=rule,
            rounds=(TransitionRound(opened=(_new(sid, rule),)),),
            state=_state(sid, "firing", T0),
        )

    with pytest.raises(RuntimeError, match="second rule"):
        store.alerts.apply_rules(["r1", "nothing", "broken"], judge)

    # The first rule's alert and state were written before the failure: both rolled back.
    assert store.alerts.count_open() == 0
    assert store.alerts.load_state("r1", [sid]).empty
    assert store.alerts.apply_rules(["r1", "nothing"], judge)[0].rule == "r1"
    assert store.alerts.count_open() == 1


def test_a_judge_sees_what_earlier_rules_wrote_in_the_same_transaction(store: Store) -> None:
    sid = _series(store)
    seen: dict[str, int] = {}

    def judge(rule: str) -> RuleOutcome:
        seen[rule] = len(store.alerts.for_fingerprints([f"r1:{sid}"]))
        return RuleOutcome(rule=rule, rounds=(TransitionRound(opened=(_new(sid, rule),)),))

    store.alerts.apply_rules(["r1", "r2"], judge)
    assert seen == {"r1": 0, "r2": 1}
    assert sorted(store.alerts.find()["rule"]) == ["r1", "r2"]


def test_silences_and_notifications_go_in_as_typed_records(store: Store) -> None:
    sid = _series(store)
    store.alerts.apply_rules(
        ["r1"], lambda rule: RuleOutcome(rule, (TransitionRound(opened=(_new(sid),)),))
    )
    alert_id = int(store.alerts.find()["alert_id"].iloc[0])
    now_us = round(datetime.now(UTC).timestamp() * 1_000_000)
    silence_id = store.alerts.add_silence(
        matcher='cpu{host="a"}',
        starts_us=now_us - MIN,
        ends_us=now_us + MIN,
        comment="maintenance",
    )
    assert [s.silence_id for s in store.alerts.silences(active_at_us=now_us)] == [silence_id]
    assert store.alerts.silences(active_at_us=now_us + 2 * MIN) == []

    store.alerts.mark_silenced({alert_id: silence_id})
    store.alerts.mark_silenced({})  # nothing to mark: no statement, no error
    alert = store.alerts.get(alert_id)
    assert alert is not None and alert["silence_id"] == silence_id

    store.alerts.record_notifications(
        [
            NotificationRecord(alert_id, "block/a", "firing", 2, "sent", None, now_us),
            NotificationRecord(alert_id, "block/b", "firing", 3, "failed", "timeout", now_us),
        ]
    )
    sent = store.alerts.notifications_for(alert_id)
    assert sent[["channel", "attempts", "outcome"]].values.tolist() == [
        ["block/a", 2, "sent"],
        ["block/b", 3, "failed"],
    ]
    assert sent["error"].isna().tolist() == [True, False] and sent["error"].iloc[1] == "timeout"
    assert sent["sent_at"].astype("int64").tolist() == [now_us, now_us]
    # Only a delivery that reached the channel counts for the repeat interval.
    assert store.alerts.last_delivered([alert_id]) == {(alert_id, "block/a"): now_us}


def test_alert_rules_through_the_facade(store: Store) -> None:
    rule = {"name": "cpu-hot", "metric_pattern": "cpu*", "threshold": 0.6,
            "critical_threshold": 0.9, "for_seconds": 60.0, "keep_firing_for_seconds": 60.0,
            "min_abs_deviation": 0.0, "min_baseline_level": 0.0,
            "repeat_interval_seconds": 3600.0, "direction": None,
            "alert_budget_per_week": None}  # fmt: skip
    store.alerts.upsert_rule(rule)
    [stored] = store.alerts.rules()
    assert stored == {**rule, "direction": "both"}
    assert store.alerts.delete_rule("cpu-hot") is True
    assert store.alerts.delete_rule("cpu-hot") is False
    assert store.alerts.rules() == []


def test_compression_applies_on_timescaledb_and_is_a_no_op_elsewhere(
    store: Store, db_target: DbTarget
) -> None:
    status = store.ops.timescale()
    assert status.server == (db_target.name != "sqlite")
    assert status.enabled == (db_target.name == "timescaledb")
    if db_target.name == "timescaledb":
        assert status.version and status.version[0].isdigit()
        assert {h for h, _ in store.ops.compressed_hypertables()} >= {"samples", "rollup_1m"}
    else:
        assert store.ops.compressed_hypertables() == []
        assert store.ops.timescale_jobs() == []
    _series(store)  # a sample of November 2023: its chunk is old enough everywhere
    assert store.retention.compress_old_chunks(days=0) == 0  # 0 days: compression is off
    if db_target.name == "timescaledb":
        assert store.retention.compress_old_chunks() == 1  # the one samples chunk
        assert store.retention.compress_old_chunks() == 0  # already compressed
    else:
        assert store.retention.compress_old_chunks() == 0  # no chunks: nothing done


def test_quarantine_lists_one_entry_and_marks_it_replayed(store: Store) -> None:
    store.write_samples(
        [
            {"metric": "cpu", "labels": {"host": "a"}, "ts": T0, "value": 1.0},
            {"metric": "cpu", "labels": {"host": "a"}, "ts": T0 + MIN, "value": float("nan")},
        ],
        batch_id="b1",
    )
    [entry] = store.quarantine(limit=10).to_dict("records")
    assert (entry["batch_id"], entry["reason"], entry["replayed_at"]) == (
        "b1",
        "non_finite_value",
        None,
    )
    assert store.quarantine.entry(entry["id"]) == entry
    assert store.quarantine.entry(entry["id"] + 1000) is None

    store.quarantine.mark_replayed(entry["id"])
    replayed = store.quarantine.entry(entry["id"])
    assert replayed is not None and replayed["replayed_at"] is not None
    assert abs(replayed["replayed_at"] - datetime.now(UTC)) < timedelta(minutes=5)
    assert store.quarantine(pending_only=True).empty
    assert len(store.quarantine()) == 1


def test_rollups_and_series_labels_through_the_store(store: Store) -> None:
    sid = _series(store)
    assert store.rollups.pending_ranges() == store.rollups.status().pending_ranges >= 1
    report = store.rollups.run()
    assert report.levels["1m"].rows == 1 and store.rollups.pending_ranges() == 0
    rows = store.rollups.written_rows("1m", report.levels["1m"].spans, limit=10)
    assert rows[["series_id", "bucket", "count"]].values.tolist() == [[sid, T0 // MIN * MIN, 1]]
    assert rows["sum"].tolist() == [1.0]
    assert store.series_labels([sid, sid + 1000]) == {sid: ("cpu", {"host": "a"})}
    assert store.series_labels([]) == {}
    assert store.health().backend_name == store.backend_name
