"""Backend.read_columns: typed numpy columns, ordered by the first two, on every backend.

On PostgreSQL the result travels as one COPY BINARY row of arrays; NULLs and the 1 GB array
limit fall back to ordinary rows. These tests check the values, the order and the fallback
against what a plain SELECT returns.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from metricmill.types import datetime_to_us
from storage.store import Store
from tests.dbtargets import DbTarget

T0 = datetime(2024, 5, 1, tzinfo=UTC)


@pytest.fixture
def store(db_target: DbTarget) -> Iterator[Store]:
    with Store.open(db_target.url, timescaledb=db_target.timescaledb) as opened:
        # Written out of order, two series interleaved, so the physical order is not the answer.
        rows = [
            {
                "metric": "m",
                "labels": {"host": host},
                "ts": T0 + timedelta(seconds=s),
                "value": value,
            }
            for s, host, value in [
                (120, "b", -2.5),
                (0, "a", 1.0),
                (60, "b", 1e300),
                (60, "a", 2.0),
                (0, "b", -0.0),
                (120, "a", 3.25),
            ]
        ]
        opened.write_samples(rows)
        yield opened


def series_ids(store: Store) -> dict[str, int]:
    return {labels["host"]: int(sid) for sid, _, labels in store.backend.find_series("m")}


def test_raw_points_typed_and_ordered(store: Store) -> None:
    ids = series_ids(store)
    start = datetime_to_us(T0)
    points = store.backend.raw_points(sorted(ids.values()), start, start + 10**9)
    assert points["series_id"].dtype == np.int64 and points["ts_us"].dtype == np.int64
    assert points["value"].dtype == np.float64
    a, b = ids["a"], ids["b"]
    expected_ids = [min(a, b)] * 3 + [max(a, b)] * 3
    assert points["series_id"].tolist() == expected_ids
    offsets = (points["ts_us"] - start) // 1_000_000
    assert offsets.tolist() == [0, 60, 120, 0, 60, 120]
    by_host = {
        host: points.loc[points["series_id"] == sid, "value"].tolist() for host, sid in ids.items()
    }
    assert by_host["b"] == [-0.0, 1e300, -2.5]
    assert by_host["a"] == [1.0, 2.0, 3.25]


def test_timestamps_exact_to_the_microsecond(store: Store) -> None:
    moment = datetime(2031, 7, 9, 3, 4, 5, 678901, tzinfo=UTC)
    store.write_samples([{"metric": "m", "labels": {"host": "c"}, "ts": moment, "value": 7.0}])
    sid = series_ids(store)["c"]
    us = datetime_to_us(moment)
    points = store.backend.raw_points([sid], us - 1, us + 1)
    assert points["ts_us"].tolist() == [us]


def test_empty_result_has_typed_empty_columns(store: Store) -> None:
    points = store.backend.raw_points([999_999], 0, 10)
    assert len(points) == 0
    assert points["ts_us"].dtype == np.int64 and points["value"].dtype == np.float64


def test_nulls_fall_back_and_match_a_plain_select(store: Store) -> None:
    backend = store.backend
    ids = sorted(series_ids(store).values())
    # A LEFT JOIN that leaves NULLs in one column: the fixed binary layout cannot hold them.
    template = (
        "SELECT {columns} FROM series s LEFT JOIN samples x ON x.series_id = s.series_id "
        f"AND x.value > 1e10 WHERE s.series_id {backend.ids_in}"
    )
    got = backend.read_columns(
        template,
        [("series_id", "s.series_id", "int"), ("value", "x.value", "float")],
        (backend.id_list(ids),),
    )
    # Only "b" has a value above 1e10 (1e300); "a" joins nothing and reads NULL.
    values = dict(zip(got["series_id"].tolist(), got["value"].tolist(), strict=True))
    hosts = series_ids(store)
    assert len(got["series_id"]) == 2
    assert values[hosts["b"]] == 1e300
    assert np.isnan(values[hosts["a"]])


def test_null_column_values_become_nan(store: Store) -> None:
    backend = store.backend
    ids = sorted(series_ids(store).values())
    template = (
        "SELECT {columns} FROM series s LEFT JOIN samples x ON x.series_id = s.series_id "
        f"AND x.value > 1e301 WHERE s.series_id {backend.ids_in}"
    )
    got = backend.read_columns(
        template,
        [("series_id", "s.series_id", "int"), ("value", "x.value", "float")],
        (backend.id_list(ids),),
    )
    assert got["series_id"].tolist() == ids
    assert np.isnan(got["value"]).all()


def test_a_keyed_read_finds_its_series_by_key_whatever_the_planner_prices(
    store: Store, db_target: DbTarget
) -> None:
    """Baselines and detection read chunks of series (`by_key`). Where the planner prices a
    scan of the whole table below the key lookups (a big table written in time order), every
    chunk would read all of it; a keyed read turns sequential scans off for its statement and
    gives the caller's setting back."""
    if db_target.name == "sqlite":
        pytest.skip("SQLite's planner takes the primary key for a list of series")
    backend = store.backend
    ids = sorted(series_ids(store).values())
    start = datetime_to_us(T0)
    # Prices that make a scan of the whole table the cheapest plan, as at 100,000 series.
    backend.execute("SET random_page_cost = 1000")
    backend.execute("SET cpu_index_tuple_cost = 100")
    template = (
        f"SELECT {{columns}} FROM samples WHERE series_id {backend.ids_in} "
        f"AND ts >= {backend.ts_in} AND ts < {backend.ts_in}"
    )
    columns = [("series_id", "series_id", "int"), ("ts_us", "ts", "ts")]
    params = (backend.id_list(ids[:1]), start, start + 10**9)

    def scans() -> int:  # this backend's counts not yet flushed, samples and its chunks
        return int(
            backend.execute(
                "SELECT coalesce(sum(seq_scan), 0) FROM pg_stat_xact_user_tables "
                "WHERE relname = 'samples' OR relid IN (SELECT inhrelid FROM pg_inherits "
                "WHERE inhparent = 'samples'::regclass)"
            )[0][0]
        )

    def sequential_scans(by_key: bool) -> tuple[int, dict[str, np.ndarray]]:
        # Counted within one transaction (the read takes a savepoint in it): no flush between.
        with backend.transaction():
            before = scans()
            got = backend.read_columns(template, columns, params, by_key=by_key)
            after = scans()
            assert backend.execute("SHOW enable_seqscan")[0][0] == "on"
        return after - before, got

    scanned, plain = sequential_scans(False)
    assert scanned > 0  # the prices do pick the scan: the check below could fail
    scanned, keyed = sequential_scans(True)
    assert scanned == 0
    assert keyed["series_id"].tolist() == plain["series_id"].tolist() == [ids[0]] * 3
    assert keyed["ts_us"].tolist() == plain["ts_us"].tolist()
    backend.execute("SET enable_seqscan = off")  # the caller's own setting survives the read
    with backend.transaction():
        backend.read_columns(template, columns, params, by_key=True)
        assert backend.execute("SHOW enable_seqscan")[0][0] == "off"
