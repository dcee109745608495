"""TimescaleDB retention with archival: whole day chunks are archived, verified and dropped.

A day chunk goes with drop_chunks only when every series in it is past its rule, none is held,
no pending rollup range covers it — and after every row of it is in a verified archive file.
Everything else is archived and deleted row by row, as on the other backends.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from metricmill.settings import Settings
from metricmill.types import datetime_to_us
from storage import retention
from storage.archive import ArchiveError
from storage.store import Store
from tests.dbtargets import DbTarget
from tests.retention_data import (
    DAYS,
    PER_DAY,
    SERIES,
    assert_archive_plus_database_is_everything,
    cutoff,
    expected_rows,
    filled_store,
    make_settings,
    remaining,
)

CPU1, CPU2, MEM = SERIES


@pytest.fixture
def timescale(db_target: DbTarget) -> DbTarget:
    if db_target.name != "timescaledb":
        pytest.skip("drop_chunks is TimescaleDB's; the row-by-row path is tested everywhere")
    return db_target


@pytest.fixture
def settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, timescale: DbTarget) -> Settings:
    return make_settings(monkeypatch, tmp_path / "home", timescale, retention_days=30)


@pytest.fixture
def store(settings: Settings) -> Iterator[Store]:
    with filled_store(settings) as opened:
        yield opened


def day_chunks(store: Store) -> list[int]:
    """Start (µs) of every samples chunk."""
    b = store.backend
    return [
        int(r[0])
        for r in b.execute(
            f"SELECT {b.ts_out.format(col='range_start')} FROM timescaledb_information.chunks "
            "WHERE hypertable_name = 'samples' ORDER BY range_start"
        )
    ]


def test_days_every_series_has_left_are_archived_then_dropped_whole(
    store: Store, settings: Settings
) -> None:
    retention.add_rule(store.backend, "container_cpu_*", 7)
    before = day_chunks(store)

    report = retention.apply(store)

    raw = {o.rule: o for o in report.outcomes if o.level == "raw"}
    # Days older than 30 (every series past its cut-off) went whole, the rest row by row.
    whole_days = [d for d in before if d + 86_400_000_000 <= datetime_to_us(cutoff(30))]
    assert whole_days and raw["default"].chunks_dropped == len(whole_days)
    assert raw["#1 container_cpu_*"].chunks_dropped == len(whole_days)
    left = day_chunks(store)
    assert not set(whole_days) & set(left)
    assert set(left) >= {d for d in before if d >= datetime_to_us(cutoff(7))}
    cpu_old = sum(int((expected_rows(*s)["ts"] < cutoff(7)).sum()) for s in (CPU1, CPU2))
    mem_old = int((expected_rows(*MEM)["ts"] < cutoff(30)).sum())
    assert raw["#1 container_cpu_*"].archived == raw["#1 container_cpu_*"].deleted == cpu_old
    assert raw["default"].archived == raw["default"].deleted == mem_old
    assert len(remaining(store, *MEM)) == DAYS * PER_DAY - mem_old
    assert_archive_plus_database_is_everything(store, settings)


def test_a_held_series_keeps_its_chunks_and_the_others_leave_row_by_row(
    store: Store, settings: Settings
) -> None:
    retention.add_rule(store.backend, "*", 7)
    retention.add_rule(store.backend, "container_cpu_usage", labels={"host": "host_2"},
                       legal_hold=True)  # fmt: skip
    before = day_chunks(store)

    report = retention.apply(store)

    assert sum(o.chunks_dropped for o in report.outcomes if o.level == "raw") == 0
    assert day_chunks(store) == before
    assert len(remaining(store, *CPU2)) == DAYS * PER_DAY  # held: untouched
    for series in (CPU1, MEM):
        assert remaining(store, *series)["ts"].min() >= cutoff(7)
    assert_archive_plus_database_is_everything(store, settings)


def test_a_pending_rollup_range_keeps_its_day_chunk(store: Store, settings: Settings) -> None:
    retention.add_rule(store.backend, "*", 7)
    b = store.backend
    pending_day = cutoff(DAYS - 2)
    b.execute(
        f"INSERT INTO rollup_pending (start_ts, end_ts, batch_id) VALUES ({b.ts_in}, {b.ts_in}, "
        "'test')",
        (datetime_to_us(pending_day), datetime_to_us(pending_day + timedelta(hours=6))),
    )

    report = retention.apply(store)

    left = day_chunks(store)
    assert datetime_to_us(pending_day) in left
    assert sum(o.chunks_dropped for o in report.outcomes if o.level == "raw") > 0
    inside = remaining(store, *CPU1)
    assert ((inside["ts"] >= pending_day) & (inside["ts"] < pending_day + timedelta(hours=6))).any()
    assert_archive_plus_database_is_everything(store, settings)


def test_an_archive_that_cannot_be_written_drops_no_chunk(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, timescale: DbTarget
) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the archive directory should be")
    settings = make_settings(monkeypatch, tmp_path / "home", timescale, archive_dir=blocker / "a")
    with filled_store(settings) as store:
        retention.add_rule(store.backend, "*", 7)
        before = day_chunks(store)
        counts = store.backend.table_counts()
        with pytest.raises(ArchiveError):
            retention.apply(store)
        assert day_chunks(store) == before
        assert store.backend.table_counts() == counts
