"""Calibrated detection on awkward series: heavy tails under an alert budget, level shifts,
outages, direction, and bad input that must still get a score."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

from tasks.alert_engine import AlertRule, alert_timeline, evaluate, high_mask
from tasks.backtest import alerts_for, buckets_of, replay
from tasks.baseline import DAY_US, BaselineTable, fit_models, learn_baselines
from tasks.calibration import KIND_OUTAGE, KIND_SHIFT, score_of
from tasks.detect import score_points

T0 = 1_767_571_200_000_000  # a Monday, 00:00 UTC
MIN = 60_000_000
STEP_5M = 5 * MIN
RULE = AlertRule()  # the default: 0.7, for 5 min, keep firing 15 min, both directions


def heavy_tailed(n_series: int, days: int, seed: int) -> pd.DataFrame:
    """5-minute points: a daily shape plus Student-t (3 degrees of freedom) noise, and now and
    then a Pareto spike kept inside the range the noise itself reaches."""
    rng = np.random.default_rng(seed)
    ts = T0 + np.arange(days * 288, dtype=np.int64) * STEP_5M
    parts = []
    for sid in range(1, n_series + 1):
        noise = rng.standard_t(3, len(ts)) * 5
        reach = np.quantile(np.abs(noise), 0.999)
        spikes = rng.random(len(ts)) < 0.002
        noise[spikes] += np.minimum((rng.pareto(3, spikes.sum()) + 1) * 5, reach)
        shape = 20 * np.sin(2 * np.pi * (ts % DAY_US) / DAY_US)
        parts.append(pd.DataFrame({"series_id": sid, "ts_us": ts, "value": 500 + shape + noise}))
    return pd.concat(parts, ignore_index=True)


def test_heavy_tailed_series_alert_about_as_often_as_the_budget_allows() -> None:
    weeks_warm, weeks_seen = 4, 8
    data = heavy_tailed(4, 7 * (weeks_warm + weeks_seen), seed=3)
    scores = replay(data)
    flags = alerts_for(scores, RULE).astype(bool)
    sid = scores["series_id"].to_numpy()
    onset = flags & ~np.r_[False, flags[:-1] & (sid[1:] == sid[:-1])]
    seen = scores["ts_us"].to_numpy() >= T0 + weeks_warm * 7 * DAY_US
    rate = onset[seen].sum() / (4 * weeks_seen)
    budget = 0.5
    assert budget / 2 <= rate <= 2 * budget, rate
    # the noisy series were given thresholds above the rule's own
    assert scores.loc[seen, "threshold_both"].median() > RULE.threshold


def _history_and_day(shape_noise: float, level: float, seed: int) -> tuple[pd.DataFrame, ...]:
    """A week of 1-minute history (learned from its 5m buckets) and the next day at 1 minute."""
    rng = np.random.default_rng(seed)
    ts = T0 + np.arange(8 * 1440, dtype=np.int64) * MIN
    value = level * (1 + 0.1 * np.sin(2 * np.pi * (ts % DAY_US) / DAY_US))
    value = value + rng.normal(0, shape_noise, len(ts))
    frame = pd.DataFrame({"series_id": 1, "ts_us": ts, "value": value})
    cut = T0 + 7 * DAY_US
    return frame[frame["ts_us"] < cut], frame[frame["ts_us"] >= cut - 3 * 3_600_000_000]


def _score_day(hist: pd.DataFrame, day: pd.DataFrame) -> pd.DataFrame:
    buckets = buckets_of(hist)
    learned = learn_baselines(buckets, bucket_us=STEP_5M)
    metric_of = pd.Series("m", index=[1])
    models = fit_models(buckets, learned.baselines, metric_of, {"*": "ecod"}, max_rows=5000)
    points = day.assign(fresh=day["ts_us"] >= T0 + 7 * DAY_US)
    scored = score_points(points, BaselineTable.from_frame(learned.baselines), models, metric_of)
    # What the rules need per series, on every row (as a backtest's rows carry it).
    return scored.scores.merge(scored.series, on="series_id", how="left")


def test_a_level_shift_alerts_once_says_so_and_is_quiet_within_six_hours() -> None:
    hist, day = _history_and_day(shape_noise=4.0, level=200.0, seed=1)
    shift_at = T0 + 7 * DAY_US + 10 * 3_600_000_000
    day = day.copy()
    day.loc[day["ts_us"] >= shift_at, "value"] += 60  # 15 noise sigmas, for the rest of the day
    scores = _score_day(hist, day)
    events, _ = alert_timeline(RULE, scores)
    firing = events[events["event"] == "firing"]
    assert len(firing) == 1
    assert firing["ts_us"].iloc[0] - shift_at <= 10 * MIN
    assert int(firing["kind"].iloc[0]) == KIND_SHIFT
    assert firing["since_us"].iloc[0] == shift_at  # since: the first anomalous point
    flags = evaluate(RULE, scores).flags
    after = scores["ts_us"].to_numpy() >= shift_at + 6 * 3_600_000_000
    assert flags[after].sum() == 0
    resolved = events[events["event"] == "resolved"]
    assert len(resolved) == 1 and resolved["ts_us"].iloc[0] <= shift_at + 6 * 3_600_000_000


def test_a_busy_noisy_series_dropping_to_zero_alerts_within_ten_minutes() -> None:
    # noise of 30% of the level: zero is only about 3 noise sigmas below normal
    hist, day = _history_and_day(shape_noise=300.0, level=1000.0, seed=2)
    hist = hist.assign(value=hist["value"].clip(lower=50))
    day = day.assign(value=day["value"].clip(lower=50))
    down_at = T0 + 7 * DAY_US + 14 * 3_600_000_000
    down = (day["ts_us"] >= down_at) & (day["ts_us"] < down_at + 3_600_000_000)
    day.loc[down, "value"] = 0.0
    scores = _score_day(hist, day)
    events, _ = alert_timeline(RULE, scores)
    firing = events[events["event"] == "firing"]
    outage = firing[(firing["ts_us"] >= down_at) & (firing["ts_us"] <= down_at + 10 * MIN)]
    assert len(outage) == 1
    assert int(outage["kind"].iloc[0]) == KIND_OUTAGE
    # an up-only rule (a crash rate) never pages for the outage
    up_events, _ = alert_timeline(AlertRule(direction="up"), scores)
    assert not ((up_events["ts_us"] >= down_at) & (up_events["event"] == "firing")).any()


def test_direction_and_budget_of_a_rule_decide_which_rows_are_high() -> None:
    frame = pd.DataFrame(
        {
            "series_id": [1, 1, 1],
            "ts_us": [T0, T0 + MIN, T0 + 2 * MIN],
            "value": [10.0, -10.0, 10.0],
            "expected": 0.0,
            "score": [0.8, 0.8, 0.75],
            "sign": [1.0, -1.0, 1.0],
            "outage": 0.0,
            "alert_budget": 0.5,
            "threshold_both": 0.72,
            "threshold_up": 0.72,
            "threshold_down": 0.72,
        }
    )
    assert high_mask(AlertRule(), frame).tolist() == [True, True, True]
    assert high_mask(AlertRule(direction="up"), frame).tolist() == [True, False, True]
    assert high_mask(AlertRule(direction="down"), frame).tolist() == [False, True, False]
    # a tenth of the budget costs one decade of tail probability: 0.75 is no longer enough
    stricter = AlertRule(alert_budget_per_week=0.05)
    assert high_mask(stricter, frame).tolist() == [True, True, False]


def test_the_score_keeps_ranking_far_beyond_the_training_range() -> None:
    levels = np.array([4.0, 8.0, 16.0, 32.0])
    scores = score_of(levels)
    assert np.all(np.diff(scores) > 0) and np.all(scores < 1.0)
    assert scores[0] == pytest.approx(0.7)


@pytest.mark.parametrize(
    "kind", ["constant", "all_zero", "mostly_missing", "one_per_day", "far_apart"]
)
def test_bad_input_gets_a_score_and_no_crash(kind: str) -> None:
    rng = np.random.default_rng(0)
    ts = T0 + np.arange(6 * 288, dtype=np.int64) * STEP_5M
    value = np.full(len(ts), 42.0)
    if kind == "all_zero":
        value[:] = 0.0
    elif kind == "mostly_missing":
        keep = rng.random(len(ts)) < 0.03
        ts, value = ts[keep], value[keep] + rng.normal(0, 1, keep.sum())
    elif kind == "one_per_day":
        ts = T0 + np.arange(40, dtype=np.int64) * DAY_US
        value = rng.normal(10, 1, len(ts))
    elif kind == "far_apart":
        value = np.where(rng.random(len(ts)) < 0.5, 0.0, 1e12) + rng.normal(0, 1, len(ts))
    value[-3:] += 5.0  # something to score at the end
    data = pd.DataFrame({"series_id": 1, "ts_us": ts, "value": value})
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no division by zero, no NaN warnings
        scores = replay(data)
    assert len(scores) == len(data)
    assert scores["score"].between(0, 1).all()
    scored = scores["expected"].notna()
    if kind != "one_per_day":  # a point a day never fills a day's worth of buckets
        assert scored.any()
    assert np.isfinite(scores.loc[scored, ["expected", "score"]].to_numpy()).all()


def test_a_counter_at_zero_keeps_quiet_on_its_usual_ones_and_pages_for_a_burst() -> None:
    """An error counter: zero but for a 1 lasting 15 minutes about once a day. Its usual 1s must
    not page (they tie with the hours its budget let pass, and ties do not fire more often than
    the budget allows); a burst of 30 must (its scale comes from its mean absolute deviation,
    not from a MAD of zero that would put every nonzero value 1e11 scales out)."""
    rng = np.random.default_rng(5)
    days = 22
    ts = T0 + np.arange(days * 288, dtype=np.int64) * STEP_5M
    value = np.zeros(len(ts))
    for start in np.flatnonzero(rng.random(len(ts)) < 1 / 288):  # about once a day
        value[start : start + 3] = 1.0
    cut = T0 + (days - 1) * DAY_US
    burst_at = cut + 15 * 3_600_000_000
    burst = (ts >= burst_at) & (ts < burst_at + 15 * MIN)
    value[ts >= cut] = 0.0
    ones_at = [cut + h * 3_600_000_000 for h in (2, 6, 10, 20)]
    for at in ones_at:
        value[(ts >= at) & (ts < at + 15 * MIN)] = 1.0
    value[burst] = 30.0
    data = pd.DataFrame({"series_id": 1, "ts_us": ts, "value": value})
    hist, day = data[data["ts_us"] < cut], data[data["ts_us"] >= cut - 3 * 3_600_000_000]
    scores = _score_day(hist, day)
    events, _ = alert_timeline(RULE, scores)
    firing = events.loc[events["event"] == "firing", "ts_us"].to_numpy()
    assert len(firing) == 1, firing
    assert burst_at <= firing[0] <= burst_at + 10 * MIN
    ones = scores["ts_us"].isin([at + k * STEP_5M for at in ones_at for k in range(3)])
    burst_score = scores.loc[scores["ts_us"].between(burst_at, burst_at + 10 * MIN), "score"]
    assert burst_score.max() > scores.loc[ones, "score"].max()  # the burst ranks above the 1s
    assert np.isfinite(scores["upper"]).all()  # a band the alert and its plot can show


def test_spikes_that_fill_the_top_of_the_window_do_not_become_normal() -> None:
    """A crash rate that jumps tenfold in 3% of its 5-minute points: the fitted tail takes those
    jumps for its normal top, but the Laplace floor under it still scores the next tenfold jump
    as rare (and a jump of a third as ordinary)."""
    rng = np.random.default_rng(11)
    ts = T0 + np.arange(15 * 288, dtype=np.int64) * STEP_5M
    value = 20 * rng.lognormal(0, 0.2, len(ts))
    jumps = rng.random(len(ts)) < 0.03
    value[jumps] *= 10
    cut = T0 + 14 * DAY_US
    value[ts >= cut] = 20 * rng.lognormal(0, 0.2, int((ts >= cut).sum()))
    jump_at, small_at = cut + 12 * 3_600_000_000, cut + 18 * 3_600_000_000
    value[ts == jump_at] = 200.0
    value[ts == small_at] = 27.0
    data = pd.DataFrame({"series_id": 1, "ts_us": ts, "value": value})
    hist, day = data[data["ts_us"] < cut], data[data["ts_us"] >= cut - 3 * 3_600_000_000]
    scores = _score_day(hist, day).set_index("ts_us")
    assert scores.loc[jump_at, "score"] >= RULE.threshold
    assert scores.loc[small_at, "score"] < 0.5


def test_the_budget_counts_alert_episodes_not_hours() -> None:
    """Four weeks of hourly levels at 1 with two incidents: ten straight hours at 9 and one
    hour at 6. A budget of one alert a week allows 4 episodes, so neither incident sets the
    bar; counted in hours, the long incident alone spent the allowance and raised the bar to
    its own level."""
    from tasks.calibration import budget_threshold

    hours = 28 * 24
    ts = np.arange(hours, dtype=np.int64) * 3_600_000_000
    level = np.ones(hours)
    level[100:110] = 9.0  # one episode of ten hours
    level[300] = 6.0
    code = np.zeros(hours, dtype=np.int64)
    weeks = np.array([4.0])
    bar = budget_threshold(code, ts, level, 1, weeks, 1.0)
    # No incident's level: with ones everywhere else, the bar is the quiet hours' level or the
    # tail model's minimum, far below 6.
    assert bar[0] < 6.0
    # Five separate hours at 9 are five episodes: over the allowance of 4, the bar is 9.
    spaced = np.ones(hours)
    spaced[[100, 200, 300, 400, 500]] = 9.0
    assert budget_threshold(code, ts, spaced, 1, weeks, 1.0)[0] == 9.0
    # Ten hours at 9 with a dip to 5 in their middle: two episodes at a bar above 5 (the dip
    # ends the first), one at a bar of 5 or below. An allowance of 1 (a quarter a week) puts
    # the bar at 9; an allowance of 2 never runs out.
    dipped = np.ones(hours)
    dipped[100:110] = 9.0
    dipped[105] = 5.0
    assert budget_threshold(code, ts, dipped, 1, weeks, 0.25)[0] == 9.0
    assert budget_threshold(code, ts, dipped, 1, weeks, 0.5)[0] < 5.0
    # Two series in one call keep their own counts.
    both = budget_threshold(
        np.r_[code, code + 1], np.r_[ts, ts], np.r_[level, spaced], 2, np.r_[weeks, weeks], 1.0
    )
    assert both[0] < 6.0 and both[1] == 9.0


def test_an_hourly_series_follows_a_level_shift_after_two_points() -> None:
    """Hourly points fill two of the agile level's three 40-minute sub-windows. The empty one
    counts as level 0: one shifted hour moves nothing (a spike stays a spike), two that agree
    make the shift the level, two that disagree in sign make none."""
    from tasks.calibration import agile_offset

    hours = 12
    ts = T0 + np.arange(hours, dtype=np.int64) * 3_600_000_000
    r = np.zeros(hours)
    r[6:] = 5.0  # from hour 6 on, five scales up
    r[4] = 9.0  # a one-hour spike before it
    offset = agile_offset(np.zeros(hours, dtype=np.int64), ts, r, 1)
    assert offset[5] == 0.0 and offset[6] == 0.0  # the spike alone: no level
    assert offset[7] == 0.0  # one shifted hour beside a normal one: not yet
    assert offset[8] == 5.0 and offset[11] == 5.0  # two shifted hours: the new level
    down = np.where(np.arange(hours) >= 6, -5.0, 0.0)
    down[6] = 5.0  # hours that disagree in sign: no level
    assert agile_offset(np.zeros(hours, dtype=np.int64), ts, down, 1)[8] == 0.0


def test_an_hourly_spike_of_two_hours_raises_one_alert_not_a_dip_after_it() -> None:
    """Two high hours move an hourly series' agile level (see above); the hours after the spike,
    back at the usual level, must not then read as a run below it. A run averaged over six
    hours did: the level's own moves made the normal hours after a spike a dip for hours."""
    rng = np.random.default_rng(7)
    days = 21
    ts = T0 + np.arange(days * 24, dtype=np.int64) * 3_600_000_000
    hour = (ts % DAY_US) // 3_600_000_000
    value = 30 + 3 * np.sin(2 * np.pi * hour / 24) + rng.normal(0, 0.8, len(ts))
    spike = len(ts) - 14  # 10:00 on the last day, two hours long
    value[spike : spike + 2] = [90.0, 75.0]
    scores = replay(pd.DataFrame({"series_id": 1, "ts_us": ts, "value": value}))
    firing = alerts_for(scores, RULE).astype(bool)
    onsets = np.flatnonzero(firing & ~np.r_[False, firing[:-1]])
    last_day = onsets[onsets >= len(ts) - 24]
    assert list(last_day) == [spike]  # the spike pages, at its first hour, and nothing after
    assert not firing[spike + 4 :].any()  # quiet from two hours after the spike's end
