"""Calibrated scores: tail probabilities under each series' own residuals, an alert budget, an
agile level, and outages. Pure numpy, vectorised across series (no loop per series).

- **Residual.** r = (value - expected) / scale, then minus the series' *agile offset*: the
  median of three 40-minute levels (each the median of its 5-minute block mean residuals) in
  the two hours before the point's block. A spike or a short incident straddling two
  sub-windows moves none of the median; a sustained level shift moves two of them within about
  65 minutes, after which the series is compared with its new level (one alert, not a storm
  until the nightly fit). A sub-window without data counts as level 0: hourly points fill two
  of the three, so an hourly series takes a shift as its level after two hours that agree.
- **Tail.** Per series and side (up, down), residuals above their 97% quantile u are fitted
  with an exponential excess (a generalised Pareto tail of shape 0) of robust scale
  beta = median excess / ln 2: p(z) = 0.03 * exp(-(z - u) / beta). L = -log10 p is linear in z,
  so a point keeps ranking however far beyond the training range it lies. L is at least that
  of a Laplace tail of BODY_SCALE (1.5) scales, 0.5 exp(-z / 1.5): where incidents fill the top
  few percent of a window (a crash rate that spikes tenfold twice a week), the fitted tail
  learns them as normal and would score the next tenfold spike like ordinary noise. On the
  real labelled series (benchmarks/detect.py) this floor at 2 scales raised recall from 0.50
  to 0.59; with the wider slot scales of tasks/baseline.py (POOLED_FLOOR) 1.5 scales found
  115 of 177 incidents at 0.70 false alerts per series-week, 2 scales 112 at 0.69, 1 scale
  118 at 0.73, 3 scales 101 at 0.67 (hour-counted budget, before episodes).
- **Score.** 1 - exp(-L / L_SCALE): 0.7 at L = 4 (p = 1e-4 per block), 0.9 at L ~ 7.65,
  approaching 1 without a clip (past L = 30 the gap to 1 shrinks as 1 / L, so float64 never
  rounds a far-out point to exactly 1).
- **Budget.** At each fit, a series' effective threshold is the lowest score at which its
  training window would have raised at most `budget * weeks` alert episodes, an episode being a
  run of consecutive hours that reach it (budget_threshold): a noisy or heavy-tailed series
  gets a higher threshold, a quiet one keeps the rule's. Counting hours instead let one
  ten-hour incident the rule had missed spend a month's allowance (real series: 115 incidents
  found at 0.70 false alerts per series-week with hours, 117 at 0.72 with episodes). The
  training levels are the statistics' alone, so the bar is raised by the most a PyOD model
  can add to a point's L when it is scored (MODEL_LIFT_MAX) and by a rounding margin: hours
  that tie with the bar (a counter's everyday 1) must not fire.
- **Runs.** The mean agile residual of a point and the one before it (RUN_POINTS) has tails of
  its own (fitted the same way): a moderate rise that holds (a crash rate at four times its
  usual level for hours) is rare as a run before any single point of it is. L is the larger of
  the point's and the run's. On the real labelled series, runs of two points found 125 of 177
  incidents at 0.64 false alerts per series-week, runs of six 120 at 0.69 (three: 124 at 0.68;
  four: 123 at 0.69; none: 119 at 0.60); the same held with a budget of 1 a week (126 at 0.74
  against 119 at 0.76) and with `for` 0 (129 against 124, both 0.88). Six points were too
  many: over six hourly points a run took in the agile level's own moves, so once a two-hour
  spike had moved the level, the hours back at the usual level read as a dip for hours.
- **Outage.** A non-negative series whose 1% quantile is above zero is busy; a point at or
  below a tenth of that quantile is an outage, whatever its score.
"""

from __future__ import annotations

import numpy as np

from tasks.grouping import group_quantiles

BLOCK_US = 300_000_000  # the 5m rollup bucket
SUB_BLOCKS = 8  # 40 minutes per sub-window, three sub-windows: two hours of context
AGILE_US = 3 * SUB_BLOCKS * BLOCK_US
TAIL_Q = 0.97
BODY_SCALE = 1.5  # in scales: a point is at least as rare as under a Laplace tail this wide
BETA_FLOOR = 0.25  # in scales: a near-constant training window does not make every wiggle news
L_SCALE = 4.0 / np.log(1.0 / 0.3)  # score 0.7 at L = 4
_BODY_BASE = float(np.log10(2.0))
_BODY_SLOPE = 1.0 / (BODY_SCALE * float(np.log(10.0)))
MODEL_WEIGHT = 0.25  # a PyOD model's -log10 p adds this share of itself to L (tasks/detect.py)
MODEL_P_FLOOR = 1.0 / 501  # the least p a model's calibrated score stands for
MODEL_LIFT_MAX = MODEL_WEIGHT * float(-np.log10(MODEL_P_FLOOR))  # the most a model adds to L
L_KNEE = 30.0  # p = 1e-30: past it the score approaches 1 as 1 / L (score_of)
_GAP_KNEE = float(np.exp(-L_KNEE / L_SCALE))  # 1 - score at the knee
LN10 = float(np.log(10.0))
OUTAGE_SHARE = 0.1
EPISODE_US = 3_600_000_000
KIND_POINT, KIND_OUTAGE, KIND_SHIFT = 0, 1, 2
KIND_NAMES = {KIND_POINT: "point", KIND_OUTAGE: "outage", KIND_SHIFT: "level shift"}
SUSTAINED_POINTS = 6
RUN_POINTS = 2  # the run score: the mean residual of a point and the one before it


def score_of(level: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """-log10 p mapped to [0, 1): monotone, no clip. Up to L_KNEE, 1 - exp(-L / L_SCALE); past
    it the distance to 1 shrinks as 1 / L instead, so that float64 keeps points thousands of
    decades out apart (the exponential would round every L above ~107 to exactly 1.0, and a
    burst could not outrank a counter's everyday 1, nor clear a threshold of 1.0).

    Computed in `out` when given (as long as `level`, which it may not share memory with)."""
    out = np.maximum(level, 0.0, out=out)
    far = np.flatnonzero(out > L_KNEE)  # few rows: the common ones take the fast path
    far_level = out[far]
    np.divide(out, -L_SCALE, out=out)
    np.expm1(out, out=out)
    np.negative(out, out=out)
    if len(far):
        out[far] = 1.0 - _GAP_KNEE * L_KNEE / far_level
    return out


def level_of(score: np.ndarray) -> np.ndarray:
    """The inverse of score_of (score in [0, 1); 1 and above give infinity)."""
    score = np.clip(score, 0.0, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        near = -L_SCALE * np.log1p(-score)
        far = L_KNEE * _GAP_KNEE / (1.0 - score)
    return np.where(score > 1.0 - _GAP_KNEE, far, near)


def shift_for_budget(threshold: np.ndarray, stored_budget: np.ndarray, budget: float) -> np.ndarray:
    """A threshold set for `stored_budget` alerts a week moved to `budget`: a tenth of the
    alerts costs one decade of tail probability (the exponential tail's relation)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        shift = np.where(stored_budget > 0, np.log10(stored_budget / max(budget, 1e-9)), 0.0)
    return score_of(level_of(threshold) + np.nan_to_num(shift))


def tail_base() -> float:
    """-log10 of the tail's mass: L at the tail's threshold u."""
    return float(-np.log10(1.0 - TAIL_Q))


def tail_level(z: np.ndarray, u: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """-log10 of p(z) = (1 - TAIL_Q) * exp(-(z - u) / beta), at least that of the Laplace
    floor 0.5 * exp(-z / BODY_SCALE), never below 0."""
    with np.errstate(invalid="ignore", over="ignore"):
        out = tail_base() + (z - u) / (beta * LN10)
        out = np.fmax(out, z * _BODY_SLOPE + _BODY_BASE)
    return np.fmax(out, 0.0)  # NaN -> 0


def tail_reach(level: np.ndarray, u: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """The z at which tail_level reaches `level` (the smaller of the tail's and the body's)."""
    with np.errstate(invalid="ignore", over="ignore"):
        tail = u + (level - tail_base()) * beta * LN10
        body = (level - _BODY_BASE) / _BODY_SLOPE
    return np.fmin(tail, body)


# Batcher's odd-even merge network for 8 inputs (19 compare-exchanges): sorts SUB_BLOCKS
# columns with element-wise minimum/maximum, far cheaper than np.sort over windows of 8.
_SORT8 = (
    (0, 1), (2, 3), (4, 5), (6, 7), (0, 2), (1, 3), (4, 6), (5, 7), (1, 2), (5, 6),
    (0, 4), (1, 5), (2, 6), (3, 7), (2, 4), (3, 5), (1, 2), (3, 4), (5, 6),
)  # fmt: skip


def _sub_window_medians(mean: np.ndarray) -> np.ndarray:
    """(n_series, width + 1): column i holds the median of the finite values of `mean` in
    columns [i - SUB_BLOCKS, i), NaN where there are none (and for i < SUB_BLOCKS). Worked
    through in chunks of series, so the sorted windows stay small."""
    n_series, width = mean.shape
    out = np.full((n_series, width + 1), np.nan)
    if width < SUB_BLOCKS:
        return out
    assert SUB_BLOCKS == 8, "the sorting network is for windows of 8"
    chunk = max(1, 4_000_000 // (width * SUB_BLOCKS))
    cols = width - SUB_BLOCKS + 1
    for lo in range(0, n_series, chunk):  # a loop per chunk of series, not per series
        part = mean[lo : lo + chunk]
        # NaN (no data) as +inf sorts after every finite value, as np.sort puts NaN last.
        lanes = [np.where(np.isnan(part[:, j : j + cols]), np.inf, part[:, j : j + cols])
                 for j in range(SUB_BLOCKS)]  # fmt: skip
        for i, j in _SORT8:
            lanes[i], lanes[j] = np.minimum(lanes[i], lanes[j]), np.maximum(lanes[i], lanes[j])
        ordered = np.stack(lanes)
        count = np.isfinite(ordered).sum(axis=0)
        below = np.maximum(count - 1, 0) // 2
        above = count // 2
        a = np.take_along_axis(ordered, below[None], axis=0)[0]
        b = np.take_along_axis(ordered, np.minimum(above, SUB_BLOCKS - 1)[None], axis=0)[0]
        out[lo : lo + chunk, SUB_BLOCKS:] = np.where(count > 0, 0.5 * (a + b), np.nan)
    return out


def agile_offset(
    code: np.ndarray, ts: np.ndarray, r: np.ndarray, n_series: int, use: np.ndarray | None = None
) -> np.ndarray:
    """Per row: the median of three 40-minute levels of block residuals in the two hours
    before the row's 5-minute block (a sub-window without data counts as 0, so one level
    alone never moves it, and two that agree in sign move it by the nearer to 0). Rows
    sorted by code.

    A sub-window's level is the median of its (up to eight) 5-minute block means, not their
    mean: an incident shorter than half a sub-window that straddles the boundary of two of them
    would otherwise raise both means, move the median of three, and make the normal points
    after it look far off the other way (a second, false alert 40 and 80 minutes later). With
    medians, a shift must fill most of two sub-windows before the offset follows it.

    Computed once per (series, block) cell of a dense grid, then looked up per row."""
    n = len(r)
    if n == 0:
        return np.empty(0)
    ok = np.isfinite(r) if use is None else (use & np.isfinite(r))
    block = ts // BLOCK_US
    b0 = int(block.min())
    pad = 3 * SUB_BLOCKS
    width = int(block.max()) - b0 + 1 + pad
    cell = code.astype(np.int64) * width + (block - b0) + pad
    size = n_series * width
    s = np.bincount(cell, weights=np.where(ok, r, 0.0), minlength=size)
    c = np.bincount(cell, weights=ok.astype(np.float64), minlength=size)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(c > 0, s / np.where(c > 0, c, 1.0), np.nan).reshape(n_series, width)
    # Column i: the median of the block means in blocks [i - SUB_BLOCKS, i) (NaN for none).
    sub = _sub_window_medians(mean)

    def window(k: int) -> np.ndarray:
        # For the cell in column j (pad <= j < width), sub-window k covers blocks
        # [j - (k + 1) * SUB_BLOCKS, j - k * SUB_BLOCKS): one column slice, no gathers.
        return sub[:, pad - k * SUB_BLOCKS : width - k * SUB_BLOCKS]

    # An empty sub-window counts as level 0 (no evidence of a shift), not as "no offset at
    # all": hourly points fill only two of the three, and a shift they agree on must move the
    # offset as it does for minute data (real labelled series, benchmarks/detect.py: 117 of
    # 177 incidents found at 0.72 false alerts per series-week before, 120 at 0.69 after).
    a, b, d = (np.nan_to_num(window(k), nan=0.0) for k in range(3))
    grid = np.maximum(np.minimum(a, b), np.minimum(np.maximum(a, b), d))  # n_series x (width - pad)
    return grid.ravel().take(code.astype(np.int64) * (width - pad) + (block - b0))


def fit_tail(code: np.ndarray, z: np.ndarray, n_series: int) -> tuple[np.ndarray, np.ndarray]:
    """(u, beta) per series of one side's residuals z (NaN rows ignored). The median of the
    values above the TAIL_Q quantile is the (1 + TAIL_Q) / 2 quantile, so one sort gives both.

    TAIL_Q is 0.97: on the real labelled series (benchmarks/detect.py) a tail fitted above the
    90% quantile let the bulk of ordinary residuals set its slope and paged 1.12 times per
    series-week at recall 0.50; above the 97% quantile, 0.99 at 0.51 (0.95: 1.11 at 0.53;
    0.98: 1.09 at 0.57). One value for every series: no per-file choice."""

    ok = np.isfinite(z)
    u = np.zeros(n_series)
    beta = np.full(n_series, BETA_FLOOR)
    if not ok.any():
        return u, beta
    uniq, _, (q_u, q_mid) = group_quantiles(code[ok], z[ok], (TAIL_Q, (1.0 + TAIL_Q) / 2))
    u[uniq] = q_u
    beta[uniq] = np.maximum((q_mid - q_u) / np.log(2.0), BETA_FLOOR)
    return u, beta


def budget_threshold(
    code: np.ndarray,
    ts: np.ndarray,
    level: np.ndarray,
    n_series: int,
    weeks: np.ndarray,
    budget: float,
) -> np.ndarray:
    """Per series: the lowest bar in L at which its training rows form at most about
    `budget * weeks` alert episodes, an episode being a run of consecutive hours whose peak
    reaches the bar (a crash rate high for ten hours is one alert, not ten).

    Rows are sorted by (code, ts), so each (series, hour) is one contiguous run. An hour
    starts an episode for the bars in (peak of the hour before, its own peak]; sweeping bars
    from the top, the count of episodes is the number of those intervals that hold the bar,
    and the bar is the highest one at which it first exceeds the allowance."""
    out = np.zeros(n_series)
    if not len(level):
        return out
    level = np.where(np.isfinite(level), level, -np.inf)
    hour = ts // EPISODE_US
    change = np.r_[True, (code[1:] != code[:-1]) | (hour[1:] != hour[:-1])]
    starts = np.flatnonzero(change)
    peak = np.maximum.reduceat(level, starts)
    owner = code[starts]
    h = hour[starts]
    prev = np.full(len(peak), -np.inf)
    adjacent = np.r_[False, (owner[1:] == owner[:-1]) & (h[1:] == h[:-1] + 1)]
    prev[adjacent] = peak[:-1][adjacent[1:]]
    opens = peak > prev  # hours that start an episode for some bar
    closing = opens & np.isfinite(prev)
    # Events: +1 at an opening hour's peak, -1 at the peak before it (no longer an opening
    # below it). Sorted per series from the highest value down, -1 before +1 at a tie.
    e_owner = np.r_[owner[opens], owner[closing]]
    e_value = np.r_[peak[opens], prev[closing]]
    e_step = np.r_[np.ones(int(opens.sum())), -np.ones(int(closing.sum()))]
    order = np.lexsort((e_step, -e_value, e_owner))
    e_owner, e_value, e_step = e_owner[order], e_value[order], e_step[order]
    running = np.cumsum(e_step)
    first = np.searchsorted(e_owner, np.arange(n_series), side="left")
    last = np.searchsorted(e_owner, np.arange(n_series), side="right")
    base = np.r_[0.0, running][first]  # the running count before each series' events
    count = running - base[e_owner]
    allowed = np.floor(np.maximum(budget, 0.0) * weeks + 0.5).astype(np.int64)
    over = (e_step > 0) & (count > allowed[e_owner])
    at = np.flatnonzero(over)
    hit = np.zeros(n_series, dtype=bool)
    if len(at):
        series, where = np.unique(e_owner[at], return_index=True)
        out[series] = e_value[at[where]]
        hit[series] = True
    # Never more episodes than the budget allows: the quietest hour it had is the bar.
    series_starts = np.flatnonzero(np.r_[True, owner[1:] != owner[:-1]])
    lowest = np.full(n_series, -np.inf)
    lowest[owner[series_starts]] = np.minimum.reduceat(peak, series_starts)
    quiet = ~hit & (last > first)
    out[quiet] = lowest[quiet]
    # A short window cannot show a rate of a few a week: the tail model's bar for the budget
    # (blocks a week x the point and run scores x both sides, over the budget) is the least.
    blocks = np.bincount(code, minlength=n_series).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        model_bar = np.log10(4.0 * blocks / np.maximum(weeks, 1e-9) / max(budget, 1e-9))
    out = np.fmax(np.nan_to_num(out, neginf=0.0), np.nan_to_num(model_bar, nan=0.0))
    return np.maximum(out, 0.0)


def outage_floor(
    code: np.ndarray, value: np.ndarray, n_series: int, low_normal: np.ndarray
) -> np.ndarray:
    """Per series: OUTAGE_SHARE of its low normal (e.g. the lowest slot's 5% quantile) when the
    series never went below zero and that low normal is above zero, else NaN. Rows sorted by
    code."""
    out = np.full(n_series, np.nan)
    if not len(value):
        return out
    starts = np.flatnonzero(np.r_[True, code[1:] != code[:-1]])
    lowest = np.minimum.reduceat(np.where(np.isfinite(value), value, np.inf), starts)
    busy = np.zeros(n_series, dtype=bool)
    busy[code[starts]] = lowest >= 0
    busy &= low_normal > 0
    out[busy] = OUTAGE_SHARE * low_normal[busy]
    return out


def sustained(code: np.ndarray, sign_high: np.ndarray) -> np.ndarray:
    """Rows ending a run of SUSTAINED_POINTS rows of one series all high on this row's side
    (sign_high: +1 high above, -1 high below, 0 not high); only high rows are looked at."""
    n = len(code)
    out = np.zeros(n, dtype=bool)
    rows = np.flatnonzero(sign_high != 0)
    rows = rows[rows >= SUSTAINED_POINTS - 1]
    if not len(rows):
        return out
    back = rows[:, None] - np.arange(SUSTAINED_POINTS)[None, :]
    same = (code[back] == code[rows][:, None]) & (sign_high[back] == sign_high[rows][:, None])
    out[rows] = same.all(axis=1)
    return out


def rolling_mean(code: np.ndarray, r: np.ndarray, window: np.ndarray | int) -> np.ndarray:
    """Per row: the mean of r over the row and the window - 1 rows before it in its series
    (NaN until a series has a full window). Rows sorted by code; window per row or global."""
    n = len(r)
    if n == 0:
        return np.empty(0)
    first = np.ones(n, dtype=bool)
    first[1:] = code[1:] != code[:-1]
    idx = np.arange(n)
    start = np.maximum.accumulate(np.where(first, idx, 0))
    w = np.broadcast_to(np.asarray(window, dtype=np.int64), (n,))
    lo = idx - w + 1
    c = np.concatenate(([0.0], np.cumsum(np.nan_to_num(r))))
    with np.errstate(invalid="ignore"):
        out = (c[idx + 1] - c[np.maximum(lo, 0)]) / w
    return np.where(lo >= start, out, np.nan)
