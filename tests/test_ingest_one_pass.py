"""Ingestion in one pass: a batch is read once, judged once, and the write checks nothing.

The rules have one definition (`expectations.ingest_batch.CHECKS`): the GX suite and the pandas
twin are both built from it. Rows the tables cannot hold get the same reason whether they come
through the ingest rules or straight through `Store.write_samples`.
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

import storage.labels
import storage.normalise
import tasks.ingest_check
import tasks.quality
from expectations.ingest_batch import CHECKS, Check, build_suite, failing_rows, suite_parameters
from metricmill.settings import Settings, load_settings
from metricmill.types import Reason
from storage.store import Store
from tasks.ingest import SourceOutcome, _write, quality_limits
from tasks.quality import validate_batch, validate_batch_pandas

NOW = datetime.now(UTC).replace(microsecond=0)


def row(metric: Any = "cpu_seconds_total", labels: Any = None, **over: Any) -> dict[str, Any]:
    out = {"metric": metric, "labels": {"host": "a"} if labels is None else labels}
    out.update({"ts": (NOW - timedelta(minutes=5)).isoformat(), "value": 1.0})
    out.update(over)
    return out


# rows the tables cannot hold, that the suite's own rules let through
UNREADABLE = {
    "no metric": (row(metric=None), Reason.MISSING_METRIC),
    "NUL in a label value": (row(labels={"host": "a\x00b"}), Reason.NUL_CHARACTER),
    "lone surrogate in a label": (row(labels={"host": "\ud800"}), Reason.INVALID_UNICODE),
    "labels not an object": (row(labels="[1, 2]"), Reason.INVALID_LABELS),
    "label value an object": (row(labels={"host": {"a": 1}}), Reason.INVALID_LABELS),
}
GOOD = [row(labels={"host": "g1"}), row(labels={"host": "g2"}, value=2.0)]


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    settings = load_settings(home=str(tmp_path / "home"))
    settings.ensure_dirs()
    return settings


def _quarantined(settings: Settings, source: str) -> Counter[str]:
    with Store.open(settings=settings) as store:
        table = store.quarantine(limit=1000)
    return Counter(table.loc[table["source"] == source, "reason"].tolist())


def test_a_batch_is_read_once_and_the_write_checks_nothing(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: Counter[str] = Counter()

    def counted(name: str, real: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            calls[name] += 1
            return real(*args, **kwargs)

        return wrapper

    real_normalise = storage.normalise.normalise
    for module in (tasks.ingest_check, tasks.quality, storage.normalise):
        monkeypatch.setattr(module, "normalise", counted("normalise", real_normalise))
    monkeypatch.setattr(
        storage.normalise, "timestamps_us", counted("ts", storage.normalise.timestamps_us)
    )
    monkeypatch.setattr(
        storage.labels,
        "canonical_label_sets",
        counted("labels", storage.labels.canonical_label_sets),
    )
    frame = pd.DataFrame(
        [*GOOD, row(metric="bad name"), row(value="NaN"), *[r for r, _ in UNREADABLE.values()]],
        dtype=object,
    )
    outcome = SourceOutcome(source="programmatic", kind="programmatic")

    _write(settings, frame, outcome, batch_id=None, pre_rejected=[])

    # one reading of the batch (its times, its label sets), by the rules and the write alike
    assert calls == {"normalise": 1, "ts": 1, "labels": 1}
    assert (outcome.rows_in, outcome.written) == (len(frame), len(GOOD))
    expected = Counter(reason for _, reason in UNREADABLE.values())
    expected.update([Reason.INVALID_METRIC_NAME, Reason.NON_FINITE_VALUE])
    assert outcome.quarantined == expected
    assert _quarantined(settings, "programmatic") == expected


@pytest.mark.parametrize("case", list(UNREADABLE))
def test_rows_the_tables_cannot_hold_get_one_reason_on_both_paths(
    settings: Settings, case: str
) -> None:
    bad, reason = UNREADABLE[case]
    frame = pd.DataFrame([*GOOD, bad], dtype=object)
    outcome = SourceOutcome(source="through-the-rules", kind="programmatic")
    _write(settings, frame, outcome, batch_id=None, pre_rejected=[])
    with Store.open(settings=settings) as store:
        # (its own batch id: the same rows and reasons would be a replay of the first batch)
        direct = store.write_samples([*GOOD, bad], source="direct", batch_id="direct")

    assert outcome.quarantined == Counter({reason: 1}) == direct.rejected
    assert outcome.written == len(GOOD)
    assert _quarantined(settings, "through-the-rules") == {reason: 1}
    assert _quarantined(settings, "direct") == {reason: 1}


def test_the_rules_of_a_row_come_before_what_the_tables_cannot_hold(settings: Settings) -> None:
    # a bad metric name with a NUL label: the suite's reason, as before the one pass
    frame = pd.DataFrame([row(metric="bad name", labels={"h": "\x00"}), *GOOD], dtype=object)
    checked = validate_batch(frame, quality_limits(settings))
    verdict = tasks.ingest_check.verdict_of(checked)
    assert verdict.reasons.tolist() == [Reason.INVALID_METRIC_NAME, None, None]
    frame = pd.DataFrame([row(labels={"h": "\x00"}), *GOOD], dtype=object)
    verdict = tasks.ingest_check.judge(frame, quality_limits(settings))
    assert verdict.reasons.tolist() == [Reason.NUL_CHARACTER, None, None]


def test_the_gx_suite_is_the_declaration() -> None:
    suite = build_suite(quality_limits(load_settings()))
    built = [
        (e.expectation_type, e.column, e.meta["reason"], _arguments(e, check))
        for e, check in zip(suite.expectations, CHECKS, strict=True)
    ]
    assert built == [(c.expectation_type, c.column, c.reason, dict(c.arguments)) for c in CHECKS]


def _arguments(expectation: Any, check: Check) -> dict[str, Any]:
    return {name: getattr(expectation, name) for name in check.arguments}


def test_the_pandas_twin_reads_the_arguments_of_the_declaration() -> None:
    column = pd.Series(["up", "Up", "9up", None], dtype=object)
    parameters = suite_parameters(quality_limits(load_settings()))
    lower = Check("expect_column_values_to_match_regex", "metric", ("x",), {"regex": "^[a-z]+$"})
    assert failing_rows(lower, column, parameters).tolist() == [1, 2]  # a null is not matched
    anything = lower._replace(arguments={"regex": "."})
    assert failing_rows(anything, column, parameters).tolist() == []
    values = pd.Series([1.0, 5.0, np.nan, -3.0])
    between = Check(
        "expect_column_values_to_be_between", "value", ("x",), {"min_value": 0.0, "max_value": 2.0}
    )
    assert failing_rows(between, values, parameters).tolist() == [1, 3]
    with pytest.raises(NotImplementedError):
        failing_rows(lower._replace(expectation_type="expect_column_to_exist"), column, parameters)


def test_gx_and_the_twin_agree_on_a_normalised_batch(settings: Settings) -> None:
    frame = pd.DataFrame(
        [*GOOD, row(metric="bad name"), row(value="inf"), row(ts="2099-01-01T00:00:00Z"),
         row(labels={f"k{i}": "v" for i in range(40)}), *[r for r, _ in UNREADABLE.values()]],
        dtype=object,
    )  # fmt: skip
    batch = storage.normalise.normalise(frame)
    limits = quality_limits(settings)
    gx, twin = validate_batch(batch, limits), validate_batch_pandas(batch, limits)
    assert gx.reasons.tolist() == twin.reasons.tolist()
    assert gx.reasons.tolist()[len(GOOD) : len(GOOD) + 4] == [
        Reason.INVALID_METRIC_NAME,
        Reason.NON_FINITE_VALUE,
        Reason.TIMESTAMP_IN_FUTURE,
        Reason.TOO_MANY_LABELS,
    ]
    assert gx.batch is batch and twin.batch is batch  # judged on the one reading
