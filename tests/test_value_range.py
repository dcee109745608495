"""Values at the edge of float8: the rollups keep a sum of squares, and PostgreSQL raises
(overflow, underflow) instead of rounding, so one sample like 1e200 or 5e-324 used to fail every
rollup run at its range. Such values are quarantined as `value_out_of_range` on every backend;
values at the bounds are stored and rolled up exactly."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from metricmill.types import Reason
from storage.normalise import VALUE_MAX, VALUE_MIN
from storage.store import Store
from tests.dbtargets import DbTarget

START = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(hours=2)
KEPT = [VALUE_MAX, -VALUE_MAX, VALUE_MIN, -VALUE_MIN, 0.0, 1.5]
REFUSED = [1e200, -1e200, 1e151, 5e-324, -2e-162, 1e-151]


def _rows(values: list[float], host: str) -> list[dict[str, object]]:
    return [
        {"metric": "edge_value", "labels": {"host": host}, "ts": START + timedelta(seconds=i),
         "value": v}
        for i, v in enumerate(values)
    ]  # fmt: skip


def test_values_the_rollups_cannot_square_are_quarantined_and_the_rollup_runs(
    db_target: DbTarget,
) -> None:
    with Store.open(db_target.url, timescaledb=db_target.timescaledb) as store:  # type: ignore[arg-type]
        report = store.write_samples(_rows(KEPT, "kept") + _rows(REFUSED, "refused"), source="t")
        assert report.written == len(KEPT)
        assert report.rejected == {Reason.VALUE_OUT_OF_RANGE: len(REFUSED)}
        quarantined = store.quarantine(limit=100)
        assert sorted(quarantined["reason"]) == [Reason.VALUE_OUT_OF_RANGE] * len(REFUSED)

        rolled = store.rollup()  # raised "value out of range" on PostgreSQL before
        assert rolled.pending_left == 0
        stats = store.query("edge_value", {"host": "kept"}, START, START + timedelta(minutes=1),
                            step="1m", agg="count")  # fmt: skip
        assert stats["value"].sum() == len(KEPT)
        got = store.query("edge_value", {"host": "kept"}, START, START + timedelta(minutes=1))
        np.testing.assert_array_equal(got["value"].to_numpy(), np.array(KEPT))
        assert store.query(
            "edge_value", {"host": "refused"}, START, START + timedelta(hours=1)
        ).empty


@pytest.mark.parametrize("bound", [VALUE_MAX, VALUE_MIN])
def test_the_bounds_square_to_normal_numbers(bound: float) -> None:
    square = np.float64(bound) * np.float64(bound)
    assert np.isfinite(square) and square >= np.finfo(np.float64).tiny
