"""Retention rules: priority, per-level retention, legal holds, pending rollups, bad rules."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from metricmill.settings import Settings
from metricmill.types import datetime_to_us
from storage import retention
from storage.postgres.timescale import compress_old_chunks, compressed_chunks
from storage.retention import RetentionRuleError
from storage.store import Store
from tests.dbtargets import DbTarget
from tests.retention_data import (
    DAYS,
    PER_DAY,
    SERIES,
    TODAY,
    cutoff,
    expected_rows,
    filled_store,
    make_settings,
    remaining,
)

CPU1, CPU2, MEM = SERIES


@pytest.fixture
def settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, db_target: DbTarget) -> Settings:
    return make_settings(monkeypatch, tmp_path / "home", db_target, retention_days=30)


@pytest.fixture
def store(settings: Settings) -> Iterator[Store]:
    with filled_store(settings) as opened:
        yield opened


def oldest(store: Store, series: tuple[str, dict[str, str]]) -> Any:
    return remaining(store, *series)["ts"].min()


def kept_since(series: tuple[str, dict[str, str]], days: int) -> int:
    rows = expected_rows(*series)
    return int((rows["ts"] >= cutoff(days)).sum())


def rollup_rows(store: Store, table: str, sid: int, days: int) -> None:
    """One 1m bucket a day for `days` days: enough to see what a level's retention keeps."""
    b = store.backend
    rows = []
    for day in range(days):
        bucket = datetime_to_us(TODAY - timedelta(days=day, hours=12))
        rows.append((sid, bucket, 1, 1.0, 1.0, 1.0, 1.0, 1.0, bucket, 1.0, bucket))
    b.executemany(
        f"INSERT INTO {table} (series_id, bucket, count, sum, sum_sq, min, max, first, "
        f"first_ts, last, last_ts) VALUES (%s, {b.ts_in}, %s, %s, %s, %s, %s, %s, {b.ts_in}, "
        f"%s, {b.ts_in})",
        rows,
    )


def series_id(store: Store, series: tuple[str, dict[str, str]]) -> int:
    found = store.series(series[0], series[1])
    return int(found["series_id"].iloc[0])


def count(store: Store, table: str, sid: int) -> int:
    rows = store.backend.execute(
        f"SELECT count(*) FROM {table} WHERE series_id = %s",
        (sid,),
    )
    return int(rows[0][0])


def test_highest_priority_rule_wins_and_unmatched_series_keep_the_default(store: Store) -> None:
    b = store.backend
    retention.add_rule(b, "container_cpu_*", 7, priority=1, archive=False)
    retention.add_rule(b, "container_cpu_*", 3, {"host": "host_1"}, priority=10, archive=False)
    retention.add_rule(b, "container_*", 1, {"host": "host_1"}, priority=5, archive=False)

    report = retention.apply(store)

    assert oldest(store, CPU1) >= cutoff(3)
    assert len(remaining(store, *CPU1)) == kept_since(CPU1, 3)
    assert len(remaining(store, *CPU2)) == kept_since(CPU2, 7)
    assert len(remaining(store, *MEM)) == kept_since(MEM, 30)  # default: retention_days
    by_rule = {(o.level, o.rule.split(" ")[0]): o for o in report.outcomes}
    assert by_rule[("raw", "#2")].deleted == DAYS * PER_DAY - kept_since(CPU1, 3)
    assert by_rule[("raw", "#1")].deleted == DAYS * PER_DAY - kept_since(CPU2, 7)
    assert ("raw", "#3") not in by_rule  # outranked for its only series: governs nothing
    assert by_rule[("raw", "default")].deleted == DAYS * PER_DAY - kept_since(MEM, 30)


def test_each_level_keeps_its_own_retention(store: Store, settings: Settings) -> None:
    cpu = series_id(store, CPU1)
    mem = series_id(store, MEM)
    for sid in (cpu, mem):
        rollup_rows(store, "rollup_1m", sid, 100)
        rollup_rows(store, "rollup_1d", sid, 100)
    retention.add_rule(store.backend, "container_cpu_usage", 10, level="1m")

    retention.apply(store)

    assert count(store, "rollup_1m", cpu) == 10  # its rule
    assert count(store, "rollup_1m", mem) == 90  # the 1m default
    assert count(store, "rollup_1d", cpu) == 100  # 1d is kept forever by default
    assert len(remaining(store, *CPU1)) == kept_since(CPU1, 30)  # raw: a 1m rule is not raw's


def test_legal_hold_keeps_every_level_and_is_reported(store: Store) -> None:
    cpu2 = series_id(store, CPU2)
    rollup_rows(store, "rollup_1m", cpu2, 100)
    retention.add_rule(store.backend, "container_cpu_*", 2, archive=False)
    retention.add_rule(store.backend, "*", 1, level="1m")
    retention.add_rule(store.backend, "container_*", labels={"host": "host_2"}, legal_hold=True)

    preview = retention.preview(store)
    report = retention.apply(store)

    assert len(remaining(store, *CPU2)) == DAYS * PER_DAY
    assert count(store, "rollup_1m", cpu2) == 100
    assert len(remaining(store, *CPU1)) == kept_since(CPU1, 2)
    raw = next(o for o in report.outcomes if o.level == "raw" and o.rule.startswith("#1"))
    assert raw.held == DAYS * PER_DAY - kept_since(CPU2, 2)
    assert [(o.level, o.rule, o.deleted, o.held) for o in preview.outcomes] == [
        (o.level, o.rule, o.deleted, o.held) for o in report.outcomes
    ]


def test_hold_added_while_a_run_is_in_progress_leaves_its_series_untouched(
    store: Store, settings: Settings
) -> None:
    retention.add_rule(store.backend, "*", 2)

    def add_hold(stage: str, _: dict[str, Any]) -> None:
        if stage == "planned":  # the run has decided what to delete; now a hold arrives
            with Store.open(settings=settings) as other:
                retention.add_rule(other.backend, "mem_*", legal_hold=True)

    report = retention.apply(store, checkpoint=add_hold)

    assert len(remaining(store, *MEM)) == DAYS * PER_DAY
    assert len(remaining(store, *CPU1)) == kept_since(CPU1, 2)
    assert not any(f.metric == "mem_used_bytes" for f in report.files)


def test_rows_a_pending_rollup_still_needs_are_kept_until_rolled_up(store: Store) -> None:
    b = store.backend
    retention.add_rule(b, "*", 2, archive=False)
    hour_start = datetime_to_us(cutoff(20) + timedelta(hours=3))  # holds one sample a series
    b.execute(
        f"INSERT INTO rollup_pending (start_ts, end_ts) VALUES ({b.ts_in}, {b.ts_in})",
        (hour_start, hour_start + 3_600_000_000),
    )
    retention.apply(store)
    left = remaining(store, *CPU1)
    assert list(left[left["ts"] < cutoff(2)]["ts"]) == [cutoff(20) + timedelta(hours=3)]

    b.execute("DELETE FROM rollup_pending")
    retention.apply(store)
    assert remaining(store, *CPU1)["ts"].min() >= cutoff(2)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("cpu[", 3), "bad glob"),
        (("cpu/x*", 3), "bad glob"),
        (("", 3), "empty"),
        (("cpu_*", -1), "must be positive"),
        (("cpu_*", 0), "must be positive"),
        (("cpu_*", None), "give retention_days"),
    ],
)
def test_invalid_rules_are_refused_with_one_clear_line(
    tmp_path: Path, args: tuple[str, int | None], message: str
) -> None:
    with Store.open(f"sqlite:///{tmp_path}/m.db") as store:
        with pytest.raises(RetentionRuleError, match=message) as raised:
            retention.add_rule(store.backend, *args)
        assert "\n" not in str(raised.value)
        assert retention.list_rules(store.backend) == []


def test_unknown_level_and_days_on_a_hold_are_refused(tmp_path: Path) -> None:
    with Store.open(f"sqlite:///{tmp_path}/m.db") as store:
        with pytest.raises(RetentionRuleError, match="unknown level '2m'"):
            retention.add_rule(store.backend, "cpu", 3, level="2m")
        with pytest.raises(RetentionRuleError, match="legal hold"):
            retention.add_rule(store.backend, "cpu", 3, legal_hold=True)
        with pytest.raises(RetentionRuleError, match="no retention rule 42"):
            retention.remove_rule(store.backend, 42)


def test_preview_changes_nothing(store: Store) -> None:
    retention.add_rule(store.backend, "*", 5)
    before = store.backend.table_counts()
    report = retention.preview(store)
    assert store.backend.table_counts() == before
    assert sum(o.deleted for o in report.outcomes) == sum(
        DAYS * PER_DAY - kept_since(s, 5) for s in SERIES
    )
    assert report.deleted_fraction()["samples"] == pytest.approx(
        sum(o.deleted for o in report.outcomes) / (len(SERIES) * DAYS * PER_DAY)
    )


def test_timescaledb_drops_whole_chunks_then_deletes_the_rest_and_compresses(
    store: Store, db_target: DbTarget
) -> None:
    if db_target.name != "timescaledb":
        pytest.skip("TimescaleDB only")
    retention.add_rule(store.backend, "*", 10, archive=False)
    retention.add_rule(store.backend, "container_*", 5, {"host": "host_1"}, 1, archive=False)

    report = retention.apply(store)

    raw = [o for o in report.outcomes if o.level == "raw"]
    assert all(o.chunks_dropped > 0 for o in raw)
    assert len(remaining(store, *CPU1)) == kept_since(CPU1, 5)
    assert len(remaining(store, *CPU2)) == kept_since(CPU2, 10)
    assert sum(o.deleted for o in raw) == sum(
        DAYS * PER_DAY - kept_since(s, d) for s, d in ((CPU1, 5), (CPU2, 10), (MEM, 10))
    )
    assert compress_old_chunks(store.backend, 2) > 0
    assert compressed_chunks(store.backend) > 0
    assert len(remaining(store, *CPU2)) == kept_since(CPU2, 10)  # reads through compression
