"""What detect reads, on every backend: baselines as written (NaN, every season, in chunks)
and the recent samples of a list of series with their watermarks."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from metricmill.settings import load_settings
from storage import detection
from storage.detection import BASELINE_COLUMNS, BASELINE_SEASONS
from storage.store import Store
from tasks.baseline_table import BaselineTable
from tests.dbtargets import DbTarget
from tests.settings_env import isolate_settings

MINUTE_US = 60_000_000
T0 = 1_780_000_000_000_000  # µs, a whole minute


@pytest.fixture
def store(db_target: DbTarget, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Store]:
    isolate_settings(monkeypatch, home=tmp_path, timescaledb=db_target.timescaledb)
    with Store.open(settings=load_settings(database_url=db_target.url)) as opened:
        yield opened


def _series(store: Store, count: int) -> list[int]:
    frame = pd.DataFrame(
        {
            "metric": "m",
            "labels": [{"host": f"h{i}"} for i in range(count)],
            "ts": pd.to_datetime(T0, unit="us", utc=True),
            "value": 1.0,
        }
    )
    store.write_samples(frame)
    return sorted(int(i) for i in store.series("m")["series_id"])


def _baselines(ids: list[int]) -> pd.DataFrame:
    """Two slots per series, a season each (every one of them), NaN here and there."""
    rng = np.random.default_rng(7)
    rows = []
    for k, sid in enumerate(ids):
        for slot in (0, 1):
            row: dict[str, object] = {c: float(rng.normal()) for c in BASELINE_COLUMNS}
            row.update(
                series_id=sid,
                slot=slot,
                season=BASELINE_SEASONS[k % len(BASELINE_SEASONS)],
                n=int(rng.integers(1, 1000)),
                window_start=T0 - 86_400_000_000,
                window_end=T0,
            )
            if (k + slot) % 3 == 0:
                row["p99"] = np.nan  # stored as NULL, read as NaN
            rows.append(row)
    return pd.DataFrame(rows, columns=BASELINE_COLUMNS)


def test_baselines_read_back_as_written_in_chunks(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = _series(store, 7)
    written = _baselines(ids)
    detection.write_baselines(store, written)
    monkeypatch.setattr(detection, "BASELINE_READ_SERIES", 3)  # reads of 3, 3 and 1 series

    some = [ids[5], ids[0], ids[3], ids[6]]
    got = detection.read_baselines(store, some)
    want = written[written["series_id"].isin(some)].reset_index(drop=True)
    pd.testing.assert_frame_equal(got, want, check_dtype=False)
    assert got["season"].tolist().count("weekpart") == 2  # every name comes back
    assert got["p99"].isna().sum() == want["p99"].isna().sum() > 0

    everything = detection.read_baselines(store)
    pd.testing.assert_frame_equal(everything, written, check_dtype=False)
    assert detection.read_baselines(store, []).empty


def test_scoring_reads_take_slot_columns_and_one_row_per_series(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = _series(store, 7)
    written = _baselines(ids)
    # a series whose lowest slot is 1: its per-series columns come from that row
    written = written[~((written["series_id"] == ids[3]) & (written["slot"] == 0))]
    written = written.reset_index(drop=True)
    detection.write_baselines(store, written)
    monkeypatch.setattr(detection, "BASELINE_READ_SERIES", 3)

    some = [ids[5], ids[0], ids[3], ids[6]]
    slots, series = detection.read_scoring_baselines(store, some)
    chosen = written[written["series_id"].isin(some)]
    want_slots = chosen[detection.SCORING_SLOT_COLUMNS].reset_index(drop=True)
    pd.testing.assert_frame_equal(slots, want_slots, check_dtype=False)
    first = chosen.groupby("series_id")["slot"].transform("min") == chosen["slot"]
    want_series = chosen.loc[first, detection.SCORING_SERIES_COLUMNS].reset_index(drop=True)
    pd.testing.assert_frame_equal(series, want_series, check_dtype=False)
    assert len(series) == 4 and series["series_id"].is_unique
    assert series.loc[series["series_id"] == ids[3], "season"].item() == "weekpart"
    empty_slots, empty_series = detection.read_scoring_baselines(store, [])
    assert empty_slots.empty and empty_series.empty


def test_a_table_from_the_scoring_reads_is_the_table_of_all_columns(store: Store) -> None:
    """Where every slot row of a series repeats its per-series columns (as the baseline task
    writes them), the table from the two narrow reads is the table from the whole rows."""
    ids = _series(store, 6)
    written = _baselines(ids)
    per_series = [c for c in detection.SCORING_SERIES_COLUMNS if c != "series_id"]
    firsts = written.groupby("series_id")[per_series].transform("first")
    written[per_series] = firsts
    detection.write_baselines(store, written)

    whole = BaselineTable.from_frame(detection.read_baselines(store, ids))
    narrow = BaselineTable.from_reads(*detection.read_scoring_baselines(store, ids))
    for name, value in vars(whole).items():
        np.testing.assert_array_equal(getattr(narrow, name), value, err_msg=name)
    assert np.isfinite(whole.median).sum() == len(written)


def test_recent_points_start_at_the_watermark_or_the_floor(store: Store) -> None:
    a, b, c = _series(store, 3)
    times = pd.to_datetime(T0 + MINUTE_US * np.arange(1, 11), unit="us", utc=True)
    frames = [
        pd.DataFrame(
            {
                "metric": "m",
                "labels": [{"host": f"h{i}"}] * 10,
                "ts": times,
                "value": np.arange(10, dtype=float) + 100 * i,
            }
        )
        for i in range(3)
    ]
    store.write_samples(pd.concat(frames, ignore_index=True))
    # a: watermark at minute 6; b: none (the floor, minute 4, decides); c: not asked for
    detection.advance_watermarks(
        store, pd.DataFrame({"series_id": [a], "ts_us": [T0 + 6 * MINUTE_US]})
    )
    floor = T0 + 4 * MINUTE_US
    got = detection.recent_points(
        store, series_ids=[b, a], floor_us=floor, context_us=2 * MINUTE_US
    )
    assert got["series_id"].tolist() == [a] * 7 + [b] * 9  # ordered by series, then time
    minutes_a = ((got["ts_us"][got["series_id"] == a] - T0) // MINUTE_US).tolist()
    assert minutes_a == [4, 5, 6, 7, 8, 9, 10]  # two minutes of context before the watermark
    fresh_a = got["fresh"][got["series_id"] == a].tolist()
    assert fresh_a == [False, False, False, True, True, True, True]
    minutes_b = ((got["ts_us"][got["series_id"] == b] - T0) // MINUTE_US).tolist()
    assert minutes_b == [2, 3, 4, 5, 6, 7, 8, 9, 10]  # from the floor (minute 4) back two
    assert got["fresh"][got["series_id"] == b].tolist() == [False] * 2 + [True] * 7
    assert got["value"][got["series_id"] == b].tolist() == [100.0 + m - 1 for m in range(2, 11)]
    assert got.dtypes.to_dict() == {
        "series_id": np.dtype("int64"),
        "ts_us": np.dtype("int64"),
        "value": np.dtype("float64"),
        "fresh": np.dtype("bool"),
    }
