"""The ingest-batch quality contract: real Great Expectations runs on small frames."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pandas as pd
import pytest

from expectations.ingest_batch import (
    CHECKS,
    SUITE_NAME,
    SUITE_VERSION,
    BatchUnusable,
    QualityLimits,
    build_suite,
)
from metricmill.types import Reason
from tasks.quality import QualityResult, validate_batch, validate_batch_pandas

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
LIMITS = QualityLimits(now=NOW)
RECENT = pd.Timestamp(NOW) - pd.Timedelta(minutes=5)


def sample(
    metric: str = "cpu_seconds_total",
    labels: Any = None,
    ts: Any = RECENT,
    value: float = 1.0,
) -> dict[str, Any]:
    return {
        "metric": metric,
        "labels": {"host": "a"} if labels is None else labels,
        "ts": ts,
        "value": value,
    }


def frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    df["ts"] = pd.to_datetime(df["ts"], utc=True).astype("datetime64[us, UTC]")
    df["value"] = df["value"].astype("float64")
    return df


GOOD = [
    sample(),
    sample(metric="node:load1", labels={"host": "b", "job": "node"}, value=0.5),
    sample(metric="up", labels={}, value=1.0),
]

BAD_CASES = {
    "bad metric name": (sample(metric="cpu usage"), Reason.INVALID_METRIC_NAME),
    "metric with trailing newline": (sample(metric="cpu\n"), Reason.INVALID_METRIC_NAME),
    "NaN value": (sample(value=float("nan")), Reason.NON_FINITE_VALUE),
    "+inf value": (sample(value=float("inf")), Reason.NON_FINITE_VALUE),
    "-inf value": (sample(value=float("-inf")), Reason.NON_FINITE_VALUE),
    "ts in 2099": (sample(ts="2099-01-01T00:00:00Z"), Reason.TIMESTAMP_IN_FUTURE),
    "ts 60 days old": (
        sample(ts=RECENT - pd.Timedelta(days=60)),
        Reason.TIMESTAMP_TOO_OLD,
    ),
    "missing ts": (sample(ts=None), Reason.INVALID_TIMESTAMP),
    "40 labels": (
        sample(labels={f"k{i}": "v" for i in range(40)}),
        Reason.TOO_MANY_LABELS,
    ),
    "200-char label key": (sample(labels={"k" * 200: "v"}), Reason.LABEL_NAME_TOO_LONG),
    "1 MB label value": (
        sample(labels={"blob": "x" * (1 << 20)}),
        Reason.LABEL_VALUE_TOO_LONG,
    ),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_each_bad_row_is_rejected_with_its_reason_and_good_rows_survive(case: str) -> None:
    bad_row, reason = BAD_CASES[case]
    df = frame([GOOD[0], bad_row, *GOOD[1:]])

    result = validate_batch(df, LIMITS)

    assert [r for _, r in result.rejected] == [reason]
    raw, _ = result.rejected[0]
    assert raw["metric"] == bad_row["metric"]
    json.dumps(raw)  # JSON-safe
    assert list(result.good.index) == [0, 2, 3]
    assert list(result.good.columns) == list(df.columns)  # no helper columns
    assert result.good["metric"].tolist() == [g["metric"] for g in GOOD]
    assert result.summary["rows_rejected"] == 1
    assert result.summary["rejected_by_reason"] == {reason: 1}


def test_conflicting_values_for_same_series_and_ts_are_both_rejected() -> None:
    df = frame(
        [
            sample(labels={"host": "a", "job": "x"}, value=1.0),
            sample(labels={"job": "x", "host": "a"}, value=2.0),  # same series, other key order
            sample(labels={"host": "b"}, value=3.0),  # other series: fine
            sample(value=4.0, ts=RECENT - pd.Timedelta(seconds=1)),  # other ts: fine
        ]
    )
    result = validate_batch(df, LIMITS)
    assert [r for _, r in result.rejected] == [Reason.CONFLICTING_VALUES] * 2
    assert [raw["value"] for raw, _ in result.rejected] == [1.0, 2.0]
    assert list(result.good.index) == [2, 3]


def test_identical_duplicate_rows_are_not_conflicting() -> None:
    df = frame([sample(value=7.0), sample(value=7.0), sample(value=7.0)])
    result = validate_batch(df, LIMITS)
    assert result.rejected == []
    assert len(result.good) == 3
    assert result.summary["success"] is True


def test_a_non_finite_duplicate_does_not_make_the_finite_row_conflicting() -> None:
    df = frame([sample(value=1.0), sample(value=float("nan"))])
    result = validate_batch(df, LIMITS)
    assert [r for _, r in result.rejected] == [Reason.NON_FINITE_VALUE]
    assert list(result.good.index) == [0]


def test_first_failing_expectation_in_suite_order_names_the_reason() -> None:
    # bad name, NaN, future ts and too many labels at once: the metric check comes first
    row = sample(
        metric="9lives",
        value=float("nan"),
        ts="2099-01-01T00:00:00Z",
        labels={f"k{i}": "v" for i in range(40)},
    )
    result = validate_batch(frame([row, GOOD[0]]), LIMITS)
    assert [r for _, r in result.rejected] == [Reason.INVALID_METRIC_NAME]
    counts = [e["unexpected_count"] for e in result.summary["expectations"]]
    # regex, value not null, value finite, ts not null, ts window, label limits, conflicts
    assert counts == [1, 1, 0, 0, 1, 1, 0]


def mixed_frame() -> pd.DataFrame:
    rng = np.random.default_rng(7)
    rows = [
        sample(
            metric=str(rng.choice(["cpu", "mem", "disk_io", "net:rx"])),
            labels={"host": f"h{rng.integers(0, 5)}"},
            ts=RECENT - pd.Timedelta(seconds=int(rng.integers(0, 3600))),
            value=float(rng.normal()),
        )
        for _ in range(300)
    ]
    for bad_row, _ in BAD_CASES.values():
        rows.insert(int(rng.integers(0, len(rows))), dict(bad_row))
    # a conflicting pair and an identical pair
    rows += [sample(metric="pair", value=1.0), sample(metric="pair", value=2.0)]
    rows += [sample(metric="same", value=3.0), sample(metric="same", value=3.0)]
    df = frame(rows)
    df.index = pd.Index(range(1000, 1000 + len(df)))  # not a RangeIndex from 0
    return df


def test_gx_and_pandas_cross_check_agree_on_a_mixed_frame() -> None:
    df = mixed_frame()
    gx_result = validate_batch(df, LIMITS)
    pd_result = validate_batch_pandas(df, LIMITS)

    assert gx_result.rejected == pd_result.rejected
    assert gx_result.good.index.equals(pd_result.good.index)
    gx_counts = [
        (e["column"], e["reason"], e["unexpected_count"], e["success"])
        for e in gx_result.summary["expectations"]
    ]
    pd_counts = [
        (e["column"], e["reason"], e["unexpected_count"], e["success"])
        for e in pd_result.summary["expectations"]
    ]
    assert gx_counts == pd_counts
    assert gx_result.summary["rejected_by_reason"] == pd_result.summary["rejected_by_reason"]
    expected = len(BAD_CASES) + 2  # every bad case + the conflicting pair
    assert gx_result.summary["rows_rejected"] == expected
    assert gx_result.summary["rows_good"] == len(df) - expected


def test_missing_required_column_makes_the_batch_unusable() -> None:
    df = frame(GOOD).drop(columns=["value"])
    with pytest.raises(BatchUnusable, match="value"):
        validate_batch(df, LIMITS)
    with pytest.raises(BatchUnusable, match="value"):
        validate_batch_pandas(df, LIMITS)


def test_summary_and_markdown_report_counts() -> None:
    df = frame([*GOOD, BAD_CASES["NaN value"][0], BAD_CASES["bad metric name"][0]])
    result = validate_batch(df, LIMITS)
    s = result.summary
    assert (s["suite"], s["suite_version"]) == (SUITE_NAME, SUITE_VERSION)
    assert (s["rows_in"], s["rows_good"], s["rows_rejected"]) == (5, 3, 2)
    assert s["success"] is False
    assert len(s["expectations"]) == len(CHECKS)
    for entry, check in zip(s["expectations"], CHECKS, strict=True):
        assert (entry["expectation_type"], entry["column"], entry["reason"]) == (
            check.expectation_type,
            check.column,
            check.reason,
        )
    failed = {e["reason"]: e["unexpected_count"] for e in s["expectations"] if not e["success"]}
    assert failed == {Reason.INVALID_METRIC_NAME: 1, Reason.NON_FINITE_VALUE: 1}

    md = result.markdown()
    assert "rejected: **2**" in md and "good: **3**" in md
    assert "| invalid_metric_name | 1 |" in md
    assert "| non_finite_value | 1 |" in md
    assert md.count("\n| ") >= len(CHECKS)


def test_quarantine_row_is_source_row_when_given() -> None:
    df = frame([GOOD[0], BAD_CASES["NaN value"][0]])
    df["source_row"] = [{"line": 1}, {"line": 2, "raw": "{...}"}]
    result = validate_batch(df, LIMITS)
    assert result.rejected == [({"line": 2, "raw": "{...}"}, Reason.NON_FINITE_VALUE)]
    assert "source_row" in result.good.columns


def test_window_follows_limits_now_with_one_cached_suite() -> None:
    df = frame([sample(ts=RECENT)])
    later = QualityLimits(now=NOW + timedelta(days=40))
    assert hash(later) == hash(LIMITS) and later == LIMITS  # `now` is not part of the cache key
    assert validate_batch(df, LIMITS).rejected == []
    assert [r for _, r in validate_batch(df, later).rejected] == [Reason.TIMESTAMP_TOO_OLD]
    earlier = QualityLimits(now=NOW - timedelta(days=1))
    assert [r for _, r in validate_batch(df, earlier).rejected] == [Reason.TIMESTAMP_IN_FUTURE]


def test_custom_label_limits() -> None:
    limits = QualityLimits(now=NOW, max_labels=2, max_label_name_length=4, max_label_value_length=3)
    df = frame(
        [
            sample(labels={"a": "1", "b": "2"}),
            sample(labels={"a": "1", "b": "2", "c": "3"}),
            sample(labels={"abcde": "1"}),
            sample(labels={"a": "1234"}),
        ]
    )
    expected = [
        Reason.TOO_MANY_LABELS,
        Reason.LABEL_NAME_TOO_LONG,
        Reason.LABEL_VALUE_TOO_LONG,
    ]
    assert [r for _, r in validate_batch(df, limits).rejected] == expected
    assert [r for _, r in validate_batch_pandas(df, limits).rejected] == expected


def test_suite_as_code_matches_declared_checks() -> None:
    suite = build_suite(LIMITS)
    assert suite.name == SUITE_NAME
    assert suite.meta["suite_version"] == SUITE_VERSION
    declared = [(e.expectation_type, e.column, e.meta["reason"]) for e in suite.expectations]
    assert declared == [(c.expectation_type, c.column, c.reason) for c in CHECKS]


def test_empty_batch() -> None:
    df = frame([GOOD[0]]).iloc[:0]
    result = validate_batch(df, LIMITS)
    assert result.rejected == [] and len(result.good) == 0
    assert result.summary["rows_in"] == 0


def test_result_type() -> None:
    assert isinstance(validate_batch_pandas(frame(GOOD), LIMITS), QualityResult)


GX_QUIET_PROBE = """
import logging, sys
from datetime import UTC, datetime
import pandas as pd
logging.basicConfig(level=logging.INFO)  # what a flow run's logging lets through
if sys.argv[1] == "verbose":
    logging.getLogger("great_expectations").setLevel(logging.INFO)
from tasks.quality import validate_batch
row = {"metric": "up", "labels": {}, "ts": datetime.now(UTC), "value": 1.0}
assert len(validate_batch(pd.DataFrame([row])).good) == 1
"""


@pytest.mark.parametrize("mode", ["default", "verbose"])
def test_gx_info_lines_only_when_asked_for(mode: str) -> None:
    import subprocess
    import sys
    from pathlib import Path

    done = subprocess.run(
        [sys.executable, "-c", GX_QUIET_PROBE, mode],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert ("ephemeral docs site" in done.stderr) is (mode == "verbose"), done.stderr
    assert ("INFO:great_expectations" in done.stderr) is (mode == "verbose"), done.stderr


def test_text_columns_are_the_names_of_their_codes() -> None:
    """The check's text columns (metric, label-limit code) are built in Arrow from codes: each
    row gets its code's name, -1 is missing, and the dtype is pandas' text one."""
    from storage.normalise import text_column

    codes = np.array([2, 0, -1, 1, 2, 0], dtype=np.int64)
    got = text_column(["cpu", "", "mem"], codes)
    want = pd.Series(["mem", "cpu", None, "", "mem", "cpu"], dtype="str")
    pd.testing.assert_series_equal(got, want)
    assert got.isna().tolist() == [False, False, True, False, False, False]
    assert text_column(["x"], np.zeros(0, dtype=np.int64)).empty
