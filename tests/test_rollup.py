"""Rollups equal a full recompute from raw, whatever order, lateness or repeats the data had.

Values are multiples of 1/8 well inside float64's exact range, so sums and sums of squares are
exact in any order: count, sum, sum_sq, min, max, first and last are compared exactly; avg
and stddev within 1e-9 relative.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from metricmill.settings import load_settings
from metricmill.types import datetime_to_us
from storage.rollup import LEVELS, step_stats, written_rows
from storage.schema import ROLLUP_LEVELS
from storage.store import Store
from tests.dbtargets import DbTarget
from tests.settings_env import isolate_settings

NOW = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
BASE = NOW - timedelta(days=2, hours=3)
EVERYTHING = (NOW - timedelta(days=40), NOW + timedelta(days=2))
LABELS = [{"host": "a"}, {"host": "b"}]


@pytest.fixture
def store(db_target: DbTarget, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Store]:
    isolate_settings(monkeypatch, home=tmp_path, timescaledb=db_target.timescaledb)
    with Store.open(settings=load_settings(database_url=db_target.url)) as opened:
        yield opened


def frame(
    metric: str, labels: dict[str, str], times: list[datetime], values: np.ndarray
) -> pd.DataFrame:
    return pd.DataFrame(
        {"metric": metric, "labels": [labels] * len(times), "ts": times, "value": values}
    )


def eighths(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(-8000, 8000, size=n) / 8.0


def every(start: datetime, step: timedelta, n: int) -> list[datetime]:
    return [start + step * i for i in range(n)]


def recompute(store: Store, level: str) -> pd.DataFrame:
    """The level as computed from scratch out of every raw sample (pandas, not SQL)."""
    ids = [int(i) for i in store.series()["series_id"]]
    start, end = (datetime_to_us(t) for t in EVERYTHING)
    raw = store.backend.raw_points(ids, start, end)
    raw["ts_us"] = raw["ts_us"].astype("int64")
    raw["value"] = raw["value"].astype("float64")
    width = ROLLUP_LEVELS[level]
    raw["bucket"] = raw["ts_us"] - raw["ts_us"] % width
    raw = raw.sort_values(["series_id", "ts_us"])
    raw["sq"] = raw["value"] * raw["value"]
    grouped = raw.groupby(["series_id", "bucket"], sort=True)
    out = grouped.agg(
        count=("value", "size"),
        sum=("value", "sum"),
        sum_sq=("sq", "sum"),
        min=("value", "min"),
        max=("value", "max"),
        first=("value", "first"),
        first_ts=("ts_us", "min"),
        last=("value", "last"),
        last_ts=("ts_us", "max"),
    ).reset_index()
    return out


def stored(store: Store, level: str) -> pd.DataFrame:
    start, end = (datetime_to_us(t) for t in EVERYTHING)
    rows = written_rows(store.backend, level, [(start, end)], limit=10_000_000)
    return rows.sort_values(["series_id", "bucket"], ignore_index=True)


def assert_levels_match_raw(store: Store) -> None:
    for level in LEVELS:
        want, got = recompute(store, level), stored(store, level)
        assert len(got) == len(want), level
        for column in ("series_id", "bucket", "count", "first_ts", "last_ts"):
            assert got[column].tolist() == want[column].astype("int64").tolist(), (level, column)
        for column in ("sum", "sum_sq", "min", "max", "first", "last"):
            assert got[column].tolist() == want[column].tolist(), (level, column)
        avg = got["sum"] / got["count"]
        np.testing.assert_allclose(avg, want["sum"] / want["count"], rtol=1e-9)
        std = np.sqrt(np.maximum(got["sum_sq"] / got["count"] - avg**2, 0))
        np.testing.assert_allclose(std, recompute_std(store, level), rtol=1e-9, atol=1e-9)


def recompute_std(store: Store, level: str) -> np.ndarray:
    ids = [int(i) for i in store.series()["series_id"]]
    start, end = (datetime_to_us(t) for t in EVERYTHING)
    raw = store.backend.raw_points(ids, start, end)
    width = ROLLUP_LEVELS[level]
    raw["bucket"] = raw["ts_us"].astype("int64") // width
    std = raw.groupby(["series_id", "bucket"], sort=True)["value"].std(ddof=0)
    return std.to_numpy(dtype="float64")


def ingest_everything(store: Store) -> None:
    """In order, out of order, 30 days late, duplicated and overwritten batches."""
    rng = np.random.default_rng(7)
    ten_s = timedelta(seconds=10)
    in_order = every(BASE, ten_s, 1500)  # ~4 hours
    for labels in LABELS:
        store.write_samples(frame("cpu", labels, in_order, eighths(rng, len(in_order))))
    store.write_samples(frame("mem", {"host": "a"}, in_order[::7], eighths(rng, 215)))
    store.rollup()  # a first run in between: the later runs must redo what changes

    shifted = [t + timedelta(seconds=3) for t in reversed(in_order[100:900])]
    store.write_samples(frame("cpu", LABELS[0], shifted, eighths(rng, len(shifted))))
    late = every(NOW - timedelta(days=30) + timedelta(minutes=7), timedelta(seconds=37), 200)
    store.write_samples(frame("cpu", LABELS[1], late, eighths(rng, len(late))))
    dup = frame("cpu", LABELS[1], in_order[:50], eighths(rng, 50) + 5000)
    assert store.write_samples(dup).overwritten == 50
    assert store.write_samples(dup).replay
    changed = store.query("cpu", {"host": "a"}, BASE, BASE + timedelta(hours=2))
    rewrite = frame(
        "cpu",
        LABELS[0],
        [t.to_pydatetime() for t in changed["ts"]][::3],
        changed["value"].to_numpy()[::3] + 0.5,
    )
    report = store.write_samples(rewrite)
    assert report.overwritten > 0
    # the same values again in a new batch (a duplicate of samples, not of the batch)
    again = pd.concat([rewrite.iloc[:20], frame("cpu", LABELS[0], [NOW - ten_s], np.array([1.0]))])
    assert store.write_samples(again).unchanged == 20


def test_every_level_equals_a_full_recompute_after_one_run(store: Store) -> None:
    ingest_everything(store)
    report = store.rollup()
    assert report.pending_left == 0
    assert store.rollup_status().pending_ranges == 0
    assert report.levels["1m"].rows > 0 and report.levels["1d"].rows > 0
    assert_levels_match_raw(store)


def test_rerun_is_harmless(store: Store) -> None:
    ingest_everything(store)
    store.rollup()
    before = {level: stored(store, level) for level in LEVELS}
    again = store.rollup()
    assert again.chunks == 0 and sum(w.rows for w in again.levels.values()) == 0
    # Everything pending again (as if every batch were replayed): same tables after.
    store.backend.execute(
        f"INSERT INTO rollup_pending (start_ts, end_ts) VALUES ({store.backend.ts_in}, "
        f"{store.backend.ts_in})",
        tuple(datetime_to_us(t) for t in EVERYTHING),
    )
    redo = store.rollup()
    assert redo.chunks > 1 and redo.pending_left == 0
    for level in LEVELS:
        pd.testing.assert_frame_equal(stored(store, level), before[level])


def test_about_one_sample_a_minute_with_some_crowded_buckets(store: Store) -> None:
    """The usual scrape interval: most 1m buckets hold one sample (each its own row on SQLite,
    no grouping), some two or three (grouped), some none; then a rewrite of a few."""
    rng = np.random.default_rng(11)
    start = BASE - timedelta(hours=6)
    times = every(start, timedelta(seconds=59), 600)  # every 59th minute holds two
    times += [start + timedelta(minutes=17, seconds=s) for s in (5, 25, 50)]  # a third
    for labels in LABELS:
        store.write_samples(frame("net", labels, times, eighths(rng, len(times))))
    store.rollup()
    assert_levels_match_raw(store)
    crowded = frame("net", LABELS[0], [start + timedelta(minutes=40, seconds=s) for s in
                    (1, 2, 59)], np.array([1.5, -2.0, 3.25]))  # fmt: skip
    store.write_samples(crowded)
    store.rollup()
    assert_levels_match_raw(store)
    got = stored(store, "1m")
    minute = datetime_to_us(start + timedelta(minutes=40))
    assert got.loc[got["bucket"] == minute, "count"].max() >= 3


def random_batch(store: Store, rng: np.random.Generator, hosts: list[str]) -> pd.DataFrame:
    """One batch of a random kind: a dense run, scattered points, a late run weeks back, or a
    rewrite of stored points (new values, some unchanged). Times may fall on bucket edges."""
    labels = {"host": hosts[int(rng.integers(len(hosts)))]}
    kind = rng.choice(["dense", "scattered", "late", "rewrite"])
    if kind == "rewrite":
        known = len(store.series("rnd")) > 0
        old = store.query("rnd", labels, *EVERYTHING) if known else pd.DataFrame()
        if len(old):
            pick = np.sort(rng.choice(len(old), size=min(len(old), int(rng.integers(1, 80))),
                                      replace=False))  # fmt: skip
            values = old["value"].to_numpy()[pick]
            values = np.where(rng.random(len(pick)) < 0.3, values, eighths(rng, len(pick)))
            return frame("rnd", labels, [t.to_pydatetime() for t in old["ts"].iloc[pick]], values)
        kind = "scattered"
    if kind == "scattered":
        offsets = rng.integers(0, 3 * 86_400_000_000, size=int(rng.integers(1, 40)))
        start = NOW - timedelta(days=3)
    else:
        step_us = int(rng.choice([1_000_000, 10_000_000, 37_000_000, 60_000_000, 300_000_000]))
        count = int(rng.integers(20, 1500))
        offsets = np.arange(count, dtype=np.int64) * step_us + int(rng.integers(0, 60_000_000))
        days_back = int(rng.integers(5, 35)) if kind == "late" else int(rng.integers(1, 3))
        start = NOW - timedelta(days=days_back, hours=int(rng.integers(0, 24)))
    offsets = np.unique(offsets)
    if rng.random() < 0.5:  # onto whole minutes: points on bucket edges
        offsets = np.unique(offsets - offsets % 60_000_000)
    times = [start + timedelta(microseconds=int(o)) for o in offsets]
    times = [t for t in times if t < NOW]
    return frame("rnd", labels, times, eighths(rng, len(times)))


@pytest.mark.parametrize("seed", range(6))
def test_random_writes_between_random_runs_end_as_a_full_recompute(store: Store, seed: int) -> None:
    """Oracle: every level recomputed from raw in pandas. Random batches of random shapes
    (dense, scattered, weeks late, rewrites) over a few series, with a rollup run (sometimes of
    a few chunks only) after some of them, so runs meet partly rolled-up and stale ranges."""
    rng = np.random.default_rng(9000 + seed)
    hosts = [f"h{k}" for k in range(int(rng.integers(1, 5)))]
    for _ in range(int(rng.integers(4, 10))):
        batch = random_batch(store, rng, hosts)
        if len(batch):
            store.write_samples(batch)
        if rng.random() < 0.5:
            store.rollup(max_chunks=int(rng.integers(1, 4)) if rng.random() < 0.3 else None)
    store.rollup()
    assert store.rollup_status().pending_ranges == 0
    assert_levels_match_raw(store)


def test_a_30_day_backfill_takes_many_small_transactions(store: Store) -> None:
    rng = np.random.default_rng(3)
    start = (NOW - timedelta(days=30)).replace(hour=0)
    times = every(start, timedelta(minutes=20), 30 * 72)
    store.write_samples(frame("disk", {"dev": "sda"}, times, eighths(rng, len(times))))
    store.settings = store.settings.model_copy(update={"rollup_chunk_hours": 24})
    assert store.rollup_status().lag_seconds is None
    first = store.rollup(max_chunks=2)
    assert first.chunks == 2 and first.pending_left == 1  # the one range, trimmed twice
    rest = store.rollup()
    assert rest.chunks == 30 - 2  # a day of pending range per transaction
    assert rest.pending_left == 0
    assert_levels_match_raw(store)
    lag = store.rollup_status().lag_seconds
    newest_end = times[-1].replace(second=0) + timedelta(minutes=1)
    assert lag is not None
    assert abs(lag - (datetime.now(UTC) - newest_end).total_seconds()) < 30


def test_two_runs_at_once_are_harmless(db_target: DbTarget, store: Store) -> None:
    ingest_everything(store)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            with Store.open(settings=store.settings) as other:
                other.rollup()
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert store.rollup_status().pending_ranges == 0
    assert_levels_match_raw(store)


def test_rollups_keep_working_over_compressed_chunks(db_target: DbTarget, store: Store) -> None:
    if db_target.name != "timescaledb":
        pytest.skip("compression is a TimescaleDB feature")
    ingest_everything(store)
    store.rollup()
    for table in ("samples", *(f"rollup_{lv}" for lv in LEVELS)):
        store.backend.execute(
            "SELECT compress_chunk(c, if_not_compressed => true) FROM show_chunks(%s::regclass) c",
            (table,),
        )
    compressed = store.backend.execute(
        "SELECT count(*) FROM timescaledb_information.chunks WHERE is_compressed"
    )[0][0]
    assert compressed > 0
    rng = np.random.default_rng(11)
    times = every(BASE + timedelta(seconds=1), timedelta(seconds=50), 200)
    store.write_samples(frame("cpu", LABELS[1], times, eighths(rng, len(times))))
    report = store.rollup()
    assert report.pending_left == 0 and report.levels["1m"].rows > 0
    assert_levels_match_raw(store)


def test_retention_task_compresses_old_rollup_chunks_too(
    db_target: DbTarget, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    if db_target.name != "timescaledb":
        pytest.skip("compression is a TimescaleDB feature")
    from tasks.retention import compress_chunks

    old = NOW - timedelta(days=20)
    rng = np.random.default_rng(5)
    times = every(old, timedelta(seconds=30), 600)
    store.write_samples(frame("cpu", LABELS[0], times, eighths(rng, len(times))))
    store.rollup()
    monkeypatch.setenv("METRICMILL_COMPRESS_AFTER_DAYS", "1")

    compressed = compress_chunks.fn(load_settings(database_url=db_target.url))

    per_table = dict(
        store.backend.execute(
            "SELECT hypertable_name, count(*) FROM timescaledb_information.chunks "
            "WHERE is_compressed GROUP BY hypertable_name"
        )
    )
    # samples chunks are a day, rollup_1m chunks a week: both lie wholly before yesterday.
    assert per_table.get("samples", 0) >= 1 and per_table.get("rollup_1m", 0) >= 1
    assert compressed == sum(per_table.values())
    # A late sample into the compressed range still rolls up to a full recompute.
    late = every(old + timedelta(seconds=7), timedelta(seconds=90), 50)
    store.write_samples(frame("cpu", LABELS[0], late, eighths(rng, len(late))))
    report = store.rollup()
    assert report.pending_left == 0 and report.levels["1m"].rows > 0
    assert_levels_match_raw(store)


def test_written_rows_with_a_limit_are_the_newest(store: Store) -> None:
    ingest_everything(store)
    store.rollup()
    span = [tuple(datetime_to_us(t) for t in EVERYTHING)]
    for level in ("1m", "5m"):
        everything = written_rows(store.backend, level, span, limit=10_000_000)
        for limit in (1, 7, 50):
            newest = written_rows(store.backend, level, span, limit=limit)
            assert len(newest) == limit
            top = sorted(everything["bucket"], reverse=True)[:limit]
            assert sorted(newest["bucket"], reverse=True) == top, (level, limit)


def test_first_and_last_are_exact_for_special_values(store: Store) -> None:
    """first/last are the stored values at the bucket's first and last ts, bit for bit: -0.0
    beside 0.0 (where the backend keeps the sign: SQLite stores -0.0 as 0), runs of equal
    values and extremes included, at every level and in a raw step query.
    (NaN and ±Inf never reach samples: ingestion rejects them.)"""
    big, tiny = 1e150, 1e-150  # squares stay normal (PostgreSQL raises on underflow)
    minute = BASE - timedelta(hours=3)
    buckets = [  # (seconds into the minute, value) per 1m bucket, written in shuffled order
        [(5, tiny), (20, 1.0), (50, -big)],
        [(0, -0.0), (30, 2.0), (59, 0.0)],
        [(1, 3.5), (2, 3.5), (3, 3.5)],
        [(10, big), (11, -tiny)],
        [(42, -0.0)],
        [(7, 0.0), (8, -big), (9, -0.0)],
    ]
    times = [minute + timedelta(minutes=k, seconds=s) for k, rows in enumerate(buckets)
             for s, _ in rows]  # fmt: skip
    values = np.array([v for rows in buckets for _, v in rows])
    order = np.random.default_rng(5).permutation(len(times))
    store.write_samples(frame("odd", {"host": "a"}, [times[i] for i in order], values[order]))
    store.rollup()
    ids = [int(i) for i in store.series()["series_id"]]
    start, end = (datetime_to_us(t) for t in EVERYTHING)
    raw = store.backend.raw_points(ids, start, end)
    kept = dict(zip(raw["ts_us"].astype("int64"), raw["value"].astype("float64"), strict=True))
    assert len(kept) == len(times)
    if store.backend.name != "sqlite":  # the servers keep -0.0 as written
        assert np.signbit(kept[datetime_to_us(times[3])])

    def bits(value: float) -> bytes:
        return np.float64(value).tobytes()

    for level in LEVELS:
        width = ROLLUP_LEVELS[level]
        got = stored(store, level)
        want = recompute(store, level)
        assert got["bucket"].tolist() == want["bucket"].tolist(), level
        for row in got.itertuples():
            inside = sorted(t for t in kept if t - t % width == row.bucket)
            assert (row.count, row.first_ts, row.last_ts) == (len(inside), inside[0], inside[-1])
            assert bits(row.first) == bits(kept[inside[0]]), (level, row.bucket, row.first)
            assert bits(row.last) == bits(kept[inside[-1]]), (level, row.bucket, row.last)
    assert len(stored(store, "1m")) == len(buckets)
    # A raw step query computes the same edges (stats straight from samples).
    first_minute = datetime_to_us(minute)
    raw_steps = step_stats(
        store.backend, "raw", ids, first_minute, first_minute + 6 * 60_000_000, 60_000_000
    )
    rolled = stored(store, "1m")
    assert raw_steps["ts_us"].tolist() == rolled["bucket"].tolist()
    for column in ("first", "last"):
        assert [bits(v) for v in raw_steps[column]] == [bits(v) for v in rolled[column]]
    # A step too wide for PostgreSQL's float offsets in the bucket (2^33 s) takes the window
    # statement there: one bucket, the same edges.
    wide = 2**33 * 1_000_000
    whole = step_stats(store.backend, "raw", ids, 0, wide, wide)
    assert whole["ts_us"].tolist() == [0] and int(whole["count"].iloc[0]) == len(times)
    assert bits(whole["first"].iloc[0]) == bits(kept[min(kept)])
    assert bits(whole["last"].iloc[0]) == bits(kept[max(kept)])


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # pandas' own sums
def test_values_at_the_edges_of_float8_roll_up_with_saturating_sums(store: Store) -> None:
    """Finite samples whose squares or sums leave float8 (1e200, ±1.5e308 twice) or vanish
    below it (5e-324, 1e-200) are stored and rolled up at every level without an error
    (PostgreSQL's float8 arithmetic raises on both): a sum past float8's range is clamped to
    ±FLOAT8_MAX, so every rollup column stays finite, a square below it is 0 as in IEEE
    arithmetic, and the bucket's other columns stay exact, as do other series in the same
    span. A raw step query over the same samples gives the same rows."""
    minute = BASE - timedelta(hours=5)
    buckets = [  # (seconds into the minute, value) per 1m bucket
        [(1, 1e200), (2, 1.0)],  # sum_sq overflows
        [(3, 1.5e308), (4, 1.5e308)],  # sum overflows
        [(5, -1.5e308), (6, -1.5e308), (7, 2.0)],
        [(8, 5e-324), (9, 1e-200)],  # squares underflow to 0
        [(10, 0.25), (11, 0.5)],  # an ordinary bucket in the same span
    ]
    times = [minute + timedelta(minutes=k, seconds=s) for k, rows in enumerate(buckets)
             for s, _ in rows]  # fmt: skip
    values = np.array([v for rows in buckets for _, v in rows])
    store.write_samples(frame("edge", {"host": "a"}, times, values))
    store.write_samples(frame("cpu", {"host": "a"}, every(minute, timedelta(seconds=10), 60),
                              eighths(np.random.default_rng(3), 60)))  # fmt: skip
    report = store.rollup()
    assert report.pending_left == 0
    kept = store.backend.raw_points([edge_id := series_id(store, "edge")], *span_us())
    assert sorted(kept["value"].tolist()) == sorted(values.tolist())  # stored exactly
    top = np.finfo(np.float64).max
    one_minute = stored(store, "1m")
    got = one_minute[one_minute["series_id"] == edge_id].reset_index(drop=True)
    assert got["count"].tolist() == [2, 2, 3, 2, 2]
    assert got["sum"].tolist() == [1e200, top, -top, 1e-200, 0.75]
    assert got["sum_sq"].tolist() == [top, top, top, 0.0, 0.3125]
    assert got["min"].tolist() == [1.0, 1.5e308, -1.5e308, 5e-324, 0.25]
    assert got["max"].tolist() == [1e200, 1.5e308, 2.0, 1e-200, 0.5]
    assert got["first"].tolist() == [1e200, 1.5e308, -1.5e308, 5e-324, 0.25]
    assert got["last"].tolist() == [1.0, 1.5e308, 2.0, 1e-200, 0.5]
    for level in LEVELS[1:]:  # one bucket of all 11 samples
        rows = stored(store, level)
        row = rows[rows["series_id"] == edge_id].iloc[0]
        assert (row["count"], row["min"], row["max"]) == (11, -1.5e308, 1.5e308), level
        assert np.isfinite(row["sum"]) and row["sum_sq"] == top, level
    others, want = (
        frame_[frame_["series_id"] != edge_id].reset_index(drop=True)
        for frame_ in (one_minute, recompute(store, "1m"))
    )
    for column in ("count", "sum", "sum_sq", "first", "last"):
        assert others[column].tolist() == want[column].tolist(), column
    start = datetime_to_us(minute)
    steps = step_stats(store.backend, "raw", [edge_id], start, start + 5 * 60_000_000, 60_000_000)
    assert steps["sum"].tolist() == got["sum"].tolist()
    assert steps["sum_sq"].tolist() == got["sum_sq"].tolist()


def series_id(store: Store, metric: str) -> int:
    series = store.series()
    return int(series.loc[series["metric"] == metric, "series_id"].iloc[0])


def span_us() -> tuple[int, int]:
    start, end = (datetime_to_us(t) for t in EVERYTHING)
    return start, end
