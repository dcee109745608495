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
   at POOLED_FLOOR (1.5) times the series' median slot scale (its mean absolute deviation when
   most slots have no spread: a counter at zero but for bursts), 0.1% of its level and 1e-9, so
   a constant series never divides by zero, a slot with little data does not turn every wiggle
   into an anomaly, and a quiet night does not make a small absolute wiggle news.

The expected value at time t is `median[slot(t)] + trend_slope * (t - window midpoint)` (slope
per day, extrapolated at most two days beyond the window).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from storage import detection
from tasks import calibration as cal
from tasks.baseline_table import BaselineTable, fit_models, model_features
from tasks.grouping import group_quantiles
from tasks.seasonality import (
    DAY_US,
    HOUR_US,
    MAD_TO_SIGMA,
    MAX_SLOTS,
    SEASONS,
    SLOTS,
    LearnParams,
    choose_seasons,
    slot_of,
    theil_sen_per_day,
)

TIE_MARGIN = 1 + 1e-6  # a budget's bar in L, raised past values equal to it up to rounding
# A slot's scale is at least this multiple of the series' median slot scale. On the real
# labelled series (benchmarks/detect.py) the quiet hours' own scale made a night's rise of a
# third page like a daytime incident twice the level: at half the median slot scale, 104 of
# 177 incidents found at 0.91 false alerts per series-week; at 1.0, 110 at 0.90; 1.25, 114 at
# 0.74; 1.5, 112 at 0.69; 2.0, 104 at 0.57 (tail floor of 2 scales, hour-counted budget).
POOLED_FLOOR = 1.5
MEAN_AD_TO_SIGMA = 1.2533  # sqrt(pi / 2): a normal's sigma over its mean absolute deviation

# Learning is here; the names after it are imported from this module too (the constants and
# knobs from tasks/seasonality.py, the lookup table from tasks/baseline_table.py).
__all__ = [
    "DAY_US",
    "HOUR_US",
    "BaselineTable",
    "LearnParams",
    "Learned",
    "fit_models",
    "learn_baselines",
    "model_features",
    "slot_of",
]


@dataclass
class Learned:
    """Baseline rows (the baselines table) and the series skipped, with the reason."""

    baselines: pd.DataFrame
    skipped: pd.DataFrame
    seasons: dict[str, int] = field(default_factory=dict)


@dataclass
class _Series:
    """The buckets of the series being learned, (series, time)-ordered, as arrays: per bucket
    its series code (0..n-1), start, count, average and the variance inside it; per series its
    id, first and last bucket start and the span they cover. `rows` picks these buckets out of
    the frame they came from."""

    ids: np.ndarray
    first: np.ndarray
    last: np.ndarray
    span: np.ndarray
    code: np.ndarray
    ts: np.ndarray
    count: np.ndarray
    value: np.ndarray
    within: np.ndarray
    rows: np.ndarray


@dataclass
class _Trend:
    """Per series its slope per day and the time it is measured from (the window's middle);
    per bucket the detrended average; per series the centre (median) of those and their mean
    absolute deviation from it as a normal sigma (x 1.2533): nonzero whenever any bucket differs
    from the centre, unlike the MAD of a counter that is zero but for bursts."""

    slope_day: np.ndarray
    t_ref: np.ndarray
    detrended: np.ndarray
    centre: np.ndarray
    spread: np.ndarray


@dataclass
class _Slots:
    """The (series, slot) groups: their series code, the group of each bucket (`pos`), the
    group's p05 and median, its scale, and per series the pooled (median) slot scale."""

    g_code: np.ndarray
    pos: np.ndarray
    p05: np.ndarray
    p50: np.ndarray
    scale: np.ndarray
    pooled: np.ndarray


def learn_baselines(
    buckets: pd.DataFrame, *, bucket_us: int, params: LearnParams | None = None
) -> Learned:
    """Baselines from rollup buckets (series_id, ts_us, count, sum, sum_sq; max and min when
    there), in the steps of the module docstring: the series with enough history, their
    trend, their season, the statistics per slot (every slot of the season filled), then the
    calibration of each series' residuals."""
    params = params or LearnParams()
    frame = buckets[buckets["count"] > 0]
    if not _in_series_time_order(frame):  # the database reads come sorted; skip the sort then
        frame = frame.sort_values(["series_id", "ts_us"], kind="stable")
    data, skipped = _series_to_learn(frame, bucket_us, params)
    if data is None:
        return Learned(pd.DataFrame(columns=detection.BASELINE_COLUMNS), skipped)
    trend = _detrend(data, bucket_us)
    season = choose_seasons(data.code, data.ts, _clipped(data, trend), data.span, params)
    slots, learned = _slot_statistics(data, trend, season, bucket_us, params)
    learned = _fill_missing_slots(learned, season, data.ids, slots.pooled, trend.centre)
    calib = _calibrate(data, trend, slots, _extremes(frame, data, trend, slots), params)
    at = np.searchsorted(data.ids, learned["series_id"].to_numpy(np.int64))
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


def _series_to_learn(
    frame: pd.DataFrame, bucket_us: int, params: LearnParams
) -> tuple[_Series | None, pd.DataFrame]:
    """The buckets of the series with enough history (a day, `min_points` buckets), and the
    series skipped with the reason; None when no series is left."""
    sid_all = frame["series_id"].to_numpy(np.int64)
    ids, code = np.unique(sid_all, return_inverse=True)
    ts = frame["ts_us"].to_numpy(np.int64)
    count = frame["count"].to_numpy(np.float64)
    value = frame["sum"].to_numpy(np.float64) / count
    within = np.maximum(frame["sum_sq"].to_numpy(np.float64) / count - value * value, 0.0)
    n_series = len(ids)
    if n_series == 0:
        return None, _no_skips()
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
        return None, skipped
    rows = keep_series[code]
    remap = np.cumsum(keep_series) - 1
    return _Series(
        ids=ids[keep_series],
        first=first[keep_series],
        last=last[keep_series],
        span=span[keep_series],
        code=remap[code[rows]],
        ts=ts[rows],
        count=count[rows],
        value=value[rows],
        within=within[rows],
        rows=rows,
    ), skipped


def _detrend(data: _Series, bucket_us: int) -> _Trend:
    """Each series' Theil-Sen trend taken out of its bucket averages, and their median."""
    code, ts = data.code, data.ts
    slope_day = theil_sen_per_day(code, ts, data.value, len(data.ids))
    t_ref = (data.first + data.last + bucket_us) // 2
    detrended = data.value - slope_day[code] * (ts - t_ref[code]) / DAY_US
    _, _, (centre,) = group_quantiles(code, detrended, (0.5,))
    n = len(data.ids)  # every series kept has buckets: no count is zero
    absolute = np.bincount(code, weights=np.abs(detrended - centre[code]), minlength=n)
    spread = MEAN_AD_TO_SIGMA * absolute / np.bincount(code, minlength=n)
    return _Trend(slope_day, t_ref, detrended, centre, spread)


def _clipped(data: _Series, trend: _Trend) -> np.ndarray:
    """Centred detrended values clipped to each series' robust range (6 sigma from its MAD),
    for the season choice: a few wild buckets must not create or hide a pattern."""
    code = data.code
    centred = trend.detrended - trend.centre[code]
    _, _, (mad_all,) = group_quantiles(code, np.abs(centred), (0.5,))
    sigma = MAD_TO_SIGMA * mad_all
    # A series constant most of the time (an error counter at zero) has no MAD: its bursts
    # would be clipped away, and with them a daily burst's pattern.
    sigma = np.where(sigma > 0, sigma, trend.spread)
    reach = 6 * sigma
    return np.clip(centred, -reach[code], reach[code])


def _slot_statistics(
    data: _Series, trend: _Trend, season: np.ndarray, bucket_us: int, params: LearnParams
) -> tuple[_Slots, pd.DataFrame]:
    """Per (series, slot) of its season: n, mean, std, median, MAD, quantiles and the floored
    scale (module docstring, step 3), as baseline rows of the slots that have data."""
    code, detrended = data.code, trend.detrended
    slot = slot_of(data.ts, season[code])
    keys = code * MAX_SLOTS + slot
    uniq, n, (p05, p50, p95, p99) = group_quantiles(keys, detrended, (0.05, 0.5, 0.95, 0.99))
    pos = np.searchsorted(uniq, keys)
    _, _, (mad,) = group_quantiles(keys, np.abs(detrended - p50[pos]), (0.5,))
    size = len(uniq)
    total = np.bincount(pos, weights=detrended, minlength=size)
    total_sq = np.bincount(pos, weights=(detrended - p50[pos]) ** 2, minlength=size)
    mean = total / n
    std = np.sqrt(np.maximum(total_sq / n - (mean - p50) ** 2, 0.0))
    spread = np.sqrt(np.bincount(pos, weights=data.within, minlength=size) / n)
    g_code = uniq // MAX_SLOTS
    g_slot = uniq % MAX_SLOTS
    raw_scale = np.sqrt((MAD_TO_SIGMA * mad) ** 2 + spread**2)
    _, _, (pooled,) = group_quantiles(g_code, raw_scale, (0.5,))
    # Most slots without spread (a series at zero but for bursts): the series' own spread,
    # from its mean absolute deviation, is its typical scale; else a burst is 1e11 scales.
    pooled = np.where(pooled > 0, pooled, trend.spread)
    level = trend.centre
    floor = np.maximum.reduce(
        [
            POOLED_FLOOR * pooled[g_code],
            params.rel_floor * np.abs(level[g_code]),
            np.full(size, params.abs_floor),
        ]
    )
    # At POOLED_FLOOR >= 1 this also gives slots with little data at least the series'
    # typical scale (a rule of its own for slots under 5 buckets before).
    scale = np.maximum(raw_scale, floor)
    learned = pd.DataFrame(
        {
            "series_id": data.ids[g_code],
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
            "trend_slope": trend.slope_day[g_code],
            "window_start": data.first[g_code].astype(np.float64),
            "window_end": (data.last + bucket_us)[g_code].astype(np.float64),
            "scale": scale,
            "level": level[g_code],
        }
    )
    return _Slots(g_code, pos, p05, p50, scale, pooled), learned


def _extremes(
    frame: pd.DataFrame, data: _Series, trend: _Trend, slots: _Slots
) -> dict[str, np.ndarray]:
    """Per bucket the residual of its average, and of its max and min when the frame has them
    (else the average's stands in): each detrended, less its slot's median, over its scale."""
    code, ts, pos = data.code, data.ts, slots.pos
    residual = (trend.detrended - slots.p50[pos]) / slots.scale[pos]
    out = {"residual": residual, "max": residual, "min": residual}
    for side in ("max", "min"):
        if side in frame.columns:
            raw = frame[side].to_numpy(np.float64)[data.rows]
            out[side] = (
                raw - trend.slope_day[code] * (ts - trend.t_ref[code]) / DAY_US - slots.p50[pos]
            ) / (slots.scale[pos])
    return out


def _calibrate(
    data: _Series,
    trend: _Trend,
    slots: _Slots,
    residuals: dict[str, np.ndarray],
    params: LearnParams,
) -> dict[str, np.ndarray]:
    """Per series: the tails of its agile residuals, its outage floor and the thresholds its
    own window allows under the alert budget (tasks/calibration.py)."""
    code, ts, value, span = data.code, data.ts, data.value, data.span
    residual, high, low = residuals["residual"], residuals["max"], residuals["min"]
    group_starts = np.flatnonzero(np.r_[True, np.diff(slots.g_code) != 0])
    low_normal = np.minimum.reduceat(slots.p05, group_starts)
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
    per_bucket = np.maximum(
        np.add.reduceat(data.count, starts) / np.diff(np.r_[starts, len(code)]), 1
    )
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
        # Above the hour the budget stops at by the most a model can add to a point's L when
        # it is scored (the training levels here are the statistics' alone), and by a margin
        # for rounding: a rule fires at score >= threshold, and hours that tie with it (a
        # counter's everyday 1) must not fire more often than the budget allows.
        bar = cal.budget_threshold(code, ts, level, n, weeks, budget)
        return cal.score_of(np.where(bar > 0, (bar + cal.MODEL_LIFT_MAX) * TIE_MARGIN, bar))

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
