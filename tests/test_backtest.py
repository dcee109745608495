"""Walk-forward backtest: no look-ahead, the CLI's files and figures, and a small evaluation of
detection on labelled synthetic series against the targets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from metricmill.cli import app
from metricmill.synthetic import ANOMALY_KINDS, labelled_set
from tasks.alert_engine import AlertRule
from tasks.backtest import alerts_for, evaluate_alerts, replay
from tasks.baseline import DAY_US
from tests.settings_env import isolate_settings


def test_changing_later_rows_never_changes_an_earlier_score() -> None:
    data = labelled_set(1, days=4, clean_days=2, seed=7).frame[["series_id", "ts_us", "value"]]
    before = replay(data)
    assert before["expected"].notna().sum() > 2 * 288  # days 2-4 are scored
    rng = np.random.default_rng(0)
    for i in (300, 400, 700, 1000):  # inside the first scored day, in the middle, later on
        changed = data.copy()
        changed.loc[i + 1 :, "value"] = rng.normal(0, 500, len(data) - i - 1)
        after = replay(changed)
        cols = ["expected", "lower", "upper", "stat_score", "model_score", "score"]
        pd.testing.assert_frame_equal(before.loc[:i, cols], after.loc[:i, cols])
        assert not after.loc[i + 1 :, "score"].equals(before.loc[i + 1 :, "score"])


def test_backtest_command_writes_scores_and_prints_precision_recall_delay(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    isolate_settings(monkeypatch, home=tmp_path)
    data = labelled_set(1, days=5, clean_days=3, seed=11, kinds=("level_shift",)).frame
    source = tmp_path / "in.csv"
    stamps = pd.to_datetime(data["ts_us"], unit="us", utc=True).map(lambda t: t.isoformat())
    pd.DataFrame({"timestamp": stamps, "value": data["value"], "label": data["label"]}).to_csv(
        source, index=False
    )
    target = tmp_path / "out" / "scores.csv"
    result = CliRunner().invoke(
        app, ["backtest", str(source), "--output", str(target), "--for", "0"]
    )
    assert result.exit_code == 0, result.output
    scores = pd.read_csv(target)
    assert list(scores.columns) == [
        "timestamp",
        "value",
        "expected",
        "lower",
        "upper",
        "anomaly_score",
        "alert",
        "label",
    ]
    assert len(scores) == len(data)
    assert scores["anomaly_score"].between(0, 1).all()
    assert set(scores["alert"]) <= {0, 1}
    assert scores.loc[scores["label"] == 1, "alert"].any()
    text = " ".join(result.output.split())
    assert "recall 1.000 (1 of 1 labelled windows)" in text
    assert "precision " in text and "detection delay (median) " in text


def test_backtest_command_rejects_bad_input_with_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    isolate_settings(monkeypatch, home=tmp_path)
    bad = tmp_path / "bad.csv"
    bad.write_text("timestamp,value\n2026-01-01T00:00:00Z,1\nyesterday,2\n", encoding="utf-8")
    runner = CliRunner()
    result = runner.invoke(app, ["backtest", str(bad), "-o", str(tmp_path / "o.csv")])
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1].startswith("error: ")
    assert "line 3" in result.output
    nocol = tmp_path / "nocol.csv"
    nocol.write_text("time,v\n1,2\n", encoding="utf-8")
    result = runner.invoke(app, ["backtest", str(nocol), "-o", str(tmp_path / "o.csv")])
    assert result.exit_code == 1 and "missing column(s) timestamp, value" in result.output
    assert not (tmp_path / "o.csv").exists()


def test_small_evaluation_meets_the_targets() -> None:
    # Four series per kind (one miss in two would fail a 0.7 target by chance alone); 22 days
    # of history so weekly series have their week learned.
    data = labelled_set(20, days=25, clean_days=22, seed=21)
    start = data.start_us + 22 * DAY_US
    scores = replay(data.frame[["series_id", "ts_us", "value"]])
    late = (scores["ts_us"] >= start).to_numpy()
    scored = scores[late].reset_index(drop=True)
    rule = AlertRule(threshold=0.7, for_seconds=0, keep_firing_for_seconds=900)
    result = evaluate_alerts(
        scored, alerts_for(scored, rule), data.anomaly_frame(), grace_us=data.step_us
    )
    recall = result.windows.groupby("kind")["detected"].mean()
    assert set(recall.index) == set(ANOMALY_KINDS)
    assert recall["spike"] >= 0.9 and recall["level_shift"] >= 0.9
    assert recall["variance_change"] >= 0.7 and recall["seasonality_break"] >= 0.7
    assert result.false_per_series_week <= 1.0


def test_backtest_takes_duplicates_gaps_and_unsorted_rows_as_they_come(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    isolate_settings(monkeypatch, home=tmp_path)
    data = labelled_set(1, days=3, clean_days=2, seed=4, kinds=("spike",)).frame
    stamps = pd.to_datetime(data["ts_us"], unit="us", utc=True).map(lambda t: t.isoformat())
    rows = pd.DataFrame({"TimeStamp": stamps, "Value": data["value"].map(str)})
    rows.loc[[100, 400, 401], "Value"] = ""  # gaps
    twice = rows.iloc[[500, 700]].assign(Value=["1.5", "2.5"])  # the same stamps, new values
    shuffled = pd.concat([rows, twice]).sample(frac=1.0, random_state=0)  # unsorted
    source = tmp_path / "real.csv"
    shuffled.to_csv(source, index=False)
    target = tmp_path / "scores.csv"
    result = CliRunner().invoke(
        app, ["backtest", str(source), "-o", str(target), "--budget", "0.25"]
    )
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert f"read {len(shuffled)} rows" in text
    assert "2 duplicated timestamps" in text and "3 empty values (gaps)" in text
    assert "rows sorted by time" in text
    scores = pd.read_csv(target)
    assert len(scores) == len(shuffled) - 3  # every row with a value, both duplicates kept
    assert pd.to_datetime(scores["timestamp"]).is_monotonic_increasing
    dup = scores[scores["timestamp"] == stamps.iloc[500]]
    expected = sorted([float(rows["Value"].iloc[500]), 1.5])
    assert sorted(dup["value"].tolist()) == pytest.approx(expected, rel=1e-5)  # %.6g output
    assert scores["anomaly_score"].between(0, 1).all()


def test_backtest_names_an_unreadable_file_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    isolate_settings(monkeypatch, home=tmp_path)
    blank = tmp_path / "blank.csv"
    blank.write_text("timestamp,value\n2026-01-01T00:00:00Z,\n", encoding="utf-8")
    result = CliRunner().invoke(app, ["backtest", str(blank), "-o", str(tmp_path / "o.csv")])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "no row has a value" in lines[0]


def test_only_incidents_the_rule_alerted_on_are_left_out_of_later_refits() -> None:
    """With confirm_with, a labelled incident the rule alerted on is left out of the next
    day's fit (as an operator's `alerts resolve --incident` would), a labelled incident it
    missed is not, and labels never act before the midnight after they happen."""
    data = labelled_set(1, days=5, clean_days=2, seed=3).frame[["series_id", "ts_us", "value"]]
    data = data.reset_index(drop=True)
    ts = data["ts_us"].to_numpy()
    t0 = int(ts[0]) // DAY_US * DAY_US
    day3 = (ts >= t0 + 3 * DAY_US) & (ts < t0 + 3 * DAY_US + 4 * 3_600_000_000)
    values = data["value"].to_numpy().copy()
    # Day 3: four hours at ten times the level, an incident any rule alerts on.
    values[day3] = 10 * np.abs(values).max()
    data["value"] = values
    rule = AlertRule(threshold=0.7, for_seconds=0, keep_firing_for_seconds=900)
    plain = replay(data)
    assert alerts_for(plain, rule)[day3].any()
    labelled = replay(data, confirmed=day3, confirm_with=rule)
    cols = ["expected", "stat_score", "score"]
    before = ts < t0 + 4 * DAY_US  # up to the refit after the incident: same scores
    pd.testing.assert_frame_equal(plain.loc[before, cols], labelled.loc[before, cols])
    # From day 4 the incident's hours are out of the training window: its tenfold level no
    # longer widens the band nor takes the alert budget (the threshold falls back to the
    # quiet series' own), while with the incident kept both stay far out.
    day4 = (ts >= t0 + 4 * DAY_US) & (ts < t0 + 4 * DAY_US + 4 * 3_600_000_000)
    level = np.abs(values[~day3]).max()
    assert (plain.loc[day4, "upper"] > 5 * level).all()
    assert (labelled.loc[day4, "upper"] < 2 * level).all()
    assert (labelled.loc[day4, "threshold_both"] < plain.loc[day4, "threshold_both"] - 0.1).all()
    # A label on rows the rule never alerted on (quiet day 2 hours) changes nothing.
    quiet = (ts >= t0 + 2 * DAY_US) & (ts < t0 + 2 * DAY_US + 3_600_000_000)
    assert not alerts_for(plain, rule)[quiet].any()
    missed = replay(data, confirmed=quiet, confirm_with=rule)
    pd.testing.assert_frame_equal(plain[cols], missed[cols])
