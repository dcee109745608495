"""Several batches written together (`Store.write_sample_parts`, as the ingest flow writes a
group of landed files): one transaction, yet each part is its own exactly-once batch with its
own ledger row, counts, quarantined rows, rollup ranges and cardinality guard."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import numpy as np
import pandas as pd
import pytest

from storage.postgres import TimescaleMode
from storage.store import Store
from tests.dbtargets import DbTarget

T0 = datetime(2024, 5, 1, 10, 0, tzinfo=UTC)
WINDOW = (T0 - timedelta(days=1), T0 + timedelta(days=1))
LEDGER = "source, status, rows_in, written, overwritten, unchanged, quarantined, new_series"


@pytest.fixture
def store(db_target: DbTarget) -> Iterator[Store]:
    mode = cast(TimescaleMode, db_target.timescaledb)
    with Store.open(db_target.url, timescaledb=mode) as opened:
        yield opened


def sample(metric: str, seconds: float, value: float, **labels: str) -> dict[str, Any]:
    return {
        "metric": metric,
        "labels": labels,
        "ts": T0 + timedelta(seconds=seconds),
        "value": value,
    }


def parts_frame(*parts: list[dict[str, Any]]) -> tuple[pd.DataFrame, np.ndarray]:
    rows = [row for part in parts for row in part]
    numbers = np.repeat(np.arange(len(parts)), [len(part) for part in parts])
    return pd.DataFrame(rows), numbers


def write(
    store: Store,
    *parts: list[dict[str, Any]],
    ids: list[str],
    rejected: list[list[tuple[dict[str, Any], str]]] | None = None,
    limit: int | None = None,
) -> list[Any]:
    frame, numbers = parts_frame(*parts)
    return store.write_sample_parts(
        frame,
        parts=numbers,
        batch_ids=ids,
        sources=[f"file:{i}" for i in ids],
        rejected=rejected or [],
        max_new_series=limit,
    )


def ledger(store: Store, batch_id: str) -> tuple[Any, ...] | None:
    rows = store.backend.execute(
        f"SELECT {LEDGER} FROM ingest_batches WHERE batch_id = %s",
        (batch_id,),
    )
    return tuple(rows[0]) if rows else None


def stored(store: Store, metric: str) -> list[tuple[str, datetime, float]]:
    frame = store.query(metric, None, *WINDOW)
    return sorted(
        (labels.get("host", ""), ts.to_pydatetime(), value)
        for labels, ts, value in zip(frame["labels"], frame["ts"], frame["value"], strict=True)
    )


def count(store: Store, table: str) -> int:
    return int(store.backend.execute(f"SELECT count(*) FROM {table}")[0][0])


def test_each_part_is_its_own_batch_with_its_counts_and_ledger_row(store: Store) -> None:
    first = [sample("cpu", 0, 1.0, host="a"), sample("cpu", 0, 2.0, host="b")]
    second = [
        sample("cpu", 60, 3.0, host="b"),  # a series the first part creates
        sample("cpu", 0, 4.0, host="c"),
        sample("cpu", 60, float("nan"), host="c"),
    ]
    malformed = ({"line": 9, "text": "{oops"}, "malformed_line")

    reports = write(store, first, second, ids=["p0", "p1"], rejected=[[], [malformed]])

    assert [(r.rows_in, r.written, r.new_series, r.replay) for r in reports] == [
        (2, 2, 2, False),
        (4, 2, 1, False),
    ]
    assert reports[1].rejected == Counter({"non_finite_value": 1, "malformed_line": 1})
    assert (reports[1].min_ts, reports[1].max_ts) == (T0, T0 + timedelta(seconds=60))
    assert ledger(store, "p0") == ("file:p0", "committed", 2, 2, 0, 0, 0, 2)
    assert ledger(store, "p1") == ("file:p1", "committed", 4, 2, 0, 0, 2, 1)
    quarantine = store.quarantine(limit=10)
    assert sorted(zip(quarantine["batch_id"], quarantine["reason"], strict=True)) == [
        ("p1", "malformed_line"),
        ("p1", "non_finite_value"),
    ]
    pending = store.backend.execute("SELECT DISTINCT batch_id FROM rollup_pending")
    assert {row[0] for row in pending} == {"p0", "p1"}
    assert stored(store, "cpu") == [
        ("a", T0, 1.0),
        ("b", T0, 2.0),
        ("b", T0 + timedelta(seconds=60), 3.0),
        ("c", T0, 4.0),
    ]

    # The same parts again: every one a replay, nothing written, no new ledger row.
    again = write(store, first, second, ids=["p0", "p1"], rejected=[[], [malformed]])
    assert [(r.replay, r.written) for r in again] == [(True, 0), (True, 0)]
    assert count(store, "samples") == 4
    assert count(store, "ingest_batches") == 2
    assert count(store, "quarantine") == 2


def test_a_committed_part_is_a_replay_while_the_others_land(store: Store) -> None:
    old = [sample("mem", 0, 1.0, host="a")]
    store.write_samples(pd.DataFrame(old), source="file:old", batch_id="old")
    new = [sample("mem", 60, 2.0, host="a"), sample("mem", 0, 5.0, host="z")]

    reports = write(store, old, new, ids=["old", "new"])

    assert [(r.replay, r.written, r.new_series) for r in reports] == [(True, 0, 0), (False, 2, 1)]
    assert stored(store, "mem") == [
        ("a", T0, 1.0),
        ("a", T0 + timedelta(seconds=60), 2.0),
        ("z", T0, 5.0),
    ]
    assert ledger(store, "new") == ("file:new", "committed", 2, 2, 0, 0, 0, 1)


def test_a_later_part_overwrites_an_earlier_one_as_in_sequence(store: Store) -> None:
    reports = write(
        store,
        [sample("disk", 0, 1.0, host="a")],
        [sample("disk", 0, 2.0, host="a"), sample("disk", 60, 3.0, host="a")],
        [sample("disk", 60, 3.0, host="a")],
        ids=["d0", "d1", "d2"],
    )

    assert [(r.written, r.overwritten, r.unchanged) for r in reports] == [
        (1, 0, 0),
        (1, 1, 0),
        (0, 0, 1),
    ]
    assert stored(store, "disk") == [("a", T0, 2.0), ("a", T0 + timedelta(seconds=60), 3.0)]


def test_the_cardinality_guard_quarantines_only_the_part_over_the_limit(store: Store) -> None:
    within = [sample("net", 0, 1.0, host="x"), sample("net", 0, 1.0, host="y")]
    over = [sample("net", 0, 1.0, host=h) for h in ("p", "q", "r")]
    known = [sample("net", 60, 2.0, host="x"), sample("net", 60, 2.0, host="y")]

    reports = write(store, within, over, known, ids=["n0", "n1", "n2"], limit=2)

    assert [r.guarded_new_series for r in reports] == [0, 3, 0]
    assert [(r.written, r.new_series) for r in reports] == [(2, 2), (0, 0), (2, 0)]
    assert reports[1].rejected == Counter({"cardinality_limit": 3})
    assert store.stats()["series"] == 2
    assert ledger(store, "n1") == ("file:n1", "quarantined", 3, 0, 0, 0, 3, 0)
    entry = store.quarantine(limit=10)
    assert entry["reason"].tolist() == ["cardinality_limit"]
    assert len(entry["row"].iloc[0]["samples"]) == 3
    assert stored(store, "net") == [
        ("x", T0, 1.0),
        ("x", T0 + timedelta(seconds=60), 2.0),
        ("y", T0, 1.0),
        ("y", T0 + timedelta(seconds=60), 2.0),
    ]
    # raised limit: the guarded part lands on its own later
    landed = write(store, over, ids=["n1"], limit=10)
    assert (landed[0].written, landed[0].new_series) == (3, 3)


def test_overlapping_parts_store_each_value_under_its_own_series(store: Store) -> None:
    # part 0 = {a=1, b=2}, part 1 = {b=20, c=30}, all at T0: b is overwritten by part 1
    reports = write(
        store,
        [sample("k", 0, 1.0, host="a"), sample("k", 0, 2.0, host="b")],
        [sample("k", 0, 20.0, host="b"), sample("k", 0, 30.0, host="c")],
        ids=["p0", "p1"],
    )

    assert stored(store, "k") == [("a", T0, 1.0), ("b", T0, 20.0), ("c", T0, 30.0)]
    assert [(r.written, r.overwritten, r.new_series) for r in reports] == [(2, 0, 2), (1, 1, 1)]
    assert ledger(store, "p1") == ("file:p1", "committed", 2, 1, 1, 0, 0, 1)


def test_a_part_overwriting_one_series_of_an_earlier_part(store: Store) -> None:
    # parts [0, 0, 1]: part 1 only overwrites b
    reports = write(
        store,
        [sample("k", 0, 1.0, host="a"), sample("k", 0, 2.0, host="b")],
        [sample("k", 0, 20.0, host="b")],
        ids=["q0", "q1"],
    )

    assert stored(store, "k") == [("a", T0, 1.0), ("b", T0, 20.0)]
    assert [(r.written, r.overwritten, r.unchanged) for r in reports] == [(2, 0, 0), (0, 1, 0)]


def test_many_layers_of_overwrites_end_with_the_last_part(store: Store) -> None:
    parts = [[sample("k", 0, float(n), host="a"), sample("k", n, 1.0, host="b")] for n in range(6)]
    reports = write(store, *parts, ids=[f"m{n}" for n in range(6)])

    assert stored(store, "k")[0] == ("a", T0, 5.0)
    assert [r.overwritten for r in reports] == [0, 1, 1, 1, 1, 1]
    assert sum(r.written for r in reports) == 1 + 6


def test_a_part_repeating_an_earlier_parts_content_is_its_replay(store: Store) -> None:
    first = [sample("k", 0, 1.0, host="a")]
    reports = write(store, first, [sample("k", 0, 2.0, host="a")], first, ids=["r0", "r1", "r0"])

    assert [r.replay for r in reports] == [False, False, True]
    assert stored(store, "k") == [("a", T0, 2.0)]
    assert count(store, "ingest_batches") == 2


@pytest.mark.parametrize("seed", range(8))
def test_random_overlapping_parts_match_writing_them_one_by_one(store: Store, seed: int) -> None:
    """Oracle: a dict applied part by part. Random parts over few series and times, so most
    keys are shared; some values repeat the stored one (unchanged), some series are new."""
    rng = np.random.default_rng(seed)
    expected: dict[tuple[str, datetime], float] = {}
    for round_ in range(3):
        parts = []
        for _ in range(int(rng.integers(1, 6))):
            keys = {
                (str(h), int(t)) for h, t in rng.integers(0, 5, size=(int(rng.integers(1, 12)), 2))
            }
            parts.append([sample("z", t * 60, float(rng.integers(0, 3)), host=h) for h, t in keys])
        ids = [f"s{seed}-{round_}-{n}" for n in range(len(parts))]
        reports = write(store, *parts, ids=ids)
        for part, report in zip(parts, reports, strict=True):
            assert not report.replay
            changed = 0
            for row in part:
                key = (row["labels"]["host"], row["ts"])
                changed += key in expected and expected[key] != row["value"]
                expected[key] = row["value"]
            assert report.overwritten == changed
        assert stored(store, "z") == sorted((h, ts, v) for (h, ts), v in expected.items())
