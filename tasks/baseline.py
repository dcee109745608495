"""Seasonal baselines per series, learned from rollup buckets, vectorised across series.

Per series, in one pass over a (series, time)-sorted frame:

1. trend: Theil-Sen slope of the daily medians (median of all pairwise slopes), so a series
   that grows steadily is compared with where it is now, not with its 4-week average;
2. season: hour of week (168 slots) when there are >= 3 weeks and hour-of-week slots explain
   clearly more of the detrended variance than hour-of-day slots (an F test plus a minimum
   effect size); else hour of day split into weekdays and weekend days ("weekpart", 48 slots)
   when there is a week and that split explains clearly more than hour of day alone (two
   weeks of history cannot learn 168 slots, but a weekend is already unlike a Monday); else
   hour of day (24) when those slots explain enough; else none (1 slot);
3. per slot: n, mean, std, median, MAD, p05/p50/p95/p99 of the detrended bucket averages,
   and `scale`: sqrt((1.4826 MAD)^2 + spread^2), where spread is the typical standard deviation
   *inside* a bucket (from sum_sq) — raw points scatter more than 5-minute averages — floored
   at half the series' median slot scale, 0.1% of its level and 1e-9, so a constant series never
   divides by zero and a slot with little data does not turn every wiggle into an anomaly.

The expected value at time t is `median[slot(t)] + trend_slope * (t - window midpoint)` (slope
per day, extrapolated at most two days beyond the window).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from storage import detection
from storage.schema import CALIBRATION_COLUMNS
from tasks import calibration as cal
from tasks.detectors import FittedModel, features, fit_per_metric
from tasks.grouping import group_quantiles

HOUR_US = 3_600_000_000
DAY_US = 86_400_000_000
SEASONS = ("none", "day", "week", "weekpart")
SLOTS = (1, 24, 168, 48)
MAX_SLOTS = 168
MAD_TO_SIGMA = 1.4826


@dataclass(frozen=True)
class LearnParams:
    """Knobs of the season choice and the scale floor."""

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


@dataclass
class Learned:
    """Baseline rows (the baselines table) and the series skipped, with the reason."""

    baselines: pd.DataFrame
    skipped: pd.DataFrame
    seasons: dict[str, int] = field(default_factory=dict)


def slot_of(ts_us: np.ndarray, season: np.ndarray) -> np.ndarray:
    """Slot of each timestamp under each row's season code (0 none, 1 day, 2 week, 3
    weekpart); UTC, hour-of-week slot 0 is Monday 00:00; weekpart slots 24-47 are Saturday and
    Sunday hours."""
    hours = ts_us // HOUR_US
    hod = hours % 24
    how = (hours + 72) % 168  # 1970-01-01 was a Thursday
    slot = np.where(season == 2, how, hod + 24 * ((season == 3) & (how >= 120)))
    return slot * (season > 0)


def _theil_sen_per_day(code: np.ndarray, ts: np.ndarray, value: np.ndarray, n: int) -> np.ndarray:
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


def learn_baselines(
    buckets: pd.DataFrame, *, bucket_us: int, params: LearnParams | None = None
) -> Learned:
    """Baselines from rollup buckets (series_id, ts_us, count, sum, sum_sq)."""
    params = params or LearnParams()
    frame = buckets[buckets["count"] > 0]
    if not _in_series_time_order(frame):  # the database reads come sorted; skip the sort then
        frame = frame.sort_values(["series_id", "ts_us"], kind="stable")
    sid_all = frame["series_id"].to_numpy(np.int64)
    ids, code = np.unique(sid_all, return_inverse=True)
    ts = frame["ts_us"].to_numpy(np.int64)
    count = frame["count"].to_numpy(np.float64)
    value = frame["sum"].to_numpy(np.float64) / count
    within = np.maximum(frame["sum_sq"].to_numpy(np.float64) / count - value * value, 0.0)
    n_series = len(ids)
    if n_series == 0:
        return Learned(pd.DataFrame(columns=detection.BASELINE_COLUMNS), _no_skips())
    points = np.bincount(code, minlength=n_series)
    ends = np.cumsum(points)
    starts = ends - points
    first, last = ts[starts], ts[ends - 1]
    span = last + bucket_us - first
    short = span < params.min_history_us
    sparse = ~short & (points < params.min_points)
    skipped = pd.DataFrame(
        {
            "series_id": np.concatenate([ids[short], ids[sparse]]),
            "reason": ["under a day of history"] * int(short.sum())
            + [f"fewer than {params.min_points} buckets"] * int(sparse.sum()),
        }
    )
    keep_series = ~(short | sparse)
    if not keep_series.any():
        return Learned(pd.DataFrame(columns=detection.BASELINE_COLUMNS), skipped)
    rows = keep_series[code]
    remap = np.cumsum(keep_series) - 1
    ids, first, last, span = (
        ids[keep_series],
        first[keep_series],
        last[keep_series],
        span[keep_series],
    )
    code, ts, value, within = remap[code[rows]], ts[rows], value[rows], within[rows]
    count = count[rows]
    n_series = len(ids)

    slope_day = _theil_sen_per_day(code, ts, value, n_series)
    t_ref = (first + last + bucket_us) // 2
    detrended = value - slope_day[code] * (ts - t_ref[code]) / DAY_US
    _, _, (centre,) = group_quantiles(code, detrended, (0.5,))
    _, _, (mad_all,) = group_quantiles(code, np.abs(detrended - centre[code]), (0.5,))
    # Season choice on values clipped to the series' robust range: a few wild buckets must
    # not create or hide a pattern.
    reach = 6 * MAD_TO_SIGMA * mad_all
    x = np.clip(detrended - centre[code], -reach[code], reach[code])
    season = choose_seasons(code, ts, x, span, params)

    slot = slot_of(ts, season[code])
    keys = code * MAX_SLOTS + slot
    uniq, n, (p05, p50, p95, p99) = group_quantiles(keys, detrended, (0.05, 0.5, 0.95, 0.99))
    pos = np.searchsorted(uniq, keys)
    _, _, (mad,) = group_quantiles(keys, np.abs(detrended - p50[pos]), (0.5,))
    size = len(uniq)
    total = np.bincount(pos, weights=detrended, minlength=size)
    total_sq = np.bincount(pos, weights=(detrended - p50[pos]) ** 2, minlength=size)
    mean = total / n
    std = np.sqrt(np.maximum(total_sq / n - (mean - p50) ** 2, 0.0))
    spread = np.sqrt(np.bincount(pos, weights=within, minlength=size) / n)
    g_code = uniq // MAX_SLOTS
    g_slot = uniq % MAX_SLOTS
    raw_scale = np.sqrt((MAD_TO_SIGMA * mad) ** 2 + spread**2)
    _, _, (pooled,) = group_quantiles(g_code, raw_scale, (0.5,))
    level = centre
    floor = np.maximum.reduce(
        [
            0.5 * pooled[g_code],
            params.rel_floor * np.abs(level[g_code]),
            np.full(size, params.abs_floor),
        ]
    )
    # Slots with little data take the series' typical scale when theirs is smaller.
    thin = n < 5
    scale = np.maximum(raw_scale, floor)
    scale = np.where(thin, np.maximum(scale, pooled[g_code]), scale)
    learned = pd.DataFrame(
        {
            "series_id": ids[g_code],
            "slot": g_slot,
            "season": np.asarray(SEASONS, dtype=object)[season[g_code]],
            "n": n.astype(np.int64),
            "mean": mean,
            "std": std,
            "median": p50,
            "mad": mad,
            "p05": p05,
            "p50": p50,
            "p95": p95,
            "p99": p99,
            "trend_slope": slope_day[g_code],
            "window_start": first[g_code].astype(np.float64),
            "window_end": (last + bucket_us)[g_code].astype(np.float64),
            "scale": scale,
            "level": level[g_code],
        }
    )
    learned = _fill_missing_slots(learned, season, ids, pooled, level)
    residual = (detrended - p50[pos]) / scale[pos]
    extremes = {}
    for side in ("max", "min"):
        if side in frame.columns:
            raw = frame[side].to_numpy(np.float64)[rows]
            extremes[side] = (raw - slope_day[code] * (ts - t_ref[code]) / DAY_US - p50[pos]) / (
                scale[pos]
            )
    calib = _calibrate(
        code,
        ts,
        value,
        residual,
        extremes.get("max", residual),
        extremes.get("min", residual),
        span,
        params,
        np.minimum.reduceat(p05, np.flatnonzero(np.r_[True, np.diff(g_code) != 0])),
        count,
    )
    at = np.searchsorted(ids, learned["series_id"].to_numpy(np.int64))
    learned = learned.assign(**{name: column[at] for name, column in calib.items()})
    counts = {name: int((season == k).sum()) for k, name in enumerate(SEASONS)}
    return Learned(learned, skipped, counts)


def _in_series_time_order(frame: pd.DataFrame) -> bool:
    """Rows already ordered by (series_id, ts_us), as a stable sort would leave them."""
    sid = frame["series_id"].to_numpy(np.int64)
    ts = frame["ts_us"].to_numpy(np.int64)
    if len(sid) < 2:
        return True
    return bool(np.all((sid[1:] > sid[:-1]) | ((sid[1:] == sid[:-1]) & (ts[1:] >= ts[:-1]))))


def _calibrate(
    code: np.ndarray,
    ts: np.ndarray,
    value: np.ndarray,
    residual: np.ndarray,
    high: np.ndarray,
    low: np.ndarray,
    span: np.ndarray,
    params: LearnParams,
    low_normal: np.ndarray,
    count: np.ndarray,
) -> dict[str, np.ndarray]:
    """Per series: the tails of its agile residuals, its outage floor and the thresholds its
    own window allows under the alert budget (tasks/calibration.py)."""
    n = len(span)
    floor = cal.outage_floor(code, value, n, low_normal)
    usable = ~(value <= floor[code])
    offset = cal.agile_offset(code, ts, residual, n, use=usable)
    up = high - offset
    down = offset - low
    up_u, up_beta = cal.fit_tail(code, np.where(usable, up, np.nan), n)
    down_u, down_beta = cal.fit_tail(code, np.where(usable, down, np.nan), n)
    # Runs: buckets average several raw points; a run of RUN_POINTS raw points spans about
    # RUN_POINTS / (points per bucket) buckets.
    starts = np.flatnonzero(np.r_[True, code[1:] != code[:-1]])
    per_bucket = np.maximum(np.add.reduceat(count, starts) / np.diff(np.r_[starts, len(code)]), 1)
    window = np.clip(np.round(cal.RUN_POINTS / per_bucket), 1, cal.RUN_POINTS).astype(np.int64)
    run = cal.rolling_mean(code, np.where(usable, residual - offset, 0.0), window[code])
    run_up_u, run_up_beta = cal.fit_tail(code, run, n)
    run_down_u, run_down_beta = cal.fit_tail(code, -run, n)
    run_level = np.where(
        run >= 0,
        cal.tail_level(run, run_up_u[code], run_up_beta[code]),
        cal.tail_level(-run, run_down_u[code], run_down_beta[code]),
    )
    level_up = np.where(usable, cal.tail_level(up, up_u[code], up_beta[code]), np.nan)
    level_down = np.where(usable, cal.tail_level(down, down_u[code], down_beta[code]), np.nan)
    level_up = np.fmax(level_up, np.where(run > 0, run_level, np.nan))
    level_down = np.fmax(level_down, np.where(run < 0, run_level, np.nan))
    weeks = span / (7 * DAY_US)
    budget = params.alert_budget_per_week

    def threshold(level: np.ndarray) -> np.ndarray:
        return cal.score_of(cal.budget_threshold(code, ts, level, n, weeks, budget))

    return {
        "tail_up_u": up_u,
        "tail_up_beta": up_beta,
        "tail_down_u": down_u,
        "tail_down_beta": down_beta,
        "run_up_u": run_up_u,
        "run_up_beta": run_up_beta,
        "run_down_u": run_down_u,
        "run_down_beta": run_down_beta,
        "outage_floor": floor,
        "alert_budget": np.full(n, budget),
        "threshold_both": threshold(np.fmax(level_up, level_down)),
        "threshold_up": threshold(level_up),
        "threshold_down": threshold(level_down),
    }


def _fill_missing_slots(
    learned: pd.DataFrame,
    season: np.ndarray,
    ids: np.ndarray,
    pooled: np.ndarray,
    level: np.ndarray,
) -> pd.DataFrame:
    """Every series gets all slots of its season; a slot with no data (a gap of days) expects
    the series' level with the widest scale the series has."""
    widest = learned.groupby("series_id", sort=True)["scale"].max().to_numpy()
    sizes = np.asarray(SLOTS)[season]
    full_sid = np.repeat(ids, sizes)
    full_slot = np.arange(len(full_sid)) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    have = learned["series_id"].to_numpy() * MAX_SLOTS + learned["slot"].to_numpy()
    want = full_sid * MAX_SLOTS + full_slot
    missing = ~np.isin(want, have)
    if not missing.any():
        return learned
    pos = np.searchsorted(ids, full_sid[missing])
    first_rows = learned.drop_duplicates("series_id").set_index("series_id")
    extra = pd.DataFrame(
        {
            "series_id": full_sid[missing],
            "slot": full_slot[missing],
            "season": np.asarray(SEASONS, dtype=object)[season[pos]],
            "n": 0,
            "mean": np.nan,
            "std": np.nan,
            "median": level[pos],
            "mad": np.nan,
            "p05": np.nan,
            "p50": level[pos],
            "p95": np.nan,
            "p99": np.nan,
            "trend_slope": first_rows.loc[full_sid[missing], "trend_slope"].to_numpy(),
            "window_start": first_rows.loc[full_sid[missing], "window_start"].to_numpy(),
            "window_end": first_rows.loc[full_sid[missing], "window_end"].to_numpy(),
            "scale": np.maximum(widest[pos], pooled[pos]),
            "level": level[pos],
        }
    )
    return (
        pd.concat([learned, extra], ignore_index=True)
        .sort_values(["series_id", "slot"], kind="stable")
        .reset_index(drop=True)
    )


def _no_skips() -> pd.DataFrame:
    return pd.DataFrame({"series_id": pd.Series(dtype="int64"), "reason": pd.Series(dtype=str)})


# -- expected values, shared with scoring -------------------------------------------------------
@dataclass
class BaselineTable:
    """Baselines as dense arrays (series x 168 slots) for vectorised lookups."""

    series_ids: np.ndarray
    season: np.ndarray
    median: np.ndarray
    scale: np.ndarray
    slope_per_us: np.ndarray
    t_ref: np.ndarray
    t_end: np.ndarray
    level: np.ndarray
    calibration: np.ndarray  # CALIBRATION_COLUMNS x series

    @classmethod
    def from_frame(cls, frame: pd.DataFrame) -> BaselineTable:
        ids = np.unique(frame["series_id"].to_numpy(np.int64))
        n = len(ids)
        pos = np.searchsorted(ids, frame["series_id"].to_numpy(np.int64))
        slot = frame["slot"].to_numpy(np.int64)
        median = np.full((n, MAX_SLOTS), np.nan)
        scale = np.full((n, MAX_SLOTS), np.nan)
        median[pos, slot] = frame["median"].to_numpy(np.float64)
        scale[pos, slot] = frame["scale"].to_numpy(np.float64)
        season = np.zeros(n, dtype=np.int64)
        season[pos] = pd.Series(frame["season"]).map({s: i for i, s in enumerate(SEASONS)})
        per_series = np.zeros((4, n))
        per_series[:, pos] = (
            frame[["trend_slope", "window_start", "window_end", "level"]].to_numpy(np.float64).T
        )
        slope, w_start, w_end, level = per_series
        calibration = np.full((len(CALIBRATION_COLUMNS), n), np.nan)
        present = [c for c in CALIBRATION_COLUMNS if c in frame.columns]
        if present:
            index = np.array([CALIBRATION_COLUMNS.index(c) for c in present], dtype=np.int64)
            calibration[np.ix_(index, pos)] = frame[present].to_numpy(np.float64).T
        # Baselines from before calibration existed: a unit tail from 0 (z = 7 is p = 1e-4).
        for name in ("tail_up_u", "tail_down_u", "run_up_u", "run_down_u"):
            row = calibration[CALIBRATION_COLUMNS.index(name)]
            row[np.isnan(row)] = 0.0
        for name in ("tail_up_beta", "tail_down_beta", "run_up_beta", "run_down_beta"):
            row = calibration[CALIBRATION_COLUMNS.index(name)]
            row[np.isnan(row)] = 1.0
        return cls(
            ids,
            season,
            median,
            scale,
            slope / DAY_US,
            (w_start + w_end) / 2,
            w_end,
            level,
            calibration,
        )

    def positions(self, series_id: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row of the table, whether the series has one) per point (points grouped by series)."""
        n = len(self.series_ids)
        if not n or not len(series_id):
            return np.zeros(len(series_id), dtype=np.int64), np.zeros(len(series_id), dtype=bool)
        starts = np.flatnonzero(np.r_[True, series_id[1:] != series_id[:-1]])
        run_len = np.diff(np.r_[starts, len(series_id)])
        run_pos = np.minimum(np.searchsorted(self.series_ids, series_id[starts]), n - 1)
        run_has = self.series_ids[run_pos] == series_id[starts]
        return np.repeat(run_pos, run_len), np.repeat(run_has, run_len)

    def calibration_of(self, pos: np.ndarray) -> dict[str, np.ndarray]:
        """The calibration columns per point, from positions()."""
        if not len(self.series_ids):
            return {c: np.full(len(pos), np.nan) for c in CALIBRATION_COLUMNS}
        return {c: self.calibration[i].take(pos) for i, c in enumerate(CALIBRATION_COLUMNS)}

    def lookup(
        self,
        series_id: np.ndarray,
        ts_us: np.ndarray,
        params: LearnParams | None = None,
        positions: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(has baseline, expected, scale, level) per point (points grouped by series)."""
        params = params or LearnParams()
        n = len(self.series_ids)
        if not n or not len(series_id):
            nan = np.full(len(series_id), np.nan)
            return np.zeros(len(series_id), dtype=bool), nan, nan, nan
        # Look each run of one series up once, then spread the answer over its points.
        pos, series_has = positions if positions is not None else self.positions(series_id)
        slot = slot_of(ts_us, self.season[pos])
        flat = pos * MAX_SLOTS + slot
        at = np.minimum(ts_us, self.t_end[pos] + params.max_extrapolation_us)
        expected = self.median.ravel().take(flat) + self.slope_per_us[pos] * (at - self.t_ref[pos])
        scale = self.scale.ravel().take(flat)
        has = series_has & np.isfinite(expected) & np.isfinite(scale)
        expected[~has] = np.nan
        scale[~has] = np.nan
        return has, expected, scale, self.level[pos]


def model_features(
    points: pd.DataFrame, table: BaselineTable
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(has baseline, expected, scale, level, features) for points sorted by series and time."""
    sid = points["series_id"].to_numpy(np.int64)
    ts = points["ts_us"].to_numpy(np.int64)
    value = points["value"].to_numpy(np.float64)
    has, expected, scale, level = table.lookup(sid, ts)
    feats = features(sid, value, expected, scale, level)
    return has, expected, scale, level, feats


def fit_models(
    buckets: pd.DataFrame,
    baselines: pd.DataFrame,
    metric_of: pd.Series,
    patterns: dict[str, str],
    *,
    max_rows: int,
) -> dict[str, FittedModel]:
    """Per-metric detectors fitted on bucket averages scored against their own baselines."""
    if buckets.empty or baselines.empty:
        return {}
    frame = buckets[buckets["count"] > 0].sort_values(["series_id", "ts_us"], kind="stable")
    points = pd.DataFrame(
        {
            "series_id": frame["series_id"].to_numpy(np.int64),
            "ts_us": frame["ts_us"].to_numpy(np.int64),
            "value": (frame["sum"] / frame["count"]).to_numpy(np.float64),
        }
    )
    has, _, _, _, feats = model_features(points, BaselineTable.from_frame(baselines))
    metrics = points["series_id"].map(metric_of).to_numpy(dtype=object)
    return fit_per_metric(
        feats[has],
        metrics[has],
        patterns,
        fitted_from=int(points["ts_us"].min()),
        fitted_to=int(points["ts_us"].max()),
        max_rows=max_rows,
    )
