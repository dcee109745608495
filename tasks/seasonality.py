"""Time slots, trend and the season choice of baselines (tasks/baseline.py learns the rest).

A series' season is the slotting of time its values follow best: none (1 slot), hour of day
(24), hour of day split into weekdays and weekend days ("weekpart", 48) or hour of week (168),
chosen per series by how much of its detrended variance the slots explain (an F test plus a
minimum effect size). The trend is the Theil-Sen slope of its daily medians.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from storage.detection import BASELINE_SEASONS
from tasks.grouping import group_quantiles

HOUR_US = 3_600_000_000
DAY_US = 86_400_000_000
SEASONS = BASELINE_SEASONS  # ("none", "day", "week", "weekpart"): as the baselines table holds them
SLOTS = (1, 24, 168, 48)
MAX_SLOTS = 168
MAD_TO_SIGMA = 1.4826


@dataclass(frozen=True)
class LearnParams:
    """Knobs of baseline learning: which series have enough history, the season choice, the
    scale floor, how far a trend extrapolates and the alert budget."""

    min_history_us: int = DAY_US
    min_points: int = 12
    weekly_min_span_us: int = 21 * DAY_US
    weekpart_min_span_us: int = 6 * DAY_US  # a week less the newest hours holds a weekend
    min_strength: float = 0.1  # share of variance a season must explain
    min_f: float = 4.0  # F statistic the season's slots must reach
    rel_floor: float = 1e-3
    abs_floor: float = 1e-9
    max_extrapolation_us: int = 2 * DAY_US
    alert_budget_per_week: float = 0.5  # alerts a rule may raise per series and week


def slot_of(ts_us: np.ndarray, season: np.ndarray) -> np.ndarray:
    """Slot of each timestamp under each row's season code (0 none, 1 day, 2 week, 3
    weekpart); UTC, hour-of-week slot 0 is Monday 00:00; weekpart slots 24-47 are Saturday and
    Sunday hours."""
    hours = ts_us // HOUR_US
    hod = hours % 24
    how = (hours + 72) % 168  # 1970-01-01 was a Thursday
    slot = np.where(season == 2, how, hod + 24 * ((season == 3) & (how >= 120)))
    return slot * (season > 0)


def theil_sen_per_day(code: np.ndarray, ts: np.ndarray, value: np.ndarray, n: int) -> np.ndarray:
    """Median pairwise slope of daily medians per series (value per day); 0 under 3 days."""
    day = ts // DAY_US
    day0 = int(day.min())
    width = int(day.max()) - day0 + 1
    keys = code * width + (day - day0)
    uniq, _, (med,) = group_quantiles(keys, value, (0.5,))
    grid = np.full((n, width), np.nan)
    grid[uniq // width, uniq % width] = med
    if width < 3:
        return np.zeros(n)
    later, earlier = np.triu_indices(width, 1)[::-1]
    slopes = (grid[:, later] - grid[:, earlier]) / (later - earlier)
    days_present = np.sum(~np.isnan(grid), axis=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        slope = np.nanmedian(slopes, axis=1)
    return np.where((days_present >= 3) & np.isfinite(slope), slope, 0.0)


def _ss_within(code: np.ndarray, slot: np.ndarray, x: np.ndarray, n_series: int, width: int):
    """Per series: the within-slot sum of squares and the number of non-empty slots."""
    keys = code * width + slot
    size = n_series * width
    cnt = np.bincount(keys, minlength=size).astype(np.float64)
    s1 = np.bincount(keys, weights=x, minlength=size)
    s2 = np.bincount(keys, weights=x * x, minlength=size)
    with np.errstate(invalid="ignore", divide="ignore"):
        within = np.where(cnt > 0, s2 - s1 * s1 / np.where(cnt > 0, cnt, 1), 0.0)
    per_series = within.reshape(n_series, width).sum(axis=1)
    slots = (cnt.reshape(n_series, width) > 0).sum(axis=1)
    return np.maximum(per_series, 0.0), slots


def choose_seasons(
    code: np.ndarray,
    ts: np.ndarray,
    x: np.ndarray,
    span_us: np.ndarray,
    params: LearnParams,
) -> np.ndarray:
    """Season code per series (0 none, 1 day, 2 week, 3 weekpart) from centred, detrended
    values x."""
    n_series = len(span_us)
    points = np.bincount(code, minlength=n_series).astype(np.float64)
    ss_total = np.bincount(code, weights=x * x, minlength=n_series) - (
        np.bincount(code, weights=x, minlength=n_series) ** 2 / np.maximum(points, 1)
    )
    hours = ts // HOUR_US
    ss_day, k_day = _ss_within(code, hours % 24, x, n_series, 24)
    ss_week, k_week = _ss_within(code, (hours + 72) % 168, x, n_series, 168)
    weekend_hours = 24 * ((hours + 72) % 168 >= 120)
    ss_part, k_part = _ss_within(code, hours % 24 + weekend_hours, x, n_series, 48)
    with np.errstate(invalid="ignore", divide="ignore"):
        f_day = ((ss_total - ss_day) / np.maximum(k_day - 1, 1)) / (
            ss_day / np.maximum(points - k_day, 1)
        )
        f_week = ((ss_day - ss_week) / np.maximum(k_week - k_day, 1)) / (
            ss_week / np.maximum(points - k_week, 1)
        )
        day_strength = 1 - ss_day / ss_total
        week_gain = 1 - ss_week / ss_day
        week_strength = 1 - ss_week / ss_total
        f_part = ((ss_day - ss_part) / np.maximum(k_part - k_day, 1)) / (
            ss_part / np.maximum(points - k_part, 1)
        )
        part_gain = 1 - ss_part / ss_day
        part_strength = 1 - ss_part / ss_total
    daily = (k_day >= 12) & (day_strength >= params.min_strength) & (f_day >= params.min_f)
    weekly = (
        (span_us >= params.weekly_min_span_us)
        & (k_week >= 84)
        & (week_gain >= params.min_strength)
        & (week_strength >= params.min_strength)
        & (f_week >= params.min_f)
    )
    weekpart = (
        (span_us >= params.weekpart_min_span_us)
        & (k_part >= 36)
        & (part_gain >= params.min_strength)
        & (part_strength >= params.min_strength)
        & (f_part >= params.min_f)
    )
    return np.where(weekly, 2, np.where(weekpart, 3, np.where(daily, 1, 0)))
